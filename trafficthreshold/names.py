"""Validation of account and event names.

One source of truth: the C hot path calls :func:`validate` the first time a
process meets a name, so the rules below apply everywhere, and the message
says what is wrong and how to fix it.

Rules (docs/segment.rst): an account is 1..64 UTF-8 bytes, an event 1..32;
neither may contain control characters, ``/`` or ``\\`` (names are URL
path segments in the stats API; browsers read ``\\`` as ``/``), nor
``:`` (it separates the parts of the farm's Redis keys, Bootic's layout:
``shop:order``/``paid`` and ``shop``/``order:paid`` would share one
hash), nor be ``.`` or ``..`` (which URLs resolve away), nor start with
``~`` (reserved for internal keys).  The account ``all`` is reserved for the total: pass ``account=None``.

Funnel statuses (Bootic's order funnels): ``hit(account, "order",
status="paid")`` counts the key whose event name is ``order/paid``, the
event and the status joined by :data:`STATUS_SEP`.  ``/`` is the one
character no event name may contain, so such a key can never be taken for
an event, and the hit stays one atomic add into one key (and its ``all``).
The status follows the event-name rules; event, ``/`` and status together
fit in the event's 32 bytes.  ``hit(account, "order/paid")`` is the same hit.
"""
from __future__ import annotations

import unicodedata

ACCOUNT_MAX = 64
EVENT_MAX = 32
ALL = "all"
OVERFLOW_ACCOUNT = "~overflow"
OVERFLOW_EVENT = "~any"
DEFAULT_EVENT = "pageview"
#: Joins an event and a funnel status in a key's event name: ``order/paid``.
STATUS_SEP = "/"


def check_name(kind: str, value: object, max_bytes: int) -> str:
    """Return ``value`` if it is a valid name, else raise TypeError/ValueError."""
    if not isinstance(value, str):
        raise TypeError(f"{kind} must be a str, not {type(value).__name__}")
    if not value:
        example = {"event": "pageview", "status": "paid"}.get(kind, "example.com")
        raise ValueError(f"{kind} name is empty; give a name such as {example!r}")
    size = len(value.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise ValueError(
            f"{kind} name {value[:20]!r}... is {size} bytes long; the limit is "
            f"{max_bytes} UTF-8 bytes: shorten it or hash it")
    for ch in value:
        if unicodedata.category(ch) in ("Cc", "Cs") or ch in "\u2028\u2029":
            raise ValueError(
                f"{kind} name {value!r} contains the control character {ch!r}; "
                "strip control characters before counting")
    if "/" in value:
        raise ValueError(
            f"{kind} name {value!r} contains '/', which cannot appear in a stats "
            "URL; replace it (for example with '-')")
    if ":" in value:
        raise ValueError(
            f"{kind} name {value!r} contains ':', which separates the parts of the farm's "
            "Redis keys (two names would share one hash); replace it (for example with '-')")
    # A name is one path segment of a stats URL (docs/api.rst): URL
    # libraries and browsers resolve "." and ".." away, and read "\" as "/".
    if value in (".", ".."):
        raise ValueError(
            f"{kind} name {value!r} is '.' or '..', which a stats URL cannot carry "
            "(URLs resolve it away); replace it with a name of other characters too")
    if "\\" in value:
        raise ValueError(
            f"{kind} name {value!r} contains '\\', which browsers read as '/' in a "
            "stats URL; replace it (for example with '-')")
    if value.startswith("~"):
        raise ValueError(f"{kind} name {value!r} starts with '~', which is reserved")
    return value


def validate(account: str | None, event: str) -> None:
    """Check an (account, event) pair; ``account=None`` means the total.
    An event ``order/paid`` is the funnel status ``paid`` of ``order``
    (see :func:`check_funnel`)."""
    if account is not None:
        check_name("account", account, ACCOUNT_MAX)
        if account == ALL:
            raise ValueError(
                "account 'all' is reserved for the total over every account; "
                "pass account=None to count only the total")
    if isinstance(event, str) and STATUS_SEP in event:
        check_funnel(event)
    else:
        check_name("event", event, EVENT_MAX)


def check_funnel(key_event: str) -> tuple[str, str]:
    """(event, status) of a funnel key's event name ``event/status``, else
    ValueError naming the part that is wrong and the fix."""
    event, _, status = key_event.partition(STATUS_SEP)
    if STATUS_SEP in status:
        raise ValueError(
            f"event name {key_event!r} has more than one '/': a '/' separates an event from "
            "its funnel status (hit(account, 'order', status='paid')), and neither may "
            "contain '/'; replace the others (for example with '-')")
    check_name("event", event, EVENT_MAX)
    check_name("status", status, EVENT_MAX)
    size = len(key_event.encode("utf-8", "surrogatepass"))
    if size > EVENT_MAX:
        raise ValueError(
            f"event {event!r} with status {status!r} is {size} bytes long as "
            f"{key_event!r}; event, '/' and status together must fit in {EVENT_MAX} "
            "UTF-8 bytes: shorten the status")
    return event, status


def funnel_event(event: str, status: str) -> str:
    """The event name of the key that counts ``status`` of ``event``
    (``order``, ``paid`` -> ``order/paid``), checked."""
    for kind, value in (("event", event), ("status", status)):
        if isinstance(value, str) and STATUS_SEP in value:
            check_name(kind, value, EVENT_MAX)  # raises, naming the '/'
    key_event = f"{check_name('event', event, EVENT_MAX)}{STATUS_SEP}" \
                f"{check_name('status', status, EVENT_MAX)}"
    check_funnel(key_event)
    return key_event


def split_status(key_event: str) -> tuple[str, str | None]:
    """(event, status) of a key's event name: ``order/paid`` ->
    (``order``, ``paid``); a plain event -> (event, None).  No checks: for
    names read back from a segment or a store."""
    event, sep, status = key_event.partition(STATUS_SEP)
    return (event, status) if sep else (key_event, None)

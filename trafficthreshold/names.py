"""Validation of account and event names.

One source of truth: the C hot path calls :func:`validate` the first time a
process meets a name, so the rules below apply everywhere, and the message
says what is wrong and how to fix it.

Rules (docs/segment.rst): an account is 1..64 UTF-8 bytes, an event 1..32;
neither may contain control characters or ``/`` (names are URL path
segments in the stats API), nor start with ``~`` (reserved for internal
keys).  The account ``all`` is reserved for the total: pass ``account=None``.
"""
from __future__ import annotations

import unicodedata

ACCOUNT_MAX = 64
EVENT_MAX = 32
ALL = "all"
OVERFLOW_ACCOUNT = "~overflow"
OVERFLOW_EVENT = "~any"
DEFAULT_EVENT = "pageview"


def check_name(kind: str, value: object, max_bytes: int) -> str:
    """Return ``value`` if it is a valid name, else raise TypeError/ValueError."""
    if not isinstance(value, str):
        raise TypeError(f"{kind} must be a str, not {type(value).__name__}")
    if not value:
        raise ValueError(f"{kind} name is empty; give a name such as 'example.com'")
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
            "URL; replace it (for example with ':')")
    if value.startswith("~"):
        raise ValueError(f"{kind} name {value!r} starts with '~', which is reserved")
    return value


def validate(account: str | None, event: str) -> None:
    """Check an (account, event) pair; ``account=None`` means the total."""
    if account is not None:
        check_name("account", account, ACCOUNT_MAX)
        if account == ALL:
            raise ValueError(
                "account 'all' is reserved for the total over every account; "
                "pass account=None to count only the total")
    check_name("event", event, EVENT_MAX)

"""trafficthreshold: count page views across worker processes, at C speed.

The worker API::

    import trafficthreshold
    trafficthreshold.hit("example.com")          # a page view of an account
    trafficthreshold.hit(event="signup")         # another event, total only
    trafficthreshold.hit("example.com", "order", status="paid")  # an order funnel
    if trafficthreshold.throttle_status() >= 2:  # Drupal's throttle level
        skip_optional_blocks()

``hit()`` and ``throttle_status()`` are C functions (``_counter.c``): a
lock-free atomic add into a shared-memory segment, no system call.  They
attach lazily, once per process, to the segment found by
:func:`configure`, else ``TRAFFICTHRESHOLD_KEY`` /
``TRAFFICTHRESHOLD_BACKEND``, else the default key 0x54546831 (workers do
not read the config file).  They fail open: with no segment installed a warning is
logged once and nothing is counted; only bad arguments raise.  Strict mode
(``TRAFFICTHRESHOLD_STRICT=1`` or ``configure(strict=True)``) raises instead.
"""
from __future__ import annotations

import logging
import os

from . import env, names
from .errors import (ConfigError, LayoutMismatch, SegmentBusy, SegmentError, SegmentInUse,
                     SegmentNotFound, TrafficThresholdError)


def _no_extension(exc: ImportError) -> ImportError:
    """The error for a package without its built C extension.  Typically
    ``import trafficthreshold`` run in the checkout root after
    ``pip install .``: the source tree there shadows the installed package
    and has no ``_counter*.so``; Python's own message blames a circular
    import."""
    here = os.path.dirname(os.path.abspath(__file__))
    if os.path.exists(os.path.join(here, "_counter.c")):
        return ImportError(
            f"you are importing the source tree at {here}, which has no built extension "
            "(trafficthreshold._counter): cd elsewhere to use the installed package, or "
            "`pip install -e .`, or `python setup.py build_ext --inplace` "
            f"(Python said: {exc})")
    return ImportError(f"trafficthreshold at {here} has no built extension "
                       f"(trafficthreshold._counter): reinstall it with `pip install "
                       f"--force-reinstall trafficthreshold` (Python said: {exc})")


try:
    from . import _counter
except ImportError as _exc:
    raise _no_extension(_exc) from _exc
from ._counter import MAX_HIT_N, Counter, hit, throttle_status

__all__ = ["hit", "throttle_status", "MAX_HIT_N", "count", "configure", "Counter", "TrafficThresholdError",
           "ConfigError", "SegmentError", "SegmentNotFound", "LayoutMismatch", "SegmentBusy",
           "SegmentInUse"]
__version__ = "0.1.0"

log = logging.getLogger("trafficthreshold")

_settings: dict[str, object] = {}
_warned: set[str] = set()


def _env_key() -> int:
    key = env.env_key()
    return env.DEFAULT_KEY if key is None else key


def _attach_default() -> Counter:
    """Called by the C code on a process's first hit (and every 10 s while
    no segment is found).  Reads the environment (:mod:`env`), never the
    daemon's config or segment modules."""
    key = _settings.get("key")
    key = _env_key() if key is None else key
    backend = _settings.get("backend") or env.env_backend()
    if backend is not None:
        return Counter(str(backend), int(key))
    try:
        return Counter("sysv", int(key))
    except SegmentNotFound as sysv_missing:
        try:
            return Counter("posix", int(key))
        except SegmentNotFound:
            raise sysv_missing from None


def _warn(message: str, exc: BaseException | None) -> None:
    """Log a fail-open problem: once at WARNING, then at DEBUG."""
    text = f"{message}: {exc}" if exc is not None else message
    if text in _warned:
        log.debug("%s", text)
        return
    _warned.add(text)
    log.warning("%s (this warning is shown once per process)", text)


def configure(key: int | None = None, backend: str | None = None,
              strict: bool | None = None) -> None:
    """Choose the segment for this process (instead of the environment) and
    whether problems raise (strict) or are logged once (fail open, the
    default).  Takes effect at the next hit()."""
    if backend is not None and backend not in env.BACKENDS:
        raise ValueError(f"backend {backend!r} is not valid; use 'sysv' or 'posix'")
    if key is not None:
        _settings["key"] = int(key)
    if backend is not None:
        _settings["backend"] = backend
    if strict is not None:
        _settings["strict"] = bool(strict)
    _counter._setup(names.validate, _attach_default, _warn,
                    bool(_settings.get("strict", env.env_strict())))
    _counter._reset()


def count(account: str | None = None, event: str = names.DEFAULT_EVENT,
          window: str = "minute", now: float | None = None, *,
          status: str | None = None) -> int:
    """Hits of ``account`` (None or "all": every account) for ``event`` (with
    ``status``: that funnel status of it) in the current clock minute
    (``window="minute"``) or the sliding 60 s (``"60s"``).  0 when nothing
    was counted or no segment is installed."""
    if window not in ("minute", "60s"):
        raise ValueError(f"window {window!r} is not valid; use 'minute' or '60s'")
    if account == names.ALL:
        account = None
    if status is not None:
        event = names.funnel_event(event, status)
    names.validate(account, event)
    counter = _counter._ensure()
    if counter is None:
        return 0
    slot = counter.find(account, event)
    if slot is None:
        return 0
    return counter.count(slot, 1 if window == "minute" else 0, now)


configure()

"""The segment a worker counts into, as its environment chooses it.

A web worker reads its environment and nothing else (as client_python's
``values.py`` does): this module, with :mod:`names`, :mod:`errors` and the
C extension, is all that :func:`trafficthreshold.hit` loads.  It imports
nothing of the daemon (no config file, no TOML, no ``sysv_ipc``), so the
daemon's modules take their defaults from here: :mod:`segment`
(``DEFAULT_KEY``, ``BACKENDS``) and :mod:`config` (``MAX_KEY``,
:func:`parse_key`, :func:`env_key`) import them, one home for each.

The variables (docs/webapps.rst): ``TRAFFICTHRESHOLD_KEY`` (decimal or
``0x`` hex), ``TRAFFICTHRESHOLD_BACKEND`` (``sysv`` or ``posix``; unset:
try SysV, then POSIX) and ``TRAFFICTHRESHOLD_STRICT`` (``1``, ``true`` or
``yes``: raise instead of failing open).
"""
from __future__ import annotations

import os
from collections.abc import Mapping

from .errors import ConfigError

#: The IPC key of the segment when none is configured: "TTh1".
DEFAULT_KEY = 0x54546831
#: The largest IPC key (key_t is a signed 32-bit int; 0 is IPC_PRIVATE).
MAX_KEY = 0x7FFFFFFF
#: The kinds of shared memory a segment can live in.
BACKENDS = ("sysv", "posix")


def parse_key(text: str) -> int:
    """Parse a segment key written in decimal or ``0x`` hex; ValueError if bad."""
    text = text.strip()
    key = int(text[2:], 16) if text[:2].lower() == "0x" else int(text, 10)
    if not 1 <= key <= MAX_KEY:
        raise ValueError(f"must be from 1 to {MAX_KEY:#x}")
    return key


def env_key(env: Mapping[str, str] = os.environ) -> int | None:
    """``$TRAFFICTHRESHOLD_KEY`` as a key, None if unset; ConfigError if bad.
    (The worker API reads it too, without loading the whole config.)

    The key precedence, everywhere the key is read: a command-line
    ``--key`` (the CLI passes it to :func:`config.load` as this variable),
    then this variable, then ``key`` in the file, then ``DEFAULT_KEY``.
    The worker API has no file: ``configure(key=...)``, this variable, the
    default."""
    override = env.get("TRAFFICTHRESHOLD_KEY", "")
    if not override.strip():
        return None
    try:
        return parse_key(override)
    except ValueError as exc:
        problem = str(exc) if "must be" in str(exc) else "is not an integer"
        raise ConfigError(
            f"environment: TRAFFICTHRESHOLD_KEY = {override!r} {problem}; "
            "use decimal or 0x hex, e.g. 0x54546831"
        ) from None


def env_backend(env: Mapping[str, str] = os.environ) -> str | None:
    """``$TRAFFICTHRESHOLD_BACKEND``, None if unset or empty (the worker
    then tries SysV, then POSIX).  Not checked here: the C attach names a
    wrong one."""
    return env.get("TRAFFICTHRESHOLD_BACKEND") or None


def env_strict(env: Mapping[str, str] = os.environ) -> bool:
    """True when ``$TRAFFICTHRESHOLD_STRICT`` is ``1``, ``true`` or ``yes``
    (any case): problems raise instead of being logged once."""
    return env.get("TRAFFICTHRESHOLD_STRICT", "").lower() in ("1", "true", "yes")

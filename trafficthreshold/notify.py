"""sd_notify(3) without libsystemd: one datagram to ``$NOTIFY_SOCKET``.

Under ``Type=notify`` systemd passes the address of a datagram socket in
``NOTIFY_SOCKET``; the service sends newline-separated ``KEY=value``
assignments to it: ``READY=1`` when started, ``WATCHDOG=1`` at least every
``WatchdogSec=``, ``STATUS=...`` for ``systemctl status``, ``STOPPING=1`` and
``RELOADING=1``.  The address is a file-system path, or an abstract socket
name written with a leading ``@`` (the kernel wants a leading NUL byte).

Outside systemd (no ``NOTIFY_SOCKET``) every function returns False and does
nothing, so the daemon can call them unconditionally.  Sending never raises:
a lost notification must not take the daemon down (systemd's own sd_notify
returns an error code that nearly every caller ignores).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger("trafficthreshold.notify")


def notify(message: str, env: Mapping[str, str] = os.environ) -> bool:
    """Send ``message`` to ``$NOTIFY_SOCKET``; return True if it was sent.

    Returns False, silently, when not started by systemd (no
    ``NOTIFY_SOCKET``) or when the address is of a kind this module does not
    speak (systemd >= 254 also offers ``vsock:``); logs at debug level and
    returns False when sending fails.
    """
    address = _socket_address(env.get("NOTIFY_SOCKET", ""))
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode("utf-8"))
    except OSError as exc:
        log.debug("sd_notify to %r failed: %s", env.get("NOTIFY_SOCKET"), exc)
        return False
    return True


def ready(env: Mapping[str, str] = os.environ) -> bool:
    """Tell systemd that start-up is complete (``READY=1``)."""
    return notify("READY=1", env)


def stopping(env: Mapping[str, str] = os.environ) -> bool:
    """Tell systemd that a graceful stop has begun (``STOPPING=1``)."""
    return notify("STOPPING=1", env)


def reloading(monotonic_usec: int, env: Mapping[str, str] = os.environ) -> bool:
    """Tell systemd that a configuration reload has begun.

    ``monotonic_usec`` is ``CLOCK_MONOTONIC`` in microseconds, read by the
    caller (``time.monotonic_ns() // 1000``); systemd >= 253 wants it with
    ``RELOADING=1``.  Send :func:`ready` when the reload is done.
    """
    return notify(f"RELOADING=1\nMONOTONIC_USEC={monotonic_usec}", env)


def watchdog(env: Mapping[str, str] = os.environ) -> bool:
    """Keep the watchdog (``WatchdogSec=``) from killing the service."""
    return notify("WATCHDOG=1", env)


def status(text: str, env: Mapping[str, str] = os.environ, *, watchdog: bool = False) -> bool:
    """Set the one-line status shown by ``systemctl status``; with
    ``watchdog=True`` also :func:`watchdog`, in the same datagram.

    Line breaks become spaces: a newline would start another assignment
    (``STATUS=x\\nREADY=1``) and so let the text say something it should not.
    """
    message = "STATUS=" + " ".join(text.splitlines())
    return notify(message + "\nWATCHDOG=1" if watchdog else message, env)


def watchdog_interval(env: Mapping[str, str] = os.environ, pid: int | None = None) -> float | None:
    """Return the watchdog timeout in seconds, or None if there is none.

    Read from ``WATCHDOG_USEC``; when ``WATCHDOG_PID`` is set it must be
    ``pid`` (default: this process), else the watchdog is meant for another
    process.  Send :func:`watchdog` at about half this interval.
    """
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    owner = env.get("WATCHDOG_PID")
    if owner:
        try:
            if int(owner) != (os.getpid() if pid is None else pid):
                return None
        except ValueError:
            return None
    return usec / 1_000_000


def _socket_address(value: str) -> str | None:
    """Turn ``$NOTIFY_SOCKET`` into an ``AF_UNIX`` address, None if unusable."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        # Abstract namespace: the kernel's name starts with a NUL byte.
        return "\0" + value[1:]
    return None

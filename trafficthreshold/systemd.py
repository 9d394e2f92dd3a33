"""The shipped systemd units, with the paths of this installation written in.

``systemd/trafficthreshold.service`` (the daemon) and
``systemd/trafficthreshold-subscribe@.service`` (the bus subscriber's
template, docs/subscribe.rst) are shipped as package data
(``trafficthreshold/data/``, copies; a test keeps them identical).  They name ``/usr/local/bin/trafficthreshold`` (where pip puts
the program system-wide) and ``/etc/trafficthreshold/config.toml``;
:func:`render_unit` replaces both with the paths at hand, so a virtualenv
install gets a unit that runs *its* program.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

from trafficthreshold.config import DEFAULT_PATH

UNIT_NAME = "trafficthreshold.service"
#: The template unit of ``trafficthreshold subscribe`` (one instance per bus).
SUBSCRIBER_UNIT_NAME = "trafficthreshold-subscribe@.service"
#: Every unit shipped as package data.
UNITS = (UNIT_NAME, SUBSCRIBER_UNIT_NAME)
#: The program path written in the shipped unit.
SHIPPED_BIN = "/usr/local/bin/trafficthreshold"
#: The configuration path written in the shipped unit.
SHIPPED_CONFIG = DEFAULT_PATH
#: The directories ``PrivateTmp=yes`` replaces with private ones.
TMP_DIRS = ("/tmp/", "/var/tmp/")


def shipped_unit(unit: str = UNIT_NAME) -> str:
    """Return the text of a shipped unit file (one of :data:`UNITS`)."""
    if unit not in UNITS:
        raise ValueError(f"no shipped unit {unit!r}: one of {', '.join(UNITS)}")
    return (Path(__file__).parent / "data" / unit).read_text(encoding="utf-8")


def installed_bin() -> str:
    """The absolute path of this installation's ``trafficthreshold`` program.

    ``shutil.which`` on ``$PATH``, else the running script (``sys.argv[0]``).
    """
    found = shutil.which("trafficthreshold")
    return os.path.abspath(found or sys.argv[0])


def render_unit(bin_path: str | None = None, config_path: str | None = None,
                unit: str = UNIT_NAME) -> str:
    """Return the shipped unit ``unit`` (the daemon's by default, or
    :data:`SUBSCRIBER_UNIT_NAME`) with ``bin_path`` and ``config_path``
    written in.

    Defaults: :func:`installed_bin` and the shipped ``/etc`` path.  If either
    is in a home directory, ``ProtectHome=yes`` becomes ``read-only``.  If
    either is under ``/tmp`` or ``/var/tmp``, ``PrivateTmp=yes`` (which gives
    the service an empty /tmp of its own, so ``ExecStart=/tmp/...`` would not
    exist) becomes ``PrivateTmp=no`` with a comment saying why; see
    :func:`warnings` for what the CLI tells the user then.  Both must
    be absolute; they are escaped for unit files (``%`` specifiers, ``$``
    expansion, quoting of spaces).  Raises ValueError for a path systemd
    cannot take (relative, or with a control character).
    """
    bin_path = _checked(bin_path or installed_bin())
    config_path = _checked(config_path or SHIPPED_CONFIG)
    lines = []
    for line in shipped_unit(unit).splitlines(keepends=True):
        if line.startswith(("ExecStart=", "ExecStartPre=")):
            line = line.replace(SHIPPED_BIN, _exec_word(bin_path))
        elif line.startswith("Environment="):
            line = _environment_line(line, config_path)
        elif line.startswith("ProtectHome=") and _under_home(bin_path, config_path):
            # ProtectHome=yes would hide a virtualenv or config in a home.
            line = "ProtectHome=read-only\n"
        elif line.startswith("PrivateTmp=") and _under_tmp(bin_path, config_path):
            line = ("# PrivateTmp=no: this installation is under /tmp or /var/tmp, which\n"
                    "# PrivateTmp=yes would replace with an empty directory of the unit's own.\n"
                    "PrivateTmp=no\n")
        lines.append(line)
    return "".join(lines)


def _under_tmp(*paths: str) -> bool:
    """True if a path is in the directories ``PrivateTmp=yes`` replaces."""
    return any(os.path.normpath(path).startswith(TMP_DIRS) for path in paths)


def warnings(bin_path: str | None = None, config_path: str | None = None) -> list[str]:
    """What is wrong with running the service from these paths, for the
    user (the unit itself is adapted by :func:`render_unit`)."""
    bin_path = bin_path or installed_bin()
    config_path = config_path or SHIPPED_CONFIG
    found = [p for p in (bin_path, config_path) if _under_tmp(p)]
    if not found:
        return []
    return [f"{', '.join(found)} is under /tmp or /var/tmp: the unit is written with "
            "PrivateTmp=no (PrivateTmp=yes would hide it), and /tmp is emptied at boot, "
            "so the service will not start after a reboot; install into a lasting "
            "place (e.g. python3 -m venv /opt/trafficthreshold) for production"]


def _under_home(*paths: str) -> bool:
    """True if a path is in the directories ``ProtectHome=yes`` hides."""
    return any(path.startswith(("/home/", "/root/", "/run/user/")) for path in paths)


def _checked(path: str) -> str:
    if not os.path.isabs(path) or re.search(r"[\x00-\x1f\x7f]", path):
        raise ValueError(
            f"{path!r} cannot go into a unit file; use an absolute path without control characters"
        )
    return path


def _quoted(word: str) -> str:
    """``word`` in double quotes, C-escaped, if systemd would split or
    unescape it (whitespace, quotes, backslashes); else as it is."""
    if re.search(r'[\s"\'\\]', word):
        return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return word


def _exec_word(path: str) -> str:
    """Escape ``path`` as the program of an ``Exec*=`` line."""
    return _quoted(path.replace("%", "%%").replace("$", "$$"))


def _environment_line(line: str, config_path: str) -> str:
    """Rewrite ``Environment=TRAFFICTHRESHOLD_CONFIG=...`` for ``config_path``."""
    if "TRAFFICTHRESHOLD_CONFIG=" not in line:
        return line
    # Quoted whole, as systemd reads it (the name part needs no quoting).
    assignment = _quoted("TRAFFICTHRESHOLD_CONFIG=" + config_path.replace("%", "%%"))
    return f"Environment={assignment}\n"

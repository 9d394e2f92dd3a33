"""A real local Postfix for the tests (``sh .ci/postfix.sh`` sets it up):
whether it runs, and the test Maildir of the local user ``ttmail``."""
from __future__ import annotations

import email
import email.policy
import os
import subprocess
import time
from email.message import EmailMessage
from pathlib import Path

import pytest

MAILDIR = Path(os.environ.get("TT_TEST_MAILDIR", "/home/ttmail/Maildir"))
MAILBOX = os.environ.get("TT_TEST_MAILBOX", "ttmail@localhost")
SENDMAIL = "/usr/sbin/sendmail"
MASTER_PID = Path("/var/spool/postfix/pid/master.pid")


def postfix_problem() -> str | None:
    """Why the local Postfix cannot be used, or None if it can."""
    if not os.access(SENDMAIL, os.X_OK):
        return f"no {SENDMAIL}"
    try:
        pid = int(MASTER_PID.read_text().split()[0])
        os.kill(pid, 0)
    except (OSError, ValueError, IndexError):
        return f"the Postfix master is not running ({MASTER_PID})"
    if not os.access(MAILDIR / "new", os.R_OK | os.X_OK):
        return f"cannot read the test mailbox {MAILDIR}/new"
    return None


_PROBLEM = postfix_problem()
requires_postfix = [
    pytest.mark.postfix,
    pytest.mark.skipif(_PROBLEM is not None,
                       reason=f"no working local Postfix: {_PROBLEM}; run `sh .ci/postfix.sh` "
                              f"as root"),
]


def postfix_queue_empty() -> bool:
    """Nothing left in Postfix's maildrop or queue (so every mail has arrived)."""
    if any(Path("/var/spool/postfix/maildrop").iterdir()):
        return False
    out = subprocess.run(["postqueue", "-p"], capture_output=True, text=True, timeout=10)
    return "Mail queue is empty" in out.stdout


def mailbox(token: str) -> list[tuple[Path, EmailMessage]]:
    """Messages in the test Maildir whose Subject contains ``token``."""
    found = []
    for folder in ("new", "cur"):
        for path in sorted((MAILDIR / folder).glob("*")):
            try:
                msg = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
            except FileNotFoundError:
                continue
            if token in str(msg["Subject"] or ""):
                found.append((path, msg))
    return sorted(found, key=lambda pm: pm[1]["Date"].datetime)


def wait_for_mail(token: str, expected: int, deadline: float = 20.0) -> list[EmailMessage]:
    """Poll until ``expected`` mails arrived and Postfix holds no more."""
    end = time.monotonic() + deadline
    while True:
        found = mailbox(token)
        if (len(found) >= expected and postfix_queue_empty()) or time.monotonic() > end:
            for path, _ in found:  # leave the box clean for the next test
                path.unlink(missing_ok=True)
            return [msg for _, msg in found]
        time.sleep(0.1)

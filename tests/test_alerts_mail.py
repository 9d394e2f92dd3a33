"""Tests of trafficthreshold.mailer against real peers.

* Fake ``sendmail`` programs written to tmp_path (real executables) for the
  failure cases: missing, exit 75, exit 1, hanging past the timeout.
* A real aiosmtpd server on a free loopback port, with STARTTLS (a
  self-signed certificate made with ``cryptography``) and login.
* A real local Postfix (``sh .ci/postfix.sh``) for end-to-end delivery into
  the Maildir of the local user ``ttmail``.  Those tests carry the
  ``postfix`` marker and are skipped, with the reason, when no Postfix runs.

Alert time is driven by passing ``now``; only the mailbox polling and the
worker-thread test wait for real time, each with a deadline.
"""

from __future__ import annotations

import datetime
import email
import email.policy
import ipaddress
import logging
import socket
import sqlite3
import ssl
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import pytest

from trafficthreshold.alerts import mail as mailer
from trafficthreshold.alerts import Mail, MailContext, Notice
from trafficthreshold.alerts.engine import AlertEngine
from trafficthreshold.alerts.store import AlertStore
from trafficthreshold.errors import MailError, TrafficThresholdError
from trafficthreshold.alerts.mail import (
    DeliveryError,
    Outbox,
    Prepared,
    Renderer,
    SMTPTransport,
    build_message,
    send_test,
)

T0 = 1_700_000_040.0  # the start of an epoch minute
KEY = ("all", "pageview", "minute")


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


from tt_alerts import make_rule  # noqa: E402


def make_mail_config(**overrides: Any) -> SimpleNamespace:
    values: dict[str, Any] = dict(
        transport="sendmail", sendmail="/usr/sbin/sendmail", smtp_host="localhost",
        smtp_port=25, starttls=False, username="", password_file="", password_env="",
        timeout=5.0, sender="tt@localhost", max_per_hour=20, templates="",
        dashboard_url="http://dash.example/",
    )
    values.update(overrides)
    return SimpleNamespace(**values)


class Capture:
    """A transport that keeps what it is given."""

    name = "capture"

    def __init__(self) -> None:
        self.sent: list[Prepared] = []

    def send(self, prepared: Prepared) -> None:
        self.sent.append(prepared)


def fake_sendmail(tmp_path: Path, body: str, name: str = "sendmail") -> str:
    """Write an executable /bin/sh script standing in for sendmail."""
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


def queue_alert(db: str, config: Any, rule: Any = None, now: float = T0, **tick: Any) -> int:
    """Fire ``rule`` once through a fresh engine; return the queued mail's id."""
    rule = rule or make_rule()
    with AlertStore(db) as store:
        engine = AlertEngine(store, [rule], config, host="testhost")
        (mail_id,) = engine.tick(now, {(rule.account, rule.event, rule.window): 12}, **tick)
    return mail_id


def header_block(raw: bytes) -> str:
    return raw.split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0].decode()


@pytest.fixture
def db(tmp_path: Path) -> str:
    return str(tmp_path / "stats.sqlite3")


def test_mail_error_is_a_trafficthreshold_error() -> None:
    assert issubclass(MailError, TrafficThresholdError)
    assert issubclass(DeliveryError, MailError)


# --------------------------------------------------------------------------
# Building messages
# --------------------------------------------------------------------------


def test_message_headers_and_template_variables(db: str) -> None:
    config = make_mail_config()
    queue_alert(db, config, top_accounts=[("shop.example", 42), ("blog", 7)], throttle_level=3)
    capture = Capture()
    outbox = Outbox(db, config, transport=capture)
    (result,) = outbox.deliver_due(T0)
    assert result.ok
    (prepared,) = capture.sent
    msg = prepared.message
    assert prepared.envelope_from == "tt@localhost"
    assert prepared.envelope_to == ("ops@example.com",)
    assert msg["From"] == "tt@localhost" and msg["To"] == "ops@example.com"
    assert msg["Date"].datetime.timestamp() == T0  # the time of the alert
    assert msg["Message-ID"].startswith("<") and msg["Message-ID"].endswith("@testhost>")
    assert msg["Subject"] == ("[trafficthreshold] burst: 12 pageview/min for all "
                              "(threshold 10) on testhost")
    assert msg["Auto-Submitted"] == "auto-generated"
    body = msg.get_content()
    minute = "Tue, 14 Nov 2023 22:14:00 GMT"
    assert minute == email.utils.format_datetime(
        datetime.datetime.fromtimestamp(T0, datetime.timezone.utc), usegmt=True)
    for text in ["ALERT burst: 12 pageview per minute", "threshold of 10", minute,
                 "42  shop.example", "7  blog", "Throttle level: 3", "Host:           testhost",
                 "http://dash.example/"]:
        assert text in body
    assert msg.as_bytes().count(b"\r\n") > 5  # policy SMTP: CRLF on the wire
    outbox.close()


@pytest.mark.parametrize("top, expected", [
    ([("shop", 40)], "Busiest accounts this minute:\n        40  shop\n"),
    ([], "Busiest accounts: none to list, only the total is counted (no per-account keys).\n"),
    (None, "Busiest accounts: not read for this mail.\n"),
])
def test_busiest_accounts_says_why_there_are_none(db: str, top: Any, expected: str) -> None:
    config = make_mail_config()
    queue_alert(db, config, top_accounts=top)
    capture = Capture()
    outbox = Outbox(db, config, transport=capture)
    (result,) = outbox.deliver_due(T0)
    assert result.ok
    body = capture.sent[0].message.get_content()
    assert expected in body and "(not known)" not in body
    outbox.close()


def test_retry_resends_the_same_message_id(db: str) -> None:
    config = make_mail_config()
    queue_alert(db, config)
    capture = Capture()
    outbox = Outbox(db, config, transport=capture)
    with AlertStore(db) as store:
        item = store.next_due(T0)
        store.mark_failed(item.id, T0, "try later", retry_at=T0)
    outbox.deliver_due(T0)
    assert capture.sent[0].message["Message-ID"] == item.message_id
    outbox.close()


def test_nothing_can_inject_a_header(db: str, tmp_path: Path) -> None:
    evil = "x\r\nBcc: evil@x"
    templates = tmp_path / "templates"
    templates.mkdir()
    (templates / "alert_subject.txt").write_text("{{ rule.account }}\nBcc: evil@x\r\n{{ host }}")
    config = make_mail_config(templates=str(templates))
    rule = make_rule(account=evil, name="n\r\nBcc: evil@x")
    with AlertStore(db) as store:
        AlertEngine(store, [rule], config, host="h\r\nBcc: evil@x").tick(
            T0, {(evil, "pageview", "minute"): 12}, top_accounts=[(evil, 5)])
    capture = Capture()
    outbox = Outbox(db, config, transport=capture)
    assert outbox.deliver_due(T0)[0].ok
    raw = capture.sent[0].message.as_bytes()
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert parsed["Bcc"] is None
    assert "Bcc" not in [line.split(":")[0] for line in header_block(raw).splitlines()]
    assert set(parsed.keys()) == {"Date", "Message-ID", "From", "To", "Subject",
                                  "Auto-Submitted", "Content-Type",
                                  "Content-Transfer-Encoding", "MIME-Version"}
    # Nor a body line of its own: values lose their control characters.
    assert "\nBcc: evil@x" not in parsed.get_content()
    assert "x  Bcc: evil@x" in parsed.get_content()
    outbox.close()


@pytest.mark.parametrize("address", ["ops@example.com\r\nBcc: evil@x", "", "-oQ/tmp/x@y"])
def test_bad_addresses_are_refused(address: str) -> None:
    notice = _notice()
    for mail in [Mail(address, ("a@b.c",), (notice,), 0, T0),
                 Mail("a@b.c", (address,), (notice,), 0, T0)]:
        with pytest.raises(MailError):
            build_message(mail, MailContext(), message_id="<x@y>", renderer=Renderer())


def _notice(kind: str = "alert", **overrides: Any) -> Notice:
    values: dict[str, Any] = dict(
        kind=kind, rule="burst", account="all", event="pageview", window="minute",
        threshold=10, count=12, minute=int(T0 // 60), at=T0, started=T0, ended=None, peak=12,
        peak_minute=int(T0 // 60), reminders=0, to=("a@b.c",), sender="",
    )
    values.update(overrides)
    return Notice(**values)


def test_user_templates_override_and_the_rest_fall_back(tmp_path: Path) -> None:
    (tmp_path / "alert_subject.txt").write_text("CUSTOM {{ rule.name }} {{ count }}")
    renderer = Renderer(str(tmp_path))
    mail = Mail("a@b.c", ("d@e.f",), (_notice(),), 0, T0)
    prepared = build_message(mail, MailContext(), message_id="<x@y>", renderer=renderer)
    assert prepared.message["Subject"] == "CUSTOM burst 12"
    assert "ALERT burst" in prepared.message.get_content()  # shipped body


def test_a_broken_template_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "alert_subject.txt").write_text("{{ no_such_variable }}")
    mail = Mail("a@b.c", ("d@e.f",), (_notice(),), 0, T0)
    with pytest.raises(MailError, match="no_such_variable.*fix the template"):
        build_message(mail, MailContext(), message_id="<x@y>", renderer=Renderer(str(tmp_path)))


def test_grouped_resolved_and_suppressed_mails_render() -> None:
    renderer = Renderer()
    grouped = Mail("a@b.c", ("d@e.f",), (_notice(), _notice(rule="other", kind="reminder",
                                                            reminders=2)), 3, T0)
    msg = build_message(grouped, MailContext(max_per_hour=20), message_id="<x@y>",
                        renderer=renderer).message
    assert msg["Subject"] == "[trafficthreshold] 2 alerts on localhost: burst, other"
    body = msg.get_content()
    assert "ALERT burst" in body and "STILL FIRING other" in body and "reminder 2" in body
    assert "3 further alert(s) were suppressed: at most 20 mails an hour" in body

    resolved = Mail("a@b.c", ("d@e.f",), (_notice("resolved", ended=T0 + 600, peak=99),), 0,
                    T0 + 900)
    msg = build_message(resolved, MailContext(), message_id="<x@y>", renderer=renderer).message
    assert msg["Subject"].startswith("[trafficthreshold] resolved burst:")
    assert "(peak 99)" in msg["Subject"]
    assert "duration:  10 min" in msg.get_content()

    summary = Mail("a@b.c", ("d@e.f",), (), 7, T0)
    msg = build_message(summary, MailContext(), message_id="<x@y>", renderer=renderer).message
    assert msg["Subject"] == "[trafficthreshold] 7 alert(s) suppressed on localhost"


# --------------------------------------------------------------------------
# sendmail: fake programs for the failure cases
# --------------------------------------------------------------------------


def test_sendmail_command_line_and_stdin(db: str, tmp_path: Path) -> None:
    path = fake_sendmail(tmp_path, f"""
for a in "$@"; do printf '%s\\n' "$a"; done > {tmp_path}/args
cat > {tmp_path}/stdin
""")
    config = make_mail_config(sendmail=path)
    queue_alert(db, config, make_rule(to=("b@example.com", "a@example.com")))
    outbox = Outbox(db, config)
    assert outbox.deliver_due(T0)[0].ok
    args = (tmp_path / "args").read_text().splitlines()
    assert args == ["-oi", "-f", "tt@localhost", "--", "a@example.com", "b@example.com"]
    assert "-t" not in args
    data = (tmp_path / "stdin").read_bytes()
    assert b"\r\n" not in data  # LF line ends for the local program
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert msg["To"] == "a@example.com, b@example.com" and "burst" in msg["Subject"]
    outbox.close()


def test_missing_sendmail_is_reported_and_retried_a_bounded_number_of_times(
        db: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    missing = str(tmp_path / "no" / "sendmail")
    config = make_mail_config(sendmail=missing)
    mail_id = queue_alert(db, config)
    outbox = Outbox(db, config, max_attempts=2)
    (first,) = outbox.deliver_due(T0)
    hint = f'no {missing}: install an MTA such as postfix, or set mail.transport = "smtp"'
    assert not first.ok and not first.temporary and first.error == hint
    assert hint in caplog.text
    (second,) = outbox.deliver_due(first.retry_at)
    assert second.retry_at is None  # given up, and said so
    with AlertStore(db) as store:
        item = store.get(mail_id)
    assert item.status == "failed" and item.attempts == 2 and item.last_error == hint
    assert "gave up after 2 attempts" in caplog.text
    outbox.close()


def test_exit_75_is_temporary_and_retried_with_backoff(db: str, tmp_path: Path) -> None:
    path = fake_sendmail(tmp_path, "cat >/dev/null\necho 'queue full' >&2\nexit 75\n")
    config = make_mail_config(sendmail=path)
    mail_id = queue_alert(db, config)
    outbox = Outbox(db, config, backoff=30, backoff_max=3600)
    (first,) = outbox.deliver_due(T0)
    assert first.temporary and first.retry_at == T0 + 30
    assert "exited with status 75: queue full" in first.error
    assert outbox.deliver_due(T0 + 29) == []  # not due yet
    (second,) = outbox.deliver_due(T0 + 30)
    assert second.retry_at == T0 + 30 + 60  # doubled
    fake_sendmail(tmp_path, "cat >/dev/null\nexit 0\n")  # the MTA recovers
    (third,) = outbox.deliver_due(T0 + 90)
    assert third.ok
    with AlertStore(db) as store:
        item = store.get(mail_id)
    assert item.status == "sent" and item.attempts == 3 and item.sent_at == T0 + 90
    outbox.close()


def test_exit_1_logs_the_mta_message_and_gives_up_after_max_attempts(
        db: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = fake_sendmail(tmp_path, "cat >/dev/null\necho 'ops@example.com: user unknown' >&2\n"
                                   "exit 1\n")
    config = make_mail_config(sendmail=path)
    mail_id = queue_alert(db, config)
    outbox = Outbox(db, config, max_attempts=5)
    now, results = T0, []
    for _ in range(5):
        (result,) = outbox.deliver_due(now)
        results.append(result)
        now = result.retry_at or now
    assert [r.retry_at is None for r in results] == [False] * 4 + [True]
    assert outbox.deliver_due(now + 10**6) == []
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 5
    assert all("exited with status 1: ops@example.com: user unknown" in r.getMessage()
               for r in errors)
    assert "gave up after 5 attempts" in errors[-1].getMessage()
    with AlertStore(db) as store:
        assert store.get(mail_id).status == "failed"
    outbox.close()


def test_hanging_sendmail_is_killed_and_retried(db: str, tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    path = fake_sendmail(tmp_path, f"sleep 30 &\necho $! > {pidfile}\nwait\n")
    config = make_mail_config(sendmail=path, timeout=0.5)
    queue_alert(db, config)
    outbox = Outbox(db, config)
    started = time.monotonic()
    (result,) = outbox.deliver_due(T0)
    assert time.monotonic() - started < 3
    assert result.temporary and result.retry_at == T0 + 30
    assert "did not finish within 0.5 s" in result.error
    # The whole process group was killed, the grandchild too.
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _alive(child):
        time.sleep(0.05)
    assert not _alive(child)
    outbox.close()


def _alive(pid: int) -> bool:
    """True if ``pid`` runs (a zombie waiting for its reaper does not count)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


def test_the_tick_never_waits_for_the_mta(db: str, tmp_path: Path) -> None:
    done = tmp_path / "delivered"
    path = fake_sendmail(tmp_path, f"sleep 1\ncat > {done}.tmp\nmv {done}.tmp {done}\n")
    config = make_mail_config(sendmail=path)
    outbox = Outbox(db, config, poll=0.2)
    outbox.start()
    try:
        with AlertStore(db) as store:
            engine = AlertEngine(store, [make_rule()], config, host="h", on_queued=outbox.wake)
            started = time.monotonic()
            now = time.time()
            assert engine.tick(now, {KEY: 12})
            assert engine.tick(now + 1, {KEY: 13}) == []
            assert time.monotonic() - started < 0.5  # sendmail takes 1 s
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not done.exists():
                time.sleep(0.05)
            assert done.exists()
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and store.list()[0].status != "sent":
                time.sleep(0.05)
            assert store.list()[0].status == "sent"
    finally:
        assert outbox.stop(timeout=10)


# --------------------------------------------------------------------------
# At most once per Message-ID; stopping within a budget
# --------------------------------------------------------------------------

#: Holds the write lock of the database argv[1] for argv[2] seconds.
LOCKER = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
conn.execute("ROLLBACK")
"""


def hold_write_lock(db: str, seconds: float) -> subprocess.Popen[str]:
    """A real competing writer (another process) holding the write lock."""
    proc = subprocess.Popen([sys.executable, "-c", LOCKER, db, str(seconds)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "locked\n"
    return proc


def counting_sendmail(tmp_path: Path, log_file: Path, delay: float = 0) -> str:
    """A fake sendmail that takes ``delay`` s and appends each Message-ID to ``log_file``."""
    return fake_sendmail(tmp_path, f"sleep {delay}\ngrep -i '^message-id:' >> {log_file}\n")


def test_a_row_left_sending_by_a_dead_process_is_never_sent_again(
        db: str, tmp_path: Path) -> None:
    sent = tmp_path / "sent.log"
    config = make_mail_config(sendmail=counting_sendmail(tmp_path, sent))
    mail_id = queue_alert(db, config)
    with AlertStore(db) as store:  # the dead process claimed it, then died
        assert store.claim(mail_id, T0)
        assert not store.claim(mail_id, T0)  # claimed once only
        assert store.next_due(T0 + 3600) is None
    outbox = Outbox(db, config)  # the restarted daemon
    assert outbox.deliver_due(T0 + 60) == []
    assert outbox.deliver_due(T0 + 7200) == []
    outbox.close()
    assert not sent.exists()
    with AlertStore(db) as store:
        row = store.get(mail_id)
        assert row.status == "failed" and row.claimed_at == T0
        assert "may or may not have been delivered" in row.last_error
        assert row.message_id in row.last_error
        assert store.prune(T0 + 1) == 1  # a resolved row is pruned like any other


def test_a_locked_database_when_claiming_sends_nothing(db: str, tmp_path: Path) -> None:
    sent = tmp_path / "sent.log"
    config = make_mail_config(sendmail=counting_sendmail(tmp_path, sent))
    mail_id = queue_alert(db, config)
    outbox = Outbox(db, config, busy_timeout=0.1)
    assert outbox.deliver_due(T0 - 1) == []  # opens its connection; nothing due yet
    locker = hold_write_lock(db, 0.6)
    try:
        assert outbox.deliver_due(T0) == []  # cannot claim: not sent
        assert not sent.exists()
    finally:
        locker.wait(5)
    (result,) = outbox.deliver_due(T0)
    assert result.ok and result.id == mail_id
    assert len(sent.read_text().splitlines()) == 1
    outbox.close()


def test_flush_stops_between_mails_within_its_budget(db: str, tmp_path: Path) -> None:
    sent = tmp_path / "sent.log"
    config = make_mail_config(sendmail=counting_sendmail(tmp_path, sent, delay=0.7))
    with AlertStore(db) as store:
        engine = AlertEngine(store, [make_rule(name=f"r{i}", to=(f"o{i}@example.com",))
                                     for i in range(6)], config, host="h")
        assert len(engine.tick(T0, {KEY: 12})) == 6  # six mails, 0.7 s each
    outbox = Outbox(db, config, poll=0.1)
    started = time.monotonic()
    results = outbox.flush(T0, budget=1.5)
    elapsed = time.monotonic() - started
    assert elapsed < 1.5 + 0.3, elapsed  # not 6 * 0.7 s
    assert 1 <= len(results) <= 2 and all(r.ok for r in results)
    with AlertStore(db) as store:  # the rest waits for the next start, none lost
        statuses = [m.status for m in store.list()]
    assert statuses.count("sent") == len(results) and statuses.count("pending") == 6 - len(results)
    outbox.close()


def test_flush_does_not_wait_past_its_budget_for_a_busy_worker(db: str, tmp_path: Path) -> None:
    sent = tmp_path / "sent.log"
    config = make_mail_config(sendmail=counting_sendmail(tmp_path, sent, delay=3), timeout=10)
    queue_alert(db, config, now=time.time())
    outbox = Outbox(db, config, poll=0.1)
    outbox.start()
    deadline = time.monotonic() + 5
    with AlertStore(db) as store:  # wait until the worker has claimed it
        while time.monotonic() < deadline and store.list()[0].status != "sending":
            time.sleep(0.02)
        assert store.list()[0].status == "sending"
    started = time.monotonic()
    assert outbox.flush(time.time(), budget=1.0) == []
    assert time.monotonic() - started < 1.5  # not the 3 s of the slow sendmail
    assert outbox.stop(timeout=10)  # the worker ends after that mail
    assert len(sent.read_text().splitlines()) == 1
    outbox.close()


def test_the_worker_stops_after_its_current_mail(db: str, tmp_path: Path) -> None:
    sent = tmp_path / "sent.log"
    config = make_mail_config(sendmail=counting_sendmail(tmp_path, sent, delay=0.5))
    with AlertStore(db) as store:
        engine = AlertEngine(store, [make_rule(name=f"r{i}", to=(f"o{i}@example.com",))
                                     for i in range(6)], config, host="h")
        engine.tick(time.time(), {KEY: 12})
    outbox = Outbox(db, config, poll=0.1)
    outbox.start()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not sent.exists():
        time.sleep(0.02)
    started = time.monotonic()
    assert outbox.stop(timeout=5)
    assert time.monotonic() - started < 1.2  # its current mail, not the 4+ others
    with AlertStore(db) as store:
        assert [m.status for m in store.list()].count("pending") >= 3
    outbox.close()


# --------------------------------------------------------------------------
# send_test (the test-mail command)
# --------------------------------------------------------------------------


def test_send_test_without_sendmail_says_what_to_do() -> None:
    result = send_test(make_mail_config(sendmail="/usr/sbin/sendmail-missing"), make_rule())
    assert not result.ok
    assert ('no /usr/sbin/sendmail-missing: install an MTA such as postfix, or set '
            'mail.transport = "smtp"') in result.message


def test_send_test_through_a_fake_sendmail(tmp_path: Path) -> None:
    path = fake_sendmail(tmp_path, f"cat > {tmp_path}/stdin\n")
    result = send_test(make_mail_config(sendmail=path), None, to=["me@example.com"], now=T0)
    assert result.ok and path in result.message and "me@example.com" in result.message
    msg = email.message_from_bytes((tmp_path / "stdin").read_bytes(),
                                   policy=email.policy.default)
    assert msg["Subject"].startswith("[test] [trafficthreshold]")
    assert "This is a TEST mail" in msg.get_content()


def test_send_test_needs_a_recipient() -> None:
    result = send_test(make_mail_config(), None)
    assert not result.ok and "--to" in result.message


def test_unknown_transport_is_a_clear_error() -> None:
    with pytest.raises(MailError, match='use "sendmail" or "smtp"'):
        mailer.transport_from_config(make_mail_config(transport="carrier-pigeon"))


# --------------------------------------------------------------------------
# SMTP: a real aiosmtpd server with STARTTLS and login
# --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 / localhost: (cert, key) paths."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    folder = tmp_path_factory.mktemp("tls")
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


class SMTPServer(SimpleNamespace):
    port: int
    received: list[dict[str, Any]]
    client_context: ssl.SSLContext


@pytest.fixture
def smtp_server(certificate: tuple[str, str]) -> Iterator[SMTPServer]:
    """aiosmtpd on a free loopback port: STARTTLS required, login alice/s3cret."""
    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import AuthResult, LoginPassword

    cert, key = certificate
    received: list[dict[str, Any]] = []

    class Handler:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            received.append(dict(sender=envelope.mail_from, rcpts=list(envelope.rcpt_tos),
                                 data=envelope.content, tls=session.ssl is not None,
                                 user=session.auth_data))
            return "250 OK"

    def authenticator(server: Any, session: Any, envelope: Any, mechanism: str,
                      auth_data: Any) -> AuthResult:
        ok = (isinstance(auth_data, LoginPassword) and auth_data.login == b"alice"
              and auth_data.password == b"s3cret")
        return AuthResult(success=ok, handled=False, auth_data=auth_data.login if ok else None)

    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    port = free_port()
    controller = Controller(Handler(), hostname="127.0.0.1", port=port,
                            tls_context=server_context, require_starttls=True,
                            authenticator=authenticator, auth_require_tls=True)
    controller.start()
    try:
        yield SMTPServer(port=port, received=received,
                         client_context=ssl.create_default_context(cafile=cert))
    finally:
        controller.stop()


def smtp_config(port: int, **overrides: Any) -> SimpleNamespace:
    return make_mail_config(transport="smtp", smtp_host="127.0.0.1", smtp_port=port,
                            **overrides)


def test_smtp_with_starttls_and_login_from_a_password_file(
        db: str, tmp_path: Path, smtp_server: SMTPServer) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    config = smtp_config(smtp_server.port, starttls=True, username="alice",
                         password_file=str(secret))
    transport = mailer.transport_from_config(config, smtp_server.client_context)
    queue_alert(db, config)
    outbox = Outbox(db, config, transport=transport)
    (result,) = outbox.deliver_due(T0)
    assert result.ok, result.error
    (got,) = smtp_server.received
    assert got["tls"] and got["user"] == b"alice"
    assert got["sender"] == "tt@localhost" and got["rcpts"] == ["ops@example.com"]
    msg = email.message_from_bytes(got["data"], policy=email.policy.default)
    assert "burst: 12 pageview/min" in msg["Subject"]
    outbox.close()


def test_smtp_password_from_the_environment(
        smtp_server: SMTPServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TT_TEST_SMTP_PASSWORD", "s3cret")
    config = smtp_config(smtp_server.port, starttls=True, username="alice",
                         password_env="TT_TEST_SMTP_PASSWORD")
    transport = mailer.transport_from_config(config, smtp_server.client_context)
    result = send_test(config, make_rule(), transport=transport, now=T0)
    assert result.ok, result.message
    assert len(smtp_server.received) == 1


def test_smtp_wrong_password_is_not_temporary(smtp_server: SMTPServer,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TT_TEST_SMTP_PASSWORD", "wrong")
    transport = SMTPTransport("127.0.0.1", smtp_server.port, starttls=True, username="alice",
                              password_env="TT_TEST_SMTP_PASSWORD",
                              ssl_context=smtp_server.client_context, timeout=5)
    prepared = build_message(Mail("a@b.c", ("d@e.f",), (_notice(),), 0, T0), MailContext(),
                             message_id="<x@y>", renderer=Renderer())
    with pytest.raises(DeliveryError, match="535") as info:
        transport.send(prepared)
    assert not info.value.temporary
    with pytest.raises(DeliveryError, match="TT_NOT_SET.*is not set"):
        SMTPTransport("127.0.0.1", smtp_server.port, starttls=True, username="alice",
                      password_env="TT_NOT_SET", ssl_context=smtp_server.client_context,
                      ).send(prepared)
    assert smtp_server.received == []


def test_smtp_connection_refused_is_retried_and_the_engine_keeps_evaluating(
        db: str, caplog: pytest.LogCaptureFixture) -> None:
    config = smtp_config(free_port(), timeout=2)  # nothing listens there
    outbox = Outbox(db, config)
    rules = [make_rule(name="a", account="a"), make_rule(name="b", account="b")]
    with AlertStore(db) as store:
        engine = AlertEngine(store, rules, config, host="h", on_queued=outbox.wake)
        assert engine.tick(T0, {("a", "pageview", "minute"): 12})
        (first,) = outbox.deliver_due(T0)
        assert first.temporary and "Connection refused" in first.error
        assert "check that the server runs" in first.error
        # The engine goes on: rule b fires a second later and is queued too.
        assert engine.tick(T0 + 1, {("a", "pageview", "minute"): 12,
                                    ("b", "pageview", "minute"): 15})
        assert outbox.deliver_due(T0 + 1)[0].temporary  # b's mail, first try
        results = outbox.deliver_due(T0 + 40)  # both due again
        assert [r.temporary for r in results] == [True, True]
        items = store.list()
        assert [i.status for i in items] == ["pending", "pending"]
        assert sorted(i.attempts for i in items) == [2, 2]
    assert "temporary failure" in caplog.text and "retrying in" in caplog.text
    outbox.close()


@pytest.mark.parametrize("goodbye", [b"421 4.4.2 closing: timeout\r\n", b""])
def test_smtp_a_failing_quit_after_the_data_was_taken_is_no_resend(
        db: str, goodbye: bytes) -> None:
    """The server takes the mail (250 after DATA), then answers QUIT with a
    421, or not at all (a time-out): the mail is delivered, so it is
    recorded sent; retrying it would deliver it twice (delivery is at most
    once, docs/alerts.rst)."""
    import threading
    listener = socket.create_server(("127.0.0.1", 0))
    taken: list[bytes] = []

    def serve() -> None:  # a real TCP peer speaking just enough SMTP, for two sessions
        for _ in range(2):
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn, conn.makefile("rb") as lines:
                conn.sendall(b"220 tt ESMTP\r\n")
                for line in lines:
                    verb = line[:4].upper()
                    if verb == b"DATA":
                        conn.sendall(b"354 go on\r\n")
                        taken.append(b"".join(iter(lines.readline, b".\r\n")))
                        conn.sendall(b"250 2.0.0 queued\r\n")
                    elif verb == b"QUIT":
                        if goodbye:
                            conn.sendall(goodbye)
                        else:
                            time.sleep(1.5)  # past the client's time-out
                        break
                    else:
                        conn.sendall(b"250 ok\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    config = smtp_config(listener.getsockname()[1], timeout=1)
    outbox = Outbox(db, config)
    try:
        with AlertStore(db) as store:
            engine = AlertEngine(store, [make_rule()], config, host="h")
            assert engine.tick(T0, {KEY: 12})
            (first,) = outbox.deliver_due(T0)
            outbox.deliver_due(T0 + 4000)  # any retry would be due by now
            assert len(taken) == 1
            assert first.ok and [i.status for i in store.list()] == ["sent"]
    finally:
        listener.close()
        outbox.close()


# --------------------------------------------------------------------------
# A real local Postfix: end to end into a Maildir
# --------------------------------------------------------------------------

from tt_postfix import MAILBOX, SENDMAIL, requires_postfix, wait_for_mail  # noqa: E402  (shared with test_supervisor)


@pytest.fixture
def postfix_rule() -> SimpleNamespace:
    token = f"tt{uuid.uuid4().hex[:10]}"
    return make_rule(name=f"burst-{token}", to=(MAILBOX,), sender="tt-test@localhost",
                     token=token)


def real_time() -> float:
    """A start of minute near the real time, so the Date headers look sane."""
    return (time.time() // 60) * 60


class TestPostfix:
    pytestmark = requires_postfix

    def test_a_burst_delivers_exactly_one_mail(self, db: str,
                                               postfix_rule: SimpleNamespace) -> None:
        config = make_mail_config(sendmail=SENDMAIL)
        rule, start = postfix_rule, real_time()
        outbox = Outbox(db, config)
        with AlertStore(db) as store:
            engine = AlertEngine(store, [rule], config, host="testhost")
            for second in range(60):  # a burst: 3 views a second for a minute
                now = start + second
                engine.tick(now, {KEY: 3 * second}, top_accounts=[("shop", 3 * second)],
                            throttle_level=1)
                outbox.deliver_due(now)
            assert [m.status for m in store.list()] == ["sent"]
        (msg,) = wait_for_mail(rule.token, 1)
        assert msg["Subject"] == (f"[trafficthreshold] {rule.name}: 12 pageview/min for all "
                                  f"(threshold 10) on testhost")
        assert msg["From"] == "tt-test@localhost" and msg["To"] == MAILBOX
        assert msg["Date"].datetime.timestamp() == start + 4  # 3 * 4 = 12 >= 10
        assert msg["Message-ID"] == store_message_id(db)
        assert msg["Auto-Submitted"] == "auto-generated"
        assert msg["Return-Path"] == "<tt-test@localhost>"  # the -f envelope sender
        body = msg.get_content()
        assert f"ALERT {rule.name}: 12 pageview per minute" in body
        assert "12  shop" in body and "Throttle level: 1" in body
        outbox.close()

    def test_sustained_burst_sends_reminders_and_one_resolved_mail(
            self, db: str, postfix_rule: SimpleNamespace) -> None:
        config = make_mail_config(sendmail=SENDMAIL)
        rule, start = postfix_rule, real_time()
        rule.repeat, rule.clear_minutes = 120, 2
        outbox = Outbox(db, config)
        with AlertStore(db) as store:
            engine = AlertEngine(store, [rule], config, host="testhost")
            for second in range(0, 9 * 60, 5):
                hot = second < 5 * 60  # hot for minutes 0..4, quiet from minute 5
                engine.tick(start + second, {KEY: 40 + second // 60 if hot else 2})
                outbox.deliver_due(start + second)
            assert [m.status for m in store.list()] == ["sent"] * 4
        mails = wait_for_mail(rule.token, 4)
        subjects = [m["Subject"] for m in mails]
        assert subjects == [
            f"[trafficthreshold] {rule.name}: 40 pageview/min for all (threshold 10) on testhost",
            f"[trafficthreshold] still {rule.name}: 42 pageview/min for all (threshold 10) "
            f"on testhost",
            f"[trafficthreshold] still {rule.name}: 44 pageview/min for all (threshold 10) "
            f"on testhost",
            f"[trafficthreshold] resolved {rule.name}: pageview for all back below 10/min on "
            f"testhost (peak 44)",
        ]
        resolved = mails[-1]
        # Last hot minute: 4; quiet minutes 5 and 6; resolved on the tick at 7:00.
        assert resolved["Date"].datetime.timestamp() == start + 7 * 60
        body = resolved.get_content()
        assert "duration:  5 min" in body and "reminders: 2" in body
        assert len({m["Message-ID"] for m in mails}) == 4
        outbox.close()

    def test_a_restart_mid_episode_sends_no_duplicate(
            self, db: str, postfix_rule: SimpleNamespace) -> None:
        config = make_mail_config(sendmail=SENDMAIL)
        rule, start = postfix_rule, real_time()
        # First daemon: fires and queues, then "dies" before delivering.
        with AlertStore(db) as store:
            engine = AlertEngine(store, [rule], config, host="testhost")
            assert engine.tick(start, {KEY: 12})
            engine.tick(start + 1, {KEY: 20})
        # Second daemon on the same database: continues the episode.
        outbox = Outbox(db, config)
        with AlertStore(db) as store:
            engine = AlertEngine(store, [rule], config, host="testhost")
            for second in range(2, 120):
                assert engine.tick(start + second, {KEY: 30}) == []
                outbox.deliver_due(start + second)
        outbox.close()
        # Third daemon (a SIGHUP-style reload of everything): still nothing new.
        outbox = Outbox(db, config)
        with AlertStore(db) as store:
            engine = AlertEngine(store, [rule], config, host="testhost")
            assert engine.tick(start + 120, {KEY: 30}) == []
            assert outbox.deliver_due(start + 120) == []
            assert [m.status for m in store.list()] == ["sent"]
        outbox.close()
        assert len(wait_for_mail(rule.token, 1)) == 1

    def test_a_locked_database_after_the_mta_accepted_never_resends(
            self, db: str, postfix_rule: SimpleNamespace) -> None:
        """The hourly prune (or any writer) holding the database past the
        busy timeout right after sendmail took the mail: one copy only."""
        config = make_mail_config(sendmail=SENDMAIL)
        start = real_time()
        mail_id = queue_alert(db, config, postfix_rule, now=start)
        lockers: list[subprocess.Popen[str]] = []

        class LockAfterSend(mailer.SendmailTransport):
            def send(self, prepared: Prepared) -> None:
                super().send(prepared)  # the real Postfix has it now
                if not lockers:
                    lockers.append(hold_write_lock(db, 1.0))

        outbox = Outbox(db, config, transport=LockAfterSend(SENDMAIL), busy_timeout=0.2)
        try:
            for second in range(8):  # the worker's passes, while and after the lock
                try:
                    outbox.deliver_due(start + second)
                except sqlite3.Error:
                    pass  # the worker logs it and goes on
                if second == 2:
                    assert outbox.owed() == [mail_id]
                    lockers[0].wait(5)
        finally:
            for locker in lockers:
                locker.wait(5)
        assert outbox.owed() == []
        with AlertStore(db) as store:
            row = store.get(mail_id)
            assert row.status == "sent" and row.attempts == 1 and row.sent_at == start
        outbox.close()
        assert len(wait_for_mail(postfix_rule.token, 1, deadline=5)) == 1

    def test_default_from_names_the_host_the_subject_names(
            self, db: str, postfix_rule: SimpleNamespace) -> None:
        """No mail.from, no host given: From, Message-ID and subject all name
        config.default_host() (here getfqdn() is "localhost": the host name)."""
        from trafficthreshold import config as configuration
        host = configuration.default_host()
        mail_config = configuration.parse(f"[mail]\nsendmail = '{SENDMAIL}'\n", "config.toml")
        rule = make_rule(name=postfix_rule.name, to=(MAILBOX,), sender="")
        start = real_time()
        outbox = Outbox(db, mail_config.mail)
        with AlertStore(db) as store:
            engine = AlertEngine(store, [rule], mail_config.mail)
            assert engine.tick(start, {KEY: 12}, top_accounts=[])  # only the total counted
            (result,) = outbox.deliver_due(start)
            assert result.ok, result.error
        outbox.close()
        (msg,) = wait_for_mail(postfix_rule.token, 1)
        assert host != "localhost" or socket.gethostname() in ("", "localhost")
        assert msg["From"] == f"trafficthreshold@{host}"
        assert msg["Subject"].endswith(f" on {host}")
        assert msg["Message-ID"].endswith(f"@{host}>")
        body = msg.get_content()
        assert f"Host:           {host}" in body
        assert ("Busiest accounts: none to list, only the total is counted "
                "(no per-account keys).") in body
        assert "(not known)" not in body

    def test_send_test_through_postfix(self, postfix_rule: SimpleNamespace) -> None:
        result = send_test(make_mail_config(sendmail=SENDMAIL), postfix_rule)
        assert result.ok, result.message
        (msg,) = wait_for_mail(postfix_rule.token, 1)
        assert msg["Subject"].startswith("[test] ")


def store_message_id(db: str) -> str:
    with AlertStore(db) as store:
        return store.list()[0].message_id


"""Alert mails: templates, message building, transports and the outbox.

* :class:`Renderer` turns a queued :class:`~trafficthreshold.alerts.Mail`
  into subject and body with jinja2 templates: first from ``mail.templates``
  (if set), then the ones shipped in ``trafficthreshold/templates/``.
* :func:`build_message` makes the :class:`email.message.EmailMessage`
  (``email.policy.SMTP``, see :data:`MESSAGE_POLICY`).  Header values never come raw from a
  template or an account name: the subject is flattened to one line and
  addresses are parsed, so nothing can add a header.
* Two transports, picked by ``mail.transport``: :class:`SendmailTransport`
  (``sendmail -oi -f SENDER -- RCPT...``, message on stdin) and
  :class:`SMTPTransport` (smtplib, optional STARTTLS and login).  Both raise
  :class:`DeliveryError`, which says whether the failure is temporary.
* :class:`Outbox` delivers what :class:`~trafficthreshold.alerts.store.AlertStore`
  queued, off the tick loop, in a worker thread; retries with exponential
  backoff; gives up after a bounded number of attempts and says so in the
  log and in the queue row.  Nothing is dropped silently.
* :func:`send_test` for ``trafficthreshold test-mail``.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import signal
import smtplib
import sqlite3
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from email import policy
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime, parseaddr
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import jinja2

from trafficthreshold.alerts import Mail, MailContext, Notice, epoch_minute
from trafficthreshold.alerts.engine import MAX_PER_HOUR, MailQueue, default_sender
from trafficthreshold.alerts.store import AlertStore, QueuedMail, new_message_id
from trafficthreshold.config import default_host
from trafficthreshold.errors import MailError, TrafficThresholdError

log = logging.getLogger("trafficthreshold.mailer")

#: Templates shipped with the package.
PACKAGE_TEMPLATES = Path(__file__).parent.parent / "templates"
DEFAULT_SENDMAIL = "/usr/sbin/sendmail"
EX_TEMPFAIL = 75  # sysexits.h: "try again later"

#: email.policy.SMTP (CRLF line ends), folding headers only past RFC 5322's
#: hard limit of 998: at 78, Python moves a 70-77 character subject whole to
#: a continuation line, which some readers then show with a leading space.
MESSAGE_POLICY = policy.SMTP.clone(max_line_length=998)


class DeliveryError(MailError):
    """The transport did not take the mail.  ``temporary``: worth retrying soon."""

    def __init__(self, message: str, *, temporary: bool) -> None:
        super().__init__(message)
        self.temporary = temporary


# --------------------------------------------------------------------------
# Templates
# --------------------------------------------------------------------------


def rfc1123(seconds: float) -> str:
    """``Mon, 02 Mar 2026 14:05:00 GMT``, the format of a Date header."""
    return format_datetime(datetime.fromtimestamp(seconds, timezone.utc), usegmt=True)


def human_duration(seconds: float) -> str:
    """``45 s``, ``12 min``, ``2 h 5 min``."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    hours, minutes = divmod(seconds // 60, 60)
    return f"{hours} h {minutes} min" if hours else f"{minutes} min"


def one_line(text: str) -> str:
    """Collapse any whitespace and control characters to single spaces.

    This is what keeps a template or an account name such as
    ``"x\\r\\nBcc: evil@x"`` from starting a new header line.
    """
    return " ".join(no_controls(text).split())


def no_controls(value: Any) -> Any:
    """jinja2 ``finalize``: control characters in a value become spaces.

    Every ``{{ ... }}`` of every template passes through here, so a value
    can never add a line of its own, in the body or the subject.
    """
    if isinstance(value, str) and not value.isprintable():
        return "".join(ch if ch.isprintable() else " " for ch in value)
    return value


def _notice_vars(notice: Notice) -> dict[str, Any]:
    """One notice as the templates see it (times already formatted)."""
    ended = notice.ended
    return {
        "kind": notice.kind,
        "rule": {
            "name": notice.rule,
            "account": notice.account,
            "event": notice.event,
            "window": notice.window,
            "threshold": notice.threshold,
        },
        "account": notice.account,
        "event": notice.event,
        "window": notice.window,
        "threshold": notice.threshold,
        "count": notice.count,
        "minute": rfc1123(notice.minute * 60),
        "started": rfc1123(notice.started),
        "ended": rfc1123(ended) if ended is not None else "",
        "duration": human_duration((ended if ended is not None else notice.at) - notice.started),
        "peak": notice.peak,
        "peak_minute": rfc1123(notice.peak_minute * 60),
        "reminders": notice.reminders,
    }


def template_vars(mail: Mail, context: MailContext, *, test: bool = False) -> dict[str, Any]:
    """The variables every template gets (see docs/alerts.rst).

    ``rule``, ``count``, ``threshold`` and ``minute`` are those of the first
    notice; ``notices`` has all of them when several were grouped.
    """
    notices = [_notice_vars(n) for n in mail.notices]
    first = notices[0] if notices else None
    return {
        "notices": notices,
        "notice": first,
        "rule": first["rule"] if first else None,
        "count": first["count"] if first else None,
        "threshold": first["threshold"] if first else None,
        "minute": first["minute"] if first else rfc1123(epoch_minute(mail.at) * 60),
        "host": context.host,
        "top_accounts": (None if context.top_accounts is None
                         else [tuple(t) for t in context.top_accounts]),
        "throttle_level": context.throttle_level,
        "dashboard_url": context.dashboard_url,
        "suppressed": mail.suppressed,
        "max_per_hour": context.max_per_hour,
        "sent_at": rfc1123(mail.at),
        "test": test,
    }


class Renderer:
    """jinja2 subject/body templates: ``user_dir`` first, then the shipped ones.

    Template names are ``{kind}_subject.txt`` and ``{kind}_body.txt`` with
    kind "alert", "resolved" or "suppressed".
    """

    def __init__(self, user_dir: str = "") -> None:
        loaders: list[jinja2.BaseLoader] = []
        if user_dir:
            if not os.path.isdir(user_dir):
                log.warning("mail.templates %s is not a directory: using the shipped templates",
                            user_dir)
            loaders.append(jinja2.FileSystemLoader(user_dir))
        loaders.append(jinja2.FileSystemLoader(str(PACKAGE_TEMPLATES)))
        self.user_dir = user_dir
        self.env = jinja2.Environment(
            loader=jinja2.ChoiceLoader(loaders),
            undefined=jinja2.StrictUndefined,  # a typo in a template is an error, not ""
            autoescape=False,  # plain text mail
            finalize=no_controls,
            keep_trailing_newline=True,
            trim_blocks=True,
            lstrip_blocks=True,
        )

    def render(self, kind: str, variables: dict[str, Any]) -> tuple[str, str]:
        """(subject on one line, body) for ``kind``."""
        try:
            subject = self.env.get_template(f"{kind}_subject.txt").render(variables)
            body = self.env.get_template(f"{kind}_body.txt").render(variables)
        except jinja2.TemplateError as exc:
            where = f" (mail.templates = {self.user_dir})" if self.user_dir else ""
            raise MailError(f"mail template for {kind!r} failed{where}: {exc}: fix the template")
        return one_line(subject), body


# --------------------------------------------------------------------------
# Messages
# --------------------------------------------------------------------------


def parse_address(text: str, what: str) -> Address:
    """``ops@example.com`` or ``Ops <ops@example.com>`` -> Address, or MailError."""
    if not text or any(ch in text for ch in "\r\n\0"):
        raise MailError(f"{what} {text!r} is not a mail address")
    name, addr = parseaddr(text)
    try:
        if not addr or addr.startswith("-"):
            raise ValueError("empty or starts with '-'")
        return Address(display_name=one_line(name), addr_spec=addr)
    except (ValueError, IndexError) as exc:
        raise MailError(f"{what} {text!r} is not a mail address: {exc}") from None


@dataclass(frozen=True)
class Prepared:
    """A message ready for a transport, with its SMTP envelope."""

    message: EmailMessage
    envelope_from: str
    envelope_to: tuple[str, ...]


def build_message(
    mail: Mail,
    context: MailContext,
    *,
    message_id: str,
    renderer: Renderer,
    test: bool = False,
) -> Prepared:
    """Render ``mail`` into a message.  Raises MailError on a bad address/template."""
    sender = parse_address(mail.sender, "sender")
    recipients = [parse_address(a, "recipient") for a in mail.to]
    if not recipients:
        raise MailError("alert mail without recipients: set `to` in the [[alert]] rule")
    subject, body = renderer.render(mail.kind, template_vars(mail, context, test=test))
    msg = EmailMessage(policy=MESSAGE_POLICY)
    msg["Date"] = rfc1123(mail.at)
    msg["Message-ID"] = one_line(message_id)
    msg["From"] = sender
    msg["To"] = recipients
    msg["Subject"] = subject
    msg["Auto-Submitted"] = "auto-generated"  # RFC 3834: no vacation replies, please
    msg.set_content(body)
    return Prepared(msg, sender.addr_spec, tuple(r.addr_spec for r in recipients))


# --------------------------------------------------------------------------
# Transports
# --------------------------------------------------------------------------


class Transport(Protocol):
    name: str

    def send(self, prepared: Prepared) -> None:
        """Hand the message over, or raise DeliveryError."""


def missing_sendmail(path: str) -> str:
    return (f"no {path}: install an MTA such as postfix, "
            f"or set mail.transport = \"smtp\"")


class SendmailTransport:
    """``sendmail -oi -f SENDER -- RCPT...`` with the message on stdin.

    Recipients go on the command line, never with ``-t`` (with -t, Exim
    treats command-line addresses as exclusions).  ``-oi``: a line with a
    single dot does not end the message.  The child runs in its own process
    group, killed as a whole when ``timeout`` expires.
    """

    name = "sendmail"

    def __init__(self, path: str = DEFAULT_SENDMAIL, timeout: float = 30.0) -> None:
        self.path = path or DEFAULT_SENDMAIL
        self.timeout = timeout

    def check(self) -> None:
        """Raise DeliveryError if the binary is missing or not executable."""
        if not os.path.exists(self.path):
            raise DeliveryError(missing_sendmail(self.path), temporary=False)
        if not os.access(self.path, os.X_OK):
            raise DeliveryError(f"{self.path} is not executable: fix mail.sendmail",
                                temporary=False)

    def send(self, prepared: Prepared) -> None:
        argv = [self.path, "-oi", "-f", prepared.envelope_from, "--", *prepared.envelope_to]
        # Local sendmail programs expect UNIX line ends, not SMTP's CRLF.
        data = prepared.message.as_bytes(policy=prepared.message.policy.clone(linesep="\n"))
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, start_new_session=True)
        except FileNotFoundError:
            raise DeliveryError(missing_sendmail(self.path), temporary=False) from None
        except PermissionError:
            raise DeliveryError(f"{self.path} is not executable: fix mail.sendmail",
                                temporary=False) from None
        try:
            out, err = proc.communicate(data, timeout=self.timeout)
        except subprocess.TimeoutExpired:
            _kill(proc)
            raise DeliveryError(f"{self.path} did not finish within {self.timeout:g} s "
                                f"(mail.timeout): killed", temporary=True) from None
        if proc.returncode != 0:
            message = (err or out).decode("utf-8", "replace").strip() or "(no message)"
            raise DeliveryError(f"{self.path} exited with status {proc.returncode}: {message}",
                                temporary=proc.returncode == EX_TEMPFAIL)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    """Kill the child's whole process group and reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    # Do not read the pipes further: a stray grandchild may still hold them.
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()
    proc.wait()


class SMTPTransport:
    """smtplib to ``host:port``; STARTTLS and login when configured.

    4xx replies, refused connections, time-outs and dropped connections are
    temporary; 5xx replies (including failed login) are not.
    """

    name = "smtp"

    def __init__(
        self,
        host: str = "localhost",
        port: int = 25,
        *,
        starttls: bool = False,
        username: str = "",
        password_file: str = "",
        password_env: str = "",
        timeout: float = 30.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.host, self.port = host or "localhost", int(port or 25)
        self.starttls, self.username = starttls, username
        self.password_file, self.password_env = password_file, password_env
        self.timeout = timeout
        self.ssl_context = ssl_context

    def password(self) -> str:
        """Read the password now (so a rotated one is picked up)."""
        if self.password_file:
            try:
                return Path(self.password_file).read_text().rstrip("\r\n")
            except OSError as exc:
                raise DeliveryError(f"cannot read mail.password_file {self.password_file}: "
                                    f"{exc.strerror}", temporary=False) from None
        if self.password_env:
            value = os.environ.get(self.password_env)
            if value is None:
                raise DeliveryError(f"environment variable {self.password_env} "
                                    f"(mail.password_env) is not set", temporary=False)
            return value
        raise DeliveryError("mail.username is set but there is no password: set "
                            "mail.password_file or mail.password_env", temporary=False)

    def send(self, prepared: Prepared) -> None:
        where = f"smtp {self.host}:{self.port}"
        try:
            self._session(prepared)
        except smtplib.SMTPRecipientsRefused as exc:
            codes = [code for code, _ in exc.recipients.values()]
            raise DeliveryError(f"{where} refused every recipient: {exc.recipients}",
                                temporary=all(400 <= c < 500 for c in codes)) from None
        except smtplib.SMTPResponseException as exc:
            text = exc.smtp_error.decode("utf-8", "replace") if isinstance(
                exc.smtp_error, bytes) else str(exc.smtp_error)
            raise DeliveryError(f"{where} answered {exc.smtp_code} {text}",
                                temporary=400 <= exc.smtp_code < 500) from None
        except smtplib.SMTPNotSupportedError as exc:
            raise DeliveryError(f"{where}: {exc}: unset mail.starttls or use another server",
                                temporary=False) from None
        except ssl.SSLError as exc:
            raise DeliveryError(f"{where}: TLS failed: {exc}", temporary=False) from None
        except (smtplib.SMTPException, OSError) as exc:
            raise DeliveryError(f"cannot send through {where}: {exc or type(exc).__name__}: "
                                f"check that the server runs, or fix mail.smtp_host / "
                                f"mail.smtp_port", temporary=True) from None

    def _session(self, prepared: Prepared) -> None:
        # Not ``with smtplib.SMTP(...)``: its exit sends QUIT and raises for
        # a reply other than 221 (or a time-out), which would fail a mail the
        # server has already taken and have it sent again.
        smtp = smtplib.SMTP(self.host, self.port, timeout=self.timeout)
        try:
            smtp.ehlo()
            if self.starttls:
                smtp.starttls(context=self.ssl_context or ssl.create_default_context())
                smtp.ehlo()
            if self.username:
                smtp.login(self.username, self.password())
            refused = smtp.send_message(prepared.message, from_addr=prepared.envelope_from,
                                        to_addrs=list(prepared.envelope_to))
            try:  # the mail is taken: how the goodbye goes changes nothing
                smtp.quit()
            except (smtplib.SMTPException, OSError) as exc:
                log.debug("smtp %s:%s: QUIT after the mail was taken failed: %s",
                          self.host, self.port, exc)
        finally:
            smtp.close()
        if refused:  # some recipients got it, these did not: retrying would duplicate
            log.error("smtp %s:%s refused some recipients: %s", self.host, self.port, refused)


def _sendmail_from_config(mail: Any, ssl_context: ssl.SSLContext | None) -> Transport:
    return SendmailTransport(getattr(mail, "sendmail", "") or DEFAULT_SENDMAIL,
                             float(getattr(mail, "timeout", 30)))


def _smtp_from_config(mail: Any, ssl_context: ssl.SSLContext | None) -> Transport:
    return SMTPTransport(
        getattr(mail, "smtp_host", "localhost"), getattr(mail, "smtp_port", 25),
        starttls=bool(getattr(mail, "starttls", False)),
        username=getattr(mail, "username", ""),
        password_file=getattr(mail, "password_file", ""),
        password_env=getattr(mail, "password_env", ""),
        timeout=float(getattr(mail, "timeout", 30)),
        ssl_context=ssl_context,
    )


#: mail.transport -> factory(mail config, ssl context)
TRANSPORTS: dict[str, Callable[[Any, ssl.SSLContext | None], Transport]] = {
    "sendmail": _sendmail_from_config,
    "smtp": _smtp_from_config,
}


def transport_from_config(mail: Any, ssl_context: ssl.SSLContext | None = None) -> Transport:
    """The transport ``mail.transport`` names (``ssl_context``: for STARTTLS)."""
    name = getattr(mail, "transport", "sendmail") or "sendmail"
    try:
        factory = TRANSPORTS[name]
    except KeyError:
        raise MailError(f"unknown mail.transport {name!r}: use \"sendmail\" or \"smtp\"") from None
    return factory(mail, ssl_context)


# --------------------------------------------------------------------------
# The outbox: delivery of queued mails, off the tick loop
# --------------------------------------------------------------------------

#: A mail is only started with at least this many seconds left before a deadline.
MIN_SEND_TIME = 1.0


def _remaining(deadline: float | None) -> float:
    """Seconds left until ``deadline`` (time.monotonic()); inf without one."""
    return math.inf if deadline is None else deadline - time.monotonic()


def _within(transport: Transport, seconds: float) -> Transport:
    """``transport``, or a copy whose ``timeout`` is cut to ``seconds``."""
    timeout = getattr(transport, "timeout", None)
    if timeout is None or timeout <= seconds:
        return transport
    bounded = copy.copy(transport)
    bounded.timeout = max(seconds, MIN_SEND_TIME)  # type: ignore[attr-defined]
    return bounded


@dataclass(frozen=True)
class Delivery:
    """What happened to one queued mail in :meth:`Outbox.deliver_due`."""

    id: int
    ok: bool
    error: str | None = None
    temporary: bool = False
    retry_at: float | None = None  #: None after a failure: given up


class Outbox:
    """Delivers mails queued in a :class:`~trafficthreshold.alerts.engine.MailQueue`:
    the host rules' alert store at ``db_path`` (:meth:`_store`).

    :meth:`start` runs a worker thread that calls :meth:`deliver_due` every
    ``poll`` seconds and whenever :meth:`wake` is called (pass ``wake`` as
    :class:`~trafficthreshold.alerts.engine.AlertEngine`'s ``on_queued``); a
    stuck MTA only ever blocks that thread, for at most ``mail.timeout``.
    Tests call :meth:`deliver_due` directly with their own ``now``.

    Retry policy: attempt n failing is retried after
    ``min(backoff * 2**(n-1), backoff_max)`` seconds.  Temporary failures
    (sendmail exit 75, a time-out, SMTP 4xx, connection refused) get up to
    ``max_temp_attempts`` attempts, any other failure ``max_attempts``; then
    the row is marked failed and an error is logged.

    :class:`trafficthreshold.alerts.farm.FarmOutbox` is the same worker over
    the farm's queue in Redis (its store errors: :data:`STORE_ERRORS`).
    """

    #: What the queue raises when it cannot be written (nothing sent then).
    STORE_ERRORS: tuple[type[BaseException], ...] = (sqlite3.Error,)

    def __init__(
        self,
        db_path: str,
        mail_config: Any,
        *,
        transport: Transport | None = None,
        renderer: Renderer | None = None,
        max_attempts: int = 5,
        max_temp_attempts: int = 20,
        backoff: float = 30.0,
        backoff_max: float = 3600.0,
        poll: float = 1.0,
        busy_timeout: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.db_path = db_path
        self.clock = clock  # the worker's ``now`` (the farm's outbox: the tick's clock)
        self.busy_timeout = busy_timeout  # None: the store's default (5 s)
        self.max_attempts, self.max_temp_attempts = max_attempts, max_temp_attempts
        self.backoff, self.backoff_max, self.poll = backoff, backoff_max, poll
        self._fixed_transport = transport
        self.reload(mail_config, renderer)
        self._local = threading.local()  # one AlertStore (connection) per thread
        self._lock = threading.Lock()  # one delivery pass at a time
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._owed: dict[int, Callable[[MailQueue], None]] = {}  # id -> unrecorded answer
        self._recovered = False  # the restart rule applied (on the first pass)

    def reload(self, mail_config: Any, renderer: Renderer | None = None) -> None:
        """New mail configuration (SIGHUP); used from the next delivery on."""
        self.mail_config = mail_config
        self.renderer = renderer or Renderer(getattr(mail_config, "templates", "") or "")
        self.transport = self._fixed_transport or transport_from_config(mail_config)

    # -- synchronous ---------------------------------------------------------

    def deliver_due(
        self,
        now: float,
        limit: int = 100,
        *,
        stop: Callable[[], bool] | None = None,
        deadline: float | None = None,
    ) -> list[Delivery]:
        """Try every mail due at ``now`` once (at most ``limit``).

        Between two mails it checks ``stop()`` and ``deadline`` (a
        ``time.monotonic()`` value; a mail is only started with at least
        :data:`MIN_SEND_TIME` left, and its transport time-out is cut to
        what is left).  Each mail is claimed (:meth:`AlertStore.claim`)
        before the MTA gets it; if the database is locked past its busy
        timeout the pass ends there and nothing more is sent.  MTA answers
        that could not be recorded are recorded first on the next pass.
        """
        results: list[Delivery] = []
        with self._lock:
            store = self._store()
            if not self._settle(store):
                return results  # the database is still locked: send nothing new
            if not self._recovered:
                store.resolve_interrupted()
                self._recovered = True
            while len(results) < limit:
                if (stop is not None and stop()) or _remaining(deadline) < MIN_SEND_TIME:
                    break
                item = store.next_due(now)
                if item is None or any(r.id == item.id for r in results):
                    break
                # Rendered before the claim: between the claim and the MTA's
                # answer (where a crash leaves a mail interrupted, never
                # re-sent) there is only the transport's run.
                prepared = self._prepare(item)
                try:
                    if not store.claim(item.id, now):
                        continue  # no longer pending (e.g. given up on meanwhile)
                except self.STORE_ERRORS as exc:
                    log.warning("mail %d not sent on this pass: cannot claim it in %s: %s; "
                                "trying again on the next pass", item.id, self.db_path, exc)
                    break
                results.append(self._deliver(store, item, now, deadline, prepared))
        return results

    def flush(self, now: float, budget: float) -> list[Delivery]:
        """Stop the worker, then a last pass over the due mails, all within
        ``budget`` seconds (for a shutdown inside systemd's TimeoutStopSec).

        What is not sent in time stays queued for the next start; a mail the
        worker is still handing over when the budget runs out is left to it.
        """
        deadline = time.monotonic() + budget
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))
            if self._thread.is_alive():
                log.warning("mail worker still busy after %g s: queued mails go out at the "
                            "next start", budget)
                return []
        results = self.deliver_due(now, deadline=deadline)
        if self._owed:
            log.error("mail(s) %s: the MTA's answer could not be recorded before stopping (the "
                      "database is locked); the next start marks them failed as interrupted, "
                      "without sending them again", ", ".join(map(str, self._owed)))
        return results

    def _prepare(self, item: QueuedMail) -> Prepared | Exception:
        """The message of ``item``, or why it cannot be built (a bad template
        or address: the attempt fails with it once the row is claimed)."""
        try:
            return build_message(item.mail, item.context, message_id=item.message_id,
                                 renderer=self.renderer)
        except Exception as exc:  # noqa: BLE001 - recorded by _deliver
            return exc

    def _deliver(self, store: MailQueue, item: QueuedMail, now: float,
                 deadline: float | None, prepared: Prepared | Exception) -> Delivery:
        """Send one claimed mail and record the outcome (the row is ``sending``)."""
        transport = _within(self.transport, _remaining(deadline))
        try:
            if isinstance(prepared, Exception):
                raise prepared
            transport.send(prepared)
        except DeliveryError as exc:
            return self._failed(store, item, now, str(exc), exc.temporary)
        except MailError as exc:  # bad template or address: retrying rarely helps
            return self._failed(store, item, now, str(exc), False)
        except Exception as exc:  # a bug must not kill the worker, nor lose the mail
            log.exception("mail %d: unexpected error", item.id)
            return self._failed(store, item, now, f"{type(exc).__name__}: {exc}", False)
        log.info("mail %d (%s, %s) sent to %s via %s", item.id, item.kind,
                 ",".join(item.rules) or "-", ", ".join(item.recipients), transport.name)
        self._record(store, item.id, lambda s: s.mark_sent(item.id, now))
        return Delivery(item.id, True)

    def _failed(self, store: MailQueue, item: QueuedMail, now: float, error: str,
                temporary: bool) -> Delivery:
        attempt = item.attempts + 1
        limit = self.max_temp_attempts if temporary else self.max_attempts
        retry_at = None
        if attempt < limit:
            retry_at = now + min(self.backoff * 2 ** (attempt - 1), self.backoff_max)
        self._record(store, item.id, lambda s: s.mark_failed(item.id, now, error, retry_at))
        what = "temporary failure" if temporary else "failure"
        if retry_at is None:
            log.error("mail %d to %s: %s: %s; gave up after %d attempts", item.id,
                      ", ".join(item.recipients), what, error, attempt)
        else:
            log.log(logging.WARNING if temporary else logging.ERROR,
                    "mail %d to %s: %s: %s; attempt %d of %d, retrying in %.0f s", item.id,
                    ", ".join(item.recipients), what, error, attempt, limit, retry_at - now)
        return Delivery(item.id, False, error, temporary, retry_at)

    def _record(self, store: MailQueue, id: int, write: Callable[[MailQueue], None]) -> None:
        """Record an MTA answer; if the database refuses (locked past the busy
        timeout), keep it and retry on every pass until it is taken.  The row
        stays ``sending`` meanwhile, so it is never handed to the MTA again."""
        try:
            write(store)
        except self.STORE_ERRORS as exc:
            log.warning("mail %d: cannot record the MTA's answer in %s: %s; the mail is not "
                        "sent again, recording is retried on the next pass",
                        id, self.db_path, exc)
            self._owed[id] = write

    def _settle(self, store: MailQueue) -> bool:
        """Retry the owed records (oldest first); False if one still fails."""
        for id, write in list(self._owed.items()):
            try:
                write(store)
            except self.STORE_ERRORS as exc:
                log.warning("mail %d: recording the MTA's answer still fails: %s", id, exc)
                return False
            del self._owed[id]
            log.info("mail %d: the MTA's answer is recorded now", id)
        return True

    def owed(self) -> list[int]:
        """Ids of mails whose MTA answer is not recorded yet (``sending`` rows)."""
        return list(self._owed)

    def _store(self) -> MailQueue:
        """This thread's queue (the farm's outbox: the fenced queue of its lease)."""
        store: AlertStore | None = getattr(self._local, "store", None)
        if store is None:
            store = self._local.store = AlertStore(self.db_path, self.busy_timeout)
        return store

    def close(self) -> None:
        """Close this thread's store connection (the worker closes its own)."""
        store = getattr(self._local, "store", None)
        if store is not None:
            store.close()
            self._local.store = None

    # -- worker thread -------------------------------------------------------

    def start(self) -> None:
        """Start the delivery thread (idempotent)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="trafficthreshold-mailer",
                                        daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Deliver now rather than at the next poll (cheap, never blocks)."""
        self._wake.set()

    def stop(self, timeout: float | None = None) -> bool:
        """Stop the thread after its current mail (the stop flag is checked
        between mails); True if it has ended.

        Waits up to ``timeout`` (default: ``mail.timeout`` + 5 s).
        """
        if self._thread is None:
            return True
        if timeout is None:
            timeout = float(getattr(self.mail_config, "timeout", 30)) + 5
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        failing = None  # the message of our own error last logged (once, not each pass)
        try:
            while not self._stop.is_set():
                # Clear first: a wake() during the pass below is not lost.
                self._wake.clear()
                try:
                    # The worker is an outermost loop: it may read the clock.
                    self.deliver_due(self.clock(), stop=self._stop.is_set)
                except TrafficThresholdError as exc:  # a damaged or locked file: names the fix
                    if str(exc) != failing:
                        failing = str(exc)
                        log.error("mail delivery pass failed: %s; trying again every %g s",
                                  exc, self.poll)
                except Exception:
                    log.exception("mail delivery pass failed; trying again in %g s", self.poll)
                else:
                    if failing is not None:
                        failing = None
                        log.info("mail delivery works again")
                self._wake.wait(self.poll)
        finally:
            self.close()


# --------------------------------------------------------------------------
# test-mail
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class SendTestResult:
    ok: bool
    message: str


def send_test(
    mail_config: Any,
    rule: Any = None,
    *,
    to: Sequence[str] = (),
    now: float | None = None,
    host: str | None = None,
    transport: Transport | None = None,
) -> SendTestResult:
    """Send one test mail right away (not through the queue), for ``test-mail``.

    Recipients: ``to`` if given, else the rule's.  The subject starts with
    "[test]"; the body is the alert template filled with the rule's values.
    """
    now = time.time() if now is None else now
    host = host or default_host()
    recipients = tuple(to) or tuple(getattr(rule, "to", ()) or ())
    if not recipients:
        return SendTestResult(False, "no recipient: pass --to ADDRESS or name an [[alert]] rule")
    try:
        transport = transport or transport_from_config(mail_config)
        if isinstance(transport, SendmailTransport):
            transport.check()
        prepared = _test_message(mail_config, rule, recipients, now, host)
        transport.send(prepared)
    except MailError as exc:
        return SendTestResult(False, f"test mail not sent: {exc}")
    return SendTestResult(True, f"test mail {prepared.message['Message-ID']} handed to "
                                f"{_describe(transport)} for {', '.join(recipients)}; if it "
                                f"does not arrive, look in the mail server's log")


def _test_message(mail_config: Any, rule: Any, recipients: tuple[str, ...], now: float,
                  host: str) -> Prepared:
    threshold = int(getattr(rule, "threshold", 10))
    notice = Notice(
        kind="alert", rule=getattr(rule, "name", "test"),
        account=getattr(rule, "account", "all"), event=getattr(rule, "event", "pageview"),
        window=getattr(rule, "window", "minute"), threshold=threshold, count=threshold,
        minute=epoch_minute(now), at=now, started=now, ended=None, peak=threshold,
        peak_minute=epoch_minute(now), reminders=0, to=recipients, sender="",
    )
    sender = getattr(rule, "sender", "") or default_sender(mail_config, host)
    context = MailContext(host=host, dashboard_url=getattr(mail_config, "dashboard_url", ""),
                          max_per_hour=int(getattr(mail_config, "max_per_hour", MAX_PER_HOUR)))
    renderer = Renderer(getattr(mail_config, "templates", "") or "")
    mail = Mail(sender, recipients, (notice,), 0, now)
    return build_message(mail, context, message_id=new_message_id(host, "trafficthreshold-test"),
                         renderer=renderer, test=True)


def _describe(transport: Transport) -> str:
    if isinstance(transport, SendmailTransport):
        return transport.path
    if isinstance(transport, SMTPTransport):
        return f"smtp {transport.host}:{transport.port}"
    return transport.name

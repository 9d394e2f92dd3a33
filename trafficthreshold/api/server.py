"""Serve a WSGI app with waitress in a background thread.

The daemon calls ``start(make_app(config), config.http.listen)`` (unless
``--no-http``) and ``stop()`` at shutdown::

    server = webserver.start(app, "127.0.0.1:8787")
    server.url    # "http://127.0.0.1:8787/"
    server.stop()

waitress (pure Python, no C extension) runs one event-loop thread that reads
requests and a few worker threads that call the app.  The limits that make
it safe to leave running: small request headers, bodies of at most 1 KiB
reach the app (which refuses any body), idle or slow connections are closed
after CHANNEL_TIMEOUT seconds, at most CONNECTION_LIMIT connections.  What
waitress refuses itself (not HTTP, a body or headers over the limits) is
answered in the API's JSON error shape (:class:`JsonErrorTask`), and a port
already taken is a :class:`~trafficthreshold.errors.ConfigError` that names
the fix.

Listening anywhere but loopback needs a bearer token (the config check
refuses it otherwise); :func:`start` checks the same once more, so that a
mistake elsewhere cannot expose the stats without one, and tells the app
where it is bound (``app.serving_on(host)``): on such an address the app
refuses a reload that drops its token.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import threading
from collections.abc import Callable
from typing import Any

import waitress.channel
import waitress.server
import waitress.task
import waitress.trigger
from waitress import wasyncore

from trafficthreshold.config import is_loopback, parse_listen
from trafficthreshold.errors import ConfigError

log = logging.getLogger("trafficthreshold.webserver")

#: Worker threads calling the app (the machine this runs on is small).
THREADS = 4
#: Seconds an idle connection is kept open; also bounds a slow client.
CHANNEL_TIMEOUT = 30
CONNECTION_LIMIT = 100
#: Request line plus headers; URLs longer than 2 KiB are refused by the app.
MAX_REQUEST_HEADER_SIZE = 16 * 1024
#: Bodies larger than this are refused by waitress, smaller ones by the app
#: (with a JSON message).
MAX_REQUEST_BODY_SIZE = 1024
#: Seconds stop() waits for requests in progress.
STOP_TIMEOUT = 5.0


#: What to do about the errors waitress answers itself, by status.
ERROR_HINTS = {
    400: "the request is not valid HTTP/1.1",
    413: f"this API is read-only and takes no request body (bodies over "
         f"{MAX_REQUEST_BODY_SIZE} bytes are not even read)",
    431: f"the request line and headers are over {MAX_REQUEST_HEADER_SIZE // 1024} KiB; "
         "send fewer or shorter headers",
    501: "the server does not implement what the request asks (a transfer coding?)",
    500: "internal error; the server log has the details",
}


def error_body(status: int, reason: str, detail: str) -> bytes:
    """The JSON error of the API (``{"status", "error", "message"}``, as
    :func:`trafficthreshold.api.error_response` writes it) for an error
    waitress found before any app saw the request."""
    hint = ERROR_HINTS.get(status, "the request was refused")
    message = f"{hint} ({detail.strip()})" if detail.strip() and status != 500 else hint
    payload = {"status": status, "error": reason, "message": message}
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


class JsonErrorTask(waitress.task.ErrorTask):
    """waitress's answer to a request it refused itself (bad request line,
    body or headers too large, a crash in the app's iterator) in the API's
    JSON error shape instead of text/plain."""

    def execute(self) -> None:
        error = self.request.error
        body = error_body(error.code, error.reason, str(error.body))
        self.status = f"{error.code} {error.reason}"
        self.response_headers.extend([
            ("Content-Type", "application/json"),
            ("Cache-Control", "no-cache, no-store, must-revalidate"),
            ("X-Content-Type-Options", "nosniff"),
        ])
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)


class JsonErrorChannel(waitress.channel.HTTPChannel):
    """A connection whose server-made errors are JSON (:class:`JsonErrorTask`)."""

    error_task_class = JsonErrorTask


class Server:
    """A running waitress server; make it with :func:`start`."""

    def __init__(self, server: Any) -> None:
        self._server = server
        if hasattr(server, "effective_listen"):  # a host name with several addresses
            host, port = server.effective_listen[0][:2]
        else:
            host, port = server.effective_host, server.effective_port
        self.host: str = str(host)
        self.port: int = int(port)  # waitress gives a str (getnameinfo)
        self._thread = threading.Thread(target=self._run, name="trafficthreshold-http",
                                        daemon=True)

    @property
    def url(self) -> str:
        """``http://host:port/``, IPv6 hosts in brackets."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def _run(self) -> None:
        try:
            self._server.run()
        except Exception:
            log.exception("the HTTP server stopped on an error")

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Close the listening sockets and connections, wait for the loop
        and the worker threads (at most ``timeout`` seconds each)."""
        socket_map = self._socket_map()
        # Stopped already: the loop is gone and it, or we, closed everything.
        # (A loop that died on an error left its sockets: closed below.)
        if not socket_map and not self._thread.is_alive():
            return
        triggers = [d for d in socket_map.values() if isinstance(d, waitress.trigger.trigger)]
        # The event loop owns its sockets: close them from inside the loop,
        # through its trigger, instead of racing it from this thread.  The
        # trigger pipes stay open until the worker threads are gone: a pull
        # racing the close would write to a closed (or reused!) fd number.
        triggers[0].pull_trigger(functools.partial(_close_all_but, socket_map, triggers))
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("the HTTP server loop did not stop within %.0f s", timeout)
        elif socket_map:
            # The loop had already died (and logged why): close from here.
            _close_all_but(socket_map, triggers)
        self._server.task_dispatcher.shutdown(timeout=timeout)
        for trigger in triggers:
            trigger.close()
        log.info("HTTP server on %s stopped", self.url)

    def _socket_map(self) -> dict[int, Any]:
        # A MultiSocketServer (a host name with several addresses) has .map;
        # a single TcpWSGIServer keeps it in wasyncore's ._map.
        return self._server.map if isinstance(self._server, waitress.server.MultiSocketServer) \
            else self._server._map

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _close_all_but(socket_map: dict[int, Any], triggers: list[Any]) -> None:
    """Close every listening socket and connection of ``socket_map``; take
    the triggers out of the map without closing them.  The map is empty
    afterwards, so the event loop returns.  Runs in the event-loop thread."""
    for dispatcher in list(socket_map.values()):
        try:
            if dispatcher in triggers:
                dispatcher.del_channel()
            elif isinstance(dispatcher, waitress.server.BaseWSGIServer):
                # Not dispatcher.close(): BaseWSGIServer.close() closes its
                # trigger too.
                wasyncore.dispatcher.close(dispatcher)
            else:
                dispatcher.close()
        except OSError as exc:
            log.debug("closing %r: %s", dispatcher, exc)
    socket_map.clear()


def _split_listen(listen: str) -> tuple[str, int]:
    """:func:`~trafficthreshold.config.parse_listen`, plus port 0 (any free
    port, for tests and benchmarks)."""
    base, _, port = listen.rpartition(":")
    if port == "0":
        return parse_listen(base + ":1")[0], 0
    return parse_listen(listen)


def start(app: Callable[..., Any], listen: str, *, threads: int = THREADS) -> Server:
    """Serve ``app`` on ``listen`` (``"127.0.0.1:8787"``, ``"[::1]:8787"``,
    port 0 for any free port) in a background thread; return the Server.

    Refuses a non-loopback address unless the app requires a bearer token
    (``app.requires_token``, see :class:`trafficthreshold.api.StatsApp`).
    Raises ValueError for a bad ``listen`` and
    :class:`~trafficthreshold.errors.ConfigError` when the address cannot
    be listened on (taken, not on this machine, a privileged port), naming
    the address and the fix; nothing is left open or running then.
    Errors waitress answers itself are in the API's JSON shape
    (:class:`JsonErrorTask`).
    """
    host, port = _split_listen(listen)
    if not is_loopback(host) and not getattr(app, "requires_token", False):
        raise ValueError(
            f"refusing to serve the stats on {listen}, which is not a loopback address, "
            "without a token: set http.token (openssl rand -hex 32) or listen on 127.0.0.1")
    serving_on = getattr(app, "serving_on", None)
    if serving_on is not None:  # the app refuses a reload that drops its token here
        serving_on(host)
    # "[::1]:8787" is how waitress spells an IPv6 listen address as well.
    waitress_listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    # Our own map and dispatcher: if binding fails, what create_server
    # already made (worker threads, sockets bound to other addresses of a
    # host name) is ours to close.
    socket_map: dict[int, Any] = {}
    dispatcher = waitress.task.ThreadedTaskDispatcher()
    dispatcher.set_thread_count(threads)
    try:
        server = waitress.server.create_server(
            app,
            map=socket_map,
            _dispatcher=dispatcher,
            listen=waitress_listen,
            threads=threads,
            channel_timeout=CHANNEL_TIMEOUT,
            connection_limit=CONNECTION_LIMIT,
            max_request_header_size=MAX_REQUEST_HEADER_SIZE,
            max_request_body_size=MAX_REQUEST_BODY_SIZE,
            expose_tracebacks=False,
            ident="trafficthreshold",
            clear_untrusted_proxy_headers=True,
        )
    except OSError as exc:
        # The triggers (pipes) and sockets made before the failing bind.
        for made in list(socket_map.values()):
            if isinstance(made, waitress.trigger.trigger):
                made.close()
            else:
                wasyncore.dispatcher.close(made)
        dispatcher.shutdown(timeout=STOP_TIMEOUT)
        raise ConfigError(_cannot_listen(listen, exc)) from exc
    for dispatcher_ in socket_map.values():
        if isinstance(dispatcher_, waitress.server.BaseWSGIServer):
            dispatcher_.channel_class = JsonErrorChannel
    running = Server(server)
    running._thread.start()
    log.info("HTTP server listening on %s", running.url)
    return running


def _cannot_listen(listen: str, exc: OSError) -> str:
    """The ConfigError message for an address that cannot be listened on."""
    why = {
        errno.EADDRINUSE: "the address is already in use (another trafficthreshold run, "
                          "or another program, listens there)",
        errno.EADDRNOTAVAIL: "the address is not one of this machine's",
        errno.EACCES: "ports below 1024 need privileges",
    }.get(exc.errno or 0, exc.strerror or str(exc))
    return (f"cannot serve the stats API on {listen}: {why}; set [http] listen = "
            "\"127.0.0.1:<free port>\" in the configuration, or start with "
            "`trafficthreshold run --no-http`")

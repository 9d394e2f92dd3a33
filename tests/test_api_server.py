"""Tests of trafficthreshold.webserver: waitress in a background thread.

Real sockets on loopback, IPv4 and IPv6.  The nasty cases on purpose: a
public address without a token, a port already taken, oversized headers
and bodies, stopping with a request in flight, and start/stop cycles that
must leave no file descriptor behind (a stop racing the event loop once
wrote to a closed trigger pipe).
"""

from __future__ import annotations

import gc
import http.client
import json
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import pytest

from trafficthreshold.api import server as webserver
from trafficthreshold.errors import ConfigError


def hello(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    body = b"hello " + environ["PATH_INFO"].encode("latin-1")
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


def open_fds() -> int:
    gc.collect()
    return len(os.listdir("/proc/self/fd"))


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read()


def test_serves_on_a_free_ipv4_port_and_stops() -> None:
    server = webserver.start(hello, "127.0.0.1:0")
    try:
        assert server.port > 0 and server.url == f"http://127.0.0.1:{server.port}/"
        assert get(server.url + "x") == b"hello /x"
    finally:
        server.stop()
    with pytest.raises(urllib.error.URLError):
        get(server.url)
    # The port is free again.
    with socket.create_server(("127.0.0.1", server.port)):
        pass


def test_serves_on_ipv6_loopback() -> None:
    with webserver.start(hello, "[::1]:0") as server:
        assert server.url == f"http://[::1]:{server.port}/"
        assert get(server.url + "six") == b"hello /six"


@pytest.mark.parametrize("listen", ["0.0.0.0:0", "[::]:0", "192.0.2.1:8787"])
def test_public_addresses_need_a_token(listen: str) -> None:
    with pytest.raises(ValueError, match="without a token"):
        webserver.start(hello, listen)


def test_a_public_address_is_served_when_the_app_requires_a_token() -> None:
    class Guarded:
        requires_token = True

        def __call__(self, environ: dict[str, Any], start_response: Any) -> list[bytes]:
            return hello(environ, start_response)

    with webserver.start(Guarded(), "0.0.0.0:0") as server:
        assert get(f"http://127.0.0.1:{server.port}/p") == b"hello /p"


@pytest.mark.parametrize("listen", ["nonsense", "127.0.0.1:99999", "::1:8787", ":8787"])
def test_bad_listen_values(listen: str) -> None:
    with pytest.raises(ValueError):
        webserver.start(hello, listen)


def test_a_port_in_use_is_a_config_error_naming_the_fix() -> None:
    with webserver.start(hello, "127.0.0.1:0") as warm:  # waitress's imports, thread pools
        get(warm.url)
    fds, threads = open_fds(), threading.active_count()
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError) as caught:
            webserver.start(hello, f"127.0.0.1:{port}")
    message = str(caught.value)
    assert f"127.0.0.1:{port}" in message and "already in use" in message
    assert "[http] listen" in message and "run --no-http" in message
    assert open_fds() == fds and threading.active_count() == threads  # nothing left running


def raw_exchange(server: webserver.Server, data: bytes) -> tuple[int, str, dict[str, Any]]:
    """Send bytes as they are; (status, Content-Type, JSON body) of the
    answer (the server closes the connection after an error)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(data)  # all of it is read: the server closes with FIN, not RST
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers["Content-Type"], json.loads(body)


@pytest.mark.parametrize("data, status, words", [
    (b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n", 400, "not valid HTTP"),
    (b"GET / HTTP/1.1\r\nHost: x\r\nBad Header Line\r\n\r\n", 400, "not valid HTTP"),
    # (the body is not sent: the server answers before reading it)
    (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n", 413,
     "takes no request body"),
    # exactly the limit, unfinished: the server has read every byte when it answers
    (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: ".ljust(webserver.MAX_REQUEST_HEADER_SIZE, b"x"),
     431, "headers are over 16 KiB"),
    (b"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 501,
     "does not implement"),
])
def test_errors_waitress_answers_itself_are_json(data: bytes, status: int, words: str) -> None:
    with webserver.start(hello, "127.0.0.1:0") as server:
        got, content_type, body = raw_exchange(server, data)
    assert (got, content_type) == (status, "application/json")
    assert body["status"] == status and body["error"] and words in body["message"]


def test_limits_on_headers_bodies_and_idle_connections() -> None:
    with webserver.start(hello, "127.0.0.1:0") as server:
        adj = server._server.adj
        assert (adj.channel_timeout, adj.max_request_body_size) == (
            webserver.CHANNEL_TIMEOUT, webserver.MAX_REQUEST_BODY_SIZE)
        assert adj.ident == "trafficthreshold" and not adj.expose_tracebacks
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        conn.request("GET", "/", headers={"X-Big": "x" * (webserver.MAX_REQUEST_HEADER_SIZE + 1)})
        assert conn.getresponse().status == 431
        conn.close()
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        conn.request("POST", "/", body=b"x" * (webserver.MAX_REQUEST_BODY_SIZE + 1))
        assert conn.getresponse().status == 413
        conn.close()


def test_stop_with_a_request_in_flight() -> None:
    entered = threading.Event()

    def slow(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        entered.set()
        time.sleep(0.5)
        return hello(environ, start_response)

    server = webserver.start(slow, "127.0.0.1:0")
    outcome: list[object] = []

    def client() -> None:
        try:
            outcome.append(get(server.url + "slow"))
        except (urllib.error.URLError, ConnectionError, http.client.HTTPException) as exc:
            outcome.append(exc)

    thread = threading.Thread(target=client)
    thread.start()
    assert entered.wait(5)
    started = time.monotonic()
    server.stop(timeout=3)
    assert time.monotonic() - started < 4
    thread.join(10)
    assert len(outcome) == 1  # an answer or a clean connection error, never a hang
    server.stop()  # a second stop does nothing


def test_start_stop_cycles_leave_no_descriptors_behind() -> None:
    with webserver.start(hello, "127.0.0.1:0") as warm:
        get(warm.url)
    before = open_fds()
    for _ in range(15):
        server = webserver.start(hello, "127.0.0.1:0")
        get(server.url)
        server.stop()
    assert open_fds() == before


def test_stop_after_the_loop_died_closes_everything(caplog, monkeypatch) -> None:
    """The event loop ending on an error leaves its listening socket and
    worker threads; stop() still closes them, and the port is free again."""
    with webserver.start(hello, "127.0.0.1:0") as warm:
        get(warm.url)
    before = open_fds()

    def broken_loop(self: Any) -> None:
        raise RuntimeError("the loop broke")

    monkeypatch.setattr(webserver.waitress.server.BaseWSGIServer, "run", broken_loop)
    server = webserver.start(hello, "127.0.0.1:0")
    server._thread.join(10)
    assert "stopped on an error" in caplog.text
    server.stop()
    with socket.create_server(("127.0.0.1", server.port)):
        pass
    assert open_fds() == before
    server.stop()  # a second stop does nothing

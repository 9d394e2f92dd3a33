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
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import pytest

from trafficthreshold import webserver


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


def test_a_port_in_use_is_an_oserror() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(OSError):
            webserver.start(hello, f"127.0.0.1:{port}")


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

"""Tests of trafficthreshold.notify over real AF_UNIX datagram sockets."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from trafficthreshold import notify


def _receiver(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(5)
    return sock


@pytest.fixture
def path_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, dict[str, str]]]:
    """A socket bound to a file; the env systemd would give."""
    address = str(tmp_path / "notify.sock")
    with _receiver(address) as sock:
        yield sock, {"NOTIFY_SOCKET": address}


@pytest.fixture
def abstract_socket() -> Iterator[tuple[socket.socket, dict[str, str]]]:
    """A socket in the abstract namespace, named with '@' as systemd does."""
    name = f"trafficthreshold-test-{os.getpid()}-{uuid.uuid4().hex}"
    with _receiver("\0" + name) as sock:
        yield sock, {"NOTIFY_SOCKET": "@" + name}


@pytest.mark.parametrize("fixture", ["path_socket", "abstract_socket"])
def test_every_helper_sends_its_assignment(fixture: str, request: pytest.FixtureRequest) -> None:
    sock, env = request.getfixturevalue(fixture)
    sent = [
        (notify.ready(env), b"READY=1"),
        (notify.watchdog(env), b"WATCHDOG=1"),
        (notify.status("rolled 12 keys", env), b"STATUS=rolled 12 keys"),
        (notify.status("level 0", env, watchdog=True), b"STATUS=level 0\nWATCHDOG=1"),
        (notify.reloading(123456789, env), b"RELOADING=1\nMONOTONIC_USEC=123456789"),
        (notify.stopping(env), b"STOPPING=1"),
        (notify.notify("EXTEND_TIMEOUT_USEC=5000000", env), b"EXTEND_TIMEOUT_USEC=5000000"),
    ]
    for ok, expected in sent:
        assert ok is True
        assert sock.recv(4096) == expected


def test_status_cannot_inject_another_assignment(
    path_socket: tuple[socket.socket, dict[str, str]],
) -> None:
    sock, env = path_socket
    assert notify.status("line one\nREADY=1", env)
    assert sock.recv(4096) == b"STATUS=line one READY=1"


def test_status_is_utf8(path_socket: tuple[socket.socket, dict[str, str]]) -> None:
    sock, env = path_socket
    assert notify.status("Zürich: level 2", env)
    assert sock.recv(4096) == "STATUS=Zürich: level 2".encode()


@pytest.mark.parametrize(
    "env", [{}, {"NOTIFY_SOCKET": ""}, {"NOTIFY_SOCKET": "@"}, {"NOTIFY_SOCKET": "vsock:2:1234"}]
)
def test_not_under_systemd_returns_false(env: dict[str, str]) -> None:
    assert notify.ready(env) is False
    assert notify.watchdog(env) is False


def test_nobody_listening_returns_false_silently(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    env = {"NOTIFY_SOCKET": str(tmp_path / "gone.sock")}
    assert notify.ready(env) is False
    assert all(record.levelname == "DEBUG" for record in caplog.records)


def test_uses_os_environ_by_default(
    monkeypatch: pytest.MonkeyPatch, path_socket: tuple[socket.socket, dict[str, str]]
) -> None:
    sock, env = path_socket
    monkeypatch.setenv("NOTIFY_SOCKET", env["NOTIFY_SOCKET"])
    # The default argument is the os.environ mapping itself, read at call time.
    assert notify.ready()
    assert sock.recv(4096) == b"READY=1"


@pytest.mark.parametrize(
    "env, pid, expected",
    [
        ({}, 42, None),
        ({"WATCHDOG_USEC": "30000000"}, 42, 30.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "42"}, 42, 30.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "43"}, 42, None),
        ({"WATCHDOG_USEC": "500000"}, 42, 0.5),
        ({"WATCHDOG_USEC": "0"}, 42, None),
        ({"WATCHDOG_USEC": "thirty"}, 42, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "x"}, 42, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], pid: int, expected: float | None) -> None:
    assert notify.watchdog_interval(env, pid=pid) == expected


def test_watchdog_interval_defaults_to_this_process() -> None:
    env = {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}
    assert notify.watchdog_interval(env) == 2.0

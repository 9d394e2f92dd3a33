"""A real redis-server for the tests, on a free loopback port with its own
data directory (the ``redis_server`` fixture in conftest.py)."""
from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

redis = pytest.importorskip("redis")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A real redis-server on a free loopback port, append-only, fsync
    always (``fsync="everysec"``: for tests of the farm's one-second
    cadence, where an fsync per write on a busy disk can stall Redis past
    the farm thread's 0.5 s timeout; Redis writes the AOF before it
    answers in both modes, so a SIGKILLed redis-server loses nothing)."""

    def __init__(self, workdir: Path, fsync: str = "always") -> None:
        self.dir, self.port, self.fsync = workdir, free_port(), fsync
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not installed (apt-get install redis-server)")
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
             "--appendonly", "yes", "--appendfsync", self.fsync, "--save", ""],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=2)

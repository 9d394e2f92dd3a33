"""hello.raw_app behind a gate, to SIGKILL a gunicorn worker at a known instant.

``GET /park`` closes the gate of the worker process that receives it: new
requests of that process wait at the gate (before the application, so
before the middleware can count them), and the park request waits until no
request of the process is between the gate and the end of its response
(``close()`` of the body iterable, which the server calls after the last
byte was written).  It then writes the process's pid to
``$TT_PARK_DIR/<pid>`` and sleeps until it is killed.

So when the test kills that pid, every request of the process has either
been answered completely (and counted) or not yet reached the middleware's
count (and fails at the client): no response is between its count and
its delivery.  See tests/test_gunicorn.py for why this matters.
"""
from __future__ import annotations

import os
import threading
import time

from trafficthreshold.wsgi import TrafficThreshold

from apps.hello import raw_app


class _Closing:
    """The body of a passed request; ``close()`` lets the gate know."""

    def __init__(self, body, done) -> None:
        self.body, self.done = body, done

    def __iter__(self):
        return iter(self.body)

    def close(self) -> None:
        done, self.done = self.done, None
        try:
            if hasattr(self.body, "close"):
                self.body.close()
        finally:
            if done is not None:
                done()


class Gate:
    def __init__(self, app) -> None:
        self.app = app
        self.cond = threading.Condition()
        self.closed = False
        self.inflight = 0

    def __call__(self, environ, start_response):
        if environ.get("PATH_INFO") == "/park":
            self.park()
        with self.cond:
            while self.closed:
                self.cond.wait()
            self.inflight += 1
        try:
            body = self.app(environ, start_response)
        except BaseException:
            self.leave()
            raise
        return _Closing(body, self.leave)

    def leave(self) -> None:
        with self.cond:
            self.inflight -= 1
            self.cond.notify_all()

    def park(self) -> None:
        with self.cond:
            self.closed = True
            while self.inflight:
                self.cond.wait()
        directory = os.environ["TT_PARK_DIR"]
        tmp = os.path.join(directory, f".{os.getpid()}")
        with open(tmp, "w") as f:
            f.write(str(os.getpid()))
        os.rename(tmp, os.path.join(directory, str(os.getpid())))
        while True:  # until SIGKILL
            time.sleep(1)


app = TrafficThreshold(Gate(raw_app), account=os.environ.get("TT_TEST_ACCOUNT") or None)

"""A page served through the server's ``wsgi.file_wrapper``, for a real
uWSGI (tests/test_wsgi.py): uWSGI's file_wrapper is a function, not a
class; it returns the very file object it was given and sends it with
sendfile() when the application returns that object.

``TT_FILE`` is the page; ``TT_MARKS`` a directory where each request
leaves what happened to its file: ``close-<pid>-<n>`` when close() was
called, ``read-<pid>-<n>`` when the body was read through Python (the
server iterated it instead of sending the file).
"""
from __future__ import annotations

import io
import itertools
import os

from trafficthreshold.wsgi import TrafficThreshold

_requests = itertools.count()


class Page(io.FileIO):
    """The page file, leaving marks of close() and of reads."""

    def __init__(self, path: str, n: int) -> None:
        super().__init__(path, "rb")
        self.n = n

    def _mark(self, what: str) -> None:
        with open(os.path.join(os.environ["TT_MARKS"], f"{what}-{os.getpid()}-{self.n}"), "a"):
            pass

    def read(self, *args):  # noqa: ANN001, ANN201
        self._mark("read")
        return super().read(*args)

    def readinto(self, b):  # noqa: ANN001, ANN201
        self._mark("read")
        return super().readinto(b)

    def __next__(self):  # noqa: ANN204
        self._mark("read")
        return super().__next__()

    def close(self) -> None:
        if not self.closed:
            self._mark("close")
        super().close()


def _fails(start_response):  # noqa: ANN001, ANN202
    """A generator body that raises before its first byte (a 500)."""
    start_response("200 OK", [("Content-Type", "text/html; charset=utf-8")])
    raise RuntimeError("the page failed")
    yield b""  # pragma: no cover - a generator


class ReadOnly:
    """A file-like object with read() and close() only (no fileno, not
    iterable): what PEP 3333 lets an application hand to
    wsgi.file_wrapper; uWSGI's returns it and reads it with read()."""

    def __init__(self, data: bytes) -> None:
        self._f = io.BytesIO(data)

    def read(self, *args):  # noqa: ANN001, ANN201
        return self._f.read(*args)

    def close(self) -> None:
        self._f.close()


def _other_file_like(environ, start_response, path: str):  # noqa: ANN001, ANN202
    """/readonly: a ReadOnly; /bytesio: an io.BytesIO (its fileno raises)."""
    with open(os.environ["TT_FILE"], "rb") as f:
        data = f.read()
    start_response("200 OK", [("Content-Type", "text/html; charset=utf-8"),
                              ("Content-Length", str(len(data)))])
    body = ReadOnly(data) if path == "/readonly" else io.BytesIO(data)
    return environ["wsgi.file_wrapper"](body, 65536)


def raw_app(environ, start_response):  # noqa: ANN001, ANN201
    if environ.get("PATH_INFO") == "/fails":
        return _fails(start_response)
    if environ.get("PATH_INFO") in ("/readonly", "/bytesio"):
        return _other_file_like(environ, start_response, environ["PATH_INFO"])
    page = Page(os.environ["TT_FILE"], next(_requests))
    start_response("200 OK", [("Content-Type", "text/html; charset=utf-8"),
                              ("Content-Length", str(os.fstat(page.fileno()).st_size))])
    return environ["wsgi.file_wrapper"](page, 65536)


app = TrafficThreshold(raw_app)

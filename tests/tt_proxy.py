"""A small TCP proxy for the tests: put it between a supervisor and Redis,
then cut the host off (``stop()``: the listener closes and every open
connection is reset) and let it back in (``start()``: the same port again).

Threads, no asyncio: one accept thread, two pump threads per connection.
Nothing is buffered beyond one ``recv``: what the proxy forwards is what the
client sent, in order.

    proxy = TcpProxy(redis_server.port)   # listening at once
    url = f"redis://127.0.0.1:{proxy.port}/0"
    ...
    proxy.stop()      # the host is cut off: connects refused, sockets reset
    proxy.start()     # back, on the same port
    proxy.close()     # at the end of the test (stop() without restart)

``hold()`` is the other kind of outage: connections stay open but nothing
is forwarded (a Redis that hangs, a network that drops packets), until
``release()``.  ``drop_replies()`` loses replies: what the client sends
still reaches Redis (a script runs), what Redis answers is thrown away
(the client times out), until ``pass_replies()``.
"""
from __future__ import annotations

import socket
import struct
import threading
import time

from tt_redis import free_port


class TcpProxy:
    """Forward 127.0.0.1:``port`` to 127.0.0.1:``target``; see the module
    docstring.  Thread-safe: ``_lock`` guards the listener and the list of
    open connections."""

    def __init__(self, target: int, *, port: int | None = None, host: str = "127.0.0.1") -> None:
        self.target, self.host = target, host
        self.port = free_port() if port is None else port
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._flowing = threading.Event()
        self._flowing.set()
        self._dropping = False
        self._pass_first = 0
        self.dropped = 0  # replies thrown away (chunks of them)
        self.accepted = 0
        self.start()

    # ------------------------------------------------------------ control

    @property
    def running(self) -> bool:
        return self._listener is not None

    def start(self) -> None:
        """Listen (again) on ``port``; idempotent."""
        with self._lock:
            if self._listener is not None:
                return
            listener = socket.socket()
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            deadline = time.monotonic() + 5
            while True:  # the old listener's port may linger a moment
                try:
                    listener.bind((self.host, self.port))
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        listener.close()
                        raise
                    time.sleep(0.05)
            listener.listen(64)
            self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True,
                         name=f"tt-proxy-{self.port}").start()

    def stop(self) -> None:
        """Cut off: stop listening and reset every open connection (RST, so
        the client sees a connection error at once, not a hang)."""
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, []
        if listener is not None:
            _close(listener)
        for conn in conns:
            _reset(conn)

    def hold(self) -> None:
        """Keep the connections open but forward nothing until release()."""
        self._flowing.clear()

    def release(self) -> None:
        self._flowing.set()

    def drop_replies(self, after: int = 0) -> None:
        """Forward requests, throw the replies away until pass_replies();
        with ``after``, first pass that many more replies (chunks of them:
        one per call for a client that waits for each reply)."""
        self._pass_first = after
        self._dropping = True

    def pass_replies(self) -> None:
        self._dropping = False

    def close(self) -> None:
        self.release()
        self.stop()

    def __enter__(self) -> "TcpProxy":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ threads

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # stopped
            try:
                upstream = socket.create_connection((self.host, self.target), timeout=5)
                upstream.settimeout(None)
            except OSError:
                _reset(client)
                continue
            with self._lock:
                if self._listener is not listener:  # stopped meanwhile
                    _reset(client)
                    _reset(upstream)
                    return
                self._conns += [client, upstream]
                self.accepted += 1
            for src, dst, replies in ((client, upstream, False), (upstream, client, True)):
                threading.Thread(target=self._pump, args=(src, dst, replies),
                                 daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, replies: bool = False) -> None:
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            if not data:
                break
            self._flowing.wait()
            if replies and self._dropping:
                if self._pass_first <= 0:
                    self.dropped += 1
                    continue
                self._pass_first -= 1
            try:
                dst.sendall(data)
            except OSError:
                break
        _close(src)
        _close(dst)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


def _reset(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0): the peer gets ECONNRESET at once."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()

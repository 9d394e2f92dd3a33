"""A bare ASGI application (lifespan, http, websocket) wrapped by
:class:`trafficthreshold.asgi.TrafficThreshold` (``account`` from
``TT_TEST_ACCOUNT``: ``host`` or unset for the total only)::

    uvicorn --app-dir tests apps.asgi_app:app

Paths: ``/static/...`` a stylesheet, ``/healthz`` plain text, ``/api``
JSON, ``/stream`` an HTML page in three body messages, ``/level`` the level
from ``scope["state"]``, anything else an HTML hello page.
"""
from __future__ import annotations

import os

from trafficthreshold.asgi import TrafficThreshold

PAGE = b"<!doctype html><title>hello</title><p>Hello, world!</p>\n"
HTML = b"text/html; charset=utf-8"


async def _answer(send, content_type: bytes, body: bytes, status: int = 200) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def lifespan(receive, send) -> None:
    """Answer uvicorn's lifespan messages until shutdown."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def raw_app(scope, receive, send) -> None:
    if scope["type"] == "lifespan":
        return await lifespan(receive, send)
    if scope["type"] == "websocket":
        await receive()
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.close"})
        return
    path = scope["path"]
    if path.startswith("/static/"):
        await _answer(send, b"text/css", b"body { color: #222; }\n")
    elif path == "/healthz":
        await _answer(send, b"text/plain", b"ok\n")
    elif path == "/api":
        await _answer(send, b"application/json", b'{"hello": "world"}\n')
    elif path == "/level":
        level = scope.get("state", {}).get("trafficthreshold_level")
        await _answer(send, HTML, f"<p>level {level}</p>\n".encode())
    elif path == "/stream":
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", HTML)]})
        for i in range(3):
            await send({"type": "http.response.body", "body": f"<p>{i}</p>".encode(),
                        "more_body": i < 2})
    else:
        await _answer(send, HTML, PAGE)


app = TrafficThreshold(raw_app, account=os.environ.get("TT_TEST_ACCOUNT") or None)

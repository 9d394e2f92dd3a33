"""A Flask application with the middleware around ``app.wsgi_app`` (the
recipe of docs/webapps.rst)."""
from __future__ import annotations

from flask import Flask, Response, jsonify, redirect, request, stream_with_context

from trafficthreshold.wsgi import TrafficThreshold

app = Flask(__name__)  # static files: tests/apps/static/, at /static/
app.wsgi_app = TrafficThreshold(app.wsgi_app, account="host")


@app.route("/")
def home():
    level = request.environ["trafficthreshold.level"]
    extra = "" if level >= 2 else "<aside>optional block</aside>"
    return f"<!doctype html><title>home</title><p>level {level}</p>{extra}"


@app.route("/api/data")
def data():
    return jsonify(hello="world")


@app.route("/go")
def go():
    return redirect("/")


@app.route("/missing")
def missing():
    return "<p>not here</p>", 404


@app.route("/boom")
def boom():
    raise RuntimeError("boom")


@app.route("/stream")
def stream():
    def chunks():
        for i in range(3):
            yield f"<p>chunk {i}</p>"
    return Response(stream_with_context(chunks()), mimetype="text/html")


@app.route("/stream-fails")
def stream_fails():
    """A streamed page whose generator raises before its first chunk: the
    server answers 500 (docs/webapps.rst, "When": not counted)."""
    def chunks():
        raise RuntimeError("the template failed")
        yield ""  # pragma: no cover
    return Response(stream_with_context(chunks()), mimetype="text/html")

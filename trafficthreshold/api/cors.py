"""CORS for the stats API: which web pages may read it from a browser.

``[http] cors_origins`` lists exact origins (``https://dash.example.com``,
lower-cased by the configuration) and maybe ``"*"``.  Pure functions of
that set and the request's WSGI environ; :mod:`trafficthreshold.api` adds
what they return to its answers.  docs/api.rst, "Browsers: CORS", says
what a browser sees.
"""

from __future__ import annotations

from collections.abc import Mapping, Set
from typing import Any

#: How long a browser may keep a preflight's answer (seconds).
MAX_AGE = 600
#: What a page may ask for: a GET (HEAD needs no preflight) with the token.
METHODS = ("GET", "HEAD")


def allowed_origin(origins: Set[str], environ: Mapping[str, Any]) -> str | None:
    """The ``Access-Control-Allow-Origin`` value for the request's Origin:
    the origin itself when listed (compared lower-cased, as configured),
    ``*`` when ``"*"`` is listed, else None (also without an Origin)."""
    origin = environ.get("HTTP_ORIGIN")
    if not origin:
        return None
    if origin.lower() in origins:
        return origin
    return "*" if "*" in origins else None


def headers(origins: Set[str], environ: Mapping[str, Any]) -> list[tuple[str, str]]:
    """For every answer once origins are configured: ``Vary: Origin`` (the
    answer depends on it, caches must know), plus
    ``Access-Control-Allow-Origin`` for an allowed origin.  Nothing when
    ``origins`` is empty."""
    if not origins:
        return []
    allowed = allowed_origin(origins, environ)
    found = [("Vary", "Origin")]
    if allowed is not None:
        found.append(("Access-Control-Allow-Origin", allowed))
    return found


def preflight(origins: Set[str], environ: Mapping[str, Any]) -> list[tuple[str, str]] | None:
    """The headers of the 204 answering a preflight (an OPTIONS from an
    allowed origin asking for GET or HEAD), or None when the request is
    not one: the app then refuses it like any other OPTIONS."""
    asked = environ.get("HTTP_ACCESS_CONTROL_REQUEST_METHOD", "")
    if environ.get("REQUEST_METHOD") != "OPTIONS" or asked not in METHODS \
            or allowed_origin(origins, environ) is None:
        return None
    return [
        *headers(origins, environ),
        ("Access-Control-Allow-Methods", "GET"),
        ("Access-Control-Allow-Headers", "Authorization"),
        ("Access-Control-Max-Age", str(MAX_AGE)),
    ]

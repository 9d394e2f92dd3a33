"""The stats API: the WSGI app and what it serves.

* :mod:`.app`: the WSGI app (:class:`~.app.StatsApp`, :func:`~.app.make_app`,
  ``application``): routing, auth, the JSON resources, /metrics, the
  dashboard page, the store it reads (:func:`trafficthreshold.store.open_reader`).
* :mod:`.server`: the threaded HTTP server the daemon runs it on (waitress).
* :mod:`.dashboard`: the dashboard page's numbers (fed by the app).
* :mod:`.metrics`: the Prometheus text format and its numbers.
* :mod:`.openapi`: the OpenAPI document of the routes.
* :mod:`.cors`: the CORS answers for ``[http] cors_origins``.

``trafficthreshold.api:application`` (for WSGI servers), ``make_app`` and
every other name of :mod:`.app` are read from here as before; importing
this package alone loads none of them (the renderers import no app).
"""
from __future__ import annotations

from typing import Any

_SUBMODULES = frozenset({"app", "server", "dashboard", "metrics", "openapi", "cors"})


def __getattr__(name: str) -> Any:
    """The names of :mod:`.app` (``application``, ``make_app``, ...),
    loaded on first use."""
    if name.startswith("__") or name in _SUBMODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from trafficthreshold.api import app

    return getattr(app, name)

"""tests/apps/asgi_app.py's ASGI application wrapped with unique visitors
on (``uniques=True``, ``account="host"`` for any host, the day's zone from
``TT_TEST_TIMEZONE``; unset: the system's).  Served by tests/test_asgi.py::

    uvicorn --app-dir tests apps.asgi_uniques:app
"""
from __future__ import annotations

import os

from trafficthreshold.asgi import TrafficThreshold

from apps.asgi_app import raw_app

app = TrafficThreshold(raw_app, account="host", allowed_hosts=["*"], uniques=True,
                       timezone=os.environ.get("TT_TEST_TIMEZONE") or None)

"""tests/apps/hello.py's application wrapped with ``account="host"`` and an
allow-list (``allowed_hosts`` from ``TT_TEST_ALLOWED_HOSTS``, comma-separated;
unset: ``site.example,.example.org``), as docs/webapps.rst recommends; for
benchmarks/bench_middleware_instructions.py (``--allowed-hosts``)::

    gunicorn --chdir tests apps.hello_hosts:app
"""
from __future__ import annotations

import os

from trafficthreshold.wsgi import TrafficThreshold

from apps.hello import raw_app

ALLOWED_HOSTS = (os.environ.get("TT_TEST_ALLOWED_HOSTS") or "site.example,.example.org").split(",")

app = TrafficThreshold(raw_app, account="host", allowed_hosts=ALLOWED_HOSTS)

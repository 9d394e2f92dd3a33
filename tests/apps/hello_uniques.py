"""tests/apps/hello.py's hello-world application wrapped with unique
visitors on (``uniques=True``): ``account`` from ``TT_TEST_ACCOUNT``
(``host`` or unset), the day's zone from ``TT_TEST_TIMEZONE`` (unset: the
system's).  Served by tests/test_gunicorn.py and
benchmarks/bench_middleware_instructions.py::

    gunicorn --chdir tests apps.hello_uniques:app
"""
from __future__ import annotations

import os

from trafficthreshold.wsgi import TrafficThreshold

from apps.hello import raw_app

app = TrafficThreshold(raw_app, account=os.environ.get("TT_TEST_ACCOUNT") or None,
                       allowed_hosts=["*"] if os.environ.get("TT_TEST_ACCOUNT") else None,
                       uniques=True, timezone=os.environ.get("TT_TEST_TIMEZONE") or None)

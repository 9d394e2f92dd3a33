"""tests/apps/django_app.py's Django project with unique visitors on
(``TRAFFICTHRESHOLD["uniques"] = True``, the day's zone from
``TT_TEST_TIMEZONE``; unset: the system's)::

    gunicorn --chdir tests apps.django_uniques:application
"""
from __future__ import annotations

import os

from django.conf import settings
from django.core.handlers.wsgi import WSGIHandler

import apps.django_app  # noqa: F401  # configures Django

settings.TRAFFICTHRESHOLD = {"account": "host", "uniques": True,
                             "timezone": os.environ.get("TT_TEST_TIMEZONE") or None}
application = WSGIHandler()  # loads the middleware with the setting above

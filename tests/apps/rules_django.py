"""Django views answering as the request asks (``apps.rules_app.Asked``:
``status``, ``type``), for ``override_settings(ROOT_URLCONF=
"apps.rules_django")``.  A 304 is Django's own ``HttpResponseNotModified``
(which drops Content-Type) unless ``type`` is given."""
from __future__ import annotations

from apps import django_app  # noqa: F401  (configures Django)

from django.http import HttpResponse, HttpResponseNotModified  # noqa: E402
from django.urls import re_path  # noqa: E402

from apps.rules_app import Asked  # noqa: E402


def answer(request):
    asked = Asked(request.META.get("QUERY_STRING", ""))
    if asked.status == 304 and "type=" not in request.META.get("QUERY_STRING", ""):
        return HttpResponseNotModified()
    response = HttpResponse(asked.body(asked.status), status=asked.status)
    del response["Content-Type"]
    for name, value in asked.headers + asked.location(asked.status):
        response[name] = value
    return response


urlpatterns = [re_path(r"", answer)]

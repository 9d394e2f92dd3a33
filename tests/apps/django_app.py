"""A one-file Django project with the middleware first in MIDDLEWARE.

Importing it configures Django (unless already configured)::

    gunicorn --chdir tests apps.django_app:application

Views: ``/`` an HTML page showing ``request.trafficthreshold_level`` (and
through the context processor), ``/api`` JSON, ``/go`` a redirect,
``/stream`` a streaming HTML page (``/stream-fails`` one that raises
before its first chunk, ``/stream-empty`` an empty one, ``/async-stream``
an async one), ``/async`` an async view,
``/assets/app.html`` an HTML page under STATIC_URL, ``/boom`` an error.
"""
from __future__ import annotations

import django
from django.conf import settings

if not settings.configured:
    settings.configure(
        DEBUG=False,
        SECRET_KEY="trafficthreshold-tests",
        ALLOWED_HOSTS=["site-a.example", "site-b.example", "testserver", "127.0.0.1",
                       "localhost"],
        ROOT_URLCONF=__name__,
        MIDDLEWARE=["trafficthreshold.django.TrafficThresholdMiddleware",
                    "django.middleware.common.CommonMiddleware"],
        INSTALLED_APPS=[],
        STATIC_URL="assets/",
        USE_TZ=True,
        TRAFFICTHRESHOLD={"account": "host"},
        TEMPLATES=[{
            "BACKEND": "django.template.backends.django.DjangoTemplates",
            "OPTIONS": {"context_processors": [
                "trafficthreshold.django.context_processor"]},
        }],
        LOGGING_CONFIG=None,
    )
    django.setup()

from django.core.wsgi import get_wsgi_application  # noqa: E402
from django.http import HttpResponse, JsonResponse, StreamingHttpResponse  # noqa: E402
from django.shortcuts import redirect  # noqa: E402
from django.template import engines  # noqa: E402
from django.urls import path  # noqa: E402

PAGE = ("<!doctype html><title>home</title><p>level {{ trafficthreshold_level }}</p>"
        "{% if trafficthreshold_level < 2 %}<aside>optional</aside>{% endif %}")


def home(request):
    template = engines["django"].from_string(PAGE)
    response = HttpResponse(template.render({}, request))
    response["X-Level"] = str(request.trafficthreshold_level)
    return response


def api(request):
    return JsonResponse({"hello": "world"})


def go(request):
    return redirect("/")


def stream(request):
    return StreamingHttpResponse((f"<p>{i}</p>" for i in range(3)), content_type="text/html")


def stream_fails(request):
    """A streaming page whose content raises before its first chunk: the
    server answers 500."""
    def content():
        raise RuntimeError("the stream failed")
        yield "<p>never</p>"  # pragma: no cover
    return StreamingHttpResponse(content(), content_type="text/html")


def stream_empty(request):
    """A streaming page whose content is empty: a page (its headers go out
    at the end of the stream)."""
    return StreamingHttpResponse(iter(()), content_type="text/html")


async def async_stream(request):
    """An async streaming page; ``?fail`` raises before its first chunk."""
    async def content():
        if "fail" in request.GET:
            raise RuntimeError("the stream failed")
        for i in range(2):
            yield f"<p>{i}</p>"
    return StreamingHttpResponse(content(), content_type="text/html")


async def async_view(request):
    return HttpResponse(f"<p>async level {request.trafficthreshold_level}</p>")


def asset(request):
    return HttpResponse("<p>an HTML file under STATIC_URL</p>")


def boom(request):
    raise RuntimeError("boom")


def section_account(request):
    """An account function for TRAFFICTHRESHOLD["account"] (by dotted path)."""
    return request.path_info.strip("/").split("/")[0] or "home"


def count_api_only(info):
    """A count_if for TRAFFICTHRESHOLD["count_if"] (by dotted path)."""
    return info.path == "/api"


urlpatterns = [
    path("", home),
    path("api", api),
    path("go", go),
    path("stream", stream),
    path("stream-fails", stream_fails),
    path("stream-empty", stream_empty),
    path("async-stream", async_stream),
    path("async", async_view),
    path("assets/app.html", asset),
    path("boom", boom),
]

application = get_wsgi_application()

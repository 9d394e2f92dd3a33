"""Tests of trafficthreshold.openapi: the document at /api/openapi.json
names every route, and schemathesis, driven by it against a live server,
finds no 500 and no response that does not match it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

from apps.harness import NOW, fetch_json, start_live
from trafficthreshold import segment, webserver


def test_openapi_document_describes_every_route(no_segment: webserver.Server) -> None:
    status, doc = fetch_json(no_segment.url + "api/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.")
    assert set(doc["paths"]) == {
        "/api/stats/track/{account}/{event}/{year}",
        "/api/stats/track/{account}/{event}/{year}/{month}",
        "/api/stats/track/{account}/{event}/{year}/{month}/{day}",
        "/api/stats/track/{account}/{event}/{year}/{month}/{day}/{hour}",
        "/api/stats/live", "/metrics", "/api/openapi.json", "/",
    }


@pytest.fixture
def api_schema(key: int, db: str, serve: Callable[..., webserver.Server]) -> Any:
    """The schema of a live server (one backend: the HTTP layer is the same)."""
    import schemathesis

    segment.install(key, "sysv", now=NOW)
    server, _ = start_live(key, "sysv", db, serve)
    return schemathesis.openapi.from_url(server.url + "api/openapi.json")


def _schema() -> Any:
    import schemathesis

    return schemathesis.pytest.from_fixture("api_schema")


schema = _schema()


@schema.parametrize()
@settings(max_examples=8, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_schemathesis_finds_no_500s_and_responses_conform(case: Any) -> None:
    case.call_and_validate()

"""Tests of trafficthreshold.openapi: the document at /api/openapi.json
names every route, and schemathesis, driven by it against a live server,
finds no 500 and no response that does not match it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, given, settings

from apps.harness import NOW, fetch_json, make_config, start_live
from trafficthreshold import api, segment
from trafficthreshold.api import server as webserver
from trafficthreshold.config import HttpConfig


def test_openapi_document_describes_every_route(no_segment: webserver.Server) -> None:
    status, doc = fetch_json(no_segment.url + "api/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.")
    assert set(doc["paths"]) == {
        "/api/stats", "/api/stats/track", "/api/stats/track/{account}",
        "/api/stats/track/{account}/{event}",
        "/api/stats/track/{account}/{event}/{year}",
        "/api/stats/track/{account}/{event}/{year}/{month}",
        "/api/stats/track/{account}/{event}/{year}/{month}/{day}",
        "/api/stats/track/{account}/{event}/{year}/{month}/{day}/{hour}",
        "/api/stats/funnels", "/api/stats/funnels/{account}",
        "/api/stats/funnels/{account}/{event}",
        "/api/stats/funnels/{account}/{event}/{year}",
        "/api/stats/funnels/{account}/{event}/{year}/{month}",
        "/api/stats/live", "/metrics", "/api/openapi.json", "/",
    }


def test_the_document_follows_the_prefix(db: str, serve: Callable[..., webserver.Server]) -> None:
    config = make_config(db, http=HttpConfig(prefix="/stats"))
    server = serve(api.make_app(config, counter_factory=lambda: None, now=lambda: NOW))
    status, doc = fetch_json(server.url + "api/openapi.json")
    assert status == 200
    default = api.openapi_document()["paths"]
    assert set(doc["paths"]) == {path if path in ("/", "/metrics", "/api/openapi.json")
                                 else path.replace("/api/stats", "/stats", 1)
                                 for path in default}
    assert "/stats/live" in doc["paths"] and len(doc["paths"]) == len(default) == 17


def test_schemathesis_finds_no_500s_and_responses_conform(
        key: int, db: str, serve: Callable[..., webserver.Server]) -> None:
    """Every operation of the live server's own document, driven by
    schemathesis's generated cases: no 500, every response conforms.

    Driven through schemathesis's library API (operation strategies under
    hypothesis), not its pytest plugin, whose fixture loader breaks with each
    pytest release that changes pytest's internals (pytest 9.2 did)."""
    import schemathesis

    segment.install(key, "sysv", now=NOW)
    server, _ = start_live(key, "sysv", db, serve)
    _, doc = fetch_json(server.url + "api/openapi.json")
    schema = schemathesis.openapi.from_dict(doc)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} == {f"GET {path}" for path in doc["paths"]}

    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=8, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def check(case: Any) -> None:
            case.call_and_validate(base_url=server.url.rstrip("/"))

        check()


def test_the_name_rules_say_every_character_a_path_name_is_refused_for(
        no_segment: webserver.Server) -> None:
    """Each name the API answers 404 for, whatever the store holds, is
    named in the OpenAPI document's name rules and in docs/api.rst's 404 row."""
    import json
    import urllib.parse
    from pathlib import Path

    from apps.harness import fetch
    docs = " ".join((Path(__file__).parent.parent / "docs" / "api.rst").read_text().split())
    row = docs[docs.index("404 an unknown path"):docs.index("405 any method")]
    _, _, document = fetch(no_segment.url + "api/openapi.json")
    text = json.loads(document)["paths"]["/api/stats/track/{account}/{event}/{year}"]["get"]
    rules = " ".join(p["description"] for p in text["parameters"] if p["name"] == "account")
    for name, said in [("a:b", "':'"), ("a\\b", "'\\'"), ("..", "'..'"), ("~x", "'~'")]:
        status, _, _ = fetch(no_segment.url + "api/stats/track/" + urllib.parse.quote(name, safe="")
                             + "/pageview/2026")
        assert status == 404, name
        assert said in rules, (name, rules)
        assert f"``{said.strip(chr(39))}``" in row, (name, row)

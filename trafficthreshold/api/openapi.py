"""The OpenAPI 3 document of the stats API, generated in code (served at
``/api/openapi.json``; schemathesis checks the app against it)."""

from __future__ import annotations

from typing import Any

from trafficthreshold import names
from trafficthreshold.live import LIVE_MINUTES

JSON_TYPE = "application/json"


def _error_ref(description: str) -> dict[str, Any]:
    return {"description": description,
            "content": {JSON_TYPE: {"schema": {"$ref": "#/components/schemas/Error"}}}}


NAME_RULES = ("at most {0} UTF-8 bytes, no control characters, no '/', ':' or '\\', "
              "not '.' or '..', no leading '~' "
              "(except the overflow key ~overflow/~any); other names are 404")


def _name_param(name: str, max_bytes: int, description: str,
                where: str = "path") -> dict[str, Any]:
    """An account or event name, in the path (required) or the query."""
    return {"name": name, "in": where, "required": where == "path",
            "description": f"{description}: {NAME_RULES.format(max_bytes)}",
            "schema": {"type": "string", "minLength": 1, "maxLength": max_bytes}}


def _int_param(name: str, low: int, high: int) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True,
            "schema": {"type": "integer", "minimum": low, "maximum": high}}


#: The 503 of every route that reads the period store.
_STORE_DOWN = ("the database does not exist yet, is locked or is damaged "
               "(the message says what to do)")


def _period_operation(depth: int, example_event: str, summary: str, op_id: str,
                      description: str, schema: str, bad_date: str) -> dict[str, Any]:
    """A route of one period's counts (track or funnel): the key's names
    and the date's first ``1 + depth`` parts as path parameters."""
    params = [
        _name_param("account", names.ACCOUNT_MAX, "an account, or `all` for the total"),
        _name_param("event", names.EVENT_MAX, f"an event such as `{example_event}`"),
        _int_param("year", 1, 9999),
        _int_param("month", 1, 12), _int_param("day", 1, 31), _int_param("hour", 0, 23),
    ][: 3 + depth]
    return {"get": {
        "summary": summary,
        "operationId": op_id,
        "parameters": params,
        "responses": {
            "200": {"description": description,
                    "content": {JSON_TYPE: {"schema": {"$ref": f"#/components/schemas/{schema}"}}}},
            "400": _error_ref(f"the date does not exist ({bad_date})"),
            "404": _error_ref("the account or event name is not valid"),
            "503": _error_ref(_STORE_DOWN),
            "default": _error_ref("an error"),
        },
    }}


def _track_operation(depth: int) -> dict[str, Any]:
    children = ("months", "days", "hours", "minutes")[depth]
    return _period_operation(
        depth, "pageview", f"Counts of one period by its {children}",
        "track" + ("Year", "Month", "Day", "Hour")[depth],
        f"the period's {children}, zero-filled", "Track", "February 30, month 13")


def _plain_operation(summary: str, op_id: str, content_type: str, schema: dict[str, Any],
                     params: list[dict[str, Any]] | None = None,
                     extra: dict[str, Any] | None = None) -> dict[str, Any]:
    responses = {"200": {"description": summary, "content": {content_type: {"schema": schema}}},
                 **(extra or {}), "default": _error_ref("an error")}
    return {"get": {"summary": summary, "operationId": op_id, "parameters": params or [],
                    "responses": responses}}


def _funnel_operation(depth: int) -> dict[str, Any]:
    """A funnel: the counts per status of an event in a year or a month."""
    period = ("year", "month")[depth]
    return _period_operation(
        depth, "order", f"Counts per status of an event in one {period} (Bootic's order funnels)",
        "funnel" + period.capitalize(), f"the {period}'s count of each status counted in it",
        "Funnel", "month 13, year 0")


def _keys_operation(depth: int, chart: str = "track") -> dict[str, Any]:
    """The discovery routes: accounts, an account's events, a key's years."""
    params = [_name_param("account", names.ACCOUNT_MAX, "an account, `all` for the total"),
              _name_param("event", names.EVENT_MAX, "an event such as `pageview`")][:depth]
    children = ("accounts", "events of the account", "years of the account's event")[depth]
    extra = {} if depth == 0 else {
        "404": _error_ref("the name is not valid, or nothing is stored for it")}
    op_id = ("accounts", "events", "years")[depth]
    if chart != "track":
        op_id = chart[:-1] + op_id.capitalize()  # funnelAccounts ...
    return _plain_operation(
        f"Links to the {children} that have {chart} counts", op_id,
        JSON_TYPE, {"$ref": "#/components/schemas/Links"}, params,
        {**extra, "503": _error_ref(_STORE_DOWN)})


def openapi_document(prefix: str = "/api/stats", farm: bool = True) -> dict[str, Any]:
    """The OpenAPI 3.0 description served at /api/openapi.json; the stats
    routes under ``prefix`` (``[http] prefix``).  ``farm``: the app reads
    the farm's Redis, so ``/live`` takes ``scope=farm`` (a host with a
    SQLite store answers it with a 400, and its document lists only
    ``host``)."""
    from trafficthreshold import __version__

    count = {"type": "integer", "minimum": 0}
    nullable_int = {"type": "integer", "nullable": True}
    schemas = {
        "Error": {"type": "object", "required": ["status", "error", "message"], "properties": {
            "status": {"type": "integer"}, "error": {"type": "string"},
            "message": {"type": "string"}}},
        "Track": {"type": "object", "required": [
            "type", "account", "event", "year", "month", "day", "hour", "data", "total", "links"],
            "properties": {
                "type": {"type": "string", "enum": ["track"]},
                "account": {"type": "string"}, "event": {"type": "string"},
                "year": {"type": "integer"}, "month": nullable_int, "day": nullable_int,
                "hour": nullable_int,
                "data": {"type": "object", "additionalProperties": count,
                         "description": "segment (month, day, hour or minute) -> count, "
                                        "every segment, in numeric order"},
                "total": count,
                "links": {"type": "array", "items": {"type": "string"},
                          "description": "URLs of the child periods that hold counts"}}},
        "Funnel": {"type": "object", "required": [
            "type", "account", "event", "year", "month", "data", "total", "links"],
            "properties": {
                "type": {"type": "string", "enum": ["funnels"]},
                "account": {"type": "string"}, "event": {"type": "string"},
                "year": {"type": "integer"}, "month": nullable_int,
                "data": {"type": "object", "additionalProperties": count,
                         "description": "status -> count, the statuses counted in the "
                                        "period, by name"},
                "total": count,
                "links": {"type": "array", "items": {"type": "string"},
                          "description": "a year: URLs of its months that hold counts"}}},
        "Links": {"type": "object", "required": ["type", "account", "event", "links"],
                  "properties": {
                      "type": {"type": "string", "nullable": True,
                               "description": "`track` or `funnels`; null at the root"},
                      "account": {"type": "string", "nullable": True},
                      "event": {"type": "string", "nullable": True},
                      "links": {"type": "array", "items": {"type": "string"},
                                "description": "URLs of the children that have counts"}}},
        "LiveKey": {"type": "object", "required": [
            "account", "event", "current_minute", "last_60s", "minutes"], "properties": {
                "account": {"type": "string"}, "event": {"type": "string"},
                "current_minute": count, "last_60s": count,
                "minutes": {"type": "array", "items": count, "minItems": LIVE_MINUTES,
                            "maxItems": LIVE_MINUTES,
                            "description": "closed minutes, oldest first: first_minute .. "
                                           "minute - 1"}}},
        "Live": {"type": "object", "required": [
            "type", "now", "minute", "first_minute", "keys", "throttle", "supervisor",
            "segment"], "properties": {
                "type": {"type": "string", "enum": ["live"]},
                "now": {"type": "number"}, "minute": {"type": "integer"},
                "first_minute": {"type": "integer"},
                "keys": {"type": "array", "items": {"$ref": "#/components/schemas/LiveKey"}},
                "throttle": {"type": "object", "required": ["level", "min", "max", "text"],
                             "properties": {
                                 "level": {"type": "integer", "minimum": 0, "maximum": 5},
                                 "supervisor_level": {"type": "integer"},
                                 "min": count, "max": nullable_int, "text": {"type": "string"},
                                 "multiplier": {"type": "integer"},
                                 "window": {"type": "string", "enum": ["60s", "minute"]},
                                 "pages_past_minute": count}},
                "supervisor": {"type": "object", "required": ["pid", "heartbeat_age_seconds",
                                                              "alive"], "properties": {
                    "pid": nullable_int,
                    "heartbeat_age_seconds": {"type": "number", "nullable": True},
                    "alive": {"type": "boolean"}}},
                "segment": {"type": "object", "additionalProperties": {"type": "integer"}},
                "damaged": {"type": "array", "items": {"type": "string"},
                            "description": "what was found damaged in the segment and how "
                                           "it was read instead; empty when all is well"}}},
        **_farm_schemas(count),
    }
    paths: dict[str, Any] = {prefix: _plain_operation(
        "Links to the charts: track and funnels", "root", JSON_TYPE,
        {"$ref": "#/components/schemas/Links"})}
    for chart in ("track", "funnels"):
        keys = f"{prefix}/{chart}"
        for depth, part in enumerate(("", "/{account}", "/{event}")):
            keys += part
            paths[keys] = _keys_operation(depth, chart)
    track = prefix + "/track/{account}/{event}/{year}"
    for depth, part in enumerate(("", "/{month}", "/{day}", "/{hour}")):
        track += part
        paths[track] = _track_operation(depth)
    funnel = prefix + "/funnels/{account}/{event}/{year}"
    for depth, part in enumerate(("", "/{month}")):
        funnel += part
        paths[funnel] = _funnel_operation(depth)
    paths[prefix + "/live"] = _plain_operation(
        "The segment now: current minute, sliding 60 s, last 60 minutes per key; "
        "with scope=farm, every host's live numbers from the farm's Redis",
        "live", JSON_TYPE, {"anyOf": [{"$ref": "#/components/schemas/Live"},
                                      {"$ref": "#/components/schemas/FarmLive"}]},
        [_name_param("account", names.ACCOUNT_MAX, "only this account", "query"),
         _name_param("event", names.EVENT_MAX, "only this event", "query"),
         {"name": "scope", "in": "query", "required": False,
          "description": "`host` (the default): this host's segment; `farm`: the farm's "
                         "total, a row per host and the alerts' leader (needs [store] "
                         "backend = \"redis\")",
          "schema": {"type": "string", "enum": ["host", "farm"] if farm else ["host"]}}],
        {"400": _error_ref("scope is not host or farm, or scope=farm on a host whose "
                           "store is not the farm's Redis (the message says what to set)"),
         "404": _error_ref("a name is not valid (no key can have it)"),
         "503": _error_ref("no segment is installed (run `trafficthreshold install`), or "
                           "the farm's Redis did not answer")})
    paths["/metrics"] = _plain_operation(
        "Prometheus metrics (text format 0.0.4)", "metrics", "text/plain", {"type": "string"},
        extra={"503": _error_ref(_STORE_DOWN)})
    paths["/api/openapi.json"] = _plain_operation("This document", "openapi", JSON_TYPE,
                                                  {"type": "object"})
    paths["/"] = _plain_operation(
        "The dashboard", "dashboard", "text/html", {"type": "string"},
        [_name_param("event", names.EVENT_MAX, "the event to show (default pageview)",
                     "query")],
        {"404": _error_ref("the event name is not valid"),
         "503": {"description": "the database does not exist yet, is locked or is damaged: "
                                "a page that says what to do",
                 "content": {"text/html": {"schema": {"type": "string"}}}}})
    return {
        "openapi": "3.0.3",
        "info": {"title": "trafficthreshold stats API", "version": __version__,
                 "description": "Bootic-compatible page-view statistics, the live segment, "
                                "Prometheus metrics and a dashboard. Read-only."},
        "paths": paths,
        "components": {"schemas": schemas, "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer",
                       "description": "required on every route when http.token is set"}}},
        "security": [{}, {"bearer": []}],
    }


def _farm_schemas(count: dict[str, Any]) -> dict[str, Any]:
    """``/live?scope=farm``: the farm's total and a row per host."""
    stamp = {"type": "number", "nullable": True}
    key = {"type": "object", "required": ["account", "event", "current_minute", "last_60s"],
           "properties": {"account": {"type": "string"}, "event": {"type": "string"},
                          "current_minute": count, "last_60s": count}}
    host = {"type": "object", "required": [
        "host", "alive", "level", "published_at", "age_seconds", "last_roll_at", "keys"],
        "properties": {
            "host": {"type": "string"},
            "alive": {"type": "boolean",
                      "description": "it published within the last 5 seconds"},
            "level": {"type": "integer", "minimum": 0, "maximum": 5, "nullable": True,
                      "description": "its throttle level; null when not alive"},
            "published_at": stamp, "age_seconds": stamp, "last_roll_at": stamp,
            "keys": {"type": "array", "items": {"$ref": "#/components/schemas/FarmKey"},
                     "description": "empty when not alive"}}}
    return {
        "FarmKey": key,
        "FarmHost": host,
        "FarmLive": {"type": "object", "required": [
            "type", "scope", "now", "host", "leader", "hosts_alive", "keys", "hosts"],
            "properties": {
                "type": {"type": "string", "enum": ["live"]},
                "scope": {"type": "string", "enum": ["farm"]},
                "now": {"type": "number"},
                "host": {"type": "string", "description": "the host that answered"},
                "leader": {"type": "string", "nullable": True,
                           "description": "the host that evaluates the farm's alerts"},
                "hosts_alive": count,
                "keys": {"type": "array", "items": {"$ref": "#/components/schemas/FarmKey"},
                         "description": "the sum over the hosts that are alive"},
                "hosts": {"type": "array", "items": {"$ref": "#/components/schemas/FarmHost"},
                          "description": "every host seen in the last hour, by name"}}},
    }

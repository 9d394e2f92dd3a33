"""Alert rules for the tests: duck-typed like config.AlertRule."""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any


def make_rule(**overrides: Any) -> SimpleNamespace:
    """A rule with config.AlertRule's defaults, changed by ``overrides``."""
    values: dict[str, Any] = dict(
        name="burst", account="all", event="pageview", threshold=10, window="minute",
        to=("ops@example.com",), sender="", repeat=3600, resolved=True, clear_minutes=5,
    )
    values.update(overrides)
    return SimpleNamespace(**values)

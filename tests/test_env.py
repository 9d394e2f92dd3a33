"""Tests for trafficthreshold.env: the segment a worker counts into, as its
environment chooses it (tests/test_import.py checks that a worker loads
nothing else of the daemon)."""
from __future__ import annotations

import pytest

from trafficthreshold import config, env, segment
from trafficthreshold.errors import ConfigError


def test_the_daemon_takes_its_defaults_from_here() -> None:
    """One home: config and segment import these names, they hold no copies."""
    assert segment.DEFAULT_KEY is env.DEFAULT_KEY and config.DEFAULT_KEY is env.DEFAULT_KEY
    assert segment.BACKENDS is env.BACKENDS and config.BACKENDS is env.BACKENDS
    assert config.MAX_KEY is env.MAX_KEY
    assert config.parse_key is env.parse_key and config.env_key is env.env_key
    assert (env.DEFAULT_KEY, env.MAX_KEY, env.BACKENDS) == (0x54546831, 2**31 - 1,
                                                            ("sysv", "posix"))


@pytest.mark.parametrize("text, key", [("1", 1), (" 0x54546831 ", 0x54546831),
                                       ("0X7fffffff", 0x7FFFFFFF), ("2147483647", 2**31 - 1)])
def test_parse_key_reads_decimal_and_hex(text: str, key: int) -> None:
    assert env.parse_key(text) == key


@pytest.mark.parametrize("text", ["0", "0x80000000", "-1", "0x", "12ab", "", "1.5"])
def test_parse_key_refuses_what_is_not_a_key(text: str) -> None:
    with pytest.raises(ValueError):
        env.parse_key(text)


def test_env_key_is_none_when_unset_or_blank() -> None:
    assert env.env_key({}) is None
    assert env.env_key({"TRAFFICTHRESHOLD_KEY": "  "}) is None
    assert env.env_key({"TRAFFICTHRESHOLD_KEY": "0x1234"}) == 0x1234


@pytest.mark.parametrize("value, problem", [("nonsense", "is not an integer"),
                                            ("0", "must be from 1 to 0x7fffffff")])
def test_a_bad_env_key_names_the_variable_and_the_fix(value: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        env.env_key({"TRAFFICTHRESHOLD_KEY": value})
    assert str(caught.value) == (f"environment: TRAFFICTHRESHOLD_KEY = {value!r} {problem}; "
                                 "use decimal or 0x hex, e.g. 0x54546831")


def test_env_key_reads_the_process_environment_by_default(monkeypatch) -> None:
    monkeypatch.setenv("TRAFFICTHRESHOLD_KEY", "77")
    assert env.env_key() == 77


def test_env_backend_and_strict(monkeypatch) -> None:
    assert env.env_backend({}) is None and env.env_backend({"TRAFFICTHRESHOLD_BACKEND": ""}) is None
    assert env.env_backend({"TRAFFICTHRESHOLD_BACKEND": "posix"}) == "posix"
    for value in ("1", "true", "YES", "True"):
        assert env.env_strict({"TRAFFICTHRESHOLD_STRICT": value})
    for value in ("", "0", "no", "false", "on"):
        assert not env.env_strict({"TRAFFICTHRESHOLD_STRICT": value})
    monkeypatch.setenv("TRAFFICTHRESHOLD_STRICT", "1")
    assert env.env_strict()

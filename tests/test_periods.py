"""Tests for trafficthreshold.periods: local parts, segments, time zones."""

from __future__ import annotations

import datetime
import io
from zoneinfo import ZoneInfo

import pytest

from trafficthreshold import periods
from trafficthreshold.errors import TrafficThresholdError
from trafficthreshold.periods import (
    ImpossiblePeriod,
    UnknownTimezone,
    local_parts,
    resolve_timezone,
    segments,
)

UTC = ZoneInfo("UTC")
ZURICH = ZoneInfo("Europe/Zurich")


def utc_minute(*parts: int) -> int:
    """Epoch minute of a UTC wall-clock time (year, month, day, hour, minute)."""
    return int(datetime.datetime(*parts, tzinfo=datetime.UTC).timestamp() // 60)


# --------------------------------------------------------------------------
# local_parts


def test_epoch_minute_zero_is_1970_in_utc() -> None:
    assert local_parts(0, UTC) == (1970, 1, 1, 0, 0)


def test_zurich_is_one_hour_ahead_in_winter_two_in_summer() -> None:
    assert local_parts(utc_minute(2026, 1, 15, 11, 30), ZURICH) == (2026, 1, 15, 12, 30)
    assert local_parts(utc_minute(2026, 7, 15, 11, 30), ZURICH) == (2026, 7, 15, 13, 30)


def test_local_midnight_is_the_previous_utc_day() -> None:
    # 2026-12-31 23:00 UTC is already New Year in Zurich.
    assert local_parts(utc_minute(2026, 12, 31, 23, 0), ZURICH) == (2027, 1, 1, 0, 0)


def test_spring_forward_skips_the_local_0200_hour() -> None:
    # 2026-03-29: 01:00 UTC is 02:00 CET -> 03:00 CEST.
    start = utc_minute(2026, 3, 29, 0, 0)
    hours = {local_parts(m, ZURICH)[3] for m in range(start, start + 180)}
    assert hours == {1, 3, 4}
    assert local_parts(utc_minute(2026, 3, 29, 0, 59), ZURICH) == (2026, 3, 29, 1, 59)
    assert local_parts(utc_minute(2026, 3, 29, 1, 0), ZURICH) == (2026, 3, 29, 3, 0)


def test_fall_back_maps_two_real_hours_to_one_local_hour() -> None:
    # 2026-10-25: 01:00 UTC is 03:00 CEST -> 02:00 CET.
    first = utc_minute(2026, 10, 25, 0, 30)  # 02:30 CEST
    second = utc_minute(2026, 10, 25, 1, 30)  # 02:30 CET
    assert second - first == 60
    assert local_parts(first, ZURICH) == local_parts(second, ZURICH) == (2026, 10, 25, 2, 30)


def test_local_parts_of_a_whole_day_matches_datetime() -> None:
    start = utc_minute(2028, 2, 28, 20, 0)
    for minute in range(start, start + 1440, 7):
        moment = datetime.datetime.fromtimestamp(minute * 60, ZURICH)
        expected = (moment.year, moment.month, moment.day, moment.hour, moment.minute)
        assert local_parts(minute, ZURICH) == expected


# --------------------------------------------------------------------------
# segments


def test_segments_of_each_level() -> None:
    assert segments(2026) == list(range(1, 13))
    assert segments(2026, 4) == list(range(1, 31))
    assert segments(2026, 4, 30) == list(range(24))
    assert segments(2026, 4, 30, 23) == list(range(60))


@pytest.mark.parametrize(
    ("year", "month", "days"),
    [(2026, 1, 31), (2026, 2, 28), (2028, 2, 29), (2000, 2, 29), (2100, 2, 28), (2026, 12, 31)],
)
def test_days_in_month_follow_leap_years(year: int, month: int, days: int) -> None:
    assert segments(year, month) == list(range(1, days + 1))


@pytest.mark.parametrize(
    ("args", "words"),
    [
        ((2026, 13), "month 13"),
        ((2026, 0), "month 0"),
        ((2026, 2, 30), "2026-02-30"),
        ((2027, 2, 29), "February 2027 has 28 days"),
        ((2026, 4, 31), "April 2026 has 30 days"),
        ((2026, 4, 0), "2026-04-00"),
        ((2026, 4, 1, 24), "hour 24"),
        ((2026, 4, 1, -1), "hour -1"),
        ((0,), "year 0"),
        ((2026, None, 3), "without a month"),
        ((2026, 4, None, 5), "without a day"),
        ((2026, "4"), "must be an integer"),
    ],
)
def test_impossible_periods_raise_value_error(args: tuple, words: str) -> None:
    with pytest.raises(ValueError, match=words) as info:
        segments(*args)
    assert isinstance(info.value, ImpossiblePeriod)
    assert isinstance(info.value, TrafficThresholdError)


# --------------------------------------------------------------------------
# resolve_timezone


def test_resolve_a_named_zone() -> None:
    assert resolve_timezone("Europe/Zurich") == ZURICH


def test_unknown_zone_says_what_to_do() -> None:
    with pytest.raises(ValueError, match="unknown time zone 'Europe/Zurch'.*IANA") as info:
        resolve_timezone("Europe/Zurch")
    assert isinstance(info.value, UnknownTimezone)


def test_malformed_zone_name_is_unknown() -> None:
    with pytest.raises(UnknownTimezone):
        resolve_timezone("../../etc/passwd")


def test_system_zone_from_tz_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "America/New_York")
    assert resolve_timezone(None) == ZoneInfo("America/New_York")
    monkeypatch.setenv("TZ", ":Asia/Tokyo")
    assert resolve_timezone("") == ZoneInfo("Asia/Tokyo")


def test_system_zone_from_localtime_link(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.delenv("TZ", raising=False)
    link = tmp_path / "localtime"
    link.symlink_to("/usr/share/zoneinfo/Europe/Zurich")
    monkeypatch.setattr(periods, "LOCALTIME", link)
    assert resolve_timezone(None) == ZURICH


def test_system_zone_from_a_localtime_copy(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.delenv("TZ", raising=False)
    copy = tmp_path / "localtime"
    copy.write_bytes(open("/usr/share/zoneinfo/Europe/Zurich", "rb").read())
    monkeypatch.setattr(periods, "LOCALTIME", copy)
    zone = resolve_timezone(None)
    assert local_parts(utc_minute(2026, 7, 1, 12, 0), zone) == (2026, 7, 1, 14, 0)


def test_system_zone_falls_back_to_utc(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("TZ", "CET-1CEST")  # a POSIX rule, not a zone name
    monkeypatch.setattr(periods, "LOCALTIME", tmp_path / "missing")
    assert local_parts(0, resolve_timezone(None)) == (1970, 1, 1, 0, 0)


def test_builtin_utc_tzif_is_a_valid_zone() -> None:
    zone = ZoneInfo.from_file(io.BytesIO(periods.UTC_TZIF), key="UTC")
    moment = datetime.datetime(2026, 7, 1, 12, 0, tzinfo=zone)
    assert moment.utcoffset() == datetime.timedelta(0)
    assert moment.tzname() == "UTC"

"""Epoch minutes -> local calendar periods.

Pure functions, no clock reads: everything in the segment and the roll-up is
keyed by *epoch minute* (``int(unix_seconds // 60)``, UTC based, free of time
zones). This module is the one place that turns an epoch minute into local
wall-clock parts, and that knows which child segments a calendar period has.

Daylight saving time
--------------------
Periods are *wall-clock* periods in the store's time zone, so a DST change
shows in them the way it shows on a clock:

* **Spring forward** (e.g. Europe/Zurich, 2026-03-29, 02:00 -> 03:00): the
  skipped local hour never occurs, so no epoch minute maps to it. It is simply
  absent: it holds no counts (zero-filled like any quiet hour), and that day
  has 23 real hours.
* **Fall back** (e.g. Europe/Zurich, 2026-10-25, 03:00 -> 02:00): the repeated
  local hour occurs twice, and both real hours map to the same wall-clock
  hour, which therefore *merges* them: local 02:30 holds the counts of both
  02:30 CEST and 02:30 CET. That day has counts for all 25 real hours, the
  02:00 hour holds two real hours.

No count is lost or counted twice across a DST change; only the wall-clock
labels are coarser in the repeated hour.
"""

from __future__ import annotations

import calendar
import datetime
import functools
import io
import logging
import os
import struct
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from trafficthreshold.errors import ConfigError, TrafficThresholdError

log = logging.getLogger("trafficthreshold.periods")

LocalParts = tuple[int, int, int, int, int]

#: Where the system's zone is configured on Linux (a symlink into zoneinfo).
LOCALTIME = Path("/etc/localtime")

#: A minimal TZif (version 1) file for UTC: magic, version, 15 reserved bytes,
#: six counts (isut, isstd, leap, transitions, types, abbreviation chars),
#: one type (offset 0, not DST, abbreviation index 0) and "UTC\0".
UTC_TZIF = (
    b"TZif" + b"\0" * 16 + struct.pack(">6l", 0, 0, 0, 0, 1, 4)
    + struct.pack(">lBB", 0, 0, 0) + b"UTC\0"
)


class UnknownTimezone(ConfigError, ValueError):
    """A time zone name is not in the zone database."""


class ImpossiblePeriod(TrafficThresholdError, ValueError):
    """A period names a date or time that does not exist (month 13, Feb 30)."""


# --------------------------------------------------------------------------
# epoch minute -> local parts


@functools.lru_cache(maxsize=4096)
def local_parts(epoch_minute: int, tz: ZoneInfo) -> LocalParts:
    """Return the wall-clock ``(year, month, day, hour, minute)`` of an epoch
    minute in ``tz``.

    In a repeated (fall-back) hour two different epoch minutes return the
    same parts: the wall-clock hour merges both real hours. A skipped
    (spring-forward) local hour is never returned. Cached, because a roll-up
    converts the same few minutes for thousands of keys.
    """
    moment = datetime.datetime.fromtimestamp(epoch_minute * 60, tz)
    return (moment.year, moment.month, moment.day, moment.hour, moment.minute)


# --------------------------------------------------------------------------
# child segments of a period


def segments(
    year: int,
    month: int | None = None,
    day: int | None = None,
    hour: int | None = None,
) -> list[int]:
    """Return the child segments of a period, in numeric order.

    ``segments(2028)`` -> months 1..12, ``segments(2028, 2)`` -> days 1..29
    (leap years included), ``segments(2028, 2, 29)`` -> hours 0..23,
    ``segments(2028, 2, 29, 23)`` -> minutes 0..59.

    The list is time-zone free: a day always has hours 0..23 even on a DST
    day (the skipped hour is simply empty, see the module docstring).

    Raises :class:`ImpossiblePeriod` (a ``ValueError``) for a date or time
    that does not exist: month 13, February 30, hour 24, or an hour given
    without a day.
    """
    _check_range("year", year, 1, 9999)
    if month is None:
        _check_nesting(("day", day), ("hour", hour), parent="month")
        return list(range(1, 13))
    _check_range("month", month, 1, 12)
    days_in_month = calendar.monthrange(year, month)[1]
    if day is None:
        _check_nesting(("hour", hour), parent="day")
        return list(range(1, days_in_month + 1))
    if not 1 <= day <= days_in_month:
        raise ImpossiblePeriod(
            f"impossible date {year:04d}-{month:02d}-{day:02d}: "
            f"{calendar.month_name[month]} {year} has {days_in_month} days"
        )
    if hour is None:
        return list(range(24))
    _check_range("hour", hour, 0, 23)
    return list(range(60))


def _check_range(name: str, value: int, low: int, high: int) -> None:
    """Raise ImpossiblePeriod unless ``value`` is an int in low..high."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ImpossiblePeriod(f"{name} must be an integer, not {value!r}")
    if not low <= value <= high:
        raise ImpossiblePeriod(f"impossible {name} {value}: {name} must be in {low}..{high}")


def _check_nesting(*given: tuple[str, int | None], parent: str) -> None:
    """Raise ImpossiblePeriod if a finer part is given without its parent."""
    for name, value in given:
        if value is not None:
            raise ImpossiblePeriod(
                f"{name} {value} given without a {parent}: pass the {parent} too"
            )


# --------------------------------------------------------------------------
# time zone names -> ZoneInfo


def resolve_timezone(name: str | None) -> ZoneInfo:
    """Return the ZoneInfo for an IANA zone name.

    ``None`` (or ``""``) means the system's zone: the ``TZ`` environment
    variable if it names a zone, else ``/etc/localtime``, else UTC.
    An unknown name raises :class:`UnknownTimezone` (a ``ValueError``) that
    says how to fix it.
    """
    if not name:
        return _system_timezone()
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError) as exc:
        # ValueError: malformed keys such as "../x"; OSError: unreadable file.
        raise UnknownTimezone(
            f"unknown time zone {name!r} ({exc.__class__.__name__}): use an "
            "IANA zone name such as 'Europe/Zurich' or 'UTC' (the names under "
            "/usr/share/zoneinfo), or leave `timezone` unset to use the "
            "system's zone; if no name works, install the zone database "
            "(apt-get install tzdata, or pip install tzdata)"
        ) from None


def _system_timezone() -> ZoneInfo:
    """The system's zone: $TZ, then /etc/localtime, then UTC."""
    tz_env = os.environ.get("TZ", "").lstrip(":")
    if tz_env:
        zone = _zone_from_name_or_file(tz_env)
        if zone is not None:
            return zone
        log.warning("TZ=%r is not a zone name or file; trying %s", tz_env, LOCALTIME)
    zone = _zone_from_localtime(LOCALTIME)
    if zone is not None:
        return zone
    log.warning("no system time zone found (TZ, %s); using UTC", LOCALTIME)
    return _utc()


def _zone_from_name_or_file(value: str) -> ZoneInfo | None:
    """A zone from a $TZ value: an absolute TZif file path or a zone name."""
    if value.startswith("/"):
        return _zone_from_file(Path(value), key=value)
    try:
        return ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        # POSIX rule strings such as "CET-1CEST" are not zone names.
        return None


def _zone_from_localtime(path: Path) -> ZoneInfo | None:
    """The zone /etc/localtime points to, by name when the link shows one."""
    resolved = str(path.resolve())
    if "/zoneinfo/" in resolved:
        # Prefer the name ("Europe/Zurich") so the zone prints nicely.
        try:
            return ZoneInfo(resolved.split("/zoneinfo/", 1)[1])
        except (ZoneInfoNotFoundError, ValueError, OSError):
            pass
    return _zone_from_file(path, key="localtime")


def _zone_from_file(path: Path, key: str) -> ZoneInfo | None:
    """Read a TZif file, or None if it is missing or not a TZif file."""
    try:
        with open(path, "rb") as handle:
            return ZoneInfo.from_file(handle, key=key)
    except (OSError, ValueError):
        return None


def _utc() -> ZoneInfo:
    """UTC as a ZoneInfo, even on a system without any zone database."""
    try:
        return ZoneInfo("UTC")
    except ZoneInfoNotFoundError:
        return ZoneInfo.from_file(io.BytesIO(UTC_TZIF), key="UTC")

"""The exception hierarchy.

Every error a user can meet derives from :class:`TrafficThresholdError` and
its message says what went wrong *and* what to do about it.
"""


class TrafficThresholdError(Exception):
    """Base class of every trafficthreshold error."""


class ConfigError(TrafficThresholdError):
    """The configuration file (or an option) is invalid."""


class SegmentError(TrafficThresholdError):
    """Something is wrong with the shared-memory segment."""


class SegmentNotFound(SegmentError):
    """No segment is installed under the configured key."""


class LayoutMismatch(SegmentError):
    """A segment exists but has another magic or layout version."""


class SegmentBusy(SegmentError):
    """The segment's lock (the SysV semaphore, or the POSIX lock word) could
    not be taken in time."""


class SegmentInUse(SegmentError):
    """Uninstall refused: processes are still attached."""


class MailError(TrafficThresholdError):
    """An alert mail could not be built or handed to the mail transport."""

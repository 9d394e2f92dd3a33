"""The shared-memory segment: layout constants, install, attach, uninstall.

The layout is described byte by byte at the top of ``_counter.c`` and in
docs/segment.rst; the constants here mirror it (a test checks they agree with
the C module's ``LAYOUT``).  This module does everything structural, which is
never on a worker's path: creating the segment and its semaphore, writing
the header and the reserved keys, changing permissions, retiring and
removing it.  The hot path (hit, counts, snapshots) is C.

Two backends hold the same bytes:

* ``sysv``: a System V segment and a one-semaphore set, both found by the
  integer IPC key.  The semaphore is taken with SEM_UNDO, so the kernel
  releases it if its holder is killed.
* ``posix``: ``/dev/shm/trafficthreshold-<key in hex>``, no semaphore: the
  lock is the header's ``lock_owner_pid`` word (compare-and-swap 0 -> pid,
  futex waits), so the lock is never held without its owner recorded, and a
  waiter takes over the lock of a holder that no longer exists.

Install and uninstall take the same lock as the hot path, through the C
module (``_lock``/``_unlock``, ``Counter.lock``).  Install marks the segment
live as its last step; uninstall changes nothing it cannot finish.
"""
from __future__ import annotations

import contextlib
import dataclasses
import grp
import itertools
import logging
import mmap
import os
import pwd
import random
import struct
import time
from typing import Callable, Iterable, Iterator, TypeVar

import posix_ipc
import sysv_ipc

from . import names
from . import _counter
from ._counter import Counter, _lock, _unlock
from .env import BACKENDS, DEFAULT_KEY
from .errors import LayoutMismatch, SegmentBusy, SegmentError, SegmentInUse, SegmentNotFound

log = logging.getLogger("trafficthreshold.segment")

# The layout's numbers have one home, the C core's header
# (trafficthreshold/core/tt_layout.h, which docs/segment.rst follows);
# the extension exports them as _counter.LAYOUT and this module reads
# them from there.  Only what the header leaves to Python is written here.
_L = _counter.LAYOUT
MAGIC = _counter.MAGIC.encode()
LAYOUT_VERSION = _L["LAYOUT_VERSION"]
#: Older layouts, whose counts ``uninstall`` still rolls up (read only):
#: 1, before reclaim; 2, layout 3's bytes under the writers' protocol before
#: issue 20 (no insert record, no probe limit), which must not share a
#: segment with this one's writers (docs/segment.rst, "Upgrading from layout 2").
LAYOUT_VERSION_1 = 1
LAYOUT_VERSION_2 = 2
SLOT_ENTRY_SIZE = _L["SLOT_ENTRY_SIZE"]
#: A bucket's tag is ``epoch | generation << EPOCH_BITS``.
EPOCH_BITS = _L["EPOCH_BITS"]
HEADER_SIZE = _L["HEADER_SIZE"]
INDEX_ENTRY_SIZE = _L["INDEX_ENTRY_SIZE"]
BUCKET_SIZE = _L["BUCKET_SIZE"]
OVERFLOW_SLOT = _L["OVERFLOW_SLOT"]
EVENT_RESERVE = _L["EVENT_RESERVE"]
CACHE_LINE = 64
PAGE = 4096

# Header offsets (tt_layout.h says what each field means).
H_MAGIC = _L["H_MAGIC"]
H_VERSION = _L["H_VERSION"]
H_HEADER_SIZE = _L["H_HEADER_SIZE"]
H_KEY_CAPACITY = _L["H_KEY_CAPACITY"]
H_INDEX_SIZE = _L["H_INDEX_SIZE"]
H_MINUTE_BUCKETS = _L["H_MINUTE_BUCKETS"]
H_SECOND_BUCKETS = _L["H_SECOND_BUCKETS"]
H_STRIPES = _L["H_STRIPES"]
H_STRIPE_SIZE = _L["H_STRIPE_SIZE"]
H_SLOT_SIZE = _L["H_SLOT_SIZE"]
H_INDEX_OFFSET = _L["H_INDEX_OFFSET"]
H_SLOTS_OFFSET = _L["H_SLOTS_OFFSET"]
H_TOTAL_SIZE = _L["H_TOTAL_SIZE"]
H_CREATED_AT = _L["H_CREATED_AT"]
H_THROTTLE_MULTIPLIER = _L["H_THROTTLE_MULTIPLIER"]
H_THROTTLE_WINDOW = _L["H_THROTTLE_WINDOW"]
H_THROTTLE_LEVEL = _L["H_THROTTLE_LEVEL"]
H_STATE = _L["H_STATE"]
H_HEARTBEAT_MS = _L["H_HEARTBEAT_MS"]
H_SUPERVISOR_PID = _L["H_SUPERVISOR_PID"]
H_THROTTLE_SLOT = _L["H_THROTTLE_SLOT"]
H_LOCK_OWNER_PID = _L["H_LOCK_OWNER_PID"]
H_THROTTLE_SINCE_MS = _L["H_THROTTLE_SINCE_MS"]
H_KEYS_USED = _L["H_KEYS_USED"]
H_NEXT_STRIPE = _L["H_NEXT_STRIPE"]
H_OVERFLOW_HITS = _L["H_OVERFLOW_HITS"]
H_DROPPED_HITS = _L["H_DROPPED_HITS"]
H_ATTACHES = _L["H_ATTACHES"]
H_INSTANCE = _L["H_INSTANCE"]
H_FREE_HEAD = _L["H_FREE_HEAD"]
H_FREE_SLOTS = _L["H_FREE_SLOTS"]
H_RECLAIMED = _L["H_RECLAIMED"]
H_RECLAIM_SLOT = _L["H_RECLAIM_SLOT"]
H_RECLAIM_ENTRY = _L["H_RECLAIM_ENTRY"]
H_INSERT_SLOT = _L["H_INSERT_SLOT"]
H_INSERT_ENTRY = _L["H_INSERT_ENTRY"]
H_PROBE_LIMIT = _L["H_PROBE_LIMIT"]
H_INDEX_SEQ = _L["H_INDEX_SEQ"]
H_LOCK_TIMEOUTS = _L["H_LOCK_TIMEOUTS"]

# Index entry offsets.
E_STATE = _L["E_STATE"]
E_SLOT = _L["E_SLOT"]
E_HASH = _L["E_HASH"]
E_ACCOUNT_LEN = _L["E_ACCOUNT_LEN"]
E_EVENT_LEN = _L["E_EVENT_LEN"]
E_ACCOUNT = _L["E_ACCOUNT"]
E_EVENT = _L["E_EVENT"]
E_GENERATION = _L["E_GENERATION"]

# Slot table entry offsets.
T_GENERATION = _L["T_GENERATION"]
T_NEXT_FREE = _L["T_NEXT_FREE"]

ENTRY_EMPTY = _L["ENTRY_EMPTY"]
ENTRY_READY = _L["ENTRY_READY"]
ENTRY_REMOVED = _L["ENTRY_REMOVED"]

STATE_INSTALLING = _L["STATE_INSTALLING"]
STATE_LIVE = _L["STATE_LIVE"]
STATE_RETIRED = _L["STATE_RETIRED"]

# Timings of the hot path, fixed in the C core (not part of the bytes, but a
# writer in another language should behave the same way).
HOT_LOCK_TIMEOUT_MS = _L["HOT_LOCK_TIMEOUT_MS"]   # semaphore wait of hit(); then the hit is dropped
HEARTBEAT_STALE_MS = _L["HEARTBEAT_STALE_MS"]  # supervisor level older than this is ignored
ATTACH_RETRY_S = _L["ATTACH_RETRY_S"]        # a process without a segment retries this often

WINDOWS = {"60s": 0, "minute": 1}
STRUCTURAL_LOCK_MS = 5000
FORCE_LOCK_MS = 1000  # uninstall --force waits this long, then goes on without the lock

MAX_U32 = 0xFFFFFFFF
#: Slots taken by the install: ("~overflow", "~any") and ("all", "pageview").
RESERVED_SLOTS = 2
#: The fewest slots left for account keys by the smallest --keys.
MIN_ACCOUNT_KEYS = 16
MIN_KEYS = RESERVED_SLOTS + EVENT_RESERVE + MIN_ACCOUNT_KEYS  # 34
MAX_KEYS = 1 << 20
#: The largest ``n`` of one hit() (_counter.c says why); a larger one raises
#: ValueError naming both.
MAX_HIT_N: int = _counter.MAX_HIT_N
#: How far a hit()'s ``now`` may be from the real clock, in seconds.
MAX_CLOCK_SKEW_S = 366 * 86400

#: Header fields shown by ``status``: name -> (offset, width).
HEADER_FIELDS = {
    "layout_version": (H_VERSION, 4), "key_capacity": (H_KEY_CAPACITY, 4),
    "index_size": (H_INDEX_SIZE, 4), "minute_buckets": (H_MINUTE_BUCKETS, 4),
    "second_buckets": (H_SECOND_BUCKETS, 4), "stripes": (H_STRIPES, 4),
    "slot_size": (H_SLOT_SIZE, 4), "total_size": (H_TOTAL_SIZE, 8),
    "created_at": (H_CREATED_AT, 8), "throttle_multiplier": (H_THROTTLE_MULTIPLIER, 4),
    "throttle_window": (H_THROTTLE_WINDOW, 4), "throttle_level": (H_THROTTLE_LEVEL, 4),
    "state": (H_STATE, 4), "heartbeat_ms": (H_HEARTBEAT_MS, 8),
    "supervisor_pid": (H_SUPERVISOR_PID, 4), "throttle_slot": (H_THROTTLE_SLOT, 4),
    "lock_owner_pid": (H_LOCK_OWNER_PID, 4), "throttle_since_ms": (H_THROTTLE_SINCE_MS, 8),
    "keys_used": (H_KEYS_USED, 4),
    "overflow_hits": (H_OVERFLOW_HITS, 8), "dropped_hits": (H_DROPPED_HITS, 8),
    "attaches": (H_ATTACHES, 8), "instance": (H_INSTANCE, 8),
    "free_slots": (H_FREE_SLOTS, 4), "reclaimed": (H_RECLAIMED, 8),
    "probe_limit": (H_PROBE_LIMIT, 4), "index_seq": (H_INDEX_SEQ, 8),
    "lock_timeouts": (H_LOCK_TIMEOUTS, 8),
}


@dataclasses.dataclass(frozen=True)
class Geometry:
    """The sizes chosen at install; everything else is derived."""

    keys: int = 1024
    minutes: int = 120
    seconds: int = 64
    stripes: int = 4

    def check(self) -> None:
        """Raise ValueError naming the option to fix."""
        if not MIN_KEYS <= self.keys <= MAX_KEYS:
            raise ValueError(
                f"--keys {self.keys} is out of range; use {MIN_KEYS}..{MAX_KEYS}: "
                f"{RESERVED_SLOTS} slots are reserved, {EVENT_RESERVE} kept for the totals of "
                f"new events, and at least {MIN_ACCOUNT_KEYS} must be left for account keys")
        if not 2 <= self.minutes <= 100_000:
            raise ValueError(f"--minutes {self.minutes} is out of range; use 2..100000")
        if not 64 <= self.seconds <= 100_000:
            raise ValueError(f"--seconds {self.seconds} is out of range; use 64..100000")
        if not 1 <= self.stripes <= 64:
            raise ValueError(f"--stripes {self.stripes} is out of range; use 1..64")

    @property
    def index_size(self) -> int:
        # Twice the keys, a power of two: probes stay short at full load.
        size = 1
        while size < 2 * self.keys:
            size *= 2
        return size

    @property
    def stripe_size(self) -> int:
        raw = (self.minutes + self.seconds) * BUCKET_SIZE
        return -(-raw // CACHE_LINE) * CACHE_LINE

    @property
    def slot_size(self) -> int:
        return self.stripes * self.stripe_size

    @property
    def index_offset(self) -> int:
        return HEADER_SIZE

    @property
    def slot_table_offset(self) -> int:
        return self.index_offset + self.index_size * INDEX_ENTRY_SIZE

    @property
    def slots_offset(self) -> int:
        end = self.slot_table_offset + self.keys * SLOT_ENTRY_SIZE
        return -(-end // PAGE) * PAGE

    @property
    def total_size(self) -> int:
        return self.slots_offset + self.keys * self.slot_size


def posix_name(key: int) -> str:
    """The POSIX shared-memory and semaphore name for an IPC key."""
    return f"/trafficthreshold-{key:x}"


def unused_key() -> int:
    """A random IPC key at which neither backend has a segment now: for
    tests and benchmarks, which must never touch a live one.  Drawn from
    0x20000000..0x3FFFFFFF, clear of the default key and of the small keys
    other software uses."""
    while True:
        key = random.randrange(0x20000000, 0x3FFFFFFF)
        try:
            sysv_ipc.SharedMemory(key).detach()
        except sysv_ipc.ExistentialError:
            if not os.path.exists("/dev/shm" + posix_name(key)):
                return key


def fnv1a(account: bytes, event: bytes) -> int:
    """FNV-1a 32 of account, a zero byte, event: the key index hash."""
    h = 2166136261
    for byte in account + b"\0" + event:
        h = ((h ^ byte) * 16777619) & 0xFFFFFFFF
    return h


# --------------------------------------------------------------- raw access

def _euid_may_remove(uids: tuple[int, ...]) -> bool:
    """Whether this process may remove an object owned or created by
    ``uids``: root, or one of those uids (IPC_RMID and unlink in the sticky
    /dev/shm both ask for that)."""
    return os.geteuid() == 0 or os.geteuid() in uids


def _user(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


class _Raw:
    """A writable view of a segment plus its structural lock, for install
    and uninstall (which work on segments a Counter may not attach to: half
    made, retired).  The lock is taken through the C module (``_lock``), the
    protocol of the hot path: SysV, the semaphore with SEM_UNDO; POSIX, the
    lock word ``lock_owner_pid`` (docs/segment.rst)."""

    def __init__(self, backend: str, key: int, create_size: int = 0, mode: int = 0o660):
        self.backend, self.key = backend, key
        self.created = False      # this call created the segment
        self.sem_created = False  # this call created the SysV semaphore
        self.sem = None
        try:
            if backend == "sysv":
                self._open_sysv(create_size, mode)
            else:
                self._open_posix(create_size, mode)
        except (sysv_ipc.PermissionsError, posix_ipc.PermissionsError, PermissionError):
            self._drop_created_sem()
            raise SegmentError(
                f"permission denied on the {backend} segment at key {key:#x} for "
                f"{_user(os.geteuid())}; run this as root, as the segment's owner, or "
                "as a member of its group (see `trafficthreshold status`)") from None
        except BaseException:
            # E.g. a size above kernel.shmmax: leave no semaphore behind.
            self._drop_created_sem()
            raise

    def _open_sysv(self, create_size: int, mode: int) -> None:
        if create_size:
            # The semaphore first, free (1): whoever then takes it, with
            # SEM_UNDO, formats the segment; a killed installer gives it back.
            try:
                self.sem = sysv_ipc.Semaphore(self.key, sysv_ipc.IPC_CREX, mode, 1)
                self.sem_created = True
            except sysv_ipc.ExistentialError:
                pass
            try:
                # init_character: sysv_ipc fills a new segment with spaces
                # by default; the layout needs zeros.
                self.shm = sysv_ipc.SharedMemory(self.key, sysv_ipc.IPC_CREX, mode,
                                                 create_size, init_character=b"\0")
                self.created = True
            except sysv_ipc.ExistentialError:
                pass
        if not self.created:
            try:
                self.shm = sysv_ipc.SharedMemory(self.key)
            except sysv_ipc.ExistentialError:
                self._drop_created_sem()
                raise SegmentNotFound(
                    f"no trafficthreshold segment at SysV IPC key {self.key:#x}; "
                    "run `trafficthreshold install`") from None
        if self.sem is None:
            try:
                self.sem = sysv_ipc.Semaphore(self.key)
            except sysv_ipc.ExistentialError:
                self.sem = None
        self.buf = memoryview(self.shm)
        if self.sem_created and not self.created and not self.half_made():
            # A segment was there without a semaphore: someone else's, or a
            # live one of ours whose semaphore was removed (its attached
            # workers keep the old one's id).  Not ours to repair here.
            self._drop_created_sem()

    def _drop_created_sem(self) -> None:
        if self.sem_created and self.sem is not None:
            with contextlib.suppress(sysv_ipc.ExistentialError):
                self.sem.remove()
            self.sem, self.sem_created = None, False

    def _open_posix(self, create_size: int, mode: int) -> None:
        name = posix_name(self.key)
        if create_size:
            try:
                self.shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode, create_size)
                self.created = True
            except posix_ipc.ExistentialError:
                pass
        if not self.created:
            try:
                self.shm = posix_ipc.SharedMemory(name)
            except posix_ipc.ExistentialError:
                raise SegmentNotFound(
                    f"no trafficthreshold segment at POSIX name {name}; run "
                    "`trafficthreshold install --backend posix`") from None
            self._wait_for_size(create_size)
        self.map = mmap.mmap(self.shm.fd, os.fstat(self.shm.fd).st_size)
        self.buf = memoryview(self.map)

    def _wait_for_size(self, create_size: int) -> None:
        """A POSIX segment is created empty, then sized (two system calls):
        give its creator a moment, then size it ourselves (an installer
        killed in between); a mismatch is found later, under the lock."""
        deadline = time.monotonic() + 0.5
        while os.fstat(self.shm.fd).st_size == 0:
            if time.monotonic() > deadline:
                if not create_size:
                    raise SegmentNotFound(
                        f"the POSIX segment {posix_name(self.key)} is empty (its installer "
                        "died); run `trafficthreshold install` or `trafficthreshold "
                        "uninstall --force`")
                os.ftruncate(self.shm.fd, create_size)
                break
            time.sleep(0.01)

    @property
    def legacy_sem_path(self) -> str:
        """The POSIX semaphore older versions locked a POSIX segment with."""
        return "/dev/shm/sem." + posix_name(self.key)[1:]

    def u32(self, off: int) -> int:
        return struct.unpack_from("=I", self.buf, off)[0]

    def u64(self, off: int) -> int:
        return struct.unpack_from("=Q", self.buf, off)[0]

    def put(self, fmt: str, off: int, *values: object) -> None:
        struct.pack_into(fmt, self.buf, off, *values)

    def half_made(self) -> bool:
        """An install started here and did not finish: zero magic, or ours
        still in state 0.  No worker attaches to such a segment."""
        if self.buf.nbytes < HEADER_SIZE:
            return False
        return bytes(self.buf[0:8]) in (b"\0" * 8, MAGIC) and self.u32(H_STATE) == STATE_INSTALLING

    def _lock_args(self) -> tuple[int, int]:
        if self.backend == "sysv":
            if self.sem is None:
                raise SegmentNotFound(
                    f"the segment at SysV IPC key {self.key:#x} has no semaphore; run "
                    f"`trafficthreshold uninstall --force --key {self.key:#x}` and "
                    "install again")
            return 0, self.sem.id
        return 1, -1

    def acquire(self, timeout_ms: int) -> None:
        """Take the structural lock or raise SegmentBusy (the C protocol)."""
        backend, semid = self._lock_args()
        if self.buf.nbytes < HEADER_SIZE:
            raise LayoutMismatch(f"the segment at key {self.key:#x} is smaller than a "
                                 "header; it is not trafficthreshold's")
        _lock(backend, semid, self.buf, timeout_ms)

    def release(self) -> None:
        """Give back what acquire() took."""
        backend, semid = self._lock_args()
        _unlock(backend, semid, self.buf)

    def owners(self) -> list[tuple[str, tuple[int, ...]]]:
        """(what, uids that may remove it) of each object of the segment."""
        if self.backend == "sysv":
            out = [("the SysV segment", (self.shm.uid, self.shm.cuid))]
            if self.sem is not None:
                out.append(("its semaphore", (self.sem.uid, self.sem.cuid)))
            return out
        out = [("the POSIX segment", (os.fstat(self.shm.fd).st_uid,))]
        if os.path.exists(self.legacy_sem_path):
            out.append(("its semaphore", (os.stat(self.legacy_sem_path).st_uid,)))
        return out

    def permissions(self) -> list[tuple[str, int, int, int]]:
        """(what, mode bits, gid, owner uid) of each object."""
        if self.backend == "sysv":
            objs = [("segment", self.shm)] + ([("semaphore", self.sem)] if self.sem else [])
            return [(what, obj.mode & 0o777, obj.gid, obj.uid) for what, obj in objs]
        st = os.fstat(self.shm.fd)
        return [("segment", st.st_mode & 0o777, st.st_gid, st.st_uid)]

    def set_permissions(self, mode: int, gid: int | None) -> None:
        """Apply mode and group to the segment (and its SysV semaphore).
        Raises PermissionError if this user may not."""
        try:
            if self.backend == "sysv":
                for obj in (self.shm, self.sem):
                    if obj is None:
                        continue
                    obj.mode = mode
                    if gid is not None:
                        obj.gid = gid
                return
        except sysv_ipc.PermissionsError as exc:
            raise PermissionError(str(exc)) from None
        os.fchmod(self.shm.fd, mode)
        if gid is not None:
            os.fchown(self.shm.fd, -1, gid)

    def close(self) -> None:
        self.buf.release()
        if self.backend == "sysv":
            self.shm.detach()
        else:
            self.map.close()
            self.shm.close_fd()

    def remove(self) -> None:
        """Remove the segment and its semaphore (they vanish once all
        detach), and for POSIX a semaphore an older version left."""
        if self.backend == "sysv":
            self.shm.remove()
            if self.sem is not None:
                with contextlib.suppress(sysv_ipc.ExistentialError):
                    self.sem.remove()
        else:
            self.shm.unlink()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.legacy_sem_path)


def _format(raw: _Raw, geo: Geometry, multiplier: int, window: str, now: float) -> None:
    """Write the header and the reserved keys, leaving the state at 0
    (being installed): the caller marks it live as the very last step.
    Caller holds the lock."""
    raw.put("=8sIIIIIIIIII", H_MAGIC, MAGIC, LAYOUT_VERSION, HEADER_SIZE, geo.keys,
            geo.index_size, geo.minutes, geo.seconds, geo.stripes, geo.stripe_size,
            geo.slot_size, 0)
    raw.put("=QQQQ", H_INDEX_OFFSET, geo.index_offset, geo.slots_offset,
            geo.total_size, int(now))
    raw.put("=III", H_THROTTLE_MULTIPLIER, multiplier, WINDOWS[window], 0)
    # A fresh id per install: watermarks are keyed by it (docs/store.rst).
    raw.put("=Q", H_INSTANCE, int.from_bytes(os.urandom(8), "little") | 1)
    _add_key(raw, geo, names.OVERFLOW_ACCOUNT, names.OVERFLOW_EVENT)
    throttle_slot = _add_key(raw, geo, names.ALL, names.DEFAULT_EVENT)
    raw.put("=I", H_THROTTLE_SLOT, throttle_slot)


def _add_key(raw: _Raw, geo: Geometry, account: str, event: str) -> int:
    """Insert a key the way the C code does (for the reserved keys at
    install).  Caller holds the lock."""
    a, e = account.encode(), event.encode()
    h = fnv1a(a, e)
    mask = geo.index_size - 1
    i = h & mask
    while True:
        off = geo.index_offset + i * INDEX_ENTRY_SIZE
        if raw.u32(off + E_STATE) == 0:
            break
        if raw.buf[off + E_ACCOUNT:off + E_ACCOUNT + len(a)] == a and \
                raw.buf[off + E_ACCOUNT_LEN] == len(a) and raw.buf[off + E_EVENT_LEN] == len(e) \
                and raw.buf[off + E_EVENT:off + E_EVENT + len(e)] == e:
            return raw.u32(off + E_SLOT)
        i = (i + 1) & mask
    slot = raw.u32(H_KEYS_USED)
    # The probe window (probe_limit) covers the new key.
    raw.put("=I", H_PROBE_LIMIT, max(raw.u32(H_PROBE_LIMIT), ((i - h) & mask) + 1))
    raw.put("=IIIBB", off, 0, slot, h, len(a), len(e))
    raw.buf[off + E_ACCOUNT:off + E_ACCOUNT + len(a)] = a
    raw.buf[off + E_EVENT:off + E_EVENT + len(e)] = e
    raw.put("=I", H_KEYS_USED, slot + 1)
    raw.put("=I", off + E_STATE, 1)
    return slot


def _geometry_of(raw: _Raw) -> Geometry:
    return Geometry(keys=raw.u32(H_KEY_CAPACITY), minutes=raw.u32(H_MINUTE_BUCKETS),
                    seconds=raw.u32(H_SECOND_BUCKETS), stripes=raw.u32(H_STRIPES))


def _check_layout(raw: _Raw) -> None:
    fix = ("run `trafficthreshold uninstall --force --key {0:#x}` to remove it, "
           "or choose another --key").format(raw.key)
    if raw.buf.nbytes < HEADER_SIZE or bytes(raw.buf[0:8]) != MAGIC:
        raise LayoutMismatch(f"IPC key {raw.key:#x} holds a segment that is not "
                             f"trafficthreshold's; {fix}")
    if raw.u32(H_VERSION) in (LAYOUT_VERSION_1, LAYOUT_VERSION_2):
        # Written by an older version; its workers may still count into it.
        # uninstall reads layouts 1 and 2, so their counts are not lost.
        raise LayoutMismatch(
            f"the segment at IPC key {raw.key:#x} has layout version {raw.u32(H_VERSION)} (an "
            f"older trafficthreshold); this version writes {LAYOUT_VERSION}; run "
            f"`trafficthreshold uninstall --key {raw.key:#x}` first (it rolls its counts "
            "into the store, then removes it), then install again and restart the workers")
    if raw.u32(H_VERSION) != LAYOUT_VERSION:
        raise LayoutMismatch(f"the segment at IPC key {raw.key:#x} has layout version "
                             f"{raw.u32(H_VERSION)}; this version reads {LAYOUT_VERSION}; {fix}")


def _gid(group: str | int | None) -> int | None:
    if group is None or isinstance(group, int):
        return group
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise SegmentError(f"group {group!r} does not exist; create it (groupadd {group}) "
                           "or name an existing group with --group") from None


def _check_settings(backend: str, geometry: Geometry, mode: int, group: str | int | None,
                    multiplier: int, window: str) -> tuple[int | None, list[str]]:
    """Validate every install option before anything is created; return the
    group id and the warnings to show.  Raises ValueError (or SegmentError
    for a group) naming the option, the value and what is allowed."""
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not valid; use 'sysv' or 'posix'")
    if window not in WINDOWS:
        raise ValueError(f"window {window!r} is not valid; use '60s' or 'minute'")
    geometry.check()
    if not isinstance(multiplier, int) or isinstance(multiplier, bool) \
            or not 0 <= multiplier <= MAX_U32:
        raise ValueError(f"throttle multiplier {multiplier!r} is out of range; use "
                         f"0..{MAX_U32} (0 turns the live level off)")
    if not isinstance(mode, int) or isinstance(mode, bool) or not 0 <= mode <= 0o777:
        raise ValueError(f"--mode {mode!r} is not valid; use permission bits 000..777 (octal)")
    if mode & 0o600 != 0o600:
        raise ValueError(f"--mode {mode:o} takes read and write from the owner; the "
                         "owner needs both (use 660 or 600)")
    _check_size(backend, geometry)
    warnings = []
    if mode & 0o002:
        warnings.append(f"--mode {mode:o} lets every user of this host write the counters "
                        "and the throttle level; use 660 with --group instead")
    gid = _gid(group)
    if gid is not None and os.geteuid() != 0 and gid not in os.getgroups() \
            and gid != os.getegid():
        raise SegmentError(f"cannot give the segment to group {group!r}: this user is "
                           "neither root nor a member of it; run install as root (sudo) "
                           "or join the group")
    return gid, warnings


def _read_int(path: str) -> int | None:
    try:
        with open(path, encoding="ascii") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _size_limit(backend: str) -> tuple[int, str]:
    """The largest segment this host takes, and what sets it: the physical
    memory, and kernel.shmmax / kernel.shmall (SysV) or the free space of
    /dev/shm (POSIX)."""
    page = os.sysconf("SC_PAGE_SIZE")
    limits = [(os.sysconf("SC_PHYS_PAGES") * page, "the physical memory")]
    if backend == "sysv":
        shmmax = _read_int("/proc/sys/kernel/shmmax")
        shmall = _read_int("/proc/sys/kernel/shmall")
        if shmmax is not None:
            limits.append((shmmax, "kernel.shmmax"))
        if shmall is not None:
            limits.append((shmall * page, "kernel.shmall"))
    else:
        st = os.statvfs("/dev/shm")
        limits.append((st.f_bavail * st.f_frsize, "the free space of /dev/shm"))
    return min(limits)


def _check_size(backend: str, geometry: Geometry) -> None:
    """Refuse, before creating anything, a segment the host cannot hold
    (it used to end in a MemoryError or a half-made segment)."""
    limit, what = _size_limit(backend)
    if geometry.total_size > limit:
        raise ValueError(
            f"the segment would be {geometry.total_size:,} bytes, more than {what} "
            f"({limit:,} bytes); lower --keys ({geometry.keys}), --minutes "
            f"({geometry.minutes}) or --stripes ({geometry.stripes})")


@dataclasses.dataclass
class InstallResult:
    created: bool
    backend: str
    key: int
    size: int
    geometry: Geometry
    #: What the caller should show: world-writable modes, permissions that
    #: differ from the ones asked for and could not be changed by this user.
    warnings: list[str] = dataclasses.field(default_factory=list)


def install(key: int = DEFAULT_KEY, backend: str = "sysv", geometry: Geometry = Geometry(),
            mode: int = 0o660, group: str | int | None = None, multiplier: int = 60,
            window: str = "60s", now: float | None = None) -> InstallResult:
    """Create the segment, or check that the existing one matches.

    Every option is checked before anything is created.  Idempotent: an
    existing live segment with the same geometry is left as it is (its
    counts kept; mode and group applied again where they differ and this
    user may change them, else a warning says so).  A half-made segment (an
    installer killed or failed) is finished.  The segment is marked live as
    the last step, under the structural lock.  A segment of another layout
    or geometry is an error naming the fix.  Returns, in ``warnings``, what
    the caller should show.
    """
    gid, warnings = _check_settings(backend, geometry, mode, group, multiplier, window)
    for warning in warnings:
        log.warning("%s", warning)
    now = time.time() if now is None else now
    raw = _Raw(backend, key, create_size=geometry.total_size, mode=mode)
    try:
        if backend == "posix" and os.path.exists(raw.legacy_sem_path):
            raise LayoutMismatch(
                f"the POSIX segment {posix_name(key)} was installed by an older "
                "trafficthreshold that locked it with a POSIX semaphore; run "
                "`trafficthreshold uninstall --backend posix` and install again")
        if not raw.half_made():
            # Read-only checks first: never write a lock word into a
            # segment that is not ours.
            _check_layout(raw)
        if backend == "sysv" and raw.sem is None:
            raise LayoutMismatch(f"the segment at key {key:#x} has no semaphore; run "
                                 f"`trafficthreshold uninstall --force --key {key:#x}` "
                                 "(it rolls the counts up first) and install again")
        with _held(raw):
            if raw.half_made():
                _finish(raw, geometry, mode, gid, multiplier, window, now)
                log.info("installed a %s segment at key %#x, %d bytes", backend, key,
                         geometry.total_size)
                return InstallResult(True, backend, key, geometry.total_size, geometry,
                                     warnings)
            _check_existing(raw, geometry)
        warnings += _reapply_permissions(raw, mode, gid)
        return InstallResult(False, backend, key, raw.buf.nbytes, _geometry_of(raw), warnings)
    except BaseException:
        _undo_create(raw)
        raise
    finally:
        raw.close()


def _finish(raw: _Raw, geometry: Geometry, mode: int, gid: int | None, multiplier: int,
            window: str, now: float) -> None:
    """Format a half-made segment, apply its permissions, then mark it live
    (last: a failure or kill before leaves it half made, which the next
    install finishes and ``uninstall --force`` removes).  Caller holds the
    lock."""
    if raw.buf.nbytes != geometry.total_size:
        raise LayoutMismatch(f"a half-installed segment at key {raw.key:#x} has another "
                             f"size ({raw.buf.nbytes} bytes, these options need "
                             f"{geometry.total_size}); install with its options, or run "
                             f"`trafficthreshold uninstall --force --key {raw.key:#x}`")
    if not raw.created:
        log.warning("finishing the install of a segment whose installer died or failed")
    _format(raw, geometry, multiplier, window, now)
    try:
        raw.set_permissions(mode, gid)
    except PermissionError as exc:
        raise SegmentError(f"cannot apply mode {mode:o}"
                           + (f" and group {gid}" if gid is not None else "")
                           + f" to the segment at key {raw.key:#x} ({exc}); run install as "
                           "root or as the segment's owner") from None
    raw.put("=I", H_STATE, STATE_LIVE)


def _undo_create(raw: _Raw) -> None:
    """After a failed install: remove what this call created and did not
    make live, so a failed install leaves nothing behind."""
    try:
        if raw.created and raw.half_made():
            raw.remove()
    except Exception:  # noqa: BLE001 - the original error matters more
        log.warning("could not remove the half-made segment at key %#x; run "
                    "`trafficthreshold uninstall --force`", raw.key, exc_info=True)


def _check_existing(raw: _Raw, geometry: Geometry) -> None:
    """Check a segment that is not half made.  Caller holds the lock."""
    _check_layout(raw)
    found = _geometry_of(raw)
    if found != geometry:
        raise LayoutMismatch(
            f"a segment is installed at key {raw.key:#x} with --keys {found.keys} "
            f"--minutes {found.minutes} --seconds {found.seconds} --stripes {found.stripes}; "
            "to change its size run `trafficthreshold uninstall` first (counts are "
            "rolled into the store), or install with the same options")
    if raw.u32(H_STATE) == STATE_RETIRED:
        raise SegmentInUse(f"the segment at key {raw.key:#x} is being uninstalled; wait "
                           "for the uninstall to finish, then install again")


def _reapply_permissions(raw: _Raw, mode: int, gid: int | None) -> list[str]:
    """Apply mode and group to an existing segment where they differ and
    this user may (root or the owner); otherwise leave them and return a
    note.  Never raises for permissions: the segment is usable as it is."""
    notes = []
    for what, found_mode, found_gid, owner in raw.permissions():
        if found_mode == mode and (gid is None or found_gid == gid):
            continue
        if os.geteuid() not in (0, owner):
            notes.append(f"the {what} at key {raw.key:#x} has mode {found_mode:o} and group "
                         f"{found_gid}, not {mode:o}"
                         + (f" and group {gid}" if gid is not None else "")
                         + f"; only root or its owner {_user(owner)} may change that: left "
                         "as it is")
            continue
        try:
            raw.set_permissions(mode, gid)
        except PermissionError as exc:
            notes.append(f"could not apply mode {mode:o} to the segment at key "
                         f"{raw.key:#x}: {exc}; left as it is")
        break
    for note in notes:
        log.warning("%s", note)
    return notes


@contextlib.contextmanager
def _held(raw: _Raw, timeout_ms: int = STRUCTURAL_LOCK_MS) -> Iterator[None]:
    """Hold a _Raw's structural lock (the C protocol: SysV with SEM_UNDO,
    POSIX the lock word with dead-owner take-over)."""
    try:
        raw.acquire(timeout_ms)
    except SegmentBusy as exc:
        raise SegmentBusy(f"{exc}; another install or uninstall may be running, or the "
                          "holder is stopped (SIGSTOP, a debugger); if it stays so, run "
                          f"`trafficthreshold uninstall --force --key {raw.key:#x}`") from None
    try:
        yield
    finally:
        raw.release()


# ------------------------------------------------------------------- attach

def attach(key: int = DEFAULT_KEY, backend: str = "sysv", stripe: int | None = None) -> Counter:
    """Attach to an installed segment: raises SegmentNotFound/LayoutMismatch."""
    return Counter(backend, key, stripe)


@contextlib.contextmanager
def locked(counter: Counter, timeout_ms: int = STRUCTURAL_LOCK_MS) -> Iterator[Counter]:
    """Hold the segment's structural lock (the hot path's, through C) for
    structural work; raises SegmentBusy after ``timeout_ms``."""
    counter.lock(timeout_ms)
    try:
        yield counter
    finally:
        counter.unlock()


def header(counter: Counter) -> dict[str, int]:
    """Every header field a person or the supervisor reads, by name."""
    return {name: counter.load(off, width) for name, (off, width) in HEADER_FIELDS.items()}


def _map_marker(key: int, backend: str) -> str:
    # SysV mappings show as "/SYSV<key, 8 hex digits> (deleted)".
    return f"/SYSV{key:08x} " if backend == "sysv" else f"/dev/shm{posix_name(key)}"


def _maps_mention(pid: int | str, marker: str) -> bool:
    try:
        with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as maps:
            return any(marker in line for line in maps)
    except OSError:
        return False


def attached_pids(key: int, backend: str) -> list[int]:
    """Other processes that map the segment, read from /proc/*/maps.

    Works for both backends as far as this user may read other processes'
    maps (root sees all)."""
    marker = _map_marker(key, backend)
    return sorted(int(entry) for entry in os.listdir("/proc")
                  if entry.isdigit() and int(entry) != os.getpid()
                  and _maps_mention(entry, marker))


def attached_count(raw: "_Raw") -> int:
    """How many other processes have the segment attached.  SysV counts
    attachments in the kernel (minus our own); POSIX has no such count, so
    /proc is read."""
    if raw.backend == "sysv":
        marker = _map_marker(raw.key, raw.backend)
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            ours = sum(1 for line in maps if marker in line)
        return max(0, raw.shm.number_attached - ours)
    return len(attached_pids(raw.key, raw.backend))


RollUp = Callable[[Counter], object]


def uninstall(key: int = DEFAULT_KEY, backend: str = "sysv", force: bool = False,
              rollup: RollUp | None = None) -> dict[str, object]:
    """Roll the pending counts up, retire, and remove the segment and its
    semaphore.  Nothing is changed unless the removal can follow:

    1. this user must be allowed to remove every object (root, or the
       owner or creator): else SegmentError naming the owner, nothing done;
    2. other processes attached: SegmentInUse unless ``force``;
    3. ``rollup(counter)`` (the final roll-up, which the CLI passes; it must
       be repeatable, as the watermarked roll-up is) runs on the still live
       segment; if it raises, the uninstall stops and the segment stays live;
    4. the segment is marked retired (attached workers let go of it and
       re-attach to the next install), and ``rollup`` runs again for what
       was counted meanwhile; if that raises, the segment is marked live
       again and the uninstall stops;
    5. both objects are removed.

    Without ``rollup`` (``--no-rollup``) pending counts are lost, but the
    segment is still retired first.  ``force`` also removes a segment whose
    lock cannot be taken or whose semaphore vanished, and a semaphore left
    without its segment.  Returns what was removed."""
    try:
        raw = _Raw(backend, key)
    except SegmentNotFound:
        if force and _remove_orphan_semaphore(key, backend):
            what = f"semaphore left without its segment at key {key:#x}"
            return {"removed": what, "size": 0, "attached": 0}
        raise
    try:
        _check_may_remove(raw)
        others = attached_count(raw)
        if others > 0 and not force:
            pids = attached_pids(key, backend)
            raise SegmentInUse(
                f"{others} {'process is' if others == 1 else 'processes are'} still attached "
                f"to the segment at key {key:#x}"
                + (f" (pids {', '.join(map(str, pids))})" if pids else "")
                + "; stop the web workers and the daemon first, or use --force")
        ours = raw.buf.nbytes >= HEADER_SIZE and bytes(raw.buf[0:8]) == MAGIC
        live = ours and raw.u32(H_STATE) == STATE_LIVE
        if live and rollup is not None:
            _roll_up(backend, key, rollup, "the segment is left live, nothing was removed")
        if ours and raw.u32(H_STATE) != STATE_RETIRED:
            _set_state(raw, STATE_RETIRED, force)
        if live and rollup is not None:
            try:
                _roll_up(backend, key, rollup, "the segment was made live again, nothing "
                         "was removed")
            except SegmentError:
                _set_state(raw, STATE_LIVE, True)
                raise
        size = raw.buf.nbytes
        raw.remove()
        what = (f"SysV segment and semaphore at key {key:#x}" if backend == "sysv"
                else f"POSIX segment {posix_name(key)}")
        log.info("removed the %s (%d bytes, %d processes were attached)", what, size, others)
        return {"removed": what, "size": size, "attached": others}
    finally:
        raw.close()


def _check_may_remove(raw: _Raw) -> None:
    """Refuse, before anything is changed, an uninstall this user could not
    finish: removing needs root or the owner (or creator) of each object."""
    for what, uids in raw.owners():
        if not _euid_may_remove(uids):
            raise SegmentError(
                f"{what} at key {raw.key:#x} belongs to {_user(uids[0])}; this user "
                f"({_user(os.geteuid())}) may use it but not remove it; run "
                "`trafficthreshold uninstall` as root or as that user (nothing was changed)")


def _set_state(raw: _Raw, state: int, force: bool) -> None:
    """Store the segment's state under the structural lock; with ``force``,
    without it when it cannot be had (a vanished semaphore, a stuck
    holder): the state is one aligned 4-byte store, which workers read with
    acquire order."""
    try:
        with _held(raw, FORCE_LOCK_MS if force else STRUCTURAL_LOCK_MS):
            raw.put("=I", H_STATE, state)
        return
    except (SegmentBusy, SegmentNotFound) as exc:
        if not force:
            raise
        log.warning("changing the state without the lock (%s)", exc)
    raw.put("=I", H_STATE, state)


def _roll_up(backend: str, key: int, rollup: RollUp, stopped: str) -> None:
    """Run the final roll-up on a reader attachment (it takes no lock, so a
    segment without its semaphore is read too); turn its failure into a
    SegmentError that says why the uninstall stopped."""
    counter = Counter(backend, key, retired_ok=True)
    try:
        rollup(counter)
    except Exception as exc:  # noqa: BLE001 - any failure stops the uninstall
        raise SegmentError(
            f"uninstall stopped: the final roll-up failed ({type(exc).__name__}: {exc}); "
            f"{stopped}; fix the cause and run uninstall again, or pass --no-rollup to "
            "discard the pending counts") from exc
    finally:
        counter.detach()


def _remove_orphan_semaphore(key: int, backend: str) -> bool:
    """Remove a semaphore whose segment is gone (an install killed between
    the two, or an older version's POSIX semaphore).  Returns whether one
    was removed."""
    try:
        if backend == "sysv":
            sysv_ipc.Semaphore(key).remove()
        else:
            os.unlink("/dev/shm/sem." + posix_name(key)[1:])
    except (sysv_ipc.ExistentialError, FileNotFoundError):
        return False
    log.info("removed a semaphore left without its segment at key %#x", key)
    return True


# ------------------------------------------------------------ header repair

def header_problems(counter: Counter, key: int | None = None,
                    backend: str | None = None) -> list[str]:
    """What is wrong in the header fields the supervisor and the readers
    use (empty when nothing): a throttle slot that is not the slot of
    ("all", "pageview"), an unknown throttle window, a level above 5, a
    ``probe_limit`` of 0 or above ``index_size``; given the segment's
    ``key`` and ``backend``, the limit is checked against the key index
    too (:func:`probe_limit_problems`: keys past a limit too small, a name
    split into two slots).  The C readers already survive the throttle
    fields (an out-of-range slot reads as level 0, an unknown window as the
    sliding 60 s) and a limit of 0 or too large (read as the whole index);
    this names them so the supervisor can log and repair them
    (:func:`repair_header`).  Lock-free."""
    problems = []
    slot = counter.load(H_THROTTLE_SLOT, 4)
    want = counter.find(None, names.DEFAULT_EVENT)
    if want is not None and slot != want:
        problems.append(f"throttle_slot is {slot}, not {want}, the slot of "
                        f"('all', {names.DEFAULT_EVENT!r})")
    window = counter.load(H_THROTTLE_WINDOW, 4)
    if window not in WINDOWS.values():
        problems.append(f"throttle_window is {window}; known: "
                        + ", ".join(f"{v} ({k})" for k, v in WINDOWS.items()))
    level = counter.load(H_THROTTLE_LEVEL, 4)
    if level > 5:
        problems.append(f"throttle_level is {level}; levels are 0..5")
    if key is not None and backend is not None:
        return problems + probe_limit_problems(counter, key, backend)
    return problems + _limit_value_problem(counter.load(H_PROBE_LIMIT, 4),
                                           counter.load(H_INDEX_SIZE, 4))


@contextlib.contextmanager
def _index_view(key: int, backend: str) -> Iterator[memoryview]:
    """The segment's bytes, mapped for reading without the C module (the
    key index is not exported by it).  Raises SegmentNotFound."""
    try:
        if backend == "sysv":
            shm = sysv_ipc.SharedMemory(key)
            view = memoryview(shm)
            try:
                yield view
            finally:
                view.release()
                shm.detach()
            return
        shm = posix_ipc.SharedMemory(posix_name(key))
    except (sysv_ipc.ExistentialError, posix_ipc.ExistentialError):
        raise SegmentNotFound(f"no segment at key {key:#x}") from None
    mapped = mmap.mmap(shm.fd, os.fstat(shm.fd).st_size, prot=mmap.PROT_READ)
    shm.close_fd()
    view = memoryview(mapped)
    try:
        yield view
    finally:
        view.release()
        mapped.close()


def _ready_entries(view: memoryview, names: bool = True
                   ) -> list[tuple[int, int, int, bytes | None, bytes | None]]:
    """(entry, distance from its key's first entry, slot, account, event)
    of every ready index entry (account and event None without
    ``names``).  Every entry's state is read first: an entry is published
    (state = ready, release) after its fields and after the probe_limit
    that covers it.  The states are read as one strided slice (C speed),
    then the hash and slot of the ready entries only, and their names only
    with ``names``: an index of 2 million entries, 200,000 of them ready,
    in about 0.2 s."""
    size = struct.unpack_from("=I", view, H_INDEX_SIZE)[0]
    (base,) = struct.unpack_from("=Q", view, H_INDEX_OFFSET)
    if size == 0 or size & (size - 1) or base + size * INDEX_ENTRY_SIZE > view.nbytes:
        return []  # a damaged geometry: attach refuses it, status reports it
    stride, mask = INDEX_ENTRY_SIZE // 4, size - 1
    with view[base:base + size * INDEX_ENTRY_SIZE] as index, index.cast("I") as words:
        with words[E_STATE // 4::stride] as column:
            states = column.tolist()
        ready = itertools.compress(range(size), map(ENTRY_READY.__eq__, states))
        h, s = E_HASH // 4, E_SLOT // 4
        found = [(i, (i - words[i * stride + h]) & mask, words[i * stride + s]) for i in ready]
    if not names:
        return [(i, d, slot, None, None) for i, d, slot in found]
    return [(i, d, slot, *_entry_name(view, base, i)) for i, d, slot in found]


def _entry_name(view: memoryview, base: int, i: int) -> tuple[bytes, bytes]:
    """The (account, event) of index entry ``i``."""
    off = base + i * INDEX_ENTRY_SIZE
    alen, elen = view[off + E_ACCOUNT_LEN], view[off + E_EVENT_LEN]
    return (bytes(view[off + E_ACCOUNT:off + E_ACCOUNT + alen]),
            bytes(view[off + E_EVENT:off + E_EVENT + elen]))


def _limit_value_problem(limit: int, size: int) -> list[str]:
    """0 or a value above ``index_size``: no writer stores either."""
    if limit == 0 or limit > size:
        return [f"probe_limit is {limit}, not 1..{size} (index_size): every probe reads up "
                "to an empty entry"]
    return []


def probe_limit_problems(counter: Counter, key: int, backend: str,
                         names: bool = True) -> list[str]:
    """What is wrong with the header's ``probe_limit`` (empty when
    nothing), checked against the key index itself: 0 or a value above
    ``index_size`` (no writer stores either: every probe then reads up to
    an empty entry, the whole index once keys came and went); a ready key
    that lies as far as the limit or farther from its first entry (a
    lock-free probe stops short of it: a reader misses it, and a writer
    inserts the name a second time); a name in two ready entries (its hits
    are split between two slots: each reader sees a part).  The entries
    are read before the limit (a writer raises the limit before it
    publishes an entry past it), inside :func:`read_consistently` (a reclaim
    lowers it after it removed entries).  Lock-free: reads the index once.
    Without ``names`` (the supervisor's check each minute), a name split
    into two slots is not looked for, and only the keys past the limit
    have their names read."""
    size = counter.load(H_INDEX_SIZE, 4)

    def scan() -> tuple[list[tuple[int, int, int, bytes | None, bytes | None]], int]:
        with _index_view(key, backend) as view:
            entries = _ready_entries(view, names)
            limit = counter.load(H_PROBE_LIMIT, 4)
            if not names and 0 < limit <= size:
                (base,) = struct.unpack_from("=Q", view, H_INDEX_OFFSET)
                entries = [(e, d, slot, *_entry_name(view, base, e))
                           for e, d, slot, _a, _v in entries if d >= limit]
        return entries, limit

    problems: list[str] = []
    got, skip = read_consistently(counter, scan)
    if got is None:  # the index moved during every read: checked again next time
        return _limit_value_problem(counter.load(H_PROBE_LIMIT, 4), size)
    entries, limit = got
    problems += _limit_value_problem(limit, size)
    where: dict[tuple[bytes, bytes], list[int]] = {}
    for entry, distance, slot, account, event in entries:
        if slot in skip:
            continue
        where.setdefault((account, event), []).append(slot)
        if 0 < limit <= size and distance >= limit:
            problems.append(f"probe_limit is {limit}: the key ({account!r}, {event!r}) in slot "
                            f"{slot} lies {distance + 1} entries from its first (index entry "
                            f"{entry}); probes miss it and a writer would insert it again")
    for (account, event), slots in where.items():
        if names and len(slots) > 1:
            problems.append(f"the key ({account!r}, {event!r}) is in slots "
                            f"{', '.join(map(str, sorted(slots)))}: its hits are split "
                            "between them")
    return problems


def repair_probe_limit(counter: Counter, key: int, backend: str,
                       timeout_ms: int = STRUCTURAL_LOCK_MS) -> int:
    """Store ``probe_limit`` anew from the key index, as the C core does
    after a reclaim: one more than the farthest a ready key lies from its
    first entry, and at least as far as the entry of an insert killed half
    way (its record ``insert_entry`` set: the next writer that takes the
    lock publishes it where it is).  Under the lock: no insert moves the
    index meanwhile.  Returns the limit stored; raises SegmentBusy after
    ``timeout_ms``."""
    with locked(counter, timeout_ms), _index_view(key, backend) as view:
        size = counter.load(H_INDEX_SIZE, 4)
        far = max((d for _e, d, _s, _a, _v in _ready_entries(view, names=False)), default=0)
        pending = counter.load(H_INSERT_ENTRY, 4)
        if counter.load(H_INSERT_SLOT, 4) and 0 < pending <= size:
            (h,) = struct.unpack_from("=I", view, counter.load(H_INDEX_OFFSET, 8)
                                      + (pending - 1) * INDEX_ENTRY_SIZE + E_HASH)
            far = max(far, (pending - 1 - h) & (size - 1))
        counter.store(H_PROBE_LIMIT, 4, far + 1)
        return far + 1


def repair_header(counter: Counter, window: str = "60s", key: int | None = None,
                  backend: str | None = None) -> list[str]:
    """Repair what :func:`header_problems` finds: the throttle slot found
    again in the index, an unknown window set to ``window`` (the
    configured one), a level above 5 set to 0 (the supervisor sets the
    right one on its next tick).  Given the segment's ``key`` and
    ``backend``, also what :func:`probe_limit_problems` finds: the limit is
    stored anew from the index (:func:`repair_probe_limit`, under the
    lock; without them, a limit of 0 or above ``index_size`` is left as it
    is: probes read farther, never miss a key).  A name already split
    into two slots stays reported (both slots hold counts; ``uninstall``
    rolls both).  Returns the problems found.  The throttle fields are the
    supervisor's, written with atomic stores: no lock."""
    problems = header_problems(counter, key, backend)
    want = counter.find(None, names.DEFAULT_EVENT)
    if want is not None and counter.load(H_THROTTLE_SLOT, 4) != want:
        counter.store(H_THROTTLE_SLOT, 4, want)
    if counter.load(H_THROTTLE_WINDOW, 4) not in WINDOWS.values():
        counter.store(H_THROTTLE_WINDOW, 4, WINDOWS[window])
    if counter.load(H_THROTTLE_LEVEL, 4) > 5:
        counter.store(H_THROTTLE_LEVEL, 4, 0)
    if key is not None and backend is not None and any(
            p.startswith("probe_limit") for p in problems):
        try:
            repair_probe_limit(counter, key, backend)
        except SegmentBusy as exc:  # the lock stays held: tried again at the next check
            log.warning("could not repair probe_limit: %s", exc)
    for problem in problems:
        log.warning("repaired the segment header: %s", problem)
    return problems


# ------------------------------------------------------------------ reclaim

#: How long reclaim() waits for the lock, per key (the lock is held for
#: microseconds; hits wait on it 50 ms at most).
RECLAIM_LOCK_MS = 1000


def reclaim_before(counter: Counter, now: float, rolled_through: int | None) -> int | None:
    """The minute before which every bucket of a key must lie for the key to
    be reclaimed at ``now``: before the ring's oldest minute (idle for longer
    than the ring) and after nothing not yet rolled (``rolled_through``, the
    store's last closed minute).  None when nothing was rolled yet."""
    if rolled_through is None:
        return None
    ring = counter.load(H_MINUTE_BUCKETS, 4)
    return min(int(now // 60) - ring + 1, rolled_through + 1)


def reclaim(counter: Counter, now: float, rolled_through: int | None,
            timeout_ms: int = RECLAIM_LOCK_MS) -> list[tuple[int, str, str]]:
    """Give back the slots of the keys idle for longer than the ring whose
    counts are rolled (:func:`reclaim_before`); return them as (slot,
    account, event).  Slot 0 (overflow), slot 1 and ``throttle_slot``
    (``("all", "pageview")``) are never reclaimed; the ``all`` key of another
    event is, once idle like the others (its accounts, which every hit of the
    event also counts into, are then idle too).  Takes the lock per key
    (the C module, Counter.reclaim); ``now`` is passed in.  A worker that
    cached a reclaimed key's slot finds out at its next hit of that key and
    counts it in the key's new slot (docs/segment.rst, "Reclaim")."""
    before = reclaim_before(counter, now, rolled_through)
    if before is None or before <= 0:
        return []
    done = counter.reclaim(before, timeout_ms)
    if done:
        log.info("reclaimed %d idle key slots (no bucket since before minute %d), e.g. %s",
                 len(done), before, ", ".join(f"{a}/{e}" for _s, a, e in done[:3]))
    return done


def keys_version(counter: Counter) -> tuple[int, int, int]:
    """What moves when slot -> name may change: (keys_used, reclaimed,
    index_seq).  Readers that cache ``keys()`` re-read it when this differs
    (a reclaimed slot keeps keys_used and may get a new key).  index_seq is
    odd while a reclaim is under way (docs/segment.rst, "Reclaim")."""
    return (counter.load(H_KEYS_USED, 4), counter.load(H_RECLAIMED, 8),
            counter.load(H_INDEX_SEQ, 8))


#: How often a reader reads names and counts again when a reclaim moved the
#: index meanwhile, before it gives up and reports it.
CONSISTENT_READ_TRIES = 50

T = TypeVar("T")


def read_consistently(counter: Counter, read: Callable[[], T],
                      tries: int = CONSISTENT_READ_TRIES) -> tuple[T | None, set[int]]:
    """``read()`` (which reads names and counts, lock-free) again until the
    key index did not change while it ran, so that no count is ever named
    with another key's name (a slot reclaimed and given to a new key between
    the read of its name and of its count).  Returns (result, slots to
    skip): while a reclaim stays under way (its reclaimer died; the next
    lock holder finishes it) the read is kept, minus that one slot.  After
    ``tries`` reads that all saw the index change, (None, set()): the caller
    reports it instead of naming counts.  Takes no lock."""
    for _ in range(tries):
        before = keys_version(counter)
        result = read()
        after = keys_version(counter)
        if before == after:
            if before[2] % 2 == 0:
                return result, set()
            under_way = counter.load(H_RECLAIM_SLOT, 4)
            return result, {under_way - 1} if under_way else set()
    return None, set()


class KeyNames:
    """A reader's cache of slot -> (account, event), read again from the
    index when :func:`keys_version` moved (keys added or reclaimed) or when
    asked about a slot it has no name for (a key published after the last
    read).  Keys whose name bytes are not UTF-8 (:func:`split_keys`) are
    kept apart in ``bad``."""

    def __init__(self) -> None:
        self.names: dict[int, tuple[str, str]] = {}
        self.bad: dict[int, tuple[str, str]] = {}
        self._version: tuple[int, int] | None = None

    def read(self, counter: Counter, slots: Iterable[int] = ()) -> dict[int, tuple[str, str]]:
        """The names, current for every slot of ``slots`` that has one."""
        version = keys_version(counter)
        if version != self._version or any(s not in self.names and s not in self.bad
                                           for s in slots):
            good, bad = split_keys(counter)
            self.names = {slot: (a, e) for slot, a, e in good}
            self.bad = {slot: (a, e) for slot, a, e in bad}
            self._version = version
        return self.names


def split_keys(counter: Counter, past: list | None = None
               ) -> tuple[list[tuple[int, str, str]], list[tuple[int, str, str]]]:
    """``counter.keys()`` split into (keys with UTF-8 names, keys whose name
    bytes are not UTF-8).  ``keys()`` decodes with ``surrogateescape``, so a
    name a foreign writer stored in another encoding comes back as a str
    with lone surrogates (U+DC80..U+DCFF) instead of raising; such a name
    cannot be encoded to UTF-8, stored or served: callers skip and report
    the second list.  Entries whose slot is past the key table are left out
    by ``keys()``; given a list ``past``, they are appended to it as (entry,
    (slot, account, event)) (:func:`describe_past_table` reports them)."""
    good, bad = [], []
    for slot, account, event in (counter.keys() if past is None else counter.keys(past)):
        try:
            account.encode("utf-8")
            event.encode("utf-8")
        except UnicodeEncodeError:
            bad.append((slot, account, event))
        else:
            good.append((slot, account, event))
    return good, bad


def describe_past_table(past: list[tuple[int, tuple[int, str, str]]]) -> list[str]:
    """One damage line per index entry whose slot is past the key table
    (``Counter.keys(damaged)``): its count cannot be read, so readers leave
    it out and say so."""
    return [f"key index entry {entry} ({account.encode('utf-8', 'surrogateescape')!r}, "
            f"{event.encode('utf-8', 'surrogateescape')!r}) points at slot {slot}, past the "
            "key table; left out"
            for entry, (slot, account, event) in past]

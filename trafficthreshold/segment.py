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
* ``posix``: ``/dev/shm/trafficthreshold-<key in hex>`` and a POSIX named
  semaphore of the same name.  POSIX semaphores have no undo: the holder's
  pid is kept in the header and a waiter that times out releases the lock of
  a holder that no longer exists.
"""
from __future__ import annotations

import contextlib
import dataclasses
import grp
import logging
import mmap
import os
import random
import struct
import time
from typing import Iterator

import posix_ipc
import sysv_ipc

from . import names
from ._counter import Counter, _sysv_semop
from .errors import LayoutMismatch, SegmentBusy, SegmentError, SegmentInUse, SegmentNotFound

log = logging.getLogger("trafficthreshold.segment")

DEFAULT_KEY = 0x54546831  # "TTh1"
BACKENDS = ("sysv", "posix")

MAGIC = b"TRFTHRSH"
LAYOUT_VERSION = 1
HEADER_SIZE = 4096
INDEX_ENTRY_SIZE = 128
BUCKET_SIZE = 16
OVERFLOW_SLOT = 0
EVENT_RESERVE = 16
CACHE_LINE = 64
PAGE = 4096

# Header offsets (the comment in _counter.c says what each field means).
H_MAGIC = 0
H_VERSION = 8
H_HEADER_SIZE = 12
H_KEY_CAPACITY = 16
H_INDEX_SIZE = 20
H_MINUTE_BUCKETS = 24
H_SECOND_BUCKETS = 28
H_STRIPES = 32
H_STRIPE_SIZE = 36
H_SLOT_SIZE = 40
H_INDEX_OFFSET = 48
H_SLOTS_OFFSET = 56
H_TOTAL_SIZE = 64
H_CREATED_AT = 72
H_THROTTLE_MULTIPLIER = 80
H_THROTTLE_WINDOW = 84
H_THROTTLE_LEVEL = 88
H_STATE = 92
H_HEARTBEAT_MS = 96
H_SUPERVISOR_PID = 104
H_THROTTLE_SLOT = 108
H_LOCK_OWNER_PID = 112
H_THROTTLE_SINCE_MS = 120
H_KEYS_USED = 128
H_NEXT_STRIPE = 132
H_OVERFLOW_HITS = 136
H_DROPPED_HITS = 144
H_ATTACHES = 152
H_INSTANCE = 160

# Index entry offsets.
E_STATE = 0
E_SLOT = 4
E_HASH = 8
E_ACCOUNT_LEN = 12
E_EVENT_LEN = 13
E_ACCOUNT = 16
E_EVENT = 80

STATE_INSTALLING = 0
STATE_LIVE = 1
STATE_RETIRED = 2

# Timings of the hot path, fixed in _counter.c (not part of the bytes, but a
# writer in another language should behave the same way).
HOT_LOCK_TIMEOUT_MS = 50   # semaphore wait of hit(); then the hit is dropped
HEARTBEAT_STALE_MS = 10000  # supervisor level older than this is ignored
ATTACH_RETRY_S = 10        # a process without a segment retries this often

WINDOWS = {"60s": 0, "minute": 1}
STRUCTURAL_LOCK_MS = 5000

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
        if self.keys < EVENT_RESERVE + 2 or self.keys > 1 << 20:
            raise ValueError(f"--keys {self.keys} is out of range; use {EVENT_RESERVE + 2}..1048576")
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
    def slots_offset(self) -> int:
        end = self.index_offset + self.index_size * INDEX_ENTRY_SIZE
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

class _Raw:
    """A writable view of a segment plus its semaphore, for install/uninstall."""

    def __init__(self, backend: str, key: int, create_size: int = 0, mode: int = 0o660):
        self.backend, self.key = backend, key
        self.created = False
        if backend == "sysv":
            self._open_sysv(create_size, mode)
        else:
            self._open_posix(create_size, mode)

    def _open_sysv(self, create_size: int, mode: int) -> None:
        if create_size:
            sem = None
            try:
                # The semaphore first, at 0: whoever creates it holds the
                # segment until the header is written.
                sem = sysv_ipc.Semaphore(self.key, sysv_ipc.IPC_CREX, mode, 0)
                # init_character: sysv_ipc fills a new segment with
                # spaces by default; the layout needs zeros.
                self.shm = sysv_ipc.SharedMemory(self.key, sysv_ipc.IPC_CREX, mode,
                                                 create_size, init_character=b"\0")
                self.sem, self.created = sem, True
            except sysv_ipc.ExistentialError:
                # A segment exists without a semaphore (a foreign one, or
                # ours after `ipcrm -s`): a semaphore made here, at 0, would
                # lock it for good.  Take it back.
                if sem is not None:
                    sem.remove()
        if not self.created:
            try:
                self.shm = sysv_ipc.SharedMemory(self.key)
            except sysv_ipc.ExistentialError:
                raise SegmentNotFound(
                    f"no trafficthreshold segment at SysV IPC key {self.key:#x}; "
                    "run `trafficthreshold install`") from None
            try:
                self.sem = sysv_ipc.Semaphore(self.key)
            except sysv_ipc.ExistentialError:
                self.sem = None
        self.buf = memoryview(self.shm)

    def _open_posix(self, create_size: int, mode: int) -> None:
        name = posix_name(self.key)
        if create_size:
            sem = None
            try:
                sem = posix_ipc.Semaphore(name, posix_ipc.O_CREX, mode, 0)
                self.shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode, create_size)
                self.sem, self.created = sem, True
            except posix_ipc.ExistentialError:
                if sem is not None:  # see _open_sysv
                    sem.unlink()
                    sem.close()
        if not self.created:
            try:
                self.shm = posix_ipc.SharedMemory(name)
            except posix_ipc.ExistentialError:
                raise SegmentNotFound(
                    f"no trafficthreshold segment at POSIX name {name}; run "
                    "`trafficthreshold install --backend posix`") from None
            try:
                self.sem = posix_ipc.Semaphore(name)
            except posix_ipc.ExistentialError:
                self.sem = None
        self.map = mmap.mmap(self.shm.fd, self.shm.size)
        self.buf = memoryview(self.map)

    def u32(self, off: int) -> int:
        return struct.unpack_from("=I", self.buf, off)[0]

    def u64(self, off: int) -> int:
        return struct.unpack_from("=Q", self.buf, off)[0]

    def put(self, fmt: str, off: int, *values: object) -> None:
        struct.pack_into(fmt, self.buf, off, *values)

    def acquire_sem(self, timeout_ms: int) -> None:
        """Take the semaphore (SysV: with SEM_UNDO) or raise SegmentBusy."""
        if self.backend == "sysv":
            _sysv_semop(self.sem.id, -1, timeout_ms)
            return
        try:
            self.sem.acquire(timeout_ms / 1000)
        except posix_ipc.BusyError:
            raise SegmentBusy(f"the segment semaphore stayed busy for {timeout_ms} ms") from None

    def open_sem(self) -> None:
        """Raise the semaphore from 0 to 1 without undo: the creator ends the
        install this way (an undo record would take it back to 0 when the
        creator exits), and so does the recovery of a dead creator's."""
        if self.backend == "sysv":
            self.sem.value = 1
        else:
            self.sem.release()

    def creator_alive(self) -> bool:
        """Whether the process that created the segment still runs (SysV
        keeps its pid; for POSIX we cannot know and answer False)."""
        if self.backend != "sysv":
            return False
        try:
            os.kill(self.shm.creator_pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def release_sem(self) -> None:
        """Give the semaphore back.  SysV: with SEM_UNDO, so that this
        undoes the adjustment of acquire_sem()."""
        if self.sem is None:
            return
        if self.backend == "sysv":
            _sysv_semop(self.sem.id, 1, 0)
        else:
            self.sem.release()

    def set_permissions(self, mode: int, gid: int | None) -> None:
        """Apply mode and group to the segment and its semaphore."""
        if self.backend == "sysv":
            for obj in (self.shm, self.sem):
                if obj is None:
                    continue
                obj.mode = mode
                if gid is not None:
                    obj.gid = gid
            return
        sem_path = "/dev/shm/sem." + posix_name(self.key)[1:]
        os.fchmod(self.shm.fd, mode)
        if gid is not None:
            os.fchown(self.shm.fd, -1, gid)
        if os.path.exists(sem_path):
            os.chmod(sem_path, mode)
            if gid is not None:
                os.chown(sem_path, -1, gid)

    def close(self) -> None:
        self.buf.release()
        if self.backend == "sysv":
            self.shm.detach()
        else:
            self.map.close()
            self.shm.close_fd()
            if self.sem is not None:
                self.sem.close()

    def remove(self) -> None:
        """Remove the segment and semaphore (they vanish once all detach)."""
        if self.backend == "sysv":
            self.shm.remove()
            if self.sem is not None:
                self.sem.remove()
        else:
            self.shm.unlink()
            if self.sem is not None:
                self.sem.unlink()


def _format(raw: _Raw, geo: Geometry, multiplier: int, window: str, now: float) -> None:
    """Write the header and the reserved keys.  Caller holds the semaphore
    (the creator holds it from creation, at value 0)."""
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
    # Live last: workers attach only to a segment whose header is complete.
    raw.put("=I", H_STATE, STATE_LIVE)


def _add_key(raw: _Raw, geo: Geometry, account: str, event: str) -> int:
    """Insert a key the way the C code does (for the reserved keys at
    install).  Caller holds the semaphore."""
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


@dataclasses.dataclass
class InstallResult:
    created: bool
    backend: str
    key: int
    size: int
    geometry: Geometry


def install(key: int = DEFAULT_KEY, backend: str = "sysv", geometry: Geometry = Geometry(),
            mode: int = 0o660, group: str | int | None = None, multiplier: int = 60,
            window: str = "60s", now: float | None = None) -> InstallResult:
    """Create the segment, or check that the existing one matches.

    Idempotent: an existing live segment with the same geometry is left as it
    is (its counts kept; mode and group applied again).  A segment of another
    layout or geometry is an error naming the fix.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not valid; use 'sysv' or 'posix'")
    if window not in WINDOWS:
        raise ValueError(f"window {window!r} is not valid; use '60s' or 'minute'")
    geometry.check()
    gid = _gid(group)
    now = time.time() if now is None else now
    raw = _Raw(backend, key, create_size=geometry.total_size, mode=mode)
    try:
        if raw.created:
            _format(raw, geometry, multiplier, window, now)
            raw.set_permissions(mode, gid)
            raw.open_sem()
            log.info("installed a %s segment at key %#x, %d bytes", backend, key,
                     geometry.total_size)
            return InstallResult(True, backend, key, geometry.total_size, geometry)
        _adopt_existing(raw, geometry, multiplier, window, now)
        raw.set_permissions(mode, gid)
        return InstallResult(False, backend, key, raw.buf.nbytes, _geometry_of(raw))
    finally:
        raw.close()


def _adopt_existing(raw: _Raw, geometry: Geometry, multiplier: int, window: str,
                    now: float) -> None:
    """Check an existing segment; finish it if an install died half-way."""
    if raw.sem is None:
        if bytes(raw.buf[0:8]) != MAGIC:
            _check_layout(raw)  # someone else's segment: say so
        raise LayoutMismatch(f"the segment at key {raw.key:#x} has no semaphore; run "
                             f"`trafficthreshold uninstall --force --key {raw.key:#x}` "
                             "and install again")
    half_done = raw.u32(H_STATE) == STATE_INSTALLING
    if half_done and raw.sem.value == 0 and not raw.creator_alive():
        # The installer died holding the semaphore it was created with.
        log.warning("finishing the install of a segment whose installer died")
        raw.open_sem()
    with _held(raw):
        if bytes(raw.buf[0:8]) in (b"\0" * 8, MAGIC) and raw.u32(H_STATE) == STATE_INSTALLING:
            # An installer died between creating and formatting: finish it.
            if raw.buf.nbytes != geometry.total_size:
                raise LayoutMismatch(f"a half-installed segment at key {raw.key:#x} has "
                                     "another size; run `trafficthreshold uninstall --force`")
            _format(raw, geometry, multiplier, window, now)
            return
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


@contextlib.contextmanager
def _held(raw: _Raw, timeout_ms: int = STRUCTURAL_LOCK_MS) -> Iterator[None]:
    """Hold a _Raw's semaphore (SysV with undo)."""
    try:
        raw.acquire_sem(timeout_ms)
    except SegmentBusy:
        raise SegmentBusy(f"the segment semaphore stayed busy for {timeout_ms} ms; another "
                          "install or uninstall may be running, or a process holding it is "
                          "stopped (see lock_owner_pid in `trafficthreshold status`)") from None
    try:
        yield
    finally:
        raw.release_sem()


# ------------------------------------------------------------------- attach

def attach(key: int = DEFAULT_KEY, backend: str = "sysv", stripe: int | None = None) -> Counter:
    """Attach to an installed segment: raises SegmentNotFound/LayoutMismatch."""
    return Counter(backend, key, stripe)


@contextlib.contextmanager
def locked(counter: Counter, timeout_ms: int = STRUCTURAL_LOCK_MS) -> Iterator[Counter]:
    """Hold the segment semaphore for structural work."""
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


def uninstall(key: int = DEFAULT_KEY, backend: str = "sysv", force: bool = False,
              before_remove=None) -> dict[str, object]:
    """Retire and remove the segment and its semaphore.

    Refuses while other processes are attached, unless ``force``.  The
    segment is first marked retired (workers let go of it and fail open);
    ``before_remove(counter)`` then runs (the supervisor's final roll-up)
    before anything is removed.  Returns what was removed."""
    raw = _Raw(backend, key)
    try:
        others = attached_count(raw)
        if others > 0 and not force:
            pids = attached_pids(key, backend)
            raise SegmentInUse(
                f"{others} process(es) still attached to the segment at key {key:#x}"
                + (f" (pids {', '.join(map(str, pids))})" if pids else "")
                + "; stop the web workers and the daemon first, or use --force")
        live = bytes(raw.buf[0:8]) == MAGIC and raw.u32(H_STATE) == STATE_LIVE
        if live and raw.sem is not None:
            with _held(raw):
                raw.put("=I", H_STATE, STATE_RETIRED)
        if live and before_remove is not None:
            counter = Counter(backend, key, retired_ok=True)
            try:
                before_remove(counter)
            finally:
                counter.detach()
        size = raw.buf.nbytes
        raw.remove()
        what = (f"SysV segment and semaphore at key {key:#x}" if backend == "sysv"
                else f"POSIX segment and semaphore {posix_name(key)}")
        log.info("removed the %s (%d bytes, %d processes were attached)", what, size, others)
        return {"removed": what, "size": size, "attached": others}
    finally:
        raw.close()

/*
 * _counter.c -- the hot path of trafficthreshold, and nothing else.
 *
 * What lives here: attaching to the segment, the lock-free atomic add of
 * hit(), the reads of count()/throttle_status(), and the snapshot read the
 * supervisor rolls up.  Everything structural that is not on a worker's path
 * (creating the segment, writing the header, uninstalling) is Python, in
 * segment.py.
 *
 * THE SEGMENT LAYOUT (layout version 2).  docs/segment.rst says the same for
 * writers in other languages; tests/test_segment.py checks that segment.py
 * and the LAYOUT dict this module exports agree.  All integers are in the
 * host's native byte order (the segment never leaves the host).
 *
 * The segment starts with a 4096-byte header:
 *
 *   line 0, geometry, written once at install, never changed:
 *     0  u64 magic            "TRFTHRSH" (bytes in this order)
 *     8  u32 layout_version   2 (1: before reclaim; read only by uninstall's
 *                              final roll-up, see validate_header)
 *    12  u32 header_size      4096
 *    16  u32 key_capacity     counter slots, reserved ones included
 *    20  u32 index_size       entries of the key index, a power of two
 *    24  u32 minute_buckets   M, ring of per-minute buckets per stripe
 *    28  u32 second_buckets   S >= 64, ring of per-second buckets
 *    32  u32 stripes          P, copies of every ring (see "stripes" below)
 *    36  u32 stripe_size      (M + S) * 16 rounded up to 64
 *    40  u32 slot_size        P * stripe_size
 *    44  u32 (reserved)
 *    48  u64 index_offset     4096
 *    56  u64 slots_offset     slot_table_offset + key_capacity * 8, 4096-aligned
 *                            (slot_table_offset = index_offset + index_size * 128)
 *   line 1, settings and supervisor state:
 *    64  u64 total_size
 *    72  u64 created_at       Unix seconds
 *    80  u32 throttle_multiplier
 *    84  u32 throttle_window  0 = sliding 60 s, 1 = the clock minute
 *    88  u32 throttle_level   the supervisor's level (0..5)
 *    92  u32 state            0 = being installed, 1 = live, 2 = retired
 *    96  u64 heartbeat_ms     the supervisor's last tick, Unix milliseconds
 *   104  u32 supervisor_pid
 *   108  u32 throttle_slot    the slot of ("all", "pageview")
 *   112  u32 lock_owner_pid   POSIX: the lock word itself (0 = free, else the
 *                              holder's pid); SysV: the holder, for people
 *                              (the semaphore is the lock)
 *   116  u32 (reserved)
 *   120  u64 throttle_since_ms  the policy's clock: hysteresis, since when the
 *                              count is below the level's floor; drupal, the
 *                              last step-down test (0: none).  Written by the
 *                              supervisor, shown by status; workers ignore it.
 *   line 2, counters the workers change:
 *   128  u32 keys_used        slots handed out (slots 0..keys_used-1)
 *   132  u32 next_stripe      round-robin stripe assignment
 *   136  u64 overflow_hits    hits that went to the overflow key
 *   144  u64 dropped_hits     hits dropped (the lock not taken in 50 ms)
 *   152  u64 attaches         processes that attached, ever
 *   160  u64 instance         a random non-zero id drawn at each install: the
 *                              store keys its watermarks by it, so a segment
 *                              re-installed in the same minute starts afresh
 *   line 2, the reclaim's fields (layout 2; changed under the lock only):
 *   168  u32 free_head        slot + 1 of the first reclaimed slot waiting for
 *                              a new key, 0 = none (a list through the slot table)
 *   172  u32 free_slots       how many slots are on that list
 *   176  u64 reclaimed        slots reclaimed, ever (readers that cache slot ->
 *                              name re-read the index when it moves)
 *   184  u32 reclaim_slot     slot + 1 of a reclaim under way, 0 = none: a lock
 *                              holder that finds it non-zero (its reclaimer died)
 *                              finishes that reclaim first (finish_reclaim)
 *   188  u32 reclaim_entry    index entry + 1 of that reclaim
 *   line 3, the insert's record and the index's fields (changed under the lock):
 *   192  u32 insert_slot      slot + 1 of an insert under way, 0 = none: the
 *                              next lock holder rolls it forward (finish_insert)
 *   196  u32 insert_entry     index entry + 1 of that insert
 *   200  u32 probe_limit      probes read at most this many entries: the largest
 *                              distance of a ready key from its first entry, + 1
 *                              (0 = unknown: probe to an empty entry)
 *   208  u64 index_seq        odd while a reclaim is under way (a seqlock for
 *                              readers that name counts; see segment.py)
 *   216  u64 lock_timeouts    hot-path lock waits past 50 ms (atomic add, no lock)
 *   224..4095 reserved, zero
 *
 * The key index, index_size entries of 128 bytes at index_offset, an
 * open-addressing hash table with linear probing:
 *     0  u32 state    0 = empty, 1 = ready (stored last, with release order),
 *                     2 = removed (a reclaimed key's tombstone: probes go on
 *                     past it, inserts reuse it)
 *     4  u32 slot     the counter slot of this key
 *     8  u32 hash     FNV-1a 32 of account, a 0 byte, event
 *    12  u8  account_len, 13 u8 event_len, 14 u16 reserved
 *    16  char account[64]   UTF-8, not terminated
 *    80  char event[32]     a name with one '/' (which no plain event name
 *                           contains), "order/paid", is the funnel status
 *                           "paid" of the event "order" (names.py)
 *   112  u32 generation  the slot's generation when this key got it
 *   116..127 reserved
 *
 * The slot table (layout 2), key_capacity entries of 8 bytes at
 * slot_table_offset = index_offset + index_size * 128:
 *     0  u32 generation  bumped (mod 2**24) each time the slot is reclaimed
 *     4  u32 next_free   while on the free list, slot + 1 of the next free
 *                        slot (0 = the last); else 0
 *
 * The counter slots, key_capacity slots of slot_size bytes at slots_offset.
 * A slot is P stripes; a stripe is M minute buckets then S second buckets;
 * a bucket is 16 bytes: u64 tag, u64 count.  The tag is the epoch minute or
 * epoch second counted in its low 40 bits and the slot's generation in its
 * high 24 bits: tag = epoch | generation << 40 (0 = never used, or being
 * reset under the lock).  Minute m lives in bucket m % M, second s in bucket
 * M + s % S.  A key's count for minute m is the sum over its stripes of the
 * buckets whose tag is m | generation << 40 (read as a seqlock: see
 * bucket_read).  Generation 0 makes the tag the bare epoch (layout 1).
 *
 * Stripes: one cache line that every worker adds to does not scale (two
 * processes on one counter gave less throughput than one).  Each process
 * takes its own stripe (round robin through next_stripe) so the `all` key,
 * which every request hits, is spread over P cache lines; readers sum.
 *
 * Reserved slots: slot 0 is ("~overflow", "~any"), where hits go when the
 * table is full; slot 1 is ("all", "pageview").  Account keys may fill the
 * table only while the slots in use (keys_used - free_slots) are below
 * key_capacity - EVENT_RESERVE so the `all` total of a new event still finds
 * a slot.
 *
 * Inserts (insert_key): under the lock, the limit is checked again, the
 * entry written (state not yet ready), probe_limit raised if the key lies
 * past it, the record insert_entry/insert_slot stored, the slot taken (a pop
 * stores free_head before clearing next_free), the hit's minute and second
 * buckets stamped (so a reclaim racing the hit does not find the new key
 * idle), the entry published, the record cleared: a holder killed anywhere
 * leaves nothing or a record the next holder rolls forward.
 *
 * Reclaim (Counter.reclaim, the supervisor after each roll): a key whose
 * every bucket is older than the minute it is given (out of the ring and
 * rolled) gives its slot back.  Never slot 0, slot 1 or throttle_slot.  Under
 * the lock: index_seq made odd, `reclaimed` incremented, reclaim_entry and
 * reclaim_slot stored, the entry becomes a tombstone, the slot's generation is bumped,
 * its buckets zeroed, the slot pushed on the free list, tombstones before an
 * empty entry emptied, reclaim_slot cleared, index_seq made even.  After a
 * scan that reclaimed keys, probe_limit is computed again.
 * Every step can be redone (finish_reclaim), so a reclaimer killed half way
 * leaves nothing inconsistent: the next lock holder that inserts a key, rolls
 * a bucket or reclaims finishes it.  Inserts take a free slot before
 * keys_used grows.  A process caches (slot, generation) per key; its expected
 * bucket tags carry that generation, so after a reclaim its tags never match
 * (no extra load on the hot path): the bucket roll-over, under the lock,
 * compares the generation with the slot table and, when it moved on, the
 * process forgets its cache and resolves the key again (a new slot).  The
 * residual window: a writer that loaded a matching tag, then stopped for
 * longer than the ring before its fetch_add (two instructions), adds into a
 * slot that may have been reclaimed meanwhile -- the same window in which a
 * writer stalled for a ring adds into a bucket rolled to a newer epoch.
 *
 * Threads: a Counter may be shared by threads.  A hit holds `busy` where it
 * runs Python or lets go of the GIL (no detach or re-init under it), keeps
 * no borrowed pointer into its cache across Python code or a GIL release,
 * and counts both its halves with its own copy of the clock (hclock_t).
 *
 * Locking: the hot path takes no lock.  The structural lock is taken only to
 * add a key and to roll a bucket over to a new epoch, always with a timeout
 * (50 ms on a worker's path, a deadline that signals do not restart), and always with the GIL released from before
 * the take until after the give-back, so a thread holding the GIL never
 * stretches the time another process waits (seg_lock, roll_bucket,
 * insert_key).  It is never held without a recorded owner:
 *   SysV: the semaphore, taken with semtimedop(-1, SEM_UNDO).  The kernel
 *     records the taker (GETPID) in the same operation and gives the
 *     semaphore back if the holder dies, even by SIGKILL.  lock_owner_pid
 *     is stored after the take and cleared before the give-back, for
 *     `status` only.
 *   POSIX: no semaphore.  lock_owner_pid is the lock: taken by
 *     compare_exchange(0 -> pid), given back by storing 0 (release) and a
 *     FUTEX_WAKE; waiters sleep in FUTEX_WAIT on the word, 10 ms at a time.
 *     A waiter that finds the holder dead (kill(pid, 0) fails with ESRCH)
 *     takes the lock over with compare_exchange(dead pid -> own pid): the
 *     lock goes straight from the dead holder to one live one.  What a dead
 *     holder left half done is safe to redo: a bucket reset restarts (its
 *     tag is 0 or old), a key insert whose state was not yet stored is an
 *     empty entry or a tombstone (its slot, if keys_used or the free list
 *     was stored, is simply unused), a reclaim under way is finished by the
 *     next holder (finish_reclaim).
 * segment.py takes the same lock for install and uninstall through _lock()
 * and _unlock() (or Counter.lock()).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/ipc.h>
#include <sys/mman.h>
#include <sys/sem.h>
#include <sys/shm.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#include <linux/futex.h>

#define MAGIC_BYTES "TRFTHRSH"
#define LAYOUT_VERSION 2u
/* The layout before reclaim: read (never written) by a retired_ok reader,
 * so that `uninstall` rolls an old segment's counts up after an upgrade. */
#define LAYOUT_VERSION_1 1u
#define SLOT_ENTRY_SIZE 8u
/* A bucket tag: the epoch in the low 40 bits (seconds reach 2**40 in the
 * year 36812), the slot's generation in the high 24 (mod 2**24). */
#define EPOCH_BITS 40
#define EPOCH_MASK ((1ULL << EPOCH_BITS) - 1)
#define GEN_MASK 0xFFFFFFu
#define THROTTLE_RESERVED_SLOT 1u
#define HEADER_SIZE 4096u
#define INDEX_ENTRY_SIZE 128u
#define BUCKET_SIZE 16u
#define ACCOUNT_MAX 64u
#define EVENT_MAX 32u
#define OVERFLOW_SLOT 0u
#define EVENT_RESERVE 16u
/* Joins an event and a funnel status in a key's event name ("order/paid");
 * names.STATUS_SEP says the same (tests/test_names.py checks). */
#define STATUS_SEP "/"
/* Why 50 ms: the lock is held for microseconds (a bucket reset, a key
 * insert).  A request must never wait long because of us; after this the
 * hit is counted as dropped and the request goes on. */
#define HOT_LOCK_TIMEOUT_MS 50
/* A supervisor level older than this is ignored by throttle_status(). */
#define HEARTBEAT_STALE_MS 10000
/* How often a process without a segment tries again to attach. */
#define ATTACH_RETRY_S 10
/* The largest n of one hit().  Why 2**32 - 1: a batch (a minute of a log
 * replayed) fits easily, a writer in another language can hold it in a u32,
 * and a bucket needs 2**31 such hits to reach 2**63, so no count ever read
 * out wraps or passes 2**63 - 1 (the store's integers); the reads saturate
 * there anyway (sat_add). */
#define MAX_HIT_N 4294967295ULL
/* How far a hit's `now` may be from the real clock, in seconds.  Why a year:
 * wide enough for tests and replays that drive the clock, narrow enough to
 * refuse milliseconds or microseconds passed by mistake (a factor of 1000,
 * year ~58,885), which would tag buckets far in the future. */
#define MAX_CLOCK_SKEW_S (366 * 86400)

/* Header offsets. */
#define H_MAGIC 0
#define H_VERSION 8
#define H_HEADER_SIZE 12
#define H_KEY_CAPACITY 16
#define H_INDEX_SIZE 20
#define H_MINUTE_BUCKETS 24
#define H_SECOND_BUCKETS 28
#define H_STRIPES 32
#define H_STRIPE_SIZE 36
#define H_SLOT_SIZE 40
#define H_INDEX_OFFSET 48
#define H_SLOTS_OFFSET 56
#define H_TOTAL_SIZE 64
#define H_CREATED_AT 72
#define H_THROTTLE_MULTIPLIER 80
#define H_THROTTLE_WINDOW 84
#define H_THROTTLE_LEVEL 88
#define H_STATE 92
#define H_HEARTBEAT_MS 96
#define H_SUPERVISOR_PID 104
#define H_THROTTLE_SLOT 108
#define H_LOCK_OWNER_PID 112
#define H_THROTTLE_SINCE_MS 120
#define H_KEYS_USED 128
#define H_NEXT_STRIPE 132
#define H_OVERFLOW_HITS 136
#define H_DROPPED_HITS 144
#define H_ATTACHES 152
#define H_INSTANCE 160
#define H_FREE_HEAD 168
#define H_FREE_SLOTS 172
#define H_RECLAIMED 176
#define H_RECLAIM_SLOT 184
#define H_RECLAIM_ENTRY 188
#define H_INSERT_SLOT 192
#define H_INSERT_ENTRY 196
#define H_PROBE_LIMIT 200
#define H_INDEX_SEQ 208
#define H_LOCK_TIMEOUTS 216

/* Index entry offsets. */
#define E_STATE 0
#define E_SLOT 4
#define E_HASH 8
#define E_ACCOUNT_LEN 12
#define E_EVENT_LEN 13
#define E_ACCOUNT 16
#define E_EVENT 80
#define E_GENERATION 112

/* Slot table entry offsets. */
#define T_GENERATION 0
#define T_NEXT_FREE 4

#define ENTRY_EMPTY 0u
#define ENTRY_READY 1u
#define ENTRY_REMOVED 2u

#define STATE_INSTALLING 0u
#define STATE_LIVE 1u
#define STATE_RETIRED 2u

#define U32(base, off) ((uint32_t *)((char *)(base) + (off)))
#define U64(base, off) ((uint64_t *)((char *)(base) + (off)))

typedef struct {
    uint64_t tag;
    uint64_t count;
} bucket_t;

/* A hit's clock: its epoch second and minute and their bucket indices.
 * Each hit works on its own copy (do_hit): the Counter's copy is shared by
 * the threads of a process and changes while a hit lets go of the GIL. */
typedef struct {
    uint64_t second, minute;
    uint32_t min_idx, sec_idx;
} hclock_t;

enum backend { BACKEND_SYSV = 0, BACKEND_POSIX = 1 };

typedef struct {
    PyObject_HEAD
    char *base;               /* the mapping; NULL once detached */
    size_t size;
    int backend;
    long key;
    int semid;                /* SysV; -1 = none (a retired reader may lack it) */
    /* geometry, copied from the header at attach */
    uint32_t key_capacity, index_size, minutes, seconds, stripes;
    uint32_t stripe_size, slot_size;
    uint64_t index_offset, slots_offset;
    char *slot_table;         /* layout 2: the slot table; NULL for a layout-1
                                 segment (read only, every generation 0) */
    uint32_t stripe;          /* this process's stripe */
    unsigned long fork_gen;   /* fork generation the stripe was chosen in */
    int fixed_stripe;         /* stripe given by the caller: keep it */
    int busy;                 /* calls inside a GIL-free lock section or
                                 Python code (names.validate, the collector):
                                 detach() and __init__ must not unmap under
                                 them */
    unsigned long busy_gen;   /* fork_generation when busy was counted: in a
                                 child forked meanwhile the threads that held
                                 it do not exist, so it counts as 0 there */
    PyObject *cache;          /* dict: event -> dict(account or None -> slot) */
    int64_t level_sec;        /* second of the cached throttle level (-1: none) */
    int level_cached;
    /* The bucket indices of the second last counted, so the hot path does
     * no 64-bit division while the second does not change.  clk.second 0 =
     * nothing cached (parse_now refuses times before second 60). */
    hclock_t clk;
    /* The event of the last hit (a strong reference, compared by identity),
     * its dict of account slots in `cache` and its `all` slot: a process
     * mostly counts one event, so this saves three dict lookups per hit.
     * NULL = nothing cached.  Slots are cached as refs: slot | generation
     * << 32 (see REF_SLOT). */
    PyObject *ev_obj, *ev_accounts;
    long ev_all_slot;
} Counter;

static PyTypeObject CounterType;

/* Errors come from trafficthreshold.errors so Python and C raise the same
 * classes. */
static PyObject *SegmentNotFound, *LayoutMismatch, *SegmentBusy, *SegmentError;
static PyObject *validate_cb;  /* names.validate(account, event) */
static PyObject *attach_cb;    /* trafficthreshold._attach_default() */
static PyObject *warn_cb;      /* trafficthreshold._warn(message) */
static PyObject *str_pageview;
static PyObject *str_status_sep;  /* "/", names.STATUS_SEP */

/* The default counter used by the module-level hit() and friends. */
static Counter *default_counter;
static int64_t next_attach_try = 0;  /* second before which we do not retry */
static int strict_mode = 0;
static volatile unsigned long fork_generation = 0;

static void after_fork_child(void) { fork_generation++; }

/* c->busy, counted per fork generation: a child forked while another
 * thread was inside the Counter (its GIL released, waiting for the lock)
 * has no such thread, and a count it inherited would refuse detach() and
 * __init__ in the child for good. */
#define BUSY_HELD(c) ((c)->busy > 0 && (c)->busy_gen == fork_generation)
#define BUSY_ENTER(c) do { if ((c)->busy_gen != fork_generation) { \
        (c)->busy = 0; (c)->busy_gen = fork_generation; } (c)->busy++; } while (0)
#define BUSY_LEAVE(c) do { if ((c)->busy_gen == fork_generation && (c)->busy > 0) \
        (c)->busy--; } while (0)

/* A test hook (tests/test_segment.py): the process kills itself (SIGKILL,
 * holding the lock) at the store numbered crash_at of an insert (1..) or a
 * reclaim (101..), so that the tests prove every store can be redone by
 * the next lock holder.  0 = off; set by _crash_at(n).  Costs one compare
 * per store, on the locked paths only. */
static int crash_at = 0;
#define CRASH_POINT(n) do { if (__builtin_expect(crash_at == (n), 0)) raise(SIGKILL); } while (0)

/* ------------------------------------------------------------------ time */

/* Wall-clock seconds, from the coarse clock: served by the vDSO on Linux
 * without reading the TSC (6 ns instead of 36 ns on the benchmark machine,
 * a fifth of a hit()).  Why that is exact enough: it lags the precise clock
 * by at most one timer tick (1..10 ms, see clock_getres), so a hit in the
 * first tick of a second may be counted in the second before; no count is
 * lost, and workers' clocks disagree by as much anyway. */
static double now_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME_COARSE, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* Converts an optional `now` argument; returns -1.0 with an exception set. */
static double parse_now(PyObject *obj)
{
    double t;
    if (obj == NULL || obj == Py_None)
        return now_seconds();
    t = PyFloat_AsDouble(obj);
    if (t == -1.0 && PyErr_Occurred())
        return -1.0;
    /* Why 60: tag 0 marks an unused bucket, so minute 0 cannot be counted. */
    if (!(t >= 60.0 && t < 1.8e19)) {
        PyErr_SetString(PyExc_ValueError,
                        "now must be Unix seconds after 1970-01-01 00:01");
        return -1.0;
    }
    return t;
}

/* hit()'s clock: the epoch second of an optional `now`; without `now`,
 * straight from the clock with no float arithmetic.  Returns 0 with an
 * exception set (no valid time is below 60). */
static uint64_t parse_second(PyObject *obj)
{
    struct timespec ts;
    double t;
    if (obj == NULL || obj == Py_None) {
        clock_gettime(CLOCK_REALTIME_COARSE, &ts);  /* see now_seconds() */
        return (uint64_t)ts.tv_sec;
    }
    t = parse_now(obj);
    if (t < 0)
        return 0;
    clock_gettime(CLOCK_REALTIME, &ts);
    if (t > (double)ts.tv_sec + MAX_CLOCK_SKEW_S || t < (double)ts.tv_sec - MAX_CLOCK_SKEW_S) {
        PyErr_Format(PyExc_ValueError,
                     "now=%R is more than %d days from the real clock (%lld)%s; pass Unix "
                     "seconds, or omit now", obj, MAX_CLOCK_SKEW_S / 86400, (long long)ts.tv_sec,
                     t > ts.tv_sec * 500.0 ? ": now looks like milliseconds" : "");
        return 0;
    }
    return (uint64_t)t;
}

/* ------------------------------------------------------------------ lock */

/* The structural lock of a segment: the SysV semaphore, or for POSIX the
 * lock word lock_owner_pid itself.  Plain data, so that the lock is taken,
 * used and given back with the GIL released: nothing here touches Python. */
typedef struct {
    int backend;
    int semid;           /* SysV: the semaphore set; -1 = none */
    uint32_t *owner;     /* &header[112], lock_owner_pid */
} seglock_t;

static long futex(uint32_t *word, int op, uint32_t val, const struct timespec *ts)
{
    /* Not FUTEX_PRIVATE: the word is in memory shared between processes. */
    return syscall(SYS_futex, word, op, val, ts, NULL, 0);
}

static int64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Whether pid `p` is gone: kill(p, 0) fails with ESRCH.  EPERM means it
 * exists (another user's process). */
static int pid_dead(uint32_t p)
{
    return -1 == kill((pid_t)p, 0) && errno == ESRCH;
}

/* POSIX: takes the lock word, waiting at most timeout_ms.  The lock IS the
 * owner: compare_exchange(owner, 0 -> pid) takes it, so there is no instant
 * at which the lock is held with no owner recorded.  A holder that died
 * (kill(pid, 0) fails with ESRCH) is replaced by compare_exchange(owner,
 * dead pid -> our pid): the lock passes straight to one waiter, never
 * through 0.  Waiting is a futex wait on the word, in slices of at most
 * 10 ms so a holder's death is noticed.  Returns 0 when held, -1 with errno
 * ETIMEDOUT.  Call without the GIL. */
static int word_lock(uint32_t *word, int timeout_ms)
{
    uint32_t me = (uint32_t)getpid(), cur;
    int64_t deadline = mono_ms() + timeout_ms, left;
    struct timespec ts;
    for (;;) {
        cur = 0;
        if (__atomic_compare_exchange_n(word, &cur, me, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
            return 0;
        if (cur != 0 && pid_dead(cur)) {
            /* The holder died with the lock: take it over.  What it left
             * half done is safe to redo (see "Locking" at the top). */
            if (__atomic_compare_exchange_n(word, &cur, me, 0, __ATOMIC_ACQ_REL,
                                            __ATOMIC_ACQUIRE))
                return 0;
            continue;
        }
        left = deadline - mono_ms();
        if (left <= 0) {
            errno = ETIMEDOUT;
            return -1;
        }
        if (left > 10)
            left = 10;
        ts.tv_sec = 0;
        ts.tv_nsec = (long)left * 1000000L;
        /* Returns at once (EAGAIN) if the word is no longer `cur`. */
        futex(word, FUTEX_WAIT, cur, &ts);
    }
}

/* POSIX: gives the lock word back (release order: everything written under
 * the lock is visible before the 0) and wakes one waiter.  Caller holds it. */
static void word_unlock(uint32_t *word)
{
    __atomic_store_n(word, 0u, __ATOMIC_RELEASE);
    futex(word, FUTEX_WAKE, 1, NULL);
}

/* Takes the structural lock, waiting at most timeout_ms.  Returns 0 when
 * held, -1 with errno EAGAIN/ETIMEDOUT on timeout or another errno on
 * failure.  Call without the GIL.
 * SysV: semtimedop with SEM_UNDO, so a holder killed even by SIGKILL gives
 * the semaphore back, and the kernel records the taker's pid in the same
 * operation (semctl GETPID): the lock is never held without a recorded
 * owner.  lock_owner_pid is then stored for people (status); nothing
 * depends on it.  POSIX: word_lock(). */
static int seg_lock(const seglock_t *l, int timeout_ms)
{
    struct timespec ts;
    struct sembuf op = {0, -1, SEM_UNDO};
    int64_t deadline = mono_ms() + timeout_ms, left;
    int rc;
    if (l->backend != BACKEND_SYSV)
        return word_lock(l->owner, timeout_ms);
    if (l->semid < 0) {
        errno = EIDRM;
        return -1;
    }
    /* An absolute deadline: a signal (an itimer, a profiler, SIGCHLD)
     * interrupts semtimedop with EINTR, and retrying with the whole timeout
     * again would wait for as long as the lock is held -- for ever behind a
     * stopped holder.  The retry waits what is left, at least a try. */
    for (;;) {
        left = deadline - mono_ms();
        if (left < 0)
            left = 0;
        ts.tv_sec = left / 1000;
        ts.tv_nsec = (long)(left % 1000) * 1000000L;
        rc = semtimedop(l->semid, &op, 1, &ts);
        if (rc == 0 || errno != EINTR)
            break;
        if (left == 0) {
            errno = EAGAIN;
            break;
        }
    }
    if (-1 == rc)
        return -1;
    __atomic_store_n(l->owner, (uint32_t)getpid(), __ATOMIC_RELEASE);
    return 0;
}

/* Gives the structural lock back.  Caller holds it; call without the GIL. */
static void seg_unlock(const seglock_t *l)
{
    struct sembuf op = {0, 1, SEM_UNDO};
    if (l->backend != BACKEND_SYSV) {
        word_unlock(l->owner);
        return;
    }
    __atomic_store_n(l->owner, 0u, __ATOMIC_RELEASE);
    semop(l->semid, &op, 1);
}

static inline seglock_t lock_of(Counter *c)
{
    seglock_t l = {c->backend, c->semid, U32(c->base, H_LOCK_OWNER_PID)};
    return l;
}

/* ---------------------------------------------------------------- layout */

/* The first bucket (minute bucket 0) of one stripe of one slot. */
static inline bucket_t *stripe_buckets(Counter *c, uint32_t slot, uint32_t stripe)
{
    return (bucket_t *)(c->base + c->slots_offset + (uint64_t)slot * c->slot_size
                        + (uint64_t)stripe * c->stripe_size);
}

static inline bucket_t *minute_bucket(Counter *c, uint32_t slot, uint32_t stripe, uint64_t minute)
{
    return stripe_buckets(c, slot, stripe) + (minute % c->minutes);
}

static inline bucket_t *second_bucket(Counter *c, uint32_t slot, uint32_t stripe, uint64_t second)
{
    return stripe_buckets(c, slot, stripe) + c->minutes + (second % c->seconds);
}

static inline char *index_entry(Counter *c, uint32_t i)
{
    return c->base + c->index_offset + (uint64_t)i * INDEX_ENTRY_SIZE;
}

/* A cached key is a ref: its slot in the low 32 bits, the slot's generation
 * (when the key got it) above.  The overflow slot's ref is 0. */
#define REF_SLOT(ref) ((uint32_t)((uint64_t)(ref) & 0xFFFFFFFFu))
#define REF_GEN(ref) ((uint32_t)((uint64_t)(ref) >> 32))
#define MAKE_REF(slot, gen) ((long)(((uint64_t)(gen) << 32) | (uint32_t)(slot)))

/* A bucket's tag for `epoch` in a slot of generation `gen`. */
static inline uint64_t make_tag(uint64_t epoch, uint32_t gen)
{
    return epoch | ((uint64_t)(gen & GEN_MASK) << EPOCH_BITS);
}

static inline uint32_t *slot_word(Counter *c, uint32_t slot, size_t off)
{
    return U32(c->slot_table + (uint64_t)slot * SLOT_ENTRY_SIZE, off);
}

/* The slot's current generation (acquire); 0 in a layout-1 segment. */
static inline uint32_t slot_gen(Counter *c, uint32_t slot)
{
    if (c->slot_table == NULL)
        return 0;
    return __atomic_load_n(slot_word(c, slot, T_GENERATION), __ATOMIC_ACQUIRE) & GEN_MASK;
}

static uint32_t fnv1a(const char *account, size_t alen, const char *event, size_t elen)
{
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < alen; i++) h = (h ^ (uint8_t)account[i]) * 16777619u;
    h = (h ^ 0u) * 16777619u;
    for (size_t i = 0; i < elen; i++) h = (h ^ (uint8_t)event[i]) * 16777619u;
    return h;
}

static inline uint32_t header_u32(Counter *c, size_t off)
{
    return __atomic_load_n(U32(c->base, off), __ATOMIC_ACQUIRE);
}

/* ---------------------------------------------------------------- attach */

static int validate_header(Counter *c, int retired_ok)
{
    char *h = c->base;
    /* A zero magic is a segment created but not yet formatted: an install
     * is running, or its installer died (`install` finishes it).  Not a
     * foreign segment, so do not advise removing it. */
    if (c->size >= HEADER_SIZE && memcmp(h, "\0\0\0\0\0\0\0\0", 8) == 0) {
        PyErr_Format(SegmentNotFound,
                     "the segment at IPC key 0x%x is not fully installed; run "
                     "`trafficthreshold install`", (int)c->key);
        return -1;
    }
    if (c->size < HEADER_SIZE || memcmp(h, MAGIC_BYTES, 8) != 0) {
        PyErr_Format(LayoutMismatch,
                     "IPC key 0x%x holds a segment that is not trafficthreshold's "
                     "(bad magic); remove it with `ipcrm -M 0x%x` or choose another --key",
                     (int)c->key, (int)c->key);
        return -1;
    }
    /* Layout 1 (before reclaim) is read by the uninstaller's final roll-up
     * only (retired_ok): so an upgrade rolls an old segment's counts up. */
    if (!(*U32(h, H_VERSION) == LAYOUT_VERSION
          || (retired_ok && *U32(h, H_VERSION) == LAYOUT_VERSION_1))
        || *U32(h, H_HEADER_SIZE) != HEADER_SIZE) {
        if (*U32(h, H_VERSION) == LAYOUT_VERSION_1 && *U32(h, H_HEADER_SIZE) == HEADER_SIZE)
            PyErr_Format(LayoutMismatch,
                         "the segment at IPC key 0x%x has layout version 1 (an older "
                         "trafficthreshold), this trafficthreshold reads version %u; run "
                         "`trafficthreshold uninstall` (it rolls a layout-1 segment's counts "
                         "up) then `trafficthreshold install` with this version",
                         (int)c->key, LAYOUT_VERSION);
        else
            PyErr_Format(LayoutMismatch,
                         "the segment at IPC key 0x%x has layout version %u, this "
                         "trafficthreshold reads version %u; run `trafficthreshold uninstall "
                         "--force` then `trafficthreshold install` with this version",
                         (int)c->key, *U32(h, H_VERSION), LAYOUT_VERSION);
        return -1;
    }
    c->key_capacity = *U32(h, H_KEY_CAPACITY);
    c->index_size = *U32(h, H_INDEX_SIZE);
    c->minutes = *U32(h, H_MINUTE_BUCKETS);
    c->seconds = *U32(h, H_SECOND_BUCKETS);
    c->stripes = *U32(h, H_STRIPES);
    c->stripe_size = *U32(h, H_STRIPE_SIZE);
    c->slot_size = *U32(h, H_SLOT_SIZE);
    c->index_offset = *U64(h, H_INDEX_OFFSET);
    c->slots_offset = *U64(h, H_SLOTS_OFFSET);
    /* Why these bounds: every offset the hot path computes must stay inside
     * the mapping even if the header was corrupted.  Sums and products are
     * taken in 64 bits of 32-bit fields, and both offsets are first bounded
     * by the size, so no test below can wrap around. */
    if (c->minutes < 2 || c->seconds < 64 || c->stripes < 1 || c->stripes > 64
        || c->key_capacity < EVENT_RESERVE + 2 || c->index_size < c->key_capacity
        || (c->index_size & (c->index_size - 1)) != 0
        || c->stripe_size < ((uint64_t)c->minutes + c->seconds) * BUCKET_SIZE
        || c->slot_size != (uint64_t)c->stripe_size * c->stripes
        || c->index_offset < HEADER_SIZE || c->index_offset > c->size
        || c->slots_offset > c->size
        || c->index_offset + (uint64_t)c->index_size * INDEX_ENTRY_SIZE
           + (*U32(h, H_VERSION) == LAYOUT_VERSION_1 ? 0
              : (uint64_t)c->key_capacity * SLOT_ENTRY_SIZE) > c->slots_offset
        || c->slots_offset + (uint64_t)c->key_capacity * c->slot_size > c->size) {
        PyErr_Format(LayoutMismatch,
                     "the segment at IPC key 0x%x has a corrupt header (its counts cannot "
                     "be read); run `trafficthreshold uninstall --force --no-rollup` and "
                     "install again", (int)c->key);
        return -1;
    }
    c->slot_table = *U32(h, H_VERSION) == LAYOUT_VERSION_1 ? NULL
        : c->base + c->index_offset + (uint64_t)c->index_size * INDEX_ENTRY_SIZE;
    if (header_u32(c, H_STATE) != STATE_LIVE
        && !(retired_ok && header_u32(c, H_STATE) == STATE_RETIRED)) {
        PyErr_Format(SegmentNotFound,
                     "the segment at IPC key 0x%x is %s; run `trafficthreshold install`",
                     (int)c->key, header_u32(c, H_STATE) == STATE_RETIRED
                     ? "being uninstalled" : "not fully installed");
        return -1;
    }
    return 0;
}

static void choose_stripe(Counter *c)
{
    uint32_t n = __atomic_fetch_add(U32(c->base, H_NEXT_STRIPE), 1u, __ATOMIC_RELAXED);
    c->stripe = n % c->stripes;
    c->fork_gen = fork_generation;
}

static int attach_sysv(Counter *c)
{
    struct shmid_ds ds;
    int shmid = shmget((key_t)c->key, 0, 0);
    if (-1 == shmid) {
        if (errno == ENOENT)
            PyErr_Format(SegmentNotFound,
                         "no trafficthreshold segment at SysV IPC key 0x%x; "
                         "run `trafficthreshold install`", (int)c->key);
        else if (errno == EACCES)
            PyErr_Format(SegmentError,
                         "permission denied on the segment at IPC key 0x%x; add this "
                         "user to the segment's group (see `trafficthreshold status`)", (int)c->key);
        else
            PyErr_SetFromErrno(SegmentError);
        return -1;
    }
    if (-1 == shmctl(shmid, IPC_STAT, &ds)) {
        /* shmget() without flags asks for no rights; IPC_STAT needs read. */
        if (errno == EACCES)
            PyErr_Format(SegmentError,
                         "permission denied on the segment at IPC key 0x%x; add this "
                         "user to the segment's group (see `trafficthreshold status`)",
                         (int)c->key);
        else
            PyErr_SetFromErrno(SegmentError);
        return -1;
    }
    c->size = ds.shm_segsz;
    c->base = shmat(shmid, NULL, 0);
    if (c->base == (void *)-1) {
        c->base = NULL;
        if (errno == EACCES)
            PyErr_Format(SegmentError,
                         "permission denied attaching the segment at IPC key 0x%x; add "
                         "this user to the segment's group", (int)c->key);
        else
            PyErr_SetFromErrno(SegmentError);
        return -1;
    }
    return 0;
}

static int attach_posix(Counter *c)
{
    char name[64];
    struct stat st;
    int fd;
    snprintf(name, sizeof name, "/trafficthreshold-%lx", c->key);
    fd = shm_open(name, O_RDWR, 0);
    if (-1 == fd) {
        if (errno == ENOENT)
            PyErr_Format(SegmentNotFound,
                         "no trafficthreshold segment at POSIX name %s; run "
                         "`trafficthreshold install --backend posix`", name);
        else if (errno == EACCES)
            PyErr_Format(SegmentError,
                         "permission denied on the segment /dev/shm%s; add this user to "
                         "the segment's group (see `trafficthreshold status`)", name);
        else
            PyErr_SetFromErrnoWithFilename(SegmentError, name);
        return -1;
    }
    if (-1 == fstat(fd, &st)) {
        PyErr_SetFromErrno(SegmentError);
        close(fd);
        return -1;
    }
    /* Why: mmap() of a file shorter than the header either fails (size 0)
     * or maps less than validate_header() reads. */
    if ((uint64_t)st.st_size < HEADER_SIZE) {
        PyErr_Format(LayoutMismatch,
                     "/dev/shm%s is %lld bytes, too small to be a trafficthreshold segment; "
                     "remove it or choose another --key", name, (long long)st.st_size);
        close(fd);
        return -1;
    }
    c->size = (size_t)st.st_size;
    c->base = mmap(NULL, c->size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (c->base == MAP_FAILED) {
        c->base = NULL;
        PyErr_SetFromErrno(SegmentError);
        return -1;
    }
    return 0;
}

/* Opens the SysV semaphore of a mapped segment whose header was found valid
 * (so that a segment which is not ours is reported as such, not as one that
 * lacks a semaphore).  The POSIX backend has none: its lock is the header's
 * lock word; but a POSIX semaphore of the segment's name means the segment
 * was installed by a version that locked with it, and the two protocols
 * must not be mixed.  `reader_only` (a retired segment's final read) does
 * without the semaphore: it takes no lock.  Returns 0, or -1 with an
 * exception set. */
static int open_semaphore(Counter *c, int reader_only)
{
    char name[80];
    struct stat st;
    c->semid = -1;
    if (c->backend == BACKEND_POSIX) {
        snprintf(name, sizeof name, "/dev/shm/sem.trafficthreshold-%lx", c->key);
        if (reader_only || -1 == stat(name, &st))
            return 0;
        /* PyErr_Format has no %lx: the key is printed as an unsigned int
         * (keys are 32-bit, key_t), the way every other message names it. */
        PyErr_Format(LayoutMismatch,
                     "the segment /dev/shm/trafficthreshold-%x was installed by an older "
                     "trafficthreshold that locked it with the POSIX semaphore %s; run "
                     "`trafficthreshold uninstall --backend posix` and install again",
                     (unsigned int)c->key, name);
        return -1;
    }
    c->semid = semget((key_t)c->key, 1, 0);
    if (-1 != c->semid || reader_only)
        return 0;
    if (errno == EACCES)
        PyErr_Format(SegmentError,
                     "permission denied on the semaphore of the segment at SysV IPC key "
                     "0x%x; add this user to the segment's group (see `trafficthreshold "
                     "status`)", (unsigned int)c->key);
    else
        PyErr_Format(SegmentNotFound,
                     "the segment at SysV IPC key 0x%x has no semaphore; run "
                     "`trafficthreshold uninstall --force` (it rolls the counts up and "
                     "removes the segment) and install again", (unsigned int)c->key);
    return -1;
}

static void detach(Counter *c)
{
    if (c->base != NULL) {
        if (c->backend == BACKEND_SYSV)
            shmdt(c->base);
        else
            munmap(c->base, c->size);
        c->base = NULL;
    }
    c->slot_table = NULL;
    if (c->cache != NULL)
        PyDict_Clear(c->cache);
    Py_CLEAR(c->ev_obj);
    Py_CLEAR(c->ev_accounts);
    c->clk.second = 0;
}

/* Counter(backend, key, stripe=None, retired_ok=False): attaches; raises
 * SegmentNotFound, LayoutMismatch or SegmentError.  retired_ok makes a
 * reader for the uninstaller's final roll-up: it reads a segment it has
 * already retired, and does without a vanished SysV semaphore (a reader
 * takes no lock; its lock() raises SegmentNotFound). */
static int Counter_init(Counter *c, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"backend", "key", "stripe", "retired_ok", NULL};
    const char *backend;
    long key;
    PyObject *stripe = Py_None;
    int retired_ok = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "sl|Op", kwlist, &backend, &key, &stripe,
                                     &retired_ok))
        return -1;
    if (BUSY_HELD(c)) {
        PyErr_SetString(SegmentBusy, "another thread is inside this Counter's lock");
        return -1;
    }
    detach(c);
    if (strcmp(backend, "sysv") == 0)
        c->backend = BACKEND_SYSV;
    else if (strcmp(backend, "posix") == 0)
        c->backend = BACKEND_POSIX;
    else {
        PyErr_Format(PyExc_ValueError, "backend '%s' is not valid; use 'sysv' or 'posix'",
                     backend);
        return -1;
    }
    c->key = key;
    if (c->cache == NULL && (c->cache = PyDict_New()) == NULL)
        return -1;
    if ((c->backend == BACKEND_SYSV ? attach_sysv(c) : attach_posix(c)) < 0
        || validate_header(c, retired_ok) < 0 || open_semaphore(c, retired_ok) < 0) {
        detach(c);
        return -1;
    }
    __atomic_fetch_add(U64(c->base, H_ATTACHES), 1u, __ATOMIC_RELAXED);
    if (stripe != Py_None) {
        long s = PyLong_AsLong(stripe);
        if (s == -1 && PyErr_Occurred()) { detach(c); return -1; }
        c->stripe = (uint32_t)((unsigned long)s % c->stripes);
        c->fixed_stripe = 1;
    } else {
        c->fixed_stripe = 0;
        choose_stripe(c);
    }
    c->level_sec = -1;
    return 0;
}

static void Counter_dealloc(Counter *c)
{
    detach(c);
    Py_CLEAR(c->cache);
    Py_TYPE(c)->tp_free((PyObject *)c);
}

/* ------------------------------------------------------------------ keys */

/* Plain C from here to insert_key: the lock holder's work on the index,
 * the slot table and the free list.  No Python object is touched, so these
 * run with the GIL released (and can move to a core any binding shares). */

/* The index_seq seqlock (header 208): odd while a reclaim is under way.
 * A reader that read the same even value before and after reading names
 * and counts read a consistent pair (see the readers in segment.py). */
static inline void index_seq_begin(Counter *c)
{
    uint64_t *seq = U64(c->base, H_INDEX_SEQ);
    if ((__atomic_load_n(seq, __ATOMIC_ACQUIRE) & 1) == 0)
        __atomic_fetch_add(seq, 1, __ATOMIC_ACQ_REL);
}

static inline void index_seq_end(Counter *c)
{
    uint64_t *seq = U64(c->base, H_INDEX_SEQ);
    if (__atomic_load_n(seq, __ATOMIC_ACQUIRE) & 1)
        __atomic_fetch_add(seq, 1, __ATOMIC_ACQ_REL);
}

/* Pushes `slot` on the free list: next_free = free_head, then free_head =
 * slot + 1 and free_slots + 1 in one 8-byte store.  Skipped when free_head
 * already is this slot, so a holder killed between the two stores leaves a
 * push the next holder redoes.  Caller holds the lock. */
static void push_free(Counter *c, uint32_t slot)
{
    uint64_t free_word = __atomic_load_n(U64(c->base, H_FREE_HEAD), __ATOMIC_ACQUIRE);
    if ((uint32_t)free_word == slot + 1)
        return;
    __atomic_store_n(slot_word(c, slot, T_NEXT_FREE), (uint32_t)free_word, __ATOMIC_RELEASE);
    CRASH_POINT(104);
    __atomic_store_n(U64(c->base, H_FREE_HEAD),
                     ((free_word >> 32) + 1) << 32 | (uint64_t)(slot + 1), __ATOMIC_RELEASE);
    CRASH_POINT(105);
}

/* Takes `slot` for a new key: pops it when it heads the free list
 * (free_head = its next_free and free_slots - 1, one 8-byte store), else
 * grows keys_used past it; then clears its next_free.  Every store can be
 * repeated: a slot no longer at the head, below keys_used, is already
 * taken, and the pop stores free_head before next_free is cleared, so a
 * holder killed in between never cuts the list (the next one redoes it,
 * finish_insert).  Caller holds the lock. */
static void take_slot(Counter *c, uint32_t slot)
{
    uint64_t free_word = __atomic_load_n(U64(c->base, H_FREE_HEAD), __ATOMIC_ACQUIRE);
    uint32_t nfree = (uint32_t)(free_word >> 32), next;
    if ((uint32_t)free_word == slot + 1) {
        next = __atomic_load_n(slot_word(c, slot, T_NEXT_FREE), __ATOMIC_ACQUIRE);
        /* Why the bound: a corrupt next_free must not become the head. */
        if (next != 0 && (next - 1 >= c->key_capacity || next - 1 <= THROTTLE_RESERVED_SLOT))
            next = 0;
        __atomic_store_n(U64(c->base, H_FREE_HEAD),
                         (uint64_t)(nfree > 0 ? nfree - 1 : 0) << 32 | next, __ATOMIC_RELEASE);
        CRASH_POINT(4);
    } else if (__atomic_load_n(U32(c->base, H_KEYS_USED), __ATOMIC_ACQUIRE) <= slot) {
        __atomic_store_n(U32(c->base, H_KEYS_USED), slot + 1, __ATOMIC_RELEASE);
        CRASH_POINT(4);
    }
    __atomic_store_n(slot_word(c, slot, T_NEXT_FREE), 0u, __ATOMIC_RELEASE);
    CRASH_POINT(5);
}

/* Finishes an insert whose insert_slot is set (a holder killed half way
 * through insert_key).  Its entry was written in full before the record,
 * so it is rolled forward: the slot is taken (take_slot), the entry
 * published, the record cleared.  Caller holds the lock. */
static void finish_insert(Counter *c)
{
    uint32_t is = __atomic_load_n(U32(c->base, H_INSERT_SLOT), __ATOMIC_ACQUIRE);
    uint32_t ie = __atomic_load_n(U32(c->base, H_INSERT_ENTRY), __ATOMIC_ACQUIRE);
    char *ent;
    if (is == 0)
        return;
    /* A corrupt record (out of range, a reserved slot, an entry that is not
     * this insert's) is dropped: acting on it could hand out a slot twice. */
    if (c->slot_table != NULL && is - 1 < c->key_capacity && is - 1 > THROTTLE_RESERVED_SLOT
        && ie != 0 && ie - 1 < c->index_size) {
        ent = index_entry(c, ie - 1);
        /* The entry is empty or a tombstone until published: its slot
         * field, written before the record, says it is this insert's. */
        if (*U32(ent, E_SLOT) == is - 1) {
            take_slot(c, is - 1);
            __atomic_store_n(U32(ent, E_STATE), ENTRY_READY, __ATOMIC_RELEASE);
        }
    }
    __atomic_store_n(U32(c->base, H_INSERT_SLOT), 0u, __ATOMIC_RELEASE);
    __atomic_store_n(U32(c->base, H_INSERT_ENTRY), 0u, __ATOMIC_RELEASE);
}

/* Finishes a reclaim whose reclaim_slot is set (Counter.reclaim sets it, or
 * a reclaimer that died left it).  Caller holds the lock.  Every step can be
 * repeated, so a holder killed anywhere in here leaves a reclaim the next
 * holder finishes:
 *   1. the entry becomes a tombstone (if it still is this slot's key);
 *   2. the slot's generation becomes the entry's + 1: a process holding the
 *      old (slot, generation) no longer matches any tag of the slot;
 *   3. every bucket is zeroed (tag 0, a release fence, count 0: a reader
 *      between its two looks at the tag reads 0);
 *   4. the slot is pushed on the free list (push_free);
 *   5. tombstones followed by an empty entry become empty (no key's probe
 *      sequence passes an empty entry, so none passes them);
 *   6. reclaim_slot and reclaim_entry are cleared, and index_seq made even.
 * `reclaimed` was incremented and index_seq made odd before reclaim_slot
 * was stored (do_reclaim), so readers that cache slot -> name see it move
 * before a slot changes hands. */
static void finish_reclaim(Counter *c)
{
    uint32_t rs = __atomic_load_n(U32(c->base, H_RECLAIM_SLOT), __ATOMIC_ACQUIRE);
    uint32_t re = __atomic_load_n(U32(c->base, H_RECLAIM_ENTRY), __ATOMIC_ACQUIRE);
    uint32_t slot, pos, gen, mask = c->index_size - 1;
    char *ent;
    if (c->slot_table == NULL)
        return;
    if (rs == 0)
        goto done;  /* index_seq may be odd: a reclaimer died before reclaim_slot */
    slot = rs - 1;
    /* A corrupt record (out of range, a reserved slot) is dropped: acting on
     * it would write outside the table or lose the reserved keys. */
    if (slot >= c->key_capacity || slot <= THROTTLE_RESERVED_SLOT || re == 0
        || re - 1 >= c->index_size)
        goto done;
    pos = re - 1;
    ent = index_entry(c, pos);
    if (__atomic_load_n(U32(ent, E_STATE), __ATOMIC_ACQUIRE) == ENTRY_READY
        && *U32(ent, E_SLOT) == slot)
        __atomic_store_n(U32(ent, E_STATE), ENTRY_REMOVED, __ATOMIC_RELEASE);
    CRASH_POINT(101);
    gen = (*U32(ent, E_GENERATION) + 1) & GEN_MASK;
    __atomic_store_n(slot_word(c, slot, T_GENERATION), gen, __ATOMIC_RELEASE);
    CRASH_POINT(102);
    for (uint32_t p = 0; p < c->stripes; p++) {
        bucket_t *b = stripe_buckets(c, slot, p);
        for (uint32_t j = 0; j < c->minutes + c->seconds; j++) {
            __atomic_store_n(&b[j].tag, 0, __ATOMIC_RELAXED);
            __atomic_thread_fence(__ATOMIC_RELEASE);
            __atomic_store_n(&b[j].count, 0, __ATOMIC_RELAXED);
        }
    }
    CRASH_POINT(103);
    push_free(c, slot);
    if (__atomic_load_n(U32(index_entry(c, (pos + 1) & mask), E_STATE), __ATOMIC_ACQUIRE)
        == ENTRY_EMPTY) {
        for (uint32_t n = 0; n < c->index_size; n++, pos = (pos - 1) & mask) {
            ent = index_entry(c, pos);
            if (__atomic_load_n(U32(ent, E_STATE), __ATOMIC_ACQUIRE) != ENTRY_REMOVED)
                break;
            __atomic_store_n(U32(ent, E_STATE), ENTRY_EMPTY, __ATOMIC_RELEASE);
        }
    }
    CRASH_POINT(106);
done:
    __atomic_store_n(U32(c->base, H_RECLAIM_SLOT), 0u, __ATOMIC_RELEASE);
    __atomic_store_n(U32(c->base, H_RECLAIM_ENTRY), 0u, __ATOMIC_RELEASE);
    if (rs != 0)
        CRASH_POINT(107);
    index_seq_end(c);
}

/* What every lock holder does first: finish what a holder killed half way
 * left under way (a reclaim, an insert).  Caller holds the lock. */
static void recover(Counter *c)
{
    finish_reclaim(c);
    finish_insert(c);
}

/* How many entries a probe reads at most (header probe_limit): one more
 * than the largest distance of a ready key from its first entry.  Why:
 * tombstones are reused only when a probe passes them, so with keys that
 * come and go the index runs out of empty entries, and a probe that stops
 * only at an empty entry reads the whole index.  0 (a segment whose limit
 * was never computed) or a value past the index: the whole index. */
static inline uint32_t probe_window(Counter *c)
{
    uint32_t lim = header_u32(c, H_PROBE_LIMIT);
    return lim == 0 || lim > c->index_size ? c->index_size : lim;
}

/* Computes probe_limit again from the ready entries (after reclaims, which
 * only lower it).  Caller holds the lock. */
static void reset_probe_limit(Counter *c)
{
    uint32_t mask = c->index_size - 1, far = 0, d;
    for (uint32_t i = 0; i < c->index_size; i++) {
        char *ent = index_entry(c, i);
        if (__atomic_load_n(U32(ent, E_STATE), __ATOMIC_ACQUIRE) != ENTRY_READY)
            continue;
        d = (i - *U32(ent, E_HASH)) & mask;
        if (d > far)
            far = d;
    }
    __atomic_store_n(U32(c->base, H_PROBE_LIMIT), far + 1, __ATOMIC_RELEASE);
}

/* Looks a key up in the index without locking.  Returns its ref (slot |
 * generation << 32), or -1 if absent.  Lock-free: an entry is visible only
 * once its state is stored with release order, after its name, slot and
 * generation.  A tombstone (state 2) is passed over; the probe ends at an
 * empty entry or after probe_window() entries.  `free_pos`, if given, gets
 * the first tombstone on the way or else the empty entry that ended the
 * probe (UINT32_MAX: none); `reads`, if given, the entries read.  Why the
 * second look at state, slot and generation after a match: a tombstone is
 * rewritten for another key, and a match read across that rewrite could
 * pair one key's name with another's slot; (slot, generation) never
 * repeats, so an unchanged pair means an unchanged entry.  An entry whose
 * slot is out of range (a corrupted index) answers OVERFLOW_SLOT: writing
 * through it would go past the mapping. */
static long probe(Counter *c, const char *a, size_t alen, const char *e, size_t elen,
                  uint32_t hash, uint32_t *free_pos, uint32_t *reads)
{
    uint32_t mask = c->index_size - 1, tomb = UINT32_MAX, state, slot, gen;
    uint32_t window = probe_window(c);
    for (int attempt = 0; attempt < 64; attempt++) {
        uint32_t n = 0, i = hash & mask;
        tomb = UINT32_MAX;
        for (; n < window; n++, i = (i + 1) & mask) {
            char *ent = index_entry(c, i);
            if (reads) ++*reads;
            state = __atomic_load_n(U32(ent, E_STATE), __ATOMIC_ACQUIRE);
            if (state == ENTRY_EMPTY) {
                if (free_pos) *free_pos = tomb != UINT32_MAX ? tomb : i;
                return -1;
            }
            if (state != ENTRY_READY) {
                if (tomb == UINT32_MAX) tomb = i;
                continue;
            }
            slot = __atomic_load_n(U32(ent, E_SLOT), __ATOMIC_RELAXED);
            /* Acquire: the insert stores the generation (release) after the
             * name, lengths and hash, so an entry rewritten for another key
             * (a reused tombstone) whose generation we see shows its new
             * name too, never a mix that could match ours; the second look
             * below then sees the same generation and accepts it. */
            gen = __atomic_load_n(U32(ent, E_GENERATION), __ATOMIC_ACQUIRE);
            if (*U32(ent, E_HASH) == hash && *(uint8_t *)(ent + E_ACCOUNT_LEN) == alen
                && *(uint8_t *)(ent + E_EVENT_LEN) == elen
                && memcmp(ent + E_ACCOUNT, a, alen) == 0 && memcmp(ent + E_EVENT, e, elen) == 0) {
                __atomic_thread_fence(__ATOMIC_ACQUIRE);
                if (__atomic_load_n(U32(ent, E_STATE), __ATOMIC_RELAXED) != ENTRY_READY
                    || __atomic_load_n(U32(ent, E_SLOT), __ATOMIC_RELAXED) != slot
                    || __atomic_load_n(U32(ent, E_GENERATION), __ATOMIC_RELAXED) != gen)
                    break;  /* rewritten while we read it: probe again */
                if (slot >= c->key_capacity)
                    return (long)OVERFLOW_SLOT;
                return MAKE_REF(slot, c->slot_table == NULL ? 0 : gen & GEN_MASK);
            }
        }
        if (n == window) {
            if (free_pos) *free_pos = tomb;
            return -1;
        }
    }
    /* Rewritten under us 64 times: answer absent; the caller's insert
     * probes again under the lock, where nothing moves. */
    if (free_pos) *free_pos = UINT32_MAX;
    return -1;
}

/* The entry a new key goes into when the probe window held neither a
 * tombstone nor an empty entry: the first one past it that is not ready
 * (UINT32_MAX: the index is full).  Caller holds the lock. */
static uint32_t entry_past_window(Counter *c, uint32_t hash)
{
    uint32_t mask = c->index_size - 1, i = hash & mask;
    for (uint32_t n = 0; n < c->index_size; n++, i = (i + 1) & mask)
        if (__atomic_load_n(U32(index_entry(c, i), E_STATE), __ATOMIC_ACQUIRE) != ENTRY_READY)
            return i;
    return UINT32_MAX;
}

/* Resets bucket `b` to count `tag` from 0 (tag 0, a release fence, count 0,
 * then the tag, release).  Caller holds the lock. */
static inline void stamp_bucket(bucket_t *b, uint64_t tag)
{
    __atomic_store_n(&b->tag, 0, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_RELEASE);
    __atomic_store_n(&b->count, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&b->tag, tag, __ATOMIC_RELEASE);
}

/* Inserts the key under the structural lock; returns its ref, OVERFLOW_SLOT
 * when the table is full, or -1 with errno set when the lock was not taken.
 * No Python: runs with the GIL released, so a thread that holds the GIL
 * never makes the lock wait (the lock is taken, the entry written and the
 * lock given back in one stretch of C).  A reclaimed slot (the free list) is
 * taken before keys_used grows; `limit` bounds the slots in use,
 * keys_used - free_slots, and is checked again here, under the lock: another
 * process may have taken the last slot since the caller's look.
 * The order of the stores (docs/segment.rst, "How a writer counts a hit"):
 * the entry's fields (state not yet ready), probe_limit if the key lies
 * past it, the record insert_entry then insert_slot, the slot taken
 * (take_slot), the hit's two buckets stamped (its `second`, in `stripe`), state =
 * ready, the record cleared.  A holder killed anywhere
 * leaves either nothing visible or a record the next holder rolls forward
 * (finish_insert): never a slot lost, owned twice, or a cut free list. */
static long insert_key(Counter *c, const char *a, size_t alen, const char *e, size_t elen,
                       uint32_t hash, uint32_t limit, uint64_t second, uint32_t stripe)
{
    seglock_t l = lock_of(c);
    uint32_t pos, used, slot, gen, head, nfree, window, d;
    uint64_t free_word;
    long ref;
    int from_free;
    if (seg_lock(&l, HOT_LOCK_TIMEOUT_MS) < 0) {
        __atomic_fetch_add(U64(c->base, H_LOCK_TIMEOUTS), 1u, __ATOMIC_RELAXED);
        return -1;
    }
    recover(c);
    /* Re-probe under the lock: another process may have added it. */
    ref = probe(c, a, alen, e, elen, hash, &pos, NULL);
    if (ref < 0) {
        used = __atomic_load_n(U32(c->base, H_KEYS_USED), __ATOMIC_ACQUIRE);
        free_word = c->slot_table == NULL ? 0
            : __atomic_load_n(U64(c->base, H_FREE_HEAD), __ATOMIC_ACQUIRE);
        head = (uint32_t)free_word;
        nfree = (uint32_t)(free_word >> 32);
        /* A corrupt free list (a head out of range) is ignored. */
        from_free = head != 0 && head - 1 < c->key_capacity && head - 1 > THROTTLE_RESERVED_SLOT;
        slot = from_free ? head - 1 : used;
        if (pos == UINT32_MAX)
            pos = entry_past_window(c, hash);
        if (used - (from_free && nfree <= used ? nfree : 0) >= limit || pos == UINT32_MAX
            || slot >= c->key_capacity) {
            ref = OVERFLOW_SLOT;
        } else {
            char *ent = index_entry(c, pos);
            gen = slot_gen(c, slot);
            /* alen <= ACCOUNT_MAX and elen <= EVENT_MAX (encode_names):
             * the copies stay inside the entry.  A tombstone being reused
             * still holds its old name: zero the fields first (the names
             * are zero padded). */
            memset(ent + E_ACCOUNT, 0, ACCOUNT_MAX + EVENT_MAX);
            memcpy(ent + E_ACCOUNT, a, alen);
            memcpy(ent + E_EVENT, e, elen);
            *(uint8_t *)(ent + E_ACCOUNT_LEN) = (uint8_t)alen;
            *(uint8_t *)(ent + E_EVENT_LEN) = (uint8_t)elen;
            *U32(ent, E_HASH) = hash;
            __atomic_store_n(U32(ent, E_SLOT), slot, __ATOMIC_RELAXED);
            __atomic_store_n(U32(ent, E_GENERATION), gen, __ATOMIC_RELEASE);
            CRASH_POINT(1);
            /* Past the window (none of its entries was free): the window
             * grows before the key is published, or lock-free probes would
             * stop short of it.  0 = no limit kept: left alone. */
            window = __atomic_load_n(U32(c->base, H_PROBE_LIMIT), __ATOMIC_ACQUIRE);
            d = (pos - hash) & (c->index_size - 1);
            if (window != 0 && d + 1 > window)
                __atomic_store_n(U32(c->base, H_PROBE_LIMIT), d + 1, __ATOMIC_RELEASE);
            CRASH_POINT(2);
            __atomic_store_n(U32(c->base, H_INSERT_ENTRY), pos + 1, __ATOMIC_RELEASE);
            __atomic_store_n(U32(c->base, H_INSERT_SLOT), slot + 1, __ATOMIC_RELEASE);
            CRASH_POINT(3);
            /* The slot leaves the free list (or keys_used grows) before the
             * entry is published.  Its buckets are zero: never used, or
             * zeroed by its reclaim. */
            take_slot(c, slot);
            /* The hit's minute and second buckets of our stripe are
             * stamped with its epochs (count 0): a reclaim that runs between
             * this insert and the hit's addition would otherwise find the
             * new key idle (every tag 0), take it back, and the hit would
             * be dropped.  The tags are 0 (a fresh or zeroed slot), so this
             * is a reset like roll_bucket's. */
            stamp_bucket(stripe_buckets(c, slot, stripe) + (second / 60) % c->minutes,
                         make_tag(second / 60, gen));
            stamp_bucket(stripe_buckets(c, slot, stripe) + c->minutes + second % c->seconds,
                         make_tag(second, gen));
            CRASH_POINT(7);
            __atomic_store_n(U32(ent, E_STATE), ENTRY_READY, __ATOMIC_RELEASE);
            CRASH_POINT(6);
            __atomic_store_n(U32(c->base, H_INSERT_SLOT), 0u, __ATOMIC_RELEASE);
            __atomic_store_n(U32(c->base, H_INSERT_ENTRY), 0u, __ATOMIC_RELEASE);
            ref = MAKE_REF(slot, gen);
        }
    }
    seg_unlock(&l);
    return ref;
}

/* Slots in use: keys_used minus the reclaimed slots waiting on the free
 * list (both on header line 2). */
static inline uint32_t slots_in_use(Counter *c)
{
    uint32_t used = __atomic_load_n(U32(c->base, H_KEYS_USED), __ATOMIC_ACQUIRE);
    uint32_t nfree = c->slot_table == NULL ? 0
        : __atomic_load_n(U32(c->base, H_FREE_SLOTS), __ATOMIC_ACQUIRE);
    return nfree <= used ? used - nfree : used;
}

/* Finds or creates the key; returns its ref, OVERFLOW_SLOT when the table
 * is full, or -1 with an exception set (lock timeout: SegmentBusy).
 * Takes the lock only to insert, with the GIL released (insert_key).  Names
 * are already validated and bounded.  The caller holds a reference to the
 * Counter and to the name strings whose UTF-8 `a` and `e` point into. */
static inline void own_stripe(Counter *c);

static long find_or_create(Counter *c, const char *a, size_t alen, const char *e, size_t elen,
                           int is_all, uint64_t second)
{
    uint32_t hash = fnv1a(a, alen, e, elen);
    uint32_t limit = is_all ? c->key_capacity : c->key_capacity - EVENT_RESERVE;
    uint32_t stripe;
    long slot = probe(c, a, alen, e, elen, hash, NULL, NULL);
    if (slot >= 0)
        return slot;
    /* Full: answer without the lock, so a flood of new names costs no
     * system call. */
    if (slots_in_use(c) >= limit)
        return OVERFLOW_SLOT;
    if (c->slot_table == NULL) {
        PyErr_SetString(LayoutMismatch, "a layout-1 segment is read only here");
        return -1;
    }
    /* The caller (slot_for) holds c->busy: nothing unmaps under the insert. */
    own_stripe(c);  /* a forked child stamps its own stripe */
    stripe = c->stripe;
    Py_BEGIN_ALLOW_THREADS
    slot = insert_key(c, a, alen, e, elen, hash, limit, second, stripe);
    Py_END_ALLOW_THREADS
    if (slot < 0)
        PyErr_SetString(SegmentBusy, "timed out waiting for the segment lock to add a key");
    return slot;
}

/* Encodes and validates a name pair on a cache miss.  Calls names.validate
 * (Python) so there is one source of truth for the rules. */
static int encode_names(PyObject *account, PyObject *event, const char **a, Py_ssize_t *alen,
                        const char **e, Py_ssize_t *elen)
{
    PyObject *r = PyObject_CallFunctionObjArgs(validate_cb, account, event, NULL);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    if (account == Py_None) {
        *a = "all";
        *alen = 3;
    } else if ((*a = PyUnicode_AsUTF8AndSize(account, alen)) == NULL) {
        return -1;
    }
    if ((*e = PyUnicode_AsUTF8AndSize(event, elen)) == NULL)
        return -1;
    /* Why here too: names.validate measured value.encode(), which a str
     * subclass can override; these are the bytes that will be copied into
     * the index entry's 64- and 32-byte fields. */
    if (*alen < 1 || *alen > (Py_ssize_t)ACCOUNT_MAX
        || *elen < 1 || *elen > (Py_ssize_t)EVENT_MAX) {
        PyErr_Format(PyExc_ValueError,
                     "account and event names must be 1..%u and 1..%u UTF-8 bytes; got %zd "
                     "and %zd", ACCOUNT_MAX, EVENT_MAX, *alen, *elen);
        return -1;
    }
    return 0;
}

/* Remembers `ref` for (account, event) in the process cache.  Returns
 * ref, or -1 with an exception set (no memory).  The names are exact str
 * (or None), so no dict operation here runs Python code; the new account
 * dict is filled before the cache holds it, and an existing one is held by
 * a reference of ours while we write to it. */
static long cache_ref(Counter *c, PyObject *account, PyObject *event, long ref)
{
    PyObject *accounts = PyDict_GetItemWithError(c->cache, event), *v;
    int rc;
    if (accounts == NULL) {
        if (PyErr_Occurred() || (accounts = PyDict_New()) == NULL)
            return -1;
        rc = PyDict_SetItem(c->cache, event, accounts);
    } else {
        Py_INCREF(accounts);
        rc = 0;
    }
    if (rc == 0 && (v = PyLong_FromLong(ref)) != NULL) {
        rc = PyDict_SetItem(accounts, account, v);
        Py_DECREF(v);
    } else {
        rc = -1;
    }
    Py_DECREF(accounts);
    return rc < 0 ? -1 : ref;
}

/* Returns the ref (slot | generation << 32) for (account or None = all,
 * event): from the process cache, or from the index (creating the key).
 * -1 with an exception set on bad names or a lock timeout.  Overflow results
 * are not cached, so the cache stays bounded by the table's capacity.
 * `create` is the hit's epoch second (the hot path: a new key's buckets of
 * that second and its minute are stamped by the insert, insert_key), or 0
 * (readers: find; nothing is created).  A second, not the hit's clock by
 * address: an address that escapes would keep the hit's clock out of
 * registers on the cached path.  Without it a cached ref is checked
 * against the slot's generation, and forgotten when the key was reclaimed;
 * with it the bucket tags do that check (roll_bucket).
 * The names must be exact str (or None): a subclass's __eq__ or __hash__
 * would run Python inside the cache's lookups.
 * Hazard: on a miss Python runs (names.validate; a new dict may start the
 * collector) and the insert lets go of the GIL, so another thread may
 * meanwhile clear the cache (forget_slots) or try to detach the Counter:
 * the miss holds c->busy (detach and __init__ refuse), and no borrowed
 * pointer into the cache is kept across it; the result is cached by a
 * fresh lookup afterwards (cache_ref).  A hit found in the cache runs no
 * Python and never lets go of the GIL. */
static long slot_miss(Counter *c, PyObject *account, PyObject *event, uint64_t create);

static long slot_for(Counter *c, PyObject *account, PyObject *event, uint64_t create)
{
    PyObject *accounts = PyDict_GetItemWithError(c->cache, event), *v;
    long slot;
    if (accounts != NULL) {
        v = PyDict_GetItemWithError(accounts, account);
        if (v != NULL) {
            slot = PyLong_AsLong(v);
            if (create || slot_gen(c, REF_SLOT(slot)) == REF_GEN(slot))
                return slot;
            if (PyDict_DelItem(accounts, account) < 0)
                return -1;
        }
    }
    if (PyErr_Occurred())
        return -1;
    BUSY_ENTER(c);
    slot = slot_miss(c, account, event, create);
    BUSY_LEAVE(c);
    return slot;
}

/* slot_for() on a cache miss; the caller holds c->busy. */
static long slot_miss(Counter *c, PyObject *account, PyObject *event, uint64_t create)
{
    const char *a, *e;
    Py_ssize_t alen, elen;
    long slot;
    if (encode_names(account, event, &a, &alen, &e, &elen) < 0)
        return -1;
    if (c->base == NULL) {
        PyErr_SetString(SegmentNotFound, "this Counter is detached");
        return -1;
    }
    if (create) {
        slot = find_or_create(c, a, (size_t)alen, e, (size_t)elen, account == Py_None, create);
    } else {
        slot = probe(c, a, (size_t)alen, e, (size_t)elen, fnv1a(a, alen, e, elen), NULL, NULL);
        if (slot < 0)
            return -2;  /* absent */
    }
    if (slot <= (long)OVERFLOW_SLOT)
        return slot;
    return cache_ref(c, account, event, slot);
}

/* ------------------------------------------------------------------- add */

/* Makes `b` count `tag` (an epoch and the writer's generation of the slot,
 * make_tag), resetting it if it holds another epoch.  Returns 0 when b
 * counts tag, 1 when the addition is dropped (below), -1 on a lock timeout,
 * ADD_STALE when the slot's generation is no longer `gen`: the key was
 * reclaimed since this process cached its slot; nothing is touched, and the
 * caller resolves the key again.  `epoch` is the bare epoch, `unit` the
 * bucket's epoch length in seconds (60 for a minute bucket, 1 for a second
 * bucket).
 * Why the generation check is here and costs the hot path no load: a
 * reclaimed slot's buckets are zeroed and its generation bumped, so a tag
 * that carries the old generation never matches again, and every stale
 * writer comes here, under the lock, where reclaims happen too.
 * A bucket holding a NEWER epoch: a bucket of the same index holds epochs
 * that differ by whole rings, so it is a ring or more ahead of our tag.
 * Either the bucket is in the future (a clock that jumped forward and came
 * back): its tag is ahead of the real clock, and it is reclaimed, since
 * refusing additions until real time caught up would blind the counters
 * for as long as the jump; reclaiming loses what was counted during the
 * jump, nothing else.  Or our time is the stale one (a `now` replayed from
 * the past, a writer descheduled for a whole ring): the bucket holds
 * current counts, which must never be reset for a late hit, so the
 * addition is dropped (and counted in dropped_hits).
 * Hazard: two processes may see the old tag at once; the check is repeated
 * under the lock so only one resets, and the reset stores the count
 * before the tag (release) so nobody adds to the new epoch before the zero.
 * Hazard: a lock-free reader (bucket_read) may be between its load of the
 * old tag and its load of the count.  The tag is zeroed first, fenced, so
 * that reader's second look at the tag fails instead of passing the new
 * epoch's count off as the old one's (a seqlock write; a writer that sees
 * the 0 goes for the lock and waits for us).
 * The GIL is released for the whole of lock, reset and unlock, so a thread
 * holding the GIL never stretches the time the lock is held. */
#define ADD_STALE 2
__attribute__((noinline)) static int roll_bucket(Counter *c, bucket_t *b, uint64_t tag,
                                                 uint64_t unit, long ref)
{
    seglock_t l = lock_of(c);
    struct timespec ts;
    uint64_t cur, epoch = tag & EPOCH_MASK;
    uint32_t slot = REF_SLOT(ref), gen = REF_GEN(ref);
    int rc = 0;
    BUSY_ENTER(c);
    Py_BEGIN_ALLOW_THREADS
    if (seg_lock(&l, HOT_LOCK_TIMEOUT_MS) < 0) {
        __atomic_fetch_add(U64(c->base, H_LOCK_TIMEOUTS), 1u, __ATOMIC_RELAXED);
        rc = -1;
    } else {
        recover(c);  /* a holder died half way: finish what it left first */
        if (slot_gen(c, slot) != gen) {
            rc = ADD_STALE;
        } else {
            cur = __atomic_load_n(&b->tag, __ATOMIC_ACQUIRE);
            if ((cur & EPOCH_MASK) > epoch) {
                clock_gettime(CLOCK_REALTIME, &ts);
                /* + 1: the clock may have moved on since the tag was read. */
                if ((cur & EPOCH_MASK) <= (uint64_t)ts.tv_sec / unit + 1)
                    rc = 1;  /* our time is stale: keep the current counts */
            }
            if (cur != tag && rc == 0) {
                __atomic_store_n(&b->tag, 0, __ATOMIC_RELAXED);
                __atomic_thread_fence(__ATOMIC_RELEASE);
                __atomic_store_n(&b->count, 0, __ATOMIC_RELAXED);
                __atomic_store_n(&b->tag, tag, __ATOMIC_RELEASE);
            }
        }
        seg_unlock(&l);
    }
    Py_END_ALLOW_THREADS
    BUSY_LEAVE(c);
    return rc;
}

/* Adds n to one bucket of the key `ref`.  Lock-free unless the bucket rolls
 * over.  Returns 0, or what roll_bucket returned. */
static inline int add_bucket(Counter *c, bucket_t *b, uint64_t tag, uint64_t unit, long ref,
                             uint64_t n)
{
    if (__builtin_expect(__atomic_load_n(&b->tag, __ATOMIC_ACQUIRE) != tag, 0)) {
        int rc = roll_bucket(c, b, tag, unit, ref);
        if (rc != 0)
            return rc;
    }
    __atomic_fetch_add(&b->count, n, __ATOMIC_RELAXED);
    return 0;
}

/* Points the cached bucket indices at `second` (see clk). */
static inline void set_clock(Counter *c, uint64_t second)
{
    c->clk.second = second;
    c->clk.minute = second / 60;
    c->clk.min_idx = (uint32_t)(c->clk.minute % c->minutes);
    c->clk.sec_idx = (uint32_t)(second % c->seconds);
}

/* A forked child takes its own stripe (choose_stripe), once, at its first
 * hit or look at the stripe after the fork. */
static inline void own_stripe(Counter *c)
{
    if (!c->fixed_stripe && c->fork_gen != fork_generation)
        choose_stripe(c);
}

/* Adds n to this process's stripe of the key `ref` (own_stripe() was
 * called), in the minute and second buckets of the hit's clock `clk`.
 * Lock-free unless a bucket rolls over.  Returns 0, 1 when an addition was
 * dropped, or ADD_STALE when the key was reclaimed (nothing added: resolve
 * it again).  Why `clk` is the caller's copy: roll_bucket lets go of the
 * GIL, and another thread's hit may meanwhile move the Counter's clock. */
static inline __attribute__((always_inline)) int add_slot(Counter *c, const hclock_t *clk,
                                                          long ref, uint64_t n)
{
    /* The generation of a ref is already below 2**24 (MAKE_REF's callers
     * mask it): the tag's high bits are a shift away. */
    uint64_t high = ((uint64_t)ref >> 32) << EPOCH_BITS;
    bucket_t *b = stripe_buckets(c, REF_SLOT(ref), c->stripe);
    int rc = add_bucket(c, b + clk->min_idx, clk->minute | high, 60, ref, n);
    if (__builtin_expect(rc == ADD_STALE, 0))
        return ADD_STALE;
    /* A stale second bucket after a counted minute would need a reclaim
     * between the two (a key idle for a ring had its minute tag current):
     * the second's addition is then dropped, like any. */
    return rc | (add_bucket(c, b + c->minutes + clk->sec_idx, clk->second | high, 1, ref,
                            n) != 0);
}

/* Parses hit()'s arguments: (account=None, event="pageview", n=1, now=None,
 * *, status=None).  argv has 5 entries; argv[4] is the status or Py_None. */
static int parse_hit_args(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
                          PyObject **argv)
{
    static const char *names[5] = {"account", "event", "n", "now", "status"};
    argv[0] = Py_None; argv[1] = str_pageview; argv[2] = NULL; argv[3] = Py_None;
    argv[4] = Py_None;
    if (nargs > 4) {
        PyErr_SetString(PyExc_TypeError, "hit() takes at most 4 positional arguments "
                        "(status is a keyword argument)");
        return -1;
    }
    for (Py_ssize_t i = 0; i < nargs; i++)
        argv[i] = args[i];
    if (kwnames != NULL) {
        for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(kwnames); k++) {
            PyObject *kn = PyTuple_GET_ITEM(kwnames, k);
            int found = 0;
            for (int j = 0; j < 5; j++) {
                if (PyUnicode_CompareWithASCIIString(kn, names[j]) == 0) {
                    argv[j] = args[nargs + k];
                    found = 1;
                    break;
                }
            }
            if (!found) {
                PyErr_Format(PyExc_TypeError, "hit() got an unexpected keyword argument %R", kn);
                return -1;
            }
        }
    }
    if (argv[0] != Py_None && !PyUnicode_Check(argv[0])) {
        PyErr_Format(PyExc_TypeError, "account must be a str or None, not %.100s",
                     Py_TYPE(argv[0])->tp_name);
        return -1;
    }
    if (!PyUnicode_Check(argv[1])) {
        PyErr_Format(PyExc_TypeError, "event must be a str, not %.100s",
                     Py_TYPE(argv[1])->tp_name);
        return -1;
    }
    if (argv[4] != Py_None && !PyUnicode_Check(argv[4])) {
        PyErr_Format(PyExc_TypeError, "status must be a str or None, not %.100s",
                     Py_TYPE(argv[4])->tp_name);
        return -1;
    }
    return 0;
}

/* With a status (argv[4]), makes argv[1] the funnel key's event name
 * "event/status" (names.STATUS_SEP), which names.validate checks like any
 * name on the key's first hit, and returns it: a new reference the caller
 * releases.  Without one, returns Py_None and changes nothing, so a plain
 * hit pays one compare.  Why a name and not a second counter: a status hit
 * stays one atomic add into one key (and its `all`), and the segment
 * layout does not change.  NULL with an exception set (no memory). */
static PyObject *status_event(PyObject **argv)
{
    PyObject *head, *joined;
    if (argv[4] == Py_None)
        return Py_None;
    if ((head = PyUnicode_Concat(argv[1], str_status_sep)) == NULL)
        return NULL;
    joined = PyUnicode_Concat(head, argv[4]);
    Py_DECREF(head);
    if (joined != NULL)
        argv[1] = joined;
    return joined;
}

/* hit()'s n: an int in 1..MAX_HIT_N, else TypeError/ValueError naming
 * the value and the range (never OverflowError). */
static long long parse_n(PyObject *obj)
{
    long long n;
    int overflow;
    if (obj == NULL)
        return 1;
    if (!PyLong_Check(obj) || PyBool_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "n must be an int, not %.100s", Py_TYPE(obj)->tp_name);
        return -1;
    }
    n = PyLong_AsLongLongAndOverflow(obj, &overflow);
    if (n == -1 && PyErr_Occurred())
        return -1;
    if (overflow != 0 || n < 1 || (unsigned long long)n > MAX_HIT_N) {
        PyErr_Format(PyExc_ValueError, "n=%R is out of range; n must be 1..%llu per hit()",
                     obj, MAX_HIT_N);
        return -1;
    }
    return n;
}

/* Returns the `all` slot of `event`, creating the key if needed, and makes
 * `event` the cached one (ev_obj) unless the key went to the overflow
 * slot.  -1 with an exception set on a bad event or a lock timeout. */
static long all_slot_for(Counter *c, PyObject *event, uint64_t second)
{
    long slot = slot_for(c, Py_None, event, second);
    PyObject *accounts;
    if (slot <= (long)OVERFLOW_SLOT)
        return slot;
    /* slot_for cached it, so cache[event] exists. */
    if ((accounts = PyDict_GetItemWithError(c->cache, event)) == NULL)
        return PyErr_Occurred() ? -1 : slot;
    Py_XSETREF(c->ev_obj, Py_NewRef(event));
    Py_XSETREF(c->ev_accounts, Py_NewRef(accounts));
    c->ev_all_slot = slot;
    return slot;
}

/* Forgets every slot this process cached: one of them was reclaimed
 * (roll_bucket said ADD_STALE).  Rare: a key idle for a whole ring. */
static void forget_slots(Counter *c)
{
    PyDict_Clear(c->cache);
    Py_CLEAR(c->ev_obj);
    Py_CLEAR(c->ev_accounts);
}

/* Adds n to the account's key `ref` of a hit whose `all` key `all_ref` is
 * counted, and to overflow_hits when it is the overflow slot.  A table full
 * even for `all` keys sends both keys to the overflow slot: the hit is
 * counted there once, as overflow_hits does.  (Two keys never share a ref
 * otherwise: (slot, generation) pairs are never handed out twice.)  Returns
 * add_slot's result (0 when nothing was to be added). */
static inline int add_account(Counter *c, const hclock_t *clk, long ref, long all_ref,
                              uint64_t n)
{
    if (ref == OVERFLOW_SLOT)
        __atomic_fetch_add(U64(c->base, H_OVERFLOW_HITS), n, __ATOMIC_RELAXED);
    return ref == all_ref ? 0 : add_slot(c, clk, ref, n);
}

/* The core of hit(): the `all` key of the event, then the account's key.
 * Returns 0, or -1 with an exception set (bad input or lock timeout).
 * The caller has checked that the segment is live (get_default() for the
 * module's hit(), Counter_hit() for a Counter's) and passes exact str names
 * (do_hit).  Where Python runs or the GIL is let go (a cache miss, a bucket
 * roll-over) c->busy is held, so no other thread detaches the Counter under
 * the hit (slot_for, roll_bucket); nothing else here runs Python.  A key found reclaimed
 * (ADD_STALE) is resolved again, once, and counted in its new slot: the hit
 * goes to its own key, never to the slot's new owner. */
static inline __attribute__((always_inline)) int hit_keys(Counter *c, PyObject *account,
                                                          PyObject *event, uint64_t n,
                                                          uint64_t second)
{
    long all_slot, slot = -1;
    int dropped, rc;
    hclock_t clk;
    PyObject *v;
    /* Validate and resolve both names before adding anything, so bad input
     * never leaves half a hit behind.  The account first: its validation
     * covers the event too, so a bad account does not even create the
     * event's `all` key. */
    if (account != Py_None) {
        if (event == c->ev_obj && (v = PyDict_GetItemWithError(c->ev_accounts, account)) != NULL)
            slot = PyLong_AsLong(v);
        else if (PyErr_Occurred() || (slot = slot_for(c, account, event, second)) < 0)
            return -1;
    }
    if (event == c->ev_obj)
        all_slot = c->ev_all_slot;
    else if ((all_slot = all_slot_for(c, event, second)) < 0)
        return -1;
    if (second != c->clk.second)
        set_clock(c, second);
    clk = c->clk;  /* the hit's own clock from here (add_slot) */
    own_stripe(c);
    dropped = add_slot(c, &clk, all_slot, n);
    if (__builtin_expect(dropped == ADD_STALE, 0)) {
        /* Nothing was added yet: a failure here is the hit's. */
        forget_slots(c);
        if ((all_slot = all_slot_for(c, event, second)) < 0)
            return -1;
        dropped = add_slot(c, &clk, all_slot, n) != 0;
    }
    if (account != Py_None) {
        rc = add_account(c, &clk, slot, all_slot, n);
        if (__builtin_expect(rc == ADD_STALE, 0)) {
            /* The `all` key is counted: a failure now drops the rest. */
            forget_slots(c);
            if ((slot = slot_for(c, account, event, second)) < 0) {
                PyErr_Clear();
                rc = 1;
            } else {
                rc = add_account(c, &clk, slot, all_slot, n) != 0;
            }
        }
        dropped |= rc;
    } else if (all_slot == OVERFLOW_SLOT) {
        __atomic_fetch_add(U64(c->base, H_OVERFLOW_HITS), n, __ATOMIC_RELAXED);
    }
    /* Once per hit, however many of its four buckets dropped it: the header
     * field and the /metrics counter are "hits dropped". */
    if (dropped)
        __atomic_fetch_add(U64(c->base, H_DROPPED_HITS), n, __ATOMIC_RELAXED);
    return 0;
}

/* Exact str copies of names that are str subclasses (NULL with an
 * exception set), so that no lookup in the process cache runs Python code
 * (a subclass's __eq__ or __hash__).  New references; None stays None. */
static PyObject *exact_name(PyObject *name)
{
    if (name == Py_None || PyUnicode_CheckExact(name))
        return Py_NewRef(name);
    return PyUnicode_FromObject(name);
}

/* hit_keys() with exact str copies of names that are str subclasses. */
__attribute__((noinline)) static int hit_copied(Counter *c, PyObject *account,
                                                PyObject *event, uint64_t n, uint64_t second)
{
    PyObject *a = exact_name(account), *e = a == NULL ? NULL : exact_name(event);
    int rc = e == NULL ? -1 : hit_keys(c, a, e, n, second);
    Py_XDECREF(a);
    Py_XDECREF(e);
    return rc;
}

/* hit_keys() with exact str names: see hit_keys. */
static int do_hit(Counter *c, PyObject *account, PyObject *event, uint64_t n, uint64_t second)
{
    if (__builtin_expect((account != Py_None && !PyUnicode_CheckExact(account))
                         || !PyUnicode_CheckExact(event), 0))
        return hit_copied(c, account, event, n, second);
    return hit_keys(c, account, event, n, second);
}

/* Counter.hit(account=None, event="pageview", n=1, now=None, *, status=None):
 * strict, raises. */
static PyObject *Counter_hit(Counter *c, PyObject *const *args, Py_ssize_t nargs,
                             PyObject *kwnames)
{
    PyObject *argv[5], *owned;
    long long n;
    uint64_t second;
    int rc;
    if (c->base == NULL) {
        PyErr_SetString(SegmentNotFound, "this Counter is detached");
        return NULL;
    }
    if (parse_hit_args(args, nargs, kwnames, argv) < 0 || (n = parse_n(argv[2])) < 0
        || (second = parse_second(argv[3])) == 0)
        return NULL;
    if (__atomic_load_n(U32(c->base, H_STATE), __ATOMIC_ACQUIRE) != STATE_LIVE) {
        PyErr_SetString(SegmentNotFound, "the segment was uninstalled");
        return NULL;
    }
    if (c->slot_table == NULL) {
        PyErr_SetString(LayoutMismatch, "a layout-1 segment is read only (for uninstall's "
                        "final roll-up); run `trafficthreshold uninstall` then install");
        return NULL;
    }
    if ((owned = status_event(argv)) == NULL)
        return NULL;
    rc = do_hit(c, argv[0], argv[1], (uint64_t)n, second);
    if (owned != Py_None)
        Py_DECREF(owned);
    if (rc < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* ----------------------------------------------------- the default path */

/* Hands the pending exception (if any) and a message to Python's
 * trafficthreshold._warn, which logs it once; clears the exception. */
static void warn(const char *msg)
{
    PyObject *type, *value, *tb, *r;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (warn_cb != NULL) {
        r = PyObject_CallFunction(warn_cb, "sO", msg, value ? value : Py_None);
        if (r == NULL)
            PyErr_Clear();
        Py_XDECREF(r);
    }
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
}

/* Returns the default counter, attaching it if needed (at most once every
 * ATTACH_RETRY_S seconds).  NULL means "no segment": in strict mode an
 * exception is set, otherwise not (fail open). */
static Counter *get_default(double t)
{
    PyObject *r;
    if (default_counter != NULL) {
        if (default_counter->base != NULL
            && __atomic_load_n(U32(default_counter->base, H_STATE), __ATOMIC_ACQUIRE) == STATE_LIVE)
            return default_counter;
        /* Uninstalled under us: let go, and look for a new one below. */
        Py_CLEAR(default_counter);
    }
    if (!strict_mode && (int64_t)t < next_attach_try)
        return NULL;
    next_attach_try = (int64_t)t + ATTACH_RETRY_S;
    r = PyObject_CallNoArgs(attach_cb);
    if (r == NULL) {
        if (strict_mode)
            return NULL;
        warn("trafficthreshold: not counting");
        return NULL;
    }
    if (!PyObject_TypeCheck(r, &CounterType)) {
        Py_DECREF(r);
        PyErr_SetString(PyExc_TypeError, "_attach_default() must return a Counter");
        if (!strict_mode) warn("trafficthreshold: not counting");
        return NULL;
    }
    default_counter = (Counter *)r;
    return default_counter;
}

/* hit(account=None, event="pageview", n=1, now=None, *, status=None) -> None.
 * Bad input raises ValueError/TypeError.  Anything wrong with the segment
 * is logged once and ignored (fail open), unless strict mode is on. */
static PyObject *mod_hit(PyObject *self, PyObject *const *args, Py_ssize_t nargs,
                         PyObject *kwnames)
{
    PyObject *argv[5], *r, *owned;
    long long n;
    uint64_t second;
    Counter *c;
    int rc;
    if (parse_hit_args(args, nargs, kwnames, argv) < 0 || (n = parse_n(argv[2])) < 0
        || (second = parse_second(argv[3])) == 0)
        return NULL;
    if ((c = get_default((double)second)) == NULL) {
        if (PyErr_Occurred())
            return NULL;
        /* Fail open, but bad names still raise: a site run without the
         * segment (development) must see them before production does.
         * Costs a Python call per hit, on this degraded path only. */
        if ((owned = status_event(argv)) == NULL)
            return NULL;
        r = PyObject_CallFunctionObjArgs(validate_cb, argv[0], argv[1], NULL);
        if (owned != Py_None)
            Py_DECREF(owned);
        if (r == NULL)
            return NULL;
        Py_DECREF(r);
        Py_RETURN_NONE;
    }
    /* Why the reference: do_hit lets go of the GIL (the semaphore, the name
     * validator), and another thread may meanwhile drop default_counter
     * (the segment was uninstalled, or configure() ran) and unmap it. */
    if ((owned = status_event(argv)) == NULL)
        return NULL;
    Py_INCREF(c);
    rc = do_hit(c, argv[0], argv[1], (uint64_t)n, second);
    Py_DECREF(c);
    if (owned != Py_None)
        Py_DECREF(owned);
    if (rc < 0) {
        if (strict_mode || PyErr_ExceptionMatches(PyExc_ValueError)
            || PyErr_ExceptionMatches(PyExc_TypeError))
            return NULL;
        warn("trafficthreshold: a hit was not counted");
    }
    Py_RETURN_NONE;
}

/* ----------------------------------------------------------------- reads */

/* The count of bucket b if it holds epoch `tag`, else 0.  Lock-free: the
 * tag is read before and after the count (a seqlock read, see roll_bucket),
 * so a bucket rolled over in between reads as 0, never as the new epoch's
 * count under the old epoch's name. */
static inline uint64_t bucket_read(bucket_t *b, uint64_t tag)
{
    uint64_t n;
    if (__atomic_load_n(&b->tag, __ATOMIC_ACQUIRE) != tag)
        return 0;
    n = __atomic_load_n(&b->count, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    return __atomic_load_n(&b->tag, __ATOMIC_RELAXED) == tag ? n : 0;
}

/* a + b, saturating at COUNT_MAX.  Why: counts are read from shared
 * memory (a corrupt or absurd bucket must not wrap a sum around to a small
 * number) and end in signed 64-bit integers (SQLite, JSON readers). */
#define COUNT_MAX 0x7FFFFFFFFFFFFFFFULL
static inline uint64_t sat_add(uint64_t a, uint64_t b)
{
    if (a > COUNT_MAX) a = COUNT_MAX;
    if (b > COUNT_MAX) b = COUNT_MAX;
    return a + b > COUNT_MAX ? COUNT_MAX : a + b;
}

/* Count of `slot` in clock minute `minute` (sum over stripes, saturating),
 * for the slot's current generation: a reclaimed slot's old key reads 0. */
static uint64_t minute_count(Counter *c, uint32_t slot, uint64_t minute)
{
    uint64_t total = 0;
    uint32_t gen = slot_gen(c, slot);
    if (minute > EPOCH_MASK)
        return 0;  /* no tag holds it */
    for (uint32_t p = 0; p < c->stripes; p++)
        total = sat_add(total, bucket_read(minute_bucket(c, slot, p, minute),
                                           make_tag(minute, gen)));
    return total;
}

/* Count of `slot` over the 60 seconds ending with `second` (inclusive). */
static uint64_t sliding_count(Counter *c, uint32_t slot, uint64_t second)
{
    uint64_t total = 0;
    uint32_t gen = slot_gen(c, slot);
    if (second > EPOCH_MASK)
        return 0;
    for (uint32_t p = 0; p < c->stripes; p++) {
        for (uint64_t s = second - 59; s <= second; s++)
            total = sat_add(total, bucket_read(second_bucket(c, slot, p, s), make_tag(s, gen)));
    }
    return total;
}

static uint64_t window_count(Counter *c, uint32_t slot, int window, double t)
{
    uint64_t second = (uint64_t)t;
    return window == 1 ? minute_count(c, slot, second / 60) : sliding_count(c, slot, second);
}

/* The throttle level: the supervisor's (if its heartbeat is fresh) or the
 * live level of the window, whichever is higher, so workers see a rise at
 * once.  With `use_cache` (the real clock) it is cached per second: a
 * second call in the same second costs two loads.  A driven clock (a `now`
 * argument) neither reads nor fills the cache. */
static int level_of(Counter *c, double t, int use_cache)
{
    int64_t second = (int64_t)t;
    uint32_t mult, lvl = 0, slot;
    uint64_t hb, hits, live;
    if (use_cache && c->level_sec == second)
        return c->level_cached;
    mult = header_u32(c, H_THROTTLE_MULTIPLIER);
    hb = __atomic_load_n(U64(c->base, H_HEARTBEAT_MS), __ATOMIC_ACQUIRE);
    if (hb + HEARTBEAT_STALE_MS >= (uint64_t)(t * 1000.0))
        lvl = header_u32(c, H_THROTTLE_LEVEL);
    slot = header_u32(c, H_THROTTLE_SLOT);
    /* Why the bound: the slot is read from the header on every call, and a
     * corrupted one must not send the read past the mapping. */
    hits = slot < c->key_capacity
           ? window_count(c, slot, (int)header_u32(c, H_THROTTLE_WINDOW), t) : 0;
    live = mult > 0 ? hits / mult : 0;
    if (live > lvl)
        lvl = live > 5 ? 5 : (uint32_t)live;
    if (lvl > 5)
        lvl = 5;
    if (use_cache) {
        c->level_sec = second;
        c->level_cached = (int)lvl;
    }
    return (int)lvl;
}

static int check_attached(Counter *c)
{
    if (c->base == NULL) {
        PyErr_SetString(SegmentNotFound, "this Counter is detached");
        return -1;
    }
    return 0;
}

/* Counter.level(now=None) -> int 0..5 */
static PyObject *Counter_level(Counter *c, PyObject *const *args, Py_ssize_t nargs)
{
    double t;
    if (check_attached(c) < 0)
        return NULL;
    if ((t = parse_now(nargs > 0 ? args[0] : NULL)) < 0)
        return NULL;
    return PyLong_FromLong(level_of(c, t, 0));
}

/* throttle_status(now=None) -> int 0..5; 0 when no segment is installed. */
static PyObject *mod_throttle_status(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    double t;
    Counter *c;
    if ((t = parse_now(nargs > 0 ? args[0] : NULL)) < 0)
        return NULL;
    if ((c = get_default(t)) == NULL) {
        if (PyErr_Occurred())
            return NULL;
        return PyLong_FromLong(0);
    }
    return PyLong_FromLong(level_of(c, t, nargs == 0 || args[0] == Py_None));
}

/* Counter.find(account, event) -> slot or None.  Never creates a key.
 * account None means the `all` key. */
static PyObject *Counter_find(Counter *c, PyObject *args)
{
    PyObject *account, *event;
    long slot;
    if (!PyArg_ParseTuple(args, "OU", &account, &event) || check_attached(c) < 0)
        return NULL;
    if (account != Py_None && !PyUnicode_Check(account)) {
        PyErr_SetString(PyExc_TypeError, "account must be a str or None");
        return NULL;
    }
    if ((account = exact_name(account)) == NULL)
        return NULL;
    if ((event = exact_name(event)) == NULL) {
        Py_DECREF(account);
        return NULL;
    }
    slot = slot_for(c, account, event, 0);
    Py_DECREF(account);
    Py_DECREF(event);
    if (slot == -2)
        Py_RETURN_NONE;
    if (slot < 0)
        return NULL;
    return PyLong_FromUnsignedLong(REF_SLOT(slot));
}

static int check_slot(Counter *c, unsigned long slot)
{
    if (slot >= c->key_capacity) {
        PyErr_Format(PyExc_ValueError, "slot %lu is out of range", slot);
        return -1;
    }
    return 0;
}

/* Counter.count(slot, window, now=None) -> int; window 0 = sliding 60 s,
 * 1 = clock minute. */
static PyObject *Counter_count(Counter *c, PyObject *args)
{
    unsigned long slot;
    int window;
    PyObject *now = Py_None;
    double t;
    if (!PyArg_ParseTuple(args, "ki|O", &slot, &window, &now) || check_attached(c) < 0
        || check_slot(c, slot) < 0 || (t = parse_now(now)) < 0)
        return NULL;
    return PyLong_FromUnsignedLongLong(window_count(c, (uint32_t)slot, window, t));
}

/* Appends `item` (a new reference, or NULL after a failed build) to `out`
 * and drops our reference.  Returns 0, or -1 with an exception set. */
static int append_new(PyObject *out, PyObject *item)
{
    int rc = item == NULL ? -1 : PyList_Append(out, item);
    Py_XDECREF(item);
    return rc;
}

/* Counter.minutes(first, last) -> list of (slot, epoch_minute, count) for
 * every used slot and minute in [first, last] with a count > 0.  Lock-free:
 * a bucket being rolled over reads as 0 or as its new epoch's count, never
 * as a mix (the tag is checked).  Minutes older than the ring read as 0. */
static PyObject *Counter_minutes(Counter *c, PyObject *args)
{
    unsigned long long first, last;
    PyObject *out;
    uint32_t used;
    if (!PyArg_ParseTuple(args, "KK", &first, &last) || check_attached(c) < 0)
        return NULL;
    if (last >= first && last - first >= c->minutes) {
        PyErr_Format(PyExc_ValueError, "at most %u minutes can be read at once", c->minutes);
        return NULL;
    }
    if ((out = PyList_New(0)) == NULL)
        return NULL;
    used = __atomic_load_n(U32(c->base, H_KEYS_USED), __ATOMIC_ACQUIRE);
    BUSY_ENTER(c);  /* building the list may run Python (the collector): no detach */
    for (uint32_t slot = 0; slot < used && slot < c->key_capacity; slot++) {
        /* Counted by offset: `m <= last` would never end at last = 2**64-1. */
        for (uint64_t k = 0; last >= first && k <= last - first; k++) {
            uint64_t m = first + k, n = minute_count(c, slot, m);
            if (n == 0)
                continue;
            if (append_new(out, Py_BuildValue("(IKK)", slot, (unsigned long long)m,
                                              (unsigned long long)n)) < 0) {
                Py_DECREF(out);
                BUSY_LEAVE(c);
                return NULL;
            }
        }
    }
    BUSY_LEAVE(c);
    return out;
}

/* (slot, account, event) of index entry `ent`, a new reference (NULL with
 * an exception set).  Lengths and bytes come from shared memory: the
 * lengths are bounded to their fields, and the names decoded with
 * surrogateescape, so that a name which is not UTF-8 (a foreign writer)
 * reads as a str with lone surrogates (names.check_name refuses those)
 * instead of raising for every reader. */
static PyObject *entry_tuple(const char *ent)
{
    uint8_t alen = *(uint8_t *)(ent + E_ACCOUNT_LEN), elen = *(uint8_t *)(ent + E_EVENT_LEN);
    if (alen > ACCOUNT_MAX) alen = ACCOUNT_MAX;
    if (elen > EVENT_MAX) elen = EVENT_MAX;
    return Py_BuildValue("(IN N)", *U32(ent, E_SLOT),
                         PyUnicode_DecodeUTF8(ent + E_ACCOUNT, alen, "surrogateescape"),
                         PyUnicode_DecodeUTF8(ent + E_EVENT, elen, "surrogateescape"));
}

/* Counter.keys(damaged=None) -> list of (slot, account, event) of every
 * ready key.  An entry whose slot is past key_capacity (a scribbled
 * segment, a foreign writer's bug) is left out: its count cannot be read.
 * When `damaged` is a list, (entry, slot, account, event) of each such
 * entry is appended to it, for the reader to report. */
static PyObject *Counter_keys(Counter *c, PyObject *args)
{
    PyObject *out, *damaged = NULL, *item;
    uint32_t slot;
    int rc = 0;
    if (!PyArg_ParseTuple(args, "|O!", &PyList_Type, &damaged) || check_attached(c) < 0
        || (out = PyList_New(0)) == NULL)
        return NULL;
    BUSY_ENTER(c);  /* building the list may run Python (the collector): no detach */
    for (uint32_t i = 0; i < c->index_size && rc == 0; i++) {
        char *ent = index_entry(c, i);
        if (__atomic_load_n(U32(ent, E_STATE), __ATOMIC_ACQUIRE) != ENTRY_READY)
            continue;
        slot = __atomic_load_n(U32(ent, E_SLOT), __ATOMIC_RELAXED);
        if (slot < c->key_capacity) {
            rc = append_new(out, entry_tuple(ent));
        } else if (damaged != NULL) {
            item = entry_tuple(ent);
            rc = append_new(damaged, item == NULL ? NULL
                            : Py_BuildValue("(IN)", i, item));  /* (entry, (slot, a, e)) */
        }
    }
    BUSY_LEAVE(c);
    if (rc < 0) {
        Py_DECREF(out);
        return NULL;
    }
    return out;
}

/* Whether every bucket of `slot` (all stripes, minute and second) is older
 * than minute `before`: tag 0 (unused or zeroed), or an epoch minute below
 * `before`, an epoch second below before * 60.  Lock-free. */
static int slot_idle(Counter *c, uint32_t slot, uint64_t before)
{
    for (uint32_t p = 0; p < c->stripes; p++) {
        bucket_t *b = stripe_buckets(c, slot, p);
        for (uint32_t j = 0; j < c->minutes + c->seconds; j++) {
            uint64_t t = __atomic_load_n(&b[j].tag, __ATOMIC_ACQUIRE) & EPOCH_MASK;
            if (t != 0 && t >= (j < c->minutes ? before : before * 60))
                return 0;
        }
    }
    return 1;
}

/* Starts the reclaim of `slot`, the key of index entry `pos`, and finishes
 * it (finish_reclaim).  Caller holds the lock and has checked that the key
 * is idle.  index_seq made odd, then `reclaimed`, first: a reader caching
 * slot -> name sees them move before the slot can change hands (a
 * reclaimer killed right after leaves `reclaimed` one too high, never too
 * low, and index_seq odd until the next holder's finish_reclaim). */
static void do_reclaim(Counter *c, uint32_t pos, uint32_t slot)
{
    index_seq_begin(c);
    CRASH_POINT(110);
    __atomic_fetch_add(U64(c->base, H_RECLAIMED), 1u, __ATOMIC_ACQ_REL);
    CRASH_POINT(111);
    __atomic_store_n(U32(c->base, H_RECLAIM_ENTRY), pos + 1, __ATOMIC_RELEASE);
    __atomic_store_n(U32(c->base, H_RECLAIM_SLOT), slot + 1, __ATOMIC_RELEASE);
    finish_reclaim(c);
}

/* Counter.reclaim(before_minute, timeout_ms=1000) -> [(slot, account,
 * event)]: gives back the slot of every key whose buckets are all older
 * than `before_minute` (slot_idle), except slot 0, slot 1 and
 * throttle_slot.  The caller (segment.reclaim) makes before_minute no later
 * than the ring's oldest minute and the first minute not yet rolled, so
 * nothing a reclaim zeroes is lost.  The index is scanned without the lock;
 * each candidate is checked again and reclaimed under the lock (taken per
 * key, with the GIL released, so hits wait microseconds at most).  Raises
 * SegmentBusy when the lock was not taken in timeout_ms (the keys reclaimed
 * before stay reclaimed: see the header's `reclaimed`). */
static PyObject *Counter_reclaim(Counter *c, PyObject *args)
{
    unsigned long long before;
    int timeout_ms = 1000, rc, done;
    uint32_t throttle, slot, gen;
    seglock_t l;
    PyObject *out, *item;
    if (!PyArg_ParseTuple(args, "K|i", &before, &timeout_ms) || check_attached(c) < 0)
        return NULL;
    if (c->slot_table == NULL) {
        PyErr_SetString(LayoutMismatch, "a layout-1 segment has no slot table: nothing "
                        "can be reclaimed; run `trafficthreshold uninstall` then install");
        return NULL;
    }
    if (header_u32(c, H_STATE) != STATE_LIVE) {
        PyErr_SetString(SegmentNotFound, "the segment was uninstalled");
        return NULL;
    }
    if (before > EPOCH_MASK / 60)
        before = EPOCH_MASK / 60;
    if ((out = PyList_New(0)) == NULL)
        return NULL;
    l = lock_of(c);
    throttle = header_u32(c, H_THROTTLE_SLOT);
    /* Held for the whole scan: building the result may run Python (the
     * garbage collector), and `ent` points into the mapping. */
    BUSY_ENTER(c);
    for (uint32_t i = 0; i < c->index_size; i++) {
        char *ent = index_entry(c, i);
        if (__atomic_load_n(U32(ent, E_STATE), __ATOMIC_ACQUIRE) != ENTRY_READY)
            continue;
        slot = __atomic_load_n(U32(ent, E_SLOT), __ATOMIC_RELAXED);
        gen = __atomic_load_n(U32(ent, E_GENERATION), __ATOMIC_RELAXED);
        if (slot <= THROTTLE_RESERVED_SLOT || slot == throttle || slot >= c->key_capacity
            || gen != slot_gen(c, slot) || !slot_idle(c, slot, before))
            continue;
        item = entry_tuple(ent);
        if (item == NULL) {
            Py_DECREF(out);
            BUSY_LEAVE(c);
            return NULL;
        }
        done = 0;
        Py_BEGIN_ALLOW_THREADS
        rc = seg_lock(&l, timeout_ms);
        if (rc == 0) {
            recover(c);
            /* Checked again under the lock: no roll-over, insert or other
             * reclaim can run now. */
            if (__atomic_load_n(U32(ent, E_STATE), __ATOMIC_ACQUIRE) == ENTRY_READY
                && *U32(ent, E_SLOT) == slot && *U32(ent, E_GENERATION) == gen
                && slot_gen(c, slot) == gen && slot_idle(c, slot, before)) {
                do_reclaim(c, i, slot);
                done = 1;
            }
            seg_unlock(&l);
        }
        Py_END_ALLOW_THREADS
        if (rc != 0) {
            Py_DECREF(item);
            Py_DECREF(out);
            BUSY_LEAVE(c);
            PyErr_Format(SegmentBusy, "the segment lock was not free within %d ms to reclaim "
                         "slot %u", timeout_ms, slot);
            return NULL;
        }
        if (done ? append_new(out, item) < 0 : (Py_DECREF(item), 0)) {
            Py_DECREF(out);
            BUSY_LEAVE(c);
            return NULL;
        }
    }
    /* Reclaims only lower the probe window: compute it again, once per
     * scan, under the lock (a failure to take it leaves the old, larger
     * window, which is safe). */
    if (PyList_GET_SIZE(out) > 0) {
        Py_BEGIN_ALLOW_THREADS
        if (seg_lock(&l, timeout_ms) == 0) {
            recover(c);
            reset_probe_limit(c);
            seg_unlock(&l);
        }
        Py_END_ALLOW_THREADS
    }
    BUSY_LEAVE(c);
    return out;
}

/* Counter._probe_length(account, event) -> how many index entries a
 * lock-free probe for the key reads (tests and benchmarks of the index). */
static PyObject *Counter_probe_length(Counter *c, PyObject *args)
{
    const char *a, *e;
    Py_ssize_t alen, elen;
    uint32_t reads = 0;
    PyObject *account;
    if (!PyArg_ParseTuple(args, "Os#", &account, &e, &elen) || check_attached(c) < 0)
        return NULL;
    if (account == Py_None) {
        a = "all";
        alen = 3;
    } else if ((a = PyUnicode_AsUTF8AndSize(account, &alen)) == NULL) {
        return NULL;
    }
    probe(c, a, (size_t)alen, e, (size_t)elen, fnv1a(a, alen, e, elen), NULL, &reads);
    return PyLong_FromUnsignedLong(reads);
}

/* Counter.load(offset, width) -> int: an atomic header read (width 4 or 8). */
static PyObject *Counter_load(Counter *c, PyObject *args)
{
    unsigned long off;
    int width;
    if (!PyArg_ParseTuple(args, "ki", &off, &width) || check_attached(c) < 0)
        return NULL;
    /* The width first: `off % 0` would be a division by zero (SIGFPE). */
    if ((width != 4 && width != 8) || off > HEADER_SIZE - width || off % width) {
        PyErr_SetString(PyExc_ValueError, "bad header offset or width");
        return NULL;
    }
    if (width == 4)
        return PyLong_FromUnsignedLong(__atomic_load_n(U32(c->base, off), __ATOMIC_ACQUIRE));
    return PyLong_FromUnsignedLongLong(__atomic_load_n(U64(c->base, off), __ATOMIC_ACQUIRE));
}

/* Counter.store(offset, width, value): an atomic header write, for the
 * supervisor's fields (level, heartbeat, pid) and the settings. */
static PyObject *Counter_store(Counter *c, PyObject *args)
{
    unsigned long off;
    int width;
    unsigned long long v;
    if (!PyArg_ParseTuple(args, "kiK", &off, &width, &v) || check_attached(c) < 0)
        return NULL;
    if ((width != 4 && width != 8) || off > HEADER_SIZE - width || off % width
        || off < H_TOTAL_SIZE) {
        PyErr_SetString(PyExc_ValueError, "bad header offset or width (geometry is read-only)");
        return NULL;
    }
    if (width == 4)
        __atomic_store_n(U32(c->base, off), (uint32_t)v, __ATOMIC_RELEASE);
    else
        __atomic_store_n(U64(c->base, off), (uint64_t)v, __ATOMIC_RELEASE);
    c->level_sec = -1;  /* the level or its settings may have changed */
    Py_RETURN_NONE;
}

/* Takes `l` with the GIL released; returns None, or NULL with SegmentBusy
 * (timeout, naming the holder) or SegmentError set.  `keep` (may be NULL)
 * is kept alive while the GIL is released. */
static PyObject *lock_result(seglock_t *l, int timeout_ms, PyObject *keep)
{
    int rc, err;
    uint32_t holder;
    Py_XINCREF(keep);
    if (keep != NULL)
        BUSY_ENTER((Counter *)keep);
    Py_BEGIN_ALLOW_THREADS
    rc = seg_lock(l, timeout_ms);
    err = errno;
    Py_END_ALLOW_THREADS
    if (keep != NULL)
        BUSY_LEAVE((Counter *)keep);
    Py_XDECREF(keep);
    if (rc == 0)
        Py_RETURN_NONE;
    if (err == EAGAIN || err == ETIMEDOUT) {
        holder = __atomic_load_n(l->owner, __ATOMIC_ACQUIRE);
        if (l->backend == BACKEND_SYSV && l->semid >= 0)
            holder = (uint32_t)semctl(l->semid, 0, GETPID);
        PyErr_Format(SegmentBusy, "the segment lock is held by pid %u for more than %d ms",
                     holder, timeout_ms);
    } else if (err == EIDRM || err == EINVAL) {
        PyErr_SetString(SegmentNotFound, "the segment's semaphore was removed; run "
                        "`trafficthreshold uninstall --force` and install again");
    } else {
        errno = err;
        PyErr_SetFromErrno(SegmentError);
    }
    return NULL;
}

/* Counter.lock(timeout_ms) -> None; raises SegmentBusy on timeout.
 * For structural work done from Python (uninstall). */
static PyObject *Counter_lock(Counter *c, PyObject *args)
{
    int timeout_ms;
    seglock_t l;
    if (!PyArg_ParseTuple(args, "i", &timeout_ms) || check_attached(c) < 0)
        return NULL;
    l = lock_of(c);
    return lock_result(&l, timeout_ms, (PyObject *)c);
}

static PyObject *Counter_unlock(Counter *c, PyObject *unused)
{
    seglock_t l;
    if (check_attached(c) < 0)
        return NULL;
    l = lock_of(c);
    seg_unlock(&l);
    Py_RETURN_NONE;
}

static PyObject *Counter_detach(Counter *c, PyObject *unused)
{
    if (BUSY_HELD(c)) {
        PyErr_SetString(SegmentBusy, "another thread is inside this Counter's lock; "
                        "detach it when that call has returned");
        return NULL;
    }
    detach(c);
    Py_RETURN_NONE;
}

static PyObject *Counter_get_stripe(Counter *c, void *closure)
{
    if (c->base != NULL)
        own_stripe(c);
    return PyLong_FromUnsignedLong(c->stripe);
}

static PyObject *Counter_get_attached(Counter *c, void *closure)
{
    return PyBool_FromLong(c->base != NULL);
}

static PyObject *Counter_get_size(Counter *c, void *closure)
{
    return PyLong_FromSize_t(c->size);
}

static PyMethodDef Counter_methods[] = {
    {"hit", (PyCFunction)(void (*)(void))Counter_hit, METH_FASTCALL | METH_KEYWORDS,
     "hit(account=None, event='pageview', n=1, now=None, *, status=None): count; raises on "
     "any problem."},
    {"level", (PyCFunction)(void (*)(void))Counter_level, METH_FASTCALL,
     "level(now=None) -> the throttle level 0..5."},
    {"find", (PyCFunction)Counter_find, METH_VARARGS,
     "find(account_or_None, event) -> slot or None; never creates a key."},
    {"count", (PyCFunction)Counter_count, METH_VARARGS,
     "count(slot, window, now=None): window 0 = sliding 60 s, 1 = clock minute."},
    {"minutes", (PyCFunction)Counter_minutes, METH_VARARGS,
     "minutes(first, last) -> [(slot, epoch_minute, count)] with count > 0."},
    {"keys", (PyCFunction)Counter_keys, METH_VARARGS,
     "keys(damaged=None) -> [(slot, account, event)]; entries whose slot is past the table "
     "are left out (appended to `damaged` as (entry, (slot, account, event)))."},
    {"_probe_length", (PyCFunction)Counter_probe_length, METH_VARARGS,
     "_probe_length(account_or_None, event) -> entries a lock-free probe reads (tests)."},
    {"reclaim", (PyCFunction)Counter_reclaim, METH_VARARGS,
     "reclaim(before_minute, timeout_ms=1000) -> [(slot, account, event)] reclaimed: keys "
     "whose every bucket is older than before_minute (segment.reclaim chooses it)."},
    {"load", (PyCFunction)Counter_load, METH_VARARGS, "load(offset, width) -> int."},
    {"store", (PyCFunction)Counter_store, METH_VARARGS, "store(offset, width, value)."},
    {"lock", (PyCFunction)Counter_lock, METH_VARARGS,
     "lock(timeout_ms): take the structural lock (waiting without the GIL)."},
    {"unlock", (PyCFunction)Counter_unlock, METH_NOARGS,
     "unlock(): give the structural lock back."},
    {"detach", (PyCFunction)Counter_detach, METH_NOARGS, "detach(): unmap the segment."},
    {NULL}
};

static PyGetSetDef Counter_getset[] = {
    {"stripe", (getter)Counter_get_stripe, NULL, "this process's stripe", NULL},
    {"attached", (getter)Counter_get_attached, NULL, "whether the segment is mapped", NULL},
    {"size", (getter)Counter_get_size, NULL, "the mapping's size in bytes", NULL},
    {NULL}
};

static PyTypeObject CounterType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "trafficthreshold._counter.Counter",
    .tp_basicsize = sizeof(Counter),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Counter(backend, key, stripe=None): an attachment to the segment.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Counter_init,
    .tp_dealloc = (destructor)Counter_dealloc,
    .tp_methods = Counter_methods,
    .tp_getset = Counter_getset,
};

/* ------------------------------------------------------------ the module */

/* _setup(validate, attach, warn, strict): wires the Python callbacks. */
static PyObject *mod_setup(PyObject *self, PyObject *args)
{
    PyObject *v, *a, *w;
    int strict;
    if (!PyArg_ParseTuple(args, "OOOp", &v, &a, &w, &strict))
        return NULL;
    Py_XSETREF(validate_cb, Py_NewRef(v));
    Py_XSETREF(attach_cb, Py_NewRef(a));
    Py_XSETREF(warn_cb, Py_NewRef(w));
    strict_mode = strict;
    Py_RETURN_NONE;
}

/* _reset(): forget the default counter so the next hit() attaches anew
 * (after configure()). */
static PyObject *mod_reset(PyObject *self, PyObject *unused)
{
    Py_CLEAR(default_counter);
    next_attach_try = 0;
    Py_RETURN_NONE;
}

/* _ensure() -> the default Counter, attaching it if due, or None (fail
 * open; in strict mode the attach error is raised). */
static PyObject *mod_ensure(PyObject *self, PyObject *unused)
{
    Counter *c = get_default(now_seconds());
    if (c == NULL) {
        if (PyErr_Occurred())
            return NULL;
        Py_RETURN_NONE;
    }
    return Py_NewRef((PyObject *)c);
}

/* _lock(backend, semid, buffer, timeout_ms) -> None: takes the structural
 * lock of a segment that segment.py has mapped itself (install and
 * uninstall work on segments no Counter may attach to: half made, retired).
 * The same protocol as the hot path's (seg_lock), with the GIL released
 * while waiting.  `buffer` is the writable mapping (its header); backend 0 =
 * SysV, 1 = POSIX.  Raises SegmentBusy on timeout, naming the holder. */
static PyObject *mod_lock(PyObject *self, PyObject *args)
{
    int backend, semid, timeout_ms;
    Py_buffer view;
    PyObject *r;
    seglock_t l;
    if (!PyArg_ParseTuple(args, "iiw*i", &backend, &semid, &view, &timeout_ms))
        return NULL;
    if (view.len < (Py_ssize_t)HEADER_SIZE) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "the mapping is smaller than the header");
        return NULL;
    }
    l.backend = backend;
    l.semid = semid;
    l.owner = U32(view.buf, H_LOCK_OWNER_PID);
    r = lock_result(&l, timeout_ms, NULL);
    PyBuffer_Release(&view);
    return r;
}

/* _unlock(backend, semid, buffer) -> None: gives back what _lock took. */
static PyObject *mod_unlock(PyObject *self, PyObject *args)
{
    int backend, semid;
    Py_buffer view;
    seglock_t l;
    if (!PyArg_ParseTuple(args, "iiw*", &backend, &semid, &view))
        return NULL;
    if (view.len >= (Py_ssize_t)HEADER_SIZE) {
        l.backend = backend;
        l.semid = semid;
        l.owner = U32(view.buf, H_LOCK_OWNER_PID);
        seg_unlock(&l);
    }
    PyBuffer_Release(&view);
    Py_RETURN_NONE;
}

/* _sysv_holder(semid) -> pid: the pid of the last semop on the set, which
 * while the semaphore is 0 is its holder (GETPID). */
static PyObject *mod_sysv_holder(PyObject *self, PyObject *args)
{
    int semid, pid;
    if (!PyArg_ParseTuple(args, "i", &semid))
        return NULL;
    if (-1 == (pid = semctl(semid, 0, GETPID)))
        return PyErr_SetFromErrno(SegmentError);
    return PyLong_FromLong(pid);
}

/* _crash_at(n): the test hook (see CRASH_POINT); 0 turns it off. */
static PyObject *mod_crash_at(PyObject *self, PyObject *args)
{
    if (!PyArg_ParseTuple(args, "i", &crash_at))
        return NULL;
    Py_RETURN_NONE;
}

/* _default() -> the attached default Counter or None. */
static PyObject *mod_default(PyObject *self, PyObject *unused)
{
    if (default_counter == NULL)
        Py_RETURN_NONE;
    return Py_NewRef((PyObject *)default_counter);
}

static PyMethodDef module_methods[] = {
    {"hit", (PyCFunction)(void (*)(void))mod_hit, METH_FASTCALL | METH_KEYWORDS,
     "hit(account=None, event='pageview', n=1, now=None, *, status=None): count a page view, "
     "or with status, a funnel status of the event (order/paid)."},
    {"throttle_status", (PyCFunction)(void (*)(void))mod_throttle_status, METH_FASTCALL,
     "throttle_status(now=None) -> int 0..5."},
    {"_setup", mod_setup, METH_VARARGS, NULL},
    {"_reset", mod_reset, METH_NOARGS, NULL},
    {"_default", mod_default, METH_NOARGS, NULL},
    {"_ensure", mod_ensure, METH_NOARGS, NULL},
    {"_lock", mod_lock, METH_VARARGS, NULL},
    {"_unlock", mod_unlock, METH_VARARGS, NULL},
    {"_sysv_holder", mod_sysv_holder, METH_VARARGS, NULL},
    {"_crash_at", mod_crash_at, METH_VARARGS, NULL},
    {NULL}
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "trafficthreshold._counter",
    "The hot path of trafficthreshold (see the comment at the top of _counter.c).",
    -1, module_methods,
};

static int set_int(PyObject *d, const char *name, long value)
{
    PyObject *v = PyLong_FromLong(value);
    int rc = v == NULL ? -1 : PyDict_SetItemString(d, name, v);
    Py_XDECREF(v);
    return rc;
}

static int add_layout(PyObject *m)
{
    PyObject *d = PyDict_New();
    int rc = 0;
    if (d == NULL)
        return -1;
#define L(name, value) rc |= set_int(d, name, value)
    L("LAYOUT_VERSION", LAYOUT_VERSION); L("HEADER_SIZE", HEADER_SIZE);
    L("INDEX_ENTRY_SIZE", INDEX_ENTRY_SIZE); L("BUCKET_SIZE", BUCKET_SIZE);
    L("ACCOUNT_MAX", ACCOUNT_MAX); L("EVENT_MAX", EVENT_MAX);
    L("OVERFLOW_SLOT", OVERFLOW_SLOT); L("EVENT_RESERVE", EVENT_RESERVE);
    L("H_VERSION", H_VERSION); L("H_HEADER_SIZE", H_HEADER_SIZE);
    L("H_KEY_CAPACITY", H_KEY_CAPACITY); L("H_INDEX_SIZE", H_INDEX_SIZE);
    L("H_MINUTE_BUCKETS", H_MINUTE_BUCKETS); L("H_SECOND_BUCKETS", H_SECOND_BUCKETS);
    L("H_STRIPES", H_STRIPES); L("H_STRIPE_SIZE", H_STRIPE_SIZE); L("H_SLOT_SIZE", H_SLOT_SIZE);
    L("H_INDEX_OFFSET", H_INDEX_OFFSET); L("H_SLOTS_OFFSET", H_SLOTS_OFFSET);
    L("H_TOTAL_SIZE", H_TOTAL_SIZE); L("H_CREATED_AT", H_CREATED_AT);
    L("H_THROTTLE_MULTIPLIER", H_THROTTLE_MULTIPLIER); L("H_THROTTLE_WINDOW", H_THROTTLE_WINDOW);
    L("H_THROTTLE_LEVEL", H_THROTTLE_LEVEL); L("H_STATE", H_STATE);
    L("H_HEARTBEAT_MS", H_HEARTBEAT_MS); L("H_SUPERVISOR_PID", H_SUPERVISOR_PID);
    L("H_THROTTLE_SLOT", H_THROTTLE_SLOT); L("H_LOCK_OWNER_PID", H_LOCK_OWNER_PID);
    L("H_KEYS_USED", H_KEYS_USED); L("H_NEXT_STRIPE", H_NEXT_STRIPE);
    L("H_OVERFLOW_HITS", H_OVERFLOW_HITS); L("H_DROPPED_HITS", H_DROPPED_HITS);
    L("H_ATTACHES", H_ATTACHES);
    L("H_THROTTLE_SINCE_MS", H_THROTTLE_SINCE_MS); L("H_INSTANCE", H_INSTANCE);
    L("H_FREE_HEAD", H_FREE_HEAD); L("H_FREE_SLOTS", H_FREE_SLOTS);
    L("H_RECLAIMED", H_RECLAIMED); L("H_RECLAIM_SLOT", H_RECLAIM_SLOT);
    L("H_RECLAIM_ENTRY", H_RECLAIM_ENTRY); L("E_GENERATION", E_GENERATION);
    L("H_INSERT_SLOT", H_INSERT_SLOT); L("H_INSERT_ENTRY", H_INSERT_ENTRY);
    L("H_PROBE_LIMIT", H_PROBE_LIMIT); L("H_INDEX_SEQ", H_INDEX_SEQ);
    L("H_LOCK_TIMEOUTS", H_LOCK_TIMEOUTS);
    L("T_GENERATION", T_GENERATION); L("T_NEXT_FREE", T_NEXT_FREE);
    L("SLOT_ENTRY_SIZE", SLOT_ENTRY_SIZE); L("EPOCH_BITS", EPOCH_BITS);
    L("ENTRY_EMPTY", ENTRY_EMPTY); L("ENTRY_READY", ENTRY_READY);
    L("ENTRY_REMOVED", ENTRY_REMOVED);
    L("E_STATE", E_STATE); L("E_SLOT", E_SLOT); L("E_HASH", E_HASH);
    L("E_ACCOUNT_LEN", E_ACCOUNT_LEN); L("E_EVENT_LEN", E_EVENT_LEN);
    L("E_ACCOUNT", E_ACCOUNT); L("E_EVENT", E_EVENT);
    L("H_MAGIC", H_MAGIC);
    L("STATE_INSTALLING", STATE_INSTALLING); L("STATE_LIVE", STATE_LIVE);
    L("STATE_RETIRED", STATE_RETIRED);
    L("HOT_LOCK_TIMEOUT_MS", HOT_LOCK_TIMEOUT_MS); L("HEARTBEAT_STALE_MS", HEARTBEAT_STALE_MS);
    L("ATTACH_RETRY_S", ATTACH_RETRY_S); L("MAX_CLOCK_SKEW_S", MAX_CLOCK_SKEW_S);
#undef L
    if (rc != 0 || PyModule_AddObject(m, "LAYOUT", d) < 0) {
        Py_DECREF(d);
        return -1;
    }
    if (PyModule_AddObject(m, "MAX_HIT_N", PyLong_FromUnsignedLongLong(MAX_HIT_N)) < 0)
        return -1;
    return PyModule_AddStringConstant(m, "MAGIC", MAGIC_BYTES);
}

PyMODINIT_FUNC PyInit__counter(void)
{
    PyObject *m, *errors;
    if (PyType_Ready(&CounterType) < 0)
        return NULL;
    if ((errors = PyImport_ImportModule("trafficthreshold.errors")) == NULL)
        return NULL;
    SegmentNotFound = PyObject_GetAttrString(errors, "SegmentNotFound");
    LayoutMismatch = PyObject_GetAttrString(errors, "LayoutMismatch");
    SegmentBusy = PyObject_GetAttrString(errors, "SegmentBusy");
    SegmentError = PyObject_GetAttrString(errors, "SegmentError");
    Py_DECREF(errors);
    if (!SegmentNotFound || !LayoutMismatch || !SegmentBusy || !SegmentError)
        return NULL;
    if ((str_status_sep = PyUnicode_InternFromString(STATUS_SEP)) == NULL)
        return NULL;
    if ((str_pageview = PyUnicode_InternFromString("pageview")) == NULL)
        return NULL;
    if ((m = PyModule_Create(&moduledef)) == NULL)
        return NULL;
    Py_INCREF(&CounterType);
    if (PyModule_AddObject(m, "Counter", (PyObject *)&CounterType) < 0 || add_layout(m) < 0
        || PyModule_AddStringConstant(m, "STATUS_SEP", STATUS_SEP) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    pthread_atfork(NULL, NULL, after_fork_child);
    return m;
}

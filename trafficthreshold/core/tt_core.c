/*
 * tt_core.c -- the C core of trafficthreshold (see tt_core.h): attaching to
 * the segment, the structural lock and its recovery, finding and inserting
 * keys, rolling buckets over, reclaim, the reads behind count() and
 * throttle_status(), the names' rules, and a writer with its own key cache
 * for the bindings that have none of their own (PHP, libtrafficthreshold).
 * No Python, no PHP.
 *
 * docs/segment.rst is this file in words (the layout, "How a writer counts
 * a hit", "The lock and the two backends", "Reclaim"); the comment at the
 * top of _counter.c gives the whole design.
 *
 * Included, not linked: a binding #includes this file (tt_core.h says why).
 * Every function is static, so two bindings loaded in one process never
 * share or clash on a symbol (libtrafficthreshold exports its own API,
 * tt_lib.c).
 *
 * Errors: functions that can fail return -1 (or a negative ref) with
 * c->err, c->os_errno and c->error (a sentence naming the fix) set; the
 * binding turns them into its exceptions or warnings.
 *
 * Inserts (tt_insert_key): under the lock, the limit is checked again, the
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
 * segment.py takes the same lock for install and uninstall through
 * _counter._lock()
 * and _unlock() (or Counter.lock()).
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
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

#include "tt_core.h"

/* Around a wait for the lock inside a hit (a roll-over, an insert): the
 * Python binding lets go of the GIL there; others do nothing. */
#ifndef TT_BLOCK_BEGIN
#define TT_BLOCK_BEGIN(seg) do {
#define TT_BLOCK_END(seg) } while (0)
#endif

#define TT_UNUSED __attribute__((unused))

static volatile unsigned long tt_fork_generation = 0;

static void tt_after_fork_child(void) { tt_fork_generation++; }

static void tt_register_fork_hook(void) { pthread_atfork(NULL, NULL, tt_after_fork_child); }

/* Registers the fork hook, once per process (per binding); a binding calls
 * it when it loads. */
static TT_UNUSED void tt_core_init(void)
{
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, tt_register_fork_hook);
}

/* A test hook (tests/test_segment.py): the process kills itself (SIGKILL,
 * holding the lock) at the store numbered tt_crash_at of an insert (1..) or
 * a reclaim (101..), so that the tests prove every store can be redone by
 * the next lock holder.  0 = off.  Costs one compare per store, on the
 * locked paths only. */
static int tt_crash_at = 0;
#define CRASH_POINT(n) do { if (__builtin_expect(tt_crash_at == (n), 0)) raise(SIGKILL); } while (0)

/* Records an error: its kind, errno for TT_ERR_OS, and the sentence.
 * Returns -1. */
static int __attribute__((format(printf, 3, 4))) tt_fail(tt_seg *c, int kind, const char *fmt, ...)
{
    va_list ap;
    c->err = kind;
    c->os_errno = kind == TT_ERR_OS ? errno : 0;
    va_start(ap, fmt);
    vsnprintf(c->error, sizeof c->error, fmt, ap);
    va_end(ap);
    return -1;
}

/* ------------------------------------------------------------------ time */

/* Wall-clock seconds, from the coarse clock: time(), which is the second of
 * CLOCK_REALTIME_COARSE (Linux: the vDSO's time() reads the timekeeper's
 * second that the coarse clock reads too; glibc elsewhere calls
 * clock_gettime(CLOCK_REALTIME_COARSE)).  Why time() and not
 * clock_gettime(CLOCK_REALTIME_COARSE): on x86-64 glibc binds time() to the
 * vDSO's directly (one load), where clock_gettime goes through libc's
 * wrapper and the vDSO's seqlock loop: 3.5 ns of a 22 ns PHP hit on the
 * benchmark machine (benchmarks/bench_php.py).  Why the coarse second is
 * exact enough: it lags the precise clock by at most one timer tick
 * (1..10 ms, see clock_getres), so a hit in the first tick of a second may
 * be counted in the second before; no count is lost, and workers' clocks
 * disagree by as much anyway. */
static inline uint64_t tt_now_second(void)
{
    return (uint64_t)time(NULL);
}

static TT_UNUSED double tt_now_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME_COARSE, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int64_t tt_mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* ------------------------------------------------------------------ lock */

static long tt_futex(uint32_t *word, int op, uint32_t val, const struct timespec *ts)
{
    /* Not FUTEX_PRIVATE: the word is in memory shared between processes. */
    return syscall(SYS_futex, word, op, val, ts, NULL, 0);
}

/* Whether pid `p` is gone: kill(p, 0) fails with ESRCH.  EPERM means it
 * exists (another user's process). */
static int tt_pid_dead(uint32_t p)
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
 * ETIMEDOUT.  Call without any binding's lock (the GIL). */
static int tt_word_lock(uint32_t *word, int timeout_ms)
{
    uint32_t me = (uint32_t)getpid(), cur;
    int64_t deadline = tt_mono_ms() + timeout_ms, left;
    struct timespec ts;
    for (;;) {
        cur = 0;
        if (__atomic_compare_exchange_n(word, &cur, me, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
            return 0;
        if (cur != 0 && tt_pid_dead(cur)) {
            /* The holder died with the lock: take it over.  What it left
             * half done is safe to redo (tt_recover). */
            if (__atomic_compare_exchange_n(word, &cur, me, 0, __ATOMIC_ACQ_REL,
                                            __ATOMIC_ACQUIRE))
                return 0;
            continue;
        }
        left = deadline - tt_mono_ms();
        if (left <= 0) {
            errno = ETIMEDOUT;
            return -1;
        }
        if (left > 10)
            left = 10;
        ts.tv_sec = 0;
        ts.tv_nsec = (long)left * 1000000L;
        /* Returns at once (EAGAIN) if the word is no longer `cur`. */
        tt_futex(word, FUTEX_WAIT, cur, &ts);
    }
}

/* POSIX: gives the lock word back (release order: everything written under
 * the lock is visible before the 0) and wakes one waiter.  Caller holds it. */
static void tt_word_unlock(uint32_t *word)
{
    __atomic_store_n(word, 0u, __ATOMIC_RELEASE);
    tt_futex(word, FUTEX_WAKE, 1, NULL);
}

/* Takes the structural lock, waiting at most timeout_ms.  Returns 0 when
 * held, -1 with errno EAGAIN/ETIMEDOUT on timeout or another errno on
 * failure.  Call without any binding's lock (the GIL).
 * SysV: semtimedop with SEM_UNDO, so a holder killed even by SIGKILL gives
 * the semaphore back, and the kernel records the taker's pid in the same
 * operation (semctl GETPID): the lock is never held without a recorded
 * owner.  lock_owner_pid is then stored for people (status); nothing
 * depends on it.  POSIX: tt_word_lock(). */
static int tt_lock(const tt_lock_t *l, int timeout_ms)
{
    struct timespec ts;
    struct sembuf op = {0, -1, SEM_UNDO};
    int64_t deadline = tt_mono_ms() + timeout_ms, left;
    int rc;
    if (l->backend != TT_BACKEND_SYSV)
        return tt_word_lock(l->owner, timeout_ms);
    if (l->semid < 0) {
        errno = EIDRM;
        return -1;
    }
    /* An absolute deadline: a signal (an itimer, a profiler, SIGCHLD)
     * interrupts semtimedop with EINTR, and retrying with the whole timeout
     * again would wait for as long as the lock is held -- for ever behind a
     * stopped holder.  The retry waits what is left, at least a try. */
    for (;;) {
        left = deadline - tt_mono_ms();
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

/* Gives the structural lock back.  Caller holds it. */
static void tt_unlock(const tt_lock_t *l)
{
    struct sembuf op = {0, 1, SEM_UNDO};
    if (l->backend != TT_BACKEND_SYSV) {
        tt_word_unlock(l->owner);
        return;
    }
    __atomic_store_n(l->owner, 0u, __ATOMIC_RELEASE);
    semop(l->semid, &op, 1);
}

static inline tt_lock_t tt_lock_of(tt_seg *c)
{
    tt_lock_t l = {c->backend, c->semid, TT_U32(c->base, TT_H_LOCK_OWNER_PID)};
    return l;
}

/* ---------------------------------------------------------------- layout */

static inline tt_bucket *tt_minute_bucket(tt_seg *c, uint32_t slot, uint32_t stripe,
                                          uint64_t minute)
{
    return tt_stripe_buckets(c, slot, stripe) + (minute % c->minutes);
}

static inline tt_bucket *tt_second_bucket(tt_seg *c, uint32_t slot, uint32_t stripe,
                                          uint64_t second)
{
    return tt_stripe_buckets(c, slot, stripe) + c->minutes + (second % c->seconds);
}

static inline char *tt_index_entry(tt_seg *c, uint32_t i)
{
    return c->base + c->index_offset + (uint64_t)i * TT_INDEX_ENTRY_SIZE;
}

static inline uint32_t *tt_slot_word(tt_seg *c, uint32_t slot, size_t off)
{
    return TT_U32(c->slot_table + (uint64_t)slot * TT_SLOT_ENTRY_SIZE, off);
}

/* The slot's current generation (acquire); 0 in a layout-1 segment. */
static inline uint32_t tt_slot_gen(tt_seg *c, uint32_t slot)
{
    if (c->slot_table == NULL)
        return 0;
    return __atomic_load_n(tt_slot_word(c, slot, TT_T_GENERATION), __ATOMIC_ACQUIRE)
        & TT_GEN_MASK;
}

static uint32_t tt_fnv1a(const char *account, size_t alen, const char *event, size_t elen)
{
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < alen; i++) h = (h ^ (uint8_t)account[i]) * 16777619u;
    h = (h ^ 0u) * 16777619u;
    for (size_t i = 0; i < elen; i++) h = (h ^ (uint8_t)event[i]) * 16777619u;
    return h;
}

static inline uint32_t tt_header_u32(tt_seg *c, size_t off)
{
    return __atomic_load_n(TT_U32(c->base, off), __ATOMIC_ACQUIRE);
}

/* ---------------------------------------------------------------- attach */

static int tt_validate_header(tt_seg *c, int retired_ok)
{
    char *h = c->base;
    uint32_t version;
    /* A zero magic is a segment created but not yet formatted: an install
     * is running, or its installer died (`install` finishes it).  Not a
     * foreign segment, so do not advise removing it. */
    if (c->size >= TT_HEADER_SIZE && memcmp(h, "\0\0\0\0\0\0\0\0", 8) == 0)
        return tt_fail(c, TT_ERR_NOTFOUND, "the segment at IPC key 0x%x is not fully "
                       "installed; run `trafficthreshold install`", (unsigned int)c->key);
    if (c->size < TT_HEADER_SIZE || memcmp(h, TT_MAGIC_BYTES, 8) != 0)
        return tt_fail(c, TT_ERR_LAYOUT, "IPC key 0x%x holds a segment that is not "
                       "trafficthreshold's (bad magic); remove it with `ipcrm -M 0x%x` or "
                       "choose another --key", (unsigned int)c->key, (unsigned int)c->key);
    version = *TT_U32(h, TT_H_VERSION);
    /* Older layouts are read by the uninstaller's final roll-up only
     * (retired_ok), so an upgrade rolls an old segment's counts up: layout
     * 1 (before reclaim) and layout 2 (the bytes of layout 3, but written
     * under the writers' protocol before issue 20: no insert record, no
     * probe limit; writers of two protocols must never share a segment). */
    if (!(version == TT_LAYOUT_VERSION
          || (retired_ok && (version == TT_LAYOUT_VERSION_1 || version == TT_LAYOUT_VERSION_2)))
        || *TT_U32(h, TT_H_HEADER_SIZE) != TT_HEADER_SIZE) {
        if ((version == TT_LAYOUT_VERSION_1 || version == TT_LAYOUT_VERSION_2)
            && *TT_U32(h, TT_H_HEADER_SIZE) == TT_HEADER_SIZE)
            return tt_fail(c, TT_ERR_LAYOUT,
                           "the segment at IPC key 0x%x has layout version %u (an older "
                           "trafficthreshold), this trafficthreshold reads version %u; run "
                           "`trafficthreshold uninstall` (it rolls the old segment's counts "
                           "up) then `trafficthreshold install` with this version, and "
                           "restart the workers",
                           (unsigned int)c->key, version, TT_LAYOUT_VERSION);
        return tt_fail(c, TT_ERR_LAYOUT,
                       "the segment at IPC key 0x%x has layout version %u, this "
                       "trafficthreshold reads version %u; run `trafficthreshold uninstall "
                       "--force` then `trafficthreshold install` with this version",
                       (unsigned int)c->key, version, TT_LAYOUT_VERSION);
    }
    c->version = version;
    c->key_capacity = *TT_U32(h, TT_H_KEY_CAPACITY);
    c->index_size = *TT_U32(h, TT_H_INDEX_SIZE);
    c->minutes = *TT_U32(h, TT_H_MINUTE_BUCKETS);
    c->seconds = *TT_U32(h, TT_H_SECOND_BUCKETS);
    c->stripes = *TT_U32(h, TT_H_STRIPES);
    c->stripe_size = *TT_U32(h, TT_H_STRIPE_SIZE);
    c->slot_size = *TT_U32(h, TT_H_SLOT_SIZE);
    c->index_offset = *TT_U64(h, TT_H_INDEX_OFFSET);
    c->slots_offset = *TT_U64(h, TT_H_SLOTS_OFFSET);
    /* Why these bounds: every offset the hot path computes must stay inside
     * the mapping even if the header was corrupted.  Sums and products are
     * taken in 64 bits of 32-bit fields, and both offsets are first bounded
     * by the size, so no test below can wrap around. */
    if (c->minutes < 2 || c->seconds < 64 || c->stripes < 1 || c->stripes > 64
        || c->key_capacity < TT_EVENT_RESERVE + 2 || c->index_size < c->key_capacity
        || (c->index_size & (c->index_size - 1)) != 0
        || c->stripe_size < ((uint64_t)c->minutes + c->seconds) * TT_BUCKET_SIZE
        || c->slot_size != (uint64_t)c->stripe_size * c->stripes
        || c->index_offset < TT_HEADER_SIZE || c->index_offset > c->size
        || c->slots_offset > c->size
        || c->index_offset + (uint64_t)c->index_size * TT_INDEX_ENTRY_SIZE
           + (version == TT_LAYOUT_VERSION_1 ? 0
              : (uint64_t)c->key_capacity * TT_SLOT_ENTRY_SIZE) > c->slots_offset
        || c->slots_offset + (uint64_t)c->key_capacity * c->slot_size > c->size)
        return tt_fail(c, TT_ERR_LAYOUT,
                       "the segment at IPC key 0x%x has a corrupt header (its counts cannot "
                       "be read); run `trafficthreshold uninstall --force --no-rollup` and "
                       "install again", (unsigned int)c->key);
    c->slot_table = version == TT_LAYOUT_VERSION_1 ? NULL
        : c->base + c->index_offset + (uint64_t)c->index_size * TT_INDEX_ENTRY_SIZE;
    if (tt_header_u32(c, TT_H_STATE) != TT_STATE_LIVE
        && !(retired_ok && tt_header_u32(c, TT_H_STATE) == TT_STATE_RETIRED))
        return tt_fail(c, TT_ERR_NOTFOUND,
                       "the segment at IPC key 0x%x is %s; run `trafficthreshold install`",
                       (unsigned int)c->key, tt_header_u32(c, TT_H_STATE) == TT_STATE_RETIRED
                       ? "being uninstalled" : "not fully installed");
    return 0;
}

static void tt_choose_stripe(tt_seg *c)
{
    uint32_t n = __atomic_fetch_add(TT_U32(c->base, TT_H_NEXT_STRIPE), 1u, __ATOMIC_RELAXED);
    c->stripe = n % c->stripes;
    c->fork_gen = tt_fork_generation;
}

static int tt_attach_sysv(tt_seg *c)
{
    struct shmid_ds ds;
    void *base;
    int shmid = shmget((key_t)c->key, 0, 0);
    if (-1 == shmid) {
        if (errno == ENOENT)
            return tt_fail(c, TT_ERR_NOTFOUND, "no trafficthreshold segment at SysV IPC key "
                           "0x%x; run `trafficthreshold install`", (unsigned int)c->key);
        if (errno == EACCES)
            return tt_fail(c, TT_ERR_OS, "permission denied on the segment at IPC key 0x%x; "
                           "add this user to the segment's group (see `trafficthreshold "
                           "status`)", (unsigned int)c->key);
        return tt_fail(c, TT_ERR_OS, "shmget(0x%x) failed: %s", (unsigned int)c->key,
                       strerror(errno));
    }
    if (-1 == shmctl(shmid, IPC_STAT, &ds)) {
        /* shmget() without flags asks for no rights; IPC_STAT needs read. */
        if (errno == EACCES)
            return tt_fail(c, TT_ERR_OS, "permission denied on the segment at IPC key 0x%x; "
                           "add this user to the segment's group (see `trafficthreshold "
                           "status`)", (unsigned int)c->key);
        return tt_fail(c, TT_ERR_OS, "shmctl(IPC_STAT) of the segment at IPC key 0x%x "
                       "failed: %s", (unsigned int)c->key, strerror(errno));
    }
    c->size = ds.shm_segsz;
    base = shmat(shmid, NULL, 0);
    if (base == (void *)-1) {
        if (errno == EACCES)
            return tt_fail(c, TT_ERR_OS, "permission denied attaching the segment at IPC key "
                           "0x%x; add this user to the segment's group", (unsigned int)c->key);
        return tt_fail(c, TT_ERR_OS, "shmat() of the segment at IPC key 0x%x failed: %s",
                       (unsigned int)c->key, strerror(errno));
    }
    c->base = base;
    return 0;
}

/* Whether a segment exists at (backend, key) now: one system call, no
 * mapping.  For a writer whose segment was retired (uninstalled): it asks at
 * each hit until the next install is there, and attaches then, so no hit
 * after the new install is lost (instead of waiting TT_ATTACH_RETRY_S). */
static TT_UNUSED int tt_segment_exists(int backend, long key)
{
    char name[64];
    int fd;
    if (backend == TT_BACKEND_SYSV)
        return shmget((key_t)key, 0, 0) != -1;
    snprintf(name, sizeof name, "/trafficthreshold-%lx", key);
    fd = shm_open(name, O_RDONLY, 0);
    if (fd == -1)
        return errno != ENOENT;
    close(fd);
    return 1;
}

/* ------------------------------------------------------------- attacher */

/* The attach policy of a worker's writer, one for every binding (the Python
 * default counter, the PHP extension, libtrafficthreshold): attach at the
 * first use; without a segment, try again at most every TT_ATTACH_RETRY_S
 * seconds; once a live segment is retired (uninstalled) under the writer,
 * watch for the next install at every use (tt_segment_exists, in either
 * backend: a re-install may pick the other one) and attach to it at once,
 * so no hit after it is lost; a segment found half made (being installed,
 * or its installer killed) is tried again after a second, not at every
 * use.  Every time is the process's clock (tt_now_second), never a hit's
 * `now`: a hit replayed with a stray time must not move the retries.
 * Plain data, used under the binding's lock (Python: the GIL; PHP ZTS: its
 * mutex; the library: one handle per thread). */
typedef struct {
    int64_t next_try;     /* no attach is tried before this second (0: now) */
    int watch_backend;    /* -1: not watching; else the retired one's backend */
    long watch_key;       /* and its key */
    int64_t watch_after;  /* the watch tries no attach before this second */
} tt_attacher;

/* A fresh attacher (what tt_attacher_reset makes), for a static one. */
#define TT_ATTACHER_INIT {0, -1, 0, 0}

static TT_UNUSED void tt_attacher_reset(tt_attacher *a)
{
    a->next_try = 0;
    a->watch_backend = -1;
    a->watch_key = 0;
    a->watch_after = 0;
}

/* Whether a segment is at the watched key, in either backend. */
static int tt_attacher_watch_found(const tt_attacher *a)
{
    return tt_segment_exists(a->watch_backend, a->watch_key)
        || tt_segment_exists(a->watch_backend == TT_BACKEND_SYSV ? TT_BACKEND_POSIX
                             : TT_BACKEND_SYSV, a->watch_key);
}

/* The binding lets go of a live segment that was retired (backend, key):
 * watch for the next install from now on. */
static TT_UNUSED void tt_attacher_retired(tt_attacher *a, int backend, long key)
{
    a->watch_backend = backend;
    a->watch_key = key;
    a->watch_after = 0;
    a->next_try = 0;
}

/* Whether an attach is to be tried now (`force`: always, e.g. strict mode
 * or phpinfo()); when it is, the try is recorded (the next one not before
 * TT_ATTACH_RETRY_S).  t: tt_now_second(). */
static TT_UNUSED int tt_attacher_due(tt_attacher *a, int64_t t, int force)
{
    /* The wall clock stepped back since a try (an NTP step at boot, a
     * restored VM): its times are in the future, and waiting for the clock
     * to catch up with them would lose every hit until then (an hour for
     * an hour's step).  They are forgotten: the try is due now. */
    if (t < a->next_try - TT_ATTACH_RETRY_S || t + 1 < a->watch_after)
        a->next_try = a->watch_after = 0;
    if (!force && t < a->next_try
        && (a->watch_backend < 0 || t < a->watch_after || !tt_attacher_watch_found(a)))
        return 0;
    a->next_try = t + TT_ATTACH_RETRY_S;
    return 1;
}

/* The outcome of the try tt_attacher_due allowed at t: err TT_OK
 * (attached: the watch ends), TT_ERR_NOTFOUND (nothing, or a half made
 * segment: while one is there, the watch waits a second), or another error
 * (another layout, no permission ...: not a matter of waiting for the
 * install, back to every TT_ATTACH_RETRY_S). */
static TT_UNUSED void tt_attacher_tried(tt_attacher *a, int64_t t, int err)
{
    if (err == TT_OK || a->watch_backend < 0) {
        if (err == TT_OK)
            a->watch_backend = -1;
        return;
    }
    if (err != TT_ERR_NOTFOUND)
        a->watch_backend = -1;
    else
        a->watch_after = tt_attacher_watch_found(a) ? t + 1 : 0;
}

static int tt_attach_posix(tt_seg *c)
{
    char name[64];
    struct stat st;
    void *base;
    int fd;
    snprintf(name, sizeof name, "/trafficthreshold-%lx", c->key);
    fd = shm_open(name, O_RDWR, 0);
    if (-1 == fd) {
        if (errno == ENOENT)
            return tt_fail(c, TT_ERR_NOTFOUND, "no trafficthreshold segment at POSIX name %s; "
                           "run `trafficthreshold install --backend posix`", name);
        if (errno == EACCES)
            return tt_fail(c, TT_ERR_OS, "permission denied on the segment /dev/shm%s; add "
                           "this user to the segment's group (see `trafficthreshold status`)",
                           name);
        return tt_fail(c, TT_ERR_OS, "shm_open(%s) failed: %s", name, strerror(errno));
    }
    if (-1 == fstat(fd, &st)) {
        tt_fail(c, TT_ERR_OS, "fstat(/dev/shm%s) failed: %s", name, strerror(errno));
        close(fd);
        return -1;
    }
    /* Why: mmap() of a file shorter than the header either fails (size 0)
     * or maps less than tt_validate_header() reads. */
    if ((uint64_t)st.st_size < TT_HEADER_SIZE) {
        tt_fail(c, TT_ERR_LAYOUT, "/dev/shm%s is %lld bytes, too small to be a "
                "trafficthreshold segment; remove it or choose another --key", name,
                (long long)st.st_size);
        close(fd);
        return -1;
    }
    c->size = (size_t)st.st_size;
    base = mmap(NULL, c->size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (base == MAP_FAILED)
        return tt_fail(c, TT_ERR_OS, "mmap(/dev/shm%s) failed: %s", name, strerror(errno));
    c->base = base;
    return 0;
}

/* Opens the SysV semaphore of a mapped segment whose header was found valid
 * (so that a segment which is not ours is reported as such, not as one that
 * lacks a semaphore).  The POSIX backend has none: its lock is the header's
 * lock word; but a POSIX semaphore of the segment's name means the segment
 * was installed by a version that locked with it, and the two protocols
 * must not be mixed.  `reader_only` (a retired segment's final read) does
 * without the semaphore: it takes no lock.  Returns 0 or -1. */
static int tt_open_semaphore(tt_seg *c, int reader_only)
{
    char name[80];
    struct stat st;
    c->semid = -1;
    if (c->backend == TT_BACKEND_POSIX) {
        snprintf(name, sizeof name, "/dev/shm/sem.trafficthreshold-%lx", c->key);
        if (reader_only || -1 == stat(name, &st))
            return 0;
        return tt_fail(c, TT_ERR_LAYOUT,
                       "the segment /dev/shm/trafficthreshold-%x was installed by an older "
                       "trafficthreshold that locked it with the POSIX semaphore %s; run "
                       "`trafficthreshold uninstall --backend posix` and install again",
                       (unsigned int)c->key, name);
    }
    c->semid = semget((key_t)c->key, 1, 0);
    if (-1 != c->semid || reader_only)
        return 0;
    if (errno == EACCES)
        return tt_fail(c, TT_ERR_OS,
                       "permission denied on the semaphore of the segment at SysV IPC key "
                       "0x%x; add this user to the segment's group (see `trafficthreshold "
                       "status`)", (unsigned int)c->key);
    return tt_fail(c, TT_ERR_NOTFOUND,
                   "the segment at SysV IPC key 0x%x has no semaphore; run "
                   "`trafficthreshold uninstall --force` (it rolls the counts up and "
                   "removes the segment) and install again", (unsigned int)c->key);
}

/* Unmaps the segment (nothing if not attached).  The binding makes sure no
 * call of another thread is inside it (c->busy). */
static void tt_detach(tt_seg *c)
{
    if (c->base != NULL) {
        if (c->backend == TT_BACKEND_SYSV)
            shmdt(c->base);
        else
            munmap(c->base, c->size);
        c->base = NULL;
    }
    c->slot_table = NULL;
    c->clk.second = 0;
}

/* Attaches to the segment of `backend` at `key`: maps it, checks its header
 * (tt_validate_header) and opens its lock, counts the attach and takes a
 * stripe (with `fixed`: stripe % stripes, kept across forks).  retired_ok makes a
 * reader for the uninstaller's final roll-up (a retired or layout-1
 * segment, a vanished SysV semaphore).  Returns 0, or -1 with the error
 * recorded and nothing mapped. */
static int tt_attach(tt_seg *c, int backend, long key, int fixed, unsigned long stripe,
                     int retired_ok)
{
    tt_detach(c);
    c->backend = backend;
    c->key = key;
    c->semid = -1;
    c->err = TT_OK;
    c->error[0] = '\0';
    if ((backend == TT_BACKEND_SYSV ? tt_attach_sysv(c) : tt_attach_posix(c)) < 0)
        return -1;
    if (tt_validate_header(c, retired_ok) < 0 || tt_open_semaphore(c, retired_ok) < 0) {
        tt_detach(c);
        return -1;
    }
    __atomic_fetch_add(TT_U64(c->base, TT_H_ATTACHES), 1u, __ATOMIC_RELAXED);
    if (fixed) {
        c->stripe = (uint32_t)(stripe % c->stripes);
        c->fixed_stripe = 1;
    } else {
        c->fixed_stripe = 0;
        tt_choose_stripe(c);
    }
    c->level_sec = -1;
    return 0;
}

/* ------------------------------------------------------------------ keys */

/* The index_seq seqlock (header 208): odd while a reclaim is under way.
 * A reader that read the same even value before and after reading names
 * and counts read a consistent pair (see the readers in segment.py). */
static inline void tt_index_seq_begin(tt_seg *c)
{
    uint64_t *seq = TT_U64(c->base, TT_H_INDEX_SEQ);
    if ((__atomic_load_n(seq, __ATOMIC_ACQUIRE) & 1) == 0)
        __atomic_fetch_add(seq, 1, __ATOMIC_ACQ_REL);
}

static inline void tt_index_seq_end(tt_seg *c)
{
    uint64_t *seq = TT_U64(c->base, TT_H_INDEX_SEQ);
    if (__atomic_load_n(seq, __ATOMIC_ACQUIRE) & 1)
        __atomic_fetch_add(seq, 1, __ATOMIC_ACQ_REL);
}

/* Pushes `slot` on the free list: next_free = free_head, then free_head =
 * slot + 1 and free_slots + 1 in one 8-byte store.  Skipped when free_head
 * already is this slot, so a holder killed between the two stores leaves a
 * push the next holder redoes.  Caller holds the lock. */
static void tt_push_free(tt_seg *c, uint32_t slot)
{
    uint64_t free_word = __atomic_load_n(TT_U64(c->base, TT_H_FREE_HEAD), __ATOMIC_ACQUIRE);
    if ((uint32_t)free_word == slot + 1)
        return;
    __atomic_store_n(tt_slot_word(c, slot, TT_T_NEXT_FREE), (uint32_t)free_word,
                     __ATOMIC_RELEASE);
    CRASH_POINT(104);
    __atomic_store_n(TT_U64(c->base, TT_H_FREE_HEAD),
                     ((free_word >> 32) + 1) << 32 | (uint64_t)(slot + 1), __ATOMIC_RELEASE);
    CRASH_POINT(105);
}

/* Takes `slot` for a new key: pops it when it heads the free list
 * (free_head = its next_free and free_slots - 1, one 8-byte store), else
 * grows keys_used past it; then clears its next_free.  Every store can be
 * repeated: a slot no longer at the head, below keys_used, is already
 * taken, and the pop stores free_head before next_free is cleared, so a
 * holder killed in between never cuts the list (the next one redoes it,
 * tt_finish_insert).  Caller holds the lock. */
static void tt_take_slot(tt_seg *c, uint32_t slot)
{
    uint64_t free_word = __atomic_load_n(TT_U64(c->base, TT_H_FREE_HEAD), __ATOMIC_ACQUIRE);
    uint32_t nfree = (uint32_t)(free_word >> 32), next;
    if ((uint32_t)free_word == slot + 1) {
        next = __atomic_load_n(tt_slot_word(c, slot, TT_T_NEXT_FREE), __ATOMIC_ACQUIRE);
        /* Why the bound: a corrupt next_free must not become the head. */
        if (next != 0 && (next - 1 >= c->key_capacity || next - 1 <= TT_THROTTLE_RESERVED_SLOT))
            next = 0;
        __atomic_store_n(TT_U64(c->base, TT_H_FREE_HEAD),
                         (uint64_t)(nfree > 0 ? nfree - 1 : 0) << 32 | next, __ATOMIC_RELEASE);
        CRASH_POINT(4);
    } else if (__atomic_load_n(TT_U32(c->base, TT_H_KEYS_USED), __ATOMIC_ACQUIRE) <= slot) {
        __atomic_store_n(TT_U32(c->base, TT_H_KEYS_USED), slot + 1, __ATOMIC_RELEASE);
        CRASH_POINT(4);
    }
    __atomic_store_n(tt_slot_word(c, slot, TT_T_NEXT_FREE), 0u, __ATOMIC_RELEASE);
    CRASH_POINT(5);
}

/* Finishes an insert whose insert_slot is set (a holder killed half way
 * through tt_insert_key).  Its entry was written in full before the record,
 * so it is rolled forward: the slot is taken (tt_take_slot), the entry
 * published, the record cleared.  Caller holds the lock. */
static void tt_finish_insert(tt_seg *c)
{
    uint32_t is = __atomic_load_n(TT_U32(c->base, TT_H_INSERT_SLOT), __ATOMIC_ACQUIRE);
    uint32_t ie = __atomic_load_n(TT_U32(c->base, TT_H_INSERT_ENTRY), __ATOMIC_ACQUIRE);
    char *ent;
    if (is == 0)
        return;
    /* A corrupt record (out of range, a reserved slot, an entry that is not
     * this insert's) is dropped: acting on it could hand out a slot twice. */
    if (c->slot_table != NULL && is - 1 < c->key_capacity && is - 1 > TT_THROTTLE_RESERVED_SLOT
        && ie != 0 && ie - 1 < c->index_size) {
        ent = tt_index_entry(c, ie - 1);
        /* The entry is empty or a tombstone until published: its slot
         * field, written before the record, says it is this insert's. */
        if (*TT_U32(ent, TT_E_SLOT) == is - 1) {
            tt_take_slot(c, is - 1);
            __atomic_store_n(TT_U32(ent, TT_E_STATE), TT_ENTRY_READY, __ATOMIC_RELEASE);
        }
    }
    __atomic_store_n(TT_U32(c->base, TT_H_INSERT_SLOT), 0u, __ATOMIC_RELEASE);
    __atomic_store_n(TT_U32(c->base, TT_H_INSERT_ENTRY), 0u, __ATOMIC_RELEASE);
}

/* Finishes a reclaim whose reclaim_slot is set (tt_do_reclaim sets it, or a
 * reclaimer that died left it).  Caller holds the lock.  Every step can be
 * repeated, so a holder killed anywhere in here leaves a reclaim the next
 * holder finishes:
 *   1. the entry becomes a tombstone (if it still is this slot's key);
 *   2. the slot's generation becomes the entry's + 1: a process holding the
 *      old (slot, generation) no longer matches any tag of the slot;
 *   3. every bucket is zeroed (tag 0, a release fence, count 0: a reader
 *      between its two looks at the tag reads 0);
 *   4. the slot is pushed on the free list (tt_push_free);
 *   5. tombstones followed by an empty entry become empty (no key's probe
 *      sequence passes an empty entry, so none passes them);
 *   6. reclaim_slot and reclaim_entry are cleared, and index_seq made even.
 * `reclaimed` was incremented and index_seq made odd before reclaim_slot
 * was stored (tt_do_reclaim), so readers that cache slot -> name see it
 * move before a slot changes hands. */
static void tt_finish_reclaim(tt_seg *c)
{
    uint32_t rs = __atomic_load_n(TT_U32(c->base, TT_H_RECLAIM_SLOT), __ATOMIC_ACQUIRE);
    uint32_t re = __atomic_load_n(TT_U32(c->base, TT_H_RECLAIM_ENTRY), __ATOMIC_ACQUIRE);
    uint32_t slot, pos, gen, mask = c->index_size - 1;
    char *ent;
    if (c->slot_table == NULL)
        return;
    if (rs == 0)
        goto done;  /* index_seq may be odd: a reclaimer died before reclaim_slot */
    slot = rs - 1;
    /* A corrupt record (out of range, a reserved slot) is dropped: acting on
     * it would write outside the table or lose the reserved keys. */
    if (slot >= c->key_capacity || slot <= TT_THROTTLE_RESERVED_SLOT || re == 0
        || re - 1 >= c->index_size)
        goto done;
    pos = re - 1;
    ent = tt_index_entry(c, pos);
    if (__atomic_load_n(TT_U32(ent, TT_E_STATE), __ATOMIC_ACQUIRE) == TT_ENTRY_READY
        && *TT_U32(ent, TT_E_SLOT) == slot)
        __atomic_store_n(TT_U32(ent, TT_E_STATE), TT_ENTRY_REMOVED, __ATOMIC_RELEASE);
    CRASH_POINT(101);
    gen = (*TT_U32(ent, TT_E_GENERATION) + 1) & TT_GEN_MASK;
    __atomic_store_n(tt_slot_word(c, slot, TT_T_GENERATION), gen, __ATOMIC_RELEASE);
    CRASH_POINT(102);
    for (uint32_t p = 0; p < c->stripes; p++) {
        tt_bucket *b = tt_stripe_buckets(c, slot, p);
        for (uint32_t j = 0; j < c->minutes + c->seconds; j++) {
            __atomic_store_n(&b[j].tag, 0, __ATOMIC_RELAXED);
            __atomic_thread_fence(__ATOMIC_RELEASE);
            __atomic_store_n(&b[j].count, 0, __ATOMIC_RELAXED);
        }
    }
    CRASH_POINT(103);
    tt_push_free(c, slot);
    if (__atomic_load_n(TT_U32(tt_index_entry(c, (pos + 1) & mask), TT_E_STATE),
                        __ATOMIC_ACQUIRE) == TT_ENTRY_EMPTY) {
        for (uint32_t n = 0; n < c->index_size; n++, pos = (pos - 1) & mask) {
            ent = tt_index_entry(c, pos);
            if (__atomic_load_n(TT_U32(ent, TT_E_STATE), __ATOMIC_ACQUIRE) != TT_ENTRY_REMOVED)
                break;
            __atomic_store_n(TT_U32(ent, TT_E_STATE), TT_ENTRY_EMPTY, __ATOMIC_RELEASE);
        }
    }
    CRASH_POINT(106);
done:
    __atomic_store_n(TT_U32(c->base, TT_H_RECLAIM_SLOT), 0u, __ATOMIC_RELEASE);
    __atomic_store_n(TT_U32(c->base, TT_H_RECLAIM_ENTRY), 0u, __ATOMIC_RELEASE);
    if (rs != 0)
        CRASH_POINT(107);
    tt_index_seq_end(c);
}

/* What every lock holder does first: finish what a holder killed half way
 * left under way (a reclaim, an insert).  Caller holds the lock. */
static void tt_recover(tt_seg *c)
{
    tt_finish_reclaim(c);
    tt_finish_insert(c);
}

/* How many entries a probe reads at most (header probe_limit): one more
 * than the largest distance of a ready key from its first entry.  Why:
 * tombstones are reused only when a probe passes them, so with keys that
 * come and go the index runs out of empty entries, and a probe that stops
 * only at an empty entry reads the whole index.  0 (a segment whose limit
 * was never computed) or a value past the index: the whole index. */
static inline uint32_t tt_probe_window(tt_seg *c)
{
    uint32_t lim = tt_header_u32(c, TT_H_PROBE_LIMIT);
    return lim == 0 || lim > c->index_size ? c->index_size : lim;
}

/* Computes probe_limit again from the ready entries (after reclaims, which
 * only lower it).  Caller holds the lock. */
static void tt_reset_probe_limit(tt_seg *c)
{
    uint32_t mask = c->index_size - 1, far = 0, d;
    for (uint32_t i = 0; i < c->index_size; i++) {
        char *ent = tt_index_entry(c, i);
        if (__atomic_load_n(TT_U32(ent, TT_E_STATE), __ATOMIC_ACQUIRE) != TT_ENTRY_READY)
            continue;
        d = (i - *TT_U32(ent, TT_E_HASH)) & mask;
        if (d > far)
            far = d;
    }
    __atomic_store_n(TT_U32(c->base, TT_H_PROBE_LIMIT), far + 1, __ATOMIC_RELEASE);
}

/* Looks a key up in the index without locking.  Returns its ref (slot |
 * generation << 32), or -1 if absent.  Lock-free: an entry is visible only
 * once its state is stored with release order, after its name, slot and
 * generation.  A tombstone (state 2) is passed over; the probe ends at an
 * empty entry or after tt_probe_window() entries.  `free_pos`, if given,
 * gets the first tombstone on the way or else the empty entry that ended
 * the probe (UINT32_MAX: none); `reads`, if given, the entries read.  Why
 * the second look at state, slot and generation after a match: a tombstone
 * is rewritten for another key, and a match read across that rewrite could
 * pair one key's name with another's slot; (slot, generation) never
 * repeats, so an unchanged pair means an unchanged entry.  An entry whose
 * slot is out of range (a corrupted index) answers TT_OVERFLOW_SLOT:
 * writing through it would go past the mapping. */
static long tt_probe(tt_seg *c, const char *a, size_t alen, const char *e, size_t elen,
                     uint32_t hash, uint32_t *free_pos, uint32_t *reads)
{
    uint32_t mask = c->index_size - 1, tomb = UINT32_MAX, state, slot, gen;
    uint32_t window = tt_probe_window(c);
    for (int attempt = 0; attempt < 64; attempt++) {
        uint32_t n = 0, i = hash & mask;
        tomb = UINT32_MAX;
        for (; n < window; n++, i = (i + 1) & mask) {
            char *ent = tt_index_entry(c, i);
            if (reads) ++*reads;
            state = __atomic_load_n(TT_U32(ent, TT_E_STATE), __ATOMIC_ACQUIRE);
            if (state == TT_ENTRY_EMPTY) {
                if (free_pos) *free_pos = tomb != UINT32_MAX ? tomb : i;
                return -1;
            }
            if (state != TT_ENTRY_READY) {
                if (tomb == UINT32_MAX) tomb = i;
                continue;
            }
            slot = __atomic_load_n(TT_U32(ent, TT_E_SLOT), __ATOMIC_RELAXED);
            /* Acquire: the insert stores the generation (release) after the
             * name, lengths and hash, so an entry rewritten for another key
             * (a reused tombstone) whose generation we see shows its new
             * name too, never a mix that could match ours; the second look
             * below then sees the same generation and accepts it. */
            gen = __atomic_load_n(TT_U32(ent, TT_E_GENERATION), __ATOMIC_ACQUIRE);
            if (*TT_U32(ent, TT_E_HASH) == hash && *(uint8_t *)(ent + TT_E_ACCOUNT_LEN) == alen
                && *(uint8_t *)(ent + TT_E_EVENT_LEN) == elen
                && memcmp(ent + TT_E_ACCOUNT, a, alen) == 0
                && memcmp(ent + TT_E_EVENT, e, elen) == 0) {
                __atomic_thread_fence(__ATOMIC_ACQUIRE);
                if (__atomic_load_n(TT_U32(ent, TT_E_STATE), __ATOMIC_RELAXED) != TT_ENTRY_READY
                    || __atomic_load_n(TT_U32(ent, TT_E_SLOT), __ATOMIC_RELAXED) != slot
                    || __atomic_load_n(TT_U32(ent, TT_E_GENERATION), __ATOMIC_RELAXED) != gen)
                    break;  /* rewritten while we read it: probe again */
                if (slot >= c->key_capacity)
                    return (long)TT_OVERFLOW_SLOT;
                return TT_MAKE_REF(slot, c->slot_table == NULL ? 0 : gen & TT_GEN_MASK);
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

/* The insert's probe, under the lock (nothing moves: no retry): reads the
 * key's whole probe sequence, up to an empty entry (no key's sequence
 * passes one) or the whole index, not only tt_probe_window() entries: a
 * probe_limit too small (scribbled) hides a key past it from the lock-free
 * probe, and inserting the name again would split its hits between two
 * slots.  A key found past the window raises probe_limit to its distance
 * + 1 (the lock-free probes find it again) and is returned.  Else -1, and
 * `*pos` gets the entry a new key goes into: the first that is not ready
 * (a tombstone or the empty entry), UINT32_MAX when the index is full.
 * Caller holds the lock. */
static long tt_probe_locked(tt_seg *c, const char *a, size_t alen, const char *e, size_t elen,
                            uint32_t hash, uint32_t *pos)
{
    uint32_t mask = c->index_size - 1, i = hash & mask, state, slot;
    *pos = UINT32_MAX;
    for (uint32_t n = 0; n < c->index_size; n++, i = (i + 1) & mask) {
        char *ent = tt_index_entry(c, i);
        state = __atomic_load_n(TT_U32(ent, TT_E_STATE), __ATOMIC_ACQUIRE);
        if (state != TT_ENTRY_READY && *pos == UINT32_MAX)
            *pos = i;
        if (state == TT_ENTRY_EMPTY)
            return -1;
        if (state != TT_ENTRY_READY || *TT_U32(ent, TT_E_HASH) != hash
            || *(uint8_t *)(ent + TT_E_ACCOUNT_LEN) != alen
            || *(uint8_t *)(ent + TT_E_EVENT_LEN) != elen
            || memcmp(ent + TT_E_ACCOUNT, a, alen) != 0 || memcmp(ent + TT_E_EVENT, e, elen) != 0)
            continue;
        if (n + 1 > tt_probe_window(c))
            __atomic_store_n(TT_U32(c->base, TT_H_PROBE_LIMIT), n + 1, __ATOMIC_RELEASE);
        slot = *TT_U32(ent, TT_E_SLOT);
        if (slot >= c->key_capacity)
            return (long)TT_OVERFLOW_SLOT;
        return TT_MAKE_REF(slot, c->slot_table == NULL ? 0
                           : *TT_U32(ent, TT_E_GENERATION) & TT_GEN_MASK);
    }
    return -1;
}

/* Resets bucket `b` to count `tag` from 0 (tag 0, a release fence, count 0,
 * then the tag, release).  Caller holds the lock. */
static inline void tt_stamp_bucket(tt_bucket *b, uint64_t tag)
{
    __atomic_store_n(&b->tag, 0, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_RELEASE);
    __atomic_store_n(&b->count, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&b->tag, tag, __ATOMIC_RELEASE);
}

/* Inserts the key under the structural lock; returns its ref,
 * TT_OVERFLOW_SLOT when the table is full, or -1 with errno set when the
 * lock was not taken.  Touches no binding's object: the Python binding runs
 * it with the GIL released, so a thread that holds the GIL never makes the
 * lock wait (the lock is taken, the entry written and the lock given back
 * in one stretch of C).  A reclaimed slot (the free list) is taken before
 * keys_used grows; `limit` bounds the slots in use, keys_used -
 * free_slots, and is checked again here, under the lock: another process
 * may have taken the last slot since the caller's look.
 * The order of the stores (docs/segment.rst, "How a writer counts a hit"):
 * the entry's fields (state not yet ready), probe_limit if the key lies
 * past it, the record insert_entry then insert_slot, the slot taken
 * (tt_take_slot), the hit's two buckets stamped (its `second`, in
 * `stripe`), state = ready, the record cleared.  A holder killed anywhere
 * leaves either nothing visible or a record the next holder rolls forward
 * (tt_finish_insert): never a slot lost, owned twice, or a cut free list.
 * A lock not taken in 50 ms is counted in the header's lock_timeouts. */
static long tt_insert_key(tt_seg *c, const char *a, size_t alen, const char *e, size_t elen,
                          uint32_t hash, uint32_t limit, uint64_t second, uint32_t stripe)
{
    tt_lock_t l = tt_lock_of(c);
    uint32_t pos, used, slot, gen, head, nfree, window, d;
    uint64_t free_word;
    long ref;
    int from_free;
    if (tt_lock(&l, TT_HOT_LOCK_TIMEOUT_MS) < 0) {
        __atomic_fetch_add(TT_U64(c->base, TT_H_LOCK_TIMEOUTS), 1u, __ATOMIC_RELAXED);
        return -1;
    }
    tt_recover(c);
    /* Re-probe under the lock: another process may have added it, or a
     * probe_limit too small hid it from our lock-free probe. */
    ref = tt_probe_locked(c, a, alen, e, elen, hash, &pos);
    if (ref < 0) {
        used = __atomic_load_n(TT_U32(c->base, TT_H_KEYS_USED), __ATOMIC_ACQUIRE);
        free_word = c->slot_table == NULL ? 0
            : __atomic_load_n(TT_U64(c->base, TT_H_FREE_HEAD), __ATOMIC_ACQUIRE);
        head = (uint32_t)free_word;
        nfree = (uint32_t)(free_word >> 32);
        /* A corrupt free list (a head out of range) is ignored. */
        from_free = head != 0 && head - 1 < c->key_capacity
                    && head - 1 > TT_THROTTLE_RESERVED_SLOT;
        slot = from_free ? head - 1 : used;
        if (used - (from_free && nfree <= used ? nfree : 0) >= limit || pos == UINT32_MAX
            || slot >= c->key_capacity) {
            ref = TT_OVERFLOW_SLOT;
        } else {
            char *ent = tt_index_entry(c, pos);
            gen = tt_slot_gen(c, slot);
            /* alen <= TT_ACCOUNT_MAX and elen <= TT_EVENT_MAX (the
             * binding checked): the copies stay inside the entry.  A
             * tombstone being reused still holds its old name: zero the
             * fields first (the names are zero padded). */
            memset(ent + TT_E_ACCOUNT, 0, TT_ACCOUNT_MAX + TT_EVENT_MAX);
            memcpy(ent + TT_E_ACCOUNT, a, alen);
            memcpy(ent + TT_E_EVENT, e, elen);
            *(uint8_t *)(ent + TT_E_ACCOUNT_LEN) = (uint8_t)alen;
            *(uint8_t *)(ent + TT_E_EVENT_LEN) = (uint8_t)elen;
            *TT_U32(ent, TT_E_HASH) = hash;
            __atomic_store_n(TT_U32(ent, TT_E_SLOT), slot, __ATOMIC_RELAXED);
            __atomic_store_n(TT_U32(ent, TT_E_GENERATION), gen, __ATOMIC_RELEASE);
            CRASH_POINT(1);
            /* Past the window (none of its entries was free): the window
             * grows before the key is published, or lock-free probes would
             * stop short of it.  0 = no limit kept: left alone. */
            window = __atomic_load_n(TT_U32(c->base, TT_H_PROBE_LIMIT), __ATOMIC_ACQUIRE);
            d = (pos - hash) & (c->index_size - 1);
            if (window != 0 && d + 1 > window)
                __atomic_store_n(TT_U32(c->base, TT_H_PROBE_LIMIT), d + 1, __ATOMIC_RELEASE);
            CRASH_POINT(2);
            __atomic_store_n(TT_U32(c->base, TT_H_INSERT_ENTRY), pos + 1, __ATOMIC_RELEASE);
            __atomic_store_n(TT_U32(c->base, TT_H_INSERT_SLOT), slot + 1, __ATOMIC_RELEASE);
            CRASH_POINT(3);
            /* The slot leaves the free list (or keys_used grows) before the
             * entry is published.  Its buckets are zero: never used, or
             * zeroed by its reclaim. */
            tt_take_slot(c, slot);
            /* The hit's minute and second buckets of our stripe are
             * stamped with its epochs (count 0): a reclaim that runs between
             * this insert and the hit's addition would otherwise find the
             * new key idle (every tag 0), take it back, and the hit would
             * be dropped.  The tags are 0 (a fresh or zeroed slot), so this
             * is a reset like tt_roll_bucket's. */
            tt_stamp_bucket(tt_stripe_buckets(c, slot, stripe) + (second / 60) % c->minutes,
                            tt_make_tag(second / 60, gen));
            tt_stamp_bucket(tt_stripe_buckets(c, slot, stripe) + c->minutes + second % c->seconds,
                            tt_make_tag(second, gen));
            CRASH_POINT(7);
            __atomic_store_n(TT_U32(ent, TT_E_STATE), TT_ENTRY_READY, __ATOMIC_RELEASE);
            CRASH_POINT(6);
            __atomic_store_n(TT_U32(c->base, TT_H_INSERT_SLOT), 0u, __ATOMIC_RELEASE);
            __atomic_store_n(TT_U32(c->base, TT_H_INSERT_ENTRY), 0u, __ATOMIC_RELEASE);
            ref = TT_MAKE_REF(slot, gen);
        }
    }
    tt_unlock(&l);
    return ref;
}

/* Slots in use: keys_used minus the reclaimed slots waiting on the free
 * list (both on header line 2). */
static inline uint32_t tt_slots_in_use(tt_seg *c)
{
    uint32_t used = __atomic_load_n(TT_U32(c->base, TT_H_KEYS_USED), __ATOMIC_ACQUIRE);
    uint32_t nfree = c->slot_table == NULL ? 0
        : __atomic_load_n(TT_U32(c->base, TT_H_FREE_SLOTS), __ATOMIC_ACQUIRE);
    return nfree <= used ? used - nfree : used;
}

/* Finds or creates the key (names already checked: 1..64 and 1..32 bytes)
 * for a hit at epoch second `second` (a new key's buckets of that second and
 * its minute are stamped, tt_insert_key); returns its ref, TT_OVERFLOW_SLOT
 * when the table is full, or -1 with the error recorded (TT_ERR_BUSY: the
 * lock was not free in 50 ms; TT_ERR_LAYOUT: a layout-1 segment is read
 * only).  Takes the lock only to insert, inside TT_BLOCK_BEGIN/END (the
 * Python binding lets go of the GIL there; its caller holds c->busy so that
 * nothing unmaps under the insert). */
static long tt_find_or_create(tt_seg *c, const char *a, size_t alen, const char *e,
                              size_t elen, int is_all, uint64_t second)
{
    uint32_t hash = tt_fnv1a(a, alen, e, elen);
    uint32_t limit = is_all ? c->key_capacity : c->key_capacity - TT_EVENT_RESERVE;
    uint32_t stripe;
    long slot = tt_probe(c, a, alen, e, elen, hash, NULL, NULL);
    if (slot >= 0)
        return slot;
    /* Full: answer without the lock, so a flood of new names costs no
     * system call. */
    if (tt_slots_in_use(c) >= limit)
        return TT_OVERFLOW_SLOT;
    if (c->slot_table == NULL)
        return tt_fail(c, TT_ERR_LAYOUT, "a layout-1 segment is read only here");
    tt_own_stripe(c);  /* a forked child stamps its own stripe */
    stripe = c->stripe;
    TT_BLOCK_BEGIN(c);
    slot = tt_insert_key(c, a, alen, e, elen, hash, limit, second, stripe);
    TT_BLOCK_END(c);
    if (slot < 0)
        return tt_fail(c, TT_ERR_BUSY, "timed out waiting for the segment lock to add a key");
    return slot;
}

/* ------------------------------------------------------------------- add */

/* Makes `b` count `tag` (an epoch and the writer's generation of the slot,
 * tt_make_tag), resetting it if it holds another epoch.  Returns 0 when b
 * counts tag, 1 when the addition is dropped (below), -1 on a lock timeout,
 * TT_ADD_STALE when the slot's generation is no longer the ref's: the key
 * was reclaimed since this process cached its slot; nothing is touched, and
 * the caller resolves the key again.  `unit` is the bucket's epoch length
 * in seconds (60 for a minute bucket, 1 for a second bucket).
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
 * Hazard: a lock-free reader (tt_bucket_read) may be between its load of
 * the old tag and its load of the count.  The tag is zeroed first, fenced,
 * so that reader's second look at the tag fails instead of passing the new
 * epoch's count off as the old one's (a seqlock write; a writer that sees
 * the 0 goes for the lock and waits for us).
 * c->busy is held and TT_BLOCK_BEGIN/END wrap the whole of lock, reset and
 * unlock (the Python binding lets go of the GIL there, so a thread holding
 * the GIL never stretches the time the lock is held). */
__attribute__((noinline)) static int tt_roll_bucket(tt_seg *c, tt_bucket *b, uint64_t tag,
                                                    uint64_t unit, long ref)
{
    tt_lock_t l = tt_lock_of(c);
    struct timespec ts;
    uint64_t cur, epoch = tag & TT_EPOCH_MASK;
    uint32_t slot = TT_REF_SLOT(ref), gen = TT_REF_GEN(ref);
    int rc = 0;
    TT_BUSY_ENTER(c);
    TT_BLOCK_BEGIN(c);
    if (tt_lock(&l, TT_HOT_LOCK_TIMEOUT_MS) < 0) {
        __atomic_fetch_add(TT_U64(c->base, TT_H_LOCK_TIMEOUTS), 1u, __ATOMIC_RELAXED);
        rc = -1;
    } else {
        tt_recover(c);  /* a holder died half way: finish what it left first */
        if (tt_slot_gen(c, slot) != gen) {
            rc = TT_ADD_STALE;
        } else {
            cur = __atomic_load_n(&b->tag, __ATOMIC_ACQUIRE);
            if ((cur & TT_EPOCH_MASK) > epoch) {
                clock_gettime(CLOCK_REALTIME, &ts);
                /* + 1: the clock may have moved on since the tag was read. */
                if ((cur & TT_EPOCH_MASK) <= (uint64_t)ts.tv_sec / unit + 1)
                    rc = 1;  /* our time is stale: keep the current counts */
            }
            if (cur != tag && rc == 0) {
                __atomic_store_n(&b->tag, 0, __ATOMIC_RELAXED);
                __atomic_thread_fence(__ATOMIC_RELEASE);
                __atomic_store_n(&b->count, 0, __ATOMIC_RELAXED);
                __atomic_store_n(&b->tag, tag, __ATOMIC_RELEASE);
            }
        }
        tt_unlock(&l);
    }
    TT_BLOCK_END(c);
    TT_BUSY_LEAVE(c);
    return rc;
}

/* ----------------------------------------------------------------- reads */

/* The count of bucket b if it holds epoch `tag`, else 0.  Lock-free: the
 * tag is read before and after the count (a seqlock read, see
 * tt_roll_bucket), so a bucket rolled over in between reads as 0, never as
 * the new epoch's count under the old epoch's name. */
static inline uint64_t tt_bucket_read(tt_bucket *b, uint64_t tag)
{
    uint64_t n;
    if (__atomic_load_n(&b->tag, __ATOMIC_ACQUIRE) != tag)
        return 0;
    n = __atomic_load_n(&b->count, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    return __atomic_load_n(&b->tag, __ATOMIC_RELAXED) == tag ? n : 0;
}

/* a + b, saturating at TT_COUNT_MAX.  Why: counts are read from shared
 * memory (a corrupt or absurd bucket must not wrap a sum around to a small
 * number) and end in signed 64-bit integers (SQLite, JSON readers, PHP). */
#define TT_COUNT_MAX 0x7FFFFFFFFFFFFFFFULL
static inline uint64_t tt_sat_add(uint64_t a, uint64_t b)
{
    if (a > TT_COUNT_MAX) a = TT_COUNT_MAX;
    if (b > TT_COUNT_MAX) b = TT_COUNT_MAX;
    return a + b > TT_COUNT_MAX ? TT_COUNT_MAX : a + b;
}

/* Count of `slot` in clock minute `minute` (sum over stripes, saturating),
 * for the slot's current generation: a reclaimed slot's old key reads 0. */
static uint64_t tt_minute_count(tt_seg *c, uint32_t slot, uint64_t minute)
{
    uint64_t total = 0;
    uint32_t gen = tt_slot_gen(c, slot);
    if (minute > TT_EPOCH_MASK)
        return 0;  /* no tag holds it */
    for (uint32_t p = 0; p < c->stripes; p++)
        total = tt_sat_add(total, tt_bucket_read(tt_minute_bucket(c, slot, p, minute),
                                                 tt_make_tag(minute, gen)));
    return total;
}

/* Count of `slot` over the 60 seconds ending with `second` (inclusive). */
static uint64_t tt_sliding_count(tt_seg *c, uint32_t slot, uint64_t second)
{
    uint64_t total = 0;
    uint32_t gen = tt_slot_gen(c, slot);
    if (second > TT_EPOCH_MASK)
        return 0;
    for (uint32_t p = 0; p < c->stripes; p++) {
        for (uint64_t s = second - 59; s <= second; s++)
            total = tt_sat_add(total, tt_bucket_read(tt_second_bucket(c, slot, p, s),
                                                     tt_make_tag(s, gen)));
    }
    return total;
}

/* The count of `slot` at time t: window 1 = the clock minute, else the
 * sliding 60 seconds. */
static uint64_t tt_window_count(tt_seg *c, uint32_t slot, int window, double t)
{
    uint64_t second = (uint64_t)t;
    return window == 1 ? tt_minute_count(c, slot, second / 60) : tt_sliding_count(c, slot, second);
}

/* The throttle level: the supervisor's (if its heartbeat is fresh) or the
 * live level of the window, whichever is higher, so workers see a rise at
 * once.  With `use_cache` (the real clock) it is cached per second: a
 * second call in the same second costs two loads.  A driven clock (a `now`
 * argument) neither reads nor fills the cache. */
static int tt_level(tt_seg *c, double t, int use_cache)
{
    int64_t second = (int64_t)t;
    uint32_t mult, lvl = 0, slot;
    uint64_t hb, hits, live;
    if (use_cache && c->level_sec == second)
        return c->level_cached;
    mult = tt_header_u32(c, TT_H_THROTTLE_MULTIPLIER);
    hb = __atomic_load_n(TT_U64(c->base, TT_H_HEARTBEAT_MS), __ATOMIC_ACQUIRE);
    if (hb + TT_HEARTBEAT_STALE_MS >= (uint64_t)(t * 1000.0))
        lvl = tt_header_u32(c, TT_H_THROTTLE_LEVEL);
    slot = tt_header_u32(c, TT_H_THROTTLE_SLOT);
    /* Why the bound: the slot is read from the header on every call, and a
     * corrupted one must not send the read past the mapping. */
    hits = slot < c->key_capacity
           ? tt_window_count(c, slot, (int)tt_header_u32(c, TT_H_THROTTLE_WINDOW), t) : 0;
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

/* --------------------------------------------------------------- reclaim */

/* Whether every bucket of `slot` (all stripes, minute and second) is older
 * than minute `before`: tag 0 (unused or zeroed), or an epoch minute below
 * `before`, an epoch second below before * 60.  Lock-free. */
static int tt_slot_idle(tt_seg *c, uint32_t slot, uint64_t before)
{
    for (uint32_t p = 0; p < c->stripes; p++) {
        tt_bucket *b = tt_stripe_buckets(c, slot, p);
        for (uint32_t j = 0; j < c->minutes + c->seconds; j++) {
            uint64_t t = __atomic_load_n(&b[j].tag, __ATOMIC_ACQUIRE) & TT_EPOCH_MASK;
            if (t != 0 && t >= (j < c->minutes ? before : before * 60))
                return 0;
        }
    }
    return 1;
}

/* Starts the reclaim of `slot`, the key of index entry `pos`, and finishes
 * it (tt_finish_reclaim).  Caller holds the lock and has checked that the
 * key is idle.  index_seq made odd, then `reclaimed`, first: a reader
 * caching slot -> name sees them move before the slot can change hands (a
 * reclaimer killed right after leaves `reclaimed` one too high, never too
 * low, and index_seq odd until the next holder's tt_finish_reclaim). */
static void tt_do_reclaim(tt_seg *c, uint32_t pos, uint32_t slot)
{
    tt_index_seq_begin(c);
    CRASH_POINT(110);
    __atomic_fetch_add(TT_U64(c->base, TT_H_RECLAIMED), 1u, __ATOMIC_ACQ_REL);
    CRASH_POINT(111);
    __atomic_store_n(TT_U32(c->base, TT_H_RECLAIM_ENTRY), pos + 1, __ATOMIC_RELEASE);
    __atomic_store_n(TT_U32(c->base, TT_H_RECLAIM_SLOT), slot + 1, __ATOMIC_RELEASE);
    tt_finish_reclaim(c);
}

/* Whether index entry `i` holds a key that may be reclaimed before minute
 * `before` (ready, not slot 0, 1 or throttle_slot, of its slot's current
 * generation, idle): then *slot and *gen get its slot and generation.
 * Lock-free: the scan of a reclaim; tt_reclaim_entry checks again under
 * the lock. */
static TT_UNUSED int tt_reclaim_candidate(tt_seg *c, uint32_t i, uint64_t before, uint32_t *slot,
                                uint32_t *gen)
{
    char *ent = tt_index_entry(c, i);
    uint32_t throttle = tt_header_u32(c, TT_H_THROTTLE_SLOT);
    if (__atomic_load_n(TT_U32(ent, TT_E_STATE), __ATOMIC_ACQUIRE) != TT_ENTRY_READY)
        return 0;
    *slot = __atomic_load_n(TT_U32(ent, TT_E_SLOT), __ATOMIC_RELAXED);
    *gen = __atomic_load_n(TT_U32(ent, TT_E_GENERATION), __ATOMIC_RELAXED);
    return !(*slot <= TT_THROTTLE_RESERVED_SLOT || *slot == throttle
             || *slot >= c->key_capacity || *gen != tt_slot_gen(c, *slot)
             || !tt_slot_idle(c, *slot, before));
}

/* Reclaims the candidate of entry `i` (tt_reclaim_candidate gave `slot`
 * and `gen`) under the lock, waiting at most timeout_ms for it, if it is
 * still that key and still idle.  Returns 1 if reclaimed, 0 if not, -1
 * with errno set when the lock was not taken.  Call without any binding's
 * lock (the GIL): it touches nothing but the segment. */
static TT_UNUSED int tt_reclaim_entry(tt_seg *c, uint32_t i, uint32_t slot, uint32_t gen,
                            uint64_t before, int timeout_ms)
{
    tt_lock_t l = tt_lock_of(c);
    char *ent = tt_index_entry(c, i);
    int done = 0;
    if (tt_lock(&l, timeout_ms) < 0)
        return -1;
    tt_recover(c);
    /* Checked again under the lock: no roll-over, insert or other reclaim
     * can run now. */
    if (__atomic_load_n(TT_U32(ent, TT_E_STATE), __ATOMIC_ACQUIRE) == TT_ENTRY_READY
        && *TT_U32(ent, TT_E_SLOT) == slot && *TT_U32(ent, TT_E_GENERATION) == gen
        && tt_slot_gen(c, slot) == gen && tt_slot_idle(c, slot, before)) {
        tt_do_reclaim(c, i, slot);
        done = 1;
    }
    tt_unlock(&l);
    return done;
}

/* After a scan that reclaimed keys: probe_limit computed again under the
 * lock (reclaims only lower it; failing to take the lock leaves the old,
 * larger window, which is safe).  Call without any binding's lock. */
static TT_UNUSED void tt_reclaim_done(tt_seg *c, int timeout_ms)
{
    tt_lock_t l = tt_lock_of(c);
    if (tt_lock(&l, timeout_ms) == 0) {
        tt_recover(c);
        tt_reset_probe_limit(c);
        tt_unlock(&l);
    }
}

/* ------------------------------------------------------------------- key */

/* A segment key as env.parse_key reads it ($TRAFFICTHRESHOLD_KEY, --key):
 * decimal, or hex after "0x"; spaces around it ignored; 1..0x7FFFFFFF.
 * Returns 0 with *key set, or -1 (not a key).  No octal ("010" is ten), no
 * sign, no underscores. */
static TT_UNUSED int tt_parse_key(const char *text, long *key)
{
    size_t start = 0, end = strlen(text), i;
    unsigned long long v = 0;
    int base = 10, digit;
    while (start < end && (text[start] == ' ' || (text[start] >= '\t' && text[start] <= '\r')))
        start++;
    while (end > start && (text[end - 1] == ' ' || (text[end - 1] >= '\t' && text[end - 1] <= '\r')))
        end--;
    if (end - start > 2 && text[start] == '0' && (text[start + 1] | 0x20) == 'x') {
        base = 16;
        start += 2;
    }
    if (start == end)
        return -1;
    for (i = start; i < end; i++) {
        char ch = text[i];
        if (ch >= '0' && ch <= '9')
            digit = ch - '0';
        else if (base == 16 && (ch | 0x20) >= 'a' && (ch | 0x20) <= 'f')
            digit = (ch | 0x20) - 'a' + 10;
        else
            return -1;
        v = v * (unsigned)base + (unsigned)digit;
        if (v > 0x7FFFFFFFULL)
            return -1;
    }
    if (v < 1)
        return -1;
    *key = (long)v;
    return 0;
}

/* The key a setting names, as env.env_key reads $TRAFFICTHRESHOLD_KEY:
 * unset (NULL) or blank, TT_DEFAULT_KEY; else tt_parse_key's key, or -1
 * (set but not a key: the binding reports it). */
static TT_UNUSED long tt_key_setting(const char *text)
{
    long key;
    if (text == NULL || text[strspn(text, " \t\n\r\v\f")] == '\0')
        return TT_DEFAULT_KEY;
    return tt_parse_key(text, &key) == 0 ? key : -1;
}

/* ----------------------------------------------------------------- names */

/* The text rules of tt_check_name over v's first `upto` bytes (of len):
 * valid UTF-8, no control character.  Returns 0, or -1 with TT_ERR_NAME.
 * Why apart: every character is checked before any message quotes a name:
 * the messages are logged (PHP), and a name fed from the network must not
 * bring control characters (a forged log line, a terminal escape) or
 * invalid UTF-8 into them. */
static int tt_check_text(tt_seg *c, const char *kind, const char *v, size_t len, size_t upto)
{
    const unsigned char *p = (const unsigned char *)v;
    size_t i = 0;
    uint32_t cp;
    int more;
    while (i < upto) {
        unsigned char b = p[i];
        if (b < 0x80) {
            cp = b;
            more = 0;
        } else if ((b & 0xE0) == 0xC0 && b >= 0xC2) {
            cp = b & 0x1F;
            more = 1;
        } else if ((b & 0xF0) == 0xE0) {
            cp = b & 0x0F;
            more = 2;
        } else if ((b & 0xF8) == 0xF0 && b <= 0xF4) {
            cp = b & 0x07;
            more = 3;
        } else {
            goto bad_utf8;
        }
        if (i + (size_t)more >= len + (more == 0))  /* a sequence cut short */
            goto bad_utf8;
        for (int k = 1; k <= more; k++) {
            if ((p[i + k] & 0xC0) != 0x80)
                goto bad_utf8;
            cp = cp << 6 | (p[i + k] & 0x3F);
        }
        /* Overlong forms, surrogates (category Cs) and past U+10FFFF. */
        if ((more == 2 && cp < 0x800) || (more == 3 && (cp < 0x10000 || cp > 0x10FFFF))
            || (cp >= 0xD800 && cp <= 0xDFFF))
            goto bad_utf8;
        if (cp < 0x20 || (cp >= 0x7F && cp <= 0x9F) || cp == 0x2028 || cp == 0x2029)
            return tt_fail(c, TT_ERR_NAME, "%s name contains the control character U+%04X; "
                           "strip control characters before counting", kind, cp);
        i += 1 + more;
    }
    return 0;
bad_utf8:
    return tt_fail(c, TT_ERR_NAME, "%s name is not valid UTF-8 (byte %zu); names are UTF-8 "
                   "text", kind, i);
}

/* The names' rules of names.py (the one source of truth for Python, whose
 * messages the Python binding keeps), in C for the bindings that have no
 * Python: an account is 1..64 UTF-8 bytes, an event 1..32; valid UTF-8;
 * no control character (C0, DEL, C1, U+2028, U+2029), no '/', '\' or ':';
 * not "." or ".."; no leading '~'.  `kind` names the name in the message
 * ("account", "event", "status").  Returns 0, or -1 with TT_ERR_NAME and
 * a message.  tests/test_core_ffi.py checks it against names.validate. */
static int tt_check_name(tt_seg *c, const char *kind, const char *v, size_t len, size_t max)
{
    const unsigned char *p = (const unsigned char *)v;
    size_t cut = len > 20 ? 20 : len;
    if (len == 0)
        return tt_fail(c, TT_ERR_NAME, "%s name is empty; give a name such as '%s'", kind,
                       kind[0] == 'a' ? "example.com" : kind[0] == 'e' ? "pageview" : "paid");
    /* The text first (tt_check_text).  The verdict is names.py's; only
     * which of two faults a message names may differ.  A name past `max`
     * is read only to `max` (its message quotes 20 bytes): a huge name
     * costs no more than a long one. */
    if (tt_check_text(c, kind, v, len, len > max ? max : len) < 0)
        return -1;
    if (len > max) {
        while (cut > 0 && (p[cut] & 0xC0) == 0x80)
            cut--;  /* whole characters only */
        return tt_fail(c, TT_ERR_NAME, "%s name '%.*s'... is %zu bytes long; the limit is %zu "
                       "UTF-8 bytes: shorten it or hash it", kind, (int)cut, v, len, max);
    }
    /* ASCII bytes never occur inside a multi-byte UTF-8 sequence. */
    if (memchr(v, '/', len) != NULL)
        return tt_fail(c, TT_ERR_NAME, "%s name '%.*s' contains '/', which cannot appear "
                       "in a stats URL; replace it (for example with '-')", kind,
                       (int)len, v);
    if (memchr(v, ':', len) != NULL)
        return tt_fail(c, TT_ERR_NAME, "%s name '%.*s' contains ':', which separates the "
                       "parts of the farm's Redis keys (two names would share one hash); "
                       "replace it (for example with '-')", kind, (int)len, v);
    if ((len == 1 && v[0] == '.') || (len == 2 && v[0] == '.' && v[1] == '.'))
        return tt_fail(c, TT_ERR_NAME, "%s name '%.*s' is '.' or '..', which a stats URL "
                       "cannot carry (URLs resolve it away); replace it with a name of other "
                       "characters too", kind, (int)len, v);
    if (memchr(v, '\\', len) != NULL)
        return tt_fail(c, TT_ERR_NAME, "%s name '%.*s' contains '\\', which browsers read "
                       "as '/' in a stats URL; replace it (for example with '-')", kind,
                       (int)len, v);
    if (v[0] == '~')
        return tt_fail(c, TT_ERR_NAME, "%s name '%.*s' starts with '~', which is reserved",
                       kind, (int)len, v);
    return 0;
}

/* names.validate(account, event) in C: account NULL = the total.  An event
 * with a '/' is a funnel key "event/status": both parts follow the event
 * rules, one '/' only, and the whole fits in 32 bytes.  Returns 0, or -1
 * with TT_ERR_NAME and a message. */
static int tt_check_names(tt_seg *c, const char *a, size_t alen, const char *e, size_t elen)
{
    const char *sep;
    if (a != NULL) {
        if (tt_check_name(c, "account", a, alen, TT_ACCOUNT_MAX) < 0)
            return -1;
        if (alen == 3 && memcmp(a, "all", 3) == 0)
            return tt_fail(c, TT_ERR_NAME, "account 'all' is reserved for the total over "
                           "every account; pass no account (null) to count only the total");
    }
    sep = elen > 0 ? memchr(e, '/', elen) : NULL;
    if (sep == NULL)
        return tt_check_name(c, "event", e, elen, TT_EVENT_MAX);
    /* The message quotes the event (64 bytes at most, whole characters)
     * only once its text is checked. */
    if (memchr(sep + 1, '/', elen - (size_t)(sep + 1 - e)) != NULL) {
        size_t q = elen > 64 ? 64 : elen;
        if (tt_check_text(c, "event", e, elen, q) < 0)
            return -1;
        while (q < elen && (((const unsigned char *)e)[q] & 0xC0) == 0x80)
            q--;
        return tt_fail(c, TT_ERR_NAME, "event name '%.*s' has more than one '/': a '/' "
                       "separates an event from its funnel status, and neither may contain "
                       "'/'; replace the others (for example with '-')", (int)q, e);
    }
    if (tt_check_name(c, "event", e, (size_t)(sep - e), TT_EVENT_MAX) < 0
        || tt_check_name(c, "status", sep + 1, elen - (size_t)(sep + 1 - e), TT_EVENT_MAX) < 0)
        return -1;
    if (elen > TT_EVENT_MAX)
        return tt_fail(c, TT_ERR_NAME, "event '%.*s' with its status is %zu bytes long; event, "
                       "'/' and status together must fit in %u UTF-8 bytes: shorten the status",
                       (int)(sep - e), e, elen, TT_EVENT_MAX);
    return 0;
}

/* ---------------------------------------------------------------- writer */

/* A writer: an attachment with its own cache of keys, for the bindings that
 * have no cache of their own (the PHP extension, libtrafficthreshold).  The
 * Python binding keeps its keys in dicts instead (_counter.c).
 *
 * The cache is direct-mapped: TT_CACHE_SIZE entries of (names, ref), the
 * entry chosen by a hash of the two names that the binding gives (PHP: the
 * hashes zend_strings carry, computed once per string; the library: its
 * own), so a hit found in the cache hashes nothing.  A collision replaces
 * the entry; an overflow answer is never cached, so the cache holds keys of
 * the table only.  A reclaimed key is found out by the bucket tags
 * (TT_ADD_STALE): the whole cache is then forgotten. */
#define TT_CACHE_SIZE 256u

typedef struct {
    uint64_t hash;       /* the combined hash; 0 with alen 0 and elen 0: empty */
    long ref;
    uint8_t alen, elen;  /* alen 0: the total (account NULL) */
    char a[TT_ACCOUNT_MAX];
    char e[TT_EVENT_MAX];
} tt_cache_entry;

typedef struct tt_writer {
    tt_seg s;
    /* Bumped whenever the cache is forgotten (attach, detach, a reclaimed
     * key): a binding's memo of refs (tt_hit_memo) made under another
     * generation is not used. */
    unsigned long gen;
    long last_ref;  /* the account's ref of the last tt_writer_hit (-1: none) */
    /* The event of the last hit and its `all` ref: a process mostly counts
     * one event, so its total costs one compare.  last_elen 0: none. */
    uint8_t last_elen;
    char last_e[TT_EVENT_MAX];
    long last_all;
    tt_cache_entry cache[TT_CACHE_SIZE];
} tt_writer;

/* Whether a[0:n] == b[0:n], for names (n <= 64): 8 bytes at a time,
 * inline; a libc memcmp() call costs more than the compare. */
static inline int tt_eq(const char *a, const char *b, size_t n)
{
    uint64_t x, y;
    while (n >= 8) {
        memcpy(&x, a, 8);
        memcpy(&y, b, 8);
        if (x != y)
            return 0;
        a += 8;
        b += 8;
        n -= 8;
    }
    while (n-- > 0)
        if (*a++ != *b++)
            return 0;
    return 1;
}

static inline uint64_t tt_pair_hash(uint64_t ahash, uint64_t ehash)
{
    uint64_t h = ahash * 0x9E3779B97F4A7C15ULL ^ ehash;
    return h ^ (h >> 29);
}

/* Forgets every cached key (a key was reclaimed, or the writer detached). */
static void tt_writer_forget(tt_writer *w)
{
    memset(w->cache, 0, sizeof w->cache);
    w->last_elen = 0;
    w->last_ref = -1;
    w->gen++;
}

/* The backend a setting names, for tt_writer_attach: unset (NULL) or
 * empty, -1 (SysV, else POSIX); "posix", POSIX; anything else, SysV. */
static TT_UNUSED int tt_backend_setting(const char *text)
{
    if (text == NULL || *text == '\0')
        return -1;
    return strcmp(text, "posix") == 0 ? TT_BACKEND_POSIX : TT_BACKEND_SYSV;
}

/* Attaches the writer (tt_attach); backend -1 = SysV, else POSIX if no
 * SysV segment is found (as the Python worker API does without
 * TRAFFICTHRESHOLD_BACKEND).  Returns 0 or -1 with w->s's error (the SysV
 * one when neither is found). */
static TT_UNUSED int tt_writer_attach(tt_writer *w, int backend, long key)
{
    char sysv_error[sizeof w->s.error];
    tt_writer_forget(w);
    if (backend >= 0)
        return tt_attach(&w->s, backend, key, 0, 0, 0);
    if (tt_attach(&w->s, TT_BACKEND_SYSV, key, 0, 0, 0) == 0)
        return 0;
    if (w->s.err != TT_ERR_NOTFOUND)
        return -1;
    memcpy(sysv_error, w->s.error, sizeof sysv_error);
    if (tt_attach(&w->s, TT_BACKEND_POSIX, key, 0, 0, 0) == 0)
        return 0;
    if (w->s.err == TT_ERR_NOTFOUND) {
        memcpy(w->s.error, sysv_error, sizeof sysv_error);
        w->s.backend = TT_BACKEND_SYSV;
    }
    return -1;
}

static TT_UNUSED void tt_writer_detach(tt_writer *w)
{
    tt_detach(&w->s);
    tt_writer_forget(w);
}

/* Whether the writer is attached to a live segment, attaching it as the
 * attacher's policy says (`force`: try now): a live segment retired under
 * it is let go of and watched for.  backend -1: SysV, else POSIX
 * (tt_writer_attach).  Sets *tried when an attach was tried and failed now
 * (w->s.error says why).  The PHP extension and libtrafficthreshold use
 * this; the Python binding the attacher itself (its Counter objects). */
static TT_UNUSED int tt_writer_ready(tt_writer *w, tt_attacher *a, int backend, long key,
                                     int force, int *tried)
{
    int64_t t;
    int err;
    if (tried)
        *tried = 0;
    if (tt_live(&w->s))
        return 1;
    if (w->s.base != NULL) {
        tt_attacher_retired(a, w->s.backend, w->s.key);
        tt_writer_detach(w);
    }
    t = (int64_t)tt_now_second();
    if (!tt_attacher_due(a, t, force))
        return 0;
    err = tt_writer_attach(w, backend, key) == 0 ? TT_OK : w->s.err;
    tt_attacher_tried(a, t, err);
    if (err != TT_OK && tried)
        *tried = 1;
    return err == TT_OK;
}

/* The ref of (account, event), account NULL = the total: from the cache, or
 * checked (tt_check_names: the account's check covers the event too) and
 * found or created in the segment.  ahash and ehash are the binding's
 * hashes of the names (any function of the bytes; ahash ignored for the
 * total).  Returns the ref, TT_OVERFLOW_SLOT, or -1 with the error set. */
static long tt_writer_miss(tt_writer *w, tt_cache_entry *ent, uint64_t h, const char *a,
                           size_t alen, const char *e, size_t elen, uint64_t second);

static inline long tt_writer_resolve(tt_writer *w, const char *a, size_t alen, uint64_t ahash,
                                     const char *e, size_t elen, uint64_t ehash,
                                     uint64_t second)
{
    uint64_t h = tt_pair_hash(a == NULL ? 0x5bd1e995u : ahash, ehash);
    tt_cache_entry *ent = &w->cache[h & (TT_CACHE_SIZE - 1)];
    size_t clen = a == NULL ? 0 : alen;
    if (__builtin_expect(ent->hash == h && ent->alen == clen && ent->elen == elen && elen > 0
                         && tt_eq(ent->e, e, elen) && tt_eq(ent->a, a, clen), 1))
        return ent->ref;
    return tt_writer_miss(w, ent, h, a, alen, e, elen, second);
}

/* tt_writer_resolve on a cache miss: check the names, find or create the
 * key, cache it in `ent` (hash h). */
__attribute__((noinline)) static long tt_writer_miss(tt_writer *w, tt_cache_entry *ent,
                                                     uint64_t h, const char *a, size_t alen,
                                                     const char *e, size_t elen, uint64_t second)
{
    size_t clen = a == NULL ? 0 : alen;
    long ref;
    if (tt_check_names(&w->s, a, alen, e, elen) < 0)
        return -1;
    ref = a == NULL ? tt_find_or_create(&w->s, "all", 3, e, elen, 1, second)
                    : tt_find_or_create(&w->s, a, alen, e, elen, 0, second);
    if (ref > (long)TT_OVERFLOW_SLOT) {
        ent->hash = h;
        ent->ref = ref;
        ent->alen = (uint8_t)clen;
        ent->elen = (uint8_t)elen;
        memcpy(ent->a, a == NULL ? "" : a, clen);
        memcpy(ent->e, e, elen);
    }
    return ref;
}

/* The `all` ref of `event`, through last_e. */
static inline long tt_writer_all(tt_writer *w, const char *e, size_t elen, uint64_t ehash,
                                 uint64_t second)
{
    long ref;
    if (elen == w->last_elen && tt_eq(e, w->last_e, elen))
        return w->last_all;
    ref = tt_writer_resolve(w, NULL, 0, 0, e, elen, ehash, second);
    if (ref > (long)TT_OVERFLOW_SLOT && elen <= TT_EVENT_MAX) {
        memcpy(w->last_e, e, elen);
        w->last_elen = (uint8_t)elen;
        w->last_all = ref;
    }
    return ref;
}

/* Counts n hits of (account, event) at epoch second `second` (the caller's
 * clock; tt_now_second() for the real one): the event's total and, with an
 * account (a != NULL), the account's key.  The same steps as the Python
 * binding's hit (docs/segment.rst, "How a writer counts a hit"): both names
 * checked and both keys resolved before anything is added, then the
 * additions; a key found reclaimed (TT_ADD_STALE) is resolved again, once,
 * and counted in its new slot.  An addition the lock could not make in
 * 50 ms is counted in dropped_hits, once per hit.  Returns 0 (counted, or
 * dropped and so recorded), or -1 with the error set: TT_ERR_NAME (nothing
 * added), TT_ERR_BUSY (a new key could not be added: not counted),
 * TT_ERR_NOTFOUND (the segment was retired: detach and attach again later).
 * n must be 1..TT_MAX_HIT_N and second >= 60 (the binding checks). */
static TT_UNUSED int tt_writer_hit(tt_writer *w, const char *a, size_t alen, uint64_t ahash,
                                   const char *e, size_t elen, uint64_t ehash, uint64_t n,
                                   uint64_t second);

/* The additions of tt_writer_hit, its keys resolved: all_ref the event's
 * total, ref the account's (ignored when a is NULL).  The segment is live
 * (the caller looked).  A key found reclaimed (TT_ADD_STALE) is resolved
 * again by its names, once.  Returns as tt_writer_hit. */
static inline __attribute__((always_inline)) int tt_writer_add(
    tt_writer *w, long ref, long all_ref, const char *a, size_t alen, uint64_t ahash,
    const char *e, size_t elen, uint64_t ehash, uint64_t n, uint64_t second)
{
    tt_seg *c = &w->s;
    int dropped, rc;
    tt_clock clk;
    if (second != c->clk.second)
        tt_set_clock(c, second);
    clk = c->clk;
    tt_own_stripe(c);
    dropped = tt_add_slot(c, &clk, all_ref, n);
    if (__builtin_expect(dropped == TT_ADD_STALE, 0)) {
        tt_writer_forget(w);
        if ((all_ref = tt_writer_all(w, e, elen, ehash, second)) < 0)
            return -1;
        dropped = tt_add_slot(c, &clk, all_ref, n) != 0;
    }
    if (a != NULL) {
        rc = tt_add_account(c, &clk, ref, all_ref, n);
        if (__builtin_expect(rc == TT_ADD_STALE, 0)) {
            /* The total is counted: a failure now drops the rest. */
            tt_writer_forget(w);
            ref = tt_writer_resolve(w, a, alen, ahash, e, elen, ehash, second);
            rc = ref < 0 ? 1 : tt_add_account(c, &clk, ref, all_ref, n) != 0;
        }
        dropped |= rc;
    } else if (all_ref == TT_OVERFLOW_SLOT) {
        __atomic_fetch_add(TT_U64(c->base, TT_H_OVERFLOW_HITS), n, __ATOMIC_RELAXED);
    }
    if (dropped)
        __atomic_fetch_add(TT_U64(c->base, TT_H_DROPPED_HITS), n, __ATOMIC_RELAXED);
    return 0;
}

static TT_UNUSED int tt_writer_hit(tt_writer *w, const char *a, size_t alen, uint64_t ahash,
                                   const char *e, size_t elen, uint64_t ehash, uint64_t n,
                                   uint64_t second)
{
    tt_seg *c = &w->s;
    long all_ref, ref = -1;
    if (__builtin_expect(!tt_live(c), 0))
        return tt_fail(c, TT_ERR_NOTFOUND, "the segment at IPC key 0x%x was uninstalled",
                       (unsigned int)c->key);
    if (a != NULL && (ref = tt_writer_resolve(w, a, alen, ahash, e, elen, ehash, second)) < 0)
        return -1;
    if ((all_ref = tt_writer_all(w, e, elen, ehash, second)) < 0)
        return -1;
    w->last_ref = ref;
    return tt_writer_add(w, ref, all_ref, a, alen, ahash, e, elen, ehash, n, second);
}

/* tt_writer_hit through `m`: a_id and e_id name the strings a and e (NULL
 * e_id: not memoizable, the plain path). */
static inline __attribute__((always_inline)) int tt_writer_hit_memo(
    tt_writer *w, tt_hit_memo *m, const void *a_id, const void *e_id, const char *a,
    size_t alen, uint64_t ahash, const char *e, size_t elen, uint64_t ehash, uint64_t n,
    uint64_t second)
{
    int rc;
    if (__builtin_expect(e_id != NULL && e_id == m->e_id && a_id == m->a_id
                         && m->gen == w->gen && tt_live(&w->s), 1))
        return tt_writer_add(w, m->ref, m->all_ref, a, alen, ahash, e, elen, ehash, n, second);
    m->e_id = NULL;
    rc = tt_writer_hit(w, a, alen, ahash, e, elen, ehash, n, second);
    /* last_all is e's only when tt_writer_all cached it (not the overflow
     * slot); last_ref is -1 after a reclaim found during the hit. */
    if (rc == 0 && e_id != NULL && w->last_elen == elen && tt_eq(w->last_e, e, elen)
        && w->last_all > (long)TT_OVERFLOW_SLOT
        && (a == NULL || w->last_ref > (long)TT_OVERFLOW_SLOT)) {
        m->a_id = a_id;
        m->e_id = e_id;
        m->gen = w->gen;
        m->ref = w->last_ref;
        m->all_ref = w->last_all;
    }
    return rc;
}

/* The count of (account, event) (account NULL: the total) at time t:
 * window 1 = the clock minute, 0 = the sliding 60 s.  Never creates a key:
 * an absent key counts 0.  Returns the count, or -1 with TT_ERR_NAME. */
static TT_UNUSED int64_t tt_writer_count(tt_writer *w, const char *a, size_t alen,
                                         const char *e, size_t elen, int window, double t)
{
    tt_seg *c = &w->s;
    long ref;
    if (tt_check_names(c, a, alen, e, elen) < 0)
        return -1;
    if (a == NULL) {
        a = "all";
        alen = 3;
    }
    ref = tt_probe(c, a, alen, e, elen, tt_fnv1a(a, alen, e, elen), NULL, NULL);
    if (ref < 0 || TT_REF_SLOT(ref) >= c->key_capacity
        || tt_slot_gen(c, TT_REF_SLOT(ref)) != TT_REF_GEN(ref))
        return 0;
    return (int64_t)tt_window_count(c, TT_REF_SLOT(ref), window, t);
}

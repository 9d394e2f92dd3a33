/*
 * tt_core.h -- the C core of trafficthreshold: one implementation of the
 * segment's algorithm (docs/segment.rst), with no Python and no PHP in it.
 *
 * Who compiles it: every binding includes tt_core.c into its own
 * translation unit (a "unity" build), so that the hot path below is inlined
 * into each binding's hit() and no binding exports the core's symbols:
 *   trafficthreshold/_counter.c      the Python extension
 *   php/trafficthreshold.c           the PHP extension
 *   trafficthreshold/core/tt_lib.c   libtrafficthreshold.so, for any
 *                                    language with a C FFI (trafficthreshold.h)
 * A binding may define, before including tt_core.c:
 *   TT_BLOCK_BEGIN(seg) / TT_BLOCK_END(seg)  around a wait for the lock on
 *       the hot path (Python: let go of the GIL; default: nothing);
 *
 * Threads: a tt_seg may be used by the threads of a process only under a
 * lock of the binding's (Python: the GIL); the segment itself is shared by
 * processes with atomic operations and the structural lock (tt_lock).
 */
#ifndef TRAFFICTHRESHOLD_CORE_H
#define TRAFFICTHRESHOLD_CORE_H

#include <stddef.h>
#include <stdint.h>

#include "tt_layout.h"

#define TT_U32(base, off) ((uint32_t *)((char *)(base) + (off)))
#define TT_U64(base, off) ((uint64_t *)((char *)(base) + (off)))

/* Errors of the core: what went wrong, in words, is in tt_seg.error. */
enum tt_err {
    TT_OK = 0,
    TT_ERR_NOTFOUND = 1,  /* no segment (not installed, retired, half made) */
    TT_ERR_LAYOUT = 2,    /* not ours, another layout, a corrupt header */
    TT_ERR_OS = 3,        /* a system call failed (tt_seg.os_errno), e.g. EACCES */
    TT_ERR_BUSY = 4,      /* the lock was not free in time */
    TT_ERR_NAME = 5,      /* a bad name or argument */
};

enum tt_backend { TT_BACKEND_SYSV = 0, TT_BACKEND_POSIX = 1 };

typedef struct {
    uint64_t tag;
    uint64_t count;
} tt_bucket;

/* A hit's clock: its epoch second and minute and their bucket indices.
 * Each hit works on its own copy (the Python binding's Counter's copy is
 * shared by threads and changes while a hit lets go of the GIL). */
typedef struct {
    uint64_t second, minute;
    uint32_t min_idx, sec_idx;
} tt_clock;

/* The structural lock of a segment: the SysV semaphore, or for POSIX the
 * lock word lock_owner_pid itself.  Plain data: taken and given back
 * without any binding's lock held. */
typedef struct {
    int backend;
    int semid;           /* SysV: the semaphore set; -1 = none */
    uint32_t *owner;     /* &header[112], lock_owner_pid */
} tt_lock_t;

/* An attachment to the segment, with the geometry copied at attach. */
typedef struct tt_seg {
    char *base;               /* the mapping; NULL once detached */
    size_t size;
    int backend;
    long key;
    int semid;                /* SysV; -1 = none (a retired reader may lack it) */
    uint32_t key_capacity, index_size, minutes, seconds, stripes;
    uint32_t stripe_size, slot_size;
    uint64_t index_offset, slots_offset;
    char *slot_table;         /* layouts 2 and 3: the slot table; NULL for a
                                 layout-1 segment (every generation 0) */
    uint32_t version;         /* the segment's layout version: anything but
                                 TT_LAYOUT_VERSION (a retired_ok reader of an
                                 older layout) is read only */
    uint32_t stripe;          /* this process's stripe */
    unsigned long fork_gen;   /* fork generation the stripe was chosen in */
    int fixed_stripe;         /* stripe given by the caller: keep it */
    int busy;                 /* calls inside a lock section that let go of the
                                 binding's lock (Python: the GIL) or run the
                                 binding's code: the binding must not unmap
                                 under them (TT_BUSY_HELD) */
    unsigned long busy_gen;   /* tt_fork_generation when busy was counted: in a
                                 child forked meanwhile the threads that held
                                 it do not exist, so it counts as 0 there */
    int64_t level_sec;        /* second of the cached throttle level (-1: none) */
    int level_cached;
    /* The bucket indices of the second last counted, so the hot path does
     * no 64-bit division while the second does not change.  clk.second 0 =
     * nothing cached (times before second 60 are refused). */
    tt_clock clk;
    int err;                  /* the last error (enum tt_err) */
    int os_errno;             /* TT_ERR_OS: errno of the failed call */
    char error[320];          /* the last error in words, naming the fix */
} tt_seg;

/* A cached key is a ref: its slot in the low 32 bits, the slot's generation
 * (when the key got it) above.  The overflow slot's ref is 0. */
#define TT_REF_SLOT(ref) ((uint32_t)((uint64_t)(ref) & 0xFFFFFFFFu))
#define TT_REF_GEN(ref) ((uint32_t)((uint64_t)(ref) >> 32))
#define TT_MAKE_REF(slot, gen) ((long)(((uint64_t)(gen) << 32) | (uint32_t)(slot)))

/* What an addition returns besides 0 (counted) and 1 (dropped): the key was
 * reclaimed since this process cached it; nothing was added, resolve it
 * again. */
#define TT_ADD_STALE 2

/* Defined in tt_core.c, which every binding includes (so static: no
 * binding exports them).  The fork generation is bumped in a forked child
 * (pthread_atfork, tt_core_init): a child takes its own stripe at its first
 * hit. */
static volatile unsigned long tt_fork_generation;

/* c->busy, counted per fork generation: a child forked while another
 * thread was inside the segment (its GIL released, waiting for the lock)
 * has no such thread, and a count it inherited would refuse detach() and
 * re-attaching in the child for good. */
#define TT_BUSY_HELD(c) ((c)->busy > 0 && (c)->busy_gen == tt_fork_generation)
#define TT_BUSY_ENTER(c) do { if ((c)->busy_gen != tt_fork_generation) { \
        (c)->busy = 0; (c)->busy_gen = tt_fork_generation; } (c)->busy++; } while (0)
#define TT_BUSY_LEAVE(c) do { if ((c)->busy_gen == tt_fork_generation && (c)->busy > 0) \
        (c)->busy--; } while (0)

/* A binding's memo of the last hit's keys by the identity of its names
 * (PHP: the pointers of interned zend_strings, whose bytes never change
 * while they live): a repeated hit of the same names costs two pointer
 * compares, not the cache's hash and name compares.  Valid while the
 * writer's gen is `gen` (a reclaimed key, an attach or a detach forgets
 * it); the binding must clear it (a_id = e_id = NULL) before the names'
 * storage may be reused for other bytes (PHP: at each request's end).  Only
 * keys of the table are memoized, never the overflow slot. */
typedef struct tt_hit_memo {
    const void *a_id, *e_id;  /* e_id NULL: empty */
    unsigned long gen;
    long ref, all_ref;
} tt_hit_memo;

/* ------------------------------------------------- the hot path, inline */

/* The first bucket (minute bucket 0) of one stripe of one slot. */
static inline tt_bucket *tt_stripe_buckets(const tt_seg *c, uint32_t slot, uint32_t stripe)
{
    return (tt_bucket *)(c->base + c->slots_offset + (uint64_t)slot * c->slot_size
                         + (uint64_t)stripe * c->stripe_size);
}

/* A bucket's tag for `epoch` in a slot of generation `gen`. */
static inline uint64_t tt_make_tag(uint64_t epoch, uint32_t gen)
{
    return epoch | ((uint64_t)(gen & TT_GEN_MASK) << TT_EPOCH_BITS);
}

/* Points the cached bucket indices at `second` (see clk). */
static inline void tt_set_clock(tt_seg *c, uint64_t second)
{
    c->clk.second = second;
    c->clk.minute = second / 60;
    c->clk.min_idx = (uint32_t)(c->clk.minute % c->minutes);
    c->clk.sec_idx = (uint32_t)(second % c->seconds);
}

static int tt_roll_bucket(tt_seg *c, tt_bucket *b, uint64_t tag, uint64_t unit, long ref);
static void tt_choose_stripe(tt_seg *c);

/* A forked child takes its own stripe (tt_choose_stripe), once, at its
 * first hit or look at the stripe after the fork. */
static inline void tt_own_stripe(tt_seg *c)
{
    if (!c->fixed_stripe && c->fork_gen != tt_fork_generation)
        tt_choose_stripe(c);
}

/* Adds n to one bucket of the key `ref`.  Lock-free unless the bucket rolls
 * over.  Returns 0, or what tt_roll_bucket returned. */
static inline int tt_add_bucket(tt_seg *c, tt_bucket *b, uint64_t tag, uint64_t unit,
                                long ref, uint64_t n)
{
    if (__builtin_expect(__atomic_load_n(&b->tag, __ATOMIC_ACQUIRE) != tag, 0)) {
        int rc = tt_roll_bucket(c, b, tag, unit, ref);
        if (rc != 0)
            return rc;
    }
    __atomic_fetch_add(&b->count, n, __ATOMIC_RELAXED);
    return 0;
}

/* Adds n to this process's stripe of the key `ref` (tt_own_stripe() was
 * called), in the minute and second buckets of the hit's clock `clk`.
 * Lock-free unless a bucket rolls over.  Returns 0, 1 when an addition was
 * dropped, or TT_ADD_STALE when the key was reclaimed (nothing added:
 * resolve it again).  Why `clk` is the caller's copy: tt_roll_bucket may
 * let go of the binding's lock, and another thread's hit may meanwhile
 * move the segment's cached clock. */
static inline __attribute__((always_inline)) int tt_add_slot(tt_seg *c, const tt_clock *clk,
                                                             long ref, uint64_t n)
{
    /* The generation of a ref is already below 2**24 (TT_MAKE_REF's callers
     * mask it): the tag's high bits are a shift away. */
    uint64_t high = ((uint64_t)ref >> 32) << TT_EPOCH_BITS;
    tt_bucket *b = tt_stripe_buckets(c, TT_REF_SLOT(ref), c->stripe);
    int rc = tt_add_bucket(c, b + clk->min_idx, clk->minute | high, 60, ref, n);
    if (__builtin_expect(rc == TT_ADD_STALE, 0))
        return TT_ADD_STALE;
    /* A stale second bucket after a counted minute would need a reclaim
     * between the two (a key idle for a ring had its minute tag current):
     * the second's addition is then dropped, like any. */
    return rc | (tt_add_bucket(c, b + c->minutes + clk->sec_idx, clk->second | high, 1, ref,
                               n) != 0);
}

/* Adds n to the account's key `ref` of a hit whose `all` key `all_ref` is
 * counted, and to overflow_hits when it is the overflow slot.  A table full
 * even for `all` keys sends both keys to the overflow slot: the hit is
 * counted there once, as overflow_hits does.  (Two keys never share a ref
 * otherwise: (slot, generation) pairs are never handed out twice.)  Returns
 * tt_add_slot's result (0 when nothing was to be added). */
static inline int tt_add_account(tt_seg *c, const tt_clock *clk, long ref, long all_ref,
                                 uint64_t n)
{
    if (ref == TT_OVERFLOW_SLOT)
        __atomic_fetch_add(TT_U64(c->base, TT_H_OVERFLOW_HITS), n, __ATOMIC_RELAXED);
    return ref == all_ref ? 0 : tt_add_slot(c, clk, ref, n);
}

/* Whether the segment is live (acquire load of its state): a retired one
 * is let go of. */
static inline int tt_live(const tt_seg *c)
{
    return c->base != NULL
        && __atomic_load_n(TT_U32(c->base, TT_H_STATE), __ATOMIC_ACQUIRE) == TT_STATE_LIVE;
}

#endif

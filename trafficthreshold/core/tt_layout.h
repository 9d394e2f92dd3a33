/*
 * tt_layout.h -- the segment's layout (version 3), byte by byte: in words in
 * this comment (docs/segment.rst says the same for writers in other
 * languages), and as numbers below, the one place they are written in C.
 * The C core (tt_core.c), the Python extension (_counter.c, which exports
 * them as _counter.LAYOUT), the PHP extension (php/) and any program that
 * links libtrafficthreshold include this file; tests/test_segment.py checks
 * that segment.py, the docs and these numbers agree.
 *
 * All integers are in the host's native byte order (the segment never
 * leaves the host).
 *
 * The segment starts with a 4096-byte header:
 *
 *   line 0, geometry, written once at install, never changed:
 *     0  u64 magic            "TRFTHRSH" (bytes in this order)
 *     8  u32 layout_version   3 (1: before reclaim; 2: the same bytes as 3,
 *                              written under the writers' protocol before
 *                              issue 20's fixes; both read only, by
 *                              uninstall's final roll-up: tt_validate_header)
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
 *   line 2, the reclaim's fields (since layout 2; changed under the lock only):
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
 * The slot table (since layout 2), key_capacity entries of 8 bytes at
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
 */
#ifndef TRAFFICTHRESHOLD_LAYOUT_H
#define TRAFFICTHRESHOLD_LAYOUT_H

#define TT_MAGIC_BYTES "TRFTHRSH"
/* Why 3: layout 2's bytes did not change, but its writers' protocol did
 * (issue 20: the insert record at 192/196, inserts raise probe_limit), and
 * a worker of the previous release on a segment of this one would break it
 * (two keys in one slot, duplicate keys).  A new version makes each refuse
 * the other's segment (docs/segment.rst, "Upgrading from layout 2"). */
#define TT_LAYOUT_VERSION 3u
/* Older layouts: read (never written) by a retired_ok reader, so that
 * `uninstall` rolls an old segment's counts up after an upgrade.  1: before
 * reclaim; 2: layout 3's bytes under the writers' protocol before issue 20. */
#define TT_LAYOUT_VERSION_1 1u
#define TT_LAYOUT_VERSION_2 2u
#define TT_DEFAULT_KEY 0x54546831L   /* "TTh1" */
#define TT_SLOT_ENTRY_SIZE 8u
/* A bucket tag: the epoch in the low 40 bits (seconds reach 2**40 in the
 * year 36812), the slot's generation in the high 24 (mod 2**24). */
#define TT_EPOCH_BITS 40
#define TT_EPOCH_MASK ((1ULL << TT_EPOCH_BITS) - 1)
#define TT_GEN_MASK 0xFFFFFFu
#define TT_THROTTLE_RESERVED_SLOT 1u
#define TT_HEADER_SIZE 4096u
#define TT_INDEX_ENTRY_SIZE 128u
#define TT_BUCKET_SIZE 16u
#define TT_ACCOUNT_MAX 64u
#define TT_EVENT_MAX 32u
#define TT_OVERFLOW_SLOT 0u
#define TT_EVENT_RESERVE 16u
/* Joins an event and a funnel status in a key's event name ("order/paid");
 * names.STATUS_SEP says the same (tests/test_names.py checks). */
#define TT_STATUS_SEP "/"

/* Header offsets (docs/segment.rst, "The header"). */
#define TT_H_MAGIC 0
#define TT_H_VERSION 8
#define TT_H_HEADER_SIZE 12
#define TT_H_KEY_CAPACITY 16
#define TT_H_INDEX_SIZE 20
#define TT_H_MINUTE_BUCKETS 24
#define TT_H_SECOND_BUCKETS 28
#define TT_H_STRIPES 32
#define TT_H_STRIPE_SIZE 36
#define TT_H_SLOT_SIZE 40
#define TT_H_INDEX_OFFSET 48
#define TT_H_SLOTS_OFFSET 56
#define TT_H_TOTAL_SIZE 64
#define TT_H_CREATED_AT 72
#define TT_H_THROTTLE_MULTIPLIER 80
#define TT_H_THROTTLE_WINDOW 84
#define TT_H_THROTTLE_LEVEL 88
#define TT_H_STATE 92
#define TT_H_HEARTBEAT_MS 96
#define TT_H_SUPERVISOR_PID 104
#define TT_H_THROTTLE_SLOT 108
#define TT_H_LOCK_OWNER_PID 112
#define TT_H_THROTTLE_SINCE_MS 120
#define TT_H_KEYS_USED 128
#define TT_H_NEXT_STRIPE 132
#define TT_H_OVERFLOW_HITS 136
#define TT_H_DROPPED_HITS 144
#define TT_H_ATTACHES 152
#define TT_H_INSTANCE 160
#define TT_H_FREE_HEAD 168
#define TT_H_FREE_SLOTS 172
#define TT_H_RECLAIMED 176
#define TT_H_RECLAIM_SLOT 184
#define TT_H_RECLAIM_ENTRY 188
#define TT_H_INSERT_SLOT 192
#define TT_H_INSERT_ENTRY 196
#define TT_H_PROBE_LIMIT 200
#define TT_H_INDEX_SEQ 208
#define TT_H_LOCK_TIMEOUTS 216

/* Index entry offsets (docs/segment.rst, "The key index"). */
#define TT_E_STATE 0
#define TT_E_SLOT 4
#define TT_E_HASH 8
#define TT_E_ACCOUNT_LEN 12
#define TT_E_EVENT_LEN 13
#define TT_E_ACCOUNT 16
#define TT_E_EVENT 80
#define TT_E_GENERATION 112

/* Slot table entry offsets (docs/segment.rst, "The slot table"). */
#define TT_T_GENERATION 0
#define TT_T_NEXT_FREE 4

#define TT_ENTRY_EMPTY 0u
#define TT_ENTRY_READY 1u
#define TT_ENTRY_REMOVED 2u

#define TT_STATE_INSTALLING 0u
#define TT_STATE_LIVE 1u
#define TT_STATE_RETIRED 2u

/* Timings of the hot path (not part of the bytes, but of the protocol). */
/* Why 50 ms: the lock is held for microseconds (a bucket reset, a key
 * insert).  A request must never wait long because of us; after this the
 * hit is counted as dropped and the request goes on. */
#define TT_HOT_LOCK_TIMEOUT_MS 50
/* A supervisor level older than this is ignored by throttle_status(). */
#define TT_HEARTBEAT_STALE_MS 10000
/* How often a process without a segment tries again to attach. */
#define TT_ATTACH_RETRY_S 10
/* The largest n of one hit().  Why 2**32 - 1: a batch (a minute of a log
 * replayed) fits easily, a writer in another language can hold it in a u32,
 * and a bucket needs 2**31 such hits to reach 2**63, so no count ever read
 * out wraps or passes 2**63 - 1 (the store's integers); the reads saturate
 * there anyway (tt_sat_add). */
#define TT_MAX_HIT_N 4294967295ULL
/* How far a hit's `now` may be from the real clock, in seconds.  Why a year:
 * wide enough for tests and replays that drive the clock, narrow enough to
 * refuse milliseconds or microseconds passed by mistake (a factor of 1000,
 * year ~58,885), which would tag buckets far in the future. */
#define TT_MAX_CLOCK_SKEW_S (366 * 86400)

#endif

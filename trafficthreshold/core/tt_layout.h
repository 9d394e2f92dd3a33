/*
 * tt_layout.h -- the segment's layout (version 2), byte by byte, as numbers.
 *
 * The one place these numbers are written in C: the C core (tt_core.c), the
 * Python extension (_counter.c, which exports them as _counter.LAYOUT),
 * the PHP extension (php/) and any program that links libtrafficthreshold
 * include this file.  docs/segment.rst describes every field in words;
 * tests/test_segment.py checks that segment.py, the docs and these numbers
 * agree.  All integers are unsigned, in the host's native byte order, at
 * their natural alignment.
 */
#ifndef TRAFFICTHRESHOLD_LAYOUT_H
#define TRAFFICTHRESHOLD_LAYOUT_H

#define TT_MAGIC_BYTES "TRFTHRSH"
#define TT_LAYOUT_VERSION 2u
/* The layout before reclaim: read (never written) by a retired_ok reader,
 * so that `uninstall` rolls an old segment's counts up after an upgrade. */
#define TT_LAYOUT_VERSION_1 1u
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

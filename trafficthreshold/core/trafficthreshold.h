/*
 * trafficthreshold.h -- count hits into trafficthreshold's shared-memory
 * segment from any language with a C FFI (libtrafficthreshold.so).
 *
 * `trafficthreshold c-paths` prints where this header and the library are
 * installed; compile with
 *     cc prog.c $(trafficthreshold c-paths --cflags) $(trafficthreshold c-paths --libs)
 * The library is the same C core as the Python and PHP extensions
 * (tt_core.c): the same segment, the same hot path, the same guarantees.
 *
 * Fail open: no function here ever blocks for more than 50 ms (a lock
 * wait) or aborts.  A handle that could not attach (no segment, no
 * permission) counts nothing and tries again at most every 10 s; tt_error()
 * says why, in a sentence that names the fix.
 *
 * Threads: a handle belongs to one thread at a time (give each thread its
 * own, or lock around it).  After fork() a child may go on using its
 * parent's handle (it takes its own stripe).
 */
#ifndef TRAFFICTHRESHOLD_H
#define TRAFFICTHRESHOLD_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct tt_handle tt_handle;

/* The library's version, e.g. "0.1.0", and its segment layout version. */
const char *tt_version(void);
int tt_layout_version(void);

/* Opens a handle on the segment at IPC `key` (< 0: $TRAFFICTHRESHOLD_KEY,
 * else 0x54546831) of `backend` ("sysv", "posix", or NULL: SysV, else POSIX
 * when no SysV segment is found).  Returns NULL only when out of memory;
 * otherwise a handle, attached or not (tt_attached, tt_error). */
tt_handle *tt_open(long key, const char *backend);

/* Counts n (1..4294967295) hits of `event` (NULL: "pageview") for
 * `account` (NULL: the total only) and the event's total.  An event
 * "order/paid" counts the funnel status "paid" of "order".  Returns 0 when
 * counted (or dropped and so recorded in the segment's dropped_hits),
 * -1 when not: a bad name or n (nothing counted), no segment, or the lock
 * busy for 50 ms; tt_error() says which. */
int tt_hit(tt_handle *h, const char *account, const char *event, uint64_t n);

/* tt_hit() at epoch second `second` (0: now), for replays and tests:
 * refused (-1) when more than 366 days from the real clock. */
int tt_hit_at(tt_handle *h, const char *account, const char *event, uint64_t n,
              uint64_t second);

/* Hits of (account or NULL: the total, event or NULL: "pageview") in the
 * current clock minute (window 1) or the sliding 60 s (window 0); 0 when
 * none or not attached; -1 for a bad name. */
int64_t tt_count(tt_handle *h, const char *account, const char *event, int window);

/* The throttle level 0..5 (the supervisor's, or the live count's if
 * higher); 0 when not attached. */
int tt_throttle_status(tt_handle *h);

/* 1 if attached to a live segment (attaching now if it is time to try). */
int tt_attached(tt_handle *h);

/* The last error in words ("" when none).  Valid until the next call. */
const char *tt_error(tt_handle *h);

/* Detaches and frees the handle. */
void tt_close(tt_handle *h);

/* A segment key as `--key` and $TRAFFICTHRESHOLD_KEY take it: decimal, or
 * hex after "0x", 1..0x7FFFFFFF.  0 with *key set, -1 if not a key. */
int tt_key_of(const char *text, long *key);

/* The names' rules (docs/segment.rst): 0 if (account or NULL, event) may be
 * counted, else -1 and the reason in `error`.  With lengths: names are
 * UTF-8 bytes, and a 0 byte is a control character, refused. */
int tt_check_names_error(const char *account, size_t account_len, const char *event,
                         size_t event_len, char *error, size_t error_size);

/* The page-view rule (docs/webapps.rst): 1 if a request of `method` for
 * `path` answered `status` with this Content-Type (NULL: none) to this
 * Accept (NULL: none) is a page view. */
int tt_page_view_rule(const char *method, const char *path, int status,
                      const char *content_type, size_t content_type_len,
                      const char *accept, size_t accept_len);

#ifdef __cplusplus
}
#endif

#endif

/*
 * tt_lib.c -- libtrafficthreshold.so: the C core (tt_core.c) behind the
 * small API of trafficthreshold.h, for any language with a C FFI.
 * Built by setup.py next to the Python extension (trafficthreshold/core/);
 * tests/test_core_ffi.py compiles a C program against it and counts from
 * several processes.
 */
#define _GNU_SOURCE
#include <stdlib.h>

#include "tt_core.c"
#include "trafficthreshold.h"

#define TT_EXPORT __attribute__((visibility("default")))
#ifndef TT_VERSION
#define TT_VERSION "0.1.0"
#endif

struct tt_handle {
    tt_writer w;
    long key;
    int backend;            /* -1: SysV, else POSIX */
    tt_attacher att;        /* when to attach (the core's policy) */
};

/* A hash of a name for the writer's cache: 8 bytes at a time. */
static uint64_t tt_name_hash(const char *s, size_t len)
{
    uint64_t h = 0x243F6A8885A308D3ULL ^ len, word;
    while (len >= 8) {
        memcpy(&word, s, 8);
        h = (h ^ word) * 0x9E3779B97F4A7C15ULL;
        h ^= h >> 32;
        s += 8;
        len -= 8;
    }
    word = 0;
    memcpy(&word, s, len);
    h = (h ^ word) * 0x9E3779B97F4A7C15ULL;
    return h ^ (h >> 29);
}

/* Attached to a live segment, attaching if due (tt_writer_ready: every
 * 10 s at most, at once after a re-install in either backend). */
static int tt_ready(tt_handle *h)
{
    if (h->key < 0)
        return 0;  /* nothing to attach to (tt_open says why) */
    return tt_writer_ready(&h->w, &h->att, h->backend, h->key, 0, NULL);
}

TT_EXPORT const char *tt_version(void) { return TT_VERSION; }

TT_EXPORT int tt_layout_version(void) { return (int)TT_LAYOUT_VERSION; }

TT_EXPORT tt_handle *tt_open(long key, const char *backend)
{
    tt_handle *h = calloc(1, sizeof *h);
    if (h == NULL)
        return NULL;
    tt_core_init();
    tt_attacher_reset(&h->att);
    h->key = key < 0 ? tt_key_setting(getenv("TRAFFICTHRESHOLD_KEY")) : key;
    if (h->key < 0) {
        tt_fail(&h->w.s, TT_ERR_NAME, "$TRAFFICTHRESHOLD_KEY = '%.40s' is not a segment key; "
                "use decimal or 0x hex, e.g. 0x54546831", getenv("TRAFFICTHRESHOLD_KEY"));
        return h;
    }
    if (backend == NULL || *backend == '\0')
        backend = getenv("TRAFFICTHRESHOLD_BACKEND");
    h->backend = tt_backend_setting(backend);
    h->w.s.semid = -1;
    tt_ready(h);
    return h;
}

TT_EXPORT int tt_hit(tt_handle *h, const char *account, const char *event, uint64_t n)
{
    return tt_hit_at(h, account, event, n, 0);
}

TT_EXPORT int tt_hit_at(tt_handle *h, const char *account, const char *event, uint64_t n,
                        uint64_t second)
{
    size_t alen = account == NULL ? 0 : strlen(account), elen;
    uint64_t now = tt_now_second();
    if (event == NULL)
        event = "pageview";
    elen = strlen(event);
    if (n < 1 || n > TT_MAX_HIT_N)
        return tt_fail(&h->w.s, TT_ERR_NAME, "n=%llu is out of range; n must be 1..%llu",
                       (unsigned long long)n, TT_MAX_HIT_N);
    /* Why the bounds: see TT_MAX_CLOCK_SKEW_S (milliseconds by mistake). */
    if (second != 0 && (second < 60 || second > now + TT_MAX_CLOCK_SKEW_S
                        || second + TT_MAX_CLOCK_SKEW_S < now))
        return tt_fail(&h->w.s, TT_ERR_NAME, "second=%llu is more than %d days from the real "
                       "clock (%llu); pass Unix seconds, or 0 for now",
                       (unsigned long long)second, TT_MAX_CLOCK_SKEW_S / 86400,
                       (unsigned long long)now);
    if (!tt_ready(h)) {
        tt_check_names(&h->w.s, account, alen, event, elen);
        return -1;
    }
    return tt_writer_hit(&h->w, account, alen, account == NULL ? 0 : tt_name_hash(account, alen),
                         event, elen, tt_name_hash(event, elen), n, second ? second : now);
}

TT_EXPORT int64_t tt_count(tt_handle *h, const char *account, const char *event, int window)
{
    if (event == NULL)
        event = "pageview";
    if (account != NULL && strcmp(account, "all") == 0)
        account = NULL;
    if (!tt_ready(h))
        return tt_check_names(&h->w.s, account, account ? strlen(account) : 0, event,
                              strlen(event)) < 0 ? -1 : 0;
    return tt_writer_count(&h->w, account, account ? strlen(account) : 0, event, strlen(event),
                           window == 1 ? 1 : 0, tt_now_seconds());
}

TT_EXPORT int tt_throttle_status(tt_handle *h)
{
    return tt_ready(h) ? tt_level(&h->w.s, tt_now_seconds(), 1) : 0;
}

TT_EXPORT int tt_attached(tt_handle *h)
{
    return tt_ready(h);
}

TT_EXPORT const char *tt_error(tt_handle *h)
{
    return h->w.s.error;
}

TT_EXPORT void tt_close(tt_handle *h)
{
    if (h == NULL)
        return;
    tt_writer_detach(&h->w);
    free(h);
}

#include "tt_pageview.c"

TT_EXPORT int tt_page_view_rule(const char *method, const char *path, int status,
                                const char *content_type, size_t content_type_len,
                                const char *accept, size_t accept_len)
{
    return tt_is_page_view(method, path, strlen(path), status, content_type, content_type_len,
                           accept, accept_len);
}

TT_EXPORT int tt_key_of(const char *text, long *key)
{
    return tt_parse_key(text, key);
}

TT_EXPORT int tt_check_names_error(const char *account, size_t account_len, const char *event,
                                   size_t event_len, char *error, size_t error_size)
{
    tt_seg s;
    int rc;
    s.error[0] = '\0';
    rc = tt_check_names(&s, account, account_len, event, event_len);
    if (error != NULL && error_size > 0)
        snprintf(error, error_size, "%s", rc < 0 ? s.error : "");
    return rc;
}

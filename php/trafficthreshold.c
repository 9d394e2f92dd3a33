/*
 * trafficthreshold.c -- the PHP extension: PHP workers count into
 * trafficthreshold's shared-memory segment with the same C core, the same
 * hot path and the same guarantees as the Python workers (docs/php.rst).
 *
 * The core (../trafficthreshold/core/tt_core.c and tt_pageview.c) is
 * #included here, so its hot path is inlined into trafficthreshold_hit()
 * and nothing of it is exported from this .so.
 *
 * One writer per process (php-fpm workers, Apache prefork children, a CLI
 * script): attached at its first use, never in the php-fpm master (MINIT
 * attaches nothing), so every worker takes its own stripe.  Without a
 * segment the writer tries again at most every 10 s (TT_ATTACH_RETRY_S);
 * a segment uninstalled under it is watched for (tt_segment_exists) and
 * the next install attached at once, as in Python and libtrafficthreshold.
 *
 * Fail open: no segment, no permission, a busy lock or a bad name never
 * becomes an error in a page; each kind of problem is written once per
 * worker to the error log (php_log_err), and the functions answer false or
 * 0.  trafficthreshold.strict = On throws instead (TrafficThresholdException,
 * ValueError), for setting up.
 *
 * Page views without touching the application: with
 * trafficthreshold.pageviews = On, RSHUTDOWN (after the output was flushed,
 * the way APM extensions see a request's end) applies the page-view rule of
 * docs/webapps.rst (tt_pageview.c) to the request's method, path, final
 * status, Content-Type and Accept, and counts it.
 *
 * Threads: NTS builds (php-fpm, mod_php prefork, CLI) use one writer per
 * process with no lock; ZTS builds serialise the writer with a mutex.
 */
#ifdef HAVE_CONFIG_H
#include "config.h"
#endif

#include "php.h"
#include "php_ini.h"
#include "SAPI.h"
#include "ext/standard/info.h"
#include "ext/spl/spl_exceptions.h"
#include "zend_exceptions.h"
#include "php_trafficthreshold.h"

#include "tt_core.c"
#include "tt_pageview.c"

ZEND_DECLARE_MODULE_GLOBALS(trafficthreshold)

static zend_class_entry *tt_exception_ce;
static zend_string *tt_str_pageview;  /* "pageview", interned: hashed once */

/* The process's writer (persistent memory), NULL before the first use. */
static tt_writer *tt_w = NULL;
/* When to attach it: the core's policy (tt_attacher, tt_core.c): every
 * 10 s without a segment; once the segment was retired under us, at once
 * after the next install in either backend; a half made one once a
 * second. */
static tt_attacher tt_att = TT_ATTACHER_INIT;
static char tt_last_error[sizeof ((tt_seg *)0)->error] = "";  /* why not attached */
/* The kinds of problem already logged by this process (one line each). */
enum { W_ATTACH = 1, W_NAME = 2, W_BUSY = 4, W_HOST = 8, W_NO_HOSTS = 16, W_ACCOUNT = 32,
       W_ARG = 64 };
static unsigned tt_warned = 0;

#ifdef ZTS
static pthread_mutex_t tt_mutex = PTHREAD_MUTEX_INITIALIZER;
#define TT_LOCK() pthread_mutex_lock(&tt_mutex)
#define TT_UNLOCK() pthread_mutex_unlock(&tt_mutex)
#else
#define TT_LOCK() do { } while (0)
#define TT_UNLOCK() do { } while (0)
#endif

/* ------------------------------------------------------------- settings */

/* The key: trafficthreshold.key, else $TRAFFICTHRESHOLD_KEY, else the
 * default (tt_key_setting: blank is unset).  -1 when the setting is not a
 * key (logged, and nothing counts). */
static long tt_key(void)
{
    const char *v = TT_G(key);
    if (v == NULL || *v == '\0')
        v = getenv("TRAFFICTHRESHOLD_KEY");
    return tt_key_setting(v);
}

static int tt_backend(void)
{
    return tt_backend_setting(TT_G(backend));
}

/* ------------------------------------------------------------- failures */

/* Logs `message` once per process and kind (fail open), or throws it in
 * strict mode (a ValueError for a bad argument).  Returns nothing: the
 * caller answers false or 0 either way. */
static void tt_problem(unsigned kind, int value_error, const char *message)
{
    char line[512];
    if (TT_G(strict)) {
        if (!EG(exception))
            zend_throw_exception(value_error ? zend_ce_value_error : tt_exception_ce, message, 0);
        return;
    }
    if (tt_warned & kind)
        return;
    tt_warned |= kind;
    snprintf(line, sizeof line, "trafficthreshold: %s (logged once per process)", message);
    php_log_err_with_severity(line, LOG_WARNING);
}

/* ---------------------------------------------------------------- attach */

/* The settings the writer was made for (trafficthreshold.key and
 * .backend).  Under mod_php they can change from one request to the next in
 * one process (php_admin_value in a <VirtualHost>: one Apache child serves
 * every host); the writer then follows them: detached, and attached again
 * at once to the request's segment, so no page view counts in another
 * site's segment.  The text is compared, not the pointers: mod_php sets the
 * values again at each request, and the next host's value may be allocated
 * where the last one's was freed.  (A value longer than the copies is
 * compared by its start: it is not a key anyway.) */
static char tt_made_key[64], tt_made_backend[16];
static int tt_made = 0;
/* Bumped by every change of the key, backend, account or allowed_hosts
 * (their INI handlers): where it has not moved since the text was last
 * compared, nothing is compared (php-fpm, and mod_php without per-request
 * settings).  Not in ZTS builds, whose threads have settings of their own. */
static unsigned tt_settings_gen = 1, tt_made_gen = 0;

static void tt_follow_settings_slow(const char *k, const char *b)
{
    snprintf(tt_made_key, sizeof tt_made_key, "%s", k);
    snprintf(tt_made_backend, sizeof tt_made_backend, "%s", b);
    if (!tt_made) {
        tt_made = 1;
        return;
    }
    if (tt_w != NULL && tt_w->s.base != NULL)
        tt_writer_detach(tt_w);
    /* The new segment now, not in up to 10 s; another segment: not the one
     * watched. */
    tt_attacher_reset(&tt_att);
}

static inline void tt_follow_settings(void)
{
    const char *k, *b;
#ifndef ZTS
    if (EXPECTED(tt_made_gen == tt_settings_gen))
        return;
    tt_made_gen = tt_settings_gen;
#endif
    k = TT_G(key) ? TT_G(key) : "";
    b = TT_G(backend) ? TT_G(backend) : "";
    if (EXPECTED(tt_made && strncmp(k, tt_made_key, sizeof tt_made_key - 1) == 0
                 && strncmp(b, tt_made_backend, sizeof tt_made_backend - 1) == 0))
        return;
    tt_follow_settings_slow(k, b);
}

/* Whether the writer is attached to a live segment, attaching it if it is
 * time to try (`force`: now).  Records why not in tt_last_error and sets
 * *failed when an attach was tried now and failed (tt_report_attach tells;
 * info() and phpinfo() show it instead). */
static int tt_ready(int force, int *failed)
{
    long key;
    int tried;
    if (failed)
        *failed = 0;
    tt_follow_settings();
    if (tt_w != NULL && tt_live(&tt_w->s))
        return 1;
    if (tt_w == NULL) {
        tt_w = pecalloc(1, sizeof *tt_w, 1);
        tt_w->s.semid = -1;
        tt_core_init();
    }
    force = force || TT_G(strict);
    if ((key = tt_key()) < 0) {
        if (!tt_attacher_due(&tt_att, (int64_t)tt_now_second(), force))
            return 0;
        snprintf(tt_last_error, sizeof tt_last_error, "trafficthreshold.key = '%s' (or "
                 "$TRAFFICTHRESHOLD_KEY) is not an IPC key; use decimal or 0x hex, e.g. "
                 "0x54546831", TT_G(key) && *TT_G(key) ? TT_G(key) : getenv("TRAFFICTHRESHOLD_KEY"));
        if (failed)
            *failed = 1;
        return 0;
    }
    if (tt_writer_ready(tt_w, &tt_att, tt_backend(), key, force, &tried)) {
        tt_last_error[0] = '\0';
        return 1;
    }
    if (tried) {
        snprintf(tt_last_error, sizeof tt_last_error, "%s", tt_w->s.error);
        if (failed)
            *failed = 1;
    }
    return 0;
}

/* Logs (once) or throws (strict) why the writer could not attach. */
static void tt_report_attach(void)
{
    char message[sizeof tt_last_error + 32];
    /* Under the lock: another thread (ZTS) may be writing it.  The callers
     * have let go of the lock (tt_problem may throw or log). */
    TT_LOCK();
    snprintf(message, sizeof message, "not counting: %s", tt_last_error);
    TT_UNLOCK();
    tt_problem(W_ATTACH, 0, message);
}

/* ------------------------------------------------------------------- hit */

/* Counts n hits; account NULL = the total only.  Returns 1 when counted, 0
 * when not (the problem logged once, or thrown in strict mode). */
static int tt_count_hit_memo(zend_string *account, zend_string *event, zend_long n,
                             tt_hit_memo *memo, int memoizable);

static int tt_count_hit(zend_string *account, zend_string *event, zend_long n)
{
    /* Interned strings (a script's literals, "pageview") keep their bytes
     * while they live, and live at least until the request's end, when the
     * memo is cleared (RSHUTDOWN): their pointers name them. */
    return tt_count_hit_memo(account, event, n, &TT_G(hit_memo),
                             ZSTR_IS_INTERNED(event)
                             && (account == NULL || ZSTR_IS_INTERNED(account)));
}

/* tt_count_hit through `memo`, when `memoizable` (the pointers of account
 * and event name their bytes for as long as the memo may be used). */
static int tt_count_hit_memo(zend_string *account, zend_string *event, zend_long n,
                             tt_hit_memo *memo, int memoizable)
{
    int rc, failed;
    if (n < 1 || (zend_ulong)n > TT_MAX_HIT_N) {
        char message[96];
        snprintf(message, sizeof message, "n=" ZEND_LONG_FMT " is out of range; n must be "
                 "1..%llu per hit", n, TT_MAX_HIT_N);
        tt_problem(W_ARG, 1, message);
        return 0;
    }
    if (account != NULL && zend_string_equals_literal(account, "all"))
        account = NULL;
    TT_LOCK();
    tt_follow_settings();
    if (UNEXPECTED(!(tt_w != NULL && tt_live(&tt_w->s))) && !tt_ready(0, &failed)) {
        /* Fail open, but a bad name is still reported (first): a site run
         * without the segment (development) sees it before production. */
        if (tt_check_names(&tt_w->s, account ? ZSTR_VAL(account) : NULL,
                           account ? ZSTR_LEN(account) : 0, ZSTR_VAL(event),
                           ZSTR_LEN(event)) < 0) {
            char message[sizeof tt_w->s.error];
            memcpy(message, tt_w->s.error, sizeof message);
            TT_UNLOCK();
            tt_problem(W_NAME, 1, message);
            if (failed && !EG(exception))  /* and why nothing counts */
                tt_report_attach();
            return 0;
        }
        TT_UNLOCK();
        if (failed)
            tt_report_attach();
        return 0;
    }
    rc = tt_writer_hit_memo(tt_w, memo, account, memoizable ? event : NULL,
                            account ? ZSTR_VAL(account) : NULL, account ? ZSTR_LEN(account) : 0,
                            account ? zend_string_hash_val(account) : 0, ZSTR_VAL(event),
                            ZSTR_LEN(event), zend_string_hash_val(event), (uint64_t)n,
                            tt_now_second());
    if (rc == 0) {
        TT_UNLOCK();
        return 1;
    }
    {
        char message[sizeof tt_w->s.error];
        int err = tt_w->s.err;
        memcpy(message, tt_w->s.error, sizeof message);
        TT_UNLOCK();
        tt_problem(err == TT_ERR_NAME ? W_NAME : err == TT_ERR_BUSY ? W_BUSY : W_ATTACH,
                   err == TT_ERR_NAME, message);
    }
    return 0;
}

/* The key event of a funnel status: "event/status" (a new string), or the
 * event itself (a new reference) without one. */
static zend_string *tt_key_event(zend_string *event, zend_string *status)
{
    if (status == NULL)
        return zend_string_copy(event);
    return zend_string_concat3(ZSTR_VAL(event), ZSTR_LEN(event), TT_STATUS_SEP, 1,
                               ZSTR_VAL(status), ZSTR_LEN(status));
}

/* {{{ trafficthreshold_hit(?string $account = null, string $event = "pageview",
 *     int $n = 1, ?string $status = null): bool */
PHP_FUNCTION(trafficthreshold_hit)
{
    zend_string *account = NULL, *event = NULL, *status = NULL, *key_event;
    zend_long n = 1;
    int counted;
    ZEND_PARSE_PARAMETERS_START(0, 4)
        Z_PARAM_OPTIONAL
        Z_PARAM_STR_OR_NULL(account)
        Z_PARAM_STR(event)
        Z_PARAM_LONG(n)
        Z_PARAM_STR_OR_NULL(status)
    ZEND_PARSE_PARAMETERS_END();
    if (event == NULL && status == NULL) {
        /* The common call: the interned "pageview", hashed once. */
        counted = tt_count_hit(account, tt_str_pageview, n);
        RETURN_BOOL(counted);
    }
    key_event = tt_key_event(event ? event : tt_str_pageview, status);
    counted = tt_count_hit(account, key_event, n);
    zend_string_release(key_event);
    RETURN_BOOL(counted);
}
/* }}} */

/* {{{ trafficthreshold_throttle_status(): int  0..5; 0 without a segment */
PHP_FUNCTION(trafficthreshold_throttle_status)
{
    int level = 0;
    int failed;
    ZEND_PARSE_PARAMETERS_NONE();
    TT_LOCK();
    if (tt_ready(0, &failed))
        level = tt_level(&tt_w->s, tt_now_seconds(), 1);
    TT_UNLOCK();
    if (failed)
        tt_report_attach();
    RETURN_LONG(level);
}
/* }}} */

/* {{{ trafficthreshold_count(?string $account = null, string $event = "pageview",
 *     string $window = "minute"): int */
PHP_FUNCTION(trafficthreshold_count)
{
    zend_string *account = NULL, *event = NULL, *window = NULL;
    int win = 1, failed;
    int64_t n = 0;
    char message[sizeof tt_last_error];
    ZEND_PARSE_PARAMETERS_START(0, 3)
        Z_PARAM_OPTIONAL
        Z_PARAM_STR_OR_NULL(account)
        Z_PARAM_STR(event)
        Z_PARAM_STR(window)
    ZEND_PARSE_PARAMETERS_END();
    if (window != NULL && !zend_string_equals_literal(window, "minute")) {
        if (!zend_string_equals_literal(window, "60s")) {
            tt_problem(W_ARG, 1, "window must be 'minute' or '60s'");
            RETURN_LONG(0);
        }
        win = 0;
    }
    if (account != NULL && zend_string_equals_literal(account, "all"))
        account = NULL;
    TT_LOCK();
    if (!tt_ready(0, &failed)) {
        n = tt_check_names(&tt_w->s, account ? ZSTR_VAL(account) : NULL,
                           account ? ZSTR_LEN(account) : 0, event ? ZSTR_VAL(event) : "pageview",
                           event ? ZSTR_LEN(event) : 8);
        if (n < 0)
            memcpy(message, tt_w->s.error, sizeof message);
    } else {
        n = tt_writer_count(tt_w, account ? ZSTR_VAL(account) : NULL,
                            account ? ZSTR_LEN(account) : 0,
                            event ? ZSTR_VAL(event) : "pageview", event ? ZSTR_LEN(event) : 8,
                            win, tt_now_seconds());
        if (n < 0)
            memcpy(message, tt_w->s.error, sizeof message);
    }
    TT_UNLOCK();
    if (n < 0)
        tt_problem(W_NAME, 1, message);
    if (failed && !EG(exception))  /* also after a bad name: why nothing counts */
        tt_report_attach();
    RETURN_LONG(n < 0 ? 0 : (zend_long)n);
}
/* }}} */

/* {{{ trafficthreshold_info(): array  what an admin needs to see */
PHP_FUNCTION(trafficthreshold_info)
{
    long key;
    int attached;
    ZEND_PARSE_PARAMETERS_NONE();
    array_init(return_value);
    TT_LOCK();
    attached = tt_ready(1, NULL);
    key = tt_key();
    add_assoc_bool(return_value, "attached", attached);
    add_assoc_long(return_value, "key", key);
    if (key >= 0) {
        char hex[16];
        snprintf(hex, sizeof hex, "0x%lx", key);
        add_assoc_string(return_value, "key_hex", hex);
    } else {
        add_assoc_null(return_value, "key_hex");
    }
    if (attached)
        add_assoc_string(return_value, "backend",
                         tt_w->s.backend == TT_BACKEND_POSIX ? "posix" : "sysv");
    else
        add_assoc_null(return_value, "backend");
    if (attached)
        add_assoc_null(return_value, "error");
    else
        add_assoc_string(return_value, "error", tt_last_error);
    add_assoc_long(return_value, "stripe", attached ? (zend_long)tt_w->s.stripe : -1);
    add_assoc_long(return_value, "segment_size", attached ? (zend_long)tt_w->s.size : 0);
    TT_UNLOCK();
    add_assoc_bool(return_value, "pageviews", TT_G(pageviews));
    add_assoc_string(return_value, "account", TT_G(account) ? TT_G(account) : "");
    add_assoc_bool(return_value, "strict", TT_G(strict));
    add_assoc_long(return_value, "layout_version", TT_LAYOUT_VERSION);
    add_assoc_string(return_value, "version", PHP_TRAFFICTHRESHOLD_VERSION);
}
/* }}} */

/* {{{ trafficthreshold_is_page_view(int $status, ?string $content_type = null,
 *     ?string $accept = null, string $method = "GET", string $path = "/"): bool
 * The page-view rule the request-end hook applies (docs/webapps.rst). */
PHP_FUNCTION(trafficthreshold_is_page_view)
{
    zend_long status;
    zend_string *ct = NULL, *accept = NULL, *method = NULL, *path = NULL;
    ZEND_PARSE_PARAMETERS_START(1, 5)
        Z_PARAM_LONG(status)
        Z_PARAM_OPTIONAL
        Z_PARAM_STR_OR_NULL(ct)
        Z_PARAM_STR_OR_NULL(accept)
        Z_PARAM_STR(method)
        Z_PARAM_STR(path)
    ZEND_PARSE_PARAMETERS_END();
    RETURN_BOOL(tt_is_page_view(method ? ZSTR_VAL(method) : "GET", path ? ZSTR_VAL(path) : "/",
                                path ? ZSTR_LEN(path) : 1, (int)status,
                                ct ? ZSTR_VAL(ct) : NULL, ct ? ZSTR_LEN(ct) : 0,
                                accept ? ZSTR_VAL(accept) : NULL, accept ? ZSTR_LEN(accept) : 0));
}
/* }}} */

/* ------------------------------------------------------ request-end hook */

/* pageviews.host_name: lower-cased, without its port and trailing dot;
 * written into buf (NUL terminated); returns its length (0: none). */
static size_t tt_host_name(const char *host, char *buf, size_t size)
{
    size_t len = strlen(host), s = 0, e, i;
    const char *colon;
    tt_strip(host, &s, &len);
    e = len;
    if (s < e && host[s] == '[') {
        const char *end = memchr(host + s, ']', e - s);
        if (end != NULL && end > host + s)
            e = (size_t)(end - host) + 1;
    } else {
        colon = NULL;
        for (i = e; i > s; i--)
            if (host[i - 1] == ':') { colon = host + i - 1; break; }
        if (colon != NULL) {
            int digits = 1;
            for (const char *p = colon + 1; p < host + e; p++)
                if (*p < '0' || *p > '9') { digits = 0; break; }
            if (digits)
                e = (size_t)(colon - host);
        }
        while (e > s && host[e - 1] == '.')
            e--;
    }
    if (e - s >= size)
        return 0;
    for (i = s; i < e; i++)
        buf[i - s] = (char)tt_ascii_lower((unsigned char)host[i]);
    buf[e - s] = '\0';
    return e - s;
}

/* Whether `host` (normalised) is in allowed_hosts, Django's ALLOWED_HOSTS
 * syntax, comma or space separated: "example.com" exactly, ".example.com"
 * it and its subdomains, "*" any.  Empty list: every host (logged once). */
static int tt_host_allowed(const char *host, size_t len)
{
    const char *list = TT_G(allowed_hosts), *p;
    int any = 0;
    if (list == NULL || *list == '\0') {
        tt_problem(W_NO_HOSTS, 0, "trafficthreshold.account = host without "
                   "trafficthreshold.allowed_hosts: any Host header a client sends becomes an "
                   "account; list the site's hosts");
        return 1;
    }
    for (p = list; *p; ) {
        size_t n, s, e;
        int wildcard;
        while (*p == ',' || tt_is_space((unsigned char)*p)) p++;
        for (n = 0; p[n] && p[n] != ',' && !tt_is_space((unsigned char)p[n]); n++)
            ;
        if (n == 0)
            break;
        any = 1;
        s = 0;
        e = n;
        if (n == 1 && p[0] == '*')
            return 1;
        wildcard = p[0] == '.';
        while (s < e && p[s] == '.') s++;
        while (e > s && p[e - 1] == '.') e--;
        if (e > s) {
            size_t plen = e - s;
            int match = plen == len && strncasecmp(p + s, host, len) == 0;
            if (!match && wildcard && len > plen && host[len - plen - 1] == '.'
                && strncasecmp(p + s, host + len - plen, plen) == 0)
                match = 1;
            if (match)
                return 1;
        }
        p += n;
    }
    return !any;
}

/* A request variable of the SAPI (REQUEST_URI, HTTP_HOST, HTTP_ACCEPT), read
 * in place: sapi_getenv() would copy it and run the input filter, a third
 * of the hook's cost.  NULL when the SAPI has none (CLI). */
static const char *tt_request_var(const char *name, size_t len)
{
    return sapi_module.getenv != NULL ? sapi_module.getenv(name, len) : NULL;
}

/* The request's path (the URI without its query), for the rule's static
 * files and health checks: REQUEST_URI (the URI the visitor asked for, also
 * when the server routes it to a front controller), else the SAPI's. */
/* The length of s up to its first `stop` or its end, inline: the values
 * the hook reads are short ("/", a host name), where a libc call costs
 * more than the scan. */
static inline size_t tt_span(const char *s, char stop)
{
    size_t n = 0;
    while (s[n] != '\0' && s[n] != stop)
        n++;
    return n;
}

static const char *tt_request_path(size_t *len)
{
    const char *uri = tt_request_var("REQUEST_URI", sizeof("REQUEST_URI") - 1);
    if (uri == NULL)
        uri = SG(request_info).request_uri;
    if (uri == NULL)
        uri = "/";
    *len = tt_span(uri, '?');
    return uri;
}

/* The account of this request's page view (trafficthreshold.account):
 * NULL for the total only; "host": the Host header normalised, if
 * allowed_hosts has it and it is a valid name (else NULL, logged once); any
 * other value: that name.  A borrowed string.  Memoized per process for the
 * last Host header (a worker mostly serves one site): a repeated request
 * costs a compare, not the normalising, the list's parsing and the names'
 * check. */
#define tt_memo TT_G(page)

static void tt_memo_forget_settings(void)
{
    if (tt_memo.how != NULL) pefree(tt_memo.how, 1);
    if (tt_memo.list != NULL) pefree(tt_memo.list, 1);
    tt_memo.how = tt_memo.list = NULL;
}

static zend_string *tt_page_account(void)
{
    const char *how = TT_G(account), *raw = "", *list;
    char buf[300];
    size_t raw_len, len;
    int is_host;
    if (how == NULL || *how == '\0')
        return NULL;
#ifndef ZTS
    if (tt_memo.ready && tt_memo.gen == tt_settings_gen)
        is_host = tt_memo.is_host;  /* the settings did not change: no strcmp */
    else
#endif
        is_host = strcmp(how, "host") == 0;
    if (is_host) {
        raw = tt_request_var("HTTP_HOST", sizeof("HTTP_HOST") - 1);
        if (raw == NULL)
            return NULL;
    }
    raw_len = tt_span(raw, '\0');
    list = TT_G(allowed_hosts) ? TT_G(allowed_hosts) : "";
    if (tt_memo.ready && tt_memo.raw_len == raw_len && tt_eq(tt_memo.raw, raw, raw_len)) {
#ifndef ZTS
        if (tt_memo.gen == tt_settings_gen)
            return tt_memo.account;
#endif
        if (strcmp(tt_memo.how, how) == 0 && strcmp(tt_memo.list, list) == 0) {
            tt_memo.gen = tt_settings_gen;
            return tt_memo.account;
        }
    }
    if (tt_memo.account != NULL)
        zend_string_release(tt_memo.account);
    tt_memo.account = NULL;
    TT_G(page_hit).e_id = NULL;  /* its pointer may come back for other bytes */
    tt_memo.ready = 0;
    if (raw_len < sizeof tt_memo.raw) {  /* longer: never memoized */
        memcpy(tt_memo.raw, raw, raw_len);
        tt_memo.raw_len = raw_len;
        tt_memo_forget_settings();
        tt_memo.how = pestrdup(how, 1);
        tt_memo.list = pestrdup(list, 1);
        tt_memo.gen = tt_settings_gen;
        tt_memo.is_host = is_host;
        tt_memo.ready = 1;
    }
    if (!is_host) {
        len = strlen(how);
        if (len >= sizeof buf)
            len = sizeof buf - 1;
        memcpy(buf, how, len);
        buf[len] = '\0';
    } else if ((len = tt_host_name(raw, buf, sizeof buf)) == 0) {
        return NULL;
    }
    /* A name that fails the rules counts in the total only (logged).
     * Checked before the allowed_hosts message quotes a Host: the Host is
     * the visitor's, and bytes that are no UTF-8 must not reach the log
     * (the core's messages quote only checked text). */
    {
        tt_seg scratch;  /* for the message only */
        if (tt_check_names(&scratch, buf, len, "pageview", 8) < 0) {
            tt_problem(W_ACCOUNT, 0, scratch.error);
            return NULL;
        }
    }
    if (is_host && !tt_host_allowed(buf, len)) {
        char message[400];
        snprintf(message, sizeof message, "Host '%s' is not in "
                 "trafficthreshold.allowed_hosts; its page views (and those of every other "
                 "host outside the list) are counted in the total only", buf);
        tt_problem(W_HOST, 0, message);
        return NULL;
    }
    tt_memo.account = zend_string_init(buf, len, 1);
    zend_string_hash_val(tt_memo.account);
    if (!tt_memo.ready) {  /* not memoized: the caller's until the next call */
        if (tt_memo.unmemoized != NULL)
            zend_string_release(tt_memo.unmemoized);
        tt_memo.unmemoized = tt_memo.account;
        tt_memo.account = NULL;
        return tt_memo.unmemoized;
    }
    return tt_memo.account;
}

/* The value of the response's Content-Type header (the last one set; the
 * SAPI's list keeps one, header() replacing it), NULL without one.  Under
 * php-fpm and CGI also the status a "Status: 404 Not Found" header gives
 * (the CGI way: the web server answers it, while PHP's
 * http_response_code stays 200) into *status, unless header("HTTP/...")
 * set a status line, which the SAPI sends instead. */
/* The value of the response's Content-Type header (the last one set; the
 * SAPI's list keeps one, header() replacing it), NULL without one.  Under
 * php-fpm and CGI also the status a "Status: 404 Not Found" header gives
 * (the CGI way: the web server answers it, while PHP's
 * http_response_code stays 200) into *status, unless header("HTTP/...")
 * set a status line, which the SAPI sends instead.  The list is walked
 * in place and the names compared 8 bytes at a time (the hook's budget:
 * docs/php.rst). */
static int tt_cgi_sapi;  /* php-fpm or CGI (MINIT): a Status: header sets the status */

static char *tt_response_headers(int *status)
{
    const uint64_t lower = 0x2020202020202020ULL;
    uint64_t word, content;
    zend_llist_element *e;
    char *found = NULL;
    int cgi = tt_cgi_sapi && SG(sapi_headers).http_status_line == NULL;
    memcpy(&content, "content-", 8);
    for (e = SG(sapi_headers).headers.head; e != NULL; e = e->next) {
        const sapi_header_struct *h = (const sapi_header_struct *)e->data;
        if (h->header_len < 8)  /* shorter than either name */
            continue;
        memcpy(&word, h->header, 8);
        word |= lower;  /* ASCII letters to lower case; '-' and ':' keep */
        if (h->header_len > 13 && word == content && (h->header[8] | 0x20) == 't'
            && (h->header[9] | 0x20) == 'y' && (h->header[10] | 0x20) == 'p'
            && (h->header[11] | 0x20) == 'e' && h->header[12] == ':')
            found = h->header + 13;
        else if (cgi && memcmp(&word, "status:", 7) == 0)
            *status = atoi(h->header + 7);
    }
    if (found != NULL)
        while (*found == ' ' || *found == '\t') found++;
    return found;
}

/* Counts the request if it is a page view (tt_is_page_view): called at the
 * request's end, after the output was flushed, so the status and the
 * Content-Type are final. */
static void tt_count_page_view(void)
{
    const char *method = SG(request_info).request_method;
    int status = SG(sapi_headers).http_response_code ? SG(sapi_headers).http_response_code : 200;
    const char *path, *accept = NULL;
    char *ct = NULL, *owned_ct = NULL;
    size_t path_len;
    int page;
    if (!tt_is_get(method))
        return;
    ct = tt_response_headers(&status);
    if (!((status >= 200 && status < 300) || status == 304))
        return;
    path = tt_request_path(&path_len);
    /* The Content-Type: the response's (the header list's last; not
     * SG(sapi_headers).mimetype, which keeps the first header() of a page
     * that later sets another, and is otherwise the default PHP sent), or
     * the default (default_mimetype and
     * default_charset), which PHP adds when the headers are sent (that may
     * come after RSHUTDOWN, when the page wrote nothing). */
    if (ct == NULL)  /* the default, when PHP sent it (not in the list) */
        ct = SG(sapi_headers).mimetype;
    if (ct == NULL && SG(sapi_headers).send_default_content_type)
        ct = owned_ct = sapi_get_default_content_type();
    if (status == 304 && (ct == NULL || *ct == '\0'))
        accept = tt_request_var("HTTP_ACCEPT", sizeof("HTTP_ACCEPT") - 1);
    page = tt_is_page_view(method, path, path_len, status, ct, ct ? strlen(ct) : 0, accept,
                           accept ? strlen(accept) : 0);
    if (owned_ct) efree(owned_ct);
    if (!page)
        return;
    {
        /* Never into the page: the request is over, and strict mode's
         * exception would have nowhere to go. */
        bool strict = TT_G(strict);
        TT_G(strict) = 0;
        /* Its own memo, kept across requests: both names are the
         * extension's (the permanent "pageview", the account memo's
         * persistent string, which clears this memo when it lets go). */
        zend_string *account = tt_page_account();
        tt_count_hit_memo(account, tt_str_pageview, 1, &TT_G(page_hit),
                          account == NULL || account == tt_memo.account);
        TT_G(strict) = strict;
    }
}

/* ------------------------------------------------------------------ INI */

static ZEND_INI_MH(tt_update_backend)
{
    if (ZSTR_LEN(new_value) != 0 && !zend_string_equals_literal(new_value, "sysv")
        && !zend_string_equals_literal(new_value, "posix")) {
        php_error_docref(NULL, E_WARNING, "trafficthreshold.backend must be sysv, posix or "
                         "empty, not '%s'", ZSTR_VAL(new_value));
        return FAILURE;
    }
    tt_settings_gen++;
    return OnUpdateString(entry, new_value, mh_arg1, mh_arg2, mh_arg3, stage);
}

/* A setting the writer or the account's memo was made for: its change is
 * seen (tt_settings_gen). */
static ZEND_INI_MH(tt_update_setting)
{
    tt_settings_gen++;
    return OnUpdateString(entry, new_value, mh_arg1, mh_arg2, mh_arg3, stage);
}

PHP_INI_BEGIN()
    STD_PHP_INI_ENTRY("trafficthreshold.key", "", PHP_INI_SYSTEM, tt_update_setting, key,
                      zend_trafficthreshold_globals, trafficthreshold_globals)
    STD_PHP_INI_ENTRY("trafficthreshold.backend", "", PHP_INI_SYSTEM, tt_update_backend,
                      backend, zend_trafficthreshold_globals, trafficthreshold_globals)
    STD_PHP_INI_BOOLEAN("trafficthreshold.pageviews", "0", PHP_INI_SYSTEM | PHP_INI_PERDIR,
                        OnUpdateBool, pageviews, zend_trafficthreshold_globals,
                        trafficthreshold_globals)
    STD_PHP_INI_ENTRY("trafficthreshold.account", "", PHP_INI_SYSTEM | PHP_INI_PERDIR,
                      tt_update_setting, account, zend_trafficthreshold_globals,
                      trafficthreshold_globals)
    STD_PHP_INI_ENTRY("trafficthreshold.allowed_hosts", "", PHP_INI_SYSTEM | PHP_INI_PERDIR,
                      tt_update_setting, allowed_hosts, zend_trafficthreshold_globals,
                      trafficthreshold_globals)
    STD_PHP_INI_BOOLEAN("trafficthreshold.strict", "0", PHP_INI_SYSTEM | PHP_INI_PERDIR,
                        OnUpdateBool, strict, zend_trafficthreshold_globals,
                        trafficthreshold_globals)
PHP_INI_END()

/* ------------------------------------------------------------- module */

static void php_trafficthreshold_init_globals(zend_trafficthreshold_globals *g)
{
    memset(g, 0, sizeof *g);
}

/* Frees a thread's memo (ZTS: each thread's, when it ends; NTS: the
 * process's, at MSHUTDOWN). */
static void php_trafficthreshold_free_globals(zend_trafficthreshold_globals *g)
{
    tt_account_memo *m = &g->page;
    if (m->account != NULL) zend_string_release(m->account);
    if (m->unmemoized != NULL) zend_string_release(m->unmemoized);
    if (m->how != NULL) pefree(m->how, 1);
    if (m->list != NULL) pefree(m->list, 1);
    memset(m, 0, sizeof *m);
}

PHP_MINIT_FUNCTION(trafficthreshold)
{
    zend_class_entry ce;
    ZEND_INIT_MODULE_GLOBALS(trafficthreshold, php_trafficthreshold_init_globals,
                             php_trafficthreshold_free_globals);
    REGISTER_INI_ENTRIES();
    tt_cgi_sapi = sapi_module.name != NULL && (strncmp(sapi_module.name, "fpm", 3) == 0
                                               || strncmp(sapi_module.name, "cgi", 3) == 0);
    tt_str_pageview = zend_string_init_interned("pageview", sizeof("pageview") - 1, 1);
    INIT_CLASS_ENTRY(ce, "TrafficThresholdException", NULL);
    tt_exception_ce = zend_register_internal_class_ex(&ce, spl_ce_RuntimeException);
    REGISTER_LONG_CONSTANT("TRAFFICTHRESHOLD_LAYOUT_VERSION", TT_LAYOUT_VERSION,
                           CONST_CS | CONST_PERSISTENT);
    REGISTER_LONG_CONSTANT("TRAFFICTHRESHOLD_MAX_HIT_N", (zend_long)TT_MAX_HIT_N,
                           CONST_CS | CONST_PERSISTENT);
    return SUCCESS;
}

PHP_MSHUTDOWN_FUNCTION(trafficthreshold)
{
    UNREGISTER_INI_ENTRIES();
#ifndef ZTS
    php_trafficthreshold_free_globals(&trafficthreshold_globals);
#endif
    if (tt_w != NULL) {
        tt_writer_detach(tt_w);
        pefree(tt_w, 1);
        tt_w = NULL;
    }
    return SUCCESS;
}

/* A request's start: the names' memo of the last request is void (its
 * interned strings were freed; RSHUTDOWN cleared it too, but a hit from
 * code run after our RSHUTDOWN may have filled it again). */
PHP_RINIT_FUNCTION(trafficthreshold)
{
#if defined(ZTS) && defined(COMPILE_DL_TRAFFICTHRESHOLD)
    ZEND_TSRMLS_CACHE_UPDATE();
#endif
    TT_G(hit_memo).e_id = NULL;
    return SUCCESS;
}

PHP_RSHUTDOWN_FUNCTION(trafficthreshold)
{
    if (TT_G(pageviews))
        tt_count_page_view();
    /* The request's interned strings are freed after this: the memo's
     * pointers could name other bytes in the next request. */
    TT_G(hit_memo).e_id = NULL;
    return SUCCESS;
}

PHP_MINFO_FUNCTION(trafficthreshold)
{
    long key = tt_key();
    char buf[32];
    int attached;
    TT_LOCK();
    attached = tt_ready(1, NULL);
    php_info_print_table_start();
    php_info_print_table_header(2, "trafficthreshold support", "enabled");
    php_info_print_table_row(2, "Version", PHP_TRAFFICTHRESHOLD_VERSION);
    snprintf(buf, sizeof buf, "%u", TT_LAYOUT_VERSION);
    php_info_print_table_row(2, "Segment layout", buf);
    if (key >= 0)
        snprintf(buf, sizeof buf, "0x%lx", key);
    else
        snprintf(buf, sizeof buf, "(invalid)");
    php_info_print_table_row(2, "IPC key", buf);
    php_info_print_table_row(2, "Attached", attached ? "yes" : "no");
    if (attached) {
        php_info_print_table_row(2, "Backend", tt_w->s.backend == TT_BACKEND_POSIX ? "posix" : "sysv");
    } else {
        php_info_print_table_row(2, "Why not attached", tt_last_error);
    }
    TT_UNLOCK();
    php_info_print_table_end();
    DISPLAY_INI_ENTRIES();
}

ZEND_BEGIN_ARG_WITH_RETURN_TYPE_INFO_EX(arginfo_trafficthreshold_hit, 0, 0, _IS_BOOL, 0)
    ZEND_ARG_TYPE_INFO_WITH_DEFAULT_VALUE(0, account, IS_STRING, 1, "null")
    ZEND_ARG_TYPE_INFO_WITH_DEFAULT_VALUE(0, event, IS_STRING, 0, "\"pageview\"")
    ZEND_ARG_TYPE_INFO_WITH_DEFAULT_VALUE(0, n, IS_LONG, 0, "1")
    ZEND_ARG_TYPE_INFO_WITH_DEFAULT_VALUE(0, status, IS_STRING, 1, "null")
ZEND_END_ARG_INFO()

ZEND_BEGIN_ARG_WITH_RETURN_TYPE_INFO_EX(arginfo_trafficthreshold_throttle_status, 0, 0, IS_LONG, 0)
ZEND_END_ARG_INFO()

ZEND_BEGIN_ARG_WITH_RETURN_TYPE_INFO_EX(arginfo_trafficthreshold_count, 0, 0, IS_LONG, 0)
    ZEND_ARG_TYPE_INFO_WITH_DEFAULT_VALUE(0, account, IS_STRING, 1, "null")
    ZEND_ARG_TYPE_INFO_WITH_DEFAULT_VALUE(0, event, IS_STRING, 0, "\"pageview\"")
    ZEND_ARG_TYPE_INFO_WITH_DEFAULT_VALUE(0, window, IS_STRING, 0, "\"minute\"")
ZEND_END_ARG_INFO()

ZEND_BEGIN_ARG_WITH_RETURN_TYPE_INFO_EX(arginfo_trafficthreshold_info, 0, 0, IS_ARRAY, 0)
ZEND_END_ARG_INFO()

ZEND_BEGIN_ARG_WITH_RETURN_TYPE_INFO_EX(arginfo_trafficthreshold_is_page_view, 0, 1, _IS_BOOL, 0)
    ZEND_ARG_TYPE_INFO(0, status, IS_LONG, 0)
    ZEND_ARG_TYPE_INFO_WITH_DEFAULT_VALUE(0, content_type, IS_STRING, 1, "null")
    ZEND_ARG_TYPE_INFO_WITH_DEFAULT_VALUE(0, accept, IS_STRING, 1, "null")
    ZEND_ARG_TYPE_INFO_WITH_DEFAULT_VALUE(0, method, IS_STRING, 0, "\"GET\"")
    ZEND_ARG_TYPE_INFO_WITH_DEFAULT_VALUE(0, path, IS_STRING, 0, "\"/\"")
ZEND_END_ARG_INFO()

static const zend_function_entry trafficthreshold_functions[] = {
    PHP_FE(trafficthreshold_hit, arginfo_trafficthreshold_hit)
    PHP_FE(trafficthreshold_throttle_status, arginfo_trafficthreshold_throttle_status)
    PHP_FE(trafficthreshold_count, arginfo_trafficthreshold_count)
    PHP_FE(trafficthreshold_info, arginfo_trafficthreshold_info)
    PHP_FE(trafficthreshold_is_page_view, arginfo_trafficthreshold_is_page_view)
    PHP_FE_END
};

zend_module_entry trafficthreshold_module_entry = {
    STANDARD_MODULE_HEADER,
    "trafficthreshold",
    trafficthreshold_functions,
    PHP_MINIT(trafficthreshold),
    PHP_MSHUTDOWN(trafficthreshold),
    PHP_RINIT(trafficthreshold),
    PHP_RSHUTDOWN(trafficthreshold),
    PHP_MINFO(trafficthreshold),
    PHP_TRAFFICTHRESHOLD_VERSION,
    STANDARD_MODULE_PROPERTIES
};

#ifdef COMPILE_DL_TRAFFICTHRESHOLD
#ifdef ZTS
ZEND_TSRMLS_CACHE_DEFINE()
#endif
ZEND_GET_MODULE(trafficthreshold)
#endif

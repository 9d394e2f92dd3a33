/*
 * tt_pageview.c -- the page-view rule (docs/webapps.rst, "What counts as a
 * page view") in plain C, for the bindings without Python: the PHP
 * extension's request-end hook and libtrafficthreshold.  Included after
 * tt_core.c, like it.
 *
 * The same rule as pageviews.is_page_view (Python: ASGI, Django) and
 * _middleware.c (WSGI), over bytes: header values are taken as Latin-1, as
 * WSGI decodes them, so that "whitespace" is what Python's str.strip()
 * removes from such a string.  tests/test_core_ffi.py runs the shared table
 * tests/data/pageview_cases.json and random responses through this code
 * and through pageviews.py; php/tests/pageview_rule.phpt runs the table
 * through the PHP extension; tests/test_pageviews.py::test_static_tables
 * checks that the lists below are pageviews.py's.
 */
#include <ctype.h>
#include <stdlib.h>
#include <string.h>

/* A string and its length, for the tables below. */
typedef struct {
    const char *s;
    size_t n;
} tt_str;
#define TT_S(lit) {lit, sizeof(lit) - 1}

/* pageviews.STATIC_PREFIXES, HEALTH_PATHS and STATIC_EXTENSIONS. */
static const tt_str tt_static_prefixes[] = {TT_S("/static/"), TT_S("/media/")};
static const tt_str tt_health_paths[] = {
    TT_S("/health"), TT_S("/healthz"), TT_S("/health/"), TT_S("/ready"), TT_S("/readyz"),
    TT_S("/livez"), TT_S("/ping"), TT_S("/favicon.ico"), TT_S("/robots.txt")};
static const tt_str tt_static_extensions[] = {
    TT_S(".css"), TT_S(".js"), TT_S(".mjs"), TT_S(".map"), TT_S(".json"), TT_S(".xml"),
    TT_S(".txt"), TT_S(".pdf"), TT_S(".zip"), TT_S(".gz"),
    TT_S(".png"), TT_S(".jpg"), TT_S(".jpeg"), TT_S(".gif"), TT_S(".webp"), TT_S(".avif"),
    TT_S(".svg"), TT_S(".ico"), TT_S(".bmp"),
    TT_S(".woff"), TT_S(".woff2"), TT_S(".ttf"), TT_S(".otf"), TT_S(".eot"),
    TT_S(".mp3"), TT_S(".mp4"), TT_S(".webm"), TT_S(".ogg"), TT_S(".wav")};
#define TT_COUNT(a) (sizeof(a) / sizeof((a)[0]))
/* The longest health path: longer paths need no look at the table. */
#define TT_HEALTH_MAX 12

/* ASCII lower case of a byte, inline (tolower() is a call, and follows
 * the process's locale, which PHP may set).  Enough for comparing with the
 * tables' ASCII names: no Latin-1 letter outside ASCII lower-cases (in
 * Python's str.lower(), which pageviews.py uses) to an ASCII one. */
static inline unsigned char tt_ascii_lower(unsigned char ch)
{
    return ch >= 'A' && ch <= 'Z' ? (unsigned char)(ch | 0x20) : ch;
}

/* Whether a C string is "GET", inline. */
static inline int tt_is_get(const char *method)
{
    return method != NULL && method[0] == 'G' && method[1] == 'E' && method[2] == 'T'
        && method[3] == '\0';
}

/* What str.strip() removes from a Latin-1 string. */
static inline int tt_is_space(unsigned char ch)
{
    return ch == ' ' || (ch >= '\t' && ch <= '\r') || (ch >= 0x1c && ch <= 0x1f) || ch == 0x85
        || ch == 0xa0;
}

/* s[*start:*end] stripped of tt_is_space on both ends. */
static void tt_strip(const char *s, size_t *start, size_t *end)
{
    while (*start < *end && tt_is_space((unsigned char)s[*start])) ++*start;
    while (*end > *start && tt_is_space((unsigned char)s[*end - 1])) --*end;
}

/* Whether s[start:end], lower-cased (ASCII), is an HTML media type. */
static int tt_is_html_type(const char *s, size_t start, size_t end)
{
    static const tt_str types[] = {TT_S("text/html"), TT_S("application/xhtml+xml")};
    for (size_t t = 0; t < TT_COUNT(types); t++) {
        size_t n = types[t].n, i = 0;
        if (end - start != n)
            continue;
        while (i < n && tt_ascii_lower((unsigned char)s[start + i]) == (unsigned char)types[t].s[i]) i++;
        if (i == n)
            return 1;
    }
    return 0;
}

/* The media type of a Content-Type value (the part before ';', stripped):
 * *start and *end delimit it in `ct`; empty when start == end. */
static void tt_media_type(const char *ct, size_t len, size_t *start, size_t *end)
{
    const char *semi = memchr(ct, ';', len);
    *start = 0;
    *end = semi == NULL ? len : (size_t)(semi - ct);
    tt_strip(ct, start, end);
}

/* Python's float(text) <= 0 over a stripped value: 1 if it is a number <= 0,
 * 0 if a number > 0 (or nan), -1 if not a number (float() raises). */
static int tt_q_zero(const char *s, size_t start, size_t end)
{
    char buf[64], *stop;
    double v;
    tt_strip(s, &start, &end);
    if (start == end || end - start >= sizeof buf)
        return -1;
    memcpy(buf, s + start, end - start);
    buf[end - start] = '\0';
    /* strtod reads hex ("0x0"), which float() refuses. */
    if (strpbrk(buf, "xXpP") != NULL && strpbrk(buf, "nN") == NULL)
        return -1;
    v = strtod(buf, &stop);
    if (*stop != '\0')
        return -1;
    return v <= 0;
}

/* pageviews.accepts_html: an Accept value that lists text/html or
 * application/xhtml+xml, not with q=0 (nor only the wildcard type). */
static int tt_accepts_html(const char *accept, size_t len)
{
    size_t item = 0;
    if (accept == NULL)
        return 0;
    while (item <= len) {
        const char *comma = memchr(accept + item, ',', len - item);
        size_t item_end = comma == NULL ? len : (size_t)(comma - accept);
        const char *semi = memchr(accept + item, ';', item_end - item);
        size_t ks = item, ke = semi == NULL ? item_end : (size_t)(semi - accept);
        tt_strip(accept, &ks, &ke);
        if (tt_is_html_type(accept, ks, ke)) {
            int refused = 0;
            size_t p = semi == NULL ? item_end : (size_t)(semi - accept);
            /* Each ";name=value" parameter: a q of 0 or less refuses it. */
            while (semi != NULL && p < item_end && !refused) {
                size_t ps = p + 1, pe;
                const char *next = memchr(accept + ps, ';', item_end - ps);
                pe = next == NULL ? item_end : (size_t)(next - accept);
                const char *eq = memchr(accept + ps, '=', pe - ps);
                size_t ns = ps, ne = eq == NULL ? pe : (size_t)(eq - accept);
                tt_strip(accept, &ns, &ne);
                /* float("") raises: a bare "q" refuses nothing. */
                if (ne - ns == 1 && (accept[ns] == 'q' || accept[ns] == 'Q') && eq != NULL
                    && tt_q_zero(accept, (size_t)(eq - accept) + 1, pe) == 1)
                    refused = 1;
                p = pe;
            }
            if (!refused)
                return 1;
        }
        if (comma == NULL)
            break;
        item = item_end + 1;
    }
    return 0;
}

/* pageviews.is_page_response: a 2xx with an HTML Content-Type, or a 304
 * with an HTML one, or with none when Accept lists HTML.  content_type
 * NULL: no such header; accept NULL: none. */
static int tt_is_page_response(int status, const char *ct, size_t ct_len, const char *accept,
                               size_t accept_len)
{
    size_t s = 0, e = 0;
    if (ct != NULL)
        tt_media_type(ct, ct_len, &s, &e);
    if (status >= 200 && status < 300)
        return e > s && tt_is_html_type(ct, s, e);
    if (status == 304)
        return e > s ? tt_is_html_type(ct, s, e) : tt_accepts_html(accept, accept_len);
    return 0;
}

/* pageviews.is_excluded_path: a health path, a static prefix, or a last
 * segment whose extension (from its last '.', any case) is an asset's. */
static int tt_excluded_path(const char *path, size_t len)
{
    const char *dot = NULL;
    char ext[8];
    size_t n;
    if (len <= TT_HEALTH_MAX)
        for (size_t i = 0; i < TT_COUNT(tt_health_paths); i++)
            if (tt_health_paths[i].n == len && memcmp(tt_health_paths[i].s, path, len) == 0)
                return 1;
    for (size_t i = 0; i < TT_COUNT(tt_static_prefixes); i++) {
        n = tt_static_prefixes[i].n;
        if (len >= n && memcmp(tt_static_prefixes[i].s, path, n) == 0)
            return 1;
    }
    /* The last '.', if it comes after the last '/'. */
    for (size_t i = len; i > 0 && path[i - 1] != '/'; i--)
        if (path[i - 1] == '.') {
            dot = path + i - 1;
            break;
        }
    if (dot == NULL)
        return 0;
    n = (size_t)(path + len - dot);
    if (n > sizeof ext)
        return 0;
    for (size_t i = 0; i < n; i++)
        ext[i] = (char)tt_ascii_lower((unsigned char)dot[i]);
    for (size_t i = 0; i < TT_COUNT(tt_static_extensions); i++)
        if (tt_static_extensions[i].n == n && memcmp(tt_static_extensions[i].s, ext, n) == 0)
            return 1;
    return 0;
}

/* pageviews.is_page_view: GET, a page response, not excluded. */
static TT_UNUSED int tt_is_page_view(const char *method, const char *path, size_t path_len,
                                     int status, const char *ct, size_t ct_len,
                                     const char *accept, size_t accept_len)
{
    return tt_is_get(method)
        && tt_is_page_response(status, ct, ct_len, accept, accept_len)
        && !tt_excluded_path(path, path_len);
}

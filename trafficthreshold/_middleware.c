/*
 * _middleware.c -- the per-request path of the WSGI middleware, and the
 * page-view path rule, in C.
 *
 * Why C: a page served by gunicorn costs about 500,000 instructions; the
 * middleware written in Python cost 9,700 more (+1.95 %), almost all of it
 * Python frames and a closure per request (the hit itself is ~250
 * instructions).  Here the middleware's call, the method/path check and the
 * start_response wrapper are C, and the request pays a few hundred
 * instructions on top of the application (benchmarks/
 * bench_middleware_instructions.py measures it; docs/webapps.rst has the
 * figures).
 *
 * What is NOT here: the rule's data (pageviews.py owns the tables and hands
 * them to _setup() once, at import), what an HTML media type is (a memo
 * dict filled by pageviews.is_html, which is called on a miss), accounts
 * (the Python record(environ) of pageviews.make_recorder), count_if
 * predicates (the Python method _count_if), and logging (the Python method
 * _failed).  The segment is reached only through trafficthreshold.hit and
 * throttle_status (_counter.c), called as ordinary callables.
 *
 * Contract of the middleware (wsgi.TrafficThreshold is its Python face):
 * it never changes the response (but for the day cookie of uniques,
 * below), never raises into a request (every error
 * of its own is handed to self._failed(kind, exc) and dropped; only
 * BaseExceptions that are not Exceptions, e.g. KeyboardInterrupt, pass),
 * and counts at most once per request, by the response's final status:
 *
 * - start_response only remembers the status and headers of its latest
 *   call (PEP 3333 lets an application call it again with exc_info, e.g.
 *   200 restarted as 500, as long as no body byte was sent);
 * - when the application returns its body iterable, nothing of it has been
 *   sent (the server has not seen it yet), so the status remembered then is
 *   the one the client gets if the body is a list (or a tuple, an iterable
 *   with a length, the server's file_wrapper: sent_as_is()): the request is
 *   decided and counted there, before the body is returned to the server
 *   (settle());
 * - an application that has not called start_response by then (a
 *   generator: it starts its response while the server iterates) gets its
 *   body wrapped in a Body, which settles at the first non-empty chunk (the
 *   server sends the headers with it) or at the end of an empty body; so
 *   does one that called it but returned a body still to be produced (a
 *   generator, an iterator: sent_as_is()), which may raise before its first
 *   byte, the server then answering 500 (5xx never count);
 * - an application that raises is not counted (the server answers 500).
 *
 * Unique visitors (an option: self.uniques, a pageviews.UniqueCookie): the
 * day cookie must reach the server with the headers, so with it on each
 * start_response call is decided when it is made, before it is passed on:
 * a page view (by that call's status and headers) whose request does not
 * carry today's cookie gets a copy of the headers with the Set-Cookie
 * added, and is marked unique.  A later call (exc_info: 200 restarted as
 * 500) is decided afresh and replaces the headers at the server, so a
 * cookie of a call that did not stand is never sent.  settle() then uses
 * the verdict of the latest accepted call and counts "unique" after the
 * page view if that call carried the cookie.  The day (its stamp and the
 * cookie's values) is computed in Python once per second of the clock
 * (day()); the request that finds today's cookie pays a lookup in the
 * environ and a substring search (has_cookie()).
 */
#include <time.h>
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

/* ----------------------------------------------- set once by _setup() */

static PyObject *health_paths;       /* frozenset of str: exact paths */
static PyObject *static_prefixes;    /* tuple of str: path prefixes */
static PyObject *static_extensions;  /* frozenset of lower-case str, with the dot */
static PyObject *counted_methods;    /* frozenset of str */
static PyObject *html_memo;          /* dict: Content-Type value -> bool */
static PyObject *is_html_cb;         /* is_html(value) -> bool, fills html_memo */
static PyObject *accepts_html_cb;    /* accepts_html(accept) -> bool: a 304 without type */
static PyObject *hit_cb;             /* trafficthreshold.hit */
static PyObject *throttle_status_cb; /* trafficthreshold.throttle_status */

/* Interned at module init. */
static PyObject *str_request_method, *str_path_info, *str_http_accept, *str_failed;
static PyObject *str_count_if, *str_close, *str_file_wrapper, *str_read;
static PyObject *str_level, *str_hit, *str_decide;
static PyObject *str_http_cookie, *str_url_scheme, *str_https, *str_at, *str_unique;
static PyObject *str_set_cookie;

/* Longest extension looked up (with the dot); longer ones are not assets.
 * Bounds the stack buffer below. */
#define EXT_MAX 16

/* ------------------------------------------------------- the path rule */

/* 1 if `path` (a str) is a static file or a health check, 0 if not, -1
 * with an exception set.  Same rule as the docstring of
 * pageviews.is_excluded_path: an exact health path, a static prefix, or an
 * extension of the last path segment in static_extensions (compared lower
 * case). */
static int excluded(PyObject *path)
{
    Py_ssize_t len, dot, slash, i;
    PyObject *ext;
    int rc;
    if (health_paths == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "_middleware._setup() was not called");
        return -1;
    }
    if ((rc = PySet_Contains(health_paths, path)) != 0)
        return rc;
    len = PyUnicode_GET_LENGTH(path);
    for (i = 0; i < PyTuple_GET_SIZE(static_prefixes); i++) {
        rc = (int)PyUnicode_Tailmatch(path, PyTuple_GET_ITEM(static_prefixes, i), 0, len, -1);
        if (rc != 0)
            return rc;
    }
    dot = PyUnicode_FindChar(path, '.', 0, len, -1);
    if (dot < 0)
        return dot == -1 ? 0 : -1;
    slash = PyUnicode_FindChar(path, '/', 0, len, -1);
    if (slash == -2)
        return -1;
    if (dot < slash)
        return 0;
    if (PyUnicode_IS_ASCII(path)) {
        /* ASCII: lower-case into a buffer (what str.lower() does to ASCII). */
        char buf[EXT_MAX];
        const char *s = (const char *)PyUnicode_DATA(path) + dot;
        Py_ssize_t n = len - dot;
        if (n > EXT_MAX)
            return 0;
        for (i = 0; i < n; i++)
            buf[i] = (s[i] >= 'A' && s[i] <= 'Z') ? (char)(s[i] + 32) : s[i];
        ext = PyUnicode_FromStringAndSize(buf, n);
    } else {
        /* Rare: str.lower() itself (a few non-ASCII letters lower to ASCII). */
        PyObject *raw = PyUnicode_Substring(path, dot, len);
        ext = raw == NULL ? NULL : PyObject_CallMethod(raw, "lower", NULL);
        Py_XDECREF(raw);
    }
    if (ext == NULL)
        return -1;
    rc = PySet_Contains(static_extensions, ext);
    Py_DECREF(ext);
    return rc;
}

static PyObject *mod_excluded_path(PyObject *self, PyObject *path)
{
    int rc;
    if (!PyUnicode_Check(path)) {
        PyErr_Format(PyExc_TypeError, "path must be str, not %.80s", Py_TYPE(path)->tp_name);
        return NULL;
    }
    if ((rc = excluded(path)) < 0)
        return NULL;
    return PyBool_FromLong(rc);
}

/* -------------------------------------------------------- the middleware */

typedef struct {
    PyObject_HEAD
    PyObject *app;
    PyObject *record;       /* record(environ), or NULL: hit(None, event) */
    PyObject *event;        /* str */
    PyObject *environ_key;  /* str, or NULL: the level goes nowhere */
    int count_if;           /* 1: self._count_if(environ, status, headers) decides */
    PyObject *uniques;      /* a pageviews.UniqueCookie, or NULL: no unique counting */
    PyObject *unique_record;/* record(environ) of the "unique" event (never raises) */
    PyObject *unique_clock; /* clock() -> epoch seconds, or NULL: time(NULL) */
    long long day_second;   /* the clock's second the three below are for */
    PyObject *day_needle;   /* "tt_day=20261201", or NULL: not computed yet */
    PyObject *day_cookie;   /* the Set-Cookie value */
    PyObject *day_cookie_secure;  /* the same with "; Secure" (https) */
} Middleware;

/* The start_response handed to the application: one per counted request.
 * It remembers the latest (status, headers); settle() decides on them. */
typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    Middleware *mw;
    PyObject *environ;
    PyObject *start_response;
    PyObject *status;       /* of the latest accepted call, or NULL: none yet */
    PyObject *headers;
    int settled;            /* 1: decided (counted or not); later calls are passed on */
    int page;               /* with uniques: the latest accepted call's verdict; -1: none */
    int unique;             /* with uniques: the latest accepted call carried the cookie */
} StartResponse;

/* The body of an application that starts its response while it is
 * iterated (a generator): settles at the first non-empty chunk. */
typedef struct {
    PyObject_HEAD
    StartResponse *sr;
    PyObject *iter;         /* iter(result) */
    PyObject *result;       /* the application's iterable, for close() */
} Body;

static PyTypeObject MiddlewareType, StartResponseType, BodyType;

/* Hands the pending exception to self._failed(kind, exc), which logs it,
 * and clears it.  Returns 0; or -1 leaving the exception set if it is not
 * an Exception (KeyboardInterrupt, SystemExit: those are not ours to stop). */
static int report(Middleware *mw, PyObject *kind)
{
    PyObject *type, *value, *tb, *r;
    if (!PyErr_ExceptionMatches(PyExc_Exception))
        return -1;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (tb != NULL && value != NULL)
        PyException_SetTraceback(value, tb);
    r = PyObject_CallMethodObjArgs((PyObject *)mw, str_failed, kind,
                                   value ? value : Py_None, NULL);
    if (r == NULL)
        PyErr_Clear();  /* the logger failed too: nothing left to tell */
    Py_XDECREF(r);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
    return 0;
}

/* Counts one page view of `environ`.  0, or -1 with a BaseException set. */
static int count(Middleware *mw, PyObject *environ)
{
    PyObject *r;
    if (mw->record != NULL) {
        r = PyObject_Vectorcall(mw->record, &environ, 1, NULL);
    } else {
        PyObject *args[2] = {Py_None, mw->event};
        r = PyObject_Vectorcall(hit_cb, args, 2, NULL);
    }
    if (r == NULL)
        return report(mw, str_hit);
    Py_DECREF(r);
    return 0;
}

/* Whether 12 ASCII bytes spell "content-type" in any case.  Header names
 * are ASCII (RFC 9110), and no non-ASCII letter lowers to one of these, so
 * this is name.lower() == "content-type".  The usual spelling costs one
 * memcmp. */
static inline int is_content_type(const void *name)
{
    static const char lower[] = "content-type";
    const unsigned char *s = name;
    if (memcmp(s, "Content-Type", 12) == 0)
        return 1;
    for (int i = 0; i < 12; i++)
        if ((s[i] >= 'A' && s[i] <= 'Z' ? s[i] + 32 : s[i]) != lower[i])
            return 0;
    return 1;
}

/* Whether a status line is "304" or "304 ..." (Not Modified). */
static int is_not_modified(PyObject *status)
{
    Py_ssize_t len = PyUnicode_GET_LENGTH(status);
    return len >= 3 && PyUnicode_READ_CHAR(status, 1) == '0'
        && PyUnicode_READ_CHAR(status, 2) == '4'
        && (len == 3 || PyUnicode_READ_CHAR(status, 3) == ' ');
}

/* 1 if the Content-Type value `value` has no media type: empty, blank, or
 * parameters only (";charset=utf-8"), as pageviews.media_type() finds it
 * ("" after the part before ';' is stripped, str.strip()'s whitespace). */
static int no_media_type(PyObject *value)
{
    Py_ssize_t i, n;
    Py_UCS4 ch;
    if (!PyUnicode_Check(value))
        return 0;
    n = PyUnicode_GET_LENGTH(value);
    for (i = 0; i < n; i++) {
        ch = PyUnicode_READ_CHAR(value, i);
        if (ch == ';')
            return 1;
        if (!Py_UNICODE_ISSPACE(ch))
            return 0;
    }
    return 1;
}

/* 1 if the response is a page view by its status and type (the default
 * rule, pageviews.is_page_response; the method and path were checked
 * before the application ran), 0 if not, -1 with an exception set:
 * a 2xx with an HTML Content-Type (the first one); a 304 with an HTML
 * Content-Type, or with none (Django and Werkzeug drop it from a 304; an
 * empty value or parameters only count as none) when the request's
 * Accept lists HTML (accepts_html: a browser loading a
 * page, not an image or a fetch()).  Other 3xx: never (the page is the
 * redirect's target, counted when it is served). */
static int is_page(PyObject *status, PyObject *headers, PyObject *environ)
{
    PyObject *seq, *item, *name, *value, *known, *accept;
    Py_UCS4 first;
    Py_ssize_t i, n;
    int rc = 0, not_modified, found = 0;
    if (!PyUnicode_Check(status) || PyUnicode_GET_LENGTH(status) < 1)
        return 0;
    first = PyUnicode_READ_CHAR(status, 0);
    if (first == '2')
        not_modified = 0;
    else if (first == '3' && is_not_modified(status))
        not_modified = 1;
    else
        return 0;
    if ((seq = PySequence_Fast(headers, "response headers must be a list")) == NULL)
        return -1;
    n = PySequence_Fast_GET_SIZE(seq);
    for (i = 0; i < n; i++) {
        item = PySequence_Fast_GET_ITEM(seq, i);
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2) {
            PyErr_SetString(PyExc_TypeError, "response headers must be (name, value) tuples");
            rc = -1;
            break;
        }
        name = PyTuple_GET_ITEM(item, 0);
        if (!PyUnicode_Check(name) || PyUnicode_GET_LENGTH(name) != 12
            || !PyUnicode_IS_ASCII(name) || !is_content_type(PyUnicode_DATA(name)))
            continue;
        /* Why the reference: hashing a str subclass or is_html() runs
         * Python code, which could drop the list's last hold on the pair. */
        Py_INCREF(item);
        value = PyTuple_GET_ITEM(item, 1);
        found = !no_media_type(value);
        known = PyDict_GetItemWithError(html_memo, value);  /* borrowed */
        if (known != NULL) {
            rc = known == Py_True ? 1 : PyObject_IsTrue(known);
        } else if (PyErr_Occurred()) {
            rc = -1;
        } else if ((known = PyObject_Vectorcall(is_html_cb, &value, 1, NULL)) == NULL) {
            rc = -1;
        } else {
            rc = PyObject_IsTrue(known);
            Py_DECREF(known);
        }
        Py_DECREF(item);
        break;
    }
    Py_DECREF(seq);
    if (!found && not_modified && rc == 0) {
        accept = PyDict_GetItemWithError(environ, str_http_accept);  /* borrowed */
        if (accept == NULL && PyErr_Occurred())
            return -1;
        if (accept == NULL)
            accept = Py_None;
        Py_INCREF(accept);
        known = PyObject_Vectorcall(accepts_html_cb, &accept, 1, NULL);
        Py_DECREF(accept);
        if (known == NULL)
            return -1;
        rc = PyObject_IsTrue(known);
        Py_DECREF(known);
    }
    return rc;
}

/* Decides whether the request is a page view, by the latest status and
 * headers start_response accepted, and counts it if so; once (the
 * StartResponse is settled).  0, or -1 with a BaseException set. */
static int settle(StartResponse *sr)
{
    Middleware *mw = sr->mw;
    PyObject *status = sr->status, *headers = sr->headers, *r;
    int page, rc;
    sr->settled = 1;
    if (status == NULL)
        return 0;  /* start_response never called: nothing to count */
    sr->status = sr->headers = NULL;  /* ours now */
    if (sr->page >= 0) {
        page = sr->page;  /* uniques: decided when start_response was called */
    } else if (mw->count_if) {
        r = PyObject_CallMethodObjArgs((PyObject *)mw, str_count_if, sr->environ,
                                       status, headers, NULL);
        page = r == NULL ? -1 : PyObject_IsTrue(r);
        Py_XDECREF(r);
    } else {
        page = is_page(status, headers, sr->environ);
    }
    rc = 0;
    if ((page < 0 && report(mw, str_decide) < 0) || (page > 0 && count(mw, sr->environ) < 0))
        rc = -1;
    else if (page > 0 && sr->unique) {
        /* The cookie went out with these headers: the visitor's first page
         * view of the day.  unique_record never raises an Exception. */
        r = PyObject_Vectorcall(mw->unique_record, &sr->environ, 1, NULL);
        if (r == NULL)
            rc = report(mw, str_unique);
        Py_XDECREF(r);
    }
    Py_DECREF(status);
    Py_DECREF(headers);
    return rc;
}

/* The day's values for the clock's current second: computed by
 * uniques.at(second) when the second changes, else the cached ones.  0, or
 * -1 with an exception set. */
static int day(Middleware *mw)
{
    long long now;
    PyObject *r, *second;
    if (mw->unique_clock == NULL) {
        now = (long long)time(NULL);
    } else {
        if ((r = PyObject_CallNoArgs(mw->unique_clock)) == NULL)
            return -1;
        second = PyNumber_Long(r);  /* int(clock()): floors a positive float */
        Py_DECREF(r);
        if (second == NULL)
            return -1;
        now = PyLong_AsLongLong(second);
        Py_DECREF(second);
        if (now == -1 && PyErr_Occurred())
            return -1;
    }
    if (now == mw->day_second && mw->day_needle != NULL)
        return 0;
    if ((second = PyLong_FromLongLong(now)) == NULL)
        return -1;
    r = PyObject_CallMethodOneArg(mw->uniques, str_at, second);
    Py_DECREF(second);
    if (r == NULL)
        return -1;
    if (!PyTuple_Check(r) || PyTuple_GET_SIZE(r) != 3
        || !PyUnicode_Check(PyTuple_GET_ITEM(r, 0)) || !PyUnicode_Check(PyTuple_GET_ITEM(r, 1))
        || !PyUnicode_Check(PyTuple_GET_ITEM(r, 2))) {
        Py_DECREF(r);
        PyErr_SetString(PyExc_TypeError, "UniqueCookie.at() must return three str");
        return -1;
    }
    Py_XSETREF(mw->day_needle, Py_NewRef(PyTuple_GET_ITEM(r, 0)));
    Py_XSETREF(mw->day_cookie, Py_NewRef(PyTuple_GET_ITEM(r, 1)));
    Py_XSETREF(mw->day_cookie_secure, Py_NewRef(PyTuple_GET_ITEM(r, 2)));
    mw->day_second = now;
    Py_DECREF(r);
    return 0;
}

/* 1 if the Cookie header `header` (a str) holds the pair `needle`
 * ("name=value") exactly, 0 if not, -1 with an exception set.  Same rule
 * as pageviews.has_cookie: a match must start the header or follow ';' or
 * a space, and end it or be followed by ';' or a space. */
static int has_cookie(PyObject *header, PyObject *needle)
{
    Py_ssize_t len = PyUnicode_GET_LENGTH(header), n = PyUnicode_GET_LENGTH(needle);
    Py_ssize_t at = 0, end;
    Py_UCS4 c;
    while ((at = PyUnicode_Find(header, needle, at, len, 1)) >= 0) {
        end = at + n;
        if ((at == 0 || (c = PyUnicode_READ_CHAR(header, at - 1)) == ';' || c == ' ')
            && (end == len || (c = PyUnicode_READ_CHAR(header, end)) == ';' || c == ' '))
            return 1;
        at++;
    }
    return at == -1 ? 0 : -1;
}

/* The Set-Cookie value for a page view of `environ` (a new reference), or
 * Py_None (a new reference) if the request carries today's cookie: not a
 * unique visitor.  NULL with an exception set. */
static PyObject *unique_cookie(Middleware *mw, PyObject *environ)
{
    PyObject *cookie, *scheme, *needle;
    int rc, secure;
    if (day(mw) < 0)
        return NULL;
    cookie = PyDict_GetItemWithError(environ, str_http_cookie);  /* borrowed */
    if (cookie == NULL && PyErr_Occurred())
        return NULL;
    if (cookie != NULL && PyUnicode_Check(cookie)) {
        /* Why the references: nothing below runs Python code today, but
         * the environ and the cache must outlive the search regardless. */
        Py_INCREF(cookie);
        needle = Py_NewRef(mw->day_needle);
        rc = has_cookie(cookie, needle);
        Py_DECREF(needle);
        Py_DECREF(cookie);
        if (rc != 0)
            return rc < 0 ? NULL : Py_NewRef(Py_None);
    }
    scheme = PyDict_GetItemWithError(environ, str_url_scheme);  /* borrowed */
    if (scheme == NULL && PyErr_Occurred())
        return NULL;
    secure = scheme != NULL && PyUnicode_Check(scheme)
        && PyUnicode_Compare(scheme, str_https) == 0;
    return Py_NewRef(secure ? mw->day_cookie_secure : mw->day_cookie);
}

/* With uniques: the verdict on one start_response call (1 a page view,
 * 0 not; an error is reported and reads as 0), and in *cookie the
 * Set-Cookie value to add (a new reference) or NULL.  0, or -1 with a
 * BaseException set. */
static int decide_call(StartResponse *sr, PyObject *status, PyObject *headers, int *page,
                       PyObject **cookie)
{
    Middleware *mw = sr->mw;
    PyObject *r;
    *cookie = NULL;
    if (mw->count_if) {
        r = PyObject_CallMethodObjArgs((PyObject *)mw, str_count_if, sr->environ,
                                       status, headers, NULL);
        *page = r == NULL ? -1 : PyObject_IsTrue(r);
        Py_XDECREF(r);
    } else {
        *page = is_page(status, headers, sr->environ);
    }
    if (*page < 0) {
        *page = 0;
        return report(mw, str_decide);
    }
    if (*page == 0)
        return 0;
    if ((r = unique_cookie(mw, sr->environ)) == NULL)
        return report(mw, str_unique);  /* the page view still counts */
    if (r == Py_None)
        Py_DECREF(r);
    else
        *cookie = r;
    return 0;
}

/* A copy of `headers` with ("Set-Cookie", cookie) appended (a new list),
 * or NULL with an exception set.  The application's list is not touched. */
static PyObject *with_cookie(PyObject *headers, PyObject *cookie)
{
    PyObject *copy, *pair;
    int rc;
    if ((copy = PySequence_List(headers)) == NULL)
        return NULL;
    if ((pair = PyTuple_Pack(2, str_set_cookie, cookie)) == NULL) {
        Py_DECREF(copy);
        return NULL;
    }
    rc = PyList_Append(copy, pair);
    Py_DECREF(pair);
    if (rc < 0)
        Py_CLEAR(copy);
    return copy;
}

/* StartResponse.__call__(status, headers, exc_info=None): the server's
 * start_response, called with the arguments as they are (the server's
 * errors, e.g. an exc_info call after the headers were sent, reach the
 * application as without the middleware), its write() returned.  If the
 * server accepted the call, its status and headers are remembered: the
 * latest accepted call before settle() decides.  With uniques, a call
 * that binds is decided first (decide_call()) and, if it is a unique
 * visitor's page view, passed on with the day cookie added to a copy of
 * its headers (the argument that holds them replaced, nothing else). */
static PyObject *StartResponse_call(StartResponse *self, PyObject *const *args,
                                    size_t nargsf, PyObject *kwnames)
{
    static const char *const names[3] = {"status", "headers", "exc_info"};
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf), nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    PyObject *bound[3] = {NULL, NULL, NULL}, *write, *cookie = NULL, *headers;
    PyObject *given[8];  /* bounded: a call that binds has at most 3 arguments */
    Py_ssize_t i, j, where = -1;
    int page = -1, unique = 0;
    if (self->settled)
        return PyObject_Vectorcall(self->start_response, args, nargsf, kwnames);
    /* Bind the arguments as def start_response(status, headers,
     * exc_info=None) would; a call that does not bind is passed on and not
     * remembered. */
    if (nargs > 3)
        goto pass;
    for (i = 0; i < nargs; i++)
        bound[i] = args[i];
    for (i = 0; i < nkw; i++) {
        for (j = 0; j < 3; j++)
            if (PyUnicode_CompareWithASCIIString(PyTuple_GET_ITEM(kwnames, i), names[j]) == 0)
                break;
        if (j == 3 || bound[j] != NULL)
            goto pass;
        bound[j] = args[nargs + i];
        if (j == 1)
            where = nargs + i;
    }
    if (bound[0] == NULL || bound[1] == NULL)
        goto pass;
    if (where < 0)
        where = 1;  /* positional */
    if (self->mw->uniques == NULL) {
        write = PyObject_Vectorcall(self->start_response, args, nargsf, kwnames);
    } else {
        if (decide_call(self, bound[0], bound[1], &page, &cookie) < 0)
            return NULL;
        if (cookie != NULL && (headers = with_cookie(bound[1], cookie)) == NULL) {
            Py_CLEAR(cookie);
            if (report(self->mw, str_unique) < 0)
                return NULL;
        }
        if (cookie == NULL) {
            write = PyObject_Vectorcall(self->start_response, args, nargsf, kwnames);
        } else {
            for (i = 0; i < nargs + nkw; i++)
                given[i] = args[i];
            given[where] = headers;
            write = PyObject_Vectorcall(self->start_response, given, nargs, kwnames);
            Py_DECREF(headers);
            Py_DECREF(cookie);
            unique = 1;
        }
    }
    if (write == NULL || self->settled)  /* refused; or the server settled us */
        return write;
    Py_XSETREF(self->status, Py_NewRef(bound[0]));
    Py_XSETREF(self->headers, Py_NewRef(bound[1]));
    self->page = page;
    self->unique = unique;
    return write;
pass:
    return PyObject_Vectorcall(self->start_response, args, nargsf, kwnames);
}

static int StartResponse_traverse(StartResponse *self, visitproc visit, void *arg)
{
    Py_VISIT(self->mw);
    Py_VISIT(self->environ);
    Py_VISIT(self->start_response);
    Py_VISIT(self->status);
    Py_VISIT(self->headers);
    return 0;
}

static int StartResponse_clear(StartResponse *self)
{
    Py_CLEAR(self->mw);
    Py_CLEAR(self->environ);
    Py_CLEAR(self->start_response);
    Py_CLEAR(self->status);
    Py_CLEAR(self->headers);
    return 0;
}

static void StartResponse_dealloc(StartResponse *self)
{
    PyObject_GC_UnTrack(self);
    StartResponse_clear(self);
    PyObject_GC_Del(self);
}

static PyTypeObject StartResponseType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "trafficthreshold._middleware.StartResponse",
    .tp_basicsize = sizeof(StartResponse),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "The start_response an application receives: the server's, counting.",
    .tp_vectorcall_offset = offsetof(StartResponse, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_traverse = (traverseproc)StartResponse_traverse,
    .tp_clear = (inquiry)StartResponse_clear,
    .tp_dealloc = (destructor)StartResponse_dealloc,
};

/* ------------------------------------------------ Body (generators) */

/* Body.__next__: the application's next chunk.  The first non-empty one
 * is about to be sent with the headers, so the status is final: settle
 * first.  At the end of an empty body, settle too (the server sends the
 * headers then).  An iteration that raises settles without counting (the
 * server answers 500, or breaks the connection). */
static PyObject *Body_next(Body *self)
{
    StartResponse *sr = self->sr;
    PyObject *chunk = PyIter_Next(self->iter);
    if (sr->settled)
        return chunk;
    if (chunk != NULL) {
        if (sr->status != NULL && (!PyBytes_Check(chunk) || PyBytes_GET_SIZE(chunk) > 0)
            && settle(sr) < 0) {
            Py_DECREF(chunk);
            return NULL;
        }
        return chunk;
    }
    if (PyErr_Occurred())
        sr->settled = 1;
    else
        settle(sr);  /* -1 leaves a BaseException set: NULL passes it on */
    return NULL;
}

/* Body.close(): the application's close(), if it has one.  Nothing is
 * counted after it. */
static PyObject *Body_close(Body *self, PyObject *unused)
{
    PyObject *close, *r;
    self->sr->settled = 1;
    if ((close = PyObject_GetAttr(self->result, str_close)) == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_AttributeError))
            return NULL;
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    r = PyObject_CallNoArgs(close);
    Py_DECREF(close);
    return r;
}

static int Body_traverse(Body *self, visitproc visit, void *arg)
{
    Py_VISIT(self->sr);
    Py_VISIT(self->iter);
    Py_VISIT(self->result);
    return 0;
}

static int Body_clear(Body *self)
{
    Py_CLEAR(self->sr);
    Py_CLEAR(self->iter);
    Py_CLEAR(self->result);
    return 0;
}

static void Body_dealloc(Body *self)
{
    PyObject_GC_UnTrack(self);
    Body_clear(self);
    PyObject_GC_Del(self);
}

static PyMethodDef Body_methods[] = {
    {"close", (PyCFunction)Body_close, METH_NOARGS, "the application's close()"},
    {NULL}
};

static PyTypeObject BodyType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "trafficthreshold._middleware.Body",
    .tp_basicsize = sizeof(Body),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The body of an application that starts its response when iterated.",
    .tp_iter = PyObject_SelfIter,
    .tp_iternext = (iternextfunc)Body_next,
    .tp_methods = Body_methods,
    .tp_traverse = (traverseproc)Body_traverse,
    .tp_clear = (inquiry)Body_clear,
    .tp_dealloc = (destructor)Body_dealloc,
};

/* The application returned `result` (a new reference, taken over) without
 * calling start_response: a Body around it; or `result` itself if it is
 * not iterable (the server's error, as without the middleware). */
static PyObject *wrap_body(StartResponse *sr, PyObject *result)
{
    Body *body;
    PyObject *iter = PyObject_GetIter(result);
    if (iter == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_Exception))
            return NULL;
        PyErr_Clear();
        sr->settled = 1;
        return result;
    }
    if ((body = PyObject_GC_New(Body, &BodyType)) == NULL) {
        Py_DECREF(iter);
        Py_DECREF(result);
        return NULL;
    }
    body->sr = (StartResponse *)Py_NewRef(sr);
    body->iter = iter;
    body->result = result;
    PyObject_GC_Track(body);
    return (PyObject *)body;
}

/* 1 if the body `result` of an application that started its response in
 * its call goes to the server as it is, and the request is decided now;
 * 0 if it is wrapped in a Body and decided at its first non-empty chunk.
 * As it is: a list or tuple (its chunks exist already: iterating it cannot
 * fail), an iterable with a length (the server may read len() to set
 * Content-Length: a Body would hide it), and the server's wsgi.file_wrapper
 * (the server recognizes it by its type, to send the file its own way).
 * A server whose file_wrapper is a function, not a class (uWSGI: it returns
 * the very file it was given, and sends it with sendfile() only when the
 * application returns that object), cannot be checked by type: there a
 * body with a read attribute (a file-like object, what PEP 3333 lets an
 * application hand to file_wrapper) goes as it is: uWSGI sendfile()s a
 * real file, and read()s any other file-like object it returned (an
 * io.BytesIO, an object with read() and close() only, not iterable: a
 * Body around it would fail, and the page would go uncounted).
 * Anything else (a generator, an iterator) may still raise before its first
 * byte, and the server then answers 500: not a page view.  Never fails: a
 * check that raises means "as it is". */
static int sent_as_is(PyObject *result, PyObject *environ)
{
    PyTypeObject *type = Py_TYPE(result);
    PyObject *wrapper, *attr;
    int rc;
    if (PyList_CheckExact(result) || PyTuple_CheckExact(result)
        || (type->tp_as_sequence != NULL && type->tp_as_sequence->sq_length != NULL)
        || (type->tp_as_mapping != NULL && type->tp_as_mapping->mp_length != NULL))
        return 1;
    wrapper = PyDict_GetItemWithError(environ, str_file_wrapper);  /* borrowed */
    if (wrapper == NULL) {
        PyErr_Clear();
        return 0;
    }
    if (!PyType_Check(wrapper)) {
        /* Only for a function-style file_wrapper: a lookup per wrapped
         * body, never on the other servers' path. */
        if (!PyCallable_Check(wrapper))
            return 0;
        attr = PyObject_GetAttr(result, str_read);
        if (attr != NULL) {
            Py_DECREF(attr);
            return 1;
        }
        rc = !PyErr_ExceptionMatches(PyExc_AttributeError);  /* another error: as it is */
        PyErr_Clear();
        return rc;
    }
    if ((rc = PyObject_IsInstance(result, wrapper)) < 0) {
        PyErr_Clear();
        return 1;
    }
    return rc;
}

/* Puts the throttle level in environ[self.environ_key] (0 if it cannot be
 * read).  0, or -1 with a BaseException set. */
static int put_level(Middleware *mw, PyObject *environ)
{
    PyObject *level = PyObject_Vectorcall(throttle_status_cb, NULL, 0, NULL);
    int rc;
    if (level == NULL) {
        if (report(mw, str_level) < 0)
            return -1;
        level = PyLong_FromLong(0);  /* a small int: cannot fail */
    }
    rc = PyDict_SetItem(environ, mw->environ_key, level);
    Py_DECREF(level);
    return rc < 0 ? report(mw, str_level) : 0;
}

/* 1 if the request may be a page view by its method and path, 0 if it
 * certainly is not, -1 with an exception set. */
static int may_be_page(PyObject *environ)
{
    PyObject *method, *path;
    int rc;
    method = PyDict_GetItemWithError(environ, str_request_method);
    if (method == NULL || !PyUnicode_Check(method))
        return PyErr_Occurred() ? -1 : 0;
    if ((rc = PySet_Contains(counted_methods, method)) <= 0)
        return rc;
    path = PyDict_GetItemWithError(environ, str_path_info);
    if (path == NULL)
        return PyErr_Occurred() ? -1 : 1;  /* no PATH_INFO: the root */
    if (!PyUnicode_Check(path))
        return 0;
    rc = excluded(path);
    return rc < 0 ? -1 : !rc;
}

/* Middleware.__call__(environ, start_response) -> the application's body
 * iterable, returned as it is. */
static PyObject *Middleware_call(Middleware *mw, PyObject *args, PyObject *kwargs)
{
    PyObject *environ, *start_response, *app, *result;
    PyObject *call[2];
    StartResponse *wrapper;
    int page;
    if (kwargs != NULL && PyDict_GET_SIZE(kwargs) != 0) {
        PyErr_SetString(PyExc_TypeError, "TrafficThreshold(environ, start_response) "
                        "takes no keyword arguments");
        return NULL;
    }
    if (!PyArg_UnpackTuple(args, "TrafficThreshold", 2, 2, &environ, &start_response))
        return NULL;
    if (mw->app == NULL) {
        PyErr_SetString(PyExc_TypeError, "TrafficThreshold: no application (app was deleted)");
        return NULL;
    }
    call[0] = environ;
    call[1] = start_response;
    /* Why the reference: the application may replace self.app while it runs. */
    app = Py_NewRef(mw->app);
    if (!PyDict_Check(environ)) {  /* not a WSGI server: stay out of the way */
        result = PyObject_Vectorcall(app, call, 2, NULL);
        goto done;
    }
    result = NULL;
    if (mw->environ_key != NULL && put_level(mw, environ) < 0)
        goto done;
    if (mw->count_if) {
        page = 1;  /* the predicate sees every request */
    } else if ((page = may_be_page(environ)) < 0) {
        if (report(mw, str_decide) < 0)
            goto done;
        page = 0;
    }
    if (!page) {  /* the server's own start_response, untouched */
        result = PyObject_Vectorcall(app, call, 2, NULL);
        goto done;
    }
    if ((wrapper = PyObject_GC_New(StartResponse, &StartResponseType)) == NULL)
        goto done;
    wrapper->vectorcall = (vectorcallfunc)StartResponse_call;
    wrapper->mw = (Middleware *)Py_NewRef(mw);
    wrapper->environ = Py_NewRef(environ);
    wrapper->start_response = Py_NewRef(start_response);
    wrapper->status = wrapper->headers = NULL;
    wrapper->settled = 0;
    wrapper->page = -1;
    wrapper->unique = 0;
    PyObject_GC_Track(wrapper);
    call[1] = (PyObject *)wrapper;
    result = PyObject_Vectorcall(app, call, 2, NULL);
    if (result == NULL) {
        wrapper->settled = 1;  /* the application raised: not counted */
    } else if (wrapper->status != NULL && sent_as_is(result, environ)) {
        /* Its response started and nothing of the body has been sent; the
         * body is a list (or the like), which cannot fail: decided now. */
        if (settle(wrapper) < 0)
            Py_CLEAR(result);
    } else if (!wrapper->settled) {
        /* A body still to be produced (a generator: its start_response may
         * come while it is iterated, or it may raise before its first byte,
         * the server answering 500): decided at its first non-empty chunk. */
        result = wrap_body(wrapper, result);
    }
    Py_DECREF(wrapper);
done:
    Py_DECREF(app);
    return result;
}

/* Middleware.__init__(app, *, event, record=None, environ_key=None,
 * count_if=False, uniques=None, unique_record=None, unique_clock=None).
 * wsgi.TrafficThreshold.__init__ validates the options and calls this.
 * uniques: a pageviews.UniqueCookie (its at(second) gives the day's
 * values), with unique_record(environ) counting the "unique" event;
 * unique_clock: None (time(NULL)) or clock() -> epoch seconds (tests). */
static int Middleware_init(Middleware *mw, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"app", "event", "record", "environ_key", "count_if", "uniques",
                             "unique_record", "unique_clock", NULL};
    PyObject *app, *event, *record = Py_None, *environ_key = Py_None;
    PyObject *uniques = Py_None, *unique_record = Py_None, *unique_clock = Py_None;
    int count_if = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|$UOOpOOO:Middleware", kwlist, &app, &event,
                                     &record, &environ_key, &count_if, &uniques,
                                     &unique_record, &unique_clock))
        return -1;
    if (uniques != Py_None && !PyCallable_Check(unique_record)) {
        PyErr_SetString(PyExc_TypeError, "uniques needs a callable unique_record");
        return -1;
    }
    if (unique_clock != Py_None && !PyCallable_Check(unique_clock)) {
        PyErr_SetString(PyExc_TypeError, "unique_clock must be callable or None");
        return -1;
    }
    if (hit_cb == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "_middleware._setup() was not called "
                        "(import trafficthreshold.wsgi, not _middleware)");
        return -1;
    }
    if (environ_key != Py_None && !PyUnicode_Check(environ_key)) {
        PyErr_Format(PyExc_TypeError, "environ_key must be a str or None, not %.80s",
                     Py_TYPE(environ_key)->tp_name);
        return -1;
    }
    if (record != Py_None && !PyCallable_Check(record)) {
        PyErr_SetString(PyExc_TypeError, "record must be callable or None");
        return -1;
    }
    Py_XSETREF(mw->app, Py_NewRef(app));
    Py_XSETREF(mw->event, Py_NewRef(event));
    Py_XSETREF(mw->record, record == Py_None ? NULL : Py_NewRef(record));
    Py_XSETREF(mw->environ_key, environ_key == Py_None ? NULL : Py_NewRef(environ_key));
    mw->count_if = count_if;
    Py_XSETREF(mw->uniques, uniques == Py_None ? NULL : Py_NewRef(uniques));
    Py_XSETREF(mw->unique_record, uniques == Py_None ? NULL : Py_NewRef(unique_record));
    Py_XSETREF(mw->unique_clock, unique_clock == Py_None ? NULL : Py_NewRef(unique_clock));
    Py_CLEAR(mw->day_needle);  /* computed at the first page view */
    Py_CLEAR(mw->day_cookie);
    Py_CLEAR(mw->day_cookie_secure);
    return 0;
}

static int Middleware_traverse(Middleware *mw, visitproc visit, void *arg)
{
    Py_VISIT(mw->app);
    Py_VISIT(mw->record);
    Py_VISIT(mw->event);
    Py_VISIT(mw->environ_key);
    Py_VISIT(mw->uniques);
    Py_VISIT(mw->unique_record);
    Py_VISIT(mw->unique_clock);
    return 0;
}

static int Middleware_clear(Middleware *mw)
{
    Py_CLEAR(mw->app);
    Py_CLEAR(mw->record);
    Py_CLEAR(mw->event);
    Py_CLEAR(mw->environ_key);
    Py_CLEAR(mw->uniques);
    Py_CLEAR(mw->unique_record);
    Py_CLEAR(mw->unique_clock);
    Py_CLEAR(mw->day_needle);
    Py_CLEAR(mw->day_cookie);
    Py_CLEAR(mw->day_cookie_secure);
    return 0;
}

/* (A Python subclass's instance comes here from subtype_dealloc, which
 * clears its __dict__ and releases the subclass.) */
static void Middleware_dealloc(Middleware *mw)
{
    PyObject_GC_UnTrack(mw);
    Middleware_clear(mw);
    Py_TYPE(mw)->tp_free((PyObject *)mw);
}

static PyMemberDef Middleware_members[] = {
    {"app", T_OBJECT_EX, offsetof(Middleware, app), 0, "the wrapped WSGI application"},
    {"record", T_OBJECT, offsetof(Middleware, record), READONLY,
     "record(environ), or None: the total only"},
    {"event", T_OBJECT_EX, offsetof(Middleware, event), READONLY, "the event name"},
    {"environ_key", T_OBJECT, offsetof(Middleware, environ_key), READONLY,
     "where the throttle level goes, or None"},
    {"uniques", T_OBJECT, offsetof(Middleware, uniques), READONLY,
     "the pageviews.UniqueCookie, or None: unique visitors are not counted"},
    {NULL}
};

static PyTypeObject MiddlewareType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "trafficthreshold._middleware.Middleware",
    .tp_basicsize = sizeof(Middleware),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The WSGI middleware's per-request path (see wsgi.TrafficThreshold).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Middleware_init,
    .tp_call = (ternaryfunc)Middleware_call,
    .tp_traverse = (traverseproc)Middleware_traverse,
    .tp_clear = (inquiry)Middleware_clear,
    .tp_dealloc = (destructor)Middleware_dealloc,
    .tp_members = Middleware_members,
};

/* ------------------------------------------------------------ the module */

/* _setup(health_paths, static_prefixes, static_extensions, counted_methods,
 *        html_memo, is_html, accepts_html, hit, throttle_status):
 * pageviews.py, once. */
static PyObject *mod_setup(PyObject *self, PyObject *args)
{
    PyObject *hp, *sp, *se, *cm, *memo, *is_html, *accepts_html, *hit, *ts;
    Py_ssize_t i;
    if (!PyArg_ParseTuple(args, "O!O!O!O!O!OOOO:_setup", &PyFrozenSet_Type, &hp, &PyTuple_Type,
                          &sp, &PyFrozenSet_Type, &se, &PyFrozenSet_Type, &cm, &PyDict_Type,
                          &memo, &is_html, &accepts_html, &hit, &ts))
        return NULL;
    for (i = 0; i < PyTuple_GET_SIZE(sp); i++)
        if (!PyUnicode_Check(PyTuple_GET_ITEM(sp, i))) {
            PyErr_SetString(PyExc_TypeError, "static prefixes must be str");
            return NULL;
        }
    Py_XSETREF(health_paths, Py_NewRef(hp));
    Py_XSETREF(static_prefixes, Py_NewRef(sp));
    Py_XSETREF(static_extensions, Py_NewRef(se));
    Py_XSETREF(counted_methods, Py_NewRef(cm));
    Py_XSETREF(html_memo, Py_NewRef(memo));
    Py_XSETREF(is_html_cb, Py_NewRef(is_html));
    Py_XSETREF(accepts_html_cb, Py_NewRef(accepts_html));
    Py_XSETREF(hit_cb, Py_NewRef(hit));
    Py_XSETREF(throttle_status_cb, Py_NewRef(ts));
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"excluded_path", mod_excluded_path, METH_O,
     "excluded_path(path) -> bool: a static file or a health check (never a page view)."},
    {"_setup", mod_setup, METH_VARARGS, NULL},
    {NULL}
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "trafficthreshold._middleware",
    "The WSGI middleware's per-request path (see the comment at the top of _middleware.c).",
    -1, module_methods,
};

PyMODINIT_FUNC PyInit__middleware(void)
{
    PyObject *m;
#define INTERN(var, text) if ((var = PyUnicode_InternFromString(text)) == NULL) return NULL
    INTERN(str_request_method, "REQUEST_METHOD");
    INTERN(str_path_info, "PATH_INFO");
    INTERN(str_http_accept, "HTTP_ACCEPT");
    INTERN(str_close, "close");
    INTERN(str_read, "read");
    INTERN(str_file_wrapper, "wsgi.file_wrapper");
    INTERN(str_failed, "_failed");
    INTERN(str_count_if, "_count_if");
    INTERN(str_level, "level");
    INTERN(str_hit, "hit");
    INTERN(str_decide, "decide");
    INTERN(str_http_cookie, "HTTP_COOKIE");
    INTERN(str_url_scheme, "wsgi.url_scheme");
    INTERN(str_https, "https");
    INTERN(str_at, "at");
    INTERN(str_unique, "unique");
    INTERN(str_set_cookie, "Set-Cookie");
#undef INTERN
    if (PyType_Ready(&MiddlewareType) < 0 || PyType_Ready(&StartResponseType) < 0
        || PyType_Ready(&BodyType) < 0)
        return NULL;
    if ((m = PyModule_Create(&moduledef)) == NULL)
        return NULL;
    Py_INCREF(&MiddlewareType);
    if (PyModule_AddObject(m, "Middleware", (PyObject *)&MiddlewareType) < 0) {
        Py_DECREF(&MiddlewareType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}

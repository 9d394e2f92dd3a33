/*
 * _counter.c -- the Python binding of trafficthreshold's C core: hit(),
 * count() and throttle_status() for Python workers, and the Counter type
 * the supervisor reads and reclaims through.
 *
 * The algorithm is not here: the C core (core/tt_core.c, with the layout in
 * core/tt_layout.h and docs/segment.rst in words) attaches, locks and
 * recovers, finds and inserts keys, rolls buckets over, reclaims and reads,
 * with no Python in it; the PHP extension (php/) and libtrafficthreshold
 * compile the same file.  It is #included below, so that its hot path
 * (tt_add_slot) is inlined into hit() as before.  What is here is Python:
 * argument parsing, the per-process key cache (dicts keyed by the name
 * strings, so a cached hit hashes nothing), names.validate (the one source
 * of truth for the names' rules and their messages), exceptions, warnings
 * and the module's default Counter (fail open).
 *
 * Threads: a Counter may be shared by threads.  A hit holds `busy` (in the
 * core's tt_seg) where it runs Python or lets go of the GIL (no detach or
 * re-init under it), keeps no borrowed pointer into its cache across Python
 * code or a GIL release, and counts both its halves with its own copy of
 * the clock (tt_clock).  The core lets go of the GIL around every wait for
 * the lock on the hot path (TT_BLOCK_BEGIN/END below): a thread holding the
 * GIL never stretches the time another process waits.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

/* The core waits for the lock (a roll-over, an insert) without the GIL. */
#define TT_BLOCK_BEGIN(seg) Py_BEGIN_ALLOW_THREADS
#define TT_BLOCK_END(seg) Py_END_ALLOW_THREADS
#include "core/tt_core.c"

typedef struct {
    PyObject_HEAD
    tt_seg s;                 /* the attachment: the core's (base NULL once
                                 detached) */
    PyObject *cache;          /* dict: event -> dict(account or None -> slot) */
    /* Entries put in `cache` since it was last cleared.  Why: keys come and
     * go (the segment reclaims idle ones) and the refs of reclaimed keys
     * would stay for ever in a process fed names from the network; when it
     * passes the key table's capacity (more keys than the table can hold at
     * once, so most are stale) the cache is forgotten (cache_ref). */
    Py_ssize_t cached;
    /* The event of the last hit (a strong reference, compared by identity),
     * its dict of account slots in `cache` and its `all` slot: a process
     * mostly counts one event, so this saves three dict lookups per hit.
     * NULL = nothing cached.  Slots are cached as refs: slot | generation
     * << 32 (see TT_REF_SLOT). */
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
/* When to attach it: the core's policy (tt_attacher, tt_core.c): every
 * 10 s without a segment, at once after a re-install in either backend, a
 * half made segment once a second. */
static tt_attacher attacher = TT_ATTACHER_INIT;
/* Threads inside attach_cb now: it is Python code, so another thread may
 * run (and hit) while one attaches. */
static int attaching = 0;
static int strict_mode = 0;

/* Raises the core's last error (c->err, c->error) as the exception of its
 * kind; returns -1. */
static int seg_raise(tt_seg *s)
{
    switch (s->err) {
    case TT_ERR_NOTFOUND:
        PyErr_SetString(SegmentNotFound, s->error);
        break;
    case TT_ERR_LAYOUT:
        PyErr_SetString(LayoutMismatch, s->error);
        break;
    case TT_ERR_BUSY:
        PyErr_SetString(SegmentBusy, s->error);
        break;
    case TT_ERR_NAME:
        PyErr_SetString(PyExc_ValueError, s->error);
        break;
    default:
        PyErr_SetString(SegmentError, s->error);
    }
    return -1;
}

/* ------------------------------------------------------------------ time */

/* Converts an optional `now` argument; returns -1.0 with an exception set. */
static double parse_now(PyObject *obj)
{
    double t;
    if (obj == NULL || obj == Py_None)
        return tt_now_seconds();
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
    if (obj == NULL || obj == Py_None)
        return tt_now_second();  /* the coarse second, one vDSO load (tt_core.c) */
    t = parse_now(obj);
    if (t < 0)
        return 0;
    clock_gettime(CLOCK_REALTIME, &ts);
    if (t > (double)ts.tv_sec + TT_MAX_CLOCK_SKEW_S || t < (double)ts.tv_sec - TT_MAX_CLOCK_SKEW_S) {
        PyErr_Format(PyExc_ValueError,
                     "now=%R is more than %d days from the real clock (%lld)%s; pass Unix "
                     "seconds, or omit now", obj, TT_MAX_CLOCK_SKEW_S / 86400, (long long)ts.tv_sec,
                     t > ts.tv_sec * 500.0 ? ": now looks like milliseconds" : "");
        return 0;
    }
    return (uint64_t)t;
}

/* ---------------------------------------------------------------- attach */

/* Unmaps (tt_detach) and forgets the cached keys.  Caller checked busy. */
static void detach(Counter *c)
{
    tt_detach(&c->s);
    if (c->cache != NULL)
        PyDict_Clear(c->cache);
    c->cached = 0;
    Py_CLEAR(c->ev_obj);
    Py_CLEAR(c->ev_accounts);
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
    long key, fixed = 0;
    PyObject *stripe = Py_None;
    int retired_ok = 0, which;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "sl|Op", kwlist, &backend, &key, &stripe,
                                     &retired_ok))
        return -1;
    if (TT_BUSY_HELD(&c->s)) {
        PyErr_SetString(SegmentBusy, "another thread is inside this Counter's lock");
        return -1;
    }
    detach(c);
    if (strcmp(backend, "sysv") == 0)
        which = TT_BACKEND_SYSV;
    else if (strcmp(backend, "posix") == 0)
        which = TT_BACKEND_POSIX;
    else {
        PyErr_Format(PyExc_ValueError, "backend '%s' is not valid; use 'sysv' or 'posix'",
                     backend);
        return -1;
    }
    if (stripe != Py_None) {
        fixed = PyLong_AsLong(stripe);
        if (fixed == -1 && PyErr_Occurred())
            return -1;
    }
    if (c->cache == NULL && (c->cache = PyDict_New()) == NULL)
        return -1;
    if (tt_attach(&c->s, which, key, stripe != Py_None, (unsigned long)fixed, retired_ok) < 0)
        return seg_raise(&c->s);
    return 0;
}

static void Counter_dealloc(Counter *c)
{
    detach(c);
    Py_CLEAR(c->cache);
    Py_TYPE(c)->tp_free((PyObject *)c);
}

/* ------------------------------------------------------------------ keys */

/* Finds or creates the key for a hit at epoch second `second`
 * (tt_find_or_create: the lock only to insert, with the GIL released, a new
 * key's buckets of that second stamped); returns its ref, TT_OVERFLOW_SLOT
 * when the table is full, or -1 with an exception set (lock timeout:
 * SegmentBusy).  Names
 * are already validated and bounded.  The caller holds c->s.busy (nothing
 * unmaps under the insert) and a reference to the Counter and to the name
 * strings whose UTF-8 `a` and `e` point into. */
static long find_or_create(Counter *c, const char *a, size_t alen, const char *e, size_t elen,
                           int is_all, uint64_t second)
{
    long ref = tt_find_or_create(&c->s, a, alen, e, elen, is_all, second);
    if (ref < 0)
        seg_raise(&c->s);
    return ref;
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
    if (*alen < 1 || *alen > (Py_ssize_t)TT_ACCOUNT_MAX
        || *elen < 1 || *elen > (Py_ssize_t)TT_EVENT_MAX) {
        PyErr_Format(PyExc_ValueError,
                     "account and event names must be 1..%u and 1..%u UTF-8 bytes; got %zd "
                     "and %zd", TT_ACCOUNT_MAX, TT_EVENT_MAX, *alen, *elen);
        return -1;
    }
    return 0;
}

/* Remembers `ref` for (account, event) in the process cache.  Returns
 * ref, or -1 with an exception set (no memory).  The names are exact str
 * (or None), so no dict operation here runs Python code; the new account
 * dict is filled before the cache holds it, and an existing one is held by
 * a reference of ours while we write to it. */
static void forget_slots(Counter *c);

static long cache_ref(Counter *c, PyObject *account, PyObject *event, long ref)
{
    PyObject *accounts, *v;
    int rc;
    /* Bounded by the key table: past its capacity, forget everything and
     * start afresh (the live keys come back on their next miss).  Safe
     * here for the same reasons as the TT_ADD_STALE forget in hit_keys: no
     * caller keeps a borrowed pointer into the cache across this call. */
    if (c->cached >= (Py_ssize_t)c->s.key_capacity)
        forget_slots(c);
    accounts = PyDict_GetItemWithError(c->cache, event);
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
        c->cached++;
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
 * that second and its minute are stamped by the insert, tt_insert_key), or 0
 * (readers: find; nothing is created).  A second, not the hit's clock by
 * address: an address that escapes would keep the hit's clock out of
 * registers on the cached path.  Without it a cached ref is checked
 * against the slot's generation, and forgotten when the key was reclaimed;
 * with it the bucket tags do that check (tt_roll_bucket).
 * The names must be exact str (or None): a subclass's __eq__ or __hash__
 * would run Python inside the cache's lookups.
 * Hazard: on a miss Python runs (names.validate; a new dict may start the
 * collector) and the insert lets go of the GIL, so another thread may
 * meanwhile clear the cache (forget_slots) or try to detach the Counter:
 * the miss holds c->s.busy (detach and __init__ refuse), and no borrowed
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
            if (create || tt_slot_gen(&c->s, TT_REF_SLOT(slot)) == TT_REF_GEN(slot))
                return slot;
            if (PyDict_DelItem(accounts, account) < 0)
                return -1;
        }
    }
    if (PyErr_Occurred())
        return -1;
    TT_BUSY_ENTER(&c->s);
    slot = slot_miss(c, account, event, create);
    TT_BUSY_LEAVE(&c->s);
    return slot;
}

/* slot_for() on a cache miss; the caller holds c->s.busy. */
static long slot_miss(Counter *c, PyObject *account, PyObject *event, uint64_t create)
{
    const char *a, *e;
    Py_ssize_t alen, elen;
    long slot;
    if (encode_names(account, event, &a, &alen, &e, &elen) < 0)
        return -1;
    if (c->s.base == NULL) {
        PyErr_SetString(SegmentNotFound, "this Counter is detached");
        return -1;
    }
    if (create) {
        slot = find_or_create(c, a, (size_t)alen, e, (size_t)elen, account == Py_None, create);
    } else {
        slot = tt_probe(&c->s, a, (size_t)alen, e, (size_t)elen, tt_fnv1a(a, alen, e, elen), NULL, NULL);
        if (slot < 0)
            return -2;  /* absent */
    }
    if (slot <= (long)TT_OVERFLOW_SLOT)
        return slot;
    return cache_ref(c, account, event, slot);
}

/* ------------------------------------------------------------------- hit */

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
    if (overflow != 0 || n < 1 || (unsigned long long)n > TT_MAX_HIT_N) {
        PyErr_Format(PyExc_ValueError, "n=%R is out of range; n must be 1..%llu per hit()",
                     obj, TT_MAX_HIT_N);
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
    if (slot <= (long)TT_OVERFLOW_SLOT)
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
 * (tt_roll_bucket said TT_ADD_STALE).  Rare: a key idle for a whole ring. */
static void forget_slots(Counter *c)
{
    PyDict_Clear(c->cache);
    c->cached = 0;
    Py_CLEAR(c->ev_obj);
    Py_CLEAR(c->ev_accounts);
}

/* The core of hit(): the `all` key of the event, then the account's key.
 * Returns 0, or -1 with an exception set (bad input or lock timeout).
 * The caller has checked that the segment is live (get_default() for the
 * module's hit(), Counter_hit() for a Counter's) and passes exact str names
 * (do_hit).  Where Python runs or the GIL is let go (a cache miss, a bucket
 * roll-over) c->s.busy is held, so no other thread detaches the Counter under
 * the hit (slot_for, tt_roll_bucket); nothing else here runs Python.  A key found reclaimed
 * (TT_ADD_STALE) is resolved again, once, and counted in its new slot: the hit
 * goes to its own key, never to the slot's new owner. */
static inline __attribute__((always_inline)) int hit_keys(Counter *c, PyObject *account,
                                                          PyObject *event, uint64_t n,
                                                          uint64_t second)
{
    long all_slot, slot = -1;
    int dropped, rc;
    tt_clock clk;
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
    if (second != c->s.clk.second)
        tt_set_clock(&c->s, second);
    clk = c->s.clk;  /* the hit's own clock from here (tt_add_slot) */
    tt_own_stripe(&c->s);
    dropped = tt_add_slot(&c->s, &clk, all_slot, n);
    if (__builtin_expect(dropped == TT_ADD_STALE, 0)) {
        /* Nothing was added yet: a failure here is the hit's. */
        forget_slots(c);
        if ((all_slot = all_slot_for(c, event, second)) < 0)
            return -1;
        dropped = tt_add_slot(&c->s, &clk, all_slot, n) != 0;
    }
    if (account != Py_None) {
        rc = tt_add_account(&c->s, &clk, slot, all_slot, n);
        if (__builtin_expect(rc == TT_ADD_STALE, 0)) {
            /* The `all` key is counted: a failure now drops the rest. */
            forget_slots(c);
            if ((slot = slot_for(c, account, event, second)) < 0) {
                PyErr_Clear();
                rc = 1;
            } else {
                rc = tt_add_account(&c->s, &clk, slot, all_slot, n) != 0;
            }
        }
        dropped |= rc;
    } else if (all_slot == TT_OVERFLOW_SLOT) {
        __atomic_fetch_add(TT_U64(c->s.base, TT_H_OVERFLOW_HITS), n, __ATOMIC_RELAXED);
    }
    /* Once per hit, however many of its four buckets dropped it: the header
     * field and the /metrics counter are "hits dropped". */
    if (dropped)
        __atomic_fetch_add(TT_U64(c->s.base, TT_H_DROPPED_HITS), n, __ATOMIC_RELAXED);
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
    if (c->s.base == NULL) {
        PyErr_SetString(SegmentNotFound, "this Counter is detached");
        return NULL;
    }
    if (parse_hit_args(args, nargs, kwnames, argv) < 0 || (n = parse_n(argv[2])) < 0
        || (second = parse_second(argv[3])) == 0)
        return NULL;
    if (!tt_live(&c->s)) {
        PyErr_SetString(SegmentNotFound, "the segment was uninstalled");
        return NULL;
    }
    if (c->s.version != TT_LAYOUT_VERSION) {
        PyErr_Format(LayoutMismatch, "a layout-%u segment is read only (for uninstall's "
                     "final roll-up); run `trafficthreshold uninstall` then install",
                     c->s.version);
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
 * TT_ATTACH_RETRY_S seconds).  NULL means "no segment": in strict mode an
 * exception is set, otherwise not (fail open). */
static Counter *attach_default(void);

static inline Counter *get_default(void)
{
    if (__builtin_expect(default_counter != NULL && tt_live(&default_counter->s), 1))
        return default_counter;
    return attach_default();
}

/* get_default() without a live default counter: out of the hot path. */
__attribute__((noinline)) static Counter *attach_default(void)
{
    PyObject *r;
    /* The process's clock, not the hit's `now`: the retries are about real
     * time, and a hit replayed with a `now` far ahead would otherwise push
     * them (the attacher's retries) that far, every later hit lost. */
    int64_t t = (int64_t)tt_now_second();
    if (default_counter != NULL) {
        /* Uninstalled under us: let go, and look for a new one at once
         * (below); until one is there, every hit asks whether it is (one
         * or two system calls per hit, on this degraded path only), so
         * that every hit after the next install is counted in it. */
        tt_attacher_retired(&attacher, default_counter->s.backend, default_counter->s.key);
        Py_CLEAR(default_counter);
    }
    /* While another thread is attaching (its try recorded, so the policy
     * says "not due"), this thread tries too rather than lose its hit: an
     * attach is a system call or two, and only while one is under way. */
    if (!tt_attacher_due(&attacher, t, strict_mode || attaching > 0))
        return NULL;
    attaching++;
    r = PyObject_CallNoArgs(attach_cb);
    attaching--;
    if (default_counter != NULL && tt_live(&default_counter->s)) {
        /* Another thread attached meanwhile: its counter is the default;
         * ours (if any) is let go of, not leaked. */
        if (r == NULL)
            PyErr_Clear();
        Py_XDECREF(r);
        return default_counter;
    }
    if (r == NULL)
        tt_attacher_tried(&attacher, t, PyErr_ExceptionMatches(SegmentNotFound)
                                        ? TT_ERR_NOTFOUND : TT_ERR_OS);
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
    Py_XSETREF(default_counter, (Counter *)r);  /* a retired one another thread left */
    tt_attacher_tried(&attacher, t, TT_OK);
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
    if ((c = get_default()) == NULL) {
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

/* a + b, saturating at TT_COUNT_MAX.  Why: counts are read from shared
 * memory (a corrupt or absurd bucket must not wrap a sum around to a small
 * number) and end in signed 64-bit integers (SQLite, JSON readers). */

static int check_attached(Counter *c)
{
    if (c->s.base == NULL) {
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
    return PyLong_FromLong(tt_level(&c->s, t, 0));
}

/* throttle_status(now=None) -> int 0..5; 0 when no segment is installed. */
static PyObject *mod_throttle_status(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    double t;
    Counter *c;
    if ((t = parse_now(nargs > 0 ? args[0] : NULL)) < 0)
        return NULL;
    if ((c = get_default()) == NULL) {
        if (PyErr_Occurred())
            return NULL;
        return PyLong_FromLong(0);
    }
    return PyLong_FromLong(tt_level(&c->s, t, nargs == 0 || args[0] == Py_None));
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
    return PyLong_FromUnsignedLong(TT_REF_SLOT(slot));
}

static int check_slot(Counter *c, unsigned long slot)
{
    if (slot >= c->s.key_capacity) {
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
    return PyLong_FromUnsignedLongLong(tt_window_count(&c->s, (uint32_t)slot, window, t));
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
    if (last >= first && last - first >= c->s.minutes) {
        PyErr_Format(PyExc_ValueError, "at most %u minutes can be read at once", c->s.minutes);
        return NULL;
    }
    if ((out = PyList_New(0)) == NULL)
        return NULL;
    used = __atomic_load_n(TT_U32(c->s.base, TT_H_KEYS_USED), __ATOMIC_ACQUIRE);
    TT_BUSY_ENTER(&c->s);  /* building the list may run Python (the collector): no detach */
    for (uint32_t slot = 0; slot < used && slot < c->s.key_capacity; slot++) {
        /* Counted by offset: `m <= last` would never end at last = 2**64-1. */
        for (uint64_t k = 0; last >= first && k <= last - first; k++) {
            uint64_t m = first + k, n = tt_minute_count(&c->s, slot, m);
            if (n == 0)
                continue;
            if (append_new(out, Py_BuildValue("(IKK)", slot, (unsigned long long)m,
                                              (unsigned long long)n)) < 0) {
                Py_DECREF(out);
                TT_BUSY_LEAVE(&c->s);
                return NULL;
            }
        }
    }
    TT_BUSY_LEAVE(&c->s);
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
    uint8_t alen = *(uint8_t *)(ent + TT_E_ACCOUNT_LEN), elen = *(uint8_t *)(ent + TT_E_EVENT_LEN);
    if (alen > TT_ACCOUNT_MAX) alen = TT_ACCOUNT_MAX;
    if (elen > TT_EVENT_MAX) elen = TT_EVENT_MAX;
    return Py_BuildValue("(IN N)", *TT_U32(ent, TT_E_SLOT),
                         PyUnicode_DecodeUTF8(ent + TT_E_ACCOUNT, alen, "surrogateescape"),
                         PyUnicode_DecodeUTF8(ent + TT_E_EVENT, elen, "surrogateescape"));
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
    TT_BUSY_ENTER(&c->s);  /* building the list may run Python (the collector): no detach */
    for (uint32_t i = 0; i < c->s.index_size && rc == 0; i++) {
        char *ent = tt_index_entry(&c->s, i);
        if (__atomic_load_n(TT_U32(ent, TT_E_STATE), __ATOMIC_ACQUIRE) != TT_ENTRY_READY)
            continue;
        slot = __atomic_load_n(TT_U32(ent, TT_E_SLOT), __ATOMIC_RELAXED);
        if (slot < c->s.key_capacity) {
            rc = append_new(out, entry_tuple(ent));
        } else if (damaged != NULL) {
            item = entry_tuple(ent);
            rc = append_new(damaged, item == NULL ? NULL
                            : Py_BuildValue("(IN)", i, item));  /* (entry, (slot, a, e)) */
        }
    }
    TT_BUSY_LEAVE(&c->s);
    if (rc < 0) {
        Py_DECREF(out);
        return NULL;
    }
    return out;
}

/* Counter.reclaim(before_minute, timeout_ms=1000) -> [(slot, account,
 * event)]: gives back the slot of every key whose buckets are all older
 * than `before_minute` (tt_slot_idle), except slot 0, slot 1 and
 * throttle_slot (tt_reclaim_candidate, then tt_reclaim_entry under the
 * lock).  The caller (segment.reclaim) makes before_minute no later
 * than the ring's oldest minute and the first minute not yet rolled, so
 * nothing a reclaim zeroes is lost.  The index is scanned without the lock;
 * each candidate is checked again and reclaimed under the lock (taken per
 * key, with the GIL released, so hits wait microseconds at most).  Raises
 * SegmentBusy when the lock was not taken in timeout_ms (the keys reclaimed
 * before stay reclaimed: see the header's `reclaimed`). */
static PyObject *Counter_reclaim(Counter *c, PyObject *args)
{
    unsigned long long before;
    int timeout_ms = 1000, rc;
    uint32_t slot, gen;
    PyObject *out, *item;
    if (!PyArg_ParseTuple(args, "K|i", &before, &timeout_ms) || check_attached(c) < 0)
        return NULL;
    if (c->s.version != TT_LAYOUT_VERSION) {
        PyErr_Format(LayoutMismatch, "a layout-%u segment is read only (for uninstall's "
                     "final roll-up): nothing is reclaimed; run `trafficthreshold "
                     "uninstall` then install", c->s.version);
        return NULL;
    }
    if (tt_header_u32(&c->s, TT_H_STATE) != TT_STATE_LIVE) {
        PyErr_SetString(SegmentNotFound, "the segment was uninstalled");
        return NULL;
    }
    if (before > TT_EPOCH_MASK / 60)
        before = TT_EPOCH_MASK / 60;
    if ((out = PyList_New(0)) == NULL)
        return NULL;
    /* Held for the whole scan: building the result may run Python (the
     * garbage collector), and the core reads the mapping with the GIL
     * released. */
    TT_BUSY_ENTER(&c->s);
    for (uint32_t i = 0; i < c->s.index_size; i++) {
        if (!tt_reclaim_candidate(&c->s, i, before, &slot, &gen))
            continue;
        /* The name before the reclaim makes the entry a tombstone. */
        item = entry_tuple(tt_index_entry(&c->s, i));
        if (item == NULL) {
            Py_DECREF(out);
            TT_BUSY_LEAVE(&c->s);
            return NULL;
        }
        Py_BEGIN_ALLOW_THREADS
        rc = tt_reclaim_entry(&c->s, i, slot, gen, before, timeout_ms);
        Py_END_ALLOW_THREADS
        if (rc < 0) {
            Py_DECREF(item);
            Py_DECREF(out);
            TT_BUSY_LEAVE(&c->s);
            PyErr_Format(SegmentBusy, "the segment lock was not free within %d ms to reclaim "
                         "slot %u", timeout_ms, slot);
            return NULL;
        }
        if (rc == 1 ? append_new(out, item) < 0 : (Py_DECREF(item), 0)) {
            Py_DECREF(out);
            TT_BUSY_LEAVE(&c->s);
            return NULL;
        }
    }
    if (PyList_GET_SIZE(out) > 0) {
        Py_BEGIN_ALLOW_THREADS
        tt_reclaim_done(&c->s, timeout_ms);
        Py_END_ALLOW_THREADS
    }
    TT_BUSY_LEAVE(&c->s);
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
    tt_probe(&c->s, a, (size_t)alen, e, (size_t)elen, tt_fnv1a(a, alen, e, elen), NULL, &reads);
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
    if ((width != 4 && width != 8) || off > TT_HEADER_SIZE - width || off % width) {
        PyErr_SetString(PyExc_ValueError, "bad header offset or width");
        return NULL;
    }
    if (width == 4)
        return PyLong_FromUnsignedLong(__atomic_load_n(TT_U32(c->s.base, off), __ATOMIC_ACQUIRE));
    return PyLong_FromUnsignedLongLong(__atomic_load_n(TT_U64(c->s.base, off), __ATOMIC_ACQUIRE));
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
    if ((width != 4 && width != 8) || off > TT_HEADER_SIZE - width || off % width
        || off < TT_H_TOTAL_SIZE) {
        PyErr_SetString(PyExc_ValueError, "bad header offset or width (geometry is read-only)");
        return NULL;
    }
    if (width == 4)
        __atomic_store_n(TT_U32(c->s.base, off), (uint32_t)v, __ATOMIC_RELEASE);
    else
        __atomic_store_n(TT_U64(c->s.base, off), (uint64_t)v, __ATOMIC_RELEASE);
    c->s.level_sec = -1;  /* the level or its settings may have changed */
    Py_RETURN_NONE;
}

/* Takes `l` with the GIL released; returns None, or NULL with SegmentBusy
 * (timeout, naming the holder) or SegmentError set.  `keep` (may be NULL)
 * is kept alive while the GIL is released. */
static PyObject *lock_result(tt_lock_t *l, int timeout_ms, PyObject *keep)
{
    int rc, err;
    uint32_t holder;
    Py_XINCREF(keep);
    if (keep != NULL)
        TT_BUSY_ENTER(&((Counter *)keep)->s);
    Py_BEGIN_ALLOW_THREADS
    rc = tt_lock(l, timeout_ms);
    err = errno;
    Py_END_ALLOW_THREADS
    if (keep != NULL)
        TT_BUSY_LEAVE(&((Counter *)keep)->s);
    Py_XDECREF(keep);
    if (rc == 0)
        Py_RETURN_NONE;
    if (err == EAGAIN || err == ETIMEDOUT) {
        holder = __atomic_load_n(l->owner, __ATOMIC_ACQUIRE);
        if (l->backend == TT_BACKEND_SYSV && l->semid >= 0)
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
    tt_lock_t l;
    if (!PyArg_ParseTuple(args, "i", &timeout_ms) || check_attached(c) < 0)
        return NULL;
    l = tt_lock_of(&c->s);
    return lock_result(&l, timeout_ms, (PyObject *)c);
}

static PyObject *Counter_unlock(Counter *c, PyObject *unused)
{
    tt_lock_t l;
    if (check_attached(c) < 0)
        return NULL;
    l = tt_lock_of(&c->s);
    tt_unlock(&l);
    Py_RETURN_NONE;
}

static PyObject *Counter_detach(Counter *c, PyObject *unused)
{
    if (TT_BUSY_HELD(&c->s)) {
        PyErr_SetString(SegmentBusy, "another thread is inside this Counter's lock; "
                        "detach it when that call has returned");
        return NULL;
    }
    detach(c);
    Py_RETURN_NONE;
}

static PyObject *Counter_get_stripe(Counter *c, void *closure)
{
    if (c->s.base != NULL)
        tt_own_stripe(&c->s);
    return PyLong_FromUnsignedLong(c->s.stripe);
}

static PyObject *Counter_get_attached(Counter *c, void *closure)
{
    return PyBool_FromLong(c->s.base != NULL);
}

static PyObject *Counter_get_size(Counter *c, void *closure)
{
    return PyLong_FromSize_t(c->s.size);
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
    tt_attacher_reset(&attacher);
    Py_RETURN_NONE;
}

/* _ensure() -> the default Counter, attaching it if due, or None (fail
 * open; in strict mode the attach error is raised). */
static PyObject *mod_ensure(PyObject *self, PyObject *unused)
{
    Counter *c = get_default();
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
 * The same protocol as the hot path's (tt_lock), with the GIL released
 * while waiting.  `buffer` is the writable mapping (its header); backend 0 =
 * SysV, 1 = POSIX.  Raises SegmentBusy on timeout, naming the holder. */
static PyObject *mod_lock(PyObject *self, PyObject *args)
{
    int backend, semid, timeout_ms;
    Py_buffer view;
    PyObject *r;
    tt_lock_t l;
    if (!PyArg_ParseTuple(args, "iiw*i", &backend, &semid, &view, &timeout_ms))
        return NULL;
    if (view.len < (Py_ssize_t)TT_HEADER_SIZE) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "the mapping is smaller than the header");
        return NULL;
    }
    l.backend = backend;
    l.semid = semid;
    l.owner = TT_U32(view.buf, TT_H_LOCK_OWNER_PID);
    r = lock_result(&l, timeout_ms, NULL);
    PyBuffer_Release(&view);
    return r;
}

/* _unlock(backend, semid, buffer) -> None: gives back what _lock took. */
static PyObject *mod_unlock(PyObject *self, PyObject *args)
{
    int backend, semid;
    Py_buffer view;
    tt_lock_t l;
    if (!PyArg_ParseTuple(args, "iiw*", &backend, &semid, &view))
        return NULL;
    if (view.len >= (Py_ssize_t)TT_HEADER_SIZE) {
        l.backend = backend;
        l.semid = semid;
        l.owner = TT_U32(view.buf, TT_H_LOCK_OWNER_PID);
        tt_unlock(&l);
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
    if (!PyArg_ParseTuple(args, "i", &tt_crash_at))
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
/* Each as "NAME": TT_NAME of core/tt_layout.h (the one place the numbers are
 * written). */
#define L(name) rc |= set_int(d, #name, TT_##name)
    L(LAYOUT_VERSION); L(HEADER_SIZE); L(INDEX_ENTRY_SIZE); L(BUCKET_SIZE); L(ACCOUNT_MAX);
    L(EVENT_MAX); L(OVERFLOW_SLOT); L(EVENT_RESERVE); L(H_VERSION); L(H_HEADER_SIZE);
    L(H_KEY_CAPACITY); L(H_INDEX_SIZE); L(H_MINUTE_BUCKETS); L(H_SECOND_BUCKETS); L(H_STRIPES);
    L(H_STRIPE_SIZE); L(H_SLOT_SIZE); L(H_INDEX_OFFSET); L(H_SLOTS_OFFSET); L(H_TOTAL_SIZE);
    L(H_CREATED_AT); L(H_THROTTLE_MULTIPLIER); L(H_THROTTLE_WINDOW); L(H_THROTTLE_LEVEL);
    L(H_STATE); L(H_HEARTBEAT_MS); L(H_SUPERVISOR_PID); L(H_THROTTLE_SLOT); L(H_LOCK_OWNER_PID);
    L(H_KEYS_USED); L(H_NEXT_STRIPE); L(H_OVERFLOW_HITS); L(H_DROPPED_HITS); L(H_ATTACHES);
    L(H_THROTTLE_SINCE_MS); L(H_INSTANCE); L(H_FREE_HEAD); L(H_FREE_SLOTS); L(H_RECLAIMED);
    L(H_RECLAIM_SLOT); L(H_RECLAIM_ENTRY); L(E_GENERATION); L(H_INSERT_SLOT); L(H_INSERT_ENTRY);
    L(H_PROBE_LIMIT); L(H_INDEX_SEQ); L(H_LOCK_TIMEOUTS); L(T_GENERATION); L(T_NEXT_FREE);
    L(SLOT_ENTRY_SIZE); L(EPOCH_BITS); L(ENTRY_EMPTY); L(ENTRY_READY); L(ENTRY_REMOVED);
    L(E_STATE); L(E_SLOT); L(E_HASH); L(E_ACCOUNT_LEN); L(E_EVENT_LEN); L(E_ACCOUNT);
    L(E_EVENT); L(H_MAGIC); L(STATE_INSTALLING); L(STATE_LIVE); L(STATE_RETIRED);
    L(HOT_LOCK_TIMEOUT_MS); L(HEARTBEAT_STALE_MS); L(ATTACH_RETRY_S); L(MAX_CLOCK_SKEW_S);
#undef L
    if (rc != 0 || PyModule_AddObject(m, "LAYOUT", d) < 0) {
        Py_DECREF(d);
        return -1;
    }
    if (PyModule_AddObject(m, "MAX_HIT_N", PyLong_FromUnsignedLongLong(TT_MAX_HIT_N)) < 0)
        return -1;
    return PyModule_AddStringConstant(m, "MAGIC", TT_MAGIC_BYTES);
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
    if ((str_status_sep = PyUnicode_InternFromString(TT_STATUS_SEP)) == NULL)
        return NULL;
    if ((str_pageview = PyUnicode_InternFromString("pageview")) == NULL)
        return NULL;
    if ((m = PyModule_Create(&moduledef)) == NULL)
        return NULL;
    Py_INCREF(&CounterType);
    if (PyModule_AddObject(m, "Counter", (PyObject *)&CounterType) < 0 || add_layout(m) < 0
        || PyModule_AddStringConstant(m, "STATUS_SEP", TT_STATUS_SEP) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    tt_core_init();
    return m;
}

/*
 * cirron_otel._native — the producer side of cirron-otel.
 *
 * Sections:
 *   1. Platform: clock, OS entropy, xoshiro256** ids
 *   2. Name table: names interned once, JSON-escaped once, read by the drainer without the GIL
 *   3. Rings: one single-producer ring per thread, drop-oldest, thread exit, fork
 *   4. Value coercion for mark()
 *   5. Scope objects and the scope stack (a ContextVar, so it is per thread and per asyncio task)
 *   6. epochs() / batches() iterators
 *   7. mark()
 *   8. JSON writing helpers (GIL-free) and attribute rendering (GIL held)
 *   9. Collector: claim records from the rings, resolve Python references, assign mark ids
 *  10. Batch objects and the spool v1 encoder
 *  11. Module functions and init (defined after section 12, which they use)
 *  12. OTLP: the OpenTelemetry mapping, encoded as protobuf
 *
 * Header-only, Python-free parts: buf.h (buf_t, the growable buffer), grisu2.h (format_f64,
 * the float printer, with its generated table _pow10.h), pb.h (protobuf wire writers).
 *
 * Hot path rules: mark(), scope enter/exit and iterator steps take no lock, make no system
 * call (the wall clock is read through the vDSO) and allocate only what the caller hands
 * us (kwargs dicts). Everything else happens on the drainer thread, mostly without the GIL.
 */
#include "native.h" /* shared types, cn_state, the inline hot-path operations */

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#if defined(__linux__) || defined(__APPLE__) || defined(__FreeBSD__)
#include <sys/random.h>
#define HAVE_GETENTROPY 1
#endif

#include "grisu2.h" /* format_f64: the float printer */
#include "pb.h"     /* protobuf wire-format writers */

/* the process-wide state (native.h) */
CN_INTERNAL cn_state_t cn_state = CN_STATE_INIT;

/* ======================================================================================
 * 1. Platform
 * ==================================================================================== */

static void
os_entropy(void *buf, size_t n)
{
    unsigned char *p = buf;
#ifdef HAVE_GETENTROPY
    while (n > 0) {
        size_t k = n > 256 ? 256 : n;
        if (getentropy(p, k) != 0)
            break;
        p += k;
        n -= k;
    }
    if (n == 0)
        return;
#endif
    int fd = open("/dev/urandom", O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
        while (n > 0) {
            ssize_t k = read(fd, p, n);
            if (k <= 0)
                break;
            p += k;
            n -= (size_t)k;
        }
        close(fd);
    }
    /* Last resort: mix clocks and addresses; ids stay unique per process in practice. */
    for (size_t i = 0; i < n; i++)
        p[i] = (unsigned char)(wall_ns() >> (i % 8) ^ (uintptr_t)p >> 3 ^ i * 131u);
}

static void
rng_seed(rng_t *r)
{
    do {
        os_entropy(r->s, sizeof(r->s));
    } while ((r->s[0] | r->s[1] | r->s[2] | r->s[3]) == 0);
}

/* ======================================================================================
 * 2. Name table
 *
 * Names (of marks and scopes) are interned: the first time a name string is seen its
 * JSON-escaped token is stored in an append-only table that never moves, so the drainer
 * encodes a mark from a 4-byte id without touching Python objects. Producers find ids
 * through a per-thread cache keyed by object identity (entries hold a reference, so a
 * cached pointer is never reused for another string) and fall back to a dict lookup by
 * content under the GIL.
 * ==================================================================================== */

static int json_escape_utf8(buf_t *b, const char *s, Py_ssize_t n);

/* Returns the id, or UINT32_MAX with an exception set, or UINT32_MAX-1 when the table is
 * full (the caller then keeps a reference to the name in the record instead). */
static uint32_t
name_intern_slow(PyObject *name)
{
    PyObject *idobj = PyDict_GetItemWithError(cn_state.name_ids, name);
    if (idobj != NULL)
        return (uint32_t)PyLong_AsUnsignedLong(idobj);
    if (PyErr_Occurred())
        return UINT32_MAX;
    uint32_t id = atomic_load_explicit(&cn_state.name_count, memory_order_relaxed);
    if (id >= NAME_CHUNK * NAME_CHUNKS)
        return UINT32_MAX - 1;
    PyObject *enc = PyUnicode_AsEncodedString(name, "utf-8", "backslashreplace");
    if (enc == NULL)
        return UINT32_MAX;
    buf_t b = {0};
    json_escape_utf8(&b, PyBytes_AS_STRING(enc), PyBytes_GET_SIZE(enc));
    uint32_t raw_len = (uint32_t)PyBytes_GET_SIZE(enc);
    /* One exact-size block per name: the scratch buffer's 4 KiB capacity must not stay
     * allocated for every distinct name. When nothing needed escaping the raw bytes are
     * the token without its quotes, so they share the block. */
    int same = !b.oom && b.len == (size_t)raw_len + 2 &&
               memcmp(b.data + 1, PyBytes_AS_STRING(enc), raw_len) == 0;
    char *tok = b.oom ? NULL : malloc(b.len + (same ? 0 : (size_t)raw_len + 1));
    if (tok == NULL) {
        free(b.data);
        Py_DECREF(enc);
        PyErr_NoMemory();
        return UINT32_MAX;
    }
    memcpy(tok, b.data, b.len);
    char *raw = same ? tok + 1 : tok + b.len;
    if (!same)
        memcpy(raw, PyBytes_AS_STRING(enc), raw_len);
    free(b.data);
    b.data = tok;
    Py_DECREF(enc);
    name_entry_t *chunk = cn_state.name_chunks[id / NAME_CHUNK];
    if (chunk == NULL) {
        chunk = calloc(NAME_CHUNK, sizeof(name_entry_t));
        if (chunk == NULL) {
            free(b.data);
            PyErr_NoMemory();
            return UINT32_MAX;
        }
        cn_state.name_chunks[id / NAME_CHUNK] = chunk;
    }
    chunk[id % NAME_CHUNK].tok = b.data;
    chunk[id % NAME_CHUNK].len = (uint32_t)b.len;
    chunk[id % NAME_CHUNK].raw = raw;
    chunk[id % NAME_CHUNK].raw_len = raw_len;
    PyObject *key = PyLong_FromUnsignedLong(id);
    if (key == NULL || PyDict_SetItem(cn_state.name_ids, name, key) < 0 ||
        PyList_Append(cn_state.name_objs, name) < 0) {
        Py_XDECREF(key);
        return UINT32_MAX;
    }
    Py_DECREF(key);
    atomic_store_explicit(&cn_state.name_count, id + 1, memory_order_release);
    return id;
}

/* ======================================================================================
 * 3. Rings
 * ==================================================================================== */

static _Thread_local ring_t *tl_ring;

static void
wake_drainer(void)
{
    if (!atomic_exchange_explicit(&cn_state.wake_flag, 1, memory_order_acq_rel) &&
        atomic_load_explicit(&cn_state.drainer_sleeping, memory_order_acquire)) {
        pthread_mutex_lock(&cn_state.wake_mu);
        pthread_cond_signal(&cn_state.wake_cv);
        pthread_mutex_unlock(&cn_state.wake_mu);
    }
}

static void
ring_thread_exit(void *p)
{
    /* Runs at thread exit without the GIL: only hand the ring to the drainer. */
    ring_t *r = p;
    if (r != NULL)
        atomic_store_explicit(&r->orphaned, 1, memory_order_release);
}

static ring_t *
ring_create(void)
{
    ring_t *r = calloc(1, sizeof(ring_t));
    if (r == NULL)
        return NULL;
    uint64_t cap = 64;
    while (cap < cn_state.ring_capacity)
        cap <<= 1;
    /* cap marks + room so a two-slot span never wraps onto itself */
    r->slots = malloc(sizeof(slot_t) * cap);
    if (r->slots == NULL) {
        free(r);
        return NULL;
    }
    r->cap = cap;
    r->mask = cap - 1;
    r->hw = cap / 2;
    r->thread_id = (uint64_t)PyThread_get_thread_ident();
    rng_seed(&r->rng);
    pthread_mutex_lock(&cn_state.registry_mu);
    r->next = cn_state.rings;
    cn_state.rings = r;
    pthread_mutex_unlock(&cn_state.registry_mu);
    atomic_fetch_add(&cn_state.rings_created, 1);
    return r;
}

/* GIL held: threading.current_thread().name as malloc'd UTF-8 (NULL when unavailable). Read
 * once per thread, when its ring is made (its first scope or mark): thread.name on its
 * exported spans. A later rename is not seen. */
static char *
current_thread_name(uint32_t *len)
{
    PyObject *et, *ev, *tb;
    PyErr_Fetch(&et, &ev, &tb);
    char *out = NULL;
    PyObject *mod = PyImport_ImportModule("threading");
    PyObject *t = mod ? PyObject_CallMethod(mod, "current_thread", NULL) : NULL;
    PyObject *name = t ? PyObject_GetAttrString(t, "name") : NULL;
    Py_ssize_t n = 0;
    const char *u = name && PyUnicode_Check(name) ? PyUnicode_AsUTF8AndSize(name, &n) : NULL;
    if (u != NULL && n > 0 && n <= 4096 && (out = malloc((size_t)n)) != NULL) {
        memcpy(out, u, (size_t)n);
        *len = (uint32_t)n;
    }
    Py_XDECREF(name);
    Py_XDECREF(t);
    Py_XDECREF(mod);
    PyErr_Clear();
    PyErr_Restore(et, ev, tb);
    return out;
}

static ring_t *
get_ring_slow(void)
{
    ring_t *r = ring_create();
    if (r == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    tl_ring = r;
    pthread_setspecific(cn_state.ring_key, r);
    /* after tl_ring is set: current_thread() may run Python code that records */
    uint32_t len = 0;
    char *name = current_thread_name(&len);
    if (name != NULL) {
        pthread_mutex_lock(&cn_state.registry_mu); /* the collector reads it under this lock */
        r->thread_name = name;
        r->thread_name_len = len;
        pthread_mutex_unlock(&cn_state.registry_mu);
    }
    return r;
}

static inline ring_t *
get_ring(void)
{
    ring_t *r = tl_ring;
    if (r != NULL)
        return r;
    return get_ring_slow();
}

static void
slot_release_refs(slot_t *s)
{
    /* GIL held */
    Py_CLEAR(s->name_ref);
    Py_CLEAR(s->obj);
    Py_CLEAR(s->attrs);
}

static void
warn_once(int *flag, const char *msg)
{
    if (*flag)
        return;
    *flag = 1;
    PyObject *et, *ev, *tb;
    PyErr_Fetch(&et, &ev, &tb);
    PyObject *cat = cn_state.warning_category ? cn_state.warning_category : PyExc_UserWarning;
    if (PyErr_WarnEx(cat, msg, 1) < 0)
        PyErr_Clear(); /* telemetry never raises into user code, even under -W error */
    PyErr_Restore(et, ev, tb);
}

/* Make room for `need` slots. Called when the cached tail says the ring is full. */
static void
ring_make_room(ring_t *r, uint64_t h, uint64_t need)
{
    r->cached_tail = atomic_load_explicit(&r->tail, memory_order_acquire);
    if (h + need - r->cached_tail <= r->cap)
        return;
    wake_drainer();
    int64_t wait_ns = atomic_load_explicit(&cn_state.full_wait_ns, memory_order_relaxed);
    if (wait_ns > 0 && !r->no_wait) {
        /* Backpressure: the drainer is running but behind. Give it the GIL and a moment
         * rather than lose data; give up after wait_ns and drop from then on until it
         * catches up. */
        int64_t start = wall_ns();
        Py_BEGIN_ALLOW_THREADS
        struct timespec pause = {0, 50000};
        for (;;) {
            nanosleep(&pause, NULL);
            r->cached_tail = atomic_load_explicit(&r->tail, memory_order_acquire);
            if (h + need - r->cached_tail <= r->cap)
                break;
            /* keep waiting while the pipeline moves; give up once it has stalled */
            int64_t progress = atomic_load_explicit(&cn_state.progress_ns, memory_order_relaxed);
            if (wall_ns() - (progress > start ? progress : start) > wait_ns) {
                r->no_wait = 1;
                break;
            }
        }
        Py_END_ALLOW_THREADS
        if (h + need - r->cached_tail <= r->cap)
            return;
    }
    /* Drop the oldest records: claim them from the consumer's side with a CAS. */
    while (h + need - r->cached_tail > r->cap) {
        uint64_t t = r->cached_tail;
        slot_t *s = &r->slots[t & r->mask];
        uint64_t len = s->type == R_SPAN ? 2 : 1;
        if (atomic_compare_exchange_strong_explicit(&r->tail, &t, t + len, memory_order_acq_rel,
                                                    memory_order_acquire)) {
            if (s->type == R_SPAN)
                atomic_store_explicit(&r->spans_dropped,
                                      atomic_load_explicit(&r->spans_dropped, memory_order_relaxed) + 1,
                                      memory_order_relaxed);
            else
                atomic_store_explicit(&r->marks_dropped,
                                      atomic_load_explicit(&r->marks_dropped, memory_order_relaxed) + 1,
                                      memory_order_relaxed);
            if (s->flags & F_REFS)
                slot_release_refs(s);
            r->cached_tail = t + len;
        }
        else {
            r->cached_tail = t; /* the consumer moved on: re-check */
        }
    }
    warn_once(&r->warned_full,
              "cirron_otel: a thread's record ring is full; the oldest records are being dropped "
              "(counted in health()['mark_drop_count'] / ['span_drop_count']). Raise "
              "profile(ring_capacity=...) or flush more often.");
}

static inline slot_t *
ring_reserve(ring_t *r, uint64_t need)
{
    uint64_t h = atomic_load_explicit(&r->head, memory_order_relaxed);
    if (h + need - r->cached_tail > r->cap)
        ring_make_room(r, h, need);
    return &r->slots[h & r->mask];
}

static inline void
ring_publish(ring_t *r, uint64_t n)
{
    uint64_t h = atomic_load_explicit(&r->head, memory_order_relaxed) + n;
    atomic_store_explicit(&r->head, h, memory_order_release);
    uint64_t used = h - r->cached_tail;
    if (used >= r->hw && used - n < r->hw) {
        r->no_wait = 0;
        wake_drainer();
    }
}

static inline void
counter_inc(_Atomic uint64_t *c)
{
    /* single writer: a relaxed load+store is enough and avoids a locked instruction */
    atomic_store_explicit(c, atomic_load_explicit(c, memory_order_relaxed) + 1, memory_order_relaxed);
}

/* ======================================================================================
 * 4. Value coercion
 * ==================================================================================== */

/* Load numpy's scalar base classes if (and only if) the user has imported numpy. */
static int
numpy_types_ready(void)
{
    if (cn_state.numpy_generic != NULL)
        return 1;
    PyObject *modules = PyImport_GetModuleDict();
    PyObject *np = PyDict_GetItemString(modules, "numpy");
    if (np == NULL)
        return 0;
    cn_state.numpy_generic = PyObject_GetAttrString(np, "generic");
    cn_state.numpy_floating = PyObject_GetAttrString(np, "floating");
    cn_state.numpy_integer = PyObject_GetAttrString(np, "integer");
    cn_state.numpy_bool = PyObject_GetAttrString(np, "bool_");
    if (!cn_state.numpy_generic || !cn_state.numpy_floating || !cn_state.numpy_integer || !cn_state.numpy_bool) {
        PyErr_Clear();
        Py_CLEAR(cn_state.numpy_generic);
        Py_CLEAR(cn_state.numpy_floating);
        Py_CLEAR(cn_state.numpy_integer);
        Py_CLEAR(cn_state.numpy_bool);
        return 0;
    }
    return 1;
}

static int
coerce_int(PyObject *value, coerced_t *out)
{
    int overflow = 0;
    long long x = PyLong_AsLongLongAndOverflow(value, &overflow);
    if (overflow) {
        PyErr_Format(PyExc_OverflowError, "cirron_otel.mark(): int value %R is outside int64", value);
        return -1;
    }
    if (x == -1 && PyErr_Occurred())
        return -1;
    out->vtype = VT_INT;
    out->v.i = x;
    return 0;
}

/* Slow path: subclasses, numpy scalars, and the errors. */
static int
coerce_value_slow(PyObject *value, coerced_t *out, int depth)
{
    if (PyBool_Check(value)) {
        out->vtype = VT_BOOL;
        out->v.i = value == Py_True;
        return 0;
    }
    if (PyLong_Check(value))
        return coerce_int(value, out);
    if (PyFloat_Check(value)) {
        out->vtype = VT_FLOAT;
        out->v.d = PyFloat_AS_DOUBLE(value);
        return 0;
    }
    if (PyUnicode_Check(value)) {
        out->vtype = VT_STRING;
        Py_INCREF(value);
        out->str = value;
        return 0;
    }
    if (depth == 0 && numpy_types_ready()) {
        int r = PyObject_IsInstance(value, cn_state.numpy_generic);
        if (r < 0)
            return -1;
        if (r) {
            PyObject *conv = NULL;
            if (PyObject_IsInstance(value, cn_state.numpy_bool) == 1)
                conv = PyBool_FromLong(PyObject_IsTrue(value));
            else if (PyObject_IsInstance(value, cn_state.numpy_integer) == 1)
                conv = PyNumber_Long(value);
            else if (PyObject_IsInstance(value, cn_state.numpy_floating) == 1)
                conv = PyNumber_Float(value);
            if (conv != NULL) {
                int rc = coerce_value_slow(conv, out, 1);
                Py_DECREF(conv);
                return rc;
            }
            if (PyErr_Occurred())
                return -1;
        }
    }
    const char *tname = Py_TYPE(value)->tp_name;
    if (PyObject_HasAttr(value, cn_state.str_item) && (PyObject_HasAttrString(value, "shape") ||
                                                PyObject_HasAttrString(value, "dtype"))) {
        PyErr_Format(PyExc_TypeError,
                     "cirron_otel.mark() value must be float, int, str or bool; got %s "
                     "(an array or tensor: pass a scalar, e.g. value.item())",
                     tname);
    }
    else {
        PyErr_Format(PyExc_TypeError,
                     "cirron_otel.mark() value must be float, int, str or bool; got %s", tname);
    }
    return -1;
}

static inline int
coerce_value(PyObject *value, coerced_t *out)
{
    PyTypeObject *t = Py_TYPE(value);
    if (t == &PyFloat_Type) {
        out->vtype = VT_FLOAT;
        out->v.d = PyFloat_AS_DOUBLE(value);
        return 0;
    }
    if (t == &PyLong_Type)
        return coerce_int(value, out);
    if (t == &PyBool_Type) {
        out->vtype = VT_BOOL;
        out->v.i = value == Py_True;
        return 0;
    }
    return coerce_value_slow(value, out, 0);
}

/* Name -> interned id (or a reference in the record when the table is full). */
static inline int
resolve_name(ring_t *r, PyObject *name, uint32_t *id_out, PyObject **ref_out, const char *what)
{
    name_cache_t *e = &r->name_cache[((uintptr_t)name >> 4) & (NAME_CACHE_SIZE - 1)];
    if (e->key == name) {
        *id_out = e->id;
        return 0;
    }
    if (!PyUnicode_Check(name)) {
        PyErr_Format(PyExc_TypeError, "cirron_otel.%s() name must be a str, not %s", what,
                     Py_TYPE(name)->tp_name);
        return -1;
    }
    if (PyUnicode_GET_LENGTH(name) == 0) {
        PyErr_Format(PyExc_ValueError, "cirron_otel.%s() name must be a non-empty string", what);
        return -1;
    }
    uint32_t id = name_intern_slow(name);
    if (id == UINT32_MAX)
        return -1;
    if (id == UINT32_MAX - 1) {
        Py_INCREF(name);
        *ref_out = name;
        *id_out = 0;
        return 0;
    }
    Py_INCREF(name);
    Py_XSETREF(e->key, name);
    e->id = id;
    *id_out = id;
    return 0;
}

/* Attribute values are captured at the call: the collector renders them later, so a list
 * or dict the caller mutates afterwards must not change what is written. Built-in mutable
 * containers are copied (lists, dicts and tuples structurally, recursively; sets and
 * bytearrays as the str() they are rendered as anyway). Scalars and other objects are kept
 * by reference (other objects are rendered by their str() at collection). */
#define ATTR_COPY_BUDGET 100000 /* items examined per call; past it, values are kept as is */

typedef struct {
    PyObject *path[ATTR_MAX_DEPTH + 1];
    int n;
    Py_ssize_t budget;
} capture_t;

static inline int
attr_needs_copy(PyObject *v)
{
    PyTypeObject *t = Py_TYPE(v);
    if (t == &PyFloat_Type || t == &PyLong_Type || t == &PyUnicode_Type || t == &PyBool_Type)
        return 0;
    return PyList_Check(v) || PyDict_Check(v) || PyTuple_Check(v) || PySet_Check(v) ||
           PyByteArray_Check(v);
}

static PyObject *
attr_str_now(PyObject *v)
{
    PyObject *str = PyObject_Str(v);
    if (str == NULL) {
        PyErr_Clear();
        return Py_NewRef(v); /* rendered (as str() or "<unserializable>") at collection */
    }
    return str;
}

static int
tuple_needs_copy(PyObject *t)
{
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(t); i++)
        if (attr_needs_copy(PyTuple_GET_ITEM(t, i)))
            return 1;
    return 0;
}

/* New reference: v itself, or its snapshot. Never fails (falls back to v). */
static PyObject *
attr_capture(PyObject *v, capture_t *c)
{
    if (!attr_needs_copy(v) || c->budget <= 0)
        return Py_NewRef(v);
    c->budget--;
    if (PySet_Check(v) || PyByteArray_Check(v))
        return attr_str_now(v);
    for (int i = 0; i < c->n; i++)
        if (c->path[i] == v)
            return attr_str_now(v); /* a cycle: what the renderer writes for it */
    if (c->n >= ATTR_MAX_DEPTH)
        return attr_str_now(v);
    PyObject *out = NULL;
    c->path[c->n++] = v;
    if (PyDict_Check(v)) {
        /* over a list of the items: a str() run below may be user code that changes v */
        PyObject *items = PyDict_Items(v);
        out = items ? PyDict_New() : NULL;
        for (Py_ssize_t i = 0; out != NULL && i < PyList_GET_SIZE(items); i++) {
            PyObject *kv = PyList_GET_ITEM(items, i);
            c->budget--;
            PyObject *cx = attr_capture(PyTuple_GET_ITEM(kv, 1), c);
            if (PyDict_SetItem(out, PyTuple_GET_ITEM(kv, 0), cx) < 0)
                Py_CLEAR(out);
            Py_DECREF(cx);
        }
        Py_XDECREF(items);
    }
    else if (PyTuple_Check(v) && !tuple_needs_copy(v)) {
        out = Py_NewRef(v);
    }
    else {
        /* list or tuple: a list is copied, a tuple only when one of its items was */
        PyObject *seq = PySequence_List(v);
        Py_ssize_t n = seq ? PyList_GET_SIZE(seq) : 0;
        int changed = PyList_Check(v);
        for (Py_ssize_t i = 0; seq != NULL && i < n; i++) {
            PyObject *x = PyList_GET_ITEM(seq, i);
            c->budget--;
            if (!attr_needs_copy(x))
                continue;
            PyObject *cx = attr_capture(x, c);
            changed |= cx != x;
            PyList_SetItem(seq, i, cx); /* steals cx, releases x */
        }
        if (seq != NULL)
            out = changed ? (PyList_Check(v) ? Py_NewRef(seq) : PyList_AsTuple(seq)) : Py_NewRef(v);
        Py_XDECREF(seq);
    }
    c->n--;
    if (out == NULL) {
        PyErr_Clear();
        return Py_NewRef(v);
    }
    return out;
}

/* the value to store for one attribute (new reference; never fails) */
static inline PyObject *
attr_value(PyObject *v)
{
    if (!attr_needs_copy(v))
        return Py_NewRef(v);
    capture_t c = {.n = 0, .budget = ATTR_COPY_BUDGET};
    return attr_capture(v, &c);
}

/* ======================================================================================
 * 5. Scopes
 * ==================================================================================== */

static PyTypeObject Scope_Type;

static ScopeObject *
scope_alloc(void)
{
    ScopeObject *s;
    if (cn_state.scope_free_n > 0) {
        s = cn_state.scope_freelist[--cn_state.scope_free_n];
        PyObject_Init((PyObject *)s, &Scope_Type);
    }
    else {
        s = PyObject_New(ScopeObject, &Scope_Type);
        if (s == NULL)
            return NULL;
    }
    s->name = s->attrs = s->token = s->exc = NULL;
    s->state = ST_NEW;
    s->has_index = 0;
    s->span_flags = 0;
    s->attrs_shared = 0;
    s->code_id = 0;
    s->index = 0;
    s->depth = 0;
    s->span_hi = s->span_lo = s->parent_hi = s->parent_lo = s->trace_hi = s->trace_lo = 0;
    s->start_ns = s->end_ns = 0;
    s->cpu_start = -1;
    s->pid = 0;
    return s;
}

static int scope_close(ScopeObject *self, PyObject *exc_type, PyObject *exc);
static int scope_close_at(ScopeObject *self, PyObject *exc_type, PyObject *exc, int64_t end);

static void
Scope_dealloc(ScopeObject *self)
{
    if (self->state == ST_OPEN) {
        /* Entered and never exited (its context is gone): keep the span, leave contexts be. */
        PyObject *et, *ev, *tb;
        PyErr_Fetch(&et, &ev, &tb);
        Py_CLEAR(self->token);
        scope_close(self, NULL, NULL);
        PyErr_Clear();
        PyErr_Restore(et, ev, tb);
    }
    Py_CLEAR(self->name);
    Py_CLEAR(self->attrs);
    Py_CLEAR(self->token);
    Py_CLEAR(self->exc);
    if (cn_state.scope_free_n < SCOPE_FREELIST_MAX)
        cn_state.scope_freelist[cn_state.scope_free_n++] = self;
    else
        PyObject_Free(self);
}

static int
parse_index(PyObject *index, ScopeObject *s)
{
    if (index == NULL || index == Py_None)
        return 0;
    if (PyBool_Check(index) || !PyIndex_Check(index)) {
        PyErr_Format(PyExc_TypeError, "cirron_otel.scope() index must be an int or None, not %s",
                     Py_TYPE(index)->tp_name);
        return -1;
    }
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(index, &overflow);
    if (overflow || (v == -1 && PyErr_Occurred())) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_OverflowError, "cirron_otel.scope() index is outside int64");
        return -1;
    }
    s->index = v;
    s->has_index = 1;
    return 0;
}

/* Open `s` (state NEW) as the innermost scope of the current thread/task. New ref or NULL. */
/* The innermost OpenTelemetry span, when one is active in this thread/task and newer than
 * the innermost Cirron scope `cur`. The OpenTelemetry runtime context installed by
 * cirron_otel keeps (context, anchor, trace_hi, trace_lo, span_id, flags) in cn_state.otel_var,
 * where anchor is the Cirron scope that was innermost when the context was attached. */
static int
otel_parent(PyObject *cur, uint64_t *trace_hi, uint64_t *trace_lo, uint64_t *span_id, int *sampled)
{
    PyObject *o = NULL;
    if (PyContextVar_Get(cn_state.otel_var, NULL, &o) < 0) {
        PyErr_Clear();
        return 0;
    }
    int found = 0;
    if (o != NULL && PyTuple_CheckExact(o) && PyTuple_GET_SIZE(o) == 6 &&
        PyTuple_GET_ITEM(o, 1) == (cur ? cur : Py_None)) {
        uint64_t sid = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(o, 4));
        if (sid != 0 && sid != (uint64_t)-1) {
            *trace_hi = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(o, 2));
            *trace_lo = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(o, 3));
            *span_id = sid;
            *sampled = (int)(PyLong_AsLong(PyTuple_GET_ITEM(o, 5)) & 1);
            found = !PyErr_Occurred();
        }
        PyErr_Clear();
    }
    Py_XDECREF(o);
    return found;
}

/* Sampling of the traces Cirron starts (OTEL_TRACES_SAMPLER, set by profile() through
 * set_sampler): decided once, when the trace's root opens, and inherited by every span of
 * the trace (SF_UNSAMPLED), so OpenTelemetry sees the same decision (trace flags,
 * traceparent). As the SDK's TraceIdRatioBased: sampled iff the trace id's low 64 bits are
 * below the bound. Under an application's span, its own decision stands (otel_parent). */

static inline uint8_t
root_sampling(uint64_t trace_lo)
{
    return (cn_state.sample_all || trace_lo < cn_state.sample_bound) ? 0 : SF_UNSAMPLED;
}

/* A new trace rooted at `s`: its id, and whether it is sampled. */
static inline void
scope_new_trace(ScopeObject *s, ring_t *r)
{
    s->trace_hi = rng_next(&r->rng);
    s->trace_lo = rng_nonzero(&r->rng);
    s->span_flags = (uint8_t)((s->span_flags & ~SF_UNSAMPLED) | root_sampling(s->trace_lo));
}

static inline void
scope_inherit(ScopeObject *s, const ScopeObject *parent)
{
    s->parent_hi = parent->span_hi;
    s->parent_lo = parent->span_lo;
    s->trace_hi = parent->trace_hi;
    s->trace_lo = parent->trace_lo;
}

/* The scope is open from now on (its clock starts last, so setup is not counted);
 * ts == 0: read the clock now. */
static inline void
scope_start(ScopeObject *s, int64_t ts)
{
    s->pid = cn_state.pid;
    s->state = ST_OPEN;
    if (cn_state.capture_cpu)
        s->cpu_start = thread_cpu_ns();
    s->start_ns = ts ? ts : wall_ns();
}

enum { PUSH_TOKEN = 1, PUSH_REPLACE = 2 };

/* Open `s` under `cur` (borrowed: the innermost scope, or NULL). PUSH_TOKEN makes it the
 * context's current scope and keeps the token to restore at close; PUSH_REPLACE (iterators)
 * replaces the current value and lets the iterator restore the context once at the end. */
static int
scope_open_under(ScopeObject *s, ring_t *r, int64_t ts, PyObject *cur, int push)
{
    ScopeObject *inner = (ScopeObject *)cur;
    int depth = inner ? inner->depth + 1 : 1;
    if (depth > MAX_DEPTH) {
        s->state = ST_DROPPED;
        counter_inc(&r->depth_drops);
        warn_once(&r->warned_depth,
                  "cirron_otel: scopes nested deeper than 64 on this thread are dropped "
                  "(counted in health()['scope_drop_count']).");
        if (push == PUSH_REPLACE) { /* the previous item's scope must not stay current */
            PyObject *tok = PyContextVar_Set(cn_state.scope_var, cur ? cur : Py_None);
            if (tok == NULL)
                return -1;
            Py_DECREF(tok);
        }
        return 0;
    }
    s->depth = (uint16_t)depth;
    s->span_hi = rng_nonzero(&r->rng);
    s->span_lo = rng_next(&r->rng);
    s->span_flags = 0;
    uint64_t ot_hi, ot_lo, ot_span;
    int ot_sampled;
    if (cn_state.otel_context && cn_state.otel_attached && otel_parent(cur, &ot_hi, &ot_lo, &ot_span, &ot_sampled)) {
        /* a foreign span's spool id: its span id, then the first half of its trace id */
        s->parent_hi = ot_span;
        s->parent_lo = ot_hi;
        s->trace_hi = ot_hi;
        s->trace_lo = ot_lo;
        s->span_flags = SF_OTEL_PARENT | (ot_sampled ? 0 : SF_UNSAMPLED);
    }
    else if (inner) {
        scope_inherit(s, inner);
        s->span_flags = inner->span_flags & SF_UNSAMPLED;
    }
    else if (cn_state.session) {
        scope_inherit(s, cn_state.session);
        if (cn_state.trace_per_child) {
            scope_new_trace(s, r);
            s->span_flags |= SF_NEW_TRACE;
        }
        else
            s->span_flags = cn_state.session->span_flags & SF_UNSAMPLED;
    }
    else {
        scope_new_trace(s, r);
    }
    PyObject *tok = PyContextVar_Set(cn_state.scope_var, (PyObject *)s);
    if (tok == NULL)
        return -1;
    if (push == PUSH_TOKEN)
        s->token = tok;
    else
        Py_DECREF(tok);
    scope_start(s, ts);
    return 0;
}

static int
scope_open(ScopeObject *s, ring_t *r, int64_t ts)
{
    PyObject *cur = NULL;
    if (PyContextVar_Get(cn_state.scope_var, NULL, &cur) < 0)
        return -1;
    if (cur == Py_None)
        Py_CLEAR(cur);
    int rc = scope_open_under(s, r, ts, cur, PUSH_TOKEN);
    Py_XDECREF(cur);
    return rc;
}

static void
fill_error(ScopeObject *self, PyObject *exc_type, PyObject *exc)
{
    /* Exception path only: record error=True, error.type, error.message in attrs. */
    PyObject *et, *ev, *tb;
    PyErr_Fetch(&et, &ev, &tb);
    if (self->attrs == NULL)
        self->attrs = PyDict_New();
    if (self->attrs != NULL && PyDict_Check(self->attrs)) {
        PyDict_SetItemString(self->attrs, "error", Py_True);
        PyObject *tname = PyObject_GetAttrString(exc_type, "__qualname__");
        PyObject *mod = PyObject_GetAttrString(exc_type, "__module__");
        PyObject *full = NULL;
        if (tname && mod && PyUnicode_Check(mod) && PyUnicode_Check(tname) &&
            PyUnicode_CompareWithASCIIString(mod, "builtins") != 0)
            full = PyUnicode_FromFormat("%U.%U", mod, tname);
        else if (tname) {
            Py_INCREF(tname);
            full = tname;
        }
        if (full)
            PyDict_SetItemString(self->attrs, "error.type", full);
        Py_XDECREF(full);
        Py_XDECREF(tname);
        Py_XDECREF(mod);
        PyObject *msg = exc && exc != Py_None ? PyObject_Str(exc) : PyUnicode_FromString("");
        if (msg != NULL) {
            Py_ssize_t n;
            const char *u = PyUnicode_AsUTF8AndSize(msg, &n);
            if (u != NULL && n > ERROR_MESSAGE_CAP) {
                Py_ssize_t cut = ERROR_MESSAGE_CAP;
                while (cut > 0 && ((unsigned char)u[cut] & 0xC0) == 0x80)
                    cut--;
                PyObject *short_msg = PyUnicode_DecodeUTF8(u, cut, "ignore");
                Py_SETREF(msg, short_msg);
            }
            if (msg)
                PyDict_SetItemString(self->attrs, "error.message", msg);
            Py_XDECREF(msg);
        }
    }
    PyErr_Clear();
    if (exc != NULL && exc != Py_None) {
        Py_INCREF(exc);
        Py_XSETREF(self->exc, exc);
    }
    PyErr_Restore(et, ev, tb);
}

/* Close an open scope: restore the context and write the span record. Never raises. */
static int scope_close_at(ScopeObject *self, PyObject *exc_type, PyObject *exc, int64_t end);

static int
scope_close(ScopeObject *self, PyObject *exc_type, PyObject *exc)
{
    return scope_close_at(self, exc_type, exc, 0);
}

/* end == 0: read the clock now */
static int
scope_close_at(ScopeObject *self, PyObject *exc_type, PyObject *exc, int64_t end)
{
    if (self->state != ST_OPEN) {
        if (self->state == ST_DROPPED)
            self->state = ST_CLOSED;
        return 0;
    }
    if (end == 0)
        end = wall_ns();
    int64_t cpu = -1;
    if (self->cpu_start >= 0)
        cpu = thread_cpu_ns() - self->cpu_start;
    self->state = ST_CLOSED;
    self->end_ns = end;
    if (self->token != NULL) {
        if (PyContextVar_Reset(cn_state.scope_var, self->token) < 0) {
            /* exited in another context (e.g. an abandoned iterator collected elsewhere) */
            PyErr_Clear();
        }
        Py_CLEAR(self->token);
    }
    if (self->pid != cn_state.pid) /* opened before fork(): the parent process owns this span */
        return 0;
    if (!atomic_load_explicit(&cn_state.recording, memory_order_relaxed))
        return 0;
    if (exc_type != NULL && exc_type != Py_None)
        fill_error(self, exc_type, exc);
    ring_t *r = get_ring();
    if (r == NULL) {
        PyErr_Clear();
        return 0;
    }
    PyObject *rec_attrs = NULL;
    if (self->attrs != NULL && PyDict_GET_SIZE(self->attrs) > 0) {
        /* A dict only scope() saw holds values captured at the call: the record shares it.
         * One the caller could reach (scope.attrs) is captured now, before the slot is
         * reserved (a str() run here may be user code that marks). */
        rec_attrs = self->attrs_shared ? attr_value(self->attrs) : Py_NewRef(self->attrs);
    }
    slot_t *s = ring_reserve(r, 2);
    uint64_t h = atomic_load_explicit(&r->head, memory_order_relaxed);
    slot2_t *s2 = (slot2_t *)&r->slots[(h + 1) & r->mask];
    s->type = R_SPAN;
    s->vtype = self->span_flags;
    s->flags = (self->has_index ? F_HAS_INDEX : 0) | (cpu >= 0 ? F_HAS_CPU : 0);
    s->name_id = self->name_id;
    s->ts = self->start_ns;
    s->span_hi = self->span_hi;
    s->span_lo = self->span_lo;
    s->v.i = end;
    s->name_ref = NULL;
    s->obj = NULL;
    s->attrs = NULL;
    if (self->name_id == UINT32_MAX - 1) {
        Py_INCREF(self->name);
        s->name_ref = self->name;
        s->flags |= F_NAME_REF | F_REFS;
    }
    if (rec_attrs != NULL) {
        s->obj = rec_attrs;
        s->flags |= F_REFS;
    }
    if (self->exc != NULL) {
        s->attrs = self->exc;
        self->exc = NULL;
        s->flags |= F_REFS | F_ERROR;
    }
    else if (exc_type != NULL && exc_type != Py_None) {
        s->flags |= F_ERROR;
    }
    s2->type = R_SPAN2;
    s2->parent_hi = self->parent_hi;
    s2->parent_lo = self->parent_lo;
    s2->trace_hi = self->trace_hi;
    s2->trace_lo = self->trace_lo;
    s2->index = self->index;
    s2->cpu_ns = cpu;
    s2->thread_id = r->thread_id;
    s2->code_id = self->code_id;
    counter_inc(&r->spans_recorded);
    ring_publish(r, 2);
    return 0;
}

static ScopeObject *
scope_make(PyObject *name, PyObject *index, PyObject *attrs, ring_t *r)
{
    uint32_t id;
    PyObject *ref = NULL;
    if (resolve_name(r, name, &id, &ref, "scope") < 0)
        return NULL;
    ScopeObject *s = scope_alloc();
    if (s == NULL) {
        Py_XDECREF(ref);
        return NULL;
    }
    Py_XDECREF(ref);
    if (ref != NULL)
        id = UINT32_MAX - 1;
    s->name_id = id;
    Py_INCREF(name);
    s->name = name;
    if (parse_index(index, s) < 0) {
        Py_DECREF(s);
        return NULL;
    }
    if (attrs != NULL) {
        Py_INCREF(attrs);
        s->attrs = attrs;
        s->attrs_shared = 1;
    }
    return s;
}

/* GIL held: a str's UTF-8 (lone surrogates backslash-escaped), malloc'd; NULL on failure. */
static char *
utf8_dup(PyObject *str, uint32_t *len)
{
    PyObject *enc = PyUnicode_AsEncodedString(str, "utf-8", "backslashreplace");
    if (enc == NULL)
        return NULL;
    Py_ssize_t n = PyBytes_GET_SIZE(enc);
    char *out = n <= UINT32_MAX ? malloc((size_t)n + 1) : NULL;
    if (out != NULL) {
        memcpy(out, PyBytes_AS_STRING(enc), (size_t)n + 1);
        *len = (uint32_t)n;
    }
    Py_DECREF(enc);
    if (out == NULL && !PyErr_Occurred())
        PyErr_NoMemory();
    return out;
}

/* code_location(function, file, line) -> id: register a decorated function's location */
static PyObject *
mod_code_location(PyObject *m, PyObject *args)
{
    PyObject *func, *file, *line;
    if (!PyArg_ParseTuple(args, "UOO:code_location", &func, &file, &line))
        return NULL;
    if (file != Py_None && !PyUnicode_Check(file)) {
        PyErr_SetString(PyExc_TypeError, "code_location() file must be a str or None");
        return NULL;
    }
    int64_t ln = -1;
    if (line != Py_None) {
        long long v = PyLong_AsLongLong(line);
        if (v == -1 && PyErr_Occurred())
            return NULL;
        ln = v < 0 ? -1 : v;
    }
    uint32_t id = atomic_load_explicit(&cn_state.code_n, memory_order_relaxed);
    if (id >= CODE_MAX)
        return PyLong_FromLong(0);
    code_loc_t c = {.line = ln};
    if ((c.func = utf8_dup(func, &c.func_len)) == NULL)
        return NULL;
    if (file != Py_None && (c.file = utf8_dup(file, &c.file_len)) == NULL) {
        free(c.func);
        return NULL;
    }
    code_loc_t **chunk = &cn_state.code_chunks[id / CODE_CHUNK];
    if (*chunk == NULL && (*chunk = calloc(CODE_CHUNK, sizeof(code_loc_t))) == NULL) {
        free(c.func);
        free(c.file);
        return PyErr_NoMemory();
    }
    (*chunk)[id % CODE_CHUNK] = c;
    atomic_store_explicit(&cn_state.code_n, id + 1, memory_order_release);
    return PyLong_FromUnsignedLong(id);
}

static PyObject *mod_scope(PyObject *m, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames);

/* code_scope(code, name, index=None, **attrs): scope() for the decorator, its span carrying
 * the code location `code` (an id from code_location()). */
static PyObject *
mod_code_scope(PyObject *m, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    if (nargs < 1) {
        PyErr_SetString(PyExc_TypeError, "code_scope() missing required argument 'code'");
        return NULL;
    }
    unsigned long id = PyLong_AsUnsignedLong(args[0]);
    if (id == (unsigned long)-1 && PyErr_Occurred())
        return NULL;
    if (id >= atomic_load_explicit(&cn_state.code_n, memory_order_relaxed)) {
        PyErr_Format(PyExc_ValueError, "code_scope(): unknown code location %lu", id);
        return NULL;
    }
    PyObject *s = mod_scope(m, args + 1, nargs - 1, kwnames);
    if (s != NULL)
        ((ScopeObject *)s)->code_id = (uint32_t)id;
    return s;
}

/* scope(name, index=None, **attrs) */
static PyObject *
mod_scope(PyObject *m, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *name = NULL, *index = NULL, *attrs = NULL;
    if (nargs < 1 || nargs > 2) {
        if (nargs == 0 && kwnames == NULL) {
            PyErr_SetString(PyExc_TypeError, "cirron_otel.scope() missing required argument 'name'");
            return NULL;
        }
        if (nargs > 2) {
            PyErr_Format(PyExc_TypeError,
                         "cirron_otel.scope() takes at most 2 positional arguments (%zd given)", nargs);
            return NULL;
        }
    }
    if (nargs >= 1)
        name = args[0];
    if (nargs == 2)
        index = args[1];
    if (kwnames != NULL) {
        Py_ssize_t nk = PyTuple_GET_SIZE(kwnames);
        for (Py_ssize_t i = 0; i < nk; i++) {
            PyObject *k = PyTuple_GET_ITEM(kwnames, i);
            PyObject *v = args[nargs + i];
            if (index == NULL && nargs < 2 && PyUnicode_Compare(k, cn_state.str_index) == 0) {
                index = v;
                continue;
            }
            if (name == NULL && PyUnicode_CompareWithASCIIString(k, "name") == 0) {
                name = v;
                continue;
            }
            if (attrs == NULL && (attrs = PyDict_New()) == NULL)
                return NULL;
            PyObject *cv = attr_value(v); /* captured now, rendered later */
            int rc = PyDict_SetItem(attrs, k, cv);
            Py_DECREF(cv);
            if (rc < 0) {
                Py_DECREF(attrs);
                return NULL;
            }
        }
    }
    if (name == NULL) {
        Py_XDECREF(attrs);
        PyErr_SetString(PyExc_TypeError, "cirron_otel.scope() missing required argument 'name'");
        return NULL;
    }
    ring_t *r = get_ring();
    if (r == NULL) {
        Py_XDECREF(attrs);
        return NULL;
    }
    ScopeObject *s = scope_make(name, index, NULL, r);
    if (s != NULL)
        s->attrs = attrs;
    else
        Py_XDECREF(attrs);
    return (PyObject *)s;
}

static PyObject *
Scope_enter(ScopeObject *self, PyObject *Py_UNUSED(ignored))
{
    if (self->state != ST_NEW) {
        PyErr_SetString(PyExc_RuntimeError,
                        "cirron_otel: a scope handle can be entered once; call ci.scope(...) again");
        return NULL;
    }
    ring_t *r = get_ring();
    if (r == NULL || scope_open(self, r, 0) < 0)
        return NULL;
    Py_INCREF(self);
    return (PyObject *)self;
}

static PyObject *
Scope_exit(ScopeObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *et = nargs > 0 ? args[0] : NULL;
    PyObject *ev = nargs > 1 ? args[1] : NULL;
    scope_close(self, et, ev);
    Py_RETURN_FALSE;
}

static PyObject *
Scope_call(ScopeObject *self, PyObject *args, PyObject *kwargs)
{
    /* @ci.scope("name") on a function: each call runs in a fresh scope. */
    if (cn_state.decorate == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "cirron_otel: decorator support is not initialised");
        return NULL;
    }
    if (self->state != ST_NEW || kwargs != NULL || PyTuple_GET_SIZE(args) != 1 ||
        !PyCallable_Check(PyTuple_GET_ITEM(args, 0))) {
        PyErr_SetString(PyExc_TypeError,
                        "cirron_otel: a scope used as a decorator takes exactly one callable");
        return NULL;
    }
    PyObject *index = self->has_index ? PyLong_FromLongLong(self->index) : Py_NewRef(Py_None);
    if (index == NULL)
        return NULL;
    PyObject *attrs = self->attrs ? PyDict_Copy(self->attrs) : PyDict_New();
    if (attrs == NULL) {
        Py_DECREF(index);
        return NULL;
    }
    PyObject *res = PyObject_CallFunctionObjArgs(cn_state.decorate, PyTuple_GET_ITEM(args, 0), self->name,
                                                 index, attrs, NULL);
    Py_DECREF(index);
    Py_DECREF(attrs);
    return res;
}

static PyObject *
hex128(uint64_t hi, uint64_t lo)
{
    char out[33];
    snprintf(out, sizeof out, "%016llx%016llx", (unsigned long long)hi, (unsigned long long)lo);
    return PyUnicode_FromStringAndSize(out, 32);
}

static PyObject *
Scope_get_id(ScopeObject *self, void *c)
{
    if (self->state == ST_NEW || self->state == ST_DROPPED || self->span_hi == 0)
        Py_RETURN_NONE;
    return hex128(self->span_hi, self->span_lo);
}

static PyObject *
Scope_get_parent_id(ScopeObject *self, void *c)
{
    if (self->parent_hi == 0)
        Py_RETURN_NONE;
    return hex128(self->parent_hi, self->parent_lo);
}

static PyObject *
Scope_get_trace_id(ScopeObject *self, void *c)
{
    if (self->trace_hi == 0 && self->trace_lo == 0)
        Py_RETURN_NONE;
    return hex128(self->trace_hi, self->trace_lo);
}

static PyObject *
Scope_get_index(ScopeObject *self, void *c)
{
    if (!self->has_index)
        Py_RETURN_NONE;
    return PyLong_FromLongLong(self->index);
}

static PyObject *
Scope_get_name(ScopeObject *self, void *c)
{
    return Py_NewRef(self->name);
}

static PyObject *
Scope_get_attrs(ScopeObject *self, void *c)
{
    if (self->attrs == NULL && (self->attrs = PyDict_New()) == NULL)
        return NULL;
    if (!self->attrs_shared && self->state == ST_CLOSED && PyDict_GET_SIZE(self->attrs) > 0) {
        /* the record may share this dict and its values (see scope_close_at): the handle
         * gets its own copy */
        Py_SETREF(self->attrs, attr_value(self->attrs));
    }
    self->attrs_shared = 1;
    return Py_NewRef(self->attrs);
}

static PyObject *
Scope_get_state(ScopeObject *self, void *c)
{
    static const char *names[] = {"new", "open", "closed", "dropped"};
    return PyUnicode_FromString(names[self->state & 3]);
}

static PyObject *
Scope_get_ints(ScopeObject *self, void *which)
{
    switch ((intptr_t)which) {
    case 0:
        return PyLong_FromUnsignedLongLong(self->span_hi);
    case 1:
        return PyLong_FromUnsignedLongLong(self->trace_hi);
    case 2:
        return PyLong_FromUnsignedLongLong(self->trace_lo);
    case 3:
        return PyLong_FromLong(self->depth);
    case 6:
        return PyBool_FromLong(!(self->span_flags & SF_UNSAMPLED));
    case 4:
        return self->start_ns ? PyLong_FromLongLong(self->start_ns) : Py_NewRef(Py_None);
    default:
        return self->end_ns ? PyLong_FromLongLong(self->end_ns) : Py_NewRef(Py_None);
    }
}

static PyObject *
Scope_repr(ScopeObject *self)
{
    static const char *names[] = {"new", "open", "closed", "dropped"};
    if (self->has_index)
        return PyUnicode_FromFormat("<cirron_otel.Scope %R[%lld] %s>", self->name,
                                    (long long)self->index, names[self->state & 3]);
    return PyUnicode_FromFormat("<cirron_otel.Scope %R %s>", self->name, names[self->state & 3]);
}

/* _set_error_status(description: str) — OpenTelemetry's span.set_status(ERROR, description)
 * on the open scope: the span record is flagged as failed, so the OTLP mapping gives it
 * status ERROR with this description, as for a scope closed by an exception (which wins:
 * fill_error replaces what is stored here). The description travels in the slot that
 * otherwise holds the exception. */
static PyObject *
Scope_set_error_status(ScopeObject *self, PyObject *description)
{
    if (!PyUnicode_Check(description)) {
        PyErr_Format(PyExc_TypeError, "description must be a str, not %.100s",
                     Py_TYPE(description)->tp_name);
        return NULL;
    }
    if (self->state == ST_OPEN && (self->exc == NULL || PyUnicode_Check(self->exc)))
        Py_XSETREF(self->exc, Py_NewRef(description));
    Py_RETURN_NONE;
}

static PyMethodDef Scope_methods[] = {
    {"__enter__", (PyCFunction)Scope_enter, METH_NOARGS, NULL},
    {"_set_error_status", (PyCFunction)Scope_set_error_status, METH_O,
     "mark the open scope as failed with this status description (OpenTelemetry's set_status)"},
    {"__exit__", (PyCFunction)(void (*)(void))Scope_exit, METH_FASTCALL, NULL},
    {NULL},
};

static PyGetSetDef Scope_getset[] = {
    {"id", (getter)Scope_get_id, NULL, "32-hex spool span id (None until entered)", NULL},
    {"parent_id", (getter)Scope_get_parent_id, NULL, "32-hex id of the enclosing span", NULL},
    {"trace_id", (getter)Scope_get_trace_id, NULL, "32-hex trace id", NULL},
    {"name", (getter)Scope_get_name, NULL, "scope name", NULL},
    {"index", (getter)Scope_get_index, NULL, "repetition index or None", NULL},
    {"attrs", (getter)Scope_get_attrs, NULL, "attributes (mutable until the scope closes)", NULL},
    {"state", (getter)Scope_get_state, NULL, "new / open / closed / dropped", NULL},
    {"span_id_int", (getter)Scope_get_ints, NULL, "OpenTelemetry span id as int", (void *)0},
    {"trace_id_hi", (getter)Scope_get_ints, NULL, NULL, (void *)1},
    {"trace_id_lo", (getter)Scope_get_ints, NULL, NULL, (void *)2},
    {"depth", (getter)Scope_get_ints, NULL, "nesting depth (session root = 0)", (void *)3},
    {"sampled", (getter)Scope_get_ints, NULL, "False under a non-sampled OpenTelemetry parent",
     (void *)6},
    {"start_ns", (getter)Scope_get_ints, NULL, NULL, (void *)4},
    {"end_ns", (getter)Scope_get_ints, NULL, NULL, (void *)5},
    {NULL},
};

static PyTypeObject Scope_Type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "cirron_otel.Scope",
    .tp_basicsize = sizeof(ScopeObject),
    .tp_dealloc = (destructor)Scope_dealloc,
    .tp_repr = (reprfunc)Scope_repr,
    .tp_call = (ternaryfunc)Scope_call,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A Cirron scope: a context manager (and decorator) that becomes one span.",
    .tp_methods = Scope_methods,
    .tp_getset = Scope_getset,
};

/* ======================================================================================
 * 6. epochs() / batches()
 * ==================================================================================== */

typedef struct {
    PyObject_HEAD
    PyObject *it;
    PyObject *name;
    ScopeObject *cur;
    PyObject *outer;  /* the innermost scope when iteration began (NULL: none) */
    PyObject *token0; /* restores the context when iteration ends */
    int64_t n;
} ScopeIterObject;

static PyTypeObject ScopeIter_Type;

static void
scopeiter_close_current(ScopeIterObject *self, int error, int64_t end)
{
    ScopeObject *cur = self->cur;
    if (cur == NULL)
        return;
    self->cur = NULL;
    if (error) {
        PyObject *et, *ev, *tb;
        PyErr_Fetch(&et, &ev, &tb);
        PyErr_NormalizeException(&et, &ev, &tb);
        scope_close_at(cur, et, ev, end);
        PyErr_Restore(et, ev, tb);
    }
    else {
        scope_close_at(cur, NULL, NULL, end);
    }
    Py_DECREF(cur);
}

/* Iteration is over: restore the scope stack as it was before the first item. */
static void
scopeiter_finish(ScopeIterObject *self)
{
    if (self->token0 != NULL) {
        PyObject *et, *ev, *tb;
        PyErr_Fetch(&et, &ev, &tb);
        if (PyContextVar_Reset(cn_state.scope_var, self->token0) < 0)
            PyErr_Clear(); /* abandoned in another context: leave that one be */
        PyErr_Restore(et, ev, tb);
        Py_CLEAR(self->token0);
    }
    Py_CLEAR(self->outer);
}

static PyObject *
ScopeIter_next(ScopeIterObject *self)
{
    /* one clock read: the previous item's scope ends where the next one's begins (so the
     * next item's loading counts in its own scope) */
    int64_t now = wall_ns();
    scopeiter_close_current(self, 0, now);
    if (self->it == NULL)
        return NULL;
    PyObject *item = PyIter_Next(self->it);
    if (item == NULL) {
        Py_CLEAR(self->it);
        scopeiter_finish(self);
        return NULL;
    }
    ring_t *r = get_ring();
    if (r == NULL)
        goto fail;
    if (self->token0 == NULL) {
        /* first item: remember the enclosing scope, and how to restore the context */
        PyObject *cur = NULL;
        if (PyContextVar_Get(cn_state.scope_var, NULL, &cur) < 0)
            goto fail;
        if (cur == Py_None)
            Py_CLEAR(cur);
        self->outer = cur;
        self->token0 = PyContextVar_Set(cn_state.scope_var, cur ? cur : Py_None);
        if (self->token0 == NULL)
            goto fail;
    }
    ScopeObject *s = scope_make(self->name, NULL, NULL, r);
    if (s == NULL)
        goto fail;
    s->index = self->n++;
    s->has_index = 1;
    /* items' scopes replace each other in the context: no reset per item */
    if (scope_open_under(s, r, now, self->outer, PUSH_REPLACE) < 0) {
        Py_DECREF(s);
        goto fail;
    }
    self->cur = s;
    return item;
fail:
    Py_DECREF(item);
    return NULL;
}

static int
ScopeIter_traverse(ScopeIterObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->it);
    Py_VISIT(self->token0);
    return 0;
}

static int
ScopeIter_clear(ScopeIterObject *self)
{
    Py_CLEAR(self->it);
    Py_CLEAR(self->token0);
    return 0;
}

static void
ScopeIter_dealloc(ScopeIterObject *self)
{
    PyObject_GC_UnTrack(self);
    /* break, an exception in the loop body, or an abandoned iterator: close the scope; an
     * exception in flight marks it as failed. */
    scopeiter_close_current(self, PyErr_Occurred() != NULL, 0);
    scopeiter_finish(self);
    Py_CLEAR(self->it);
    Py_CLEAR(self->name);
    PyObject_GC_Del(self);
}

static PyObject *
ScopeIter_close(ScopeIterObject *self, PyObject *Py_UNUSED(ignored))
{
    scopeiter_close_current(self, 0, 0);
    scopeiter_finish(self);
    Py_CLEAR(self->it);
    Py_RETURN_NONE;
}

static PyMethodDef ScopeIter_methods[] = {
    {"close", (PyCFunction)ScopeIter_close, METH_NOARGS, "Close the current scope and stop."},
    {NULL},
};

static PyTypeObject ScopeIter_Type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "cirron_otel.ScopeIterator",
    .tp_basicsize = sizeof(ScopeIterObject),
    .tp_dealloc = (destructor)ScopeIter_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_traverse = (traverseproc)ScopeIter_traverse,
    .tp_clear = (inquiry)ScopeIter_clear,
    .tp_iter = PyObject_SelfIter,
    .tp_iternext = (iternextfunc)ScopeIter_next,
    .tp_methods = ScopeIter_methods,
};

static PyObject *
make_scope_iter(PyObject *iterable, PyObject *name)
{
    PyObject *it = PyObject_GetIter(iterable);
    if (it == NULL)
        return NULL;
    ScopeIterObject *self = PyObject_GC_New(ScopeIterObject, &ScopeIter_Type);
    if (self == NULL) {
        Py_DECREF(it);
        return NULL;
    }
    self->it = it;
    Py_INCREF(name);
    self->name = name;
    self->cur = NULL;
    self->outer = NULL;
    self->token0 = NULL;
    self->n = 0;
    PyObject_GC_Track(self);
    return (PyObject *)self;
}

static PyObject *
mod_epochs(PyObject *m, PyObject *iterable)
{
    return make_scope_iter(iterable, cn_state.epoch_name);
}

static PyObject *
mod_batches(PyObject *m, PyObject *iterable)
{
    return make_scope_iter(iterable, cn_state.batch_name);
}

static PyObject *
mod_scoped_iter(PyObject *m, PyObject *args)
{
    PyObject *iterable, *name;
    if (!PyArg_ParseTuple(args, "OU:scoped_iter", &iterable, &name))
        return NULL;
    return make_scope_iter(iterable, name);
}

/* ======================================================================================
 * 7. mark()
 * ==================================================================================== */

static PyObject *
mod_mark(PyObject *m, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError,
                     nargs < 2 ? "cirron_otel.mark() takes a name and a value (%zd given)"
                               : "cirron_otel.mark() takes 2 positional arguments (%zd given); "
                                 "pass kind and attributes by keyword",
                     nargs);
        return NULL;
    }
    PyObject *name = args[0];
    int summary = 0;
    PyObject *attrs = NULL;
    if (kwnames != NULL) {
        Py_ssize_t nk = PyTuple_GET_SIZE(kwnames);
        for (Py_ssize_t i = 0; i < nk; i++) {
            PyObject *k = PyTuple_GET_ITEM(kwnames, i);
            PyObject *v = args[2 + i];
            if (k == cn_state.str_kind || PyUnicode_Compare(k, cn_state.str_kind) == 0) {
                if (v == cn_state.str_point || (PyUnicode_Check(v) && PyUnicode_Compare(v, cn_state.str_point) == 0))
                    summary = 0;
                else if (v == cn_state.str_summary ||
                         (PyUnicode_Check(v) && PyUnicode_Compare(v, cn_state.str_summary) == 0))
                    summary = 1;
                else {
                    Py_XDECREF(attrs);
                    PyErr_Format(PyExc_ValueError,
                                 "cirron_otel.mark() kind must be 'point' or 'summary'; got %R", v);
                    return NULL;
                }
                continue;
            }
            if (attrs == NULL && (attrs = PyDict_New()) == NULL)
                return NULL;
            PyObject *cv = attr_value(v); /* captured now, rendered later */
            int rc = PyDict_SetItem(attrs, k, cv);
            Py_DECREF(cv);
            if (rc < 0) {
                Py_DECREF(attrs);
                return NULL;
            }
        }
    }
    coerced_t cv;
    cv.str = NULL;
    if (coerce_value(args[1], &cv) < 0) {
        Py_XDECREF(attrs);
        return NULL;
    }
    ring_t *r = get_ring();
    if (r == NULL)
        goto fail;
    uint32_t name_id;
    PyObject *name_ref = NULL;
    if (resolve_name(r, name, &name_id, &name_ref, "mark") < 0)
        goto fail;
    if (!atomic_load_explicit(&cn_state.recording, memory_order_relaxed)) {
        Py_XDECREF(name_ref);
        Py_XDECREF(cv.str);
        Py_XDECREF(attrs);
        Py_RETURN_NONE;
    }
    PyObject *cur = NULL;
    if (PyContextVar_Get(cn_state.scope_var, NULL, &cur) < 0) {
        Py_XDECREF(name_ref);
        goto fail;
    }
    uint64_t hi = 0, lo = 0;
    if (cur != NULL && cur != Py_None) {
        hi = ((ScopeObject *)cur)->span_hi;
        lo = ((ScopeObject *)cur)->span_lo;
    }
    else if (cn_state.session != NULL) {
        hi = cn_state.session->span_hi;
        lo = cn_state.session->span_lo;
    }
    Py_XDECREF(cur);
    int64_t ts = wall_ns();
    slot_t *s = ring_reserve(r, 1);
    s->type = R_MARK;
    s->vtype = cv.vtype;
    s->flags = (summary ? F_SUMMARY : 0) | (hi == 0 ? F_ROOTLESS : 0);
    s->name_id = name_id;
    s->ts = ts;
    s->span_hi = hi;
    s->span_lo = lo;
    s->v.i = cv.v.i;
    s->name_ref = name_ref;
    s->obj = cv.str;
    s->attrs = attrs;
    if (name_ref != NULL || cv.str != NULL || attrs != NULL)
        s->flags |= F_REFS | (name_ref ? F_NAME_REF : 0);
    counter_inc(&r->marks_recorded);
    ring_publish(r, 1);
    Py_RETURN_NONE;
fail:
    Py_XDECREF(cv.str);
    Py_XDECREF(attrs);
    return NULL;
}

/* ======================================================================================
 * 8. JSON helpers
 * ==================================================================================== */

/* buf_t, buf_reserve, buf_put, BUF_LIT: buf.h */

/* Room for one more element in a malloc'd array that doubles (first size `first`).
 * ARRAY_GROW evaluates to 0, or -1 when out of memory (the array is left as it was). */
static int
array_grow_impl(void *arrp, size_t *cap, size_t elem, size_t first)
{
    void **arr = (void **)arrp;
    size_t ncap = *cap ? *cap * 2 : first;
    void *grown = realloc(*arr, elem * ncap);
    if (grown == NULL)
        return -1;
    *arr = grown;
    *cap = ncap;
    return 0;
}

#define ARRAY_GROW(arr, cap, used, first) \
    ((size_t)(used) < (cap) ? 0 : array_grow_impl((void *)&(arr), &(cap), sizeof *(arr), (first)))

/* 16 lowercase hex digits of v, most significant first, without a loop per digit: spread
 * the nibbles one per byte, then add '0' or 'a'-10 to each byte at once. */
static inline void
hex64(char *o, uint64_t v)
{
    for (int half = 0; half < 2; half++) {
        uint64_t x = half ? (v & 0xFFFFFFFFu) : (v >> 32);
        x = ((x & 0xFFFF0000u) << 16) | (x & 0xFFFFu);
        x = ((x & 0x0000FF000000FF00ULL) << 8) | (x & 0x000000FF000000FFULL);
        x = ((x & 0x00F000F000F000F0ULL) << 4) | (x & 0x000F000F000F000FULL);
        uint64_t letters = ((x + 0x0606060606060606ULL) >> 4) & 0x0101010101010101ULL;
        x += 0x3030303030303030ULL + letters * 0x27;
        /* byte i holds nibble i (least significant first): store most significant first */
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__ && defined(__GNUC__)
        x = __builtin_bswap64(x);
        memcpy(o + half * 8, &x, 8);
#elif defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        memcpy(o + half * 8, &x, 8);
#else
        for (int i = 0; i < 8; i++)
            o[half * 8 + i] = (char)(x >> (8 * (7 - i)));
#endif
    }
}

static inline void
buf_id(buf_t *b, uint64_t hi, uint64_t lo)
{
    if (buf_reserve(b, 34) < 0)
        return;
    char *o = b->data + b->len;
    o[0] = '"';
    hex64(o + 1, hi);
    hex64(o + 17, lo);
    o[33] = '"';
    b->len += 34;
}

static const char DIGIT_PAIRS[] =
    "00010203040506070809101112131415161718192021222324252627282930313233343536373839"
    "40414243444546474849505152535455565758596061626364656667686970717273747576777879"
    "8081828384858687888990919293949596979899";

static inline void
buf_i64(buf_t *b, int64_t v)
{
    char tmp[24];
    char *end = tmp + sizeof tmp, *p = end;
    uint64_t u = v < 0 ? (uint64_t)0 - (uint64_t)v : (uint64_t)v;
    while (u >= 100) {
        unsigned r = (unsigned)(u % 100);
        u /= 100;
        p -= 2;
        memcpy(p, DIGIT_PAIRS + 2 * r, 2);
    }
    if (u >= 10) {
        p -= 2;
        memcpy(p, DIGIT_PAIRS + 2 * u, 2);
    }
    else {
        *--p = (char)('0' + u);
    }
    if (v < 0)
        *--p = '-';
    buf_put(b, p, (size_t)(end - p));
}

/* format_f64() (Grisu2): grisu2.h */

static void
buf_f64(buf_t *b, double d)
{
    if (buf_reserve(b, 32) < 0)
        return;
    b->len += (size_t)format_f64(d, b->data + b->len);
}

static int
json_escape_utf8(buf_t *b, const char *s, Py_ssize_t n)
{
    if (buf_reserve(b, (size_t)n + 2) < 0)
        return -1;
    b->data[b->len++] = '"';
    Py_ssize_t start = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c >= 0x20 && c != '"' && c != '\\')
            continue;
        buf_put(b, s + start, (size_t)(i - start));
        char esc[8];
        switch (c) {
        case '"': buf_put(b, "\\\"", 2); break;
        case '\\': buf_put(b, "\\\\", 2); break;
        case '\n': buf_put(b, "\\n", 2); break;
        case '\r': buf_put(b, "\\r", 2); break;
        case '\t': buf_put(b, "\\t", 2); break;
        default:
            snprintf(esc, sizeof esc, "\\u%04x", c);
            buf_put(b, esc, 6);
        }
        start = i + 1;
    }
    buf_put(b, s + start, (size_t)(n - start));
    BUF_LIT(b, "\"");
    return b->oom ? -1 : 0;
}

/* GIL held. A str as a JSON string, at most `cap` UTF-8 bytes (0: no cap), cut on a
 * character boundary. Lone surrogates become backslash escapes rather than errors. */
static void
json_pystr(buf_t *b, PyObject *s, Py_ssize_t cap)
{
    Py_ssize_t n;
    const char *u = PyUnicode_AsUTF8AndSize(s, &n);
    PyObject *enc = NULL;
    if (u == NULL) {
        PyErr_Clear();
        enc = PyUnicode_AsEncodedString(s, "utf-8", "backslashreplace");
        if (enc == NULL) {
            PyErr_Clear();
            BUF_LIT(b, "\"<unencodable>\"");
            return;
        }
        u = PyBytes_AS_STRING(enc);
        n = PyBytes_GET_SIZE(enc);
    }
    if (cap > 0 && n > cap) {
        n = cap;
        while (n > 0 && ((unsigned char)u[n] & 0xC0) == 0x80)
            n--;
    }
    json_escape_utf8(b, u, n);
    Py_XDECREF(enc);
}

static void
json_str_of(buf_t *b, PyObject *o)
{
    /* str(o), never raising */
    PyObject *s = PyObject_Str(o);
    if (s == NULL) {
        PyErr_Clear();
        BUF_LIT(b, "\"<unserializable>\"");
        return;
    }
    json_pystr(b, s, 0);
    Py_DECREF(s);
}

typedef struct {
    PyObject *items[ATTR_MAX_DEPTH + 1];
    int n;
} seen_t;

/* GIL held. A dict key as the UTF-8 bytes it is written as: a str as is, anything else its
 * str(); lone surrogates backslash-escaped. New reference; NULL only when out of memory. */
static PyObject *
key_utf8(PyObject *key)
{
    PyObject *str = PyUnicode_Check(key) ? Py_NewRef(key) : PyObject_Str(key);
    PyObject *enc = str ? PyUnicode_AsEncodedString(str, "utf-8", "backslashreplace") : NULL;
    Py_XDECREF(str);
    if (enc == NULL) {
        PyErr_Clear();
        enc = PyBytes_FromString("<unserializable>");
    }
    return enc;
}

/* GIL held. Which keys of a dict's item list to leave out so that no two are written alike
 * (str(1) and "1" are both "1"; JSON objects and OpenTelemetry attributes need unique
 * keys): a str key wins over a non-str key written the same, otherwise the first in the
 * dict's order wins. NULL: keep all, the usual case of plain str keys, which a dict keeps
 * distinct (a lone surrogate could still collide with its escaped spelling: checked). */
static char *
dup_key_mask(PyObject *items)
{
    Py_ssize_t n = PyList_GET_SIZE(items);
    int plain = 1;
    for (Py_ssize_t i = 0; i < n && plain; i++) {
        PyObject *k = PyTuple_GET_ITEM(PyList_GET_ITEM(items, i), 0);
        plain = PyUnicode_CheckExact(k) && (PyUnicode_IS_ASCII(k) || PyUnicode_AsUTF8AndSize(k, NULL));
    }
    PyErr_Clear();
    if (plain || n < 2)
        return NULL;
    char *skip = calloc((size_t)n, 1);
    PyObject **tok = calloc((size_t)n, sizeof(PyObject *));
    PyObject *strs = PySet_New(NULL), *seen = PySet_New(NULL);
    int ok = skip && tok && strs && seen;
    for (Py_ssize_t i = 0; i < n && ok; i++) {
        PyObject *k = PyTuple_GET_ITEM(PyList_GET_ITEM(items, i), 0);
        ok = (tok[i] = key_utf8(k)) != NULL && (!PyUnicode_Check(k) || PySet_Add(strs, tok[i]) == 0);
    }
    for (Py_ssize_t i = 0; i < n && ok; i++) {
        PyObject *k = PyTuple_GET_ITEM(PyList_GET_ITEM(items, i), 0);
        int dup = PySet_Contains(seen, tok[i]);
        if (dup == 0 && !PyUnicode_Check(k))
            dup = PySet_Contains(strs, tok[i]);
        if (dup < 0 || (dup == 0 && PySet_Add(seen, tok[i]) < 0))
            ok = 0;
        skip[i] = dup > 0;
    }
    for (Py_ssize_t i = 0; tok && i < n; i++)
        Py_XDECREF(tok[i]);
    free(tok);
    Py_XDECREF(strs);
    Py_XDECREF(seen);
    if (!ok) { /* out of memory: write every key rather than fail */
        PyErr_Clear();
        free(skip);
        return NULL;
    }
    return skip;
}

static void json_value(buf_t *b, PyObject *o, seen_t *seen);

static void
json_float_attr(buf_t *b, double d)
{
    if (isnan(d))
        BUF_LIT(b, "\"nan\"");
    else if (isinf(d))
        d > 0 ? BUF_LIT(b, "\"inf\"") : BUF_LIT(b, "\"-inf\"");
    else {
        char *r = PyOS_double_to_string(d, 'r', 0, Py_DTSF_ADD_DOT_0, NULL);
        if (r == NULL) {
            PyErr_Clear();
            buf_f64(b, d);
            return;
        }
        buf_put(b, r, strlen(r));
        PyMem_Free(r);
    }
}

/* GIL held. Render an object as JSON by the spool's attrs rule; never raises. */
static void
json_value(buf_t *b, PyObject *o, seen_t *seen)
{
    if (o == Py_None) {
        BUF_LIT(b, "null");
        return;
    }
    if (PyBool_Check(o)) {
        o == Py_True ? BUF_LIT(b, "true") : BUF_LIT(b, "false");
        return;
    }
    if (PyLong_Check(o)) {
        int overflow = 0;
        long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
        if (!overflow && !(v == -1 && PyErr_Occurred())) {
            buf_i64(b, v);
            return;
        }
        PyErr_Clear();
        PyObject *s = PyLong_Type.tp_repr(o);
        if (s != NULL) {
            Py_ssize_t n;
            const char *u = PyUnicode_AsUTF8AndSize(s, &n);
            if (u)
                buf_put(b, u, (size_t)n);
            Py_DECREF(s);
            if (u)
                return;
        }
        PyErr_Clear();
        json_str_of(b, o);
        return;
    }
    if (PyFloat_Check(o)) {
        json_float_attr(b, PyFloat_AS_DOUBLE(o));
        return;
    }
    if (PyUnicode_Check(o)) {
        json_pystr(b, o, 0);
        return;
    }
    int is_dict = PyDict_Check(o), is_seq = PyList_Check(o) || PyTuple_Check(o);
    if (is_dict || is_seq) {
        int cyclic = 0;
        for (int i = 0; i < seen->n; i++)
            if (seen->items[i] == o)
                cyclic = 1;
        if (cyclic || seen->n >= ATTR_MAX_DEPTH) {
            json_str_of(b, o);
            return;
        }
        PyObject *items = is_dict ? PyDict_Items(o) : PySequence_List(o);
        if (items == NULL) {
            PyErr_Clear();
            json_str_of(b, o);
            return;
        }
        seen->items[seen->n++] = o;
        buf_put(b, is_dict ? "{" : "[", 1);
        Py_ssize_t n = PyList_GET_SIZE(items);
        char *skip = is_dict ? dup_key_mask(items) : NULL;
        int first = 1;
        for (Py_ssize_t i = 0; i < n; i++) {
            if (skip && skip[i])
                continue;
            if (!first)
                BUF_LIT(b, ",");
            first = 0;
            PyObject *it = PyList_GET_ITEM(items, i);
            if (is_dict) {
                PyObject *k = PyTuple_GET_ITEM(it, 0);
                if (PyUnicode_Check(k))
                    json_pystr(b, k, 0);
                else
                    json_str_of(b, k);
                BUF_LIT(b, ":");
                json_value(b, PyTuple_GET_ITEM(it, 1), seen);
            }
            else {
                json_value(b, it, seen);
            }
        }
        buf_put(b, is_dict ? "}" : "]", 1);
        free(skip);
        seen->n--;
        Py_DECREF(items);
        return;
    }
    if (numpy_types_ready() && PyObject_IsInstance(o, cn_state.numpy_generic) == 1) {
        coerced_t cv;
        cv.str = NULL;
        if (coerce_value_slow(o, &cv, 0) == 0) {
            switch (cv.vtype) {
            case VT_FLOAT: json_float_attr(b, cv.v.d); return;
            case VT_INT: buf_i64(b, cv.v.i); return;
            case VT_BOOL: cv.v.i ? BUF_LIT(b, "true") : BUF_LIT(b, "false"); return;
            default: json_pystr(b, cv.str, 0); Py_DECREF(cv.str); return;
            }
        }
    }
    PyErr_Clear();
    json_str_of(b, o);
}

/* ======================================================================================
 * 9. Collector
 *
 * collect() runs on the drainer thread. Phase 1 (no GIL) copies records out of every ring
 * and claims them with one CAS per ring; records a producer stole meanwhile are dropped
 * from the copy. Phase 2 (GIL, only when claimed records hold Python references) renders
 * attrs / string values / exceptions to JSON tokens and releases the references. Phase 3
 * (no GIL) assigns mark ids and gathers each span's mark ids.
 * ==================================================================================== */

static PyTypeObject Batch_Type;

static _Thread_local int tl_collecting; /* this thread is inside collect() */

static inline size_t
open_hash(uint64_t hi, uint64_t lo, size_t cap)
{
    return (size_t)((hi ^ (lo * 0x9E3779B97F4A7C15ULL)) & (cap - 1));
}

static open_span_t *
open_find(uint64_t hi, uint64_t lo, int create)
{
    if (cn_state.open_cap == 0) {
        if (!create)
            return NULL;
        cn_state.open_cap = 1024;
        cn_state.open_tab = calloc(cn_state.open_cap, sizeof(open_span_t *));
        if (cn_state.open_tab == NULL) {
            cn_state.open_cap = 0;
            return NULL;
        }
    }
    size_t h = open_hash(hi, lo, cn_state.open_cap);
    for (open_span_t *e = cn_state.open_tab[h]; e; e = e->next)
        if (e->hi == hi && e->lo == lo)
            return e;
    if (!create)
        return NULL;
    if (cn_state.open_n * 2 > cn_state.open_cap) {
        size_t ncap = cn_state.open_cap * 2;
        open_span_t **nt = calloc(ncap, sizeof(open_span_t *));
        if (nt != NULL) {
            for (size_t i = 0; i < cn_state.open_cap; i++) {
                open_span_t *e = cn_state.open_tab[i];
                while (e) {
                    open_span_t *nx = e->next;
                    size_t k = open_hash(e->hi, e->lo, ncap);
                    e->next = nt[k];
                    nt[k] = e;
                    e = nx;
                }
            }
            free(cn_state.open_tab);
            cn_state.open_tab = nt;
            cn_state.open_cap = ncap;
            h = open_hash(hi, lo, cn_state.open_cap);
        }
    }
    open_span_t *e = calloc(1, sizeof(open_span_t));
    if (e == NULL)
        return NULL;
    e->hi = hi;
    e->lo = lo;
    e->max = hi == atomic_load_explicit(&cn_state.session_hi, memory_order_relaxed) &&
                     lo == atomic_load_explicit(&cn_state.session_lo, memory_order_relaxed)
                 ? SESSION_MARK_IDS_MAX
                 : SPAN_MARK_IDS_MAX;
    e->next = cn_state.open_tab[h];
    cn_state.open_tab[h] = e;
    cn_state.open_n++;
    return e;
}

static void
open_remove(open_span_t *target)
{
    size_t h = open_hash(target->hi, target->lo, cn_state.open_cap);
    open_span_t **pp = &cn_state.open_tab[h];
    while (*pp && *pp != target)
        pp = &(*pp)->next;
    if (*pp) {
        *pp = target->next;
        free(target->ids);
        free(target);
        cn_state.open_n--;
    }
}

static BatchObject *
batch_new(void)
{
    BatchObject *b = PyObject_New(BatchObject, &Batch_Type);
    if (b == NULL)
        return NULL;
    b->slots = NULL;
    b->aux = NULL;
    b->nslots = 0;
    b->ext = NULL;
    b->next = b->ext_cap = 0;
    b->mids = NULL;
    b->nmids = b->mids_cap = 0;
    memset(&b->arena, 0, sizeof(buf_t));
    b->n_marks = b->n_spans = 0;
    b->pid = cn_state.pid;
    b->rank = cn_state.rank;
    b->thr = NULL;
    b->nthr = b->thr_cap = 0;
    return b;
}

/* Phase 1: copy whole records from one ring, claim them. Returns slots appended. */
static size_t
claim_ring(ring_t *r, slot_t *dst, size_t room)
{
    uint64_t t = atomic_load_explicit(&r->tail, memory_order_acquire);
    uint64_t h = atomic_load_explicit(&r->head, memory_order_acquire);
    uint64_t n = h - t;
    if (n > room)
        n = room;
    if (n == 0)
        return 0;
    for (uint64_t i = 0; i < n; i++)
        dst[i] = r->slots[(t + i) & r->mask];
    /* never split a span's two slots */
    if (dst[n - 1].type == R_SPAN)
        n--;
    for (;;) {
        if (n == 0)
            return 0;
        uint64_t expect = t;
        if (atomic_compare_exchange_strong_explicit(&r->tail, &expect, t + n, memory_order_acq_rel,
                                                    memory_order_acquire))
            return (size_t)n;
        /* the producer stole [t, expect): those copies are not ours */
        if (expect >= t + n)
            return 0;
        uint64_t lost = expect - t;
        memmove(dst, dst + lost, sizeof(slot_t) * (size_t)(n - lost));
        n -= lost;
        t = expect;
    }
}

static void
ring_free_locked(ring_t *r)
{
    atomic_fetch_add(&cn_state.freed_marks_recorded, atomic_load(&r->marks_recorded));
    atomic_fetch_add(&cn_state.freed_spans_recorded, atomic_load(&r->spans_recorded));
    atomic_fetch_add(&cn_state.freed_depth_drops, atomic_load(&r->depth_drops));
    atomic_fetch_add(&cn_state.freed_marks_dropped, atomic_load(&r->marks_dropped));
    atomic_fetch_add(&cn_state.freed_spans_dropped, atomic_load(&r->spans_dropped));
    atomic_fetch_add(&cn_state.rings_freed, 1);
    free(r->thread_name);
    free(r->slots);
    free(r);
}

static tok_t
arena_since(BatchObject *b, size_t start)
{
    return (tok_t){(uint32_t)start, (uint32_t)(b->arena.len - start)};
}

/* GIL held: a str's UTF-8 bytes (lone surrogates backslash-escaped), at most `cap` bytes
 * (0: no cap) cut on a character boundary, copied into the arena. */
static tok_t
arena_utf8(BatchObject *b, PyObject *str, Py_ssize_t cap)
{
    size_t st = b->arena.len;
    PyObject *enc = PyUnicode_Check(str) ? PyUnicode_AsEncodedString(str, "utf-8", "backslashreplace")
                                         : NULL;
    if (enc == NULL) {
        PyErr_Clear();
        BUF_LIT(&b->arena, "<unencodable>");
        return arena_since(b, st);
    }
    const char *u = PyBytes_AS_STRING(enc);
    Py_ssize_t n = PyBytes_GET_SIZE(enc);
    if (cap > 0 && n > cap) {
        n = cap;
        while (n > 0 && ((unsigned char)u[n] & 0xC0) == 0x80)
            n--;
    }
    buf_put(&b->arena, u, (size_t)n);
    Py_DECREF(enc);
    return arena_since(b, st);
}

static tok_t
arena_str_of(BatchObject *b, PyObject *o)
{
    PyObject *str = PyObject_Str(o);
    if (str == NULL) {
        PyErr_Clear();
        size_t st = b->arena.len;
        BUF_LIT(&b->arena, "<unserializable>");
        return arena_since(b, st);
    }
    tok_t t = arena_utf8(b, str, 0);
    Py_DECREF(str);
    return t;
}

static void otlp_attrs(buf_t *a, PyObject *dict, uint32_t limit, uint32_t *n, uint32_t *dropped,
                       int span_error);

/* Phase 2 for one slot (GIL held). */
static void
resolve_refs(BatchObject *b, size_t i)
{
    slot_t *s = &b->slots[i];
    if (ARRAY_GROW(b->ext, b->ext_cap, b->next, 64) < 0) {
        slot_release_refs(s);
        s->flags &= ~F_REFS;
        return;
    }
    ext_t *e = &b->ext[b->next];
    memset(e, 0, sizeof *e);
    b->aux[i].ext = (int32_t)b->next++;
    buf_t *a = &b->arena;
    if (s->name_ref)
        e->name = arena_utf8(b, s->name_ref, 0);
    PyObject *attrs = s->type == R_MARK ? s->attrs : s->obj;
    if (s->type == R_MARK && s->obj)
        e->val = arena_utf8(b, s->obj, STR_VALUE_CAP);
    if (attrs) {
        seen_t seen = {.n = 0};
        size_t st = a->len;
        json_value(a, attrs, &seen);
        e->attrs = arena_since(b, st);
        if (cn_state.otlp && PyDict_Check(attrs)) {
            st = a->len;
            uint32_t limit = s->type == R_MARK ? cn_state.event_attr_limit : cn_state.span_attr_limit;
            /* a failed span: error / error.message are the status over OTLP, not attributes */
            otlp_attrs(a, attrs, limit, &e->oattrs_n, &e->oattrs_dropped,
                       s->type == R_SPAN && (s->flags & F_ERROR));
            e->oattrs = arena_since(b, st);
        }
    }
    if (s->type == R_SPAN && s->attrs && PyUnicode_Check(s->attrs)) {
        /* an error status set through OpenTelemetry (Scope._set_error_status): its description */
        e->emsg = arena_utf8(b, s->attrs, 0);
        PyErr_Clear();
    }
    else if (s->type == R_SPAN && s->attrs) { /* the exception that closed the scope */
        PyObject *exc = s->attrs;
        PyObject *tp = (PyObject *)Py_TYPE(exc);
        PyObject *qn = PyObject_GetAttrString(tp, "__qualname__");
        PyObject *mod = PyObject_GetAttrString(tp, "__module__");
        PyObject *full = NULL;
        if (qn && mod && PyUnicode_Check(mod) && PyUnicode_Check(qn) &&
            PyUnicode_CompareWithASCIIString(mod, "builtins"))
            full = PyUnicode_FromFormat("%U.%U", mod, qn);
        else if (qn && PyUnicode_Check(qn))
            full = Py_NewRef(qn);
        PyErr_Clear();
        if (full) {
            e->etype = arena_utf8(b, full, 0);
            Py_DECREF(full);
        }
        Py_XDECREF(qn);
        Py_XDECREF(mod);
        e->emsg = arena_str_of(b, exc);
        if (cn_state.format_exception == NULL) {
            PyObject *tbm = PyImport_ImportModule("traceback");
            if (tbm) {
                cn_state.format_exception = PyObject_GetAttrString(tbm, "format_exception");
                Py_DECREF(tbm);
            }
            PyErr_Clear();
        }
        if (cn_state.format_exception) {
            PyObject *lines = PyObject_CallOneArg(cn_state.format_exception, exc);
            PyObject *empty = lines ? PyUnicode_FromString("") : NULL;
            PyObject *text = empty ? PyUnicode_Join(empty, lines) : NULL;
            if (text)
                e->estack = arena_utf8(b, text, 0);
            Py_XDECREF(text);
            Py_XDECREF(empty);
            Py_XDECREF(lines);
            PyErr_Clear();
        }
    }
    slot_release_refs(s);
}

static int
mids_push(BatchObject *b, uint64_t hi, uint64_t lo)
{
    if (ARRAY_GROW(b->mids, b->mids_cap, b->nmids + 1, 256) < 0) /* a pair: 2 entries */
        return -1;
    b->mids[b->nmids++] = hi;
    b->mids[b->nmids++] = lo;
    return 0;
}

/* Phase 3 (collect mutex held, no GIL): mark ids, and each closing span's mark ids. Marks
 * go first, so a span closing in this batch sees every mark recorded before it. */
static void
assign_mark_ids(BatchObject *b)
{
    for (size_t i = 0; i < b->nslots; i++) {
        slot_t *s = &b->slots[i];
        if (s->type != R_MARK)
            continue;
        uint64_t hi = rng_next(&cn_state.collect_rng), lo = rng_next(&cn_state.collect_rng);
        /* RFC 4122 version 4 layout: 122 random bits */
        hi = (hi & 0xFFFFFFFFFFFF0FFFULL) | 0x0000000000004000ULL;
        lo = (lo & 0x3FFFFFFFFFFFFFFFULL) | 0x8000000000000000ULL;
        b->aux[i].id_hi = hi;
        b->aux[i].id_lo = lo;
        b->n_marks++;
        if (s->flags & F_ROOTLESS)
            continue;
        open_span_t *e = open_find(s->span_hi, s->span_lo, 1);
        if (e == NULL) {
            atomic_fetch_add(&cn_state.open_overflow, 1);
            continue;
        }
        if (e->n >= e->max) {
            e->omitted++;
            continue;
        }
        if (ARRAY_GROW(e->ids, e->cap, 2 * e->n + 1, 16) < 0) { /* pairs: 2 entries each */
            atomic_fetch_add(&cn_state.open_overflow, 1);
            continue;
        }
        e->ids[2 * e->n] = hi;
        e->ids[2 * e->n + 1] = lo;
        e->n++;
    }
    for (size_t i = 0; i < b->nslots; i++) {
        slot_t *s = &b->slots[i];
        if (s->type != R_SPAN)
            continue;
        b->n_spans++;
        open_span_t *e = open_find(s->span_hi, s->span_lo, 0);
        b->aux[i].mids_off = (uint32_t)(b->nmids / 2);
        b->aux[i].mids_cnt = 0;
        b->aux[i].mids_omitted = 0;
        if (e != NULL) {
            b->aux[i].mids_omitted = e->omitted;
            for (uint32_t k = 0; k < e->n; k++)
                if (mids_push(b, e->ids[2 * k], e->ids[2 * k + 1]) == 0)
                    b->aux[i].mids_cnt++;
            open_remove(e);
        }
    }
}

/* collect(max_slots) -> Batch | None */
static PyObject *
mod_collect(PyObject *m, PyObject *args)
{
    Py_ssize_t max_slots = 100000;
    if (!PyArg_ParseTuple(args, "|n:collect", &max_slots))
        return NULL;
    if (max_slots < 16)
        max_slots = 16;
    /* Called again from inside itself (user code run by the GIL pass, e.g. an attribute's
     * __str__, reaching collect()): the collect mutex is ours already, waiting would hang
     * this thread for good. Nothing to hand out. */
    if (tl_collecting)
        Py_RETURN_NONE;
    BatchObject *b = batch_new();
    if (b == NULL)
        return NULL;
    tl_collecting = 1;
    int need_gil = 0, oom = 0;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&cn_state.collect_mu);
    if (!cn_state.collect_rng_ready) {
        rng_seed(&cn_state.collect_rng);
        cn_state.collect_rng_ready = 1;
    }
    pthread_mutex_lock(&cn_state.registry_mu);
    uint64_t avail = 0;
    for (ring_t *r = cn_state.rings; r; r = r->next)
        avail += atomic_load(&r->head) - atomic_load(&r->tail);
    size_t room = avail < (uint64_t)max_slots ? (size_t)avail : (size_t)max_slots;
    if (room > 0) {
        b->slots = malloc(sizeof(slot_t) * room);
        b->aux = calloc(room, sizeof(aux_t));
        if (b->slots == NULL || b->aux == NULL)
            oom = 1;
    }
    for (ring_t *r = cn_state.rings; r && !oom && b->nslots < room; r = r->next) {
        size_t first = b->nslots;
        b->nslots += claim_ring(r, b->slots + b->nslots, room - b->nslots);
        if (b->nslots > first && r->thread_name && ARRAY_GROW(b->thr, b->thr_cap, b->nthr, 8) == 0) {
            size_t at = b->arena.len;
            buf_put(&b->arena, r->thread_name, r->thread_name_len);
            b->thr[b->nthr++] = (thr_t){first, b->nslots, arena_since(b, at)};
        }
    }
    pthread_mutex_unlock(&cn_state.registry_mu);
    for (size_t i = 0; i < b->nslots; i++) {
        b->aux[i].ext = -1;
        if (b->slots[i].type != R_SPAN2 && (b->slots[i].flags & F_REFS))
            need_gil = 1;
    }
    if (!need_gil) {
        assign_mark_ids(b);
        pthread_mutex_unlock(&cn_state.collect_mu);
    }
    Py_END_ALLOW_THREADS
    if (need_gil) {
        /* the collect mutex stays held: this batch's mark ids must be assigned in order */
        for (size_t i = 0; i < b->nslots; i++)
            if (b->slots[i].type != R_SPAN2 && (b->slots[i].flags & F_REFS))
                resolve_refs(b, i);
        Py_BEGIN_ALLOW_THREADS
        assign_mark_ids(b);
        pthread_mutex_unlock(&cn_state.collect_mu);
        Py_END_ALLOW_THREADS
    }
    tl_collecting = 0;
    if (oom) {
        Py_DECREF(b);
        return PyErr_NoMemory();
    }
    if (b->nslots > 0)
        atomic_store_explicit(&cn_state.progress_ns, wall_ns(), memory_order_relaxed);
    atomic_fetch_add(&cn_state.marks_collected, b->n_marks);
    atomic_fetch_add(&cn_state.spans_collected, b->n_spans);
    if (b->nslots == 0) {
        Py_DECREF(b);
        Py_RETURN_NONE;
    }
    return (PyObject *)b;
}

/* Free the rings of threads that have exited and whose records are all collected. GIL held. */
static PyObject *
mod_free_orphans(PyObject *m, PyObject *unused)
{
    ring_t *dead = NULL;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&cn_state.registry_mu);
    ring_t **pp = &cn_state.rings;
    while (*pp) {
        ring_t *r = *pp;
        if (atomic_load_explicit(&r->orphaned, memory_order_acquire) &&
            atomic_load(&r->tail) == atomic_load(&r->head)) {
            *pp = r->next;
            r->next = dead;
            dead = r;
        }
        else {
            pp = &r->next;
        }
    }
    pthread_mutex_unlock(&cn_state.registry_mu);
    Py_END_ALLOW_THREADS
    long n = 0;
    while (dead) {
        ring_t *nx = dead->next;
        for (int i = 0; i < NAME_CACHE_SIZE; i++)
            Py_CLEAR(dead->name_cache[i].key);
        ring_free_locked(dead);
        dead = nx;
        n++;
    }
    return PyLong_FromLong(n);
}

/* ======================================================================================
 * 10. Batch and the spool v1 encoder
 * ==================================================================================== */

static void
Batch_dealloc(BatchObject *b)
{
    free(b->slots);
    free(b->aux);
    free(b->ext);
    free(b->mids);
    free(b->thr);
    free(b->arena.data);
    PyObject_Free(b);
}

static Py_ssize_t
Batch_len(BatchObject *b)
{
    return (Py_ssize_t)(b->n_marks + b->n_spans);
}

static PyObject *
Batch_get_counts(BatchObject *b, void *which)
{
    return PyLong_FromSize_t(which ? b->n_spans : b->n_marks);
}

static inline const char *
arena_at(BatchObject *b, uint32_t off)
{
    return b->arena.data + off;
}

static void
encode_span(buf_t *o, BatchObject *b, size_t i, int with_trace)
{
    slot_t *s = &b->slots[i];
    slot2_t *s2 = (slot2_t *)&b->slots[i + 1];
    aux_t *ax = &b->aux[i];
    ext_t *e = ax->ext >= 0 ? &b->ext[ax->ext] : NULL;
    BUF_LIT(o, "{\"id\":");
    buf_id(o, s->span_hi, s->span_lo);
    BUF_LIT(o, ",\"name\":");
    if ((s->flags & F_NAME_REF) && e && e->name.len)
        json_escape_utf8(o, arena_at(b, e->name.off), e->name.len);
    else {
        const name_entry_t *ne = name_get(s->name_id);
        buf_put(o, ne->tok, ne->len);
    }
    BUF_LIT(o, ",\"parent_id\":");
    if (s2->parent_hi == 0)
        BUF_LIT(o, "null");
    else
        buf_id(o, s2->parent_hi, s2->parent_lo);
    BUF_LIT(o, ",\"index\":");
    if (s->flags & F_HAS_INDEX)
        buf_i64(o, s2->index);
    else
        BUF_LIT(o, "null");
    BUF_LIT(o, ",\"start_ns\":");
    buf_i64(o, s->ts);
    BUF_LIT(o, ",\"end_ns\":");
    buf_i64(o, s->v.i);
    BUF_LIT(o, ",\"cpu_ns\":");
    if (s->flags & F_HAS_CPU)
        buf_i64(o, s2->cpu_ns);
    else
        BUF_LIT(o, "null");
    BUF_LIT(o, ",\"gpu_ns\":null,\"memory_peak_bytes\":null,\"thread_id\":");
    buf_i64(o, (int64_t)s2->thread_id);
    BUF_LIT(o, ",\"pid\":");
    buf_i64(o, b->pid);
    BUF_LIT(o, ",\"rank\":");
    buf_i64(o, b->rank);
    BUF_LIT(o, ",\"attrs\":");
    if (e && e->attrs.len)
        buf_put(o, arena_at(b, e->attrs.off), e->attrs.len);
    else
        BUF_LIT(o, "{}");
    BUF_LIT(o, ",\"mark_ids\":[");
    for (uint32_t k = 0; k < ax->mids_cnt; k++) {
        if (k)
            BUF_LIT(o, ",");
        size_t p = 2 * ((size_t)ax->mids_off + k);
        buf_id(o, b->mids[p], b->mids[p + 1]);
    }
    BUF_LIT(o, "]");
    if (ax->mids_omitted) { /* optional field: only on a span over its mark_ids cap */
        BUF_LIT(o, ",\"mark_ids_omitted\":");
        buf_i64(o, (int64_t)ax->mids_omitted);
    }
    if (with_trace) {
        BUF_LIT(o, ",\"trace_id\":");
        buf_id(o, s2->trace_hi, s2->trace_lo);
    }
    BUF_LIT(o, "}");
}

static void
encode_mark(buf_t *o, BatchObject *b, size_t i)
{
    slot_t *s = &b->slots[i];
    aux_t *ax = &b->aux[i];
    ext_t *e = ax->ext >= 0 ? &b->ext[ax->ext] : NULL;
    BUF_LIT(o, "{\"id\":");
    buf_id(o, ax->id_hi, ax->id_lo);
    BUF_LIT(o, ",\"span_id\":");
    if (s->flags & F_ROOTLESS)
        BUF_LIT(o, "\"root\"");
    else
        buf_id(o, s->span_hi, s->span_lo);
    BUF_LIT(o, ",\"name\":");
    if ((s->flags & F_NAME_REF) && e && e->name.len)
        json_escape_utf8(o, arena_at(b, e->name.off), e->name.len);
    else {
        const name_entry_t *ne = name_get(s->name_id);
        buf_put(o, ne->tok, ne->len);
    }
    const char *nonfinite = NULL;
    switch (s->vtype) {
    case VT_FLOAT:
        BUF_LIT(o, ",\"value_type\":\"float\",\"value\":");
        if (isnan(s->v.d))
            nonfinite = "nan";
        else if (isinf(s->v.d))
            nonfinite = s->v.d > 0 ? "inf" : "-inf";
        if (nonfinite)
            BUF_LIT(o, "null");
        else
            buf_f64(o, s->v.d);
        break;
    case VT_INT:
        BUF_LIT(o, ",\"value_type\":\"int\",\"value\":");
        buf_i64(o, s->v.i);
        break;
    case VT_BOOL:
        BUF_LIT(o, ",\"value_type\":\"bool\",\"value\":");
        s->v.i ? BUF_LIT(o, "true") : BUF_LIT(o, "false");
        break;
    default:
        BUF_LIT(o, ",\"value_type\":\"string\",\"value\":");
        if (e)
            json_escape_utf8(o, arena_at(b, e->val.off), e->val.len);
        else
            BUF_LIT(o, "\"\"");
    }
    if (nonfinite) {
        BUF_LIT(o, ",\"value_nonfinite\":\"");
        buf_put(o, nonfinite, strlen(nonfinite));
        BUF_LIT(o, "\"");
    }
    BUF_LIT(o, ",\"attrs\":");
    if (e && e->attrs.len)
        buf_put(o, arena_at(b, e->attrs.off), e->attrs.len);
    else
        BUF_LIT(o, "{}");
    BUF_LIT(o, ",\"ts_ns\":");
    buf_i64(o, s->ts);
    if (s->flags & F_SUMMARY)
        BUF_LIT(o, ",\"kind\":\"summary\"}");
    else
        BUF_LIT(o, ",\"kind\":\"point\"}");
}

/* The encoder streams: with fd >= 0 the buffer is written out whenever it passes
 * STREAM_CHUNK, so a 100,000-record file needs no 25 MB allocation and no copy. */
#define STREAM_CHUNK (256 * 1024)

typedef struct {
    buf_t buf;
    int fd;
    int err; /* errno of a failed write */
    uint64_t written;
} sink_buf_t;

static void
stream_out(sink_buf_t *o, int final)
{
    if (o->fd < 0 || o->err || (!final && o->buf.len < STREAM_CHUNK))
        return;
    size_t off = 0;
    while (off < o->buf.len) {
        ssize_t n = write(o->fd, o->buf.data + off, o->buf.len - off);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            o->err = errno;
            return;
        }
        off += (size_t)n;
    }
    o->written += off;
    o->buf.len = 0;
}

typedef struct {
    PyObject *fast;
    Py_ssize_t nb;
    const char *batch_id, *sdk_version;
    Py_ssize_t bid_len, sdk_len;
    long long created_ns;
    int with_trace;
} spool_args_t;

/* GIL released by the caller. */
static void
encode_spool_into(sink_buf_t *o, spool_args_t *a)
{
    buf_t *b0 = &o->buf;
    BUF_LIT(b0, "{\"schema_version\":1,\"sdk_version\":");
    json_escape_utf8(b0, a->sdk_version, a->sdk_len);
    BUF_LIT(b0, ",\"batch_id\":");
    json_escape_utf8(b0, a->batch_id, a->bid_len);
    BUF_LIT(b0, ",\"created_ns\":");
    buf_i64(b0, a->created_ns);
    BUF_LIT(b0, ",\"spans\":[");
    for (int pass = 0; pass < 2; pass++) {
        int first = 1;
        uint8_t want = pass == 0 ? R_SPAN : R_MARK;
        for (Py_ssize_t k = 0; k < a->nb; k++) {
            BatchObject *b = (BatchObject *)PySequence_Fast_GET_ITEM(a->fast, k);
            for (size_t i = 0; i < b->nslots; i++) {
                if (b->slots[i].type != want)
                    continue;
                if (!first)
                    BUF_LIT(b0, ",");
                first = 0;
                if (want == R_SPAN)
                    encode_span(b0, b, i, a->with_trace);
                else
                    encode_mark(b0, b, i);
                stream_out(o, 0);
            }
        }
        if (pass == 0)
            BUF_LIT(b0, "],\"marks\":[");
    }
    BUF_LIT(b0, "],\"snapshots\":[]}");
    stream_out(o, 1);
}

static int
parse_spool_args(PyObject *args, PyObject *kw, int with_fd, int *fd, spool_args_t *a)
{
    static char *kw_bytes[] = {"batches", "batch_id", "created_ns", "sdk_version", "with_trace_id", NULL};
    static char *kw_fd[] = {"fd", "batches", "batch_id", "created_ns", "sdk_version", "with_trace_id",
                            NULL};
    PyObject *seq;
    a->with_trace = 1;
    int ok = with_fd ? PyArg_ParseTupleAndKeywords(args, kw, "iOs#Ls#|p:write_spool", kw_fd, fd, &seq,
                                                   &a->batch_id, &a->bid_len, &a->created_ns,
                                                   &a->sdk_version, &a->sdk_len, &a->with_trace)
                     : PyArg_ParseTupleAndKeywords(args, kw, "Os#Ls#|p:encode_spool", kw_bytes, &seq,
                                                   &a->batch_id, &a->bid_len, &a->created_ns,
                                                   &a->sdk_version, &a->sdk_len, &a->with_trace);
    if (!ok)
        return -1;
    a->fast = PySequence_Fast(seq, "expected a sequence of Batch objects");
    if (a->fast == NULL)
        return -1;
    a->nb = PySequence_Fast_GET_SIZE(a->fast);
    for (Py_ssize_t k = 0; k < a->nb; k++) {
        if (!PyObject_TypeCheck(PySequence_Fast_GET_ITEM(a->fast, k), &Batch_Type)) {
            Py_CLEAR(a->fast);
            PyErr_SetString(PyExc_TypeError, "expected a sequence of Batch objects");
            return -1;
        }
    }
    return 0;
}

/* encode_spool(batches, batch_id, created_ns, sdk_version, with_trace_id=True) -> bytes */
static PyObject *
mod_encode_spool(PyObject *m, PyObject *args, PyObject *kw)
{
    spool_args_t a;
    if (parse_spool_args(args, kw, 0, NULL, &a) < 0)
        return NULL;
    sink_buf_t o = {.fd = -1};
    Py_BEGIN_ALLOW_THREADS
    encode_spool_into(&o, &a);
    Py_END_ALLOW_THREADS
    Py_DECREF(a.fast);
    if (o.buf.oom) {
        free(o.buf.data);
        return PyErr_NoMemory();
    }
    PyObject *res = PyBytes_FromStringAndSize(o.buf.data, (Py_ssize_t)o.buf.len);
    free(o.buf.data);
    return res;
}

/* write_spool(fd, batches, batch_id, created_ns, sdk_version, with_trace_id=True) -> int
 * Encode straight into an open file; returns the bytes written, raises OSError. */
static PyObject *
mod_write_spool(PyObject *m, PyObject *args, PyObject *kw)
{
    spool_args_t a;
    int fd = -1;
    if (parse_spool_args(args, kw, 1, &fd, &a) < 0)
        return NULL;
    sink_buf_t o = {.fd = fd};
    Py_BEGIN_ALLOW_THREADS
    buf_reserve(&o.buf, STREAM_CHUNK + 64 * 1024);
    encode_spool_into(&o, &a);
    Py_END_ALLOW_THREADS
    Py_DECREF(a.fast);
    int oom = o.buf.oom;
    free(o.buf.data);
    if (oom)
        return PyErr_NoMemory();
    if (o.err) {
        errno = o.err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromUnsignedLongLong(o.written);
}

static PyObject *
tok_str(BatchObject *b, tok_t t)
{
    return PyUnicode_DecodeUTF8(arena_at(b, t.off), t.len, "replace");
}

/* Batch.spans() -> list of tuples, the span view the OpenTelemetry bridge reads. */
static PyObject *
Batch_error_info(BatchObject *b, PyObject *args)
{
    /* error_info(span_id_hex) is not needed on the hot path; return raw tokens per span */
    PyObject *out = PyDict_New();
    if (out == NULL)
        return NULL;
    for (size_t i = 0; i < b->nslots; i++) {
        slot_t *s = &b->slots[i];
        if (s->type != R_SPAN || !(s->flags & F_ERROR) || b->aux[i].ext < 0)
            continue;
        ext_t *e = &b->ext[b->aux[i].ext];
        PyObject *key = hex128(s->span_hi, s->span_lo);
        PyObject *val = Py_BuildValue("(NNN)", tok_str(b, e->etype), tok_str(b, e->emsg),
                                      tok_str(b, e->estack));
        if (key == NULL || val == NULL || PyDict_SetItem(out, key, val) < 0) {
            Py_XDECREF(key);
            Py_XDECREF(val);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(key);
        Py_DECREF(val);
    }
    return out;
}

static PyMethodDef Batch_methods[] = {
    {"error_info", (PyCFunction)Batch_error_info, METH_NOARGS,
     "{span_id: (type_json, message_json, stacktrace_json)} for spans closed by an exception"},
    {NULL},
};

static PyGetSetDef Batch_getset[] = {
    {"mark_count", (getter)Batch_get_counts, NULL, "marks in this batch", NULL},
    {"span_count", (getter)Batch_get_counts, NULL, "spans in this batch", (void *)1},
    {NULL},
};

static PySequenceMethods Batch_as_sequence = {
    .sq_length = (lenfunc)Batch_len,
};

static PyTypeObject Batch_Type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "cirron_otel.Batch",
    .tp_basicsize = sizeof(BatchObject),
    .tp_dealloc = (destructor)Batch_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Records collected from the rings, ready to encode. Holds no Python references.",
    .tp_as_sequence = &Batch_as_sequence,
    .tp_methods = Batch_methods,
    .tp_getset = Batch_getset,
};

/* ======================================================================================
 * 12. OTLP: the mapping of spans and marks onto OpenTelemetry, encoded as protobuf
 *
 * otlp_encode() turns batches into one ExportTraceServiceRequest (bytes), applying the
 * mapping documented in the README: a closed scope is a span, a point mark an event on its
 * span, a summary mark the attribute cirron.summary.<name> (last wins). Marks arrive before
 * their span closes (possibly batches earlier), so an OtlpState keeps, per open span, its
 * last `event limit` events already encoded and its summaries, until the span closes.
 * ==================================================================================== */

/* Wire-format writers (pb_varint, pb_tag, pb_fixed, pb_bytes, pb_id, pb_begin/pb_end,
 * pb_splice_kvs): pb.h. The KeyValue helpers below apply the configured limits. */

/* OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT counts characters: the byte length of the first
 * cn_state.value_len_limit characters of UTF-8 text (all of it without a limit). */
static inline size_t
limited_utf8(const char *p, size_t n)
{
    if (cn_state.value_len_limit < 0)
        return n;
    size_t chars = 0;
    for (size_t i = 0; i < n; i++) {
        if (((unsigned char)p[i] & 0xC0) != 0x80) {
            if (chars == (size_t)cn_state.value_len_limit)
                return i;
            chars++;
        }
    }
    return n;
}

static void
pb_str_kv(buf_t *b, int field, const char *key, size_t klen, const char *val, size_t vlen)
{
    size_t kv = pb_begin(b, field);
    pb_bytes(b, 1, key, klen);
    size_t av = pb_begin(b, 2);
    pb_bytes(b, 1, val, limited_utf8(val, vlen));
    pb_end(b, av);
    pb_end(b, kv);
}

static void
pb_int_kv(buf_t *b, int field, const char *key, int64_t v)
{
    size_t kv = pb_begin(b, field);
    pb_bytes(b, 1, key, strlen(key));
    size_t av = pb_begin(b, 2);
    pb_tag(b, 3, WT_VARINT);
    pb_varint(b, (uint64_t)v);
    pb_end(b, av);
    pb_end(b, kv);
}

static void
pb_hex_kv(buf_t *b, int field, const char *key, uint64_t hi, uint64_t lo)
{
    char hex[32];
    hex64(hex, hi);
    hex64(hex + 16, lo);
    pb_str_kv(b, field, key, strlen(key), hex, 32);
}

/* GIL held. One value as an OTLP AnyValue body (inside an open field). Returns 0, or -1
 * for a value an attribute cannot hold at all (None), which is then left out. */
static void otlp_str_value(buf_t *a, PyObject *str);

static int
otlp_scalar(buf_t *a, PyObject *v)
{
    if (PyBool_Check(v)) {
        pb_tag(a, 2, WT_VARINT);
        pb_varint(a, v == Py_True);
        return 0;
    }
    if (PyLong_Check(v)) {
        int overflow = 0;
        long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
        if (!overflow && !(x == -1 && PyErr_Occurred())) {
            pb_tag(a, 3, WT_VARINT);
            pb_varint(a, (uint64_t)x);
            return 0;
        }
        PyErr_Clear();
        return 1;
    }
    if (PyFloat_Check(v)) {
        double d = PyFloat_AS_DOUBLE(v);
        uint64_t bits;
        memcpy(&bits, &d, 8);
        pb_tag(a, 4, WT_I64);
        pb_fixed(a, bits, 8);
        return 0;
    }
    if (PyUnicode_Check(v)) {
        otlp_str_value(a, v);
        return 0;
    }
    return 1;
}

static void
otlp_str_value(buf_t *a, PyObject *str)
{
    PyObject *enc = PyUnicode_AsEncodedString(str, "utf-8", "backslashreplace");
    if (enc == NULL) {
        PyErr_Clear();
        pb_bytes(a, 1, "<unencodable>", 13);
        return;
    }
    const char *u = PyBytes_AS_STRING(enc);
    pb_bytes(a, 1, u, limited_utf8(u, (size_t)PyBytes_GET_SIZE(enc)));
    Py_DECREF(enc);
}

static void
otlp_any_value(buf_t *a, PyObject *v)
{
    coerced_t cv = {.str = NULL};
    if (!(PyBool_Check(v) || PyLong_Check(v) || PyFloat_Check(v) || PyUnicode_Check(v)) &&
        numpy_types_ready() && PyObject_IsInstance(v, cn_state.numpy_generic) == 1 &&
        coerce_value_slow(v, &cv, 0) == 0) {
        PyObject *conv = cv.str ? cv.str
                         : cv.vtype == VT_FLOAT ? PyFloat_FromDouble(cv.v.d)
                         : cv.vtype == VT_BOOL  ? PyBool_FromLong((long)cv.v.i)
                                                : PyLong_FromLongLong(cv.v.i);
        if (conv) {
            otlp_scalar(a, conv);
            Py_DECREF(conv);
            return;
        }
    }
    PyErr_Clear();
    if (otlp_scalar(a, v) == 0)
        return;
    if (PyList_Check(v) || PyTuple_Check(v)) {
        /* a homogeneous sequence of primitives is an array; anything else its str() */
        Py_ssize_t n = PySequence_Fast_GET_SIZE(v);
        PyObject **items = PySequence_Fast_ITEMS(v);
        PyTypeObject *t0 = n ? Py_TYPE(items[0]) : NULL;
        int ok = 1;
        for (Py_ssize_t k = 0; k < n && ok; k++)
            ok = Py_TYPE(items[k]) == t0 && (t0 == &PyUnicode_Type || t0 == &PyBool_Type ||
                                             t0 == &PyLong_Type || t0 == &PyFloat_Type);
        if (ok) {
            size_t arr = pb_begin(a, 5);
            for (Py_ssize_t k = 0; k < n; k++) {
                size_t el = pb_begin(a, 1);
                if (otlp_scalar(a, items[k]) != 0) {
                    PyObject *str = PyObject_Str(items[k]);
                    if (str) {
                        otlp_str_value(a, str);
                        Py_DECREF(str);
                    }
                    PyErr_Clear();
                }
                pb_end(a, el);
            }
            pb_end(a, arr);
            return;
        }
    }
    PyObject *str = PyObject_Str(v);
    if (str == NULL) {
        PyErr_Clear();
        pb_bytes(a, 1, "<unserializable>", 16);
        return;
    }
    otlp_str_value(a, str);
    Py_DECREF(str);
}

/* GIL held. A dict as [varint len][KeyValue]... (no field tags: the encoder adds them for
 * span attributes or event attributes), at most `limit` entries. span_error: the attrs of
 * a span in error, whose Cirron keys `error` and `error.message` the status carries (its
 * `error.type` stays, a semantic-conventions attribute). */
static void
otlp_attrs(buf_t *a, PyObject *dict, uint32_t limit, uint32_t *n, uint32_t *dropped, int span_error)
{
    PyObject *items = PyDict_Items(dict);
    *n = *dropped = 0;
    if (items == NULL) {
        PyErr_Clear();
        return;
    }
    char *skip = dup_key_mask(items); /* the same key as the spool keeps */
    for (Py_ssize_t k = 0; k < PyList_GET_SIZE(items); k++) {
        if (skip && skip[k])
            continue;
        PyObject *kv = PyList_GET_ITEM(items, k);
        PyObject *key = PyTuple_GET_ITEM(kv, 0), *val = PyTuple_GET_ITEM(kv, 1);
        if (val == Py_None)
            continue; /* OpenTelemetry attributes cannot be null */
        if (span_error && PyUnicode_Check(key) &&
            (PyUnicode_CompareWithASCIIString(key, "error") == 0 ||
             PyUnicode_CompareWithASCIIString(key, "error.message") == 0))
            continue;
        if (*n >= limit) {
            (*dropped)++;
            continue;
        }
        size_t lenpos = a->len;
        buf_reserve(a, 5);
        a->len += 5;
        size_t body = a->len;
        PyObject *kenc = key_utf8(key);
        if (kenc) {
            pb_bytes(a, 1, PyBytes_AS_STRING(kenc), (size_t)PyBytes_GET_SIZE(kenc));
            Py_DECREF(kenc);
        }
        PyErr_Clear();
        size_t av = pb_begin(a, 2);
        otlp_any_value(a, val);
        pb_end(a, av);
        /* the length prefix, canonical: reuse pb_end's shrinking on a fake tag-less field */
        pb_end(a, body);
        (void)lenpos;
        (*n)++;
    }
    free(skip);
    Py_DECREF(items);
}

/* -- open-span state ------------------------------------------------------------------- */

typedef struct {
    uint32_t name_id;
    buf_t kv; /* one encoded KeyValue (no tag) */
    char *name_raw;
    uint32_t name_len;
} summary_t;

typedef struct ospan_s {
    uint64_t hi, lo;
    buf_t ev;            /* encoded events, each [varint len][Event] */
    uint32_t *ev_off;    /* start offset of each kept event in ev */
    uint32_t n_ev, first; /* kept events are [first, n_ev) */
    size_t ev_cap;
    uint64_t total_ev;
    summary_t *sum;
    uint32_t n_sum;
    size_t sum_cap;
    struct ospan_s *next;
} ospan_t;

typedef struct {
    PyObject_HEAD
    ospan_t **tab;
    size_t cap, n;
    uint32_t event_limit;
    uint64_t root_marks, unsampled_spans, events_dropped;
} OtlpStateObject;

static PyTypeObject OtlpState_Type;

static void
ospan_free(ospan_t *e)
{
    free(e->ev.data);
    free(e->ev_off);
    for (uint32_t k = 0; k < e->n_sum; k++) {
        free(e->sum[k].kv.data);
        free(e->sum[k].name_raw);
    }
    free(e->sum);
    free(e);
}

static ospan_t *
ospan_find(OtlpStateObject *st, uint64_t hi, uint64_t lo, int create)
{
    if (st->cap == 0) {
        if (!create)
            return NULL;
        st->cap = 256;
        st->tab = calloc(st->cap, sizeof(ospan_t *));
        if (st->tab == NULL) {
            st->cap = 0;
            return NULL;
        }
    }
    size_t h = open_hash(hi, lo, st->cap);
    for (ospan_t *e = st->tab[h]; e; e = e->next)
        if (e->hi == hi && e->lo == lo)
            return e;
    if (!create)
        return NULL;
    if (st->n * 2 > st->cap) {
        size_t ncap = st->cap * 2;
        ospan_t **nt = calloc(ncap, sizeof(ospan_t *));
        if (nt) {
            for (size_t k = 0; k < st->cap; k++) {
                for (ospan_t *e = st->tab[k], *nx; e; e = nx) {
                    nx = e->next;
                    size_t q = open_hash(e->hi, e->lo, ncap);
                    e->next = nt[q];
                    nt[q] = e;
                }
            }
            free(st->tab);
            st->tab = nt;
            st->cap = ncap;
            h = open_hash(hi, lo, st->cap);
        }
    }
    ospan_t *e = calloc(1, sizeof(ospan_t));
    if (e == NULL)
        return NULL;
    e->hi = hi;
    e->lo = lo;
    e->next = st->tab[h];
    st->tab[h] = e;
    st->n++;
    return e;
}

static void
ospan_remove(OtlpStateObject *st, ospan_t *target)
{
    size_t h = open_hash(target->hi, target->lo, st->cap);
    ospan_t **pp = &st->tab[h];
    while (*pp && *pp != target)
        pp = &(*pp)->next;
    if (*pp) {
        *pp = target->next;
        st->n--;
    }
    ospan_free(target);
}

static void
OtlpState_dealloc(OtlpStateObject *st)
{
    for (size_t k = 0; k < st->cap; k++)
        for (ospan_t *e = st->tab[k], *nx; e; e = nx) {
            nx = e->next;
            ospan_free(e);
        }
    free(st->tab);
    PyObject_Free(st);
}

static PyObject *
OtlpState_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"event_limit", NULL};
    unsigned int limit = 128;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|I:OtlpState", kwlist, &limit))
        return NULL;
    OtlpStateObject *st = PyObject_New(OtlpStateObject, &OtlpState_Type);
    if (st == NULL)
        return NULL;
    st->tab = NULL;
    st->cap = st->n = 0;
    st->event_limit = limit;
    st->root_marks = st->unsampled_spans = st->events_dropped = 0;
    return (PyObject *)st;
}

static PyObject *
OtlpState_get(OtlpStateObject *st, void *which)
{
    switch ((intptr_t)which) {
    case 0: return PyLong_FromSize_t(st->n);
    case 1: return PyLong_FromUnsignedLongLong(st->root_marks);
    case 2: return PyLong_FromUnsignedLongLong(st->unsampled_spans);
    default: return PyLong_FromUnsignedLongLong(st->events_dropped);
    }
}

static PyGetSetDef OtlpState_getset[] = {
    {"open_spans", (getter)OtlpState_get, NULL, "spans with marks waiting for their close", (void *)0},
    {"root_marks", (getter)OtlpState_get, NULL, "marks on \"root\": spool only", (void *)1},
    {"unsampled_spans", (getter)OtlpState_get, NULL, "spans not exported (parent not sampled)", (void *)2},
    {"events_dropped", (getter)OtlpState_get, NULL, "events over the event count limit", (void *)3},
    {NULL},
};

static PyTypeObject OtlpState_Type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "cirron_otel.OtlpState",
    .tp_basicsize = sizeof(OtlpStateObject),
    .tp_dealloc = (destructor)OtlpState_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Marks of spans that are still open, kept for the OTLP encoder.",
    .tp_new = OtlpState_new,
    .tp_getset = OtlpState_getset,
};

static inline const char *
slot_name(BatchObject *b, size_t i, size_t *len)
{
    slot_t *s = &b->slots[i];
    ext_t *e = b->aux[i].ext >= 0 ? &b->ext[b->aux[i].ext] : NULL;
    if ((s->flags & F_NAME_REF) && e) {
        *len = e->name.len;
        return b->arena.data + e->name.off;
    }
    const name_entry_t *ne = name_get(s->name_id);
    *len = ne->raw_len;
    return ne->raw;
}

/* the mark's value as an AnyValue body */
static void
pb_mark_value(buf_t *o, BatchObject *b, size_t i)
{
    slot_t *s = &b->slots[i];
    ext_t *e = b->aux[i].ext >= 0 ? &b->ext[b->aux[i].ext] : NULL;
    switch (s->vtype) {
    case VT_FLOAT: {
        uint64_t bits;
        memcpy(&bits, &s->v.d, 8);
        pb_tag(o, 4, WT_I64);
        pb_fixed(o, bits, 8);
        break;
    }
    case VT_INT:
        pb_tag(o, 3, WT_VARINT);
        pb_varint(o, (uint64_t)s->v.i);
        break;
    case VT_BOOL:
        pb_tag(o, 2, WT_VARINT);
        pb_varint(o, (uint64_t)s->v.i);
        break;
    default:
        if (e)
            pb_bytes(o, 1, b->arena.data + e->val.off, limited_utf8(b->arena.data + e->val.off, e->val.len));
        else
            pb_bytes(o, 1, "", 0);
    }
}

static void
otlp_add_mark(OtlpStateObject *st, BatchObject *b, size_t i)
{
    slot_t *s = &b->slots[i];
    if (s->flags & F_ROOTLESS) {
        st->root_marks++;
        return;
    }
    ospan_t *e = ospan_find(st, s->span_hi, s->span_lo, 1);
    if (e == NULL)
        return;
    ext_t *x = b->aux[i].ext >= 0 ? &b->ext[b->aux[i].ext] : NULL;
    size_t nlen;
    const char *name = slot_name(b, i, &nlen);
    if (s->flags & F_SUMMARY) {
        summary_t *sm = NULL;
        for (uint32_t k = 0; k < e->n_sum; k++)
            if (e->sum[k].name_len == nlen && memcmp(e->sum[k].name_raw, name, nlen) == 0)
                sm = &e->sum[k];
        if (sm == NULL) {
            if (ARRAY_GROW(e->sum, e->sum_cap, e->n_sum, 4) < 0)
                return;
            sm = &e->sum[e->n_sum++];
            memset(sm, 0, sizeof *sm);
            sm->name_raw = malloc(nlen ? nlen : 1);
            if (sm->name_raw)
                memcpy(sm->name_raw, name, nlen);
            sm->name_len = (uint32_t)nlen;
        }
        sm->kv.len = 0; /* the last summary of a name wins */
        BUF_LIT(&sm->kv, "cirron.summary.");
        size_t keylen = sm->kv.len + nlen;
        buf_put(&sm->kv, name, nlen);
        /* rebuild as KeyValue{key, value} */
        buf_t kv = {0};
        pb_bytes(&kv, 1, sm->kv.data, keylen);
        size_t av = pb_begin(&kv, 2);
        pb_mark_value(&kv, b, i);
        pb_end(&kv, av);
        free(sm->kv.data);
        sm->kv = kv;
        return;
    }
    /* a point mark: one Event, kept among the span's last event_limit events */
    if (ARRAY_GROW(e->ev_off, e->ev_cap, e->n_ev, 16) < 0)
        return;
    buf_t *ev = &e->ev;
    e->ev_off[e->n_ev++] = (uint32_t)ev->len;
    size_t lenpos = ev->len;
    buf_reserve(ev, 5);
    ev->len += 5;
    size_t body = ev->len;
    (void)lenpos;
    pb_tag(ev, 1, WT_I64);
    pb_fixed(ev, (uint64_t)s->ts, 8);
    pb_bytes(ev, 2, name, nlen);
    size_t kv = pb_begin(ev, 3);
    pb_bytes(ev, 1, "cirron.mark.value", 17);
    size_t av = pb_begin(ev, 2);
    pb_mark_value(ev, b, i);
    pb_end(ev, av);
    pb_end(ev, kv);
    pb_str_kv(ev, 3, "cirron.mark.kind", 16, "point", 5);
    pb_hex_kv(ev, 3, "cirron.mark.id", b->aux[i].id_hi, b->aux[i].id_lo);
    uint32_t dropped = 0;
    if (x && x->oattrs.len) {
        uint32_t room = cn_state.event_attr_limit > 3 ? cn_state.event_attr_limit - 3 : 0;
        uint32_t kept = pb_splice_kvs(ev, 3, b->arena.data + x->oattrs.off, x->oattrs.len, room);
        dropped = x->oattrs_n - kept + x->oattrs_dropped;
    }
    if (dropped) {
        pb_tag(ev, 4, WT_VARINT);
        pb_varint(ev, dropped);
    }
    pb_end(ev, body);
    e->total_ev++;
    if (e->n_ev - e->first > st->event_limit) {
        e->first++; /* drop the oldest, as the SDK does */
        st->events_dropped++;
        if (e->first > st->event_limit) { /* compact */
            uint32_t base = e->ev_off[e->first];
            memmove(ev->data, ev->data + base, ev->len - base);
            ev->len -= base;
            for (uint32_t k = e->first; k < e->n_ev; k++)
                e->ev_off[k - e->first] = e->ev_off[k] - base;
            e->n_ev -= e->first;
            e->first = 0;
        }
    }
}

typedef struct {
    uint64_t session_trace_hi, session_trace_lo;
    uint32_t spans;
} otlp_ctx_t;

/* the name of the thread that recorded slot i (NULL: unknown) */
static const tok_t *
batch_thread_name(const BatchObject *b, size_t i)
{
    size_t lo = 0, hi = b->nthr;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (b->thr[mid].end <= i)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo < b->nthr && b->thr[lo].start <= i ? &b->thr[lo].name : NULL;
}

static void
otlp_add_span(buf_t *o, OtlpStateObject *st, BatchObject *b, size_t i, otlp_ctx_t *c)
{
    slot_t *s = &b->slots[i];
    slot2_t *s2 = (slot2_t *)&b->slots[i + 1];
    ext_t *x = b->aux[i].ext >= 0 ? &b->ext[b->aux[i].ext] : NULL;
    ospan_t *e = ospan_find(st, s->span_hi, s->span_lo, 0);
    if (s->vtype & SF_UNSAMPLED) {
        st->unsampled_spans++;
        if (e)
            ospan_remove(st, e);
        return;
    }
    size_t sp = pb_begin(o, 2); /* ScopeSpans.spans */
    pb_id(o, 1, s2->trace_hi, s2->trace_lo, 16);
    pb_id(o, 2, s->span_hi, 0, 8);
    int is_root = s2->parent_hi == 0 || (s->vtype & SF_NEW_TRACE);
    if (!is_root)
        pb_id(o, 4, s2->parent_hi, 0, 8);
    size_t nlen;
    const char *name = slot_name(b, i, &nlen);
    pb_bytes(o, 5, name, nlen);
    pb_tag(o, 6, WT_VARINT);
    pb_varint(o, 1); /* SPAN_KIND_INTERNAL */
    pb_tag(o, 7, WT_I64);
    pb_fixed(o, (uint64_t)s->ts, 8);
    pb_tag(o, 8, WT_I64);
    pb_fixed(o, (uint64_t)s->v.i, 8);
    /* attributes: the scope's own, then cirron.*, then summaries, up to the limit */
    uint32_t limit = cn_state.span_attr_limit, n = 0, dropped = 0;
    if (x && x->oattrs.len) {
        n = pb_splice_kvs(o, 9, b->arena.data + x->oattrs.off, x->oattrs.len, limit);
        dropped += x->oattrs_n - n + x->oattrs_dropped;
    }
#define ROOM() (n < limit ? (n++, 1) : (dropped++, 0))
    const code_loc_t *code = code_get(s2->code_id);
    if (code != NULL) {
        if (ROOM())
            pb_str_kv(o, 9, "code.function.name", 18, code->func, code->func_len);
        if (code->file && ROOM())
            pb_str_kv(o, 9, "code.file.path", 14, code->file, code->file_len);
        if (code->line >= 0 && ROOM())
            pb_int_kv(o, 9, "code.line.number", code->line);
    }
    if ((s->flags & F_HAS_INDEX) && ROOM())
        pb_int_kv(o, 9, "cirron.index", s2->index);
    if (ROOM())
        pb_hex_kv(o, 9, "cirron.span_id", s->span_hi, s->span_lo);
    if (ROOM())
        pb_int_kv(o, 9, "thread.id", (int64_t)s2->thread_id);
    const tok_t *tname = batch_thread_name(b, i);
    if (tname != NULL && ROOM())
        pb_str_kv(o, 9, "thread.name", 11, b->arena.data + tname->off, tname->len);
    if (ROOM())
        pb_int_kv(o, 9, "cirron.rank", b->rank);
    if ((s->flags & F_HAS_CPU) && ROOM())
        pb_int_kv(o, 9, "cirron.cpu_ns", s2->cpu_ns);
    if ((s->vtype & SF_NEW_TRACE) && ROOM())
        pb_hex_kv(o, 9, "cirron.session.id", s2->parent_hi, s2->parent_lo);
    if (e)
        for (uint32_t k = 0; k < e->n_sum; k++)
            if (ROOM())
                pb_bytes(o, 9, e->sum[k].kv.data, e->sum[k].kv.len);
#undef ROOM
    if (dropped) {
        pb_tag(o, 10, WT_VARINT);
        pb_varint(o, dropped);
    }
    /* events: the marks (already encoded), then the exception */
    uint64_t ev_dropped = 0;
    int has_exception = (s->flags & F_ERROR) && x && x->etype.len;
    if (e) {
        /* the exception event counts toward the limit too: like the SDK, the oldest go */
        uint32_t first = e->first;
        if (has_exception && e->n_ev - first >= st->event_limit && first < e->n_ev)
            first += (e->n_ev - first) - (st->event_limit ? st->event_limit - 1 : 0);
        for (uint32_t k = first; k < e->n_ev; k++) {
            uint32_t start = e->ev_off[k];
            uint32_t end = k + 1 < e->n_ev ? e->ev_off[k + 1] : (uint32_t)e->ev.len;
            /* stored as [varint len][Event]: add the field tag */
            pb_tag(o, 11, WT_LEN);
            buf_put(o, e->ev.data + start, end - start);
        }
        ev_dropped = e->total_ev - (e->n_ev - first);
    }
    if (has_exception && st->event_limit == 0)
        ev_dropped++;
    else if (has_exception) {
        size_t ev = pb_begin(o, 11);
        pb_tag(o, 1, WT_I64);
        pb_fixed(o, (uint64_t)s->v.i, 8);
        pb_bytes(o, 2, "exception", 9);
        pb_str_kv(o, 3, "exception.type", 14, b->arena.data + x->etype.off, x->etype.len);
        pb_str_kv(o, 3, "exception.message", 17, b->arena.data + x->emsg.off, x->emsg.len);
        pb_str_kv(o, 3, "exception.stacktrace", 20, b->arena.data + x->estack.off, x->estack.len);
        pb_end(o, ev);
    }
    if (ev_dropped) {
        pb_tag(o, 12, WT_VARINT);
        pb_varint(o, ev_dropped);
    }
    if ((s->vtype & SF_NEW_TRACE) && (c->session_trace_hi | c->session_trace_lo)) {
        if (cn_state.link_limit == 0) {
            pb_tag(o, 14, WT_VARINT); /* dropped_links_count */
            pb_varint(o, 1);
        }
        else {
            size_t ln = pb_begin(o, 13);
            pb_id(o, 1, c->session_trace_hi, c->session_trace_lo, 16);
            pb_id(o, 2, s2->parent_hi, 0, 8);
            if (cn_state.link_attr_limit > 0)
                pb_str_kv(o, 4, "cirron.link", 11, "session", 7);
            else {
                pb_tag(o, 5, WT_VARINT); /* the link's dropped_attributes_count */
                pb_varint(o, 1);
            }
            pb_end(o, ln);
        }
    }
    if (s->flags & F_ERROR) {
        size_t stt = pb_begin(o, 15);
        if (x && x->emsg.len)
            pb_bytes(o, 2, b->arena.data + x->emsg.off, x->emsg.len);
        pb_tag(o, 3, WT_VARINT);
        pb_varint(o, 2); /* STATUS_CODE_ERROR */
        pb_end(o, stt);
    }
    pb_tag(o, 16, WT_I32);
    pb_fixed(o, 0x101, 4); /* sampled; is_remote known (false) */
    pb_end(o, sp);
    if (e)
        ospan_remove(st, e);
    c->spans++;
}

typedef struct {
    buf_t o;
    size_t rs, ss;
    uint32_t spans;
} otlp_req_t;

static void
otlp_req_open(otlp_req_t *r, const char *res, size_t res_len, const char *sname, size_t sname_len,
              const char *sver, size_t sver_len)
{
    memset(r, 0, sizeof *r);
    r->rs = pb_begin(&r->o, 1); /* ExportTraceServiceRequest.resource_spans */
    pb_bytes(&r->o, 1, res, res_len);
    r->ss = pb_begin(&r->o, 2); /* ResourceSpans.scope_spans */
    size_t sc = pb_begin(&r->o, 1); /* ScopeSpans.scope */
    pb_bytes(&r->o, 1, sname, sname_len);
    pb_bytes(&r->o, 2, sver, sver_len);
    pb_end(&r->o, sc);
}

/* otlp_encode(state, batches, resource, scope_name, scope_version, session_trace=(hi, lo),
 *             max_request_bytes=1 MiB) -> [(request bytes, spans), ...]
 * Requests are cut near max_request_bytes (collectors refuse messages over 4 MiB). */
static PyObject *
mod_otlp_encode(PyObject *m, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"state", "batches", "resource", "scope_name", "scope_version",
                             "session_trace", "max_request_bytes", NULL};
    PyObject *state, *seq;
    const char *res, *sname, *sver;
    Py_ssize_t res_len, sname_len, sver_len, max_bytes = 1 << 20;
    unsigned long long th = 0, tl = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O!Oy#s#s#|(KK)n:otlp_encode", kwlist,
                                     &OtlpState_Type, &state, &seq, &res, &res_len, &sname,
                                     &sname_len, &sver, &sver_len, &th, &tl, &max_bytes))
        return NULL;
    PyObject *fast = PySequence_Fast(seq, "otlp_encode() takes a sequence of Batch objects");
    if (fast == NULL)
        return NULL;
    Py_ssize_t nb = PySequence_Fast_GET_SIZE(fast);
    for (Py_ssize_t k = 0; k < nb; k++)
        if (!PyObject_TypeCheck(PySequence_Fast_GET_ITEM(fast, k), &Batch_Type)) {
            Py_DECREF(fast);
            PyErr_SetString(PyExc_TypeError, "otlp_encode() takes a sequence of Batch objects");
            return NULL;
        }
    OtlpStateObject *st = (OtlpStateObject *)state;
    otlp_ctx_t c = {.session_trace_hi = th, .session_trace_lo = tl};
    otlp_req_t *reqs = NULL;
    size_t nreq = 0, capreq = 0;
    int oom = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t k = 0; k < nb && !oom; k++) {
        BatchObject *b = (BatchObject *)PySequence_Fast_GET_ITEM(fast, k);
        /* in slot order: a span's marks precede its close in its thread's ring, and marks
         * of other threads (on the session) precede the session's close */
        for (size_t i = 0; i < b->nslots; i++)
            if (b->slots[i].type == R_MARK)
                otlp_add_mark(st, b, i);
        for (size_t i = 0; i < b->nslots && !oom; i++) {
            if (b->slots[i].type != R_SPAN)
                continue;
            if (nreq == 0 || reqs[nreq - 1].o.len >= (size_t)max_bytes) {
                if (ARRAY_GROW(reqs, capreq, nreq, 4) < 0) {
                    oom = 1;
                    break;
                }
                otlp_req_open(&reqs[nreq++], res, (size_t)res_len, sname, (size_t)sname_len, sver,
                              (size_t)sver_len);
            }
            otlp_req_t *r = &reqs[nreq - 1];
            uint32_t before = c.spans;
            otlp_add_span(&r->o, st, b, i, &c);
            r->spans += c.spans - before;
        }
    }
    for (size_t q = 0; q < nreq; q++) {
        pb_end(&reqs[q].o, reqs[q].ss);
        pb_end(&reqs[q].o, reqs[q].rs);
        oom |= reqs[q].o.oom;
    }
    Py_END_ALLOW_THREADS
    Py_DECREF(fast);
    PyObject *out = oom ? NULL : PyList_New(0);
    for (size_t q = 0; q < nreq; q++) {
        if (out != NULL && reqs[q].spans > 0) {
            PyObject *item = Py_BuildValue("(y#I)", reqs[q].o.data, (Py_ssize_t)reqs[q].o.len,
                                           reqs[q].spans);
            if (item == NULL || PyList_Append(out, item) < 0)
                Py_CLEAR(out);
            Py_XDECREF(item);
        }
        free(reqs[q].o.data);
    }
    free(reqs);
    if (oom)
        return PyErr_NoMemory();
    return out;
}

/* ======================================================================================
 * 11. Module functions
 * ==================================================================================== */

static PyObject *
mod_configure(PyObject *m, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"ring_capacity", "capture_cpu_time", "rank", "recording",
                             "full_wait", "warning_category", "decorate", "otel_context",
                             "trace_per_child", "otlp", "span_attr_limit", "event_attr_limit",
                             "value_len_limit", "otel_attached", "link_limit", "link_attr_limit",
                             NULL};
    Py_ssize_t cap = -1;
    int cpu = -1, recording = -1, otel_context = -1, per_child = -1, otlp = -1, attached = -1;
    long long span_limit = -1, event_limit = -1, value_limit = LLONG_MIN;
    long long link_limit = -1, link_attr_limit = -1;
    long long rank = LLONG_MIN;
    double full_wait = -1.0;
    PyObject *cat = NULL, *decorate = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|$npLpdOOpppLLLpLL:configure", kwlist, &cap, &cpu,
                                     &rank, &recording, &full_wait, &cat, &decorate, &otel_context,
                                     &per_child, &otlp, &span_limit, &event_limit, &value_limit,
                                     &attached, &link_limit, &link_attr_limit))
        return NULL;
    if (link_limit >= 0)
        cn_state.link_limit = (uint32_t)(link_limit > UINT32_MAX ? UINT32_MAX : link_limit);
    if (link_attr_limit >= 0)
        cn_state.link_attr_limit = (uint32_t)(link_attr_limit > UINT32_MAX ? UINT32_MAX : link_attr_limit);
    if (attached != -1)
        cn_state.otel_attached = attached;
    if (otlp != -1)
        cn_state.otlp = otlp;
    if (span_limit >= 0)
        cn_state.span_attr_limit = (uint32_t)span_limit;
    if (event_limit >= 0)
        cn_state.event_attr_limit = (uint32_t)event_limit;
    if (value_limit != LLONG_MIN)
        cn_state.value_len_limit = value_limit;
    if (otel_context != -1)
        cn_state.otel_context = otel_context;
    if (per_child != -1)
        cn_state.trace_per_child = per_child;
    if (cap != -1) {
        if (cap < 64 || cap > (1 << 26)) {
            PyErr_SetString(PyExc_ValueError, "ring_capacity must be between 64 and 67108864");
            return NULL;
        }
        cn_state.ring_capacity = (uint64_t)cap; /* applies to rings created from now on */
    }
    if (cpu != -1)
        cn_state.capture_cpu = cpu;
    if (rank != LLONG_MIN)
        cn_state.rank = rank;
    if (recording != -1)
        atomic_store(&cn_state.recording, recording);
    if (full_wait >= 0)
        atomic_store(&cn_state.full_wait_ns, (int64_t)(full_wait * 1e9));
    if (cat != NULL) {
        Py_INCREF(cat);
        Py_XSETREF(cn_state.warning_category, cat);
    }
    if (decorate != NULL) {
        Py_INCREF(decorate);
        Py_XSETREF(cn_state.decorate, decorate);
    }
    Py_RETURN_NONE;
}

static PyObject *
mod_session_begin(PyObject *m, PyObject *args)
{
    PyObject *attrs = NULL, *parent = NULL;
    if (!PyArg_ParseTuple(args, "|O!O:session_begin", &PyDict_Type, &attrs, &parent))
        return NULL;
    if (parent == Py_None)
        parent = NULL;
    if (parent != NULL && !PyObject_TypeCheck(parent, &Scope_Type)) {
        PyErr_SetString(PyExc_TypeError, "session_begin(): parent must be a Scope");
        return NULL;
    }
    if (cn_state.session != NULL)
        return Py_NewRef((PyObject *)cn_state.session);
    ring_t *r = get_ring();
    if (r == NULL)
        return NULL;
    /* The root is not pushed on the context: every thread and task sees it as the parent
     * of its outermost scope, and marks with no scope open attach to it. */
    PyObject *cur = NULL;
    if (PyContextVar_Get(cn_state.scope_var, NULL, &cur) < 0)
        return NULL;
    ScopeObject *s = scope_make(cn_state.session_name, NULL, attrs, r);
    if (s == NULL) {
        Py_XDECREF(cur);
        return NULL;
    }
    s->depth = 0;
    s->span_hi = rng_nonzero(&r->rng);
    s->span_lo = rng_next(&r->rng);
    if (parent != NULL || (cur != NULL && cur != Py_None)) {
        /* a forked child's session nests under the parent's; profile() called inside a
         * scope nests under that scope */
        ScopeObject *above = parent != NULL ? (ScopeObject *)parent : (ScopeObject *)cur;
        scope_inherit(s, above);
        s->span_flags = above->span_flags & SF_UNSAMPLED; /* its trace's sampling decision */
    }
    else {
        scope_new_trace(s, r);
    }
    Py_XDECREF(cur);
    scope_start(s, 0);
    atomic_store_explicit(&cn_state.session_hi, s->span_hi, memory_order_relaxed);
    atomic_store_explicit(&cn_state.session_lo, s->span_lo, memory_order_relaxed);
    cn_state.session = s;
    return Py_NewRef((PyObject *)s);
}

static PyObject *
mod_session_end(PyObject *m, PyObject *unused)
{
    ScopeObject *s = cn_state.session;
    if (s == NULL)
        Py_RETURN_NONE;
    cn_state.session = NULL;
    scope_close(s, NULL, NULL);
    Py_DECREF(s);
    Py_RETURN_NONE;
}

/* set_sampler(sample_all, bound): the sampling of traces Cirron starts from now on (see
 * root_sampling); sample_all=False with bound=0 samples none. */
static PyObject *
mod_set_sampler(PyObject *m, PyObject *args)
{
    int all;
    unsigned long long bound;
    if (!PyArg_ParseTuple(args, "pK:set_sampler", &all, &bound))
        return NULL;
    cn_state.sample_bound = (uint64_t)bound;
    cn_state.sample_all = all;
    Py_RETURN_NONE;
}

static PyObject *
mod_session(PyObject *m, PyObject *unused)
{
    if (cn_state.session == NULL)
        Py_RETURN_NONE;
    return Py_NewRef((PyObject *)cn_state.session);
}

static PyObject *
mod_current_scope(PyObject *m, PyObject *unused)
{
    PyObject *cur = NULL;
    if (PyContextVar_Get(cn_state.scope_var, NULL, &cur) < 0)
        return NULL;
    if (cur == NULL)
        Py_RETURN_NONE;
    return cur;
}

/* wait(timeout) -> bool: sleep until a producer wakes the drainer or the timeout passes. */
static PyObject *
mod_wait(PyObject *m, PyObject *arg)
{
    double timeout = PyFloat_AsDouble(arg);
    if (timeout == -1.0 && PyErr_Occurred())
        return NULL;
    int woken;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&cn_state.wake_mu);
    atomic_store(&cn_state.drainer_sleeping, 1);
    if (!atomic_load(&cn_state.wake_flag) && timeout > 0) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        double whole = floor(timeout);
        ts.tv_sec += (time_t)whole;
        ts.tv_nsec += (long)((timeout - whole) * 1e9);
        if (ts.tv_nsec >= 1000000000L) {
            ts.tv_sec++;
            ts.tv_nsec -= 1000000000L;
        }
        pthread_cond_timedwait(&cn_state.wake_cv, &cn_state.wake_mu, &ts);
    }
    atomic_store(&cn_state.drainer_sleeping, 0);
    woken = atomic_exchange(&cn_state.wake_flag, 0);
    pthread_mutex_unlock(&cn_state.wake_mu);
    Py_END_ALLOW_THREADS
    if (woken)
        atomic_fetch_add(&cn_state.wakeups, 1);
    return PyBool_FromLong(woken);
}

/* progress(): a sink delivered data; producers waiting for room keep waiting. */
static PyObject *
mod_progress(PyObject *m, PyObject *unused)
{
    atomic_store_explicit(&cn_state.progress_ns, wall_ns(), memory_order_relaxed);
    Py_RETURN_NONE;
}

static PyObject *
mod_wake(PyObject *m, PyObject *unused)
{
    wake_drainer();
    Py_RETURN_NONE;
}

/* pending() -> records recorded but not yet collected, over all rings */
static uint64_t
pending_slots(void)
{
    uint64_t n = 0;
    pthread_mutex_lock(&cn_state.registry_mu);
    for (ring_t *r = cn_state.rings; r; r = r->next)
        n += atomic_load(&r->head) - atomic_load(&r->tail);
    pthread_mutex_unlock(&cn_state.registry_mu);
    return n;
}

static PyObject *
mod_pending(PyObject *m, PyObject *unused)
{
    uint64_t n;
    Py_BEGIN_ALLOW_THREADS
    n = pending_slots();
    Py_END_ALLOW_THREADS
    return PyLong_FromUnsignedLongLong(n);
}

static PyObject *
mod_stats(PyObject *m, PyObject *unused)
{
    uint64_t mr = atomic_load(&cn_state.freed_marks_recorded), sr = atomic_load(&cn_state.freed_spans_recorded),
             dd = atomic_load(&cn_state.freed_depth_drops), md = atomic_load(&cn_state.freed_marks_dropped),
             sd = atomic_load(&cn_state.freed_spans_dropped), pend = 0, live = 0;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&cn_state.registry_mu);
    for (ring_t *r = cn_state.rings; r; r = r->next) {
        mr += atomic_load(&r->marks_recorded);
        sr += atomic_load(&r->spans_recorded);
        dd += atomic_load(&r->depth_drops);
        md += atomic_load(&r->marks_dropped);
        sd += atomic_load(&r->spans_dropped);
        pend += atomic_load(&r->head) - atomic_load(&r->tail);
        live += !atomic_load(&r->orphaned);
    }
    pthread_mutex_unlock(&cn_state.registry_mu);
    Py_END_ALLOW_THREADS
    return Py_BuildValue(
        "{s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:n,s:I,s:K}", "marks_recorded",
        (unsigned long long)mr, "spans_recorded", (unsigned long long)sr, "scope_depth_drops",
        (unsigned long long)dd, "marks_dropped", (unsigned long long)md, "spans_dropped",
        (unsigned long long)sd, "pending_slots", (unsigned long long)pend, "marks_collected",
        (unsigned long long)atomic_load(&cn_state.marks_collected), "spans_collected",
        (unsigned long long)atomic_load(&cn_state.spans_collected), "rings_live", (unsigned long long)live,
        "rings_created", (unsigned long long)atomic_load(&cn_state.rings_created), "rings_freed",
        (unsigned long long)atomic_load(&cn_state.rings_freed), "wakeups",
        (unsigned long long)atomic_load(&cn_state.wakeups), "open_spans", (Py_ssize_t)cn_state.open_n,
        "names", (unsigned int)atomic_load(&cn_state.name_count), "mark_id_overflow",
        (unsigned long long)atomic_load(&cn_state.open_overflow));
}

static PyObject *
mod_name_of(PyObject *m, PyObject *arg)
{
    Py_ssize_t i = PyLong_AsSsize_t(arg);
    if (i == -1 && PyErr_Occurred())
        return NULL;
    return PySequence_GetItem(cn_state.name_objs, i);
}

/* fork(): the prepare/parent hooks keep the registry lock consistent; the child resets. */
static void
atfork_prepare(void)
{
    /* Only the registry lock: its holders never wait for the GIL while holding it, and the
     * forking thread holds the GIL. The collector lock is simply re-made in the child. */
    pthread_mutex_lock(&cn_state.registry_mu);
}

static void
atfork_parent(void)
{
    pthread_mutex_unlock(&cn_state.registry_mu);
}

static void
atfork_child(void)
{
    pthread_mutex_init(&cn_state.registry_mu, NULL);
    pthread_mutex_init(&cn_state.collect_mu, NULL);
    pthread_mutex_init(&cn_state.wake_mu, NULL);
    pthread_cond_init(&cn_state.wake_cv, NULL);
    atomic_store(&cn_state.drainer_sleeping, 0);
    atomic_store(&cn_state.wake_flag, 0);
    /* a collect() in flight in the parent may have left the open-span table mid-update:
     * abandon it (a bounded leak, once per fork) rather than walk it */
    cn_state.open_tab = NULL;
    cn_state.open_cap = 0;
    cn_state.open_n = 0;
    cn_state.pid = (int64_t)getpid();
}

/* after_fork_child(): called from os.register_at_fork in the child, GIL held. The child
 * starts with empty rings (the parent still owns and writes what was pending), fresh
 * random state and zeroed counters. */
static PyObject *
mod_after_fork_child(PyObject *m, PyObject *unused)
{
    cn_state.pid = (int64_t)getpid();
    ring_t *keep = tl_ring;
    ring_t *r = cn_state.rings;
    cn_state.rings = NULL;
    while (r) {
        ring_t *nx = r->next;
        for (uint64_t t = atomic_load(&r->tail), h = atomic_load(&r->head); t < h; t++) {
            slot_t *s = &r->slots[t & r->mask];
            if (s->type != R_SPAN2 && (s->flags & F_REFS))
                slot_release_refs(s);
        }
        if (r == keep) {
            uint64_t h = atomic_load(&r->head);
            atomic_store(&r->tail, h);
            r->cached_tail = h;
            atomic_store(&r->marks_recorded, 0);
            atomic_store(&r->spans_recorded, 0);
            atomic_store(&r->depth_drops, 0);
            atomic_store(&r->marks_dropped, 0);
            atomic_store(&r->spans_dropped, 0);
            r->warned_full = r->warned_depth = 0;
            rng_seed(&r->rng);
            r->next = NULL;
            r->thread_id = (uint64_t)PyThread_get_thread_ident();
            cn_state.rings = r;
        }
        else {
            /* threads that do not exist in the child: their name caches are garbage to us */
            for (int i = 0; i < NAME_CACHE_SIZE; i++)
                Py_CLEAR(r->name_cache[i].key);
            free(r->thread_name);
            free(r->slots);
            free(r);
        }
        r = nx;
    }
    atomic_store(&cn_state.freed_marks_recorded, 0);
    atomic_store(&cn_state.freed_spans_recorded, 0);
    atomic_store(&cn_state.freed_depth_drops, 0);
    atomic_store(&cn_state.freed_marks_dropped, 0);
    atomic_store(&cn_state.freed_spans_dropped, 0);
    atomic_store(&cn_state.marks_collected, 0);
    atomic_store(&cn_state.spans_collected, 0);
    atomic_store(&cn_state.rings_freed, 0);
    atomic_store(&cn_state.rings_created, cn_state.rings ? 1 : 0);
    rng_seed(&cn_state.collect_rng);
    cn_state.collect_rng_ready = 1;
    Py_RETURN_NONE;
}

/* new_ids() -> (span_hi, span_lo, trace_hi, trace_lo) random ids, for the Python side */
static PyObject *
mod_random_u64(PyObject *m, PyObject *unused)
{
    ring_t *r = get_ring();
    if (r == NULL)
        return NULL;
    return PyLong_FromUnsignedLongLong(rng_next(&r->rng));
}

/* format_float(x) -> str: the spool's float text, exposed for tests */
static PyObject *
mod_format_float(PyObject *m, PyObject *arg)
{
    double d = PyFloat_AsDouble(arg);
    if (d == -1.0 && PyErr_Occurred())
        return NULL;
    if (!isfinite(d)) {
        PyErr_SetString(PyExc_ValueError, "format_float() takes a finite float");
        return NULL;
    }
    char out[40];
    int n = format_f64(d, out);
    return PyUnicode_FromStringAndSize(out, n);
}

static PyMethodDef module_methods[] = {
    {"format_float", (PyCFunction)mod_format_float, METH_O, NULL},
    {"otlp_encode", (PyCFunction)(void (*)(void))mod_otlp_encode, METH_VARARGS | METH_KEYWORDS, NULL},
    {"mark", (PyCFunction)(void (*)(void))mod_mark, METH_FASTCALL | METH_KEYWORDS,
     "mark(name, value, *, kind='point', **attrs)"},
    {"scope", (PyCFunction)(void (*)(void))mod_scope, METH_FASTCALL | METH_KEYWORDS,
     "scope(name, index=None, **attrs)"},
    {"code_scope", (PyCFunction)(void (*)(void))mod_code_scope, METH_FASTCALL | METH_KEYWORDS,
     "code_scope(code, name, index=None, **attrs)"},
    {"code_location", (PyCFunction)mod_code_location, METH_VARARGS,
     "code_location(function, file, line) -> id"},
    {"epochs", (PyCFunction)mod_epochs, METH_O, "epochs(iterable)"},
    {"batches", (PyCFunction)mod_batches, METH_O, "batches(iterable)"},
    {"scoped_iter", (PyCFunction)mod_scoped_iter, METH_VARARGS, "scoped_iter(iterable, name)"},
    {"current_scope", (PyCFunction)mod_current_scope, METH_NOARGS, NULL},
    {"session_begin", (PyCFunction)mod_session_begin, METH_VARARGS, NULL},
    {"session_end", (PyCFunction)mod_session_end, METH_NOARGS, NULL},
    {"session", (PyCFunction)mod_session, METH_NOARGS, NULL},
    {"set_sampler", (PyCFunction)mod_set_sampler, METH_VARARGS, "set_sampler(sample_all, bound)"},
    {"configure", (PyCFunction)(void (*)(void))mod_configure, METH_VARARGS | METH_KEYWORDS, NULL},
    {"collect", (PyCFunction)mod_collect, METH_VARARGS, NULL},
    {"free_orphans", (PyCFunction)mod_free_orphans, METH_NOARGS, NULL},
    {"encode_spool", (PyCFunction)(void (*)(void))mod_encode_spool, METH_VARARGS | METH_KEYWORDS,
     NULL},
    {"write_spool", (PyCFunction)(void (*)(void))mod_write_spool, METH_VARARGS | METH_KEYWORDS, NULL},
    {"wait", (PyCFunction)mod_wait, METH_O, NULL},
    {"wake", (PyCFunction)mod_wake, METH_NOARGS, NULL},
    {"progress", (PyCFunction)mod_progress, METH_NOARGS, NULL},
    {"pending", (PyCFunction)mod_pending, METH_NOARGS, NULL},
    {"stats", (PyCFunction)mod_stats, METH_NOARGS, NULL},
    {"name_of", (PyCFunction)mod_name_of, METH_O, NULL},
    {"after_fork_child", (PyCFunction)mod_after_fork_child, METH_NOARGS, NULL},
    {"random_u64", (PyCFunction)mod_random_u64, METH_NOARGS, NULL},
    {NULL},
};

/* Process-wide state (rings, the name table, the context variables) lives in C globals and
 * is set up once, whatever the number of module objects. */
static int
native_init_globals(void)
{
    static int done;
    if (done)
        return 0;
    if (PyType_Ready(&Scope_Type) < 0 || PyType_Ready(&ScopeIter_Type) < 0 ||
        PyType_Ready(&Batch_Type) < 0 || PyType_Ready(&OtlpState_Type) < 0)
        return -1;
    if (pthread_key_create(&cn_state.ring_key, ring_thread_exit) != 0) {
        PyErr_SetString(PyExc_RuntimeError, "cirron_otel: pthread_key_create failed");
        return -1;
    }
    pthread_atfork(atfork_prepare, atfork_parent, atfork_child);
    cn_state.pid = (int64_t)getpid();
    cn_state.scope_var = PyContextVar_New("cirron_otel.current_scope", NULL);
    cn_state.otel_var = PyContextVar_New("cirron_otel.otel_context", NULL);
    cn_state.name_ids = PyDict_New();
    cn_state.name_objs = PyList_New(0);
    cn_state.str_point = PyUnicode_InternFromString("point");
    cn_state.str_summary = PyUnicode_InternFromString("summary");
    cn_state.str_kind = PyUnicode_InternFromString("kind");
    cn_state.str_index = PyUnicode_InternFromString("index");
    cn_state.str_item = PyUnicode_InternFromString("item");
    cn_state.session_name = PyUnicode_InternFromString("cirron.session");
    cn_state.epoch_name = PyUnicode_InternFromString("epoch");
    cn_state.batch_name = PyUnicode_InternFromString("batch");
    if (!cn_state.scope_var || !cn_state.otel_var || !cn_state.name_ids || !cn_state.name_objs || !cn_state.str_point || !cn_state.str_summary ||
        !cn_state.str_kind || !cn_state.str_index || !cn_state.str_item || !cn_state.session_name || !cn_state.epoch_name ||
        !cn_state.batch_name)
        return -1;
    done = 1;
    return 0;
}

static int
native_exec(PyObject *m)
{
    if (native_init_globals() < 0)
        return -1;
    if (PyModule_AddObjectRef(m, "Scope", (PyObject *)&Scope_Type) < 0 ||
        PyModule_AddObjectRef(m, "ScopeIterator", (PyObject *)&ScopeIter_Type) < 0 ||
        PyModule_AddObjectRef(m, "Batch", (PyObject *)&Batch_Type) < 0 ||
        PyModule_AddObjectRef(m, "OtlpState", (PyObject *)&OtlpState_Type) < 0 ||
        PyModule_AddObjectRef(m, "scope_var", cn_state.scope_var) < 0 ||
        PyModule_AddObjectRef(m, "otel_var", cn_state.otel_var) < 0 ||
        PyModule_AddIntConstant(m, "MAX_DEPTH", MAX_DEPTH) < 0 ||
        PyModule_AddIntConstant(m, "STR_VALUE_CAP", STR_VALUE_CAP) < 0)
        return -1;
    return 0;
}

static PyModuleDef_Slot native_slots[] = {
    {Py_mod_exec, native_exec},
#ifdef Py_mod_multiple_interpreters /* 3.12+: the state is process-wide C globals */
    {Py_mod_multiple_interpreters, Py_MOD_MULTIPLE_INTERPRETERS_NOT_SUPPORTED},
#endif
#ifdef Py_mod_gil /* 3.13+: rings, scopes and the collector rely on the GIL (a free-threaded
                   * interpreter re-enables it, with a RuntimeWarning, when importing us) */
    {Py_mod_gil, Py_MOD_GIL_USED},
#endif
    {0, NULL},
};

static struct PyModuleDef native_module = {
    PyModuleDef_HEAD_INIT, "cirron_otel._native",
    "Native producer side of cirron-otel: rings, scopes, marks, collector, spool encoder.", 0,
    module_methods, native_slots,
};

PyMODINIT_FUNC
PyInit__native(void)
{
    return PyModuleDef_Init(&native_module);
}

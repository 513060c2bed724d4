/*
 * record.c — the parts of a record, and the slow paths of recording one: ids from the OS,
 * the name table, the per-thread rings (creation, backpressure, drop-oldest), value coercion
 * and attribute capture for mark() and scope(), and the code locations of decorated
 * functions. Their fast paths are inline in native.h, where scope.c inlines them.
 */
#include "native.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#if defined(__linux__) || defined(__APPLE__) || defined(__FreeBSD__)
#include <sys/random.h>
#define HAVE_GETENTROPY 1
#endif

#include "json.h" /* json_escape_utf8: a name's JSON token */

/* ======================================================================================
 * Platform
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

void
cn_rng_seed(rng_t *r)
{
    do {
        os_entropy(r->s, sizeof(r->s));
    } while ((r->s[0] | r->s[1] | r->s[2] | r->s[3]) == 0);
}

/* ======================================================================================
 * Name table
 *
 * Names (of marks and scopes) are interned: the first time a name string is seen its
 * JSON-escaped token is stored in an append-only table that never moves, so the drainer
 * encodes a mark from a 4-byte id without touching Python objects. Producers find ids
 * through a per-thread cache keyed by object identity (entries hold a reference, so a
 * cached pointer is never reused for another string) and fall back to a dict lookup by
 * content under the GIL.
 * ==================================================================================== */

/* Returns the id, or UINT32_MAX with an exception set, or UINT32_MAX-1 when the table is
 * full (the caller then keeps a reference to the name in the record instead). */
uint32_t
cn_name_intern(PyObject *name)
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
 * Rings
 * ==================================================================================== */

CN_TLS_FAST _Thread_local ring_t *cn_tl_ring;

void
cn_wake_drainer(void)
{
    if (!atomic_exchange_explicit(&cn_state.wake_flag, 1, memory_order_acq_rel) &&
        atomic_load_explicit(&cn_state.drainer_sleeping, memory_order_acquire)) {
        pthread_mutex_lock(&cn_state.wake_mu);
        pthread_cond_signal(&cn_state.wake_cv);
        pthread_mutex_unlock(&cn_state.wake_mu);
    }
}

void
cn_ring_thread_exit(void *p)
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
    cn_rng_seed(&r->rng);
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

ring_t *
cn_get_ring_slow(void)
{
    ring_t *r = ring_create();
    if (r == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    cn_tl_ring = r;
    pthread_setspecific(cn_state.ring_key, r);
    /* after cn_tl_ring is set: current_thread() may run Python code that records */
    uint32_t len = 0;
    char *name = current_thread_name(&len);
    if (name != NULL) {
        pthread_mutex_lock(&cn_state.registry_mu); /* the drainer reads it under this lock */
        r->thread_name = name;
        r->thread_name_len = len;
        pthread_mutex_unlock(&cn_state.registry_mu);
    }
    return r;
}

void
cn_slot_release_refs(slot_t *s)
{
    /* GIL held */
    Py_CLEAR(s->name_ref);
    Py_CLEAR(s->obj);
    Py_CLEAR(s->attrs);
}

void
cn_warn_once(int *flag, const char *msg)
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
void
cn_ring_make_room(ring_t *r, uint64_t h, uint64_t need)
{
    r->cached_tail = atomic_load_explicit(&r->tail, memory_order_acquire);
    if (h + need - r->cached_tail <= r->cap)
        return;
    cn_wake_drainer();
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
                cn_slot_release_refs(s);
            r->cached_tail = t + len;
        }
        else {
            r->cached_tail = t; /* the consumer moved on: re-check */
        }
    }
    cn_warn_once(&r->warned_full,
              "cirron_otel: a thread's record ring is full; the oldest records are being dropped "
              "(counted in health()['mark_drop_count'] / ['span_drop_count']). Raise "
              "profile(ring_capacity=...) or flush more often.");
}

/* ======================================================================================
 * Value coercion
 * ==================================================================================== */

/* Load numpy's scalar base classes if (and only if) the user has imported numpy. */
int
cn_numpy_types_ready(void)
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
    if (!cn_state.numpy_generic || !cn_state.numpy_floating || !cn_state.numpy_integer ||
        !cn_state.numpy_bool) {
        PyErr_Clear();
        Py_CLEAR(cn_state.numpy_generic);
        Py_CLEAR(cn_state.numpy_floating);
        Py_CLEAR(cn_state.numpy_integer);
        Py_CLEAR(cn_state.numpy_bool);
        return 0;
    }
    return 1;
}

/* Slow path: subclasses, numpy scalars, and the errors. */
int
cn_coerce_value_slow(PyObject *value, coerced_t *out, int depth)
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
    if (depth == 0 && cn_numpy_types_ready()) {
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
                int rc = cn_coerce_value_slow(conv, out, 1);
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

static PyObject *
attr_str_now(PyObject *v)
{
    PyObject *str = PyObject_Str(v);
    if (str == NULL) {
        PyErr_Clear();
        return Py_NewRef(v); /* rendered (as str() or "<unserializable>") when drained */
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
PyObject *
cn_attr_capture(PyObject *v, capture_t *c)
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
            PyObject *cx = cn_attr_capture(PyTuple_GET_ITEM(kv, 1), c);
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
            PyObject *cx = cn_attr_capture(x, c);
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

/* ======================================================================================
 * Code locations (code_location(): see code_loc_t in native.h)
 * ==================================================================================== */

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
PyObject *
cn_mod_code_location(PyObject *m, PyObject *args)
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

/*
 * drain.c — the drainer's claim step and the Batch it fills.
 *
 * drain() runs on the drainer thread. Phase 1 (no GIL) copies records out of every ring
 * and claims them with one CAS per ring; records a producer stole meanwhile are dropped
 * from the copy. Phase 2 (GIL, only when claimed records hold Python references) renders
 * attrs / string values / exceptions (render.c) and releases the references. Phase 3 (no
 * GIL) assigns mark ids and gathers each span's mark ids.
 */
#include "native.h"

#include <stdlib.h>

static _Thread_local int tl_draining; /* this thread is inside drain() */

/* Done with an open-span entry (out of the table): kept for reuse when the free list has room
 * and its id array is small, else freed. Drain mutex held. */
static void
open_span_release(open_span_t *e)
{
    if (cn_state.open_nfree < OPEN_FREE_MAX && e->cap <= OPEN_FREE_IDS_MAX) {
        cn_state.open_free[cn_state.open_nfree++] = e;
        return;
    }
    free(e->ids);
    free(e);
}

/* The open span with this id, added when new; NULL when out of memory. Drain mutex held. */
static open_span_t *
open_span_get(uint64_t hi, uint64_t lo)
{
    open_span_t *e = (open_span_t *)spantab_find(&cn_state.open_spans, hi, lo);
    if (e != NULL)
        return e;
    if (cn_state.open_nfree > 0) {
        e = cn_state.open_free[--cn_state.open_nfree];
        uint64_t *ids = e->ids; /* the array is reused, its contents are not */
        size_t cap = e->cap;
        memset(e, 0, sizeof *e);
        e->ids = ids;
        e->cap = cap;
    }
    else if ((e = calloc(1, sizeof *e)) == NULL) {
        return NULL;
    }
    e->key.hi = hi;
    e->key.lo = lo;
    e->max = hi == atomic_load_explicit(&cn_state.session_hi, memory_order_relaxed) &&
                     lo == atomic_load_explicit(&cn_state.session_lo, memory_order_relaxed)
                 ? SESSION_MARK_IDS_MAX
                 : SPAN_MARK_IDS_MAX;
    if (spantab_add(&cn_state.open_spans, &e->key, 1024) < 0) {
        open_span_release(e);
        return NULL;
    }
    return e;
}

static BatchObject *
batch_new(void)
{
    BatchObject *b = PyObject_New(BatchObject, &cn_Batch_Type);
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

/* Phase 2 for one slot (GIL held). */
static void
resolve_refs(BatchObject *b, size_t i)
{
    slot_t *s = &b->slots[i];
    if (ARRAY_GROW(b->ext, b->ext_cap, b->next, 64) < 0) {
        cn_slot_release_refs(s);
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
        size_t st = a->len;
        cn_render_json(a, attrs);
        e->attrs = arena_since(b, st);
        if (cn_state.otlp && PyDict_Check(attrs)) {
            st = a->len;
            uint32_t limit = s->type == R_MARK ? cn_state.event_attr_limit : cn_state.span_attr_limit;
            /* a failed span: error / error.message are the status over OTLP, not attributes */
            cn_otlp_attrs(a, attrs, limit, &e->oattrs_n, &e->oattrs_dropped,
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
    cn_slot_release_refs(s);
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

/* Phase 3 (drain mutex held, no GIL): mark ids, and each closing span's mark ids. Marks
 * go first, so a span closing in this batch sees every mark recorded before it. */
static void
assign_mark_ids(BatchObject *b)
{
    for (size_t i = 0; i < b->nslots; i++) {
        slot_t *s = &b->slots[i];
        if (s->type != R_MARK)
            continue;
        uint64_t hi = rng_next(&cn_state.drain_rng), lo = rng_next(&cn_state.drain_rng);
        /* RFC 4122 version 4 layout: 122 random bits */
        hi = (hi & 0xFFFFFFFFFFFF0FFFULL) | 0x0000000000004000ULL;
        lo = (lo & 0x3FFFFFFFFFFFFFFFULL) | 0x8000000000000000ULL;
        b->aux[i].id_hi = hi;
        b->aux[i].id_lo = lo;
        b->n_marks++;
        if (s->flags & F_ROOTLESS)
            continue;
        open_span_t *e = open_span_get(s->span_hi, s->span_lo);
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
        open_span_t *e = (open_span_t *)spantab_find(&cn_state.open_spans, s->span_hi, s->span_lo);
        b->aux[i].mids_off = (uint32_t)(b->nmids / 2);
        b->aux[i].mids_cnt = 0;
        b->aux[i].mids_omitted = 0;
        if (e != NULL) {
            b->aux[i].mids_omitted = e->omitted;
            for (uint32_t k = 0; k < e->n; k++)
                if (mids_push(b, e->ids[2 * k], e->ids[2 * k + 1]) == 0)
                    b->aux[i].mids_cnt++;
            spantab_remove(&cn_state.open_spans, &e->key);
            open_span_release(e);
        }
    }
}

/* drain(max_slots) -> Batch | None: claim up to max_slots records from the rings */
PyObject *
cn_mod_drain(PyObject *m, PyObject *args)
{
    Py_ssize_t max_slots = 100000;
    if (!PyArg_ParseTuple(args, "|n:drain", &max_slots))
        return NULL;
    if (max_slots < 16)
        max_slots = 16;
    /* Called again from inside itself (user code run by the GIL pass, e.g. an attribute's
     * __str__, reaching drain()): the drain mutex is ours already, waiting would hang
     * this thread for good. Nothing to hand out. */
    if (tl_draining)
        Py_RETURN_NONE;
    BatchObject *b = batch_new();
    if (b == NULL)
        return NULL;
    tl_draining = 1;
    int need_gil = 0, oom = 0;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&cn_state.drain_mu);
    if (!cn_state.drain_rng_ready) {
        cn_rng_seed(&cn_state.drain_rng);
        cn_state.drain_rng_ready = 1;
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
        pthread_mutex_unlock(&cn_state.drain_mu);
    }
    Py_END_ALLOW_THREADS
    if (need_gil) {
        /* the drain mutex stays held: this batch's mark ids must be assigned in order */
        for (size_t i = 0; i < b->nslots; i++)
            if (b->slots[i].type != R_SPAN2 && (b->slots[i].flags & F_REFS))
                resolve_refs(b, i);
        Py_BEGIN_ALLOW_THREADS
        assign_mark_ids(b);
        pthread_mutex_unlock(&cn_state.drain_mu);
        Py_END_ALLOW_THREADS
    }
    tl_draining = 0;
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

/* ids as a list of 32-hex strings (mark ids are pairs in `ids`) */
static PyObject *
id_list(const uint64_t *ids, size_t n)
{
    PyObject *out = PyList_New((Py_ssize_t)n);
    for (size_t k = 0; out != NULL && k < n; k++) {
        PyObject *h = cn_hex128(ids[2 * k], ids[2 * k + 1]);
        if (h == NULL)
            Py_CLEAR(out);
        else
            PyList_SET_ITEM(out, (Py_ssize_t)k, h);
    }
    return out;
}

/* open_span_mark_ids(scope) -> list[str] | None: the ids the drainer has given the marks of
 * an open scope so far (None: none yet). Scope.marks reads it after a claim. The open-span
 * table belongs to the drain mutex, taken without the GIL as drain() takes it (whose GIL pass
 * holds the mutex while it waits for the GIL). */
PyObject *
cn_mod_open_span_mark_ids(PyObject *m, PyObject *arg)
{
    if (!PyObject_TypeCheck(arg, &cn_Scope_Type)) {
        PyErr_Format(PyExc_TypeError, "a Scope, not %.100s", Py_TYPE(arg)->tp_name);
        return NULL;
    }
    ScopeObject *sc = (ScopeObject *)arg;
    if (tl_draining) /* reached from user code the drainer's GIL pass runs: the mutex is ours */
        Py_RETURN_NONE;
    uint64_t *copy = NULL;
    size_t n = 0;
    int found = 0, oom = 0;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&cn_state.drain_mu);
    open_span_t *e = (open_span_t *)spantab_find(&cn_state.open_spans, sc->span_hi, sc->span_lo);
    if (e != NULL) {
        found = 1;
        n = e->n;
        if (n > 0 && (copy = malloc(2 * n * sizeof *copy)) == NULL)
            oom = 1;
        else if (n > 0)
            memcpy(copy, e->ids, 2 * n * sizeof *copy);
    }
    pthread_mutex_unlock(&cn_state.drain_mu);
    Py_END_ALLOW_THREADS
    if (oom)
        return PyErr_NoMemory();
    if (!found)
        Py_RETURN_NONE;
    PyObject *out = id_list(copy, n);
    free(copy);
    return out;
}

/* Free the rings of threads that have exited and whose records are all drained. GIL held. */
PyObject *
cn_mod_free_orphans(PyObject *m, PyObject *unused)
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
 * The Batch object
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
        PyObject *key = cn_hex128(s->span_hi, s->span_lo);
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

/* Batch.span_mark_ids(scope) -> list[str] | None: the mark ids of the scope's span record
 * if this batch holds it (the ids listed in the spool's mark_ids). */
static PyObject *
Batch_span_mark_ids(BatchObject *b, PyObject *arg)
{
    if (!PyObject_TypeCheck(arg, &cn_Scope_Type)) {
        PyErr_Format(PyExc_TypeError, "a Scope, not %.100s", Py_TYPE(arg)->tp_name);
        return NULL;
    }
    ScopeObject *sc = (ScopeObject *)arg;
    for (size_t i = 0; i < b->nslots; i++) {
        slot_t *s = &b->slots[i];
        if (s->type == R_SPAN && s->span_hi == sc->span_hi && s->span_lo == sc->span_lo)
            return id_list(b->mids + 2 * (size_t)b->aux[i].mids_off, b->aux[i].mids_cnt);
    }
    Py_RETURN_NONE;
}

static PyMethodDef Batch_methods[] = {
    {"span_mark_ids", (PyCFunction)Batch_span_mark_ids, METH_O,
     "span_mark_ids(scope) -> the mark ids of the scope's span if this batch holds it, else None"},
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

PyTypeObject cn_Batch_Type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "cirron_otel.Batch",
    .tp_basicsize = sizeof(BatchObject),
    .tp_dealloc = (destructor)Batch_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Records drained from the rings, ready to encode. Holds no Python references.",
    .tp_as_sequence = &Batch_as_sequence,
    .tp_methods = Batch_methods,
    .tp_getset = Batch_getset,
};

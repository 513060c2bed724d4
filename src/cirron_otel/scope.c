/*
 * scope.c — the hot path: scope objects and the scope stack (a ContextVar, so it is per
 * thread and per asyncio task), the epochs() / batches() iterators, mark(), and the
 * session root. Everything they call per record is inline (native.h): they take no lock,
 * make no system call (the wall clock is the TSC, or clock_gettime through the vDSO: tsc.h)
 * and allocate only what the caller hands them (kwargs dicts).
 */
#include "native.h"

#include <stdio.h>

/* ======================================================================================
 * Scopes
 * ==================================================================================== */

static PyObject *scope_bound_enter(PyObject *b, PyObject *const *args, size_t nargsf,
                                   PyObject *kwnames);
static PyObject *scope_bound_exit(PyObject *b, PyObject *const *args, size_t nargsf,
                                  PyObject *kwnames);

static ScopeObject *
scope_alloc(void)
{
    ScopeObject *s;
    if (cn_state.scope_free_n > 0) {
        s = cn_state.scope_freelist[--cn_state.scope_free_n];
        PyObject_Init((PyObject *)s, &cn_Scope_Type);
    }
    else {
        s = PyObject_New(ScopeObject, &cn_Scope_Type);
        if (s == NULL)
            return NULL;
        /* the embedded bound methods (count 0: not handed out) keep this set-up when the
         * scope goes through the free list */
        memset(&s->bound_enter, 0, sizeof s->bound_enter);
        memset(&s->bound_exit, 0, sizeof s->bound_exit);
        Py_SET_TYPE((PyObject *)&s->bound_enter, &cn_ScopeBound_Type);
        Py_SET_TYPE((PyObject *)&s->bound_exit, &cn_ScopeBound_Type);
        s->bound_enter.owner = s->bound_exit.owner = s;
        s->bound_enter.vectorcall = scope_bound_enter;
        s->bound_exit.vectorcall = scope_bound_exit;
    }
    s->name = s->attrs = s->token = s->exc = s->mark_ids = NULL;
    s->state = ST_NEW;
    s->has_index = 0;
    s->span_flags = 0;
    s->attrs_shared = 0;
    s->code_id = 0;
    s->index = 0;
    s->depth = 0;
    s->span_hi = s->span_lo = s->parent_hi = s->parent_lo = s->trace_hi = s->trace_lo = 0;
    s->start_ns = s->end_ns = 0;
    s->cpu_start = s->cpu_ns = -1;
    s->pid = 0;
    s->thread_id = 0;
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
    Py_CLEAR(self->mark_ids);
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
scope_start(ScopeObject *s, ring_t *r, int64_t ts)
{
    s->pid = cn_state.pid;
    s->thread_id = r ? r->thread_id : (uint64_t)PyThread_get_thread_ident();
    s->state = ST_OPEN;
    if (cn_state.capture_cpu)
        s->cpu_start = thread_cpu_ns();
    s->start_ns = ts ? ts : clock_now(r);
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
        cn_warn_once(&r->warned_depth,
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
    int root = s->span_flags & SF_SPOOL_ROOT; /* asked for by _as_root() */
    s->span_flags = 0;
    uint64_t ot_hi, ot_lo, ot_span;
    int ot_sampled;
    if (cn_state.otel_context && cn_state.otel_attached &&
        otel_parent(cur, &ot_hi, &ot_lo, &ot_span, &ot_sampled)) {
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
        if (cn_state.trace_per_child || root) {
            scope_new_trace(s, r);
            s->span_flags |= SF_NEW_TRACE | (root ? SF_SPOOL_ROOT : 0);
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
    scope_start(s, r, ts);
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
    ring_t *r = cn_tl_ring; /* NULL: a thread that never recorded closes it */
    if (end == 0)
        end = clock_now(r);
    int64_t cpu = -1;
    if (self->cpu_start >= 0)
        cpu = thread_cpu_ns() - self->cpu_start;
    self->cpu_ns = cpu;
    self->state = ST_CLOSED;
    self->end_ns = end;
    if (self->token != NULL) {
        if (PyContextVar_Reset(cn_state.scope_var, self->token) < 0) {
            /* exited in another context (e.g. an abandoned iterator garbage-collected elsewhere) */
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
    if (r == NULL)
        r = get_ring(); /* (fill_error may have run code that made it) */
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

/* code_scope(code, name, index=None, **attrs): scope() for the decorator, its span carrying
 * the code location `code` (an id from code_location()). */
PyObject *
cn_mod_code_scope(PyObject *m, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
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
    PyObject *s = cn_mod_scope(m, args + 1, nargs - 1, kwnames);
    if (s != NULL)
        ((ScopeObject *)s)->code_id = (uint32_t)id;
    return s;
}

/* -- keyword arguments ------------------------------------------------------------------
 * scope() and mark() take their attributes as keyword arguments, beside a few keyword
 * parameters of their own. kwargs_to_attrs gives each keyword argument to `param` first,
 * which claims a parameter (1), leaves an attribute (0) or fails (-1, exception set); the
 * attributes go into a new dict (*attrs stays NULL when there are none), their values
 * captured now and rendered later (attr_value). Returns 0, or -1 with *attrs released. */
typedef int (*kwarg_param_t)(PyObject *key, PyObject *value, void *ctx);

static inline int
kwargs_to_attrs(PyObject *const *values, PyObject *kwnames, kwarg_param_t param, void *ctx,
                PyObject **attrs)
{
    *attrs = NULL;
    Py_ssize_t nk = kwnames != NULL ? PyTuple_GET_SIZE(kwnames) : 0;
    for (Py_ssize_t i = 0; i < nk; i++) {
        PyObject *k = PyTuple_GET_ITEM(kwnames, i), *v = values[i];
        int claimed = param(k, v, ctx);
        if (claimed > 0)
            continue;
        if (claimed < 0 || (*attrs == NULL && (*attrs = PyDict_New()) == NULL))
            goto fail;
        PyObject *cv = attr_value(v);
        int rc = PyDict_SetItem(*attrs, k, cv);
        Py_DECREF(cv);
        if (rc < 0)
            goto fail;
    }
    return 0;
fail:
    Py_CLEAR(*attrs);
    return -1;
}

typedef struct {
    PyObject *name, *index;
} scope_params_t;

static int
scope_param(PyObject *k, PyObject *v, void *ctx)
{
    scope_params_t *p = ctx;
    if (p->index == NULL && PyUnicode_Compare(k, cn_state.str_index) == 0) {
        p->index = v;
        return 1;
    }
    if (p->name == NULL && PyUnicode_CompareWithASCIIString(k, "name") == 0) {
        p->name = v;
        return 1;
    }
    return 0;
}

/* scope(name, index=None, **attrs) */
PyObject *
cn_mod_scope(PyObject *m, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    scope_params_t p = {NULL, NULL};
    PyObject *attrs;
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
        p.name = args[0];
    if (nargs == 2)
        p.index = args[1];
    if (kwargs_to_attrs(args + nargs, kwnames, scope_param, &p, &attrs) < 0)
        return NULL;
    if (p.name == NULL) {
        Py_XDECREF(attrs);
        PyErr_SetString(PyExc_TypeError, "cirron_otel.scope() missing required argument 'name'");
        return NULL;
    }
    ring_t *r = get_ring();
    if (r == NULL) {
        Py_XDECREF(attrs);
        return NULL;
    }
    ScopeObject *s = scope_make(p.name, p.index, NULL, r);
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

PyObject *
cn_hex128(uint64_t hi, uint64_t lo)
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
    return cn_hex128(self->span_hi, self->span_lo);
}

static PyObject *
Scope_get_parent_id(ScopeObject *self, void *c)
{
    if (self->parent_hi == 0 || (self->span_flags & SF_SPOOL_ROOT))
        Py_RETURN_NONE;
    return cn_hex128(self->parent_hi, self->parent_lo);
}

static PyObject *
Scope_get_trace_id(ScopeObject *self, void *c)
{
    if (self->trace_hi == 0 && self->trace_lo == 0)
        Py_RETURN_NONE;
    return cn_hex128(self->trace_hi, self->trace_lo);
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
    case 7: /* the process that opened it (this one, before it opens) */
        return PyLong_FromLongLong(self->state == ST_NEW ? cn_state.pid : self->pid);
    case 8:
        return PyLong_FromLongLong(cn_state.rank);
    case 9:
        return self->thread_id ? PyLong_FromUnsignedLongLong(self->thread_id) : Py_NewRef(Py_None);
    case 10: /* like the SDK: None while open, and unless CPU time capture is on */
        return self->state == ST_CLOSED && self->cpu_ns >= 0 ? PyLong_FromLongLong(self->cpu_ns)
                                                              : Py_NewRef(Py_None);
    case 11: /* gpu_ns, memory_peak_bytes: filled by the SDK's framework hooks only */
        return Py_NewRef(Py_None);
    default:
        return self->end_ns ? PyLong_FromLongLong(self->end_ns) : Py_NewRef(Py_None);
    }
}

/* marks: the ids of the marks recorded on this scope, as cirron-sdk's handle lists them.
 * Marks go to the native ring and get their ids in the drainer, so reading this asks the
 * drainer to claim what is recorded so far and looks the ids up (cirron_otel._scope_marks).
 * An open scope answers with a new list each time (the SDK's grows in place); a closed one
 * keeps its answer, which no longer changes, and returns that list each time as the SDK's
 * handle does. A cold path: the hot path never builds the list. */
static PyObject *
Scope_get_marks(ScopeObject *self, void *c)
{
    if (self->mark_ids != NULL) /* the same list every time, as the SDK's handle */
        return Py_NewRef(self->mark_ids);
    PyObject *mod = PyImport_ImportModule("cirron_otel._scope_marks");
    if (mod == NULL)
        return NULL;
    PyObject *res = PyObject_CallMethod(mod, "mark_ids", "O", (PyObject *)self);
    Py_DECREF(mod);
    if (res == NULL)
        return NULL;
    PyObject *ids, *final;
    if (!PyArg_ParseTuple(res, "O!O:mark_ids", &PyList_Type, &ids, &final)) {
        Py_DECREF(res);
        return NULL;
    }
    if (PyObject_IsTrue(final) == 1 && self->mark_ids == NULL)
        self->mark_ids = Py_NewRef(ids);
    Py_INCREF(ids);
    Py_DECREF(res);
    return ids;
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

/* _as_root(): before it opens, make the scope a root as cirron-sdk's inference requests are:
 * parent_id null in the spool and trace(); in OpenTelemetry a trace of its own linked to the
 * session (as trace_per="child" makes every direct child of the session). Under an open
 * scope, or under a foreign OpenTelemetry span, it stays that span's child. */
static PyObject *
Scope_as_root(ScopeObject *self, PyObject *unused)
{
    if (self->state != ST_NEW) {
        PyErr_SetString(PyExc_ValueError, "_as_root() before the scope opens");
        return NULL;
    }
    self->span_flags |= SF_SPOOL_ROOT;
    Py_RETURN_NONE;
}

static PyMethodDef Scope_methods[] = {
    {"_as_root", (PyCFunction)Scope_as_root, METH_NOARGS,
     "before it opens: a root in the spool, a trace of its own in OpenTelemetry"},
    {"_set_error_status", (PyCFunction)Scope_set_error_status, METH_O,
     "mark the open scope as failed with this status description (OpenTelemetry's set_status)"},
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
    /* cirron-sdk's scope handle fields */
    {"pid", (getter)Scope_get_ints, NULL, "id of the process that opened the scope", (void *)7},
    {"rank", (getter)Scope_get_ints, NULL, "the profiler's rank (cirron.rank)", (void *)8},
    {"thread_id", (getter)Scope_get_ints, NULL,
     "threading.get_ident() of the thread that opened the scope (None before)", (void *)9},
    {"cpu_ns", (getter)Scope_get_ints, NULL,
     "CPU time of the opening thread while open, once closed (None unless capture_cpu_time)",
     (void *)10},
    {"gpu_ns", (getter)Scope_get_ints, NULL, "None (the SDK fills it from framework hooks)",
     (void *)11},
    {"memory_peak_bytes", (getter)Scope_get_ints, NULL,
     "None (the SDK fills it from framework hooks)", (void *)11},
    {"marks", (getter)Scope_get_marks, NULL,
     "ids of the marks recorded on this scope so far (see cirron_otel._scope_marks)", NULL},
    {NULL},
};

PyTypeObject cn_Scope_Type = {
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

/* -- the with protocol ------------------------------------------------------------------
 * `with` looks __enter__ and __exit__ up on the type and binds both before entering; with
 * ordinary methods that is two bound-method objects allocated and freed per scope (~25 ns of
 * ~150). Here __enter__ and __exit__ are ScopeMethod descriptors whose bound form is an
 * object embedded in the scope itself: handing it out takes a reference to the scope the
 * first time (count 0 -> 1), and its "deallocation" (count back to 0) only drops that
 * reference, never frees memory. Unbound (Scope.__exit__(s, ...), ExitStack) the descriptor
 * is called with the scope first, and it is a method descriptor (Py_TPFLAGS_METHOD_DESCRIPTOR)
 * so `s.__exit__(...)` calls it that way without binding. */

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    int is_exit;
} ScopeMethodObject;

static PyObject *
scope_enter_args(ScopeObject *s, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    if (nargs != 0 || (kwnames != NULL && PyTuple_GET_SIZE(kwnames) > 0)) {
        PyErr_SetString(PyExc_TypeError, "Scope.__enter__() takes no arguments");
        return NULL;
    }
    return Scope_enter(s, NULL);
}

static PyObject *
scope_exit_args(ScopeObject *s, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    if (kwnames != NULL && PyTuple_GET_SIZE(kwnames) > 0) {
        PyErr_SetString(PyExc_TypeError, "Scope.__exit__() takes no keyword arguments");
        return NULL;
    }
    return Scope_exit(s, args, nargs);
}

static PyObject *
scope_bound_enter(PyObject *b, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    return scope_enter_args(((ScopeBoundObject *)b)->owner, args, PyVectorcall_NARGS(nargsf),
                            kwnames);
}

static PyObject *
scope_bound_exit(PyObject *b, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    return scope_exit_args(((ScopeBoundObject *)b)->owner, args, PyVectorcall_NARGS(nargsf),
                           kwnames);
}

static void
ScopeBound_dealloc(ScopeBoundObject *b)
{
    /* count 0: no longer handed out; the memory is the scope's */
    Py_DECREF(b->owner);
}

static PyObject *
ScopeBound_repr(ScopeBoundObject *b)
{
    return PyUnicode_FromFormat("<bound method %s of %R>",
                                b == &b->owner->bound_exit ? "__exit__" : "__enter__",
                                (PyObject *)b->owner);
}

static PyObject *
ScopeBound_get_self(ScopeBoundObject *b, void *c)
{
    return Py_NewRef((PyObject *)b->owner);
}

static PyObject *
ScopeBound_get_name(ScopeBoundObject *b, void *c)
{
    return PyUnicode_FromString(b == &b->owner->bound_exit ? "__exit__" : "__enter__");
}

static PyGetSetDef ScopeBound_getset[] = {
    {"__self__", (getter)ScopeBound_get_self, NULL, NULL, NULL},
    {"__name__", (getter)ScopeBound_get_name, NULL, NULL, NULL},
    {NULL},
};

PyTypeObject cn_ScopeBound_Type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "cirron_otel.ScopeBoundMethod",
    .tp_basicsize = sizeof(ScopeBoundObject),
    .tp_dealloc = (destructor)ScopeBound_dealloc,
    .tp_repr = (reprfunc)ScopeBound_repr,
    .tp_getset = ScopeBound_getset,
    .tp_vectorcall_offset = offsetof(ScopeBoundObject, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_VECTORCALL,
};

static PyObject *
ScopeMethod_get(ScopeMethodObject *self, PyObject *obj, PyObject *type)
{
    if (obj == NULL || obj == Py_None)
        return Py_NewRef((PyObject *)self);
    if (!PyObject_TypeCheck(obj, &cn_Scope_Type)) {
        PyErr_SetString(PyExc_TypeError, "descriptor needs a cirron_otel.Scope");
        return NULL;
    }
    ScopeObject *s = (ScopeObject *)obj;
    ScopeBoundObject *b = self->is_exit ? &s->bound_exit : &s->bound_enter;
    if (Py_REFCNT(b) == 0) {
        Py_SET_REFCNT(b, 1);
        Py_INCREF(obj);
    }
    else
        Py_INCREF(b);
    return (PyObject *)b;
}

static PyObject *
ScopeMethod_call(PyObject *d, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (nargs < 1 || !PyObject_TypeCheck(args[0], &cn_Scope_Type)) {
        PyErr_SetString(PyExc_TypeError, "descriptor needs a cirron_otel.Scope as first argument");
        return NULL;
    }
    ScopeObject *s = (ScopeObject *)args[0];
    if (((ScopeMethodObject *)d)->is_exit)
        return scope_exit_args(s, args + 1, nargs - 1, kwnames);
    return scope_enter_args(s, args + 1, nargs - 1, kwnames);
}

static PyObject *
ScopeMethod_repr(ScopeMethodObject *self)
{
    return PyUnicode_FromFormat("<method '%s' of 'cirron_otel.Scope' objects>",
                                self->is_exit ? "__exit__" : "__enter__");
}

PyTypeObject cn_ScopeMethod_Type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "cirron_otel.ScopeMethod",
    .tp_basicsize = sizeof(ScopeMethodObject),
    .tp_repr = (reprfunc)ScopeMethod_repr,
    .tp_vectorcall_offset = offsetof(ScopeMethodObject, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_descr_get = (descrgetfunc)ScopeMethod_get,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_VECTORCALL | Py_TPFLAGS_METHOD_DESCRIPTOR,
};

/* After PyType_Ready(&cn_Scope_Type): Scope.__enter__ and Scope.__exit__. */
int
cn_scope_methods_install(void)
{
    if (PyType_Ready(&cn_ScopeBound_Type) < 0 || PyType_Ready(&cn_ScopeMethod_Type) < 0)
        return -1;
    static const char *names[2] = {"__enter__", "__exit__"};
    for (int i = 0; i < 2; i++) {
        ScopeMethodObject *d = PyObject_New(ScopeMethodObject, &cn_ScopeMethod_Type);
        if (d == NULL)
            return -1;
        d->vectorcall = ScopeMethod_call;
        d->is_exit = i;
        int rc = PyDict_SetItemString(cn_Scope_Type.tp_dict, names[i], (PyObject *)d);
        Py_DECREF(d);
        if (rc < 0)
            return -1;
    }
    PyType_Modified(&cn_Scope_Type);
    return 0;
}

/* ======================================================================================
 * epochs() / batches()
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
    int64_t now = clock_now(cn_tl_ring);
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

PyTypeObject cn_ScopeIter_Type = {
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
    ScopeIterObject *self = PyObject_GC_New(ScopeIterObject, &cn_ScopeIter_Type);
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

PyObject *
cn_mod_epochs(PyObject *m, PyObject *iterable)
{
    return make_scope_iter(iterable, cn_state.epoch_name);
}

PyObject *
cn_mod_batches(PyObject *m, PyObject *iterable)
{
    return make_scope_iter(iterable, cn_state.batch_name);
}

PyObject *
cn_mod_scoped_iter(PyObject *m, PyObject *args)
{
    PyObject *iterable, *name;
    if (!PyArg_ParseTuple(args, "OU:scoped_iter", &iterable, &name))
        return NULL;
    return make_scope_iter(iterable, name);
}

/* ======================================================================================
 * mark()
 * ==================================================================================== */

/* mark()'s keyword parameter: kind='point' | 'summary' (ctx: int summary) */
static int
mark_param(PyObject *k, PyObject *v, void *ctx)
{
    if (k != cn_state.str_kind && PyUnicode_Compare(k, cn_state.str_kind) != 0)
        return 0;
    if (v == cn_state.str_point ||
        (PyUnicode_Check(v) && PyUnicode_Compare(v, cn_state.str_point) == 0))
        *(int *)ctx = 0;
    else if (v == cn_state.str_summary ||
             (PyUnicode_Check(v) && PyUnicode_Compare(v, cn_state.str_summary) == 0))
        *(int *)ctx = 1;
    else {
        PyErr_Format(PyExc_ValueError,
                     "cirron_otel.mark() kind must be 'point' or 'summary'; got %R", v);
        return -1;
    }
    return 1;
}

PyObject *
cn_mod_mark(PyObject *m, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
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
    PyObject *attrs;
    if (kwargs_to_attrs(args + 2, kwnames, mark_param, &summary, &attrs) < 0)
        return NULL;
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
    int64_t ts = clock_now(r);
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
 * The session root
 * ==================================================================================== */

PyObject *
cn_mod_session_begin(PyObject *m, PyObject *args)
{
    PyObject *attrs = NULL, *parent = NULL;
    if (!PyArg_ParseTuple(args, "|O!O:session_begin", &PyDict_Type, &attrs, &parent))
        return NULL;
    if (parent == Py_None)
        parent = NULL;
    if (parent != NULL && !PyObject_TypeCheck(parent, &cn_Scope_Type)) {
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
    scope_start(s, r, 0);
    atomic_store_explicit(&cn_state.session_hi, s->span_hi, memory_order_relaxed);
    atomic_store_explicit(&cn_state.session_lo, s->span_lo, memory_order_relaxed);
    cn_state.session = s;
    return Py_NewRef((PyObject *)s);
}

PyObject *
cn_mod_session_end(PyObject *m, PyObject *unused)
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
PyObject *
cn_mod_set_sampler(PyObject *m, PyObject *args)
{
    int all;
    unsigned long long bound;
    if (!PyArg_ParseTuple(args, "pK:set_sampler", &all, &bound))
        return NULL;
    cn_state.sample_bound = (uint64_t)bound;
    cn_state.sample_all = all;
    Py_RETURN_NONE;
}

PyObject *
cn_mod_session(PyObject *m, PyObject *unused)
{
    if (cn_state.session == NULL)
        Py_RETURN_NONE;
    return Py_NewRef((PyObject *)cn_state.session);
}

PyObject *
cn_mod_current_scope(PyObject *m, PyObject *unused)
{
    PyObject *cur = NULL;
    if (PyContextVar_Get(cn_state.scope_var, NULL, &cur) < 0)
        return NULL;
    if (cur == NULL)
        Py_RETURN_NONE;
    return cur;
}

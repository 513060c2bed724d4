/*
 * otlp.c — the OpenTelemetry mapping of spans and marks, encoded as OTLP protobuf.
 *
 * otlp_encode() turns batches into one ExportTraceServiceRequest (bytes), applying the
 * mapping documented in the README: a closed scope is a span, a point mark an event on its
 * span, a summary mark the attribute cirron.summary.<name> (last wins). Marks arrive before
 * their span closes (possibly batches earlier), so an OtlpState keeps, per open span, its
 * last `event limit` events already encoded and its summaries, until the span closes.
 * Attribute values were rendered as KeyValues in the drainer's GIL pass (render.c).
 *
 * With metrics on (OtlpState(metrics=True)), every numeric mark is also a metric data point
 * (metric_points.h): kept with its open span like its event, complete at the span's close
 * (scope name, exemplar ids), and encoded by otlp_metrics_encode() into requests of their own.
 */
#include "native.h"

#include <stddef.h>
#include <stdlib.h>

#include "json.h"    /* hex64 */
#include "mapping.h" /* field numbers and attribute keys */
#include "metric_points.h"
#include "pb.h"

/* points a span still open keeps for the metrics (README, "Marks as metrics"); beyond, the
 * newest are dropped and counted: a scope open for the whole run with marks in it directly
 * (not in a nested scope) must not grow without bound. The session's go out at once. */
#define PENDING_POINTS_MAX 100000u


/* Wire-format writers (pb_*, PB_LIT): pb.h; field numbers (SPAN_NAME, ...) and attribute
 * keys (KEY_*): mapping.h. The KeyValue helpers below apply the configured limits. */

static void
pb_str_kv(buf_t *b, int field, const char *key, const char *val, size_t vlen)
{
    size_t kv = pb_begin(b, field);
    pb_bytes(b, KEY_VALUE_KEY, key, strlen(key));
    size_t av = pb_begin(b, KEY_VALUE_VALUE);
    pb_bytes(b, ANY_VALUE_STRING, val, limited_utf8(val, vlen));
    pb_end(b, av);
    pb_end(b, kv);
}

static void
pb_int_kv(buf_t *b, int field, const char *key, int64_t v)
{
    size_t kv = pb_begin(b, field);
    pb_bytes(b, KEY_VALUE_KEY, key, strlen(key));
    size_t av = pb_begin(b, KEY_VALUE_VALUE);
    pb_varint_field(b, ANY_VALUE_INT, (uint64_t)v);
    pb_end(b, av);
    pb_end(b, kv);
}

/* A KeyValue whose value is an id as 32 hex digits, written in place (a mark's id on each
 * of its events): every length is known and under 128 unless the key is long or a value
 * length limit cuts the id. */
static void
pb_hex_kv(buf_t *b, int field, const char *key, uint64_t hi, uint64_t lo)
{
    size_t klen = strlen(key);
    if (klen > 80 || (cn_state.value_len_limit >= 0 && cn_state.value_len_limit < 32) ||
        field >= 16 || buf_reserve(b, klen + 40) < 0) {
        char hex[32];
        hex128(hex, hi, lo);
        pb_str_kv(b, field, key, hex, 32);
        return;
    }
    char *o = b->data + b->len;
    o[0] = (char)((field << 3) | WT_LEN);
    o[1] = (char)(klen + 38); /* key: 2 + klen; value: 2 + AnyValue (2 + 32) */
    o[2] = (char)((KEY_VALUE_KEY << 3) | WT_LEN);
    o[3] = (char)klen;
    memcpy(o + 4, key, klen);
    o += 4 + klen;
    o[0] = (char)((KEY_VALUE_VALUE << 3) | WT_LEN);
    o[1] = 34;
    o[2] = (char)((ANY_VALUE_STRING << 3) | WT_LEN);
    o[3] = 32;
    hex128(o + 4, hi, lo);
    b->len += klen + 40;
}

/* -- open-span state ------------------------------------------------------------------- */

typedef struct {
    uint32_t name_id;
    buf_t kv; /* one encoded KeyValue (no tag) */
    char *name_raw;
    uint32_t name_len;
} summary_t;

typedef struct {
    span_key_t key;      /* first: an entry of OtlpState.spans (spantab.h) */
    uint32_t ev_head, ev_tail; /* its kept events: a chain in OtlpState.ev (ev_t) */
    uint32_t n_ev;             /* how many are kept (at most event_limit) */
    uint64_t total_ev;
    summary_t *sum;
    uint32_t n_sum;
    size_t sum_cap;
    mpoints_t points; /* metric points, waiting for the span's name and trace id */
} ospan_t;

/* A closed span's entry is reused by a later span (a calloc and a free per span otherwise).
 * A batch's marks are read before its spans close, so a batch opens up to one entry per
 * span it holds (~9,000 for 100,000 records): up to OSPAN_FREE_MAX are kept (~2.5 MiB, and
 * with metrics on up to ~27 MiB with their points arrays; before, each batch malloc'd ~60 MiB
 * of them). */
#define OSPAN_FREE_MAX 16384

/* The open spans' events live in one buffer shared by all spans (OtlpState.ev), each event
 * as [ev_t][varint len][Event], chained per span from ev_head. Per-span buffers cost a 4 KiB
 * malloc and a free for each span, for ~1 KiB of events. The buffer is compacted after each
 * batch (ev_compact): it holds one batch's events at most, plus those of spans left open. */
typedef struct {
    uint32_t next; /* the span's next event, or EV_NONE */
    uint32_t size; /* bytes of [varint len][Event] that follow */
} ev_t;
#define EV_NONE UINT32_MAX
#define EV_KEEP_BYTES (32u << 20)
/* offsets are uint32: a buffer never grows past this (events beyond it are dropped) */
#define EV_MAX_BYTES (UINT32_MAX - (1u << 20))

typedef struct {
    PyObject_HEAD
    spantab_t spans; /* span id -> ospan_t */
    uint32_t event_limit;
    uint64_t root_marks, unsampled_spans, events_dropped;
    int metrics;         /* collect metric points */
    int traces;          /* encode spans and events (0: a metrics-only state: points alone) */
    mpoints_t ready;     /* points complete, for the next otlp_metrics_encode() */
    mallow_t allow;      /* mark attrs that become point attributes */
    uint64_t points_dropped;
    ospan_t **free_ospans; /* closed spans' entries, for reuse */
    size_t n_free, free_cap;
    ospan_t *last;         /* the entry ospan_get found last: a span's marks come in a run */
    buf_t ev, ev_spare;    /* the open spans' events (see ev_t), and the compaction target */
    uint64_t ev_kept;      /* events kept in ev by open spans */
    buf_pool_t bufs;       /* request buffers kept between calls (buf.h) */
} OtlpStateObject;

/* An entry's own buffers (summaries, points), freed; the entry itself is not. */
static void
ospan_clear(ospan_t *e)
{
    for (uint32_t k = 0; k < e->n_sum; k++) {
        free(e->sum[k].kv.data);
        free(e->sum[k].name_raw);
    }
    free(e->sum);
    mpoints_free(&e->points);
}

static void
ospan_free(ospan_t *e)
{
    ospan_clear(e);
    free(e);
}

static ospan_t *
ospan_new(OtlpStateObject *st, uint64_t hi, uint64_t lo)
{
    ospan_t *e = st->n_free ? st->free_ospans[--st->n_free] : calloc(1, sizeof(ospan_t));
    if (e == NULL)
        return NULL;
    e->ev_head = e->ev_tail = EV_NONE;
    e->key.hi = hi;
    e->key.lo = lo;
    return e;
}

/* Back to the free list (emptied), or freed. */
static void
ospan_recycle(OtlpStateObject *st, ospan_t *e)
{
    if (st->n_free == st->free_cap &&
        (st->free_cap == OSPAN_FREE_MAX || ARRAY_GROW(st->free_ospans, st->free_cap, st->n_free, 256) < 0)) {
        ospan_free(e);
        return;
    }
    /* its points store keeps its first array (MPOINTS_FIRST points): one malloc a span else */
    mpoint_t *p = NULL;
    if (e->points.cap == MPOINTS_FIRST) {
        mpoints_clear(&e->points);
        p = e->points.p;
        e->points.p = NULL;
    }
    ospan_clear(e);
    memset(e, 0, sizeof *e);
    e->points.p = p;
    e->points.cap = p ? MPOINTS_FIRST : 0;
    st->free_ospans[st->n_free++] = e;
}

/* The open span's entry, added if new; NULL when out of memory. */
static ospan_t *
ospan_get(OtlpStateObject *st, uint64_t hi, uint64_t lo)
{
    ospan_t *e = st->last;
    if (e != NULL && e->key.hi == hi && e->key.lo == lo)
        return e;
    e = (ospan_t *)spantab_find(&st->spans, hi, lo);
    if (e == NULL) {
        if ((e = ospan_new(st, hi, lo)) == NULL)
            return NULL;
        if (spantab_add(&st->spans, &e->key, 256) < 0) {
            ospan_recycle(st, e);
            return NULL;
        }
    }
    st->last = e;
    return e;
}

static void
ospan_remove(OtlpStateObject *st, ospan_t *target)
{
    if (st->last == target)
        st->last = NULL;
    st->ev_kept -= target->n_ev;
    spantab_remove(&st->spans, &target->key);
    ospan_recycle(st, target);
}

/* events are not aligned: read and write their headers through memcpy (portable) */
static inline ev_t
ev_get(const buf_t *ev, uint32_t off)
{
    ev_t x;
    memcpy(&x, ev->data + off, sizeof x);
    return x;
}

static inline void
ev_set_next(buf_t *ev, uint32_t off, uint32_t next)
{
    memcpy(ev->data + off + offsetof(ev_t, next), &next, sizeof next);
}

/* After a batch: the events of spans still open move to the front of the buffer (through
 * the spare: they are few, and in no order), and the rest (dropped events, and those of the
 * spans that closed) go. A buffer over EV_KEEP_BYTES is then cut back. */
static void
ev_compact(OtlpStateObject *st)
{
    buf_t *ev = &st->ev, *to = &st->ev_spare;
    to->len = 0;
    size_t live = 0;
    if (st->ev_kept > 0) {
        for (size_t k = 0; k < st->spans.cap; k++) {
            ospan_t *e = (ospan_t *)st->spans.slot[k];
            for (uint32_t n = 0, off = e ? e->ev_head : 0; e != NULL && n < e->n_ev; n++) {
                ev_t x = ev_get(ev, off);
                live += sizeof x + x.size;
                off = x.next;
            }
        }
        to->oom = 0;
        if (buf_reserve(to, live) < 0) { /* then keep the buffer as it is */
            to->oom = 0;
            return;
        }
        for (size_t k = 0; k < st->spans.cap; k++) {
            ospan_t *e = (ospan_t *)st->spans.slot[k];
            if (e == NULL || e->n_ev == 0)
                continue;
            uint32_t off = e->ev_head, prev = EV_NONE;
            for (uint32_t n = 0; n < e->n_ev; n++) {
                ev_t x = ev_get(ev, off);
                uint32_t at = (uint32_t)to->len;
                memcpy(to->data + at, ev->data + off, sizeof x + x.size);
                to->len += sizeof x + x.size;
                ev_set_next(to, at, EV_NONE);
                if (prev == EV_NONE)
                    e->ev_head = at;
                else
                    ev_set_next(to, prev, at);
                prev = at;
                off = x.next;
            }
            e->ev_tail = prev;
        }
        memcpy(ev->data, to->data, to->len); /* same offsets from the front */
    }
    ev->len = live;
    if (to->cap > EV_KEEP_BYTES) {
        free(to->data);
        *to = (buf_t){0};
    }
    if (ev->cap > EV_KEEP_BYTES) {
        size_t cap = live > 4096 ? live : 4096;
        char *d = realloc(ev->data, cap);
        if (d != NULL) {
            ev->data = d;
            ev->cap = cap;
        }
    }
}

static void
OtlpState_dealloc(OtlpStateObject *st)
{
    for (size_t k = 0; k < st->spans.cap; k++)
        if (st->spans.slot[k] != NULL)
            ospan_free((ospan_t *)st->spans.slot[k]);
    spantab_free(&st->spans);
    for (size_t k = 0; k < st->n_free; k++)
        ospan_free(st->free_ospans[k]);
    free(st->free_ospans);
    free(st->ev.data);
    free(st->ev_spare.data);
    buf_pool_free(&st->bufs);
    mpoints_free(&st->ready);
    mallow_free(&st->allow);
    PyObject_Free(st);
}

static PyObject *
OtlpState_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"event_limit", "metrics", "traces", "metric_attrs", NULL};
    unsigned int limit = 128;
    int metrics = 0, traces = 1;
    PyObject *attrs = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|IppO:OtlpState", kwlist, &limit, &metrics, &traces,
                                     &attrs))
        return NULL;
    mallow_t allow = {0};
    if (attrs != NULL && attrs != Py_None) {
        PyObject *fast = PySequence_Fast(attrs, "metric_attrs must be a sequence of str");
        if (fast == NULL)
            return NULL;
        Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
        allow.keys = calloc((size_t)n + 1, sizeof *allow.keys);
        allow.lens = calloc((size_t)n + 1, sizeof *allow.lens);
        if (allow.keys == NULL || allow.lens == NULL) {
            Py_DECREF(fast);
            mallow_free(&allow);
            return PyErr_NoMemory();
        }
        for (Py_ssize_t k = 0; k < n; k++) {
            Py_ssize_t len;
            const char *key = PyUnicode_Check(PySequence_Fast_GET_ITEM(fast, k))
                                  ? PyUnicode_AsUTF8AndSize(PySequence_Fast_GET_ITEM(fast, k), &len)
                                  : NULL;
            if (key == NULL) {
                if (!PyErr_Occurred())
                    PyErr_SetString(PyExc_TypeError, "metric_attrs must be a sequence of str");
                Py_DECREF(fast);
                mallow_free(&allow);
                return NULL;
            }
            allow.keys[allow.n] = malloc((size_t)len + 1);
            if (allow.keys[allow.n] == NULL) {
                Py_DECREF(fast);
                mallow_free(&allow);
                return PyErr_NoMemory();
            }
            memcpy(allow.keys[allow.n], key, (size_t)len);
            allow.lens[allow.n++] = (uint32_t)len;
        }
        Py_DECREF(fast);
    }
    OtlpStateObject *st = PyObject_New(OtlpStateObject, &cn_OtlpState_Type);
    if (st == NULL) {
        mallow_free(&allow);
        return NULL;
    }
    st->allow = allow;
    st->spans = (spantab_t){0};
    st->event_limit = limit;
    st->root_marks = st->unsampled_spans = st->events_dropped = 0;
    st->metrics = metrics;
    st->traces = traces;
    st->ready = (mpoints_t){0};
    st->points_dropped = 0;
    st->free_ospans = NULL;
    st->n_free = st->free_cap = 0;
    st->last = NULL;
    st->ev = st->ev_spare = (buf_t){0};
    st->ev_kept = 0;
    st->bufs.n = 0;
    return (PyObject *)st;
}

static PyObject *
OtlpState_get(OtlpStateObject *st, void *which)
{
    switch ((intptr_t)which) {
    case 0: return PyLong_FromSize_t(st->spans.n);
    case 1: return PyLong_FromUnsignedLongLong(st->root_marks);
    case 2: return PyLong_FromUnsignedLongLong(st->unsampled_spans);
    case 4: return PyLong_FromSize_t(st->ready.n);
    case 5: return PyLong_FromUnsignedLongLong(st->points_dropped);
    default: return PyLong_FromUnsignedLongLong(st->events_dropped);
    }
}

static PyGetSetDef OtlpState_getset[] = {
    {"open_spans", (getter)OtlpState_get, NULL, "spans with marks waiting for their close", (void *)0},
    {"root_marks", (getter)OtlpState_get, NULL, "marks on \"root\": spool only", (void *)1},
    {"unsampled_spans", (getter)OtlpState_get, NULL, "spans not exported (parent not sampled)", (void *)2},
    {"events_dropped", (getter)OtlpState_get, NULL, "events over the event count limit", (void *)3},
    {"metric_points_ready", (getter)OtlpState_get, NULL, "points for the next otlp_metrics_encode()",
     (void *)4},
    {"metric_points_dropped", (getter)OtlpState_get, NULL,
     "points over a span's pending cap, or lost to a failed allocation", (void *)5},
    {NULL},
};

PyTypeObject cn_OtlpState_Type = {
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
    case VT_FLOAT:
        pb_double_field(o, ANY_VALUE_DOUBLE, s->v.d);
        break;
    case VT_INT:
        pb_varint_field(o, ANY_VALUE_INT, (uint64_t)s->v.i);
        break;
    case VT_BOOL:
        pb_varint_field(o, ANY_VALUE_BOOL, (uint64_t)s->v.i);
        break;
    default:
        if (e)
            pb_bytes(o, ANY_VALUE_STRING, b->arena.data + e->val.off,
                     limited_utf8(b->arena.data + e->val.off, e->val.len));
        else
            PB_LIT(o, ANY_VALUE_STRING, "");
    }
}

typedef struct {
    uint64_t session_trace_hi, session_trace_lo;
    uint64_t session_hi, session_lo; /* the session span's id (its marks' points go at once) */
    uint32_t spans;
} otlp_ctx_t;

/* A numeric mark as a metric point: to the span's pending points, or (on the session,
 * whose name and ids are known) straight to the ready ones. */
static void
otlp_add_point(OtlpStateObject *st, ospan_t *e, BatchObject *b, size_t i, const char *name,
               size_t nlen, const otlp_ctx_t *c)
{
    slot_t *s = &b->slots[i];
    mpoint_t pt = {.name = name, .name_len = (uint32_t)nlen, .ts = s->ts, .rank = b->rank};
    if (s->vtype == VT_INT) {
        pt.is_int = 1;
        pt.v.i = s->v.i;
    }
    else {
        pt.v.d = s->vtype == VT_BOOL ? (double)(s->v.i != 0) : s->v.d;
    }
    if (s->flags & F_NAME_REF) { /* the name lives in this batch: copy it */
        pt.own = malloc(nlen ? nlen : 1);
        if (pt.own == NULL) {
            st->points_dropped++;
            return;
        }
        memcpy(pt.own, name, nlen);
        pt.name = pt.own;
    }
    ext_t *x = b->aux[i].ext >= 0 ? &b->ext[b->aux[i].ext] : NULL;
    if (st->allow.n && x && x->oattrs.len &&
        mallow_filter(&st->allow, b->arena.data + x->oattrs.off, x->oattrs.len, &pt.attrs,
                      &pt.attrs_len) < 0) {
        free(pt.own);
        st->points_dropped++;
        return;
    }
    int on_session = s->span_hi == c->session_hi && s->span_lo == c->session_lo;
    if (on_session) {
        mpoints_t one = {.p = &pt, .n = 1, .cap = 1};
        int ex = (c->session_trace_hi | c->session_trace_lo) != 0;
        if (mpoints_settle(&st->ready, &one, SESSION_SCOPE, (uint32_t)strlen(SESSION_SCOPE), 1, ex,
                           c->session_trace_hi, c->session_trace_lo, s->span_hi) < 0)
            st->points_dropped++;
        return;
    }
    if (e->points.n >= PENDING_POINTS_MAX || mpoints_push(&e->points, &pt) < 0) {
        free(pt.own);
        free(pt.attrs);
        st->points_dropped++;
    }
}

/* An open span's next event: its body is written into the returned buffer (st->ev, after
 * its ev_t and a reserved length), then ospan_event_end keeps it among the span's last
 * event_limit. `*at` is where the event begins. NULL when out of memory. */
static buf_t *
ospan_event_begin(OtlpStateObject *st, size_t *at, size_t *body)
{
    buf_t *ev = &st->ev;
    if (ev->len > EV_MAX_BYTES || buf_reserve(ev, sizeof(ev_t) + 256) < 0) {
        ev->oom = 0; /* nothing was written: the buffer stays usable */
        st->events_dropped++;
        return NULL;
    }
    *at = ev->len;
    ev->len += sizeof(ev_t);
    *body = pb_reserve_len(ev, 2); /* untagged, as pb_begin2 */
    return ev;
}

static void
ospan_event_end(OtlpStateObject *st, ospan_t *e, size_t at, size_t body)
{
    buf_t *ev = &st->ev;
    pb_end2(ev, body);
    if (ev->oom) { /* the event is lost, the buffer as it was before it */
        ev->len = at;
        ev->oom = 0;
        st->events_dropped++;
        return;
    }
    ev_t x = {.next = EV_NONE, .size = (uint32_t)(ev->len - at - sizeof(ev_t))};
    memcpy(ev->data + at, &x, sizeof x);
    if (e->n_ev == 0)
        e->ev_head = (uint32_t)at;
    else
        ev_set_next(ev, e->ev_tail, (uint32_t)at);
    e->ev_tail = (uint32_t)at;
    e->n_ev++;
    e->total_ev++;
    st->ev_kept++;
    if (e->n_ev > st->event_limit) { /* drop the oldest, as the SDK does */
        e->ev_head = ev_get(ev, e->ev_head).next;
        e->n_ev--;
        st->ev_kept--;
        st->events_dropped++;
    }
}

static void
otlp_add_mark(OtlpStateObject *st, BatchObject *b, size_t i, const otlp_ctx_t *c)
{
    slot_t *s = &b->slots[i];
    if (s->flags & F_ROOTLESS) {
        st->root_marks++;
        return;
    }
    ospan_t *e = ospan_get(st, s->span_hi, s->span_lo);
    if (e == NULL)
        return;
    ext_t *x = b->aux[i].ext >= 0 ? &b->ext[b->aux[i].ext] : NULL;
    size_t nlen;
    const char *name = slot_name(b, i, &nlen);
    if (st->metrics && s->vtype != VT_STRING)
        otlp_add_point(st, e, b, i, name, nlen, c);
    if (!st->traces)
        return;
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
        BUF_LIT(&sm->kv, KEY_SUMMARY_PREFIX);
        size_t keylen = sm->kv.len + nlen;
        buf_put(&sm->kv, name, nlen);
        /* rebuild as KeyValue{key, value} */
        buf_t kv = {0};
        pb_bytes(&kv, KEY_VALUE_KEY, sm->kv.data, keylen);
        size_t av = pb_begin(&kv, KEY_VALUE_VALUE);
        pb_mark_value(&kv, b, i);
        pb_end(&kv, av);
        free(sm->kv.data);
        sm->kv = kv;
        return;
    }
    /* a point mark: one Event, kept among the span's last event_limit events */
    size_t at, body;
    buf_t *ev = ospan_event_begin(st, &at, &body);
    if (ev == NULL)
        return;
    pb_fixed64_field(ev, EVENT_TIME_UNIX_NANO, (uint64_t)s->ts);
    pb_bytes(ev, EVENT_NAME, name, nlen);
    size_t kv = pb_begin(ev, EVENT_ATTRIBUTES);
    PB_LIT(ev, KEY_VALUE_KEY, KEY_MARK_VALUE);
    size_t av = pb_begin(ev, KEY_VALUE_VALUE);
    pb_mark_value(ev, b, i);
    pb_end(ev, av);
    pb_end(ev, kv);
    pb_str_kv(ev, EVENT_ATTRIBUTES, KEY_MARK_KIND, "point", strlen("point"));
    pb_hex_kv(ev, EVENT_ATTRIBUTES, KEY_MARK_ID, b->aux[i].id_hi, b->aux[i].id_lo);
    uint32_t dropped = 0;
    if (x && x->oattrs.len) {
        uint32_t room = cn_state.event_attr_limit > 3 ? cn_state.event_attr_limit - 3 : 0;
        uint32_t kept =
            pb_splice_kvs(ev, EVENT_ATTRIBUTES, b->arena.data + x->oattrs.off, x->oattrs.len, room);
        dropped = x->oattrs_n - kept + x->oattrs_dropped;
    }
    if (dropped)
        pb_varint_field(ev, EVENT_DROPPED_ATTRIBUTES_COUNT, dropped);
    ospan_event_end(st, e, at, body);
}

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
    ospan_t *e = (ospan_t *)spantab_find(&st->spans, s->span_hi, s->span_lo);
    if (e != NULL && e->points.n) { /* the span's name and ids are known now */
        size_t slen;
        const char *sname = slot_name(b, i, &slen);
        size_t before = e->points.n;
        if (mpoints_settle(&st->ready, &e->points, sname, (uint32_t)slen,
                           !(s->flags & F_NAME_REF), !(s->vtype & SF_UNSAMPLED), s2->trace_hi,
                           s2->trace_lo, s->span_hi) < 0)
            st->points_dropped += before; /* an upper bound: some may have moved */
    }
    if (!st->traces) { /* a metrics-only state: the span itself is not encoded */
        if (e)
            ospan_remove(st, e);
        return;
    }
    if (s->vtype & SF_UNSAMPLED) {
        st->unsampled_spans++;
        if (e)
            ospan_remove(st, e);
        return;
    }
    size_t sp = pb_begin2(o, SCOPE_SPANS_SPANS);
    pb_id(o, SPAN_TRACE_ID, s2->trace_hi, s2->trace_lo, 16);
    pb_id(o, SPAN_SPAN_ID, s->span_hi, 0, 8);
    int is_root = s2->parent_hi == 0 || (s->vtype & SF_NEW_TRACE);
    if (!is_root)
        pb_id(o, SPAN_PARENT_SPAN_ID, s2->parent_hi, 0, 8);
    size_t nlen;
    const char *name = slot_name(b, i, &nlen);
    pb_bytes(o, SPAN_NAME, name, nlen);
    pb_varint_field(o, SPAN_KIND, SPAN_KIND_INTERNAL);
    pb_fixed64_field(o, SPAN_START_TIME_UNIX_NANO, (uint64_t)s->ts);
    pb_fixed64_field(o, SPAN_END_TIME_UNIX_NANO, (uint64_t)s->v.i);
    /* attributes: the scope's own, then cirron.*, then summaries, up to the limit */
    uint32_t limit = cn_state.span_attr_limit, n = 0, dropped = 0;
    if (x && x->oattrs.len) {
        n = pb_splice_kvs(o, SPAN_ATTRIBUTES, b->arena.data + x->oattrs.off, x->oattrs.len, limit);
        dropped += x->oattrs_n - n + x->oattrs_dropped;
    }
#define ROOM() (n < limit ? (n++, 1) : (dropped++, 0))
    const code_loc_t *code = code_get(s2->code_id);
    if (code != NULL) {
        if (ROOM())
            pb_str_kv(o, SPAN_ATTRIBUTES, KEY_CODE_FUNCTION, code->func, code->func_len);
        if (code->file && ROOM())
            pb_str_kv(o, SPAN_ATTRIBUTES, KEY_CODE_FILE, code->file, code->file_len);
        if (code->line >= 0 && ROOM())
            pb_int_kv(o, SPAN_ATTRIBUTES, KEY_CODE_LINE, code->line);
    }
    if ((s->flags & F_HAS_INDEX) && ROOM())
        pb_int_kv(o, SPAN_ATTRIBUTES, KEY_INDEX, s2->index);
    if (ROOM())
        pb_hex_kv(o, SPAN_ATTRIBUTES, KEY_SPAN_ID, s->span_hi, s->span_lo);
    if (ROOM())
        pb_int_kv(o, SPAN_ATTRIBUTES, KEY_THREAD_ID, (int64_t)s2->thread_id);
    const tok_t *tname = batch_thread_name(b, i);
    if (tname != NULL && ROOM())
        pb_str_kv(o, SPAN_ATTRIBUTES, KEY_THREAD_NAME, b->arena.data + tname->off, tname->len);
    if (ROOM())
        pb_int_kv(o, SPAN_ATTRIBUTES, KEY_RANK, b->rank);
    if ((s->flags & F_HAS_CPU) && ROOM())
        pb_int_kv(o, SPAN_ATTRIBUTES, KEY_CPU_NS, s2->cpu_ns);
    if ((s->vtype & SF_NEW_TRACE) && ROOM())
        pb_hex_kv(o, SPAN_ATTRIBUTES, KEY_SESSION_ID, s2->parent_hi, s2->parent_lo);
    if (e)
        for (uint32_t k = 0; k < e->n_sum; k++)
            if (ROOM())
                pb_bytes(o, SPAN_ATTRIBUTES, e->sum[k].kv.data, e->sum[k].kv.len);
#undef ROOM
    if (dropped)
        pb_varint_field(o, SPAN_DROPPED_ATTRIBUTES_COUNT, dropped);
    /* events: the marks (already encoded), then the exception */
    uint64_t ev_dropped = 0;
    int has_exception = (s->flags & F_ERROR) && x && x->etype.len;
    if (e) {
        /* the exception event counts toward the limit too: like the SDK, the oldest go */
        uint32_t skip = 0;
        if (has_exception && e->n_ev >= st->event_limit && e->n_ev > 0)
            skip = e->n_ev - (st->event_limit ? st->event_limit - 1 : 0);
        uint32_t off = e->ev_head;
        for (uint32_t k = 0; k < e->n_ev; k++) {
            ev_t x = ev_get(&st->ev, off);
            if (k >= skip) { /* stored as [varint len][Event]: add the field tag */
                pb_tag(o, SPAN_EVENTS, WT_LEN);
                buf_put(o, st->ev.data + off + sizeof x, x.size);
            }
            off = x.next;
        }
        ev_dropped = e->total_ev - (e->n_ev - skip);
    }
    if (has_exception && st->event_limit == 0)
        ev_dropped++;
    else if (has_exception) {
        size_t ev = pb_begin(o, SPAN_EVENTS);
        pb_fixed64_field(o, EVENT_TIME_UNIX_NANO, (uint64_t)s->v.i);
        PB_LIT(o, EVENT_NAME, EVENT_EXCEPTION);
        pb_str_kv(o, EVENT_ATTRIBUTES, KEY_EXCEPTION_TYPE, b->arena.data + x->etype.off, x->etype.len);
        pb_str_kv(o, EVENT_ATTRIBUTES, KEY_EXCEPTION_MESSAGE, b->arena.data + x->emsg.off, x->emsg.len);
        pb_str_kv(o, EVENT_ATTRIBUTES, KEY_EXCEPTION_STACKTRACE, b->arena.data + x->estack.off,
                  x->estack.len);
        pb_end(o, ev);
    }
    if (ev_dropped)
        pb_varint_field(o, SPAN_DROPPED_EVENTS_COUNT, ev_dropped);
    if ((s->vtype & SF_NEW_TRACE) && (c->session_trace_hi | c->session_trace_lo)) {
        if (cn_state.link_limit == 0) {
            pb_varint_field(o, SPAN_DROPPED_LINKS_COUNT, 1);
        }
        else {
            size_t ln = pb_begin(o, SPAN_LINKS);
            pb_id(o, LINK_TRACE_ID, c->session_trace_hi, c->session_trace_lo, 16);
            pb_id(o, LINK_SPAN_ID, s2->parent_hi, 0, 8);
            if (cn_state.link_attr_limit > 0)
                pb_str_kv(o, LINK_ATTRIBUTES, KEY_LINK, "session", strlen("session"));
            else
                pb_varint_field(o, LINK_DROPPED_ATTRIBUTES_COUNT, 1);
            pb_end(o, ln);
        }
    }
    if (s->flags & F_ERROR) {
        size_t stt = pb_begin(o, SPAN_STATUS);
        if (x && x->emsg.len)
            pb_bytes(o, STATUS_MESSAGE, b->arena.data + x->emsg.off, x->emsg.len);
        pb_varint_field(o, STATUS_CODE, STATUS_CODE_ERROR);
        pb_end(o, stt);
    }
    pb_fixed32_field(o, SPAN_FLAGS, SPAN_FLAGS_SAMPLED_LOCAL);
    pb_end2(o, sp);
    if (e)
        ospan_remove(st, e);
    c->spans++;
}

typedef struct {
    buf_t o;
    size_t body;  /* where ScopeSpans' body begins: its headers go in front (pb_front_*) */
    size_t start; /* where the finished request begins */
    uint32_t spans;
} otlp_req_t;

static void
otlp_req_open(OtlpStateObject *st, otlp_req_t *r, size_t size_hint, size_t res_len, const char *sname,
              size_t sname_len, const char *sver, size_t sver_len)
{
    memset(r, 0, sizeof *r);
    r->o = buf_pool_take(&st->bufs);
    /* room in front for ResourceSpans' and ScopeSpans' headers and the Resource */
    size_t gap = 3 * PB_FRONT_ROOM + res_len;
    /* sized once: doubling from 4 KiB to a 1 MiB request copied it ~twice over */
    if (buf_reserve(&r->o, size_hint + gap) < 0)
        return;
    r->o.len = r->body = gap;
    size_t sc = pb_begin(&r->o, SCOPE_SPANS_SCOPE);
    pb_bytes(&r->o, SCOPE_NAME, sname, sname_len);
    pb_bytes(&r->o, SCOPE_VERSION, sver, sver_len);
    pb_end(&r->o, sc);
}

/* ExportTraceServiceRequest { resource_spans { resource, scope_spans { <body> } } }: the
 * headers written in front of the body, which does not move */
static void
otlp_req_finish(otlp_req_t *r, const char *res, size_t res_len)
{
    if (r->o.oom)
        return;
    char *d = r->o.data;
    size_t end = r->o.len;
    size_t at = pb_front_len(d, r->body, RESOURCE_SPANS_SCOPE_SPANS, end - r->body);
    at = pb_front_bytes(d, at, RESOURCE_SPANS_RESOURCE, res, res_len); /* an encoded Resource */
    r->start = pb_front_len(d, at, EXPORT_REQUEST_RESOURCE_SPANS, end - at);
}

/* otlp_encode(state, batches, resource, scope_name, scope_version, session_trace=(hi, lo),
 *             max_request_bytes=1 MiB) -> [(request bytes, spans), ...]
 * Requests are cut near max_request_bytes (an OpenTelemetry Collector refuses messages over
 * 4 MiB by default). */
PyObject *
cn_mod_otlp_encode(PyObject *m, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"state", "batches", "resource", "scope_name", "scope_version",
                             "session_trace", "max_request_bytes", NULL};
    PyObject *state, *seq;
    const char *res, *sname, *sver;
    Py_ssize_t res_len, sname_len, sver_len, max_bytes = 1 << 20;
    unsigned long long th = 0, tl = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O!Oy#s#s#|(KK)n:otlp_encode", kwlist,
                                     &cn_OtlpState_Type, &state, &seq, &res, &res_len, &sname,
                                     &sname_len, &sver, &sver_len, &th, &tl, &max_bytes))
        return NULL;
    PyObject *fast = PySequence_Fast(seq, "otlp_encode() takes a sequence of Batch objects");
    if (fast == NULL)
        return NULL;
    Py_ssize_t nb = PySequence_Fast_GET_SIZE(fast);
    for (Py_ssize_t k = 0; k < nb; k++)
        if (!PyObject_TypeCheck(PySequence_Fast_GET_ITEM(fast, k), &cn_Batch_Type)) {
            Py_DECREF(fast);
            PyErr_SetString(PyExc_TypeError, "otlp_encode() takes a sequence of Batch objects");
            return NULL;
        }
    OtlpStateObject *st = (OtlpStateObject *)state;
    otlp_ctx_t c = {.session_trace_hi = th,
                    .session_trace_lo = tl,
                    .session_hi = atomic_load(&cn_state.session_hi),
                    .session_lo = atomic_load(&cn_state.session_lo)};
    otlp_req_t *reqs = NULL;
    size_t nreq = 0, capreq = 0;
    int oom = 0;
    /* a request's size, guessed from the records (~300 bytes each, marks as events) and
     * capped near max_request_bytes */
    size_t records = 0;
    for (Py_ssize_t k = 0; k < nb; k++)
        records += ((BatchObject *)PySequence_Fast_GET_ITEM(fast, k))->nslots;
    size_t size_hint = records * 300 + 4096;
    if (size_hint > (size_t)max_bytes + 65536)
        size_hint = (size_t)max_bytes + 65536;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t k = 0; k < nb && !oom; k++) {
        BatchObject *b = (BatchObject *)PySequence_Fast_GET_ITEM(fast, k);
        /* in slot order: a span's marks precede its close in its thread's ring, and marks
         * of other threads (on the session) precede the session's close */
        for (size_t i = 0; i < b->nslots; i++)
            if (b->slots[i].type == R_MARK)
                otlp_add_mark(st, b, i, &c);
        for (size_t i = 0; i < b->nslots && !oom; i++) {
            if (b->slots[i].type != R_SPAN)
                continue;
            if (!st->traces) { /* metrics only: the close completes its points, no request */
                otlp_add_span(NULL, st, b, i, &c);
                continue;
            }
            if (nreq == 0 || reqs[nreq - 1].o.len >= (size_t)max_bytes) {
                if (ARRAY_GROW(reqs, capreq, nreq, 4) < 0) {
                    oom = 1;
                    break;
                }
                otlp_req_open(st, &reqs[nreq++], size_hint, (size_t)res_len, sname, (size_t)sname_len,
                              sver, (size_t)sver_len);
            }
            otlp_req_t *r = &reqs[nreq - 1];
            uint32_t before = c.spans;
            otlp_add_span(&r->o, st, b, i, &c);
            r->spans += c.spans - before;
        }
        ev_compact(st);
    }
    for (size_t q = 0; q < nreq; q++) {
        otlp_req_finish(&reqs[q], res, (size_t)res_len);
        oom |= reqs[q].o.oom;
    }
    Py_END_ALLOW_THREADS
    Py_DECREF(fast);
    PyObject *out = oom ? NULL : PyList_New(0);
    for (size_t q = 0; q < nreq; q++) {
        if (out != NULL && reqs[q].spans > 0) {
            PyObject *item = Py_BuildValue("(y#I)", reqs[q].o.data + reqs[q].start,
                                           (Py_ssize_t)(reqs[q].o.len - reqs[q].start), reqs[q].spans);
            if (item == NULL || PyList_Append(out, item) < 0)
                Py_CLEAR(out);
            Py_XDECREF(item);
        }
        buf_pool_give(&st->bufs, &reqs[q].o);
    }
    free(reqs);
    if (oom)
        return PyErr_NoMemory();
    return out;
}

/* otlp_metrics_encode(state, resource, scope_name, scope_version, prefix, start_ns,
 *                     session=(hi, lo), max_request_bytes=1 MiB) -> [(request bytes, points)]
 * The points completed by otlp_encode() since the last call, as ExportMetricsServiceRequests
 * (the store is emptied). */
PyObject *
cn_mod_otlp_metrics_encode(PyObject *m, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"state", "resource", "scope_name", "scope_version", "prefix",
                             "start_ns", "session", "max_request_bytes", NULL};
    PyObject *state;
    mpoints_req_t q = {0};
    Py_ssize_t res_len, sname_len, sver_len, prefix_len, max_bytes = 1 << 20;
    long long start_ns;
    unsigned long long sh = 0, sl = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O!y#s#s#s#L|(KK)n:otlp_metrics_encode", kwlist,
                                     &cn_OtlpState_Type, &state, &q.resource, &res_len,
                                     &q.scope_name, &sname_len, &q.scope_version, &sver_len,
                                     &q.prefix, &prefix_len, &start_ns, &sh, &sl, &max_bytes))
        return NULL;
    q.resource_len = (size_t)res_len;
    q.scope_name_len = (size_t)sname_len;
    q.scope_version_len = (size_t)sver_len;
    q.prefix_len = (size_t)prefix_len;
    q.start_ns = (int64_t)start_ns;
    q.session_hi = sh;
    q.session_lo = sl;
    OtlpStateObject *st = (OtlpStateObject *)state;
    mreq_t *reqs = NULL;
    size_t nreq = 0, capreq = 0;
    size_t points = st->ready.n;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = mpoints_encode(&st->ready, &q, (size_t)max_bytes, &reqs, &nreq, &capreq, &st->bufs);
    Py_END_ALLOW_THREADS
    if (rc < 0)
        st->points_dropped += points;
    PyObject *out = rc < 0 ? NULL : PyList_New(0);
    for (size_t k = 0; k < nreq; k++) {
        if (out != NULL) {
            PyObject *item =
                Py_BuildValue("(y#I)", reqs[k].o.data + reqs[k].start,
                              (Py_ssize_t)(reqs[k].o.len - reqs[k].start), reqs[k].points);
            if (item == NULL || PyList_Append(out, item) < 0)
                Py_CLEAR(out);
            Py_XDECREF(item);
        }
        buf_pool_give(&st->bufs, &reqs[k].o);
    }
    free(reqs);
    if (rc < 0)
        return PyErr_NoMemory();
    return out;
}

/* otlp_add_event(state, span_hi, span_lo, ts_ns, name, attrs) -> None
 * An event on a span not yet encoded (the span with id hi:lo, open or closed but not yet
 * passed to otlp_encode), kept with its marks' events under the same event limit: the
 * snapshots an epoch end captures (cirron_otel._snapshots). The attrs as span-event
 * attributes, by the rule of a mark's attrs. GIL held. */
PyObject *
cn_mod_otlp_add_event(PyObject *m, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"state", "span_hi", "span_lo", "ts_ns", "name", "attrs", NULL};
    PyObject *state, *attrs;
    unsigned long long hi, lo;
    long long ts;
    const char *name;
    Py_ssize_t nlen;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O!KKLs#O!:otlp_add_event", kwlist, &cn_OtlpState_Type,
                                     &state, &hi, &lo, &ts, &name, &nlen, &PyDict_Type, &attrs))
        return NULL;
    OtlpStateObject *st = (OtlpStateObject *)state;
    if (!st->traces) /* a metrics-only state keeps no events */
        Py_RETURN_NONE;
    buf_t kvs = {0};
    uint32_t n = 0, dropped = 0;
    cn_otlp_attrs(&kvs, attrs, cn_state.event_attr_limit, &n, &dropped, 0);
    ospan_t *e = kvs.oom ? NULL : ospan_get(st, hi, lo);
    size_t at, body;
    buf_t *ev = e ? ospan_event_begin(st, &at, &body) : NULL;
    if (ev == NULL) {
        free(kvs.data);
        return PyErr_NoMemory();
    }
    pb_fixed64_field(ev, EVENT_TIME_UNIX_NANO, (uint64_t)ts);
    pb_bytes(ev, EVENT_NAME, name, (size_t)nlen);
    if (kvs.len)
        pb_splice_kvs(ev, EVENT_ATTRIBUTES, kvs.data, kvs.len, n);
    if (dropped)
        pb_varint_field(ev, EVENT_DROPPED_ATTRIBUTES_COUNT, dropped);
    ospan_event_end(st, e, at, body);
    free(kvs.data);
    Py_RETURN_NONE;
}

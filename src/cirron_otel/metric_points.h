/*
 * metric_points.h — marks as OTLP metric data points (README, "Marks as metrics"): a store
 * of points and the ExportMetricsServiceRequest encoder. Header-only, no Python.
 *
 * A point needs its scope's name (the label cirron.scope) and its span's trace id (the
 * exemplar), which the encoder learns only when the span closes; so otlp.c keeps a span's
 * points with its other pending state and moves them here, complete, at its close (marks on
 * the session, whose ids are known, come at once). mpoints_encode() then writes one Metric
 * per name, its points ordered by (scope, rank, time): Prometheus wants a series' points in
 * time order.
 *
 * Names point into the process's append-only name table (stable for its life) or, for a name
 * the full table could not take, into a copy the point owns.
 */
#ifndef CIRRON_OTEL_METRIC_POINTS_H
#define CIRRON_OTEL_METRIC_POINTS_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "buf.h"
#include "json.h" /* hex64 */
#include "mapping.h"
#include "pb.h"

typedef struct {
    const char *name;  /* the mark's name (raw UTF-8) */
    const char *scope; /* the name of the span it attached to */
    char *own;         /* the copies name/scope point into when they are not in the table */
    char *attrs;       /* allow-listed mark attrs: [varint len][KeyValue]..., owned */
    uint32_t name_len, scope_len, attrs_len;
    int64_t ts, rank;
    union {
        double d;
        int64_t i;
    } v;
    uint8_t is_int;   /* as_int, else as_double */
    uint8_t exemplar; /* trace and span ids known and exported */
    uint64_t trace_hi, trace_lo, span_hi;
} mpoint_t;

typedef struct {
    mpoint_t *p;
    size_t n, cap;
    char **blocks; /* copies of scope names that were not in the name table */
    size_t nblocks, blocks_cap;
} mpoints_t;

static CIRRON_MAYBE_UNUSED void
mpoints_clear(mpoints_t *s)
{
    for (size_t k = 0; k < s->n; k++) {
        free(s->p[k].own);
        free(s->p[k].attrs);
    }
    for (size_t k = 0; k < s->nblocks; k++)
        free(s->blocks[k]);
    s->n = s->nblocks = 0;
}

static CIRRON_MAYBE_UNUSED void
mpoints_free(mpoints_t *s)
{
    mpoints_clear(s);
    free(s->p);
    free(s->blocks);
    *s = (mpoints_t){0};
}

/* a store's first size: an open span's store usually holds a step's few marks */
#define MPOINTS_FIRST 16

/* Append a point (ownership of pt->own passes to the store); -1 when out of memory. */
static CIRRON_MAYBE_UNUSED int
mpoints_push(mpoints_t *s, const mpoint_t *pt)
{
    if (ARRAY_GROW(s->p, s->cap, s->n, MPOINTS_FIRST) < 0)
        return -1;
    s->p[s->n++] = *pt;
    return 0;
}

/* Move every point of `from` to `to`, with the scope and exemplar of the span that closed.
 * `scope` is copied unless `scope_stable` (a name-table entry). -1 when out of memory (the
 * points not moved are freed with `from`). */
static CIRRON_MAYBE_UNUSED int
mpoints_settle(mpoints_t *to, mpoints_t *from, const char *scope, uint32_t scope_len,
               int scope_stable, int exemplar, uint64_t trace_hi, uint64_t trace_lo,
               uint64_t span_hi)
{
    if (from->n == 0)
        return 0;
    if (!scope_stable) {
        char *copy = malloc(scope_len ? scope_len : 1);
        if (copy == NULL || ARRAY_GROW(to->blocks, to->blocks_cap, to->nblocks, 8) < 0) {
            free(copy);
            return -1;
        }
        memcpy(copy, scope, scope_len);
        to->blocks[to->nblocks++] = copy;
        scope = copy;
    }
    size_t k = 0;
    for (; k < from->n; k++) {
        mpoint_t pt = from->p[k];
        pt.scope = scope;
        pt.scope_len = scope_len;
        pt.exemplar = (uint8_t)exemplar;
        pt.trace_hi = trace_hi;
        pt.trace_lo = trace_lo;
        pt.span_hi = span_hi;
        if (mpoints_push(to, &pt) < 0)
            break;
        from->p[k].own = from->p[k].attrs = NULL; /* `to` owns them now */
    }
    int oom = k < from->n;
    mpoints_clear(from);
    return oom ? -1 : 0;
}

/* The allow-list of mark attrs that become point attributes (labels). */
typedef struct {
    char **keys;
    uint32_t *lens;
    uint32_t n;
} mallow_t;

static CIRRON_MAYBE_UNUSED void
mallow_free(mallow_t *a)
{
    for (uint32_t k = 0; k < a->n; k++)
        free(a->keys[k]);
    free(a->keys);
    free(a->lens);
    *a = (mallow_t){0};
}

static inline int
pb_read_varint(const char *p, size_t n, size_t *off, uint64_t *v)
{
    *v = 0;
    for (int shift = 0; *off < n && shift < 64; shift += 7) {
        unsigned char c = (unsigned char)p[(*off)++];
        *v |= (uint64_t)(c & 0x7F) << shift;
        if (!(c & 0x80))
            return 0;
    }
    return -1;
}

/* The KeyValues of `p` ([varint len][KeyValue]..., as the drainer rendered a mark's attrs)
 * whose key is allowed, copied into *out (malloc'd; NULL and 0 when none). -1: no memory. */
static CIRRON_MAYBE_UNUSED int
mallow_filter(const mallow_t *a, const char *p, size_t n, char **out, uint32_t *out_len)
{
    *out = NULL;
    *out_len = 0;
    buf_t b = {0};
    size_t off = 0;
    while (off < n) {
        uint64_t len, tag, klen;
        if (pb_read_varint(p, n, &off, &len) < 0 || len > n - off)
            break;
        size_t kv = off, end = off + (size_t)len;
        off = end;
        size_t q = kv;
        /* KeyValue.key is field 1, written first (render.c) */
        if (pb_read_varint(p, end, &q, &tag) < 0 || tag != ((KEY_VALUE_KEY << 3) | 2) ||
            pb_read_varint(p, end, &q, &klen) < 0 || klen > end - q)
            continue;
        for (uint32_t k = 0; k < a->n; k++)
            if (a->lens[k] == klen && memcmp(a->keys[k], p + q, (size_t)klen) == 0) {
                pb_varint(&b, len); /* [varint len][KeyValue], as it came */
                buf_put(&b, p + kv, (size_t)len);
                break;
            }
    }
    if (b.oom) {
        free(b.data);
        return -1;
    }
    *out = b.data;
    *out_len = (uint32_t)b.len;
    return 0;
}

static int
mpoint_cmp(const void *a, const void *b)
{
    const mpoint_t *x = a, *y = b;
    uint32_t n;
    int c;
    /* names and scopes mostly point into the name table: the same pointer is the same
     * string, and most comparisons end there without a memcmp */
    if (x->name != y->name || x->name_len != y->name_len) {
        n = x->name_len < y->name_len ? x->name_len : y->name_len;
        c = memcmp(x->name, y->name, n);
        if (c || x->name_len != y->name_len)
            return c ? c : (x->name_len < y->name_len ? -1 : 1);
    }
    if (x->scope != y->scope || x->scope_len != y->scope_len) {
        n = x->scope_len < y->scope_len ? x->scope_len : y->scope_len;
        c = memcmp(x->scope, y->scope, n);
        if (c || x->scope_len != y->scope_len)
            return c ? c : (x->scope_len < y->scope_len ? -1 : 1);
    }
    if (x->rank != y->rank)
        return x->rank < y->rank ? -1 : 1;
    if (x->attrs_len != y->attrs_len) /* allow-listed attrs: part of the series too */
        return x->attrs_len < y->attrs_len ? -1 : 1;
    c = x->attrs_len ? memcmp(x->attrs, y->attrs, x->attrs_len) : 0;
    if (c)
        return c;
    return x->ts < y->ts ? -1 : (x->ts > y->ts ? 1 : 0);
}

static int
mpoint_ptr_cmp(const void *a, const void *b)
{
    return mpoint_cmp(*(const mpoint_t *const *)a, *(const mpoint_t *const *)b);
}

/* Sort the store by series, then time. Points already in that order (the usual case: a
 * series' points arrive in time order) cost one pass; else pointers are sorted and the
 * points copied into order once: qsort (glibc's merge sort) moved each ~100-byte point
 * log2(n) times, most of the metrics worker's time under perf. */
static void
mpoints_sort(mpoints_t *s)
{
    size_t k = 1;
    while (k < s->n && mpoint_cmp(&s->p[k - 1], &s->p[k]) <= 0)
        k++;
    if (k >= s->n)
        return;
    const mpoint_t **ord = malloc(s->n * sizeof *ord);
    mpoint_t *out = malloc(s->cap * sizeof *out);
    if (ord == NULL || out == NULL) { /* sort in place instead */
        free(ord);
        free(out);
        qsort(s->p, s->n, sizeof *s->p, mpoint_cmp);
        return;
    }
    for (k = 0; k < s->n; k++)
        ord[k] = &s->p[k];
    qsort(ord, s->n, sizeof *ord, mpoint_ptr_cmp);
    for (k = 0; k < s->n; k++)
        out[k] = *ord[k];
    free(ord);
    free(s->p);
    s->p = out;
}

typedef struct {
    const char *resource; /* an encoded Resource */
    size_t resource_len;
    const char *scope_name, *scope_version;
    size_t scope_name_len, scope_version_len;
    const char *prefix; /* of every metric name */
    size_t prefix_len;
    int64_t start_ns;              /* start_time_unix_nano of every point: the session's start */
    uint64_t session_hi, session_lo; /* cirron.session.id */
} mpoints_req_t;

static void
mpoints_kv_str(buf_t *b, int field, const char *key, size_t key_len, const char *v, size_t n)
{
    size_t kv = pb_begin(b, field);
    pb_bytes(b, KEY_VALUE_KEY, key, key_len);
    size_t av = pb_begin(b, KEY_VALUE_VALUE);
    pb_bytes(b, ANY_VALUE_STRING, v, n);
    pb_end(b, av);
    pb_end(b, kv);
}

/* One data point (a non-monotonic cumulative Sum's: see the README for why not a Gauge). */
static void
mpoint_encode(buf_t *o, const mpoint_t *pt, const mpoints_req_t *q)
{
    size_t dp = pb_begin2(o, SUM_DATA_POINTS); /* ~150-200 bytes with its exemplar */
    mpoints_kv_str(o, NUMBER_DATA_POINT_ATTRIBUTES, KEY_SCOPE, strlen(KEY_SCOPE), pt->scope,
                   pt->scope_len);
    size_t kv = pb_begin(o, NUMBER_DATA_POINT_ATTRIBUTES);
    PB_LIT(o, KEY_VALUE_KEY, KEY_RANK);
    size_t av = pb_begin(o, KEY_VALUE_VALUE);
    pb_varint_field(o, ANY_VALUE_INT, (uint64_t)pt->rank);
    pb_end(o, av);
    pb_end(o, kv);
    char hex[32];
    hex128(hex, q->session_hi, q->session_lo);
    mpoints_kv_str(o, NUMBER_DATA_POINT_ATTRIBUTES, KEY_SESSION_ID, strlen(KEY_SESSION_ID), hex, 32);
    if (pt->attrs_len)
        pb_splice_kvs(o, NUMBER_DATA_POINT_ATTRIBUTES, pt->attrs, pt->attrs_len, UINT32_MAX);
    pb_fixed64_field(o, NUMBER_DATA_POINT_START_TIME_UNIX_NANO, (uint64_t)q->start_ns);
    pb_fixed64_field(o, NUMBER_DATA_POINT_TIME_UNIX_NANO, (uint64_t)pt->ts);
    if (pt->is_int)
        pb_fixed64_field(o, NUMBER_DATA_POINT_AS_INT, (uint64_t)pt->v.i);
    else
        pb_double_field(o, NUMBER_DATA_POINT_AS_DOUBLE, pt->v.d);
    if (pt->exemplar) {
        size_t ex = pb_begin(o, NUMBER_DATA_POINT_EXEMPLARS);
        pb_fixed64_field(o, EXEMPLAR_TIME_UNIX_NANO, (uint64_t)pt->ts);
        if (pt->is_int)
            pb_fixed64_field(o, EXEMPLAR_AS_INT, (uint64_t)pt->v.i);
        else
            pb_double_field(o, EXEMPLAR_AS_DOUBLE, pt->v.d);
        pb_id(o, EXEMPLAR_SPAN_ID, pt->span_hi, 0, 8);
        pb_id(o, EXEMPLAR_TRACE_ID, pt->trace_hi, pt->trace_lo, 16);
        pb_end(o, ex);
    }
    pb_end2(o, dp);
}

/* A request: ExportMetricsServiceRequest { resource_metrics { resource, scope_metrics {
 * scope, metrics... } } }. Nothing in it is ever moved to fit a length: the outer headers
 * go in front of `body` when it closes (pb_front_*), and a Metric is written whole around its
 * points, which are encoded apart (`mmetric_t`) until the Metric's name changes or the
 * request is full. (Closing them in place moved the whole request four times: one Metric
 * per name, so one usually fills the request.) */
typedef struct {
    buf_t o;
    size_t body;  /* where ScopeMetrics' body begins */
    size_t start; /* where the finished request begins */
    uint32_t points;
} mreq_t;

typedef struct {
    buf_t pts;            /* its data points, each [tag][len][NumberDataPoint] */
    const mpoint_t *name; /* the point whose name it takes; NULL: none open */
} mmetric_t;

static inline size_t
pb_varint_size(uint64_t v)
{
    size_t k = 1;
    while (v >= 0x80) {
        v >>= 7;
        k++;
    }
    return k;
}

static size_t
mmetric_name_len(const mpoints_req_t *q, const mmetric_t *m)
{
    return q->prefix_len + m->name->name_len;
}

/* Sum { data_points..., aggregation_temporality } */
static size_t
mmetric_sum_len(const mmetric_t *m)
{
    return m->pts.len + pb_varint_size(SUM_AGGREGATION_TEMPORALITY << 3) +
           pb_varint_size(AGGREGATION_TEMPORALITY_CUMULATIVE);
}

/* Metric { name, sum } */
static size_t
mmetric_len(const mpoints_req_t *q, const mmetric_t *m)
{
    size_t name = mmetric_name_len(q, m), sum = mmetric_sum_len(m);
    return pb_varint_size(METRIC_NAME << 3) + pb_varint_size(name) + name +
           pb_varint_size(METRIC_SUM << 3) + pb_varint_size(sum) + sum;
}

/* The whole field in the request: [tag][len][Metric] */
static size_t
mmetric_field_len(const mpoints_req_t *q, const mmetric_t *m)
{
    size_t n = mmetric_len(q, m);
    return pb_varint_size(SCOPE_METRICS_METRICS << 3) + pb_varint_size(n) + n;
}

static void
mmetric_write(buf_t *o, const mpoints_req_t *q, mmetric_t *m)
{
    size_t name = mmetric_name_len(q, m);
    pb_tag(o, SCOPE_METRICS_METRICS, WT_LEN);
    pb_varint(o, mmetric_len(q, m));
    pb_tag(o, METRIC_NAME, WT_LEN);
    pb_varint(o, name);
    buf_put(o, q->prefix, q->prefix_len);
    buf_put(o, m->name->name, m->name->name_len);
    pb_tag(o, METRIC_SUM, WT_LEN);
    pb_varint(o, mmetric_sum_len(m));
    buf_put(o, m->pts.data, m->pts.len);
    pb_varint_field(o, SUM_AGGREGATION_TEMPORALITY, AGGREGATION_TEMPORALITY_CUMULATIVE);
    /* is_monotonic = false: the default, not written */
    m->pts.len = 0;
    m->name = NULL;
}

/* The request's size once closed with the open Metric `m` in it */
static size_t
mreq_size(const mreq_t *r, const mpoints_req_t *q, const mmetric_t *m)
{
    size_t sm = r->o.len - r->body + (m->name ? mmetric_field_len(q, m) : 0);
    size_t rm = pb_varint_size(RESOURCE_METRICS_RESOURCE << 3) + pb_varint_size(q->resource_len) +
                q->resource_len + pb_varint_size(RESOURCE_METRICS_SCOPE_METRICS << 3) +
                pb_varint_size(sm) + sm;
    return pb_varint_size(EXPORT_METRICS_REQUEST_RESOURCE_METRICS << 3) + pb_varint_size(rm) + rm;
}

static void
mreq_open(mreq_t *r, const mpoints_req_t *q, size_t size_hint, buf_pool_t *pool)
{
    memset(r, 0, sizeof *r);
    r->o = buf_pool_take(pool);
    size_t gap = 3 * PB_FRONT_ROOM + q->resource_len;
    if (buf_reserve(&r->o, size_hint + gap) < 0)
        return;
    r->o.len = r->body = gap;
    size_t sc = pb_begin(&r->o, SCOPE_METRICS_SCOPE);
    pb_bytes(&r->o, SCOPE_NAME, q->scope_name, q->scope_name_len);
    pb_bytes(&r->o, SCOPE_VERSION, q->scope_version, q->scope_version_len);
    pb_end(&r->o, sc);
}

static void
mreq_close(mreq_t *r, const mpoints_req_t *q, mmetric_t *m)
{
    if (m->name != NULL)
        mmetric_write(&r->o, q, m);
    if (r->o.oom)
        return;
    char *d = r->o.data;
    size_t end = r->o.len;
    size_t at = pb_front_len(d, r->body, RESOURCE_METRICS_SCOPE_METRICS, end - r->body);
    at = pb_front_bytes(d, at, RESOURCE_METRICS_RESOURCE, q->resource, q->resource_len);
    r->start = pb_front_len(d, at, EXPORT_METRICS_REQUEST_RESOURCE_METRICS, end - at);
}

/* ~ bytes a point takes, to size buffers once */
#define MPOINT_SIZE_GUESS 200

/* Encode and empty the store: requests of at most max_bytes (one Metric per name, cut between
 * points: a point that would take a request past max_bytes starts the next one; only a lone
 * point larger than that on its own is over it), appended to *reqs; each request is
 * reqs[k].o.data + reqs[k].start, up to reqs[k].o.len. Buffers come from `pool` when it has
 * some (it may be NULL); the caller gives the requests' back. -1 when out of memory (the
 * points are gone either way: the spool keeps every mark). */
static CIRRON_MAYBE_UNUSED int
mpoints_encode(mpoints_t *s, const mpoints_req_t *q, size_t max_bytes, mreq_t **reqs,
               size_t *nreq, size_t *capreq, buf_pool_t *pool)
{
    int oom = 0;
    mpoints_sort(s);
    size_t hint = s->n * MPOINT_SIZE_GUESS + 4096;
    if (hint > max_bytes + 65536)
        hint = max_bytes + 65536;
    mmetric_t m = {buf_pool_take(pool), NULL};
    buf_reserve(&m.pts, hint);
    mreq_t *r = NULL;
    for (size_t k = 0; k < s->n && !oom; k++) {
        const mpoint_t *pt = &s->p[k];
        int same_name = m.name != NULL && m.name->name_len == pt->name_len &&
                        memcmp(m.name->name, pt->name, pt->name_len) == 0;
        if (r == NULL) {
            if (ARRAY_GROW(*reqs, *capreq, *nreq, 4) < 0) {
                oom = 1;
                break;
            }
            r = &(*reqs)[(*nreq)++];
            mreq_open(r, q, hint, pool);
        }
        else if (!same_name && m.name != NULL)
            mmetric_write(&r->o, q, &m);
        if (!same_name)
            m.name = pt;
        size_t before = m.pts.len;
        mpoint_encode(&m.pts, pt, q);
        if (r->points > 0 && !m.pts.oom && mreq_size(r, q, &m) > max_bytes) {
            /* full: take the point back, close the request without it (and without its
             * Metric if the point opened it), start the next one with it */
            m.pts.len = before;
            if (before == 0)
                m.name = NULL;
            mreq_close(r, q, &m);
            oom |= r->o.oom;
            if (ARRAY_GROW(*reqs, *capreq, *nreq, 4) < 0) {
                r = NULL;
                oom = 1;
                break;
            }
            r = &(*reqs)[(*nreq)++];
            mreq_open(r, q, hint, pool);
            m.name = pt;
            mpoint_encode(&m.pts, pt, q);
        }
        r->points++;
    }
    if (r != NULL) {
        mreq_close(r, q, &m);
        oom |= r->o.oom;
    }
    oom |= m.pts.oom;
    buf_pool_give(pool, &m.pts);
    mpoints_clear(s);
    return oom ? -1 : 0;
}

#endif /* CIRRON_OTEL_METRIC_POINTS_H */

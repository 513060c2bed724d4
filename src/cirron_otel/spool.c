/*
 * spool.c — the spool v1 encoder: batches as one JSON document, streamed to a file or
 * returned as bytes, without the GIL.
 */
#include "native.h"

#include <errno.h>
#include <math.h>
#include <unistd.h>

#include "json.h"

/* A record's name as a JSON string: its interned token, or its own bytes (table full). */
static inline void
encode_name(buf_t *o, BatchObject *b, const slot_t *s, const ext_t *e)
{
    if ((s->flags & F_NAME_REF) && e && e->name.len)
        json_escape_utf8(o, arena_at(b, e->name.off), e->name.len);
    else {
        const name_entry_t *ne = name_get(s->name_id);
        buf_put(o, ne->tok, ne->len);
    }
}

/* A record's attrs as a JSON object (rendered in the drainer's GIL pass). */
static inline void
encode_attrs(buf_t *o, BatchObject *b, const ext_t *e)
{
    if (e && e->attrs.len)
        buf_put(o, arena_at(b, e->attrs.off), e->attrs.len);
    else
        BUF_LIT(o, "{}");
}

static void
encode_span(buf_t *o, BatchObject *b, size_t i, int with_trace, ts_cache_t *tc)
{
    slot_t *s = &b->slots[i];
    slot2_t *s2 = (slot2_t *)&b->slots[i + 1];
    aux_t *ax = &b->aux[i];
    ext_t *e = ax->ext >= 0 ? &b->ext[ax->ext] : NULL;
    BUF_LIT(o, "{\"id\":");
    buf_id(o, s->span_hi, s->span_lo);
    BUF_LIT(o, ",\"name\":");
    encode_name(o, b, s, e);
    BUF_LIT(o, ",\"parent_id\":");
    if (s2->parent_hi == 0 || (s->vtype & SF_SPOOL_ROOT))
        BUF_LIT(o, "null");
    else
        buf_id(o, s2->parent_hi, s2->parent_lo);
    BUF_LIT(o, ",\"index\":");
    if (s->flags & F_HAS_INDEX)
        buf_i64(o, s2->index);
    else
        BUF_LIT(o, "null");
    BUF_LIT(o, ",\"start_ns\":");
    buf_ts(o, s->ts, tc);
    BUF_LIT(o, ",\"end_ns\":");
    buf_ts(o, s->v.i, tc);
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
    encode_attrs(o, b, e);
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
encode_mark(buf_t *o, BatchObject *b, size_t i, ts_cache_t *tc)
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
    encode_name(o, b, s, e);
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
    encode_attrs(o, b, e);
    BUF_LIT(o, ",\"ts_ns\":");
    buf_ts(o, s->ts, tc);
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
    Py_buffer snaps; /* the snapshot records, JSON objects joined by commas (may be empty) */
} spool_args_t;

/* GIL released by the caller. */
static void
encode_spool_into(sink_buf_t *o, spool_args_t *a)
{
    buf_t *b0 = &o->buf;
    ts_cache_t tc = {0};
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
                    encode_span(b0, b, i, a->with_trace, &tc);
                else
                    encode_mark(b0, b, i, &tc);
                stream_out(o, 0);
            }
        }
        if (pass == 0)
            BUF_LIT(b0, "],\"marks\":[");
    }
    /* snapshots are captured in Python at epoch ends (cirron_otel._snapshots), already JSON */
    BUF_LIT(b0, "],\"snapshots\":[");
    buf_put(b0, (const char *)a->snaps.buf, (size_t)a->snaps.len);
    BUF_LIT(b0, "]}");
    stream_out(o, 1);
}

static int
parse_spool_args(PyObject *args, PyObject *kw, int with_fd, int *fd, spool_args_t *a)
{
    static char *kw_bytes[] = {"batches",       "batch_id",  "created_ns", "sdk_version",
                               "with_trace_id", "snapshots", NULL};
    static char *kw_fd[] = {"fd",          "batches",       "batch_id",  "created_ns",
                            "sdk_version", "with_trace_id", "snapshots", NULL};
    PyObject *seq;
    a->with_trace = 1;
    a->snaps.buf = NULL;
    int ok = with_fd ? PyArg_ParseTupleAndKeywords(args, kw, "iOs#Ls#|py*:write_spool", kw_fd, fd, &seq,
                                                   &a->batch_id, &a->bid_len, &a->created_ns,
                                                   &a->sdk_version, &a->sdk_len, &a->with_trace,
                                                   &a->snaps)
                     : PyArg_ParseTupleAndKeywords(args, kw, "Os#Ls#|py*:encode_spool", kw_bytes, &seq,
                                                   &a->batch_id, &a->bid_len, &a->created_ns,
                                                   &a->sdk_version, &a->sdk_len, &a->with_trace,
                                                   &a->snaps);
    if (!ok)
        return -1;
    if (a->snaps.buf == NULL) { /* not given: an empty buffer, released as one */
        static const char none[1] = "";
        if (PyBuffer_FillInfo(&a->snaps, NULL, (void *)none, 0, 1, PyBUF_SIMPLE) < 0)
            return -1;
    }
    a->fast = PySequence_Fast(seq, "expected a sequence of Batch objects");
    if (a->fast == NULL) {
        PyBuffer_Release(&a->snaps);
        return -1;
    }
    a->nb = PySequence_Fast_GET_SIZE(a->fast);
    for (Py_ssize_t k = 0; k < a->nb; k++) {
        if (!PyObject_TypeCheck(PySequence_Fast_GET_ITEM(a->fast, k), &cn_Batch_Type)) {
            Py_CLEAR(a->fast);
            PyBuffer_Release(&a->snaps);
            PyErr_SetString(PyExc_TypeError, "expected a sequence of Batch objects");
            return -1;
        }
    }
    return 0;
}

/* encode_spool(batches, batch_id, created_ns, sdk_version, with_trace_id=True, snapshots=b"") -> bytes
 * snapshots: the batch's snapshot records, JSON objects joined by commas, written as they are. */
PyObject *
cn_mod_encode_spool(PyObject *m, PyObject *args, PyObject *kw)
{
    spool_args_t a;
    if (parse_spool_args(args, kw, 0, NULL, &a) < 0)
        return NULL;
    sink_buf_t o = {.fd = -1};
    Py_BEGIN_ALLOW_THREADS
    encode_spool_into(&o, &a);
    Py_END_ALLOW_THREADS
    Py_DECREF(a.fast);
    PyBuffer_Release(&a.snaps);
    if (o.buf.oom) {
        free(o.buf.data);
        return PyErr_NoMemory();
    }
    PyObject *res = PyBytes_FromStringAndSize(o.buf.data, (Py_ssize_t)o.buf.len);
    free(o.buf.data);
    return res;
}

/* write_spool(fd, batches, batch_id, created_ns, sdk_version, with_trace_id=True, snapshots=b"") -> int
 * Encode straight into an open file; returns the bytes written, raises OSError. */
PyObject *
cn_mod_write_spool(PyObject *m, PyObject *args, PyObject *kw)
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
    PyBuffer_Release(&a.snaps);
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

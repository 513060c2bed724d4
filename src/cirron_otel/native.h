/*
 * native.h — what the units of cirron_otel._native share: the record layout, the rings, the
 * scope and batch objects, the one process-wide state (`cn_state`) and the inline operations
 * of the hot path (clock, ids, ring reserve/publish). Internal: not installed, not an API.
 *
 * Symbols shared across units are prefixed `cn_` and hidden (CN_INTERNAL), so the shared
 * object exports only PyInit__native and the hot path reaches `cn_state` without the GOT.
 * Per-thread state stays in thread-locals.
 */
#ifndef CIRRON_OTEL_NATIVE_H
#define CIRRON_OTEL_NATIVE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#include "buf.h"     /* buf_t: the growable buffer the encoders write into */
#include "compat.h"  /* CN_INTERNAL */
#include "spantab.h" /* spantab_t: open spans by id */
#include "tsc.h"     /* tsc_clock_t: wall-clock ns from the invariant TSC */

#define MAX_DEPTH 64
#define STR_VALUE_CAP 256
#define ERROR_MESSAGE_CAP 256
#define ATTR_MAX_DEPTH 32
#define NAME_CACHE_SIZE 64 /* per-thread direct-mapped name cache */
#define NAME_CHUNK 1024
#define NAME_CHUNKS 256 /* at most 262,144 distinct interned names */

/* -- clock and ids ----------------------------------------------------------------------- */

static inline int64_t
wall_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static inline int64_t
thread_cpu_ns(void)
{
#ifdef CLOCK_THREAD_CPUTIME_ID
    struct timespec ts;
    if (clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts) == 0)
        return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
#endif
    return 0;
}

typedef struct {
    uint64_t s[4];
} rng_t;

static inline uint64_t
rotl64(uint64_t x, int k)
{
    return (x << k) | (x >> (64 - k));
}

static inline uint64_t
rng_next(rng_t *r)
{
    uint64_t *s = r->s;
    uint64_t result = rotl64(s[1] * 5, 7) * 9;
    uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl64(s[3], 45);
    return result;
}

static inline uint64_t
rng_nonzero(rng_t *r)
{
    uint64_t v;
    do {
        v = rng_next(r);
    } while (v == 0);
    return v;
}

/* -- records --------------------------------------------------------------------------- */

enum { R_MARK = 1, R_SPAN = 2, R_SPAN2 = 3 };
enum { VT_FLOAT = 0, VT_INT = 1, VT_BOOL = 2, VT_STRING = 3 };
enum {
    F_REFS = 1,      /* the slot holds Python references (GIL pass needed) */
    F_NAME_REF = 2,  /* name_ref holds the name (table full) */
    F_ERROR = 4,     /* span closed by an exception */
    F_HAS_INDEX = 8, /* span index set */
    F_HAS_CPU = 16,  /* span cpu_ns measured */
    F_SUMMARY = 32,  /* mark kind summary */
    F_ROOTLESS = 64, /* mark: no session, attached to "root" */
};

/* One ring slot: 64 bytes. A span takes two consecutive slots (R_SPAN, R_SPAN2). */
typedef struct {
    uint8_t type;
    uint8_t vtype;
    uint8_t flags;
    uint8_t _pad;
    uint32_t name_id;
    int64_t ts;                 /* mark time / span start */
    uint64_t span_hi, span_lo;  /* mark: attached span; span: its own id */
    union {
        double d;
        int64_t i;
    } v;                        /* mark value / span end */
    PyObject *name_ref;         /* name when the table is full */
    PyObject *obj;              /* mark: str value; span: attrs dict */
    PyObject *attrs;            /* mark: attrs dict; span: exception */
} slot_t;

typedef struct {
    uint8_t type;
    uint8_t _pad[3];
    uint32_t code_id;           /* the decorated function's code location (0: none) */
    uint64_t parent_hi, parent_lo;
    uint64_t trace_hi, trace_lo;
    int64_t index;
    int64_t cpu_ns;
    uint64_t thread_id;
} slot2_t;

_Static_assert(sizeof(slot_t) == 64, "slot must be 64 bytes");
_Static_assert(sizeof(slot2_t) <= 64, "second span slot must fit");

typedef struct {
    PyObject *key;
    uint32_t id;
} name_cache_t;

typedef struct ring {
    /* producer-written */
    _Alignas(64) _Atomic uint64_t head;
    uint64_t cached_tail;
    _Atomic uint64_t marks_recorded;
    _Atomic uint64_t spans_recorded;
    _Atomic uint64_t depth_drops;
    rng_t rng;
    name_cache_t name_cache[NAME_CACHE_SIZE];
    int64_t last_ns; /* this thread's last timestamp: never go back by less than CLOCK_CLAMP_NS */
    int warned_full;
    int warned_depth;
    int no_wait; /* a wait for room timed out: drop until the drainer catches up */
    /* consumer-claimed, producer-stolen */
    _Alignas(64) _Atomic uint64_t tail;
    _Atomic uint64_t marks_dropped;
    _Atomic uint64_t spans_dropped;
    /* fixed */
    _Alignas(64) slot_t *slots;
    uint64_t cap, mask, hw;
    uint64_t thread_id;
    char *thread_name;        /* UTF-8, read once after the ring is made (registry lock) */
    uint32_t thread_name_len;
    _Atomic int orphaned;
    struct ring *next;
} ring_t;

/* Names are interned into an append-only table (see name_intern in record.c). */
typedef struct {
    char *tok; /* "quoted, escaped" JSON string */
    uint32_t len;
    char *raw; /* the UTF-8 bytes, for OTLP */
    uint32_t raw_len;
} name_entry_t;

typedef struct {
    uint8_t vtype;
    union {
        double d;
        int64_t i;
    } v;
    PyObject *str; /* new reference for VT_STRING */
} coerced_t;

/* -- scopes ---------------------------------------------------------------------------- */

enum { ST_NEW = 0, ST_OPEN = 1, ST_CLOSED = 2, ST_DROPPED = 3 };
/* span-only flags, kept in the record's vtype byte */
enum {
    SF_UNSAMPLED = 1,   /* under a non-sampled OpenTelemetry parent: spool only */
    SF_NEW_TRACE = 2,   /* a direct child of the session that starts its own trace */
    SF_OTEL_PARENT = 4, /* the parent is a foreign OpenTelemetry span */
    SF_SPOOL_ROOT = 8,  /* a root in the spool (cirron-sdk's inference requests): in
                           OpenTelemetry a trace of its own, linked to the session */
};

/* scope.__enter__ / scope.__exit__ as bound objects embedded in the scope (see scope.c:
 * "the with protocol"): handing one out allocates nothing. */
typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    struct ScopeObject *owner; /* a reference while this object's own count is above zero */
} ScopeBoundObject;

typedef struct ScopeObject {
    PyObject_HEAD
    uint64_t span_hi, span_lo;
    uint64_t parent_hi, parent_lo;
    uint64_t trace_hi, trace_lo;
    int64_t start_ns, end_ns, cpu_start;
    int64_t cpu_ns; /* thread CPU time the scope took, once closed (-1: not captured) */
    int64_t index;
    int64_t pid;
    uint64_t thread_id; /* threading.get_ident() of the thread that opened it */
    uint32_t name_id;
    uint16_t depth;
    uint8_t state;
    uint8_t has_index;
    uint8_t span_flags; /* SF_* below, copied into the span record */
    uint8_t attrs_shared; /* attrs was handed out (or came from outside): copy it at close */
    uint32_t code_id;     /* code location of the decorated function (code_scope), 0: none */
    PyObject *name;
    PyObject *attrs;
    PyObject *token;
    PyObject *exc;
    PyObject *mark_ids; /* Scope.marks of a closed scope, once read (a list) */
    ScopeBoundObject bound_enter, bound_exit;
} ScopeObject;

#define SCOPE_FREELIST_MAX 1024

/* Code locations of decorated functions (code.function.name, code.file.path,
 * code.line.number over OTLP), registered once per decorated function by code_location()
 * and named by id in each span record. Append-only: the encoder reads entries without the
 * GIL. Ids 1..CODE_MAX-1; when full, functions decorated later get none (id 0). */
typedef struct {
    char *func, *file; /* UTF-8; file may be NULL */
    uint32_t func_len, file_len;
    int64_t line;      /* < 0: unknown */
} code_loc_t;

#define CODE_CHUNK 256
#define CODE_MAX (CODE_CHUNK * 256)

/* -- batches (drain.c) ----------------------------------------------------------------- */

typedef struct {
    union {
        struct {
            uint64_t id_hi, id_lo; /* mark: its id */
        };
        uint64_t mids_omitted; /* span: mark ids over the list's cap, not listed */
    };
    uint32_t mids_off, mids_cnt;
    int32_t ext;
} aux_t;

typedef struct {
    uint32_t off, len; /* bytes in the batch arena */
} tok_t;

/* What the GIL pass extracted from a record's Python objects. */
typedef struct {
    tok_t name;                    /* raw UTF-8 name (F_NAME_REF) */
    tok_t val;                     /* mark: raw UTF-8 string value, capped */
    tok_t attrs;                   /* attrs as a JSON object */
    tok_t oattrs;                  /* attrs as OTLP KeyValues: [varint len][KeyValue]... */
    uint32_t oattrs_n, oattrs_dropped;
    tok_t etype, emsg, estack;     /* span: the exception, raw UTF-8 */
} ext_t;

/* The slots [start, end) came from one ring: its thread's name (thread.name over OTLP). */
typedef struct {
    size_t start, end;
    tok_t name;
} thr_t;

typedef struct {
    PyObject_HEAD
    slot_t *slots;
    aux_t *aux;
    size_t nslots;
    ext_t *ext;
    size_t next, ext_cap;
    uint64_t *mids; /* pairs */
    size_t nmids, mids_cap;
    buf_t arena;
    size_t n_marks, n_spans;
    int64_t pid;
    int64_t rank;
    thr_t *thr; /* in slot order */
    size_t nthr, thr_cap;
} BatchObject;

/* open-span table: span id -> mark ids seen so far. A span lists at most a bounded number
 * of its mark ids (the first ones) and counts the rest, so a span that stays open for the
 * life of a process (the session root, a server's outer scope) keeps a constant size;
 * every mark record still names its span_id, which is how readers join. */
#define SESSION_MARK_IDS_MAX 1000u
#define SPAN_MARK_IDS_MAX 1000000u
#define OPEN_FREE_MAX 256        /* open-span entries kept for reuse */
#define OPEN_FREE_IDS_MAX 1024u  /* ... with an id array of at most this many entries */
typedef struct {
    span_key_t key; /* first: an entry of cn_state.open_spans (spantab.h) */
    uint64_t *ids;  /* pairs */
    uint32_t n;    /* pairs */
    uint32_t max;  /* pairs kept at most */
    uint64_t omitted;
    size_t cap;    /* uint64 entries */
} open_span_t;

/* -- the process-wide state -------------------------------------------------------------
 * One instance, cn_state, defined in module.c. Producers read the first group on every mark
 * and scope; it is written only by configure(), set_sampler() and the session calls (GIL
 * held). What the drainer writes starts on its own cache line. */
typedef struct {
    /* read on the hot path */
    _Atomic int recording;
    int capture_cpu;
    int otel_context;    /* consult otel_var when opening scopes */
    int otel_attached;   /* the runtime context has attached a context at least once */
    int trace_per_child; /* each direct child of the session starts a trace */
    int sample_all;      /* sampling of the traces Cirron starts: see root_sampling */
    uint64_t sample_bound;
    int64_t pid;
    int64_t rank;
    ScopeObject *session; /* the cirron.session root, or NULL */
    PyObject *scope_var;  /* ContextVar holding the innermost ScopeObject */
    PyObject *otel_var;   /* ContextVar of the OpenTelemetry runtime context */
    PyObject *str_point, *str_summary, *str_kind, *str_index, *str_item; /* interned */
    PyObject *session_name, *epoch_name, *batch_name;
    _Atomic int64_t full_wait_ns; /* 0: drop at once (no drainer running) */
    uint64_t ring_capacity;       /* for rings created from now on */
    PyObject *decorate;           /* Python helper that turns a scope into a decorator */
    PyObject *warning_category;   /* set by configure(); UserWarning until then */
    PyObject *numpy_generic, *numpy_floating, *numpy_integer, *numpy_bool; /* numpy imported */
    int scope_free_n;
    ScopeObject *scope_freelist[SCOPE_FREELIST_MAX];

    /* the name table and the code locations: append-only, read without the GIL */
    name_entry_t *name_chunks[NAME_CHUNKS];
    _Atomic uint32_t name_count;
    PyObject *name_ids;  /* dict: str -> int id (GIL protected) */
    PyObject *name_objs; /* list: id -> str (for the Python side) */
    code_loc_t *code_chunks[CODE_MAX / CODE_CHUNK];
    _Atomic uint32_t code_n;

    /* the ring registry */
    pthread_mutex_t registry_mu;
    ring_t *rings;
    pthread_key_t ring_key;
    _Atomic uint64_t rings_freed, rings_created;
    /* totals carried over from rings that were freed after their thread exited */
    _Atomic uint64_t freed_marks_recorded, freed_spans_recorded, freed_depth_drops,
        freed_marks_dropped, freed_spans_dropped;

    /* written by the drainer */
    _Alignas(64) _Atomic int64_t progress_ns; /* last time the drainer or a sink moved data */
    pthread_mutex_t wake_mu;
    pthread_cond_t wake_cv;
    _Atomic int wake_flag;
    _Atomic int drainer_sleeping;
    _Atomic uint64_t wakeups;
    _Atomic uint64_t session_hi, session_lo; /* the session root's id: its marks get the small cap */
    spantab_t open_spans; /* span id -> open_span_t */
    /* open-span entries kept for reuse with their id arrays (drain mutex): a span per step
     * would otherwise cost the drainer a malloc and a free or two, ~30% of its instructions */
    void *open_free[OPEN_FREE_MAX];
    size_t open_nfree;
    rng_t drain_rng;
    int drain_rng_ready;
    pthread_mutex_t drain_mu;
    _Atomic uint64_t marks_collected, spans_collected, open_overflow;
    PyObject *format_exception; /* traceback.format_exception, loaded lazily */

    /* the OTLP mapping's limits (OTEL_*_LIMIT), set by configure() */
    int otlp; /* render OTLP attributes in the GIL pass */
    uint32_t span_attr_limit, event_attr_limit;
    /* OTEL_SPAN_LINK_COUNT_LIMIT / OTEL_LINK_ATTRIBUTE_COUNT_LIMIT: a span has at most one
     * link (to the session) with one attribute, so only 0 changes anything */
    uint32_t link_limit, link_attr_limit;
    int64_t value_len_limit; /* OTEL_*ATTRIBUTE_VALUE_LENGTH_LIMIT; -1: none */
} cn_state_t;

#define CN_STATE_INIT                                                                          \
    {                                                                                          \
        .recording = 1, .trace_per_child = 1, .sample_all = 1, .ring_capacity = 65536,          \
        .code_n = 1, .registry_mu = PTHREAD_MUTEX_INITIALIZER,                                 \
        .wake_mu = PTHREAD_MUTEX_INITIALIZER, .wake_cv = PTHREAD_COND_INITIALIZER,             \
        .drain_mu = PTHREAD_MUTEX_INITIALIZER, .span_attr_limit = 128,                       \
        .event_attr_limit = 128, .link_limit = 128, .link_attr_limit = 128,                    \
        .value_len_limit = -1,                                                                 \
    }

extern CN_INTERNAL cn_state_t cn_state;

/* The records' clock (tsc.h), defined in module.c; re-based by the drainer (mod_wait). */
extern CN_INTERNAL tsc_clock_t cn_clock;

/* -- what each unit offers the others --------------------------------------------------- */

/* record.c: ids, names, rings, values, attribute capture, code locations */
/* this thread's ring, NULL until its first record */
extern CN_INTERNAL CN_TLS_FAST _Thread_local ring_t *cn_tl_ring;
CN_INTERNAL void cn_rng_seed(rng_t *r);
CN_INTERNAL uint32_t cn_name_intern(PyObject *name);
CN_INTERNAL void cn_wake_drainer(void);
CN_INTERNAL void cn_ring_thread_exit(void *ring);
CN_INTERNAL ring_t *cn_get_ring_slow(void);
CN_INTERNAL void cn_slot_release_refs(slot_t *s);
CN_INTERNAL void cn_warn_once(int *flag, const char *msg);
CN_INTERNAL void cn_ring_make_room(ring_t *r, uint64_t h, uint64_t need);
CN_INTERNAL int cn_numpy_types_ready(void);
CN_INTERNAL int cn_coerce_value_slow(PyObject *value, coerced_t *out, int depth);
CN_INTERNAL PyObject *cn_mod_code_location(PyObject *m, PyObject *args);

/* scope.c: scopes, iterators, mark(), the session */
extern CN_INTERNAL PyTypeObject cn_Scope_Type, cn_ScopeIter_Type, cn_ScopeMethod_Type,
    cn_ScopeBound_Type;
CN_INTERNAL int cn_scope_methods_install(void);
CN_INTERNAL PyObject *cn_hex128(uint64_t hi, uint64_t lo);
CN_INTERNAL PyObject *cn_mod_scope(PyObject *m, PyObject *const *args, Py_ssize_t nargs,
                                   PyObject *kwnames);
CN_INTERNAL PyObject *cn_mod_code_scope(PyObject *m, PyObject *const *args, Py_ssize_t nargs,
                                        PyObject *kwnames);
CN_INTERNAL PyObject *cn_mod_epochs(PyObject *m, PyObject *iterable);
CN_INTERNAL PyObject *cn_mod_batches(PyObject *m, PyObject *iterable);
CN_INTERNAL PyObject *cn_mod_scoped_iter(PyObject *m, PyObject *args);
CN_INTERNAL PyObject *cn_mod_mark(PyObject *m, PyObject *const *args, Py_ssize_t nargs,
                                  PyObject *kwnames);
CN_INTERNAL PyObject *cn_mod_session_begin(PyObject *m, PyObject *args);
CN_INTERNAL PyObject *cn_mod_session_end(PyObject *m, PyObject *unused);
CN_INTERNAL PyObject *cn_mod_session(PyObject *m, PyObject *unused);
CN_INTERNAL PyObject *cn_mod_current_scope(PyObject *m, PyObject *unused);
CN_INTERNAL PyObject *cn_mod_set_sampler(PyObject *m, PyObject *args);

/* render.c: Python attributes as JSON and as OTLP KeyValues (GIL held) */
CN_INTERNAL void cn_render_json(buf_t *b, PyObject *o);
CN_INTERNAL void cn_otlp_attrs(buf_t *a, PyObject *dict, uint32_t limit, uint32_t *n, uint32_t *dropped,
                               int span_error);

/* drain.c: records claimed from the rings into Batch objects */
extern CN_INTERNAL PyTypeObject cn_Batch_Type;
CN_INTERNAL PyObject *cn_mod_drain(PyObject *m, PyObject *args);
CN_INTERNAL PyObject *cn_mod_free_orphans(PyObject *m, PyObject *unused);
CN_INTERNAL PyObject *cn_mod_open_span_mark_ids(PyObject *m, PyObject *arg);

/* spool.c: the spool v1 JSON encoder */
CN_INTERNAL PyObject *cn_mod_encode_spool(PyObject *m, PyObject *args, PyObject *kw);
CN_INTERNAL PyObject *cn_mod_write_spool(PyObject *m, PyObject *args, PyObject *kw);

/* otlp.c: the OpenTelemetry mapping, encoded as OTLP protobuf */
extern CN_INTERNAL PyTypeObject cn_OtlpState_Type;
CN_INTERNAL PyObject *cn_mod_otlp_encode(PyObject *m, PyObject *args, PyObject *kw);
CN_INTERNAL PyObject *cn_mod_otlp_metrics_encode(PyObject *m, PyObject *args, PyObject *kw);
CN_INTERNAL PyObject *cn_mod_otlp_add_event(PyObject *m, PyObject *args, PyObject *kw);

/* -- inline: names, code locations ---------------------------------------------------- */

static inline const name_entry_t *
name_get(uint32_t id)
{
    return &cn_state.name_chunks[id / NAME_CHUNK][id % NAME_CHUNK];
}

static inline const code_loc_t *
code_get(uint32_t id)
{
    if (id == 0 || id >= atomic_load_explicit(&cn_state.code_n, memory_order_acquire))
        return NULL;
    return &cn_state.code_chunks[id / CODE_CHUNK][id % CODE_CHUNK];
}

/* -- inline: the hot path (mark, scope enter/exit, iterator steps) ------------------------ */

static inline ring_t *
get_ring(void)
{
    ring_t *r = cn_tl_ring;
    if (r != NULL)
        return r;
    return cn_get_ring_slow();
}

/* A re-base of the TSC clock (or an NTP step) may move the clock back by a few µs: a
 * thread's timestamps stay in order. A larger step back (the wall clock was set) is kept. */
#define CLOCK_CLAMP_NS 10000000LL

/* Wall-clock ns for a record of the thread owning `r` (NULL: no clamp). */
static inline int64_t
clock_now(ring_t *r)
{
    int64_t t = tsc_now(&cn_clock);
    if (r != NULL) {
        int64_t last = r->last_ns;
        if (t < last && last - t < CLOCK_CLAMP_NS)
            return last;
        r->last_ns = t;
    }
    return t;
}

/* Slots ahead of the head whose line ring_reserve() asks for: far enough that the line has
 * arrived when the producer gets there (a mark every ~40 ns), near enough to stay in L1.
 * Measured on a 2-core Xeon VM (the drainer on the other core): a mark 45 -> 38 ns. */
#define RING_PREFETCH_AHEAD 8

static inline slot_t *
ring_reserve(ring_t *r, uint64_t need)
{
    uint64_t h = atomic_load_explicit(&r->head, memory_order_relaxed);
    if (h + need - r->cached_tail > r->cap)
        cn_ring_make_room(r, h, need);
    CN_PREFETCH_WRITE(&r->slots[(h + RING_PREFETCH_AHEAD) & r->mask]);
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
        cn_wake_drainer();
    }
}

static inline void
counter_inc(_Atomic uint64_t *c)
{
    /* single writer: a relaxed load+store is enough and avoids a locked instruction */
    atomic_store_explicit(c, atomic_load_explicit(c, memory_order_relaxed) + 1, memory_order_relaxed);
}

static inline int
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
    return cn_coerce_value_slow(value, out, 0);
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
    uint32_t id = cn_name_intern(name);
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

/* Attribute values are captured at the call: the drainer renders them later, so a list
 * or dict the caller mutates afterwards must not change what is written. Built-in mutable
 * containers are copied (lists, dicts and tuples structurally, recursively; sets and
 * bytearrays as the str() they are rendered as anyway). Scalars and other objects are kept
 * by reference (other objects are rendered by their str() when drained). */
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

CN_INTERNAL PyObject *cn_attr_capture(PyObject *v, capture_t *c);

/* the value to store for one attribute (new reference; never fails) */
static inline PyObject *
attr_value(PyObject *v)
{
    if (!attr_needs_copy(v))
        return Py_NewRef(v);
    capture_t c = {.n = 0, .budget = ATTR_COPY_BUDGET};
    return cn_attr_capture(v, &c);
}

/* -- inline: the drainer and the encoders ---------------------------------------------- */

static inline const char *
arena_at(BatchObject *b, uint32_t off)
{
    return b->arena.data + off;
}

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

#endif /* CIRRON_OTEL_NATIVE_H */

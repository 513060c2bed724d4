/*
 * module.c — the module functions that configure and observe the native side (configure,
 * the drainer's wake-up, stats, fork handling), the method table and the module init.
 * The process-wide state cn_state (native.h) is defined here.
 */
#include "native.h"

#include <errno.h>
#include <math.h>
#include <signal.h>
#include <unistd.h>

#include "grisu2.h"  /* format_f64 */
#include "mapping.h" /* the attribute keys, exported */

/* the process-wide state (native.h) */
CN_INTERNAL cn_state_t cn_state = CN_STATE_INIT;
/* the records' clock (tsc.h): set up in native_init_globals */
CN_INTERNAL _Alignas(64) tsc_clock_t cn_clock;

/* ======================================================================================
 * Module functions
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
        cn_state.link_attr_limit =
            (uint32_t)(link_attr_limit > UINT32_MAX ? UINT32_MAX : link_attr_limit);
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
    /* each drainer cycle re-bases the TSC clock on clock_gettime (GIL held: see tsc.h) */
    tsc_recalibrate(&cn_clock);
    if (woken)
        atomic_fetch_add(&cn_state.wakeups, 1);
    return PyBool_FromLong(woken);
}

/* ======================================================================================
 * Signal watch: how many times a signal has reached the process, counted in C
 *
 * Python runs a signal's Python handler on the main thread when it next executes bytecode.
 * A signal that lands just before the main thread blocks in a wait only EINTR would end
 * (a multiprocessing lock's sem_wait) is taken by the C handler, and the Python one never
 * runs: with SIG_DFL the kernel would have ended the process, with our handler it hangs
 * (Pool.terminate(), about one worker in 300 under load). watch_signal(sig) puts a C handler
 * in front of the one Python installed: it counts the signal, then calls Python's. The
 * drainer compares the count with what our Python handler saw and, when the main thread
 * does not get to it, ends the process itself (_profiler._unhandled_signals).
 * signal.signal() replaces the whole chain, ours included.
 * ==================================================================================== */

#define CN_NSIG 65
static struct sigaction cn_sig_prev[CN_NSIG];
static _Atomic uint64_t cn_sig_count[CN_NSIG];

static void
cn_on_signal(int sig, siginfo_t *info, void *ctx)
{
    int saved = errno;
    atomic_fetch_add_explicit(&cn_sig_count[sig], 1, memory_order_relaxed);
    const struct sigaction *prev = &cn_sig_prev[sig];
    if (prev->sa_flags & SA_SIGINFO)
        prev->sa_sigaction(sig, info, ctx);
    else if (prev->sa_handler != SIG_DFL && prev->sa_handler != SIG_IGN)
        prev->sa_handler(sig);
    errno = saved;
}

static int
signal_arg(PyObject *arg)
{
    long sig = PyLong_AsLong(arg);
    if (sig == -1 && PyErr_Occurred())
        return -1;
    if (sig <= 0 || sig >= CN_NSIG) {
        PyErr_Format(PyExc_ValueError, "signal number out of range: %ld", sig);
        return -1;
    }
    return (int)sig;
}

/* watch_signal(sig) -> True when the count is on (the handler in place is Python's or ours) */
static PyObject *
mod_watch_signal(PyObject *m, PyObject *arg)
{
    int sig = signal_arg(arg);
    if (sig < 0)
        return NULL;
    struct sigaction cur;
    if (sigaction(sig, NULL, &cur) != 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    if ((cur.sa_flags & SA_SIGINFO) && cur.sa_sigaction == cn_on_signal)
        Py_RETURN_TRUE;
    if (!(cur.sa_flags & SA_SIGINFO) && (cur.sa_handler == SIG_DFL || cur.sa_handler == SIG_IGN))
        Py_RETURN_FALSE; /* nothing to put ourselves in front of */
    cn_sig_prev[sig] = cur;
    struct sigaction ours = cur;
    ours.sa_sigaction = cn_on_signal;
    ours.sa_flags = cur.sa_flags | SA_SIGINFO;
    if (sigaction(sig, &ours, NULL) != 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_TRUE;
}

/* signals_received(sig) -> how many times the watched signal has reached the process */
static PyObject *
mod_signals_received(PyObject *m, PyObject *arg)
{
    int sig = signal_arg(arg);
    if (sig < 0)
        return NULL;
    return PyLong_FromUnsignedLongLong(atomic_load_explicit(&cn_sig_count[sig], memory_order_relaxed));
}

/* die_by_signal(sig): the default action of sig for the whole process, from any thread (a
 * thread that blocks sig, as ours do, hands it to one that does not); returns if none can
 * take it. signal.signal() cannot do this off the main thread. */
static PyObject *
mod_die_by_signal(PyObject *m, PyObject *arg)
{
    int sig = signal_arg(arg);
    if (sig < 0)
        return NULL;
    struct sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    sigemptyset(&dfl.sa_mask);
    sigaction(sig, &dfl, NULL);
    kill(getpid(), sig);
    Py_RETURN_NONE;
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
    cn_wake_drainer();
    Py_RETURN_NONE;
}

/* pending() -> records recorded but not yet drained, over all rings */
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
    uint64_t mr = atomic_load(&cn_state.freed_marks_recorded),
             sr = atomic_load(&cn_state.freed_spans_recorded),
             dd = atomic_load(&cn_state.freed_depth_drops),
             md = atomic_load(&cn_state.freed_marks_dropped),
             sd = atomic_load(&cn_state.freed_spans_dropped), pend = 0, live = 0;
    double fill = 0.0; /* the fullest ring's fill, 0 to 1 (health metric cirron.health.ring.fill) */
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&cn_state.registry_mu);
    for (ring_t *r = cn_state.rings; r; r = r->next) {
        mr += atomic_load(&r->marks_recorded);
        sr += atomic_load(&r->spans_recorded);
        dd += atomic_load(&r->depth_drops);
        md += atomic_load(&r->marks_dropped);
        sd += atomic_load(&r->spans_dropped);
        uint64_t used = atomic_load(&r->head) - atomic_load(&r->tail);
        pend += used;
        if (r->cap && (double)used / (double)r->cap > fill)
            fill = (double)used / (double)r->cap;
        live += !atomic_load(&r->orphaned);
    }
    pthread_mutex_unlock(&cn_state.registry_mu);
    Py_END_ALLOW_THREADS
    return Py_BuildValue(
        "{s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:n,s:I,s:K,s:d}", "marks_recorded",
        (unsigned long long)mr, "spans_recorded", (unsigned long long)sr, "scope_depth_drops",
        (unsigned long long)dd, "marks_dropped", (unsigned long long)md, "spans_dropped",
        (unsigned long long)sd, "pending_slots", (unsigned long long)pend, "marks_collected",
        (unsigned long long)atomic_load(&cn_state.marks_collected), "spans_collected",
        (unsigned long long)atomic_load(&cn_state.spans_collected), "rings_live",
        (unsigned long long)live,
        "rings_created", (unsigned long long)atomic_load(&cn_state.rings_created), "rings_freed",
        (unsigned long long)atomic_load(&cn_state.rings_freed), "wakeups",
        (unsigned long long)atomic_load(&cn_state.wakeups), "open_spans",
        (Py_ssize_t)cn_state.open_spans.n,
        "names", (unsigned int)atomic_load(&cn_state.name_count), "mark_id_overflow",
        (unsigned long long)atomic_load(&cn_state.open_overflow), "ring_fill_max", fill);
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
     * forking thread holds the GIL. The drain lock is simply re-made in the child. */
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
    pthread_mutex_init(&cn_state.drain_mu, NULL);
    pthread_mutex_init(&cn_state.wake_mu, NULL);
    pthread_cond_init(&cn_state.wake_cv, NULL);
    atomic_store(&cn_state.drainer_sleeping, 0);
    atomic_store(&cn_state.wake_flag, 0);
    /* a drain() in flight in the parent may have left the open-span table mid-update:
     * abandon it (a bounded leak, once per fork) rather than walk it */
    cn_state.open_spans = (spantab_t){0};
    cn_state.open_nfree = 0;
    cn_state.pid = (int64_t)getpid();
}

/* after_fork_child(): called from os.register_at_fork in the child, GIL held. The child
 * starts with empty rings (the parent still owns and writes what was pending), fresh
 * random state and zeroed counters. */
static PyObject *
mod_after_fork_child(PyObject *m, PyObject *unused)
{
    cn_state.pid = (int64_t)getpid();
    ring_t *keep = cn_tl_ring;
    ring_t *r = cn_state.rings;
    cn_state.rings = NULL;
    while (r) {
        ring_t *nx = r->next;
        for (uint64_t t = atomic_load(&r->tail), h = atomic_load(&r->head); t < h; t++) {
            slot_t *s = &r->slots[t & r->mask];
            if (s->type != R_SPAN2 && (s->flags & F_REFS))
                cn_slot_release_refs(s);
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
            cn_rng_seed(&r->rng);
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
    cn_rng_seed(&cn_state.drain_rng);
    cn_state.drain_rng_ready = 1;
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

/* clock_ns() -> int: the records' clock now (wall-clock ns), for tests */
static PyObject *
mod_clock_ns(PyObject *m, PyObject *unused)
{
    return PyLong_FromLongLong(tsc_now(&cn_clock));
}

/* clock_info(recalibrate=False) -> dict: the records' clock source ("tsc" or "realtime") and
 * its calibration; recalibrate=True re-bases it first, as the drainer does each cycle. */
static PyObject *
mod_clock_info(PyObject *m, PyObject *args)
{
    int recal = 0;
    if (!PyArg_ParseTuple(args, "|p:clock_info", &recal))
        return NULL;
    if (recal)
        tsc_recalibrate(&cn_clock);
    double ghz = cn_clock.mult ? 4294967296.0 / (double)cn_clock.mult : 0.0;
    return Py_BuildValue("{s:s,s:d,s:K,s:K,s:O}", "source", cn_clock.enabled ? "tsc" : "realtime",
                         "tsc_ghz", ghz, "rebases", (unsigned long long)cn_clock.rebases,
                         "restarts", (unsigned long long)cn_clock.restarts, "calibrated",
                         cn_clock.limit != 0 ? Py_True : Py_False);
}

/* _clock_shift(ns): move the TSC clock's base by ns, as a re-base would when the rate
 * estimate was off; tests check a thread's timestamps still never go back. No effect when
 * the source is "realtime". */
static PyObject *
mod_clock_shift(PyObject *m, PyObject *arg)
{
    long long d = PyLong_AsLongLong(arg);
    if (d == -1 && PyErr_Occurred())
        return NULL;
    cn_clock.base_ns += d;
    Py_RETURN_NONE;
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
    {"otlp_encode", (PyCFunction)(void (*)(void))cn_mod_otlp_encode, METH_VARARGS | METH_KEYWORDS,
     NULL},
    {"otlp_metrics_encode", (PyCFunction)(void (*)(void))cn_mod_otlp_metrics_encode,
     METH_VARARGS | METH_KEYWORDS, NULL},
    {"otlp_add_event", (PyCFunction)(void (*)(void))cn_mod_otlp_add_event, METH_VARARGS | METH_KEYWORDS,
     "otlp_add_event(state, span_hi, span_lo, ts_ns, name, attrs)"},
    {"mark", (PyCFunction)(void (*)(void))cn_mod_mark, METH_FASTCALL | METH_KEYWORDS,
     "mark(name, value, *, kind='point', **attrs)"},
    {"scope", (PyCFunction)(void (*)(void))cn_mod_scope, METH_FASTCALL | METH_KEYWORDS,
     "scope(name, index=None, **attrs)"},
    {"code_scope", (PyCFunction)(void (*)(void))cn_mod_code_scope, METH_FASTCALL | METH_KEYWORDS,
     "code_scope(code, name, index=None, **attrs)"},
    {"code_location", (PyCFunction)cn_mod_code_location, METH_VARARGS,
     "code_location(function, file, line) -> id"},
    {"epochs", (PyCFunction)cn_mod_epochs, METH_O, "epochs(iterable)"},
    {"batches", (PyCFunction)cn_mod_batches, METH_O, "batches(iterable)"},
    {"scoped_iter", (PyCFunction)cn_mod_scoped_iter, METH_VARARGS, "scoped_iter(iterable, name)"},
    {"current_scope", (PyCFunction)cn_mod_current_scope, METH_NOARGS, NULL},
    {"session_begin", (PyCFunction)cn_mod_session_begin, METH_VARARGS, NULL},
    {"session_end", (PyCFunction)cn_mod_session_end, METH_NOARGS, NULL},
    {"session", (PyCFunction)cn_mod_session, METH_NOARGS, NULL},
    {"set_sampler", (PyCFunction)cn_mod_set_sampler, METH_VARARGS, "set_sampler(sample_all, bound)"},
    {"configure", (PyCFunction)(void (*)(void))mod_configure, METH_VARARGS | METH_KEYWORDS, NULL},
    {"drain", (PyCFunction)cn_mod_drain, METH_VARARGS, "drain(max_slots=100000) -> Batch | None"},
    {"free_orphans", (PyCFunction)cn_mod_free_orphans, METH_NOARGS, NULL},
    {"open_span_mark_ids", (PyCFunction)cn_mod_open_span_mark_ids, METH_O,
     "open_span_mark_ids(scope) -> ids given to the open scope's marks so far, or None"},
    {"encode_spool", (PyCFunction)(void (*)(void))cn_mod_encode_spool, METH_VARARGS | METH_KEYWORDS,
     NULL},
    {"write_spool", (PyCFunction)(void (*)(void))cn_mod_write_spool, METH_VARARGS | METH_KEYWORDS,
     NULL},
    {"wait", (PyCFunction)mod_wait, METH_O, NULL},
    {"wake", (PyCFunction)mod_wake, METH_NOARGS, NULL},
    {"watch_signal", (PyCFunction)mod_watch_signal, METH_O, NULL},
    {"signals_received", (PyCFunction)mod_signals_received, METH_O, NULL},
    {"die_by_signal", (PyCFunction)mod_die_by_signal, METH_O, NULL},
    {"progress", (PyCFunction)mod_progress, METH_NOARGS, NULL},
    {"pending", (PyCFunction)mod_pending, METH_NOARGS, NULL},
    {"stats", (PyCFunction)mod_stats, METH_NOARGS, NULL},
    {"name_of", (PyCFunction)mod_name_of, METH_O, NULL},
    {"after_fork_child", (PyCFunction)mod_after_fork_child, METH_NOARGS, NULL},
    {"random_u64", (PyCFunction)mod_random_u64, METH_NOARGS, NULL},
    {"clock_ns", (PyCFunction)mod_clock_ns, METH_NOARGS, "clock_ns() -> the records' clock, ns"},
    {"_clock_shift", (PyCFunction)mod_clock_shift, METH_O, NULL},
    {"clock_info", (PyCFunction)mod_clock_info, METH_VARARGS,
     "clock_info(recalibrate=False) -> the records' clock source and calibration"},
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
    if (PyType_Ready(&cn_Scope_Type) < 0 || PyType_Ready(&cn_ScopeIter_Type) < 0 ||
        PyType_Ready(&cn_Batch_Type) < 0 || PyType_Ready(&cn_OtlpState_Type) < 0 ||
        cn_scope_methods_install() < 0)
        return -1;
    if (pthread_key_create(&cn_state.ring_key, cn_ring_thread_exit) != 0) {
        PyErr_SetString(PyExc_RuntimeError, "cirron_otel: pthread_key_create failed");
        return -1;
    }
    pthread_atfork(atfork_prepare, atfork_parent, atfork_child);
    /* CIRRON_CLOCK=realtime: timestamps from clock_gettime even where the TSC is usable */
    const char *clock = getenv("CIRRON_CLOCK");
    tsc_init(&cn_clock, clock == NULL || strcmp(clock, "realtime") != 0);
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
    if (!cn_state.scope_var || !cn_state.otel_var || !cn_state.name_ids || !cn_state.name_objs ||
        !cn_state.str_point || !cn_state.str_summary || !cn_state.str_kind || !cn_state.str_index ||
        !cn_state.str_item || !cn_state.session_name || !cn_state.epoch_name || !cn_state.batch_name)
        return -1;
    done = 1;
    return 0;
}

static int
native_exec(PyObject *m)
{
    if (native_init_globals() < 0)
        return -1;
    if (PyModule_AddObjectRef(m, "Scope", (PyObject *)&cn_Scope_Type) < 0 ||
        PyModule_AddObjectRef(m, "ScopeIterator", (PyObject *)&cn_ScopeIter_Type) < 0 ||
        PyModule_AddObjectRef(m, "Batch", (PyObject *)&cn_Batch_Type) < 0 ||
        PyModule_AddObjectRef(m, "OtlpState", (PyObject *)&cn_OtlpState_Type) < 0 ||
        PyModule_AddObjectRef(m, "scope_var", cn_state.scope_var) < 0 ||
        PyModule_AddObjectRef(m, "otel_var", cn_state.otel_var) < 0 ||
        PyModule_AddIntConstant(m, "MAX_DEPTH", MAX_DEPTH) < 0 ||
        PyModule_AddIntConstant(m, "STR_VALUE_CAP", STR_VALUE_CAP) < 0)
        return -1;
    /* the mapping's attribute keys (mapping.h), for the Python side */
    static const struct {
        const char *name, *value;
    } keys[] = {
#define KEY_ENTRY(key) {#key, key},
        MAPPING_KEYS(KEY_ENTRY)
#undef KEY_ENTRY
    };
    for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++)
        if (PyModule_AddStringConstant(m, keys[i].name, keys[i].value) < 0)
            return -1;
    return 0;
}

static PyModuleDef_Slot native_slots[] = {
    {Py_mod_exec, native_exec},
#ifdef Py_mod_multiple_interpreters /* 3.12+: the state is process-wide C globals */
    {Py_mod_multiple_interpreters, Py_MOD_MULTIPLE_INTERPRETERS_NOT_SUPPORTED},
#endif
#ifdef Py_mod_gil /* 3.13+: rings, scopes and the drainer rely on the GIL (a free-threaded
                   * interpreter re-enables it, with a RuntimeWarning, when importing us) */
    {Py_mod_gil, Py_MOD_GIL_USED},
#endif
    {0, NULL},
};

static struct PyModuleDef native_module = {
    PyModuleDef_HEAD_INIT, "cirron_otel._native",
    "Native producer side of cirron-otel: rings, scopes, marks, the drainer's claim step, encoders.", 0,
    module_methods, native_slots,
};

PyMODINIT_FUNC
PyInit__native(void)
{
    return PyModuleDef_Init(&native_module);
}

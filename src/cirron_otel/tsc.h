/*
 * tsc.h — wall-clock nanoseconds (CLOCK_REALTIME's epoch) from the invariant TSC.
 *
 * clock_gettime through the vDSO costs ~20 ns; the hot path reads the clock once per mark
 * and twice per scope. On x86-64 with an invariant TSC (cpuid 0x80000007 EDX bit 8: constant
 * rate, runs in every C-state) a timestamp is instead base_ns + (rdtsc - base_tsc) * mult,
 * ~6 ns. The rate comes from two (tsc, realtime) samples at least TSC_MIN_WINDOW_NS apart
 * (refined as the window grows, so it is usable 1 ms after start-up);
 * tsc_recalibrate() re-bases the offset on clock_gettime every time it runs (the drainer
 * calls it each cycle, ~every 50 ms), so drift between re-bases stays far below a
 * microsecond and clock steps (NTP, settimeofday) are followed within one cycle. A reading
 * more than TSC_TRUST_NS past the base (no drainer running) re-bases inline.
 *
 * Elsewhere (other architectures, no invariant TSC, no 128-bit integers, built with
 * -DTSC_DISABLE, or forced with tsc_init(c, 0)) tsc_now() is clock_gettime(CLOCK_REALTIME).
 *
 * Concurrency: the state is written by tsc_recalibrate() and read by tsc_now(); the caller
 * serialises them (cirron_otel: both run with the GIL held), so plain fields suffice.
 * Self-contained: depends on the C library only (the includer enables POSIX clock_gettime,
 * e.g. through Python.h).
 */
#ifndef CIRRON_OTEL_TSC_H
#define CIRRON_OTEL_TSC_H

#include <stdint.h>
#include <time.h>

#if !defined(TSC_DISABLE) && defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && \
    defined(__SIZEOF_INT128__)
#define TSC_SUPPORTED 1
#include <cpuid.h>
#include <x86intrin.h>
#else
#define TSC_SUPPORTED 0
#endif

#if defined(__GNUC__) || defined(__clang__)
#define TSC_LIKELY(x) __builtin_expect(!!(x), 1)
#define TSC_NOINLINE __attribute__((noinline, unused))
#else
#define TSC_LIKELY(x) (x)
#define TSC_NOINLINE
#endif

#define TSC_MIN_WINDOW_NS 1000000LL        /* a first rate after 1 ms: error <~ 3e-5 */
#define TSC_MAX_WINDOW_NS 10000000000LL    /* restart the rate window every 10 s (NTP slews) */
#define TSC_TRUST_NS 1000000000LL          /* extrapolate at most 1 s past the last re-base */
#define TSC_TRUST_WINDOWS 16               /* ... and at most 16 rate windows: the error stays
                                            * <~ 0.5 us while the rate is young (a sample is
                                            * exact to ~15 ns: error 30 ns / window) */
#define TSC_MAX_RATE_CHANGE_PPM 1000       /* a larger change: realtime stepped, start over */

typedef struct {
    /* read by every tsc_now() */
    uint64_t base_tsc;
    int64_t base_ns;
    uint64_t mult;  /* ns per tick, 32.32 fixed point; 0: not calibrated yet */
    uint64_t limit; /* ticks past base_tsc a reading is extrapolated; 0: always the slow path */
    /* calibration */
    int enabled; /* the TSC is used (else: clock_gettime) */
    uint64_t anchor_tsc;
    int64_t anchor_ns; /* 0: no anchor */
    int64_t window_ns; /* the span the rate was measured over */
    uint64_t rebases, restarts;
} tsc_clock_t;

static inline int64_t
tsc_realtime_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

#if TSC_SUPPORTED
/* one (tsc, realtime) pair: the tick count taken as the midpoint of the tightest of a few
 * bracketed clock_gettime calls (a preempted attempt is discarded) */
static inline void
tsc_sample(uint64_t *tsc, int64_t *ns)
{
    uint64_t best = UINT64_MAX;
    for (int i = 0; i < 3; i++) {
        uint64_t t0 = __rdtsc();
        int64_t n = tsc_realtime_ns();
        uint64_t t1 = __rdtsc();
        if (t1 - t0 < best) {
            best = t1 - t0;
            *tsc = t0 + (t1 - t0) / 2;
            *ns = n;
        }
    }
}
#endif

/* Re-base on clock_gettime and refine the rate; returns the realtime just read. */
static TSC_NOINLINE int64_t
tsc_recalibrate(tsc_clock_t *c)
{
#if TSC_SUPPORTED
    if (!c->enabled)
        return tsc_realtime_ns();
    if (c->mult == 0 && c->anchor_ns != 0) {
        /* calibrating: one clock_gettime until the rate window is long enough */
        int64_t now = tsc_realtime_ns();
        if (now >= c->anchor_ns && now - c->anchor_ns < TSC_MIN_WINDOW_NS)
            return now;
    }
    uint64_t t = 0;
    int64_t ns = 0;
    tsc_sample(&t, &ns);
    int64_t span_ns = ns - c->anchor_ns;
    uint64_t span_t = t - c->anchor_tsc;
    if (c->anchor_ns == 0 || span_ns <= 0 || (int64_t)span_t <= 0) {
        /* first sample, or realtime stepped back (or the TSC did): measure anew */
        c->anchor_tsc = t;
        c->anchor_ns = ns;
        c->mult = c->limit = 0;
        return ns;
    }
    if (span_ns >= TSC_MIN_WINDOW_NS) {
        uint64_t m = (uint64_t)(((unsigned __int128)(uint64_t)span_ns << 32) / span_t);
        uint64_t diff = m > c->mult ? m - c->mult : c->mult - m;
        if (c->mult != 0 && diff > c->mult / 1000000 * TSC_MAX_RATE_CHANGE_PPM) {
            /* realtime was stepped within the window: the rate is unusable, start over */
            c->restarts++;
            c->anchor_tsc = t;
            c->anchor_ns = ns;
            c->mult = c->limit = 0;
            return ns;
        }
        c->mult = m;
        c->window_ns = span_ns;
        if (span_ns >= TSC_MAX_WINDOW_NS) {
            c->anchor_tsc = t;
            c->anchor_ns = ns;
        }
    }
    if (c->mult != 0) {
        c->base_tsc = t;
        c->base_ns = ns;
        int64_t trust = c->window_ns < TSC_TRUST_NS / TSC_TRUST_WINDOWS
                            ? c->window_ns * TSC_TRUST_WINDOWS
                            : TSC_TRUST_NS;
        c->limit = (uint64_t)(((unsigned __int128)(uint64_t)trust << 32) / c->mult);
        c->rebases++;
    }
    return ns;
#else
    (void)c;
    return tsc_realtime_ns();
#endif
}

/* Wall-clock ns now. */
static inline int64_t
tsc_now(tsc_clock_t *c)
{
#if TSC_SUPPORTED
    if (TSC_LIKELY(c->limit != 0)) { /* 0: the fallback (no rdtsc) or not calibrated yet */
        uint64_t d = __rdtsc() - c->base_tsc;
        if (TSC_LIKELY(d < c->limit))
            return c->base_ns + (int64_t)(((unsigned __int128)d * c->mult) >> 32);
    }
    return tsc_recalibrate(c);
#else
    (void)c;
    return tsc_realtime_ns();
#endif
}

/* Whether this CPU's TSC is invariant (and the build can read it). */
static inline int
tsc_invariant(void)
{
#if TSC_SUPPORTED
    unsigned a, b, cx, d;
    if (!__get_cpuid(0x80000000u, &a, &b, &cx, &d) || a < 0x80000007u)
        return 0;
    if (!__get_cpuid(0x80000007u, &a, &b, &cx, &d))
        return 0;
    return (d >> 8) & 1;
#else
    return 0;
#endif
}

/* use_tsc: 0 forces clock_gettime. Returns whether the TSC is used. */
static inline int
tsc_init(tsc_clock_t *c, int use_tsc)
{
    *c = (tsc_clock_t){0};
    c->enabled = use_tsc && tsc_invariant();
    if (c->enabled)
        tsc_recalibrate(c); /* the first anchor */
    return c->enabled;
}

#endif /* CIRRON_OTEL_TSC_H */

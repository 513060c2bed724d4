/* Portability helpers shared by the header-only units (buf.h, pb.h, grisu2.h) and native.h. */
#ifndef CIRRON_COMPAT_H
#define CIRRON_COMPAT_H

/* Functions the compiler inlines only by its own judgement are `static` (not `inline`), as they
 * were in the single-file _native.c; unused, they must not warn in a unit that includes this header. */
#if defined(__GNUC__) || defined(__clang__)
#define CIRRON_MAYBE_UNUSED __attribute__((unused))
#else
#define CIRRON_MAYBE_UNUSED
#endif

/* A symbol the units of the extension share: not exported from the shared object, and (with
 * -fPIC) reached directly rather than through the global offset table. */
#if (defined(__GNUC__) || defined(__clang__)) && !defined(_WIN32) && !defined(__CYGWIN__)
#define CN_INTERNAL __attribute__((visibility("hidden")))
#else
#define CN_INTERNAL
#endif

/* A thread-local the hot path reads on every record: the initial-exec model makes it one
 * %fs-relative load instead of a __tls_get_addr call (the default for a shared object). It
 * takes a few bytes of the static TLS surplus glibc keeps for dlopen'ed objects; ELF
 * platforms with GCC or Clang only (elsewhere, or with -DCN_NO_INITIAL_EXEC: the default). */
#if (defined(__GNUC__) || defined(__clang__)) && defined(__ELF__) && !defined(CN_NO_INITIAL_EXEC)
#define CN_TLS_FAST __attribute__((tls_model("initial-exec")))
#else
#define CN_TLS_FAST
#endif

/* A hint that the line at `p` is about to be written: the ring's slots come back to the
 * producer in the drainer's cache, and a store to such a line stalls until the line is ours.
 * GCC emits prefetcht0 unless built for a CPU with prefetchw; on a 2-core Xeon VM both
 * measured the same. No-op without GCC or Clang. */
#if defined(__GNUC__) || defined(__clang__)
#define CN_PREFETCH_WRITE(p) __builtin_prefetch((p), 1, 3)
#else
#define CN_PREFETCH_WRITE(p) ((void)(p))
#endif

#endif /* CIRRON_COMPAT_H */

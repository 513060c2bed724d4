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

#endif /* CIRRON_COMPAT_H */

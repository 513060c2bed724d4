/*
 * buf.h — the growable byte buffer the spool and OTLP encoders write into. Header-only, no
 * Python: a failed allocation sets `oom` and every later write is dropped, so a caller checks
 * `oom` once when it is done. ARRAY_GROW: the same for a malloc'd array of structs.
 */
#ifndef CIRRON_OTEL_BUF_H
#define CIRRON_OTEL_BUF_H

#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "compat.h"

typedef struct {
    char *data;
    size_t len, cap;
    int oom;
} buf_t;

static CIRRON_MAYBE_UNUSED int
buf_grow(buf_t *b, size_t extra)
{
    if (b->oom)
        return -1;
    size_t cap = b->cap ? b->cap : 4096;
    while (cap < b->len + extra)
        cap *= 2;
    char *d = realloc(b->data, cap);
    if (d == NULL) {
        b->oom = 1;
        return -1;
    }
    b->data = d;
    b->cap = cap;
    return 0;
}

static inline int
buf_reserve(buf_t *b, size_t extra)
{
    if (b->len + extra <= b->cap)
        return 0;
    return buf_grow(b, extra);
}

static inline void
buf_put(buf_t *b, const char *s, size_t n)
{
    if (buf_reserve(b, n) < 0)
        return;
    memcpy(b->data + b->len, s, n);
    b->len += n;
}

/* string literals only: sizeof a pointer would be wrong */
#define BUF_LIT(b, s) buf_put((b), ("" s ""), sizeof(s) - 1)

/* Buffers kept between calls for reuse: a fresh multi-MiB buffer's pages fault in on first
 * touch, which on a VM cost more than filling it. At most BUF_POOL_N buffers, each of at
 * most BUF_POOL_KEEP_BYTES (a larger one is freed). */
#define BUF_POOL_N 4
#define BUF_POOL_KEEP_BYTES (8u << 20)
typedef struct {
    buf_t b[BUF_POOL_N];
    uint32_t n;
} buf_pool_t;

/* An empty buffer: a kept one if any (pool may be NULL). */
static CIRRON_MAYBE_UNUSED buf_t
buf_pool_take(buf_pool_t *pool)
{
    return pool != NULL && pool->n > 0 ? pool->b[--pool->n] : (buf_t){0};
}

/* Done with *b: kept emptied, or freed; *b is left empty either way. */
static CIRRON_MAYBE_UNUSED void
buf_pool_give(buf_pool_t *pool, buf_t *b)
{
    if (pool != NULL && pool->n < BUF_POOL_N && !b->oom && b->cap <= BUF_POOL_KEEP_BYTES) {
        b->len = 0;
        pool->b[pool->n++] = *b;
    }
    else
        free(b->data);
    *b = (buf_t){0};
}

static CIRRON_MAYBE_UNUSED void
buf_pool_free(buf_pool_t *pool)
{
    while (pool->n > 0)
        free(pool->b[--pool->n].data);
}

/* Room for one more element in a malloc'd array that doubles (first size `first`).
 * ARRAY_GROW evaluates to 0, or -1 when out of memory (the array is left as it was). */
static CIRRON_MAYBE_UNUSED int
array_grow_impl(void *arrp, size_t *cap, size_t elem, size_t first)
{
    void **arr = (void **)arrp;
    size_t ncap = *cap ? *cap * 2 : first;
    void *grown = realloc(*arr, elem * ncap);
    if (grown == NULL)
        return -1;
    *arr = grown;
    *cap = ncap;
    return 0;
}

#define ARRAY_GROW(arr, cap, used, first) \
    ((size_t)(used) < (cap) ? 0 : array_grow_impl((void *)&(arr), &(cap), sizeof *(arr), (first)))

#endif /* CIRRON_OTEL_BUF_H */

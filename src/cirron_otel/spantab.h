/*
 * spantab.h — an open-addressing hash table of spans keyed by their 128-bit id. Header-only,
 * no Python. Two tables use it: the drainer's open spans (span id -> the mark ids seen so
 * far, drain.c) and the OTLP encoder's (span id -> its encoded events and summaries, otlp.c).
 *
 * The entries are the caller's structs, whose first member is a span_key_t; the table holds
 * pointers to them: the caller allocates an entry before spantab_add and frees (or reuses)
 * it after spantab_remove. Linear probing, at most half full (so a probe always meets an
 * empty slot), deletion by backward shift (no tombstones).
 */
#ifndef CIRRON_OTEL_SPANTAB_H
#define CIRRON_OTEL_SPANTAB_H

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include "compat.h"

typedef struct {
    uint64_t hi, lo;
} span_key_t;

typedef struct {
    span_key_t **slot; /* cap entries, NULL: empty */
    size_t cap, n;     /* cap: 0 or a power of two */
} spantab_t;

static inline size_t
spantab_home(uint64_t hi, uint64_t lo, size_t cap)
{
    return (size_t)((hi ^ (lo * 0x9E3779B97F4A7C15ULL)) & (cap - 1));
}

/* The entry with this key, or NULL. */
static inline span_key_t *
spantab_find(const spantab_t *t, uint64_t hi, uint64_t lo)
{
    if (t->n == 0)
        return NULL;
    size_t mask = t->cap - 1;
    for (size_t i = spantab_home(hi, lo, t->cap);; i = (i + 1) & mask) {
        span_key_t *e = t->slot[i];
        if (e == NULL || (e->hi == hi && e->lo == lo))
            return e;
    }
}

static CIRRON_MAYBE_UNUSED int
spantab_grow(spantab_t *t, size_t first_cap)
{
    size_t ncap = t->cap ? t->cap * 2 : first_cap;
    span_key_t **ns = calloc(ncap, sizeof *ns);
    if (ns == NULL)
        return -1;
    for (size_t k = 0; k < t->cap; k++) {
        span_key_t *e = t->slot[k];
        if (e == NULL)
            continue;
        size_t i = spantab_home(e->hi, e->lo, ncap);
        while (ns[i] != NULL)
            i = (i + 1) & (ncap - 1);
        ns[i] = e;
    }
    free(t->slot);
    t->slot = ns;
    t->cap = ncap;
    return 0;
}

/* Add an entry whose key is not in the table yet; the first table has first_cap slots (a
 * power of two). 0, or -1 when out of memory (the entry is then not added). */
static CIRRON_MAYBE_UNUSED int
spantab_add(spantab_t *t, span_key_t *e, size_t first_cap)
{
    /* a failed growth is tolerated while the table keeps an empty slot */
    if ((t->n + 1) * 2 > t->cap && spantab_grow(t, first_cap) < 0 && t->n + 1 >= t->cap)
        return -1;
    size_t i = spantab_home(e->hi, e->lo, t->cap);
    while (t->slot[i] != NULL)
        i = (i + 1) & (t->cap - 1);
    t->slot[i] = e;
    t->n++;
    return 0;
}

/* Take an entry out of the table (the caller frees it). */
static CIRRON_MAYBE_UNUSED void
spantab_remove(spantab_t *t, const span_key_t *e)
{
    if (t->n == 0)
        return;
    size_t mask = t->cap - 1;
    size_t i = spantab_home(e->hi, e->lo, t->cap);
    while (t->slot[i] != e) {
        if (t->slot[i] == NULL)
            return; /* not in the table */
        i = (i + 1) & mask;
    }
    t->slot[i] = NULL;
    t->n--;
    /* backward shift: move up each later entry of the run that may no longer be reachable
     * from its home slot through the hole at i */
    for (size_t j = (i + 1) & mask; t->slot[j] != NULL; j = (j + 1) & mask) {
        size_t home = spantab_home(t->slot[j]->hi, t->slot[j]->lo, t->cap);
        int stays = i <= j ? (home > i && home <= j) : (home > i || home <= j);
        if (!stays) {
            t->slot[i] = t->slot[j];
            t->slot[j] = NULL;
            i = j;
        }
    }
}

/* Each entry in turn: for (size_t k = 0; k < t.cap; k++) if (t.slot[k]) ... */

/* Free the table itself (not its entries); it is empty and usable again. */
static CIRRON_MAYBE_UNUSED void
spantab_free(spantab_t *t)
{
    free(t->slot);
    t->slot = NULL;
    t->cap = t->n = 0;
}

#endif /* CIRRON_OTEL_SPANTAB_H */

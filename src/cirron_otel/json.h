/*
 * json.h — JSON writers over buf_t (buf.h) for the spool encoder: ids as hex, integers,
 * floats (grisu2.h) and escaped UTF-8 strings. Header-only, no Python.
 */
#ifndef CIRRON_OTEL_JSON_H
#define CIRRON_OTEL_JSON_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "buf.h"
#include "grisu2.h" /* format_f64 */

#include "compat.h"

#if defined(__SSE2__) && !defined(JSON_NO_SIMD)
#include <emmintrin.h>
#endif

/* 16 lowercase hex digits of v, most significant first, without a loop per digit: spread
 * the nibbles one per byte, then add '0' or 'a'-10 to each byte at once. */
static inline void
hex64(char *o, uint64_t v)
{
    for (int half = 0; half < 2; half++) {
        uint64_t x = half ? (v & 0xFFFFFFFFu) : (v >> 32);
        x = ((x & 0xFFFF0000u) << 16) | (x & 0xFFFFu);
        x = ((x & 0x0000FF000000FF00ULL) << 8) | (x & 0x000000FF000000FFULL);
        x = ((x & 0x00F000F000F000F0ULL) << 4) | (x & 0x000F000F000F000FULL);
        uint64_t letters = ((x + 0x0606060606060606ULL) >> 4) & 0x0101010101010101ULL;
        x += 0x3030303030303030ULL + letters * 0x27;
        /* byte i holds nibble i (least significant first): store most significant first */
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__ && defined(__GNUC__)
        x = __builtin_bswap64(x);
        memcpy(o + half * 8, &x, 8);
#elif defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        memcpy(o + half * 8, &x, 8);
#else
        for (int i = 0; i < 8; i++)
            o[half * 8 + i] = (char)(x >> (8 * (7 - i)));
#endif
    }
}

/* 32 lowercase hex digits of the 128-bit id hi:lo, most significant first (the spool's and
 * OTLP JSON's ids). With SSE2 (every x86-64) one register does all 16 bytes: split each byte
 * into its two nibbles, interleave them, and turn each into '0'-'9' / 'a'-'f' at once; ~20
 * instructions where hex64 twice takes ~90, on the 3 ids of every spool record. */
static inline void
hex128(char *o, uint64_t hi, uint64_t lo)
{
#if defined(__SSE2__) && !defined(JSON_NO_SIMD) && defined(__GNUC__) && defined(__BYTE_ORDER__) && \
    __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    /* memory order = output order: hi's most significant byte first */
    __m128i v = _mm_set_epi64x((long long)__builtin_bswap64(lo), (long long)__builtin_bswap64(hi));
    const __m128i low4 = _mm_set1_epi8(0x0f);
    __m128i hin = _mm_and_si128(_mm_srli_epi16(v, 4), low4);
    __m128i lon = _mm_and_si128(v, low4);
    __m128i a = _mm_unpacklo_epi8(hin, lon), b = _mm_unpackhi_epi8(hin, lon);
    const __m128i zero = _mm_set1_epi8('0'), nine = _mm_set1_epi8(9), gap = _mm_set1_epi8('a' - '0' - 10);
    a = _mm_add_epi8(_mm_add_epi8(a, zero), _mm_and_si128(_mm_cmpgt_epi8(a, nine), gap));
    b = _mm_add_epi8(_mm_add_epi8(b, zero), _mm_and_si128(_mm_cmpgt_epi8(b, nine), gap));
    _mm_storeu_si128((__m128i *)o, a);
    _mm_storeu_si128((__m128i *)(o + 16), b);
#else
    hex64(o, hi);
    hex64(o + 16, lo);
#endif
}

static inline void
buf_id(buf_t *b, uint64_t hi, uint64_t lo)
{
    if (buf_reserve(b, 34) < 0)
        return;
    char *o = b->data + b->len;
    o[0] = '"';
    hex128(o + 1, hi, lo);
    o[33] = '"';
    b->len += 34;
}

static const char DIGIT_PAIRS[] =
    "00010203040506070809101112131415161718192021222324252627282930313233343536373839"
    "40414243444546474849505152535455565758596061626364656667686970717273747576777879"
    "8081828384858687888990919293949596979899";

/* the 8 digits of v < 10^8, zero-padded, ending at p (32-bit arithmetic: cheaper than 64) */
static inline char *
put8(char *p, uint32_t v)
{
    for (int i = 0; i < 4; i++) {
        uint32_t r = v % 100;
        v /= 100;
        p -= 2;
        memcpy(p, DIGIT_PAIRS + 2 * r, 2);
    }
    return p;
}

static inline void
buf_i64(buf_t *b, int64_t v)
{
    char tmp[24];
    char *end = tmp + sizeof tmp, *p = end;
    uint64_t u = v < 0 ? (uint64_t)0 - (uint64_t)v : (uint64_t)v;
    /* nanosecond timestamps have 19 digits: take them 8 at a time in 32-bit arithmetic
     * (one 64-bit division per 8 digits instead of one per 2) */
    while (u >= 100000000u) {
        p = put8(p, (uint32_t)(u % 100000000u));
        u /= 100000000u;
    }
    uint32_t w = (uint32_t)u;
    while (w >= 100) {
        uint32_t r = w % 100;
        w /= 100;
        p -= 2;
        memcpy(p, DIGIT_PAIRS + 2 * r, 2);
    }
    if (w >= 10) {
        p -= 2;
        memcpy(p, DIGIT_PAIRS + 2 * w, 2);
    }
    else {
        *--p = (char)('0' + w);
    }
    if (v < 0)
        *--p = '-';
    buf_put(b, p, (size_t)(end - p));
}

/* Timestamps of one file are close together: their digits above the last 8 rarely change.
 * buf_ts keeps the last ones formatted and writes only the low 8 anew (~60 instructions
 * against ~170 for buf_i64 on a 19-digit value). One cache per encoder call. */
typedef struct {
    uint64_t head; /* v / 10^8 of the last timestamp written */
    uint32_t len;  /* 0: nothing cached yet */
    char digits[12];
} ts_cache_t;

static CIRRON_MAYBE_UNUSED void
buf_ts(buf_t *b, int64_t v, ts_cache_t *c)
{
    if (v < 100000000) { /* negative or short: no head */
        buf_i64(b, v);
        return;
    }
    uint64_t u = (uint64_t)v, head = u / 100000000u;
    if (c->len == 0 || head != c->head) {
        char tmp[24], *end = tmp + sizeof tmp, *p = end;
        uint64_t h = head; /* at most 11 digits (v < 2^63) */
        do {
            *--p = (char)('0' + h % 10);
            h /= 10;
        } while (h);
        c->len = (uint32_t)(end - p);
        memcpy(c->digits, p, c->len);
        c->head = head;
    }
    if (buf_reserve(b, c->len + 8) < 0)
        return;
    memcpy(b->data + b->len, c->digits, c->len);
    put8(b->data + b->len + c->len + 8, (uint32_t)(u % 100000000u));
    b->len += c->len + 8;
}

/* format_f64() (Grisu2): grisu2.h */

static CIRRON_MAYBE_UNUSED void
buf_f64(buf_t *b, double d)
{
    if (buf_reserve(b, 32) < 0)
        return;
    b->len += (size_t)format_f64(d, b->data + b->len);
}

static CIRRON_MAYBE_UNUSED int
json_escape_utf8(buf_t *b, const char *s, size_t n)
{
    if (buf_reserve(b, n + 2) < 0)
        return -1;
    b->data[b->len++] = '"';
    size_t start = 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c >= 0x20 && c != '"' && c != '\\')
            continue;
        buf_put(b, s + start, i - start);
        char esc[8];
        switch (c) {
        case '"': buf_put(b, "\\\"", 2); break;
        case '\\': buf_put(b, "\\\\", 2); break;
        case '\n': buf_put(b, "\\n", 2); break;
        case '\r': buf_put(b, "\\r", 2); break;
        case '\t': buf_put(b, "\\t", 2); break;
        default:
            snprintf(esc, sizeof esc, "\\u%04x", c);
            buf_put(b, esc, 6);
        }
        start = i + 1;
    }
    buf_put(b, s + start, n - start);
    BUF_LIT(b, "\"");
    return b->oom ? -1 : 0;
}

#endif /* CIRRON_OTEL_JSON_H */

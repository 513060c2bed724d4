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

static inline void
buf_id(buf_t *b, uint64_t hi, uint64_t lo)
{
    if (buf_reserve(b, 34) < 0)
        return;
    char *o = b->data + b->len;
    o[0] = '"';
    hex64(o + 1, hi);
    hex64(o + 17, lo);
    o[33] = '"';
    b->len += 34;
}

static const char DIGIT_PAIRS[] =
    "00010203040506070809101112131415161718192021222324252627282930313233343536373839"
    "40414243444546474849505152535455565758596061626364656667686970717273747576777879"
    "8081828384858687888990919293949596979899";

static inline void
buf_i64(buf_t *b, int64_t v)
{
    char tmp[24];
    char *end = tmp + sizeof tmp, *p = end;
    uint64_t u = v < 0 ? (uint64_t)0 - (uint64_t)v : (uint64_t)v;
    while (u >= 100) {
        unsigned r = (unsigned)(u % 100);
        u /= 100;
        p -= 2;
        memcpy(p, DIGIT_PAIRS + 2 * r, 2);
    }
    if (u >= 10) {
        p -= 2;
        memcpy(p, DIGIT_PAIRS + 2 * u, 2);
    }
    else {
        *--p = (char)('0' + u);
    }
    if (v < 0)
        *--p = '-';
    buf_put(b, p, (size_t)(end - p));
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

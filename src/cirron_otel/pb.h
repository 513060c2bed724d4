/*
 * pb.h — protobuf wire-format writers over buf_t (buf.h). Header-only, no Python: they
 * know wire types, tags and length prefixes, not the OTLP messages built from them.
 */
#ifndef CIRRON_OTEL_PB_H
#define CIRRON_OTEL_PB_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "buf.h"

#include "compat.h"

enum { WT_VARINT = 0, WT_I64 = 1, WT_LEN = 2, WT_I32 = 5 };

static inline void
pb_varint(buf_t *b, uint64_t v)
{
    if (buf_reserve(b, 10) < 0)
        return;
    while (v >= 0x80) {
        b->data[b->len++] = (char)(v | 0x80);
        v >>= 7;
    }
    b->data[b->len++] = (char)v;
}

static inline void
pb_tag(buf_t *b, int field, int wt)
{
    pb_varint(b, ((uint64_t)field << 3) | (uint64_t)wt);
}

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define PB_LITTLE_ENDIAN 1 /* protobuf's fixed-width fields are little-endian: copy as is */
#else
#define PB_LITTLE_ENDIAN 0
#endif

static inline void
pb_fixed(buf_t *b, uint64_t v, int nbytes)
{
    if (buf_reserve(b, 8) < 0)
        return;
#if PB_LITTLE_ENDIAN
    memcpy(b->data + b->len, &v, 8); /* room for 8 reserved; the length counts nbytes */
    b->len += (size_t)nbytes;
#else
    for (int i = 0; i < nbytes; i++)
        b->data[b->len++] = (char)(v >> (8 * i));
#endif
}

static inline void
pb_bytes(buf_t *b, int field, const void *p, size_t n)
{
    pb_tag(b, field, WT_LEN);
    pb_varint(b, n);
    buf_put(b, p, n);
}

static CIRRON_MAYBE_UNUSED void
pb_id(buf_t *b, int field, uint64_t hi, uint64_t lo, int nbytes)
{
    unsigned char raw[16]; /* big-endian: the id's hex, read as bytes */
#if PB_LITTLE_ENDIAN && defined(__GNUC__)
    uint64_t h = __builtin_bswap64(hi), l = __builtin_bswap64(lo);
    memcpy(raw, &h, 8);
    memcpy(raw + 8, &l, 8);
#else
    for (int i = 0; i < 8; i++) {
        raw[i] = (unsigned char)(hi >> (56 - 8 * i));
        raw[8 + i] = (unsigned char)(lo >> (56 - 8 * i));
    }
#endif
    pb_bytes(b, field, raw, (size_t)nbytes);
}

/* Scalar fields: tag and value. An int64 goes as its two's complement (protobuf's int64). */
static inline void
pb_varint_field(buf_t *b, int field, uint64_t v)
{
    pb_tag(b, field, WT_VARINT);
    pb_varint(b, v);
}

static inline void
pb_fixed64_field(buf_t *b, int field, uint64_t v)
{
    pb_tag(b, field, WT_I64);
    pb_fixed(b, v, 8);
}

static inline void
pb_fixed32_field(buf_t *b, int field, uint32_t v)
{
    pb_tag(b, field, WT_I32);
    pb_fixed(b, v, 4);
}

static inline void
pb_double_field(buf_t *b, int field, double d)
{
    uint64_t bits;
    memcpy(&bits, &d, 8);
    pb_fixed64_field(b, field, bits);
}

/* A string literal as a bytes/string field (its length counted by the compiler). */
#define PB_LIT(b, field, s) pb_bytes((b), (field), ("" s ""), sizeof(s) - 1)

/* Nested message: reserve one byte for its length, which pb_end fills in. Most nested
 * messages (KeyValue, AnyValue, Event) are under 128 bytes, so their length fits and nothing
 * moves; a longer one is moved right once to make room (reserving 5 bytes and moving every
 * message left at its end cost ~420 instructions a record in memmove).
 * pb_begin_untagged: the same without the field tag, [varint len][message], for messages
 * kept encoded until they are spliced into a repeated field (pb_splice_kvs). */
/* `n` bytes reserved for a length; returns where the body begins */
static inline size_t
pb_reserve_len(buf_t *b, size_t n)
{
    if (buf_reserve(b, n) < 0)
        return b->len;
    b->len += n;
    return b->len;
}

static inline size_t
pb_begin_untagged(buf_t *b)
{
    return pb_reserve_len(b, 1);
}

static inline size_t
pb_begin(buf_t *b, int field)
{
    pb_tag(b, field, WT_LEN);
    return pb_reserve_len(b, 1);
}

/* pb_end's rare case, out of line: the length needs more than the `reserved` bytes; move
 * the body right */
static CIRRON_MAYBE_UNUSED void
pb_end_long(buf_t *b, size_t body, size_t n, size_t reserved)
{
    unsigned char tmp[10];
    size_t k = 0;
    size_t v = n;
    do {
        tmp[k] = (unsigned char)(v & 0x7F);
        v >>= 7;
        if (v)
            tmp[k] |= 0x80;
        k++;
    } while (v);
    if (buf_reserve(b, k - reserved) < 0)
        return;
    memmove(b->data + body + k - reserved, b->data + body, n);
    memcpy(b->data + body - reserved, tmp, k);
    b->len += k - reserved;
}

static inline void
pb_end(buf_t *b, size_t body)
{
    if (b->oom)
        return;
    size_t n = b->len - body;
    if (n < 0x80)
        b->data[body - 1] = (char)n;
    else
        pb_end_long(b, body, n, 1);
}

/* A nested message that is usually 128 bytes to 16 KiB long (a span with its events, an
 * event with a mark's three attributes): two length bytes reserved, so only a shorter one
 * (moved left a byte) or a longer one moves. */
static inline size_t
pb_begin2(buf_t *b, int field)
{
    pb_tag(b, field, WT_LEN);
    return pb_reserve_len(b, 2);
}

static inline void
pb_end2(buf_t *b, size_t body)
{
    if (b->oom)
        return;
    size_t n = b->len - body;
    if (n >= 0x80 && n < 0x4000) {
        b->data[body - 2] = (char)((n & 0x7F) | 0x80);
        b->data[body - 1] = (char)(n >> 7);
    }
    else if (n < 0x80) {
        b->data[body - 2] = (char)n;
        memmove(b->data + body - 1, b->data + body, n);
        b->len -= 1;
    }
    else
        pb_end_long(b, body, n, 2);
}

/* Outer messages written last, in front of their body: a request's ResourceSpans and
 * ScopeSpans wrap all of it, so closing them with pb_end would move the whole request, twice.
 * Instead the body is written after a gap (PB_FRONT_ROOM for each varint and tag, plus the
 * fields that precede it), and its headers are then written right to left into the gap:
 * `at` is where the bytes written so far begin; each call returns the new start. */
#define PB_FRONT_ROOM 16 /* a tag (a field number under 16: one byte) and a 64-bit varint, with room to spare */

static inline size_t
pb_front_varint(char *data, size_t at, uint64_t v)
{
    size_t k = 1;
    for (uint64_t t = v; t >= 0x80; t >>= 7)
        k++;
    at -= k;
    for (size_t i = 0; i < k; i++, v >>= 7)
        data[at + i] = (char)((v & 0x7F) | (i + 1 < k ? 0x80 : 0));
    return at;
}

static inline size_t
pb_front_tag(char *data, size_t at, int field, int wt)
{
    return pb_front_varint(data, at, ((uint64_t)field << 3) | (uint64_t)wt);
}

/* [tag][len] in front of the `n` bytes that begin at `at`: a nested message or bytes field */
static inline size_t
pb_front_len(char *data, size_t at, int field, size_t n)
{
    return pb_front_tag(data, pb_front_varint(data, at, n), field, WT_LEN);
}

/* a bytes field (tag, length, content) in front of `at` */
static inline size_t
pb_front_bytes(char *data, size_t at, int field, const void *p, size_t n)
{
    at -= n;
    memcpy(data + at, p, n);
    return pb_front_len(data, at, field, n);
}

/* Splice pre-rendered KeyValues [varint len][KeyValue]... as repeated `field`; at most max. */
static CIRRON_MAYBE_UNUSED uint32_t
pb_splice_kvs(buf_t *b, int field, const char *p, size_t n, uint32_t max)
{
    size_t off = 0;
    uint32_t count = 0;
    while (off < n && count < max) {
        uint64_t len = 0;
        int shift = 0;
        while (off < n) {
            unsigned char c = (unsigned char)p[off++];
            len |= (uint64_t)(c & 0x7F) << shift;
            shift += 7;
            if (!(c & 0x80))
                break;
        }
        pb_bytes(b, field, p + off, (size_t)len);
        off += (size_t)len;
        count++;
    }
    return count;
}

#endif /* CIRRON_OTEL_PB_H */

/*
 * render.c — the drainer's GIL pass over a record's Python objects: attribute values
 * rendered as the spool's JSON and as OTLP KeyValues (within the configured limits), never
 * raising whatever the object.
 */
#include "native.h"

#include <math.h>
#include <stdlib.h>

#include "json.h"
#include "mapping.h" /* field numbers */
#include "pb.h"

/* ======================================================================================
 * JSON, by the spool's attrs rule
 * ==================================================================================== */

/* GIL held. A str as a JSON string, at most `cap` UTF-8 bytes (0: no cap), cut on a
 * character boundary. Lone surrogates become backslash escapes rather than errors. */
static void
json_pystr(buf_t *b, PyObject *s, Py_ssize_t cap)
{
    Py_ssize_t n;
    const char *u = PyUnicode_AsUTF8AndSize(s, &n);
    PyObject *enc = NULL;
    if (u == NULL) {
        PyErr_Clear();
        enc = PyUnicode_AsEncodedString(s, "utf-8", "backslashreplace");
        if (enc == NULL) {
            PyErr_Clear();
            BUF_LIT(b, "\"<unencodable>\"");
            return;
        }
        u = PyBytes_AS_STRING(enc);
        n = PyBytes_GET_SIZE(enc);
    }
    if (cap > 0 && n > cap) {
        n = cap;
        while (n > 0 && ((unsigned char)u[n] & 0xC0) == 0x80)
            n--;
    }
    json_escape_utf8(b, u, n);
    Py_XDECREF(enc);
}

static void
json_str_of(buf_t *b, PyObject *o)
{
    /* str(o), never raising */
    PyObject *s = PyObject_Str(o);
    if (s == NULL) {
        PyErr_Clear();
        BUF_LIT(b, "\"<unserializable>\"");
        return;
    }
    json_pystr(b, s, 0);
    Py_DECREF(s);
}

typedef struct {
    PyObject *items[ATTR_MAX_DEPTH + 1];
    int n;
} seen_t;

/* GIL held. A dict key as the UTF-8 bytes it is written as: a str as is, anything else its
 * str(); lone surrogates backslash-escaped. New reference; NULL only when out of memory. */
static PyObject *
key_utf8(PyObject *key)
{
    PyObject *str = PyUnicode_Check(key) ? Py_NewRef(key) : PyObject_Str(key);
    PyObject *enc = str ? PyUnicode_AsEncodedString(str, "utf-8", "backslashreplace") : NULL;
    Py_XDECREF(str);
    if (enc == NULL) {
        PyErr_Clear();
        enc = PyBytes_FromString("<unserializable>");
    }
    return enc;
}

/* GIL held. Which keys of a dict's item list to leave out so that no two are written alike
 * (str(1) and "1" are both "1"; JSON objects and OpenTelemetry attributes need unique
 * keys): a str key wins over a non-str key written the same, otherwise the first in the
 * dict's order wins. NULL: keep all, the usual case of plain str keys, which a dict keeps
 * distinct (a lone surrogate could still collide with its escaped spelling: checked). */
static char *
dup_key_mask(PyObject *items)
{
    Py_ssize_t n = PyList_GET_SIZE(items);
    int plain = 1;
    for (Py_ssize_t i = 0; i < n && plain; i++) {
        PyObject *k = PyTuple_GET_ITEM(PyList_GET_ITEM(items, i), 0);
        plain = PyUnicode_CheckExact(k) && (PyUnicode_IS_ASCII(k) || PyUnicode_AsUTF8AndSize(k, NULL));
    }
    PyErr_Clear();
    if (plain || n < 2)
        return NULL;
    char *skip = calloc((size_t)n, 1);
    PyObject **tok = calloc((size_t)n, sizeof(PyObject *));
    PyObject *strs = PySet_New(NULL), *seen = PySet_New(NULL);
    int ok = skip && tok && strs && seen;
    for (Py_ssize_t i = 0; i < n && ok; i++) {
        PyObject *k = PyTuple_GET_ITEM(PyList_GET_ITEM(items, i), 0);
        ok = (tok[i] = key_utf8(k)) != NULL && (!PyUnicode_Check(k) || PySet_Add(strs, tok[i]) == 0);
    }
    for (Py_ssize_t i = 0; i < n && ok; i++) {
        PyObject *k = PyTuple_GET_ITEM(PyList_GET_ITEM(items, i), 0);
        int dup = PySet_Contains(seen, tok[i]);
        if (dup == 0 && !PyUnicode_Check(k))
            dup = PySet_Contains(strs, tok[i]);
        if (dup < 0 || (dup == 0 && PySet_Add(seen, tok[i]) < 0))
            ok = 0;
        skip[i] = dup > 0;
    }
    for (Py_ssize_t i = 0; tok && i < n; i++)
        Py_XDECREF(tok[i]);
    free(tok);
    Py_XDECREF(strs);
    Py_XDECREF(seen);
    if (!ok) { /* out of memory: write every key rather than fail */
        PyErr_Clear();
        free(skip);
        return NULL;
    }
    return skip;
}

static void json_value(buf_t *b, PyObject *o, seen_t *seen);

static void
json_float_attr(buf_t *b, double d)
{
    if (isnan(d))
        BUF_LIT(b, "\"nan\"");
    else if (isinf(d))
        d > 0 ? BUF_LIT(b, "\"inf\"") : BUF_LIT(b, "\"-inf\"");
    else {
        char *r = PyOS_double_to_string(d, 'r', 0, Py_DTSF_ADD_DOT_0, NULL);
        if (r == NULL) {
            PyErr_Clear();
            buf_f64(b, d);
            return;
        }
        buf_put(b, r, strlen(r));
        PyMem_Free(r);
    }
}

/* GIL held. Render an object as JSON by the spool's attrs rule; never raises. */
static void
json_value(buf_t *b, PyObject *o, seen_t *seen)
{
    if (o == Py_None) {
        BUF_LIT(b, "null");
        return;
    }
    if (PyBool_Check(o)) {
        o == Py_True ? BUF_LIT(b, "true") : BUF_LIT(b, "false");
        return;
    }
    if (PyLong_Check(o)) {
        int overflow = 0;
        long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
        if (!overflow && !(v == -1 && PyErr_Occurred())) {
            buf_i64(b, v);
            return;
        }
        PyErr_Clear();
        PyObject *s = PyLong_Type.tp_repr(o);
        if (s != NULL) {
            Py_ssize_t n;
            const char *u = PyUnicode_AsUTF8AndSize(s, &n);
            if (u)
                buf_put(b, u, (size_t)n);
            Py_DECREF(s);
            if (u)
                return;
        }
        PyErr_Clear();
        json_str_of(b, o);
        return;
    }
    if (PyFloat_Check(o)) {
        json_float_attr(b, PyFloat_AS_DOUBLE(o));
        return;
    }
    if (PyUnicode_Check(o)) {
        json_pystr(b, o, 0);
        return;
    }
    int is_dict = PyDict_Check(o), is_seq = PyList_Check(o) || PyTuple_Check(o);
    if (is_dict || is_seq) {
        int cyclic = 0;
        for (int i = 0; i < seen->n; i++)
            if (seen->items[i] == o)
                cyclic = 1;
        if (cyclic || seen->n >= ATTR_MAX_DEPTH) {
            json_str_of(b, o);
            return;
        }
        PyObject *items = is_dict ? PyDict_Items(o) : PySequence_List(o);
        if (items == NULL) {
            PyErr_Clear();
            json_str_of(b, o);
            return;
        }
        seen->items[seen->n++] = o;
        buf_put(b, is_dict ? "{" : "[", 1);
        Py_ssize_t n = PyList_GET_SIZE(items);
        char *skip = is_dict ? dup_key_mask(items) : NULL;
        int first = 1;
        for (Py_ssize_t i = 0; i < n; i++) {
            if (skip && skip[i])
                continue;
            if (!first)
                BUF_LIT(b, ",");
            first = 0;
            PyObject *it = PyList_GET_ITEM(items, i);
            if (is_dict) {
                PyObject *k = PyTuple_GET_ITEM(it, 0);
                if (PyUnicode_Check(k))
                    json_pystr(b, k, 0);
                else
                    json_str_of(b, k);
                BUF_LIT(b, ":");
                json_value(b, PyTuple_GET_ITEM(it, 1), seen);
            }
            else {
                json_value(b, it, seen);
            }
        }
        buf_put(b, is_dict ? "}" : "]", 1);
        free(skip);
        seen->n--;
        Py_DECREF(items);
        return;
    }
    if (cn_numpy_types_ready() && PyObject_IsInstance(o, cn_state.numpy_generic) == 1) {
        coerced_t cv;
        cv.str = NULL;
        if (cn_coerce_value_slow(o, &cv, 0) == 0) {
            switch (cv.vtype) {
            case VT_FLOAT: json_float_attr(b, cv.v.d); return;
            case VT_INT: buf_i64(b, cv.v.i); return;
            case VT_BOOL: cv.v.i ? BUF_LIT(b, "true") : BUF_LIT(b, "false"); return;
            default: json_pystr(b, cv.str, 0); Py_DECREF(cv.str); return;
            }
        }
    }
    PyErr_Clear();
    json_str_of(b, o);
}

/* ======================================================================================
 * OTLP AnyValues and KeyValues
 * ==================================================================================== */

/* GIL held. One value as an OTLP AnyValue body (inside an open field). Returns 0, or -1
 * for a value an attribute cannot hold at all (None), which is then left out. */
static void otlp_str_value(buf_t *a, PyObject *str);

static int
otlp_scalar(buf_t *a, PyObject *v)
{
    if (PyBool_Check(v)) {
        pb_varint_field(a, ANY_VALUE_BOOL, v == Py_True);
        return 0;
    }
    if (PyLong_Check(v)) {
        int overflow = 0;
        long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
        if (!overflow && !(x == -1 && PyErr_Occurred())) {
            pb_varint_field(a, ANY_VALUE_INT, (uint64_t)x);
            return 0;
        }
        PyErr_Clear();
        return 1;
    }
    if (PyFloat_Check(v)) {
        pb_double_field(a, ANY_VALUE_DOUBLE, PyFloat_AS_DOUBLE(v));
        return 0;
    }
    if (PyUnicode_Check(v)) {
        otlp_str_value(a, v);
        return 0;
    }
    return 1;
}

static void
otlp_str_value(buf_t *a, PyObject *str)
{
    PyObject *enc = PyUnicode_AsEncodedString(str, "utf-8", "backslashreplace");
    if (enc == NULL) {
        PyErr_Clear();
        PB_LIT(a, ANY_VALUE_STRING, "<unencodable>");
        return;
    }
    const char *u = PyBytes_AS_STRING(enc);
    pb_bytes(a, ANY_VALUE_STRING, u, limited_utf8(u, (size_t)PyBytes_GET_SIZE(enc)));
    Py_DECREF(enc);
}

static void
otlp_any_value(buf_t *a, PyObject *v)
{
    coerced_t cv = {.str = NULL};
    if (!(PyBool_Check(v) || PyLong_Check(v) || PyFloat_Check(v) || PyUnicode_Check(v)) &&
        cn_numpy_types_ready() && PyObject_IsInstance(v, cn_state.numpy_generic) == 1 &&
        cn_coerce_value_slow(v, &cv, 0) == 0) {
        PyObject *conv = cv.str ? cv.str
                         : cv.vtype == VT_FLOAT ? PyFloat_FromDouble(cv.v.d)
                         : cv.vtype == VT_BOOL  ? PyBool_FromLong((long)cv.v.i)
                                                : PyLong_FromLongLong(cv.v.i);
        if (conv) {
            otlp_scalar(a, conv);
            Py_DECREF(conv);
            return;
        }
    }
    PyErr_Clear();
    if (otlp_scalar(a, v) == 0)
        return;
    if (PyList_Check(v) || PyTuple_Check(v)) {
        /* a homogeneous sequence of primitives is an array; anything else its str() */
        Py_ssize_t n = PySequence_Fast_GET_SIZE(v);
        PyObject **items = PySequence_Fast_ITEMS(v);
        PyTypeObject *t0 = n ? Py_TYPE(items[0]) : NULL;
        int ok = 1;
        for (Py_ssize_t k = 0; k < n && ok; k++)
            ok = Py_TYPE(items[k]) == t0 && (t0 == &PyUnicode_Type || t0 == &PyBool_Type ||
                                             t0 == &PyLong_Type || t0 == &PyFloat_Type);
        if (ok) {
            size_t arr = pb_begin(a, ANY_VALUE_ARRAY);
            for (Py_ssize_t k = 0; k < n; k++) {
                size_t el = pb_begin(a, ARRAY_VALUE_VALUES);
                if (otlp_scalar(a, items[k]) != 0) {
                    PyObject *str = PyObject_Str(items[k]);
                    if (str) {
                        otlp_str_value(a, str);
                        Py_DECREF(str);
                    }
                    PyErr_Clear();
                }
                pb_end(a, el);
            }
            pb_end(a, arr);
            return;
        }
    }
    PyObject *str = PyObject_Str(v);
    if (str == NULL) {
        PyErr_Clear();
        PB_LIT(a, ANY_VALUE_STRING, "<unserializable>");
        return;
    }
    otlp_str_value(a, str);
    Py_DECREF(str);
}

/* GIL held. A dict as [varint len][KeyValue]... (no field tags: the encoder adds them for
 * span attributes or event attributes), at most `limit` entries. span_error: the attrs of
 * a span in error, whose Cirron keys `error` and `error.message` the status carries (its
 * `error.type` stays, a semantic-conventions attribute). */
void
cn_otlp_attrs(buf_t *a, PyObject *dict, uint32_t limit, uint32_t *n, uint32_t *dropped, int span_error)
{
    PyObject *items = PyDict_Items(dict);
    *n = *dropped = 0;
    if (items == NULL) {
        PyErr_Clear();
        return;
    }
    char *skip = dup_key_mask(items); /* the same key as the spool keeps */
    for (Py_ssize_t k = 0; k < PyList_GET_SIZE(items); k++) {
        if (skip && skip[k])
            continue;
        PyObject *kv = PyList_GET_ITEM(items, k);
        PyObject *key = PyTuple_GET_ITEM(kv, 0), *val = PyTuple_GET_ITEM(kv, 1);
        if (val == Py_None)
            continue; /* OpenTelemetry attributes cannot be null */
        if (span_error && PyUnicode_Check(key) &&
            (PyUnicode_CompareWithASCIIString(key, "error") == 0 ||
             PyUnicode_CompareWithASCIIString(key, "error.message") == 0))
            continue;
        if (*n >= limit) {
            (*dropped)++;
            continue;
        }
        size_t body = pb_begin_untagged(a); /* [varint len][KeyValue] */
        PyObject *kenc = key_utf8(key);
        if (kenc) {
            pb_bytes(a, KEY_VALUE_KEY, PyBytes_AS_STRING(kenc), (size_t)PyBytes_GET_SIZE(kenc));
            Py_DECREF(kenc);
        }
        PyErr_Clear();
        size_t av = pb_begin(a, KEY_VALUE_VALUE);
        otlp_any_value(a, val);
        pb_end(a, av);
        pb_end(a, body);
        (*n)++;
    }
    free(skip);
    Py_DECREF(items);
}

/* GIL held. An object as JSON by the spool's attrs rule; never raises. */
void
cn_render_json(buf_t *b, PyObject *o)
{
    seen_t seen = {.n = 0};
    json_value(b, o, &seen);
}

/*
 * kvray._speedups: the write path's inner loops in C (see kvray/core/fast.py).
 *
 * Every function here has a pure-Python twin in kvray/core/fast.py with the same results; the
 * tests compare the two on random inputs. Nothing here trusts its input: malformed msgpack or
 * out-of-range values raise ValueError / OverflowError / TypeError, never read out of bounds.
 *
 * Hashing is xxHash's XXH3-64 with a seed (vendored xxhash.h, BSD-2-Clause, the same code the
 * `xxhash` PyPI package wraps), so keys equal `xxhash.xxh3_64_intdigest(data, seed)`.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define XXH_INLINE_ALL
#include "xxhash.h"

/* --- msgpack: an array of unsigned ints < 2^32 ------------------------------------------ */

static int
mp_array_head(const unsigned char **pp, const unsigned char *end, Py_ssize_t *n)
{
    const unsigned char *p = *pp;
    if (p >= end)
        return -1;
    unsigned char b = *p++;
    if (b >= 0x90 && b <= 0x9f) {
        *n = b & 0x0f;
    }
    else if (b == 0xdc) {
        if (end - p < 2)
            return -1;
        *n = ((Py_ssize_t)p[0] << 8) | p[1];
        p += 2;
    }
    else if (b == 0xdd) {
        if (end - p < 4)
            return -1;
        *n = ((Py_ssize_t)p[0] << 24) | ((Py_ssize_t)p[1] << 16) | ((Py_ssize_t)p[2] << 8) | p[3];
        p += 4;
    }
    else {
        return -1;
    }
    *pp = p;
    return 0;
}

static inline uint64_t
be(const unsigned char *p, int n)
{
    uint64_t v = 0;
    for (int i = 0; i < n; i++)
        v = (v << 8) | p[i];
    return v;
}

/* One msgpack integer in [0, 2^32), in any of msgpack's int encodings. */
static inline int
mp_u32(const unsigned char **pp, const unsigned char *end, uint32_t *out)
{
    const unsigned char *p = *pp;
    if (p >= end)
        return -1;
    unsigned char b = *p++;
    uint64_t v;
    int n = 0;
    int is_signed = 0;
    if (b <= 0x7f) {
        *out = b;
        *pp = p;
        return 0;
    }
    switch (b) {
    case 0xcc: n = 1; break;
    case 0xcd: n = 2; break;
    case 0xce: n = 4; break;
    case 0xcf: n = 8; break;
    case 0xd0: n = 1; is_signed = 1; break;
    case 0xd1: n = 2; is_signed = 1; break;
    case 0xd2: n = 4; is_signed = 1; break;
    case 0xd3: n = 8; is_signed = 1; break;
    default: return -1;
    }
    if (end - p < n)
        return -1;
    if (is_signed && (p[0] & 0x80))
        return -1; /* negative */
    v = be(p, n);
    if (v > 0xFFFFFFFFull)
        return -1;
    *out = (uint32_t)v;
    *pp = p + n;
    return 0;
}

static int
get_buffer(PyObject *obj, Py_buffer *view)
{
    return PyObject_GetBuffer(obj, view, PyBUF_SIMPLE);
}

/* An int in [0, 2**64). PyLong_AsUnsignedLongLong converts ints of more than one 30-bit digit
 * (every hash) through the generic byte-array routine; the mask conversion reads the digits
 * directly, so range-check first and use that. */
static int
get_u64(PyObject *obj, uint64_t *out)
{
    if (!PyLong_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "expected an int, got %.100s", Py_TYPE(obj)->tp_name);
        return -1;
    }
    if (_PyLong_Sign(obj) < 0) {
        PyErr_SetString(PyExc_OverflowError, "can't convert negative int to unsigned");
        return -1;
    }
    size_t bits = _PyLong_NumBits(obj);
    if (bits > 64) {
        if (bits != (size_t)-1 || !PyErr_Occurred())
            PyErr_SetString(PyExc_OverflowError, "int too big to convert");
        return -1;
    }
    unsigned long long v = PyLong_AsUnsignedLongLongMask(obj);
    if (v == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    *out = (uint64_t)v;
    return 0;
}

PyDoc_STRVAR(msgpack_u32_count_doc,
"msgpack_u32_count(raw) -> int\n\n"
"The length of a msgpack array whose items are all ints in [0, 2**32); ValueError otherwise\n"
"(also when bytes follow the array).");

static PyObject *
msgpack_u32_count(PyObject *self, PyObject *arg)
{
    Py_buffer view;
    if (get_buffer(arg, &view) < 0)
        return NULL;
    const unsigned char *p = view.buf;
    const unsigned char *end = p + view.len;
    Py_ssize_t n, i;
    uint32_t v;
    if (mp_array_head(&p, end, &n) < 0) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "token_ids is not a msgpack array");
        return NULL;
    }
    for (i = 0; i < n; i++) {
        if (mp_u32(&p, end, &v) < 0) {
            PyBuffer_Release(&view);
            PyErr_Format(PyExc_ValueError, "token_ids[%zd] is not an int in [0, 2^32)", i);
            return NULL;
        }
    }
    if (p != end) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "trailing bytes after token_ids");
        return NULL;
    }
    PyBuffer_Release(&view);
    return PyLong_FromSsize_t(n);
}

/* --- chained block keys ------------------------------------------------------------------ */

static PyObject *
key_list(const uint64_t *keys, Py_ssize_t n)
{
    PyObject *out = PyList_New(n);
    if (out == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *v = PyLong_FromUnsignedLongLong(keys[i]);
        if (v == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, i, v);
    }
    return out;
}

static int
chain_args(PyObject *const *args, Py_ssize_t nargs, const char *name, Py_buffer *view,
           Py_ssize_t *block_size, uint64_t *parent)
{
    if (nargs != 3) {
        PyErr_Format(PyExc_TypeError, "%s() takes 3 arguments (%zd given)", name, nargs);
        return -1;
    }
    *block_size = PyLong_AsSsize_t(args[1]);
    if (*block_size == -1 && PyErr_Occurred())
        return -1;
    if (*block_size <= 0 || *block_size > (1 << 24)) {
        PyErr_Format(PyExc_ValueError, "block_size must be in [1, 2^24], got %zd", *block_size);
        return -1;
    }
    if (get_u64(args[2], parent) < 0)
        return -1;
    return get_buffer(args[0], view);
}

PyDoc_STRVAR(chain_u32_doc,
"chain_u32(data, block_size, parent) -> list[int]\n\n"
"Request keys of every full block of little-endian u32 tokens:\n"
"key_i = xxh3_64(block_i, seed=key_{i-1}), key_{-1} = parent.");

static PyObject *
chain_u32(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    Py_ssize_t bs;
    uint64_t key;
    if (chain_args(args, nargs, "chain_u32", &view, &bs, &key) < 0)
        return NULL;
    Py_ssize_t step = 4 * bs;
    Py_ssize_t n = view.len / step;
    uint64_t *keys = PyMem_Malloc((size_t)(n ? n : 1) * sizeof(uint64_t));
    if (keys == NULL) {
        PyBuffer_Release(&view);
        return PyErr_NoMemory();
    }
    const char *data = view.buf;
    for (Py_ssize_t i = 0; i < n; i++) {
        key = XXH3_64bits_withSeed(data + i * step, (size_t)step, key);
        keys[i] = key;
    }
    PyBuffer_Release(&view);
    PyObject *out = key_list(keys, n);
    PyMem_Free(keys);
    return out;
}

PyDoc_STRVAR(chain_msgpack_doc,
"chain_msgpack(raw, block_size, parent) -> list[int]\n\n"
"chain_u32 over the tokens of a raw msgpack array of ints in [0, 2**32) (a BlockStored's\n"
"token_ids as received), without building the ints; ValueError when raw is not such an array.");

static PyObject *
chain_msgpack(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    Py_ssize_t bs, count;
    uint64_t key;
    if (chain_args(args, nargs, "chain_msgpack", &view, &bs, &key) < 0)
        return NULL;
    const unsigned char *p = view.buf;
    const unsigned char *end = p + view.len;
    if (mp_array_head(&p, end, &count) < 0) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "token_ids is not a msgpack array");
        return NULL;
    }
    Py_ssize_t n = count / bs;
    uint32_t *block = PyMem_Malloc((size_t)bs * sizeof(uint32_t));
    uint64_t *keys = PyMem_Malloc((size_t)(n ? n : 1) * sizeof(uint64_t));
    if (block == NULL || keys == NULL) {
        PyMem_Free(block);
        PyMem_Free(keys);
        PyBuffer_Release(&view);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        for (Py_ssize_t j = 0; j < bs; j++) {
            uint32_t v;
            if (mp_u32(&p, end, &v) < 0) {
                PyMem_Free(block);
                PyMem_Free(keys);
                PyBuffer_Release(&view);
                PyErr_Format(PyExc_ValueError, "token_ids[%zd] is not an int in [0, 2^32)",
                             i * bs + j);
                return NULL;
            }
            /* little-endian u32, whatever the host order */
            unsigned char *b = (unsigned char *)&block[j];
            b[0] = (unsigned char)v;
            b[1] = (unsigned char)(v >> 8);
            b[2] = (unsigned char)(v >> 16);
            b[3] = (unsigned char)(v >> 24);
        }
        key = XXH3_64bits_withSeed(block, (size_t)bs * 4, key);
        keys[i] = key;
    }
    /* The partial tail is not hashed but must be valid too, and nothing may follow. */
    for (Py_ssize_t j = n * bs; j < count; j++) {
        uint32_t v;
        if (mp_u32(&p, end, &v) < 0) {
            PyMem_Free(block);
            PyMem_Free(keys);
            PyBuffer_Release(&view);
            PyErr_Format(PyExc_ValueError, "token_ids[%zd] is not an int in [0, 2^32)", j);
            return NULL;
        }
    }
    PyMem_Free(block);
    if (p != end) {
        PyMem_Free(keys);
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "trailing bytes after token_ids");
        return NULL;
    }
    PyBuffer_Release(&view);
    PyObject *out = key_list(keys, n);
    PyMem_Free(keys);
    return out;
}

/* --- holder bitmasks in a dict {key: mask} ------------------------------------------------ */

/* Keys: a list/tuple of ints (borrowed items), or a buffer of native u64 such as array('Q')
 * (the change stream's format: ints are made one at a time, no intermediate list). */
typedef struct {
    PyObject *seq;
    Py_buffer view;
    int is_buf;
    Py_ssize_t n;
    PyObject **items;
    const unsigned long long *u;
} keys_t;

static int
keys_open(PyObject *obj, keys_t *k)
{
    k->seq = NULL;
    k->is_buf = 0;
    if (!PyList_CheckExact(obj) && !PyTuple_CheckExact(obj) && PyObject_CheckBuffer(obj)) {
        if (PyObject_GetBuffer(obj, &k->view, PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) == 0) {
            const char *f = k->view.format;
            if (k->view.itemsize == 8 && f != NULL && (strcmp(f, "Q") == 0 || strcmp(f, "=Q") == 0
                                                       || strcmp(f, "L") == 0)) {
                k->is_buf = 1;
                k->n = k->view.len / 8;
                k->u = k->view.buf;
                return 0;
            }
            PyBuffer_Release(&k->view);
        }
        else {
            PyErr_Clear();
        }
    }
    k->seq = PySequence_Fast(obj, "keys must be a sequence");
    if (k->seq == NULL)
        return -1;
    k->n = PySequence_Fast_GET_SIZE(k->seq);
    k->items = PySequence_Fast_ITEMS(k->seq);
    return 0;
}

/* A new reference to key i. */
static inline PyObject *
keys_get(keys_t *k, Py_ssize_t i)
{
    if (k->is_buf)
        return PyLong_FromUnsignedLongLong(k->u[i]);
    return Py_NewRef(k->items[i]);
}

static void
keys_close(keys_t *k)
{
    if (k->is_buf)
        PyBuffer_Release(&k->view);
    Py_XDECREF(k->seq);
}

/* --- U64Map: an open-addressing hash table u64 -> int ---------------------------------------- */

/* A dict keyed by ints costs, per entry, a 24-byte entry, an index slot and a 32-36-byte int
 * object for the key, and a lookup touches all three (the key object to compare it). A U64Map
 * stores the key as a machine word next to its value in one 16-byte slot: linear probing on a
 * power-of-two table kept at most 3/4 full, deletion by backward shift (no tombstones), halved
 * when under 1/8 full. Values must be ints (they cannot form reference cycles, so the type is
 * not tracked by the garbage collector). No order: iteration is in table order. */

typedef struct {
    uint64_t key;
    PyObject *val; /* NULL: empty slot */
} u64slot;

typedef struct {
    PyObject_HEAD
    u64slot *slots;
    Py_ssize_t cap; /* 0 or a power of two */
    Py_ssize_t used;
} U64Map;

static PyTypeObject U64Map_Type;

#define IS_U64MAP(o) Py_IS_TYPE((o), &U64Map_Type)

static inline size_t
mix64(uint64_t x)
{
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ULL;
    x ^= x >> 33;
    return (size_t)x;
}

/* The slot holding k, or -1. */
static inline Py_ssize_t
um_find(const U64Map *m, uint64_t k)
{
    if (m->cap == 0)
        return -1;
    size_t mask = (size_t)m->cap - 1, i = mix64(k) & mask;
    for (;;) {
        const u64slot *s = &m->slots[i];
        if (s->val == NULL)
            return -1;
        if (s->key == k)
            return (Py_ssize_t)i;
        i = (i + 1) & mask;
    }
}

static int
um_resize(U64Map *m, Py_ssize_t cap)
{
    u64slot *fresh = PyMem_Calloc((size_t)cap, sizeof(u64slot));
    if (fresh == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    size_t mask = (size_t)cap - 1;
    for (Py_ssize_t i = 0; i < m->cap; i++) {
        u64slot *s = &m->slots[i];
        if (s->val == NULL)
            continue;
        size_t j = mix64(s->key) & mask;
        while (fresh[j].val != NULL)
            j = (j + 1) & mask;
        fresh[j] = *s;
    }
    PyMem_Free(m->slots);
    m->slots = fresh;
    m->cap = cap;
    return 0;
}

/* m[k] = v (a new reference is taken): 1 when k is new, 0 when replaced, -1 on error. */
static int
um_set(U64Map *m, uint64_t k, PyObject *v)
{
    if ((m->used + 1) * 4 > m->cap * 3 && um_resize(m, m->cap ? m->cap * 2 : 8) < 0)
        return -1;
    size_t mask = (size_t)m->cap - 1, i = mix64(k) & mask;
    for (;;) {
        u64slot *s = &m->slots[i];
        if (s->val == NULL) {
            s->key = k;
            s->val = Py_NewRef(v);
            m->used++;
            return 1;
        }
        if (s->key == k) {
            Py_SETREF(s->val, Py_NewRef(v)); /* an int: its dealloc runs no code */
            return 0;
        }
        i = (i + 1) & mask;
    }
}

/* Empty slot i (it must be full), shifting later members of its probe run back. */
static void
um_del_at(U64Map *m, Py_ssize_t at)
{
    PyObject *v = m->slots[at].val;
    size_t mask = (size_t)m->cap - 1, hole = (size_t)at, j = (size_t)at;
    for (;;) {
        j = (j + 1) & mask;
        u64slot *s = &m->slots[j];
        if (s->val == NULL)
            break;
        size_t home = mix64(s->key) & mask;
        /* s may fill the hole when its home is not within (hole, j] (cyclically). */
        if (((j - home) & mask) >= ((j - hole) & mask)) {
            m->slots[hole] = *s;
            hole = j;
        }
    }
    m->slots[hole].val = NULL;
    m->slots[hole].key = 0;
    m->used--;
    Py_DECREF(v);
    if (m->cap > 64 && m->used * 8 < m->cap && um_resize(m, m->cap / 2) < 0)
        PyErr_Clear(); /* could not shrink: stay as large, still correct */
}

static void
set_key_error(PyObject *k)
{
    PyObject *t = PyTuple_Pack(1, k);
    if (t != NULL) {
        PyErr_SetObject(PyExc_KeyError, t);
        Py_DECREF(t);
    }
}

static int
um_key(PyObject *k, uint64_t *out)
{
    return get_u64(k, out);
}

/* A key that is not a u64 is simply absent (as in a dict); 1 found (slot in *at), 0, -1. */
static int
um_lookup(U64Map *m, PyObject *k, Py_ssize_t *at)
{
    uint64_t u;
    if (!PyLong_Check(k))
        return 0;
    if (get_u64(k, &u) < 0) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError))
            return -1;
        PyErr_Clear();
        return 0;
    }
    *at = um_find(m, u);
    return *at >= 0;
}

static int
um_check_val(PyObject *v)
{
    if (!PyLong_CheckExact(v)) {
        PyErr_Format(PyExc_TypeError, "U64Map values must be ints, got %.100s",
                     Py_TYPE(v)->tp_name);
        return -1;
    }
    return 0;
}

static int um_update_from(U64Map *m, PyObject *src);

static PyObject *
um_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    PyObject *src = NULL;
    if (kw != NULL && PyDict_GET_SIZE(kw)) {
        PyErr_SetString(PyExc_TypeError, "U64Map() takes no keyword arguments");
        return NULL;
    }
    if (!PyArg_UnpackTuple(args, "U64Map", 0, 1, &src))
        return NULL;
    U64Map *m = (U64Map *)type->tp_alloc(type, 0);
    if (m == NULL)
        return NULL;
    m->slots = NULL;
    m->cap = m->used = 0;
    if (src != NULL && um_update_from(m, src) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return (PyObject *)m;
}

static void
um_clear_all(U64Map *m)
{
    u64slot *slots = m->slots;
    Py_ssize_t cap = m->cap;
    m->slots = NULL;
    m->cap = m->used = 0;
    for (Py_ssize_t i = 0; i < cap; i++)
        Py_XDECREF(slots[i].val);
    PyMem_Free(slots);
}

static void
um_dealloc(U64Map *m)
{
    um_clear_all(m);
    Py_TYPE(m)->tp_free((PyObject *)m);
}

static Py_ssize_t
um_len(U64Map *m)
{
    return m->used;
}

static PyObject *
um_subscript(U64Map *m, PyObject *k)
{
    Py_ssize_t at;
    int rc = um_lookup(m, k, &at);
    if (rc < 0)
        return NULL;
    if (rc == 0) {
        set_key_error(k);
        return NULL;
    }
    return Py_NewRef(m->slots[at].val);
}

static int
um_ass_subscript(U64Map *m, PyObject *k, PyObject *v)
{
    if (v == NULL) {
        Py_ssize_t at;
        int rc = um_lookup(m, k, &at);
        if (rc <= 0) {
            if (rc == 0)
                set_key_error(k);
            return -1;
        }
        um_del_at(m, at);
        return 0;
    }
    uint64_t u;
    if (um_key(k, &u) < 0 || um_check_val(v) < 0)
        return -1;
    return um_set(m, u, v) < 0 ? -1 : 0;
}

static int
um_contains(U64Map *m, PyObject *k)
{
    Py_ssize_t at;
    return um_lookup(m, k, &at);
}

static PyObject *
um_get(U64Map *m, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "get() takes 1 or 2 arguments");
        return NULL;
    }
    Py_ssize_t at;
    int rc = um_lookup(m, args[0], &at);
    if (rc < 0)
        return NULL;
    if (rc)
        return Py_NewRef(m->slots[at].val);
    return Py_NewRef(nargs == 2 ? args[1] : Py_None);
}

static PyObject *
um_pop(U64Map *m, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "pop() takes 1 or 2 arguments");
        return NULL;
    }
    Py_ssize_t at;
    int rc = um_lookup(m, args[0], &at);
    if (rc < 0)
        return NULL;
    if (rc == 0) {
        if (nargs == 2)
            return Py_NewRef(args[1]);
        set_key_error(args[0]);
        return NULL;
    }
    PyObject *v = Py_NewRef(m->slots[at].val);
    um_del_at(m, at);
    return v;
}

/* 0: keys, 1: values, 2: items, as a new list. */
static PyObject *
um_list(U64Map *m, int what)
{
    PyObject *out = PyList_New(m->used);
    Py_ssize_t n = 0;
    for (Py_ssize_t i = 0; out != NULL && i < m->cap; i++) {
        u64slot *s = &m->slots[i];
        if (s->val == NULL)
            continue;
        PyObject *x;
        if (what == 1) {
            x = Py_NewRef(s->val);
        }
        else {
            PyObject *k = PyLong_FromUnsignedLongLong(s->key);
            x = what == 0 || k == NULL ? k : PyTuple_Pack(2, k, s->val);
            if (what == 2)
                Py_XDECREF(k);
        }
        if (x == NULL)
            Py_CLEAR(out);
        else
            PyList_SET_ITEM(out, n++, x);
    }
    return out;
}

static PyObject *
um_keys(U64Map *m, PyObject *unused)
{
    return um_list(m, 0);
}

static PyObject *
um_values(U64Map *m, PyObject *unused)
{
    return um_list(m, 1);
}

static PyObject *
um_items(U64Map *m, PyObject *unused)
{
    return um_list(m, 2);
}

static PyObject *
um_iter(U64Map *m)
{
    PyObject *keys = um_list(m, 0);
    if (keys == NULL)
        return NULL;
    PyObject *it = PyObject_GetIter(keys);
    Py_DECREF(keys);
    return it;
}

/* From a mapping (its items()) or an iterable of (key, value) pairs. */
static int
um_update_from(U64Map *m, PyObject *src)
{
    PyObject *it;
    if (PyDict_Check(src) || IS_U64MAP(src) || PyObject_HasAttrString(src, "items")) {
        PyObject *items = PyObject_CallMethod(src, "items", NULL);
        if (items == NULL)
            return -1;
        it = PyObject_GetIter(items);
        Py_DECREF(items);
    }
    else {
        it = PyObject_GetIter(src);
    }
    if (it == NULL)
        return -1;
    PyObject *pair;
    while ((pair = PyIter_Next(it)) != NULL) {
        PyObject *fast = PySequence_Fast(pair, "U64Map.update: expected (key, value) pairs");
        Py_DECREF(pair);
        if (fast == NULL)
            goto fail;
        uint64_t u;
        int rc = -1;
        if (PySequence_Fast_GET_SIZE(fast) != 2)
            PyErr_SetString(PyExc_ValueError, "U64Map.update: expected (key, value) pairs");
        else if (um_key(PySequence_Fast_GET_ITEM(fast, 0), &u) == 0
                 && um_check_val(PySequence_Fast_GET_ITEM(fast, 1)) == 0)
            rc = um_set(m, u, PySequence_Fast_GET_ITEM(fast, 1));
        Py_DECREF(fast);
        if (rc < 0)
            goto fail;
    }
    Py_DECREF(it);
    return PyErr_Occurred() ? -1 : 0;
fail:
    Py_DECREF(it);
    return -1;
}

static PyObject *
um_update(U64Map *m, PyObject *src)
{
    if (um_update_from(m, src) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
um_clear(U64Map *m, PyObject *unused)
{
    um_clear_all(m);
    Py_RETURN_NONE;
}

static PyObject *
um_sizeof(U64Map *m, PyObject *unused)
{
    return PyLong_FromSsize_t((Py_ssize_t)sizeof(U64Map) + m->cap * (Py_ssize_t)sizeof(u64slot));
}

static PyObject *
um_reduce(U64Map *m, PyObject *unused)
{
    PyObject *items = um_list(m, 2);
    return items == NULL ? NULL : Py_BuildValue("(O(N))", Py_TYPE(m), items);
}

static PyObject *
um_repr(U64Map *m)
{
    return PyUnicode_FromFormat("U64Map(<%zd entries>)", m->used);
}

static PyMethodDef um_methods[] = {
    {"get", (PyCFunction)(void (*)(void))um_get, METH_FASTCALL, "get(k, default=None)"},
    {"pop", (PyCFunction)(void (*)(void))um_pop, METH_FASTCALL, "pop(k[, default])"},
    {"keys", (PyCFunction)um_keys, METH_NOARGS, "The keys, as a list."},
    {"values", (PyCFunction)um_values, METH_NOARGS, "The values, as a list."},
    {"items", (PyCFunction)um_items, METH_NOARGS, "(key, value) pairs, as a list."},
    {"update", (PyCFunction)um_update, METH_O, "From a mapping or (key, value) pairs."},
    {"clear", (PyCFunction)um_clear, METH_NOARGS, "Remove every entry (frees the table)."},
    {"__sizeof__", (PyCFunction)um_sizeof, METH_NOARGS, NULL},
    {"__reduce__", (PyCFunction)um_reduce, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyMappingMethods um_as_mapping = {
    (lenfunc)um_len,
    (binaryfunc)um_subscript,
    (objobjargproc)um_ass_subscript,
};

static PySequenceMethods um_as_sequence = {
    .sq_contains = (objobjproc)um_contains,
};

static PyTypeObject U64Map_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "kvray._speedups.U64Map",
    .tp_doc = PyDoc_STR(
        "U64Map([mapping or pairs]): a dict-like table of u64 keys to int values, in C.\n\n"
        "Supports len, [], in, del, get, pop, keys, values, items (lists), update, clear;\n"
        "no order. Keys must be ints in [0, 2**64); other keys are never present."),
    .tp_basicsize = sizeof(U64Map),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = um_new,
    .tp_dealloc = (destructor)um_dealloc,
    .tp_repr = (reprfunc)um_repr,
    .tp_as_mapping = &um_as_mapping,
    .tp_as_sequence = &um_as_sequence,
    .tp_iter = (getiterfunc)um_iter,
    .tp_methods = um_methods,
};

/* --- U64Dict: an insertion-ordered u64 -> int table -------------------------------------------- */

/* What a shard's tiers need: dict semantics including order (the index keeps store recency as
 * insertion order and evicts from the front). CPython's compact-dict layout specialised for u64
 * keys: entries (key, value) appended in order, deletions leaving holes; an open-addressing index
 * of entry numbers (linear probing, backward-shift deletion) finds a key with one compare of two
 * machine words. Holes are squeezed out when the entry array fills or is 7/8 empty. */

typedef struct {
    PyObject_HEAD
    u64slot *ent;       /* entries in order; val NULL: a hole */
    Py_ssize_t ent_cap;
    Py_ssize_t ent_n;   /* entries appended so far (holes included) */
    Py_ssize_t head;    /* no live entry before this one */
    Py_ssize_t used;    /* live entries */
    Py_ssize_t *idx;    /* entry number or -1 */
    Py_ssize_t idx_cap; /* 0 or a power of two, > used * 4 / 3 */
} U64Dict;

static PyTypeObject U64Dict_Type;

#define IS_U64DICT(o) Py_IS_TYPE((o), &U64Dict_Type)

/* The index slot holding k's entry number, or -1. */
static inline Py_ssize_t
ud_slot(const U64Dict *m, uint64_t k)
{
    if (m->idx_cap == 0)
        return -1;
    size_t mask = (size_t)m->idx_cap - 1, i = mix64(k) & mask;
    for (;;) {
        Py_ssize_t e = m->idx[i];
        if (e < 0)
            return -1;
        if (m->ent[e].key == k)
            return (Py_ssize_t)i;
        i = (i + 1) & mask;
    }
}

/* Rebuild the index for the current entries with idx_cap slots. */
static int
ud_reindex(U64Dict *m, Py_ssize_t idx_cap)
{
    Py_ssize_t *idx = PyMem_Malloc((size_t)idx_cap * sizeof(Py_ssize_t));
    if (idx == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    memset(idx, 0xff, (size_t)idx_cap * sizeof(Py_ssize_t)); /* all -1 */
    size_t mask = (size_t)idx_cap - 1;
    for (Py_ssize_t e = m->head; e < m->ent_n; e++) {
        if (m->ent[e].val == NULL)
            continue;
        size_t i = mix64(m->ent[e].key) & mask;
        while (idx[i] >= 0)
            i = (i + 1) & mask;
        idx[i] = e;
    }
    PyMem_Free(m->idx);
    m->idx = idx;
    m->idx_cap = idx_cap;
    return 0;
}

static Py_ssize_t
ud_idx_cap_for(Py_ssize_t n)
{
    Py_ssize_t cap = 8;
    while (cap * 3 < n * 4 + 4)
        cap *= 2;
    return cap;
}

/* Squeeze out the holes into an entry array of ent_cap (>= used), then rebuild the index. */
static int
ud_compact(U64Dict *m, Py_ssize_t ent_cap)
{
    u64slot *ent = PyMem_Malloc((size_t)ent_cap * sizeof(u64slot));
    if (ent == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    Py_ssize_t n = 0;
    for (Py_ssize_t e = m->head; e < m->ent_n; e++)
        if (m->ent[e].val != NULL)
            ent[n++] = m->ent[e];
    PyMem_Free(m->ent);
    m->ent = ent;
    m->ent_cap = ent_cap;
    m->ent_n = n;
    m->head = 0;
    return ud_reindex(m, ud_idx_cap_for(n));
}

/* Room to append one entry (may renumber entries: find slots again afterwards). */
static int
ud_reserve(U64Dict *m)
{
    if (m->ent_n < m->ent_cap) {
        if ((m->used + 1) * 4 > m->idx_cap * 3)
            return ud_reindex(m, m->idx_cap ? m->idx_cap * 2 : 8);
        return 0;
    }
    Py_ssize_t want = m->used + 1;
    Py_ssize_t cap = m->ent_cap ? m->ent_cap : 8;
    while (cap < want * 3 / 2 + 1) /* room for holes to come before the next squeeze */
        cap *= 2;
    return ud_compact(m, cap);
}

/* Append (k, v) (a new reference is taken) and point index slot `slot` at it, or find a free
 * slot when slot < 0. ud_reserve must have run. */
static void
ud_append(U64Dict *m, uint64_t k, PyObject *v, Py_ssize_t slot)
{
    Py_ssize_t e = m->ent_n++;
    m->ent[e].key = k;
    m->ent[e].val = Py_NewRef(v);
    if (slot < 0) {
        size_t mask = (size_t)m->idx_cap - 1, i = mix64(k) & mask;
        while (m->idx[i] >= 0)
            i = (i + 1) & mask;
        slot = (Py_ssize_t)i;
        m->used++;
    }
    m->idx[slot] = e;
}

/* m[k] = v: in place when present (order kept), else appended. 1 new, 0 replaced, -1 error. */
static int
ud_set(U64Dict *m, uint64_t k, PyObject *v)
{
    Py_ssize_t s = ud_slot(m, k);
    if (s >= 0) {
        u64slot *en = &m->ent[m->idx[s]];
        Py_SETREF(en->val, Py_NewRef(v)); /* an int: its dealloc runs no code */
        return 0;
    }
    if (ud_reserve(m) < 0)
        return -1;
    ud_append(m, k, v, -1);
    return 1;
}

/* m[k] = v, moving k to the end (``d[k] = d.pop(k) ...``): 1 new, 0 moved, -1 error. */
static int
ud_set_last(U64Dict *m, uint64_t k, PyObject *v)
{
    Py_ssize_t s = ud_slot(m, k);
    if (s >= 0 && m->idx[s] == m->ent_n - 1) {
        Py_SETREF(m->ent[m->idx[s]].val, Py_NewRef(v));
        return 0;
    }
    if (ud_reserve(m) < 0)
        return -1;
    if (s < 0) {
        ud_append(m, k, v, -1);
        return 1;
    }
    s = ud_slot(m, k); /* the reserve may have renumbered the entries */
    u64slot *old = &m->ent[m->idx[s]];
    PyObject *prev = old->val;
    old->val = NULL; /* a hole */
    ud_append(m, k, v, s);
    Py_DECREF(prev);
    return 0;
}

/* Delete the entry of index slot s. */
static void
ud_del_slot(U64Dict *m, Py_ssize_t s)
{
    Py_ssize_t e = m->idx[s];
    PyObject *v = m->ent[e].val;
    m->ent[e].val = NULL;
    if (e == m->ent_n - 1)
        m->ent_n--; /* the last entry: no hole left behind */
    size_t mask = (size_t)m->idx_cap - 1, hole = (size_t)s, j = (size_t)s;
    for (;;) {
        j = (j + 1) & mask;
        Py_ssize_t ej = m->idx[j];
        if (ej < 0)
            break;
        size_t home = mix64(m->ent[ej].key) & mask;
        if (((j - home) & mask) >= ((j - hole) & mask)) {
            m->idx[hole] = ej;
            hole = j;
        }
    }
    m->idx[hole] = -1;
    m->used--;
    Py_DECREF(v);
    if (m->used == 0) {
        m->ent_n = m->head = 0;
    }
    else if (m->ent_cap > 64 && m->used * 8 < m->ent_cap && ud_compact(m, m->ent_cap / 2) < 0) {
        PyErr_Clear(); /* could not shrink: stay as large, still correct */
    }
}

static int
ud_lookup(U64Dict *m, PyObject *k, Py_ssize_t *slot)
{
    uint64_t u;
    if (!PyLong_Check(k))
        return 0;
    if (get_u64(k, &u) < 0) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError))
            return -1;
        PyErr_Clear();
        return 0;
    }
    *slot = ud_slot(m, u);
    return *slot >= 0;
}

#define UD_VAL(m, s) ((m)->ent[(m)->idx[(s)]].val)

static int ud_update_from(U64Dict *m, PyObject *src);

static PyObject *
ud_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    PyObject *src = NULL;
    if (kw != NULL && PyDict_GET_SIZE(kw)) {
        PyErr_SetString(PyExc_TypeError, "U64Dict() takes no keyword arguments");
        return NULL;
    }
    if (!PyArg_UnpackTuple(args, "U64Dict", 0, 1, &src))
        return NULL;
    U64Dict *m = (U64Dict *)type->tp_alloc(type, 0);
    if (m == NULL)
        return NULL;
    m->ent = NULL;
    m->idx = NULL;
    m->ent_cap = m->ent_n = m->head = m->used = m->idx_cap = 0;
    if (src != NULL && ud_update_from(m, src) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return (PyObject *)m;
}

static void
ud_clear_all(U64Dict *m)
{
    u64slot *ent = m->ent;
    Py_ssize_t n = m->ent_n;
    PyMem_Free(m->idx);
    m->ent = NULL;
    m->idx = NULL;
    m->ent_cap = m->ent_n = m->head = m->used = m->idx_cap = 0;
    for (Py_ssize_t e = 0; e < n; e++)
        Py_XDECREF(ent[e].val);
    PyMem_Free(ent);
}

static void
ud_dealloc(U64Dict *m)
{
    ud_clear_all(m);
    Py_TYPE(m)->tp_free((PyObject *)m);
}

static Py_ssize_t
ud_len(U64Dict *m)
{
    return m->used;
}

static PyObject *
ud_subscript(U64Dict *m, PyObject *k)
{
    Py_ssize_t s;
    int rc = ud_lookup(m, k, &s);
    if (rc < 0)
        return NULL;
    if (rc == 0) {
        set_key_error(k);
        return NULL;
    }
    return Py_NewRef(UD_VAL(m, s));
}

static int
ud_ass_subscript(U64Dict *m, PyObject *k, PyObject *v)
{
    if (v == NULL) {
        Py_ssize_t s;
        int rc = ud_lookup(m, k, &s);
        if (rc <= 0) {
            if (rc == 0)
                set_key_error(k);
            return -1;
        }
        ud_del_slot(m, s);
        return 0;
    }
    uint64_t u;
    if (um_key(k, &u) < 0 || um_check_val(v) < 0)
        return -1;
    return ud_set(m, u, v) < 0 ? -1 : 0;
}

static int
ud_contains(U64Dict *m, PyObject *k)
{
    Py_ssize_t s;
    return ud_lookup(m, k, &s);
}

static PyObject *
ud_get(U64Dict *m, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "get() takes 1 or 2 arguments");
        return NULL;
    }
    Py_ssize_t s;
    int rc = ud_lookup(m, args[0], &s);
    if (rc < 0)
        return NULL;
    if (rc)
        return Py_NewRef(UD_VAL(m, s));
    return Py_NewRef(nargs == 2 ? args[1] : Py_None);
}

static PyObject *
ud_pop(U64Dict *m, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "pop() takes 1 or 2 arguments");
        return NULL;
    }
    Py_ssize_t s;
    int rc = ud_lookup(m, args[0], &s);
    if (rc < 0)
        return NULL;
    if (rc == 0) {
        if (nargs == 2)
            return Py_NewRef(args[1]);
        set_key_error(args[0]);
        return NULL;
    }
    PyObject *v = Py_NewRef(UD_VAL(m, s));
    ud_del_slot(m, s);
    return v;
}

/* 0: keys, 1: values, 2: items; in order, at most `limit` of them, as a new list. */
static PyObject *
ud_list(U64Dict *m, int what, Py_ssize_t limit)
{
    Py_ssize_t n = limit < m->used ? limit : m->used;
    PyObject *out = PyList_New(n);
    Py_ssize_t got = 0;
    while (m->head < m->ent_n && m->ent[m->head].val == NULL)
        m->head++; /* leading holes (evicted from the front) are skipped for good */
    for (Py_ssize_t e = m->head; out != NULL && got < n && e < m->ent_n; e++) {
        u64slot *s = &m->ent[e];
        if (s->val == NULL)
            continue;
        PyObject *x;
        if (what == 1) {
            x = Py_NewRef(s->val);
        }
        else {
            PyObject *k = PyLong_FromUnsignedLongLong(s->key);
            x = what == 0 || k == NULL ? k : PyTuple_Pack(2, k, s->val);
            if (what == 2)
                Py_XDECREF(k);
        }
        if (x == NULL)
            Py_CLEAR(out);
        else
            PyList_SET_ITEM(out, got++, x);
    }
    return out;
}

static PyObject *
ud_keys(U64Dict *m, PyObject *unused)
{
    return ud_list(m, 0, PY_SSIZE_T_MAX);
}

static PyObject *
ud_values(U64Dict *m, PyObject *unused)
{
    return ud_list(m, 1, PY_SSIZE_T_MAX);
}

static PyObject *
ud_items(U64Dict *m, PyObject *unused)
{
    return ud_list(m, 2, PY_SSIZE_T_MAX);
}

static PyObject *
ud_oldest(U64Dict *m, PyObject *arg)
{
    Py_ssize_t n = PyLong_AsSsize_t(arg);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    return ud_list(m, 2, n < 0 ? 0 : n);
}

static PyObject *
ud_iter(U64Dict *m)
{
    PyObject *keys = ud_list(m, 0, PY_SSIZE_T_MAX);
    if (keys == NULL)
        return NULL;
    PyObject *it = PyObject_GetIter(keys);
    Py_DECREF(keys);
    return it;
}

static int
ud_update_from(U64Dict *m, PyObject *src)
{
    PyObject *it;
    if (PyObject_HasAttrString(src, "items")) {
        PyObject *items = PyObject_CallMethod(src, "items", NULL);
        if (items == NULL)
            return -1;
        it = PyObject_GetIter(items);
        Py_DECREF(items);
    }
    else {
        it = PyObject_GetIter(src);
    }
    if (it == NULL)
        return -1;
    PyObject *pair;
    while ((pair = PyIter_Next(it)) != NULL) {
        PyObject *fast = PySequence_Fast(pair, "U64Dict.update: expected (key, value) pairs");
        Py_DECREF(pair);
        if (fast == NULL)
            goto fail;
        uint64_t u;
        int rc = -1;
        if (PySequence_Fast_GET_SIZE(fast) != 2)
            PyErr_SetString(PyExc_ValueError, "U64Dict.update: expected (key, value) pairs");
        else if (um_key(PySequence_Fast_GET_ITEM(fast, 0), &u) == 0
                 && um_check_val(PySequence_Fast_GET_ITEM(fast, 1)) == 0)
            rc = ud_set(m, u, PySequence_Fast_GET_ITEM(fast, 1));
        Py_DECREF(fast);
        if (rc < 0)
            goto fail;
    }
    Py_DECREF(it);
    return PyErr_Occurred() ? -1 : 0;
fail:
    Py_DECREF(it);
    return -1;
}

static PyObject *
ud_update(U64Dict *m, PyObject *src)
{
    if (ud_update_from(m, src) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
ud_clear(U64Dict *m, PyObject *unused)
{
    ud_clear_all(m);
    Py_RETURN_NONE;
}

static PyObject *
ud_sizeof(U64Dict *m, PyObject *unused)
{
    return PyLong_FromSsize_t((Py_ssize_t)sizeof(U64Dict)
                              + m->ent_cap * (Py_ssize_t)sizeof(u64slot)
                              + m->idx_cap * (Py_ssize_t)sizeof(Py_ssize_t));
}

static PyObject *
ud_reduce(U64Dict *m, PyObject *unused)
{
    PyObject *items = ud_list(m, 2, PY_SSIZE_T_MAX);
    return items == NULL ? NULL : Py_BuildValue("(O(N))", Py_TYPE(m), items);
}

static PyObject *
ud_repr(U64Dict *m)
{
    return PyUnicode_FromFormat("U64Dict(<%zd entries>)", m->used);
}

static PyMethodDef ud_methods[] = {
    {"get", (PyCFunction)(void (*)(void))ud_get, METH_FASTCALL, "get(k, default=None)"},
    {"pop", (PyCFunction)(void (*)(void))ud_pop, METH_FASTCALL, "pop(k[, default])"},
    {"keys", (PyCFunction)ud_keys, METH_NOARGS, "The keys in order, as a list."},
    {"values", (PyCFunction)ud_values, METH_NOARGS, "The values in order, as a list."},
    {"items", (PyCFunction)ud_items, METH_NOARGS, "(key, value) pairs in order, as a list."},
    {"oldest", (PyCFunction)ud_oldest, METH_O, "oldest(n): the first n (key, value) pairs."},
    {"update", (PyCFunction)ud_update, METH_O, "From a mapping or (key, value) pairs."},
    {"clear", (PyCFunction)ud_clear, METH_NOARGS, "Remove every entry (frees the tables)."},
    {"__sizeof__", (PyCFunction)ud_sizeof, METH_NOARGS, NULL},
    {"__reduce__", (PyCFunction)ud_reduce, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyMappingMethods ud_as_mapping = {
    (lenfunc)ud_len,
    (binaryfunc)ud_subscript,
    (objobjargproc)ud_ass_subscript,
};

static PySequenceMethods ud_as_sequence = {
    .sq_contains = (objobjproc)ud_contains,
};

static PyTypeObject U64Dict_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "kvray._speedups.U64Dict",
    .tp_doc = PyDoc_STR(
        "U64Dict([mapping or pairs]): an insertion-ordered table of u64 keys to int values.\n\n"
        "A dict's order semantics (assignment keeps a key's place, new keys go last); supports\n"
        "len, [], in, del, get, pop, keys, values, items (lists, in order), oldest(n), update,\n"
        "clear. Keys must be ints in [0, 2**64); other keys are never present."),
    .tp_basicsize = sizeof(U64Dict),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = ud_new,
    .tp_dealloc = (destructor)ud_dealloc,
    .tp_repr = (reprfunc)ud_repr,
    .tp_as_mapping = &ud_as_mapping,
    .tp_as_sequence = &ud_as_sequence,
    .tp_iter = (getiterfunc)ud_iter,
    .tp_methods = ud_methods,
};

/* --- the index's maps: a dict, a U64Map or a U64Dict ------------------------------------------ */

static inline int
is_map(PyObject *o)
{
    return PyDict_CheckExact(o) || IS_U64MAP(o) || IS_U64DICT(o);
}

/* A borrowed value, or NULL: absent (no error set) or an error. */
static inline PyObject *
map_get(PyObject *m, PyObject *k)
{
    if (IS_U64DICT(m)) {
        Py_ssize_t s;
        return ud_lookup((U64Dict *)m, k, &s) > 0 ? UD_VAL((U64Dict *)m, s) : NULL;
    }
    if (!IS_U64MAP(m))
        return PyDict_GetItemWithError(m, k);
    Py_ssize_t at;
    int rc = um_lookup((U64Map *)m, k, &at);
    return rc > 0 ? ((U64Map *)m)->slots[at].val : NULL;
}

static inline int
map_set(PyObject *m, PyObject *k, PyObject *v)
{
    if (IS_U64DICT(m))
        return ud_ass_subscript((U64Dict *)m, k, v);
    if (!IS_U64MAP(m))
        return PyDict_SetItem(m, k, v);
    return um_ass_subscript((U64Map *)m, k, v);
}

static inline int
map_del(PyObject *m, PyObject *k)
{
    if (IS_U64DICT(m))
        return ud_ass_subscript((U64Dict *)m, k, NULL);
    if (!IS_U64MAP(m))
        return PyDict_DelItem(m, k);
    return um_ass_subscript((U64Map *)m, k, NULL);
}

static inline int
map_contains(PyObject *m, PyObject *k)
{
    if (IS_U64DICT(m))
        return ud_contains((U64Dict *)m, k);
    if (!IS_U64MAP(m))
        return PyDict_Contains(m, k);
    return um_contains((U64Map *)m, k);
}

PyDoc_STRVAR(or_bits_doc,
"or_bits(d, keys, bit, recency) -> int\n\n"
"d: a dict or a U64Map; keys: a list or tuple of ints, or an array('Q').\n"
"d[k] = d.get(k, 0) | bit for every k (with recency, k also moves to a dict's end; a U64Map\n"
"has no order); returns how many keys were new.");

static int
dict_args(PyObject *const *args, Py_ssize_t nargs, Py_ssize_t want, const char *name, keys_t *k)
{
    if (nargs != want) {
        PyErr_Format(PyExc_TypeError, "%s() takes %zd arguments (%zd given)", name, want, nargs);
        return -1;
    }
    if (!is_map(args[0])) {
        PyErr_Format(PyExc_TypeError, "%s(): expected a dict or a U64Map", name);
        return -1;
    }
    return keys_open(args[1], k);
}

static PyObject *
or_bits(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    keys_t ks;
    if (dict_args(args, nargs, 4, "or_bits", &ks) < 0)
        return NULL;
    PyObject *d = args[0], *bit = args[2];
    int recency = PyObject_IsTrue(args[3]);
    if (recency < 0) {
        keys_close(&ks);
        return NULL;
    }
    Py_ssize_t added = 0;
    if (IS_U64MAP(d)) {
        U64Map *um = (U64Map *)d;
        if (um_check_val(bit) < 0)
            goto fail;
        for (Py_ssize_t i = 0; i < ks.n; i++) {
            uint64_t u;
            if (ks.is_buf)
                u = ks.u[i];
            else if (get_u64(ks.items[i], &u) < 0)
                goto fail;
            Py_ssize_t at = um_find(um, u);
            if (at < 0) {
                if (um_set(um, u, bit) < 0)
                    goto fail;
                added++;
                continue;
            }
            PyObject *m = PyNumber_Or(um->slots[at].val, bit);
            if (m == NULL)
                goto fail;
            Py_SETREF(um->slots[at].val, m);
        }
        keys_close(&ks);
        return PyLong_FromSsize_t(added);
    }
    if (IS_U64DICT(d)) {
        U64Dict *ud = (U64Dict *)d;
        if (um_check_val(bit) < 0)
            goto fail;
        for (Py_ssize_t i = 0; i < ks.n; i++) {
            uint64_t u;
            if (ks.is_buf)
                u = ks.u[i];
            else if (get_u64(ks.items[i], &u) < 0)
                goto fail;
            Py_ssize_t s = ud_slot(ud, u);
            if (s < 0) {
                if (ud_reserve(ud) < 0)
                    goto fail;
                ud_append(ud, u, bit, -1);
                added++;
                continue;
            }
            PyObject *m = PyNumber_Or(UD_VAL(ud, s), bit);
            if (m == NULL)
                goto fail;
            if (recency) {
                int rc = ud_set_last(ud, u, m);
                Py_DECREF(m);
                if (rc < 0)
                    goto fail;
            }
            else {
                Py_SETREF(UD_VAL(ud, s), m);
            }
        }
        keys_close(&ks);
        return PyLong_FromSsize_t(added);
    }
    for (Py_ssize_t i = 0; i < ks.n; i++) {
        PyObject *k = keys_get(&ks, i);
        if (k == NULL)
            goto fail;
        PyObject *old = PyDict_GetItemWithError(d, k); /* borrowed */
        PyObject *m;
        if (old == NULL) {
            if (PyErr_Occurred()) {
                Py_DECREF(k);
                goto fail;
            }
            added++;
            m = Py_NewRef(bit);
        }
        else {
            m = PyNumber_Or(old, bit);
            if (m == NULL || (recency && PyDict_DelItem(d, k) < 0)) {
                Py_XDECREF(m);
                Py_DECREF(k);
                goto fail;
            }
        }
        int rc = PyDict_SetItem(d, k, m);
        Py_DECREF(m);
        Py_DECREF(k);
        if (rc < 0)
            goto fail;
    }
    keys_close(&ks);
    return PyLong_FromSsize_t(added);
fail:
    keys_close(&ks);
    return NULL;
}

/* d[k] = old & keep, deleting k when that is 0: 1 when k was deleted, 0 when kept, -1 on error. */
static int
clear_bits(PyObject *d, PyObject *k, PyObject *old, PyObject *keep)
{
    PyObject *m = PyNumber_And(old, keep);
    if (m == NULL)
        return -1;
    int nonzero = PyObject_IsTrue(m);
    int rc = nonzero < 0 ? -1 : nonzero ? map_set(d, k, m) : map_del(d, k);
    Py_DECREF(m);
    return rc < 0 ? -1 : !nonzero;
}

PyDoc_STRVAR(and_bits_doc,
"and_bits(d, keys, keep) -> int\n\n"
"d[k] &= keep for every k present, deleting keys whose mask becomes 0; returns how many were\n"
"deleted.");

static PyObject *
and_bits(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    keys_t ks;
    if (dict_args(args, nargs, 3, "and_bits", &ks) < 0)
        return NULL;
    PyObject *d = args[0], *keep = args[2];
    Py_ssize_t deleted = 0;
    if (IS_U64MAP(d)) {
        U64Map *um = (U64Map *)d;
        for (Py_ssize_t i = 0; i < ks.n; i++) {
            uint64_t u;
            if (ks.is_buf)
                u = ks.u[i];
            else if (get_u64(ks.items[i], &u) < 0)
                goto fail;
            Py_ssize_t at = um_find(um, u);
            if (at < 0)
                continue;
            PyObject *m = PyNumber_And(um->slots[at].val, keep);
            int nonzero = m == NULL ? -1 : PyObject_IsTrue(m);
            if (nonzero < 0 || (nonzero && um_check_val(m) < 0)) {
                Py_XDECREF(m);
                goto fail;
            }
            if (nonzero) {
                Py_SETREF(um->slots[at].val, m);
                continue;
            }
            Py_DECREF(m);
            um_del_at(um, at);
            deleted++;
        }
        keys_close(&ks);
        return PyLong_FromSsize_t(deleted);
    }
    if (IS_U64DICT(d)) {
        U64Dict *ud = (U64Dict *)d;
        for (Py_ssize_t i = 0; i < ks.n; i++) {
            uint64_t u;
            if (ks.is_buf)
                u = ks.u[i];
            else if (get_u64(ks.items[i], &u) < 0)
                goto fail;
            Py_ssize_t s = ud_slot(ud, u);
            if (s < 0)
                continue;
            PyObject *m = PyNumber_And(UD_VAL(ud, s), keep);
            int nonzero = m == NULL ? -1 : PyObject_IsTrue(m);
            if (nonzero < 0 || (nonzero && um_check_val(m) < 0)) {
                Py_XDECREF(m);
                goto fail;
            }
            if (nonzero) {
                Py_SETREF(UD_VAL(ud, s), m);
                continue;
            }
            Py_DECREF(m);
            ud_del_slot(ud, s);
            deleted++;
        }
        keys_close(&ks);
        return PyLong_FromSsize_t(deleted);
    }
    for (Py_ssize_t i = 0; i < ks.n; i++) {
        PyObject *k = keys_get(&ks, i);
        if (k == NULL)
            goto fail;
        PyObject *old = map_get(d, k);
        if (old == NULL) {
            Py_DECREF(k);
            if (PyErr_Occurred())
                goto fail;
            continue;
        }
        int gone = clear_bits(d, k, old, keep);
        Py_DECREF(k);
        if (gone < 0)
            goto fail;
        deleted += gone;
    }
    keys_close(&ks);
    return PyLong_FromSsize_t(deleted);
fail:
    keys_close(&ks);
    return NULL;
}

PyDoc_STRVAR(lookup_doc,
"lookup(d, keys) -> list\n\n"
"[d.get(k) for k in keys].");

static PyObject *
lookup(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    keys_t ks;
    if (dict_args(args, nargs, 2, "lookup", &ks) < 0)
        return NULL;
    PyObject *out = PyList_New(ks.n);
    for (Py_ssize_t i = 0; out != NULL && i < ks.n; i++) {
        PyObject *k = keys_get(&ks, i);
        PyObject *v = k == NULL ? NULL : map_get(args[0], k);
        Py_XDECREF(k);
        if (v == NULL && (k == NULL || PyErr_Occurred()))
            Py_CLEAR(out);
        else
            PyList_SET_ITEM(out, i, Py_NewRef(v != NULL ? v : Py_None));
    }
    keys_close(&ks);
    return out;
}

/* A sequence of dicts (the index's tiers): a new reference from PySequence_Fast, or NULL. */
static PyObject *
tiers_open(PyObject *obj, const char *name)
{
    PyObject *tiers = PySequence_Fast(obj, "tiers must be a sequence of dicts or U64Maps");
    if (tiers == NULL)
        return NULL;
    for (Py_ssize_t j = 0; j < PySequence_Fast_GET_SIZE(tiers); j++) {
        if (!is_map(PySequence_Fast_GET_ITEM(tiers, j))) {
            PyErr_Format(PyExc_TypeError, "%s(): tiers must be dicts or U64Maps", name);
            Py_DECREF(tiers);
            return NULL;
        }
    }
    return tiers;
}

/* 1 when some tier holds r, 0 when none does, -1 on error. */
static int
indexed_in(PyObject *tiers, PyObject *r)
{
    for (Py_ssize_t j = 0; j < PySequence_Fast_GET_SIZE(tiers); j++) {
        int rc = map_contains(PySequence_Fast_GET_ITEM(tiers, j), r);
        if (rc != 0)
            return rc;
    }
    return 0;
}

PyDoc_STRVAR(forget_unindexed_doc,
"forget_unindexed(emap, engine_keys, tiers) -> int\n\n"
"Delete emap[e] for each e whose value is in none of the dicts of the sequence tiers;\n"
"returns how many were deleted.");

static PyObject *
forget_unindexed(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    keys_t ks;
    if (dict_args(args, nargs, 3, "forget_unindexed", &ks) < 0)
        return NULL;
    PyObject *emap = args[0];
    Py_ssize_t deleted = 0;
    PyObject *tiers = tiers_open(args[2], "forget_unindexed");
    if (tiers == NULL)
        goto fail;
    for (Py_ssize_t i = 0; i < ks.n; i++) {
        PyObject *e = keys_get(&ks, i);
        if (e == NULL)
            goto fail;
        PyObject *r = map_get(emap, e);
        int indexed = r == NULL ? (PyErr_Occurred() ? -1 : 1) : indexed_in(tiers, r);
        if (indexed == 0) {
            indexed = map_del(emap, e);
            deleted++;
        }
        Py_DECREF(e);
        if (indexed < 0)
            goto fail;
    }
    Py_DECREF(tiers);
    keys_close(&ks);
    return PyLong_FromSsize_t(deleted);
fail:
    Py_XDECREF(tiers);
    keys_close(&ks);
    return NULL;
}

PyDoc_STRVAR(add_engine_doc,
"add_engine(d, emap, keys, engine, bit, recency) -> int\n\n"
"or_bits(d, keys, bit, recency), then emap[engine[i]] = keys[i] for every i (keys and engine\n"
"are lists of equal length); returns how many keys were new in d.");

static PyObject *
add_engine(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 6) {
        PyErr_Format(PyExc_TypeError, "add_engine() takes 6 arguments (%zd given)", nargs);
        return NULL;
    }
    if (!is_map(args[1]) || !PyList_CheckExact(args[2]) || !PyList_CheckExact(args[3])) {
        PyErr_SetString(PyExc_TypeError, "add_engine(): expected map, map, list, list");
        return NULL;
    }
    if (PyList_GET_SIZE(args[2]) != PyList_GET_SIZE(args[3])) {
        PyErr_SetString(PyExc_ValueError, "add_engine(): keys and engine differ in length");
        return NULL;
    }
    PyObject *added = or_bits(self, (PyObject *const[]){args[0], args[2], args[4], args[5]}, 4);
    if (added == NULL)
        return NULL;
    PyObject *emap = args[1], *keys = args[2], *engine = args[3];
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(keys); i++) {
        if (map_set(emap, PyList_GET_ITEM(engine, i), PyList_GET_ITEM(keys, i)) < 0) {
            Py_DECREF(added);
            return NULL;
        }
    }
    return added;
}

PyDoc_STRVAR(remove_engine_doc,
"remove_engine(d, emap, engine, keep, tiers) -> (keys, unknown, deleted)\n\n"
"For each engine key in order: r = emap.get(e) (counted in unknown when absent, else appended\n"
"to keys); d[r] &= keep, deleting r when its mask becomes 0 (counted in deleted); then, when\n"
"no dict of tiers holds r any more, del emap[e].");

static PyObject *
remove_engine(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5) {
        PyErr_Format(PyExc_TypeError, "remove_engine() takes 5 arguments (%zd given)", nargs);
        return NULL;
    }
    PyObject *d = args[0], *emap = args[1], *keep = args[3];
    if (!is_map(d) || !is_map(emap)) {
        PyErr_SetString(PyExc_TypeError, "remove_engine(): expected two maps");
        return NULL;
    }
    keys_t ks;
    if (keys_open(args[2], &ks) < 0)
        return NULL;
    PyObject *tiers = tiers_open(args[4], "remove_engine");
    PyObject *keys = PyList_New(0);
    Py_ssize_t unknown = 0, deleted = 0;
    if (tiers == NULL || keys == NULL)
        goto fail;
    for (Py_ssize_t i = 0; i < ks.n; i++) {
        PyObject *e = keys_get(&ks, i);
        if (e == NULL)
            goto fail;
        PyObject *r = map_get(emap, e);
        if (r == NULL) {
            Py_DECREF(e);
            if (PyErr_Occurred())
                goto fail;
            unknown++;
            continue;
        }
        Py_INCREF(r); /* emap's entry may go below */
        int rc = PyList_Append(keys, r);
        PyObject *m = rc < 0 ? NULL : map_get(d, r);
        if (m != NULL) {
            int gone = clear_bits(d, r, m, keep);
            rc = gone < 0 ? -1 : 0;
            deleted += gone > 0;
        }
        else if (PyErr_Occurred()) {
            rc = -1;
        }
        if (rc == 0) {
            int indexed = indexed_in(tiers, r);
            rc = indexed < 0 ? -1 : indexed ? 0 : map_del(emap, e);
        }
        Py_DECREF(r);
        Py_DECREF(e);
        if (rc < 0)
            goto fail;
    }
    Py_DECREF(tiers);
    keys_close(&ks);
    PyObject *out = Py_BuildValue("(Nnn)", keys, unknown, deleted);
    return out;
fail:
    Py_XDECREF(tiers);
    Py_XDECREF(keys);
    keys_close(&ks);
    return NULL;
}

PyDoc_STRVAR(xor_u64_doc,
"xor_u64(hashes, tag) -> list[int]\n\n"
"[u64(h) ^ tag for h in hashes], where u64 of an int is itself (it must be in [0, 2**64)) and\n"
"of bytes is their last 8 bytes, big-endian (a published raw digest).");

static PyObject *
xor_u64(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "xor_u64() takes 2 arguments (%zd given)", nargs);
        return NULL;
    }
    uint64_t tag;
    if (get_u64(args[1], &tag) < 0)
        return NULL;
    PyObject *seq = PySequence_Fast(args[0], "hashes must be a sequence");
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    PyObject *out = PyList_New(n);
    if (out == NULL)
        goto fail;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *h = items[i];
        uint64_t v;
        if (PyBytes_Check(h)) {
            Py_ssize_t len = PyBytes_GET_SIZE(h);
            const unsigned char *b = (const unsigned char *)PyBytes_AS_STRING(h);
            Py_ssize_t take = len < 8 ? len : 8;
            v = be(b + len - take, (int)take);
        }
        else if (get_u64(h, &v) < 0) {
            goto fail;
        }
        PyObject *x = PyLong_FromUnsignedLongLong(v ^ tag);
        if (x == NULL)
            goto fail;
        PyList_SET_ITEM(out, i, x);
    }
    Py_DECREF(seq);
    return out;
fail:
    Py_XDECREF(out);
    Py_DECREF(seq);
    return NULL;
}

static PyMethodDef methods[] = {
    {"msgpack_u32_count", (PyCFunction)msgpack_u32_count, METH_O, msgpack_u32_count_doc},
    {"chain_u32", (PyCFunction)(void (*)(void))chain_u32, METH_FASTCALL, chain_u32_doc},
    {"chain_msgpack", (PyCFunction)(void (*)(void))chain_msgpack, METH_FASTCALL,
     chain_msgpack_doc},
    {"or_bits", (PyCFunction)(void (*)(void))or_bits, METH_FASTCALL, or_bits_doc},
    {"and_bits", (PyCFunction)(void (*)(void))and_bits, METH_FASTCALL, and_bits_doc},
    {"lookup", (PyCFunction)(void (*)(void))lookup, METH_FASTCALL, lookup_doc},
    {"forget_unindexed", (PyCFunction)(void (*)(void))forget_unindexed, METH_FASTCALL,
     forget_unindexed_doc},
    {"add_engine", (PyCFunction)(void (*)(void))add_engine, METH_FASTCALL, add_engine_doc},
    {"remove_engine", (PyCFunction)(void (*)(void))remove_engine, METH_FASTCALL,
     remove_engine_doc},
    {"xor_u64", (PyCFunction)(void (*)(void))xor_u64, METH_FASTCALL, xor_u64_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "kvray._speedups",
    "The write path's inner loops in C; pure-Python twins in kvray.core.fast.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    if (PyType_Ready(&U64Map_Type) < 0 || PyType_Ready(&U64Dict_Type) < 0)
        return NULL;
    PyObject *mod = PyModule_Create(&module);
    if (mod != NULL && (PyModule_AddObjectRef(mod, "U64Map", (PyObject *)&U64Map_Type) < 0
                        || PyModule_AddObjectRef(mod, "U64Dict", (PyObject *)&U64Dict_Type) < 0))
        Py_CLEAR(mod);
    return mod;
}

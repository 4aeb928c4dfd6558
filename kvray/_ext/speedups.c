/*
 * kvray._speedups: the write path's inner loops in C (see kvray/core/fast.py).
 *
 * Every function here has a pure-Python twin in kvray/core/fast.py with the same results; the
 * tests compare the two on random inputs. Nothing here trusts its input: malformed msgpack or
 * out-of-range values raise ValueError / OverflowError / TypeError, never read out of bounds.
 *
 * Hashing is xxHash's XXH3-64 with a seed (vendored xxhash.h 0.8.4, BSD-2-Clause, the same code
 * the `xxhash` PyPI package wraps), so keys equal `xxhash.xxh3_64_intdigest(data, seed)`.
 *
 * Only CPython's public C API is used (no _Py* calls). scripts/sanitize.sh builds this file with
 * AddressSanitizer + UBSan and runs tests/unit/test_fast.py and a differential fuzz under it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <limits.h>
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
    /* Every item takes at least a byte: a longer count cannot be complete, and must not size
     * an allocation (a 5-byte header could otherwise ask for 32 GB of keys). */
    if (*n > end - p)
        return -1;
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
    if (b <= 0x7f) {
        *out = b;
        *pp = p;
        return 0;
    }
    /* tokens are mostly 0xcd / 0xce (vocabularies of 2^16 - 2^18) */
    if (b == 0xcd) {
        if (end - p < 2)
            return -1;
        *out = ((uint32_t)p[0] << 8) | p[1];
        *pp = p + 2;
        return 0;
    }
    if (b == 0xce) {
        if (end - p < 4)
            return -1;
        *out = ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
        *pp = p + 4;
        return 0;
    }
    uint64_t v;
    int n = 0;
    int is_signed = 0;
    switch (b) {
    case 0xcc: n = 1; break;
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

/* An int (bool and other subclasses included, no __index__) in [0, 2**64), through the public
 * API only. PyLong_AsUnsignedLongLong converts ints of more than one 30-bit digit (every hash)
 * through the generic byte-array routine; PyLong_AsUnsignedLong reads the digits directly and
 * raises OverflowError for negative and too-large ints, so use it where a long has 64 bits
 * (LP64: Linux, macOS). */
static int
get_u64(PyObject *obj, uint64_t *out)
{
    if (!PyLong_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "expected an int, got %.100s", Py_TYPE(obj)->tp_name);
        return -1;
    }
#if ULONG_MAX >= UINT64_MAX
    unsigned long v = PyLong_AsUnsignedLong(obj);
    if (v == (unsigned long)-1 && PyErr_Occurred())
        return -1;
#else
    unsigned long long v = PyLong_AsUnsignedLongLong(obj);
    if (v == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
#endif
    *out = (uint64_t)v;
    return 0;
}

static int
check_nargs(const char *name, Py_ssize_t nargs, Py_ssize_t want)
{
    if (nargs == want)
        return 0;
    PyErr_Format(PyExc_TypeError, "%s() takes %zd arguments (%zd given)", name, want, nargs);
    return -1;
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
    if (check_nargs(name, nargs, 3) < 0)
        return -1;
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

/* Key i as a u64 (an int key is range-checked): no int object for an array's keys. */
static inline int
keys_u64(keys_t *k, Py_ssize_t i, uint64_t *u)
{
    if (k->is_buf) {
        *u = k->u[i];
        return 0;
    }
    return get_u64(k->items[i], u);
}

static void
keys_close(keys_t *k)
{
    if (k->is_buf)
        PyBuffer_Release(&k->view);
    Py_XDECREF(k->seq);
}

/* --- C tables for the index: U64Map and U64Dict ------------------------------------------------ */

/* A dict keyed by ints costs, per entry, a 24-byte entry, an index slot and a 32-36-byte int
 * object for the key, and a lookup touches all three (the key object to compare it). These
 * tables store the key as a machine word next to its value in a 16-byte slot. Values must be
 * ints (they cannot form reference cycles, so neither type is tracked by the garbage collector).
 *
 * U64Map (no order): the slots are the hash table itself; linear probing on a power-of-two
 * table kept at most 3/4 full, deletion by backward shift (no tombstones), halved when 7/8
 * empty. The engine map and read replicas' tiers.
 *
 * U64Dict (a dict's order): CPython's compact-dict layout specialised for u64 keys. Entries
 * (key, value) are appended in order, deletions leave holes; an open-addressing index of entry
 * numbers (linear probing, backward-shift deletion), each with 32 bits of its key's hash, finds
 * a key reading only the entry whose hash matches, and shifts on deletion without reading
 * entries. Holes are squeezed out when the entry array fills or is 7/8 empty. A shard's tiers
 * (recency order: the index re-inserts a stored key and evicts from the front).
 *
 * The Python-facing methods are written once, over the small set of operations below. */

/* A table value is a machine word. Holder masks and request keys are ints the tables hold by the
 * million, and an int object each cost an allocation, a free and 32 bytes or more per stored
 * block (in every shard and every read replica). So most values live in the word itself:
 *   v == 0:      an empty slot (U64Map) or a hole (U64Dict);
 *   v & 1:       the int v >> 1 (0 <= n < 2**63: masks of slots below 63, half the request keys);
 *   v & 3 == 2:  a set of k = ((v >> 2) & 7) + 1 slots s_i, the int sum(1 << s_i): slots
 *                sorted, 59 // k bits each from bit 5 up (a key's holders when they are few:
 *                one at any slot, 2 below slot 2**29, 4 below 16,384, 5 below 2,048, 8 below
 *                128);
 *                used only for ints of 2**63 and more (smaller ones are the form above);
 *   otherwise:   an int object (a strong reference), for every other int.
 * Object pointers are at least 4-aligned, so the tags never collide with them. */
typedef uintptr_t tval;

#define TV_INT_MAX ((uint64_t)(UINTPTR_MAX >> 1))
#define TV_IS_OBJ(v) (((v)&3) == 0)

typedef struct {
    uint64_t key;
    tval val;
} u64slot;

typedef struct {
    PyObject_HEAD
    u64slot *slots;
    Py_ssize_t cap; /* 0 or a power of two */
    Py_ssize_t used;
    uint64_t seed; /* this table's hash seed (table_seed) */
    uint64_t xk;   /* u64 values (the engine map): each stored as v ^ xk, never 0; 0: tagged */
} U64Map;

/* A U64Dict index position: an entry number and the low 32 bits of its key's hash, so a probe
 * skips other keys and a deletion shifts entries back without reading the entries. */
typedef struct {
    uint32_t e;
    uint32_t h;
} udix;

#define UD_EMPTY UINT32_MAX

typedef struct {
    PyObject_HEAD
    u64slot *ent;       /* entries in order */
    Py_ssize_t ent_cap;
    Py_ssize_t ent_n;   /* entries appended so far (holes included) */
    Py_ssize_t head;    /* no live entry before this one */
    Py_ssize_t used;    /* live entries */
    udix *idx;          /* entry numbers (UD_EMPTY: none) with their keys' hashes */
    Py_ssize_t idx_cap; /* 0 or a power of two, > used * 4 / 3 */
    uint64_t seed;      /* this table's hash seed (table_seed) */
} U64Dict;

static PyTypeObject U64Map_Type, U64Dict_Type;

/* - table values (tval) - */

static inline tval
tv_dup(tval v)
{
    if (v && TV_IS_OBJ(v))
        Py_INCREF((PyObject *)v);
    return v;
}

static inline void
tv_drop(tval v)
{
    if (v && TV_IS_OBJ(v))
        Py_DECREF((PyObject *)v);
}

#define SET_MAX 8

static inline int
set_k(tval v)
{
    return (int)((v >> 2) & 7) + 1;
}

static inline uint64_t
set_slot(tval v, int k, int i)
{
    int w = 59 / k;
    return ((uint64_t)v >> (5 + i * w)) & (((uint64_t)1 << w) - 1);
}

/* The set of sorted slots s[0..k) (1 <= k <= SET_MAX) as a value, or 0 when a slot does not fit
 * 59 // k bits. */
static inline tval
set_make(const uint64_t *sl, int k)
{
    int w = 59 / k;
    uint64_t v = (uint64_t)(k - 1) << 2 | 2;
    for (int i = 0; i < k; i++) {
        if (sl[i] >> w)
            return 0;
        v |= sl[i] << (5 + i * w);
    }
    return (tval)v;
}

static inline tval
tv_pow2(uint64_t e)
{
    return set_make(&e, 1);
}

/* sum(1 << sl[i]) for sorted slots sl[0..k) as an int object; NULL on error. */
static PyObject *
long_of_slots(const uint64_t *sl, int k)
{
    size_t n = (size_t)(sl[k - 1] / 8 + 1);
    unsigned char stack[512], *b = n <= sizeof(stack) ? stack : PyMem_Calloc(n, 1);
    if (b == NULL) {
        PyErr_NoMemory();
        return 0;
    }
    if (b == stack)
        memset(b, 0, n);
    for (int i = 0; i < k; i++)
        b[sl[i] / 8] |= (unsigned char)(1u << (sl[i] % 8));
    PyObject *o = _PyLong_FromByteArray(b, n, 1, 0);
    if (b != stack)
        PyMem_Free(b);
    return o;
}

/* The int of sorted slots sl[0..k) (1 <= k <= SET_MAX) as a value (owned): a word int below
 * 2**63, else a set, else an int object; 0 with an exception on error. */
static tval
tv_of_slots(const uint64_t *sl, int k)
{
    if (sl[k - 1] < 63) {
        uint64_t u = 0;
        for (int i = 0; i < k; i++)
            u |= (uint64_t)1 << sl[i];
        return (tval)((u << 1) | 1);
    }
    tval v = set_make(sl, k);
    return v != 0 ? v : (tval)long_of_slots(sl, k);
}

/* u as a value (owned); 0 with an exception when an int object could not be made. */
static inline tval
tv_of_u64(uint64_t u)
{
    if (u <= TV_INT_MAX)
        return (tval)((u << 1) | 1);
    uint64_t sl[SET_MAX];
    int k = 0;
    for (uint64_t x = u; x && k <= SET_MAX; x &= x - 1)
        if (k++ < SET_MAX)
            sl[k - 1] = (uint64_t)__builtin_ctzll(x);
    if (k <= SET_MAX) {
        tval v = set_make(sl, k);
        if (v != 0)
            return v;
    }
    return (tval)PyLong_FromUnsignedLongLong(u);
}

/* The slots of a word int or a set, sorted, into sl[0..SET_MAX): their count, or -1 for an int
 * object or a word int of more than SET_MAX bits. */
static inline int
tv_slots(tval v, uint64_t *sl)
{
    if ((v & 3) == 2) {
        int k = set_k(v);
        for (int i = 0; i < k; i++)
            sl[i] = set_slot(v, k, i);
        return k;
    }
    if (!(v & 1))
        return -1;
    int k = 0;
    for (uint64_t x = (uint64_t)(v >> 1); x; x &= x - 1) {
        if (k == SET_MAX)
            return -1;
        sl[k++] = (uint64_t)__builtin_ctzll(x);
    }
    return k;
}

/* 1 with *u set when v's int is in [0, 2**64), else 0 (no exception left set). */
static inline int
tv_u64(tval v, uint64_t *u)
{
    if (v & 1) {
        *u = (uint64_t)(v >> 1);
        return 1;
    }
    if ((v & 3) == 2) {
        int k = set_k(v);
        if (set_slot(v, k, k - 1) >= 64)
            return 0;
        *u = 0;
        for (int i = 0; i < k; i++)
            *u |= (uint64_t)1 << set_slot(v, k, i);
        return 1;
    }
    PyObject *o = (PyObject *)v; /* sized first: an OverflowError raised and cleared costs more */
    if (_PyLong_Sign(o) < 0 || _PyLong_NumBits(o) > 64)
        return 0;
    *u = (uint64_t)PyLong_AsUnsignedLongLong(o);
    return 1;
}

/* 1 << e for e >= 64, made once per process for the slots in use (a table of up to 8,192
 * bits: a holder's bit at a high slot is boxed whenever a key it holds gains another holder). */
#define POW2_CACHED 8192
static PyObject **pow2_cache;

static PyObject *
pow2_new(uint64_t e)
{
    if (e < POW2_CACHED && pow2_cache != NULL && pow2_cache[e] != NULL)
        return Py_NewRef(pow2_cache[e]);
    PyObject *one = PyLong_FromLong(1), *sh = PyLong_FromUnsignedLongLong(e);
    PyObject *out = one == NULL || sh == NULL ? NULL : PyNumber_Lshift(one, sh);
    Py_XDECREF(one);
    Py_XDECREF(sh);
    if (out != NULL && e < POW2_CACHED) {
        if (pow2_cache == NULL)
            pow2_cache = PyMem_Calloc(POW2_CACHED, sizeof(PyObject *));
        if (pow2_cache != NULL)
            pow2_cache[e] = Py_NewRef(out);
    }
    return out;
}

/* v's int as a new object. */
static PyObject *
tv_box(tval v)
{
    if (v & 1)
        return PyLong_FromUnsignedLongLong((uint64_t)(v >> 1));
    if ((v & 3) == 2) {
        uint64_t u, sl[SET_MAX];
        int k = tv_slots(v, sl);
        if (k == 1 && sl[0] >= 64)
            return pow2_new(sl[0]);
        if (tv_u64(v, &u))
            return PyLong_FromUnsignedLongLong(u);
        return long_of_slots(sl, k);
    }
    return Py_NewRef((PyObject *)v);
}

/* The set bits of the int o (> 0), up to SET_MAX, into sl: their count, -1 when more, -2 on
 * error. */
static int
long_slots(PyObject *o, uint64_t *sl)
{
    size_t nbits = _PyLong_NumBits(o);
    if (nbits == (size_t)-1 && PyErr_Occurred())
        return -2;
    size_t n = (nbits + 7) / 8;
    unsigned char stack[512], *b = n <= sizeof(stack) ? stack : PyMem_Malloc(n);
    if (b == NULL) {
        PyErr_NoMemory();
        return -2;
    }
#if PY_VERSION_HEX >= 0x030D0000
    int rc = PyLong_AsNativeBytes(o, b, (Py_ssize_t)n,
                                  Py_ASNATIVEBYTES_LITTLE_ENDIAN | Py_ASNATIVEBYTES_UNSIGNED_BUFFER)
             < 0;
#else
    int rc = _PyLong_AsByteArray((PyLongObject *)o, b, n, 1, 0) < 0;
#endif
    int k = rc ? -2 : 0;
    for (size_t i = 0; k >= 0 && i < n; i++) {
        for (unsigned int x = b[i]; x && k >= 0; x &= x - 1) {
            if (k == SET_MAX)
                k = -1;
            else
                sl[k++] = i * 8 + (uint64_t)__builtin_ctz(x);
        }
    }
    if (b != stack)
        PyMem_Free(b);
    return k;
}

/* The int o (exact) as a value (owned); 0 with an exception on error. */
static tval
tv_of_obj(PyObject *o)
{
    if (_PyLong_Sign(o) >= 0) {
        if (_PyLong_NumBits(o) <= 64)
            return tv_of_u64((uint64_t)PyLong_AsUnsignedLongLong(o));
        uint64_t sl[SET_MAX];
        int k = long_slots(o, sl);
        if (k == -2)
            return 0;
        tval v = k > 0 ? set_make(sl, k) : 0;
        if (v != 0)
            return v;
    }
    return (tval)Py_NewRef(o);
}

/* v's int as a u64; -1 with an exception when it is not one (engine-map values). */
static int
tv_get_u64(tval v, uint64_t *u)
{
    if (tv_u64(v, u))
        return 0;
    PyErr_SetString(PyExc_OverflowError, "table value is not in [0, 2**64)");
    return -1;
}

/* The bytes of an int object's size (sys.getsizeof without the call). */
static Py_ssize_t
long_bytes(PyObject *o)
{
    size_t nbits = _PyLong_NumBits(o);
    if (nbits == (size_t)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        nbits = 0;
    }
    Py_ssize_t item = Py_TYPE(o)->tp_itemsize, per = item * 8 - (item == 4 ? 2 : 1);
    Py_ssize_t digits = per > 0 ? ((Py_ssize_t)nbits + per - 1) / per : 0;
    return Py_TYPE(o)->tp_basicsize + item * (digits ? digits : 1);
}

#define IS_U64MAP(o) Py_IS_TYPE((o), &U64Map_Type)
#define IS_U64DICT(o) Py_IS_TYPE((o), &U64Dict_Type)
#define IS_TABLE(o) (IS_U64MAP(o) || IS_U64DICT(o))

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

/* Each table hashes with its own seed. With one hash function for all tables, a table filled in
 * another's slot order (a U64Map's items() is in hash order: the engine map a snapshot carries)
 * lands every key right after the previous one's home while it is smaller than the source:
 * primary clustering, quadratic. Restoring a 5 M-entry engine map took 510 s that way. */
static uint64_t seed_base;
static uint64_t seed_count;

static inline uint64_t
table_seed(void)
{
    return (uint64_t)mix64(seed_base + ++seed_count * 0x9E3779B97F4A7C15ULL);
}

/* - a U64Map of u64 values (the engine map: engine key -> request key) -
 *
 * Request keys are uniform u64s: half of them are 2**63 or more, which a tagged value would hold
 * as an int object. A U64Map made with u64_values=True stores each value v as v ^ xk instead
 * (xk: the table's own random word), so every value is in the slot; 0 still marks an empty
 * slot. The one value that would encode as 0 (v == xk) makes the table pick another xk and
 * re-encode what it holds. Such a table only takes ints in [0, 2**64). */

#define IS_RAW(o) (IS_U64MAP(o) && ((U64Map *)(o))->xk != 0)

static inline PyObject *
tb_box(PyObject *m, tval v)
{
    return IS_RAW(m) ? PyLong_FromUnsignedLongLong((uint64_t)v ^ ((U64Map *)m)->xk) : tv_box(v);
}

static inline void
tb_drop(PyObject *m, tval v)
{
    if (!IS_RAW(m))
        tv_drop(v);
}

/* A stored value's int as a u64: 0, or -1 with an exception when it is not one. */
static inline int
tb_get_u64(PyObject *m, tval v, uint64_t *u)
{
    if (IS_RAW(m)) {
        *u = (uint64_t)v ^ ((U64Map *)m)->xk;
        return 0;
    }
    return tv_get_u64(v, u);
}

/* A new xk for a u64-values table, none of whose values (nor `also`) equals it. */
static void
raw_rekey(U64Map *m, uint64_t also)
{
    uint64_t old = m->xk, xk;
    for (;;) {
        xk = table_seed();
        int clash = xk == 0 || xk == also;
        for (Py_ssize_t i = 0; !clash && i < m->cap; i++)
            clash = m->slots[i].val != 0 && ((uint64_t)m->slots[i].val ^ old) == xk;
        if (!clash)
            break;
    }
    for (Py_ssize_t i = 0; i < m->cap; i++)
        if (m->slots[i].val != 0)
            m->slots[i].val = (tval)((uint64_t)m->slots[i].val ^ old ^ xk);
    m->xk = xk;
}

/* u as a value of table m (owned); 0 with an exception on error. */
static inline tval
tb_of_u64(PyObject *m, uint64_t u)
{
    if (!IS_RAW(m))
        return tv_of_u64(u);
    U64Map *t = (U64Map *)m;
    if (u == t->xk)
        raw_rekey(t, u);
    return (tval)(u ^ t->xk);
}

/* The int o as a value of table m (owned); 0 with an exception on error. */
static tval
tb_of_obj(PyObject *m, PyObject *o)
{
    uint64_t u;
    if (!IS_RAW(m))
        return tv_of_obj(o);
    return get_u64(o, &u) < 0 ? 0 : tb_of_u64(m, u);
}

/* Mask operations need tagged values: -1 with TypeError for a u64-values table. */
static int
mask_table(PyObject *d, const char *name)
{
    if (!IS_RAW(d))
        return 0;
    PyErr_Format(PyExc_TypeError, "%s(): a U64Map of u64 values holds no masks", name);
    return -1;
}

/* Delete position `hole` of a linear-probing table of `cap` positions by shifting later members
 * of its probe run back; hash_at(i) is the hash of the key at a full position (its home is the
 * hash's low bits), full(i) whether it is full. */
#define BACKWARD_SHIFT(cap, start, full, hash_at, move)                                      \
    do {                                                                                     \
        size_t mask_ = (size_t)(cap) - 1, hole_ = (size_t)(start), j_ = hole_;               \
        for (;;) {                                                                           \
            j_ = (j_ + 1) & mask_;                                                           \
            if (!(full(j_)))                                                                 \
                break;                                                                       \
            size_t home_ = (size_t)(hash_at(j_)) & mask_;                                    \
            /* j_ may fill the hole when its home is not within (hole_, j_] (cyclically) */  \
            if (((j_ - home_) & mask_) >= ((j_ - hole_) & mask_)) {                          \
                move(hole_, j_);                                                             \
                hole_ = j_;                                                                  \
            }                                                                                \
        }                                                                                    \
        start = hole_;                                                                       \
    } while (0)

/* - U64Map internals - */

static inline Py_ssize_t
um_find(PyObject *o, uint64_t k)
{
    U64Map *m = (U64Map *)o;
    if (m->cap == 0)
        return -1;
    size_t mask = (size_t)m->cap - 1, i = mix64(k ^ m->seed) & mask;
    for (;;) {
        const u64slot *s = &m->slots[i];
        if (s->val == 0)
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
        if (s->val == 0)
            continue;
        size_t j = mix64(s->key ^ m->seed) & mask;
        while (fresh[j].val != 0)
            j = (j + 1) & mask;
        fresh[j] = *s;
    }
    PyMem_Free(m->slots);
    m->slots = fresh;
    m->cap = cap;
    return 0;
}

/* Insert k (absent) -> v, which it takes (dropped on error). */
static int
um_add(PyObject *o, uint64_t k, tval v)
{
    U64Map *m = (U64Map *)o;
    if ((m->used + 1) * 4 > m->cap * 3 && um_resize(m, m->cap ? m->cap * 2 : 8) < 0) {
        tb_drop(o, v);
        return -1;
    }
    size_t mask = (size_t)m->cap - 1, i = mix64(k ^ m->seed) & mask;
    while (m->slots[i].val != 0)
        i = (i + 1) & mask;
    m->slots[i].key = k;
    m->slots[i].val = v;
    m->used++;
    return 0;
}

static inline tval *
um_val(PyObject *o, Py_ssize_t at)
{
    return &((U64Map *)o)->slots[at].val;
}

#define UM_FULL(i) (m->slots[(i)].val != 0)
#define UM_HASH(i) mix64(m->slots[(i)].key ^ m->seed)
#define UM_MOVE(to, from) (m->slots[(to)] = m->slots[(from)])

static void
um_del_at(PyObject *o, Py_ssize_t at)
{
    U64Map *m = (U64Map *)o;
    tval v = m->slots[at].val;
    size_t hole = (size_t)at;
    BACKWARD_SHIFT(m->cap, hole, UM_FULL, UM_HASH, UM_MOVE);
    m->slots[hole].val = 0;
    m->slots[hole].key = 0;
    m->used--;
    tb_drop(o, v);
    if (m->cap > 64 && m->used * 8 < m->cap && um_resize(m, m->cap / 2) < 0)
        PyErr_Clear(); /* could not shrink: stay as large, still correct */
}

/* - U64Dict internals - */

static inline Py_ssize_t
ud_slot(PyObject *o, uint64_t k)
{
    U64Dict *m = (U64Dict *)o;
    if (m->idx_cap == 0)
        return -1;
    uint32_t h = (uint32_t)mix64(k ^ m->seed);
    size_t mask = (size_t)m->idx_cap - 1, i = h & mask;
    for (;;) {
        udix x = m->idx[i];
        if (x.e == UD_EMPTY)
            return -1;
        if (x.h == h && m->ent[x.e].key == k)
            return (Py_ssize_t)i;
        i = (i + 1) & mask;
    }
}

/* Rebuild the index for the current entries with idx_cap slots. */
static int
ud_reindex(U64Dict *m, Py_ssize_t idx_cap)
{
    udix *idx = PyMem_Malloc((size_t)idx_cap * sizeof(udix));
    if (idx == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    memset(idx, 0xff, (size_t)idx_cap * sizeof(udix)); /* all UD_EMPTY */
    size_t mask = (size_t)idx_cap - 1;
    for (Py_ssize_t e = m->head; e < m->ent_n; e++) {
        if (m->ent[e].val == 0)
            continue;
        uint32_t h = (uint32_t)mix64(m->ent[e].key ^ m->seed);
        size_t i = h & mask;
        while (idx[i].e != UD_EMPTY)
            i = (i + 1) & mask;
        idx[i].e = (uint32_t)e;
        idx[i].h = h;
    }
    PyMem_Free(m->idx);
    m->idx = idx;
    m->idx_cap = idx_cap;
    return 0;
}

/* Squeeze out the holes into an entry array of ent_cap (> used), then rebuild the index. */
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
        if (m->ent[e].val != 0)
            ent[n++] = m->ent[e];
    PyMem_Free(m->ent);
    m->ent = ent;
    m->ent_cap = ent_cap;
    m->ent_n = n;
    m->head = 0;
    Py_ssize_t idx_cap = 8;
    while (idx_cap * 3 < n * 4 + 4)
        idx_cap *= 2;
    return ud_reindex(m, idx_cap);
}

/* Room to append one entry: 0 when nothing moved, 1 when the entries or the index were rebuilt
 * (find slots again), -1 on error. */
static int
ud_reserve(U64Dict *m)
{
    if (m->ent_n < m->ent_cap) {
        if ((m->used + 1) * 4 > m->idx_cap * 3)
            return ud_reindex(m, m->idx_cap ? m->idx_cap * 2 : 8) < 0 ? -1 : 1;
        return 0;
    }
    Py_ssize_t cap = m->ent_cap ? m->ent_cap : 8;
    while (cap < (m->used + 1) * 3 / 2 + 1) /* room for holes before the next squeeze */
        cap *= 2;
    if ((uint64_t)cap >= UD_EMPTY) { /* entry numbers are 32-bit */
        PyErr_SetString(PyExc_MemoryError, "U64Dict: more than 2**32 - 2 entries");
        return -1;
    }
    return ud_compact(m, cap) < 0 ? -1 : 1;
}

/* Append (k, v) (v taken) and point index slot `slot` at it, or a free slot when slot < 0 (a
 * new key). ud_reserve must have run. */
static void
ud_append(U64Dict *m, uint64_t k, tval v, Py_ssize_t slot)
{
    Py_ssize_t e = m->ent_n++;
    m->ent[e].key = k;
    m->ent[e].val = v;
    if (slot < 0) {
        uint32_t h = (uint32_t)mix64(k ^ m->seed);
        size_t mask = (size_t)m->idx_cap - 1, i = h & mask;
        while (m->idx[i].e != UD_EMPTY)
            i = (i + 1) & mask;
        slot = (Py_ssize_t)i;
        m->idx[slot].h = h;
        m->used++;
    }
    m->idx[slot].e = (uint32_t)e; /* a moved key keeps its position and hash */
}

static int
ud_add(PyObject *o, uint64_t k, tval v)
{
    if (ud_reserve((U64Dict *)o) < 0) {
        tv_drop(v);
        return -1;
    }
    ud_append((U64Dict *)o, k, v, -1);
    return 0;
}

static inline tval *
ud_val(PyObject *o, Py_ssize_t slot)
{
    U64Dict *m = (U64Dict *)o;
    return &m->ent[m->idx[slot].e].val;
}

#define UD_FULL(i) (m->idx[(i)].e != UD_EMPTY)
#define UD_HASH(i) (m->idx[(i)].h)
#define UD_MOVE(to, from) (m->idx[(to)] = m->idx[(from)])

static void
ud_del_at(PyObject *o, Py_ssize_t slot)
{
    U64Dict *m = (U64Dict *)o;
    Py_ssize_t e = m->idx[slot].e;
    tval v = m->ent[e].val;
    m->ent[e].val = 0;
    if (e == m->ent_n - 1)
        m->ent_n--; /* the last entry: no hole left behind */
    size_t hole = (size_t)slot;
    BACKWARD_SHIFT(m->idx_cap, hole, UD_FULL, UD_HASH, UD_MOVE);
    m->idx[hole].e = UD_EMPTY;
    m->used--;
    tv_drop(v);
    if (m->used == 0)
        m->ent_n = m->head = 0;
    else if (m->ent_cap > 64 && m->used * 8 < m->ent_cap && ud_compact(m, m->ent_cap / 2) < 0)
        PyErr_Clear(); /* could not shrink: stay as large, still correct */
}

/* k (present, at `slot`) = v (taken), moved to the end (``d[k] = d.pop(k) ...``). */
static int
ud_move_last(PyObject *o, uint64_t k, Py_ssize_t slot, tval v)
{
    U64Dict *m = (U64Dict *)o;
    if (m->idx[slot].e == m->ent_n - 1) {
        tval *vp = &m->ent[m->idx[slot].e].val;
        tval prev = *vp;
        *vp = v;
        tv_drop(prev);
        return 0;
    }
    int moved = ud_reserve(m);
    if (moved < 0) {
        tv_drop(v);
        return -1;
    }
    if (moved)
        slot = ud_slot(o, k); /* the entries were renumbered */
    u64slot *old = &m->ent[m->idx[slot].e];
    tval prev = old->val;
    old->val = 0; /* a hole */
    ud_append(m, k, v, slot);
    tv_drop(prev);
    return 0;
}

/* Replace the value at *vp with v (taken). */
static inline void
tv_set(tval *vp, tval v)
{
    tval prev = *vp;
    *vp = v;
    tv_drop(prev);
}

/* - the operations the shared code uses - */

/* Prefetching: the tables are far larger than the caches, so a lookup is a cache miss or two
 * (a U64Map slot; a U64Dict index position, then its entry). Loops over a batch of keys ask for
 * key j + PF_DIST's lines while working on key j. Stage 0 fetches the first line (the slot, the
 * index position); stage 1, asked for a nearer key, reads the index position stage 0 fetched and
 * fetches the entry it names (a U64Map has no second line). Hints only: nothing is changed. */
#define PF_DIST 8

static inline void
um_prefetch(PyObject *o, uint64_t k, int stage)
{
    U64Map *m = (U64Map *)o;
    if (stage == 0 && m->cap)
        __builtin_prefetch(&m->slots[mix64(k ^ m->seed) & ((size_t)m->cap - 1)]);
}

static inline void
ud_prefetch(PyObject *o, uint64_t k, int stage)
{
    U64Dict *m = (U64Dict *)o;
    if (m->idx_cap == 0)
        return;
    const udix *x = &m->idx[(uint32_t)mix64(k ^ m->seed) & ((size_t)m->idx_cap - 1)];
    if (stage == 0)
        __builtin_prefetch(x);
    else if (x->e != UD_EMPTY)
        __builtin_prefetch(&m->ent[x->e]);
}

typedef struct {
    Py_ssize_t (*find)(PyObject *m, uint64_t k); /* a position, or -1 */
    tval *(*val)(PyObject *m, Py_ssize_t at);    /* the value at a position */
    int (*add)(PyObject *m, uint64_t k, tval v); /* insert an absent key (v taken) */
    void (*del_at)(PyObject *m, Py_ssize_t at);
    void (*prefetch)(PyObject *m, uint64_t k, int stage);
} table_ops;

static const table_ops um_ops = {um_find, um_val, um_add, um_del_at, um_prefetch};
static const table_ops ud_ops = {ud_slot, ud_val, ud_add, ud_del_at, ud_prefetch};

static inline const table_ops *
ops_of(PyObject *m)
{
    return IS_U64MAP(m) ? &um_ops : &ud_ops;
}

static inline Py_ssize_t
tb_used(PyObject *m)
{
    return IS_U64MAP(m) ? ((U64Map *)m)->used : ((U64Dict *)m)->used;
}

/* The slots holding entries, in order: the whole table (U64Map), or the entries from the first
 * live one (U64Dict; leading holes, left by evictions from the front, are skipped for good). */
static u64slot *
tb_slots(PyObject *o, Py_ssize_t *n)
{
    if (IS_U64MAP(o)) {
        *n = ((U64Map *)o)->cap;
        return ((U64Map *)o)->slots;
    }
    U64Dict *m = (U64Dict *)o;
    while (m->head < m->ent_n && m->ent[m->head].val == 0)
        m->head++;
    *n = m->ent_n - m->head;
    return m->ent + m->head;
}

static int
tb_check_val(PyObject *v)
{
    if (!PyLong_CheckExact(v)) {
        PyErr_Format(PyExc_TypeError, "table values must be ints, got %.100s",
                     Py_TYPE(v)->tp_name);
        return -1;
    }
    return 0;
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

/* A key that is not a u64 is simply absent (as in a dict): 1 found (position in *at), 0, -1. */
static int
tb_lookup(PyObject *m, PyObject *k, Py_ssize_t *at)
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
    *at = ops_of(m)->find(m, u);
    return *at >= 0;
}

/* m[k] = v (taken; 0: an error already set): in place when present (a U64Dict keeps the key's
 * place), else inserted. */
static int
tb_set(PyObject *m, uint64_t k, tval v)
{
    if (v == 0)
        return -1;
    const table_ops *op = ops_of(m);
    Py_ssize_t at = op->find(m, k);
    if (at < 0)
        return op->add(m, k, v);
    tval *vp = op->val(m, at), prev = *vp;
    *vp = v;
    tb_drop(m, prev); /* an int: its dealloc runs no code */
    return 0;
}

/* - the Python-facing methods, for both types - */

static void tb_clear_all(PyObject *o);
static int tb_update_from(PyObject *m, PyObject *src);

static PyObject *
tb_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    PyObject *src = NULL, *u64_values = NULL;
    int is_map = type == &U64Map_Type || PyType_IsSubtype(type, &U64Map_Type);
    static char *map_kw[] = {"", "u64_values", NULL}, *dict_kw[] = {"", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kw, is_map ? "|OO:U64Map" : "|O:U64Dict",
                                     is_map ? map_kw : dict_kw, &src, &u64_values))
        return NULL;
    /* u64_values may also be the table's first xk (an int other than a bool: tests) */
    uint64_t xk0 = 0;
    int raw = u64_values == NULL ? 0 : PyObject_IsTrue(u64_values);
    if (raw > 0 && PyLong_CheckExact(u64_values) && get_u64(u64_values, &xk0) < 0)
        return NULL;
    if (raw < 0)
        return NULL;
    if (src == Py_None)
        src = NULL;
    PyObject *m = type->tp_alloc(type, 0); /* zero-filled: an empty table */
    if (m != NULL) {
        if (is_map) {
            U64Map *t = (U64Map *)m;
            t->seed = table_seed();
#if UINTPTR_MAX >= UINT64_MAX /* a slot's word holds a u64 */
            if (raw && xk0)
                t->xk = xk0;
            else if (raw)
                raw_rekey(t, 0);
#endif
        }
        else {
            ((U64Dict *)m)->seed = table_seed();
        }
    }
    if (m != NULL && src != NULL && tb_update_from(m, src) < 0)
        Py_CLEAR(m);
    return m;
}

static void
tb_clear_all(PyObject *o)
{
    Py_ssize_t n;
    u64slot *s = tb_slots(o, &n);
    for (Py_ssize_t i = 0; i < n; i++) {
        tb_drop(o, s[i].val);
        s[i].val = 0;
    }
    if (IS_U64MAP(o)) {
        U64Map *m = (U64Map *)o;
        PyMem_Free(m->slots);
        m->slots = NULL;
        m->cap = m->used = 0;
    }
    else {
        U64Dict *m = (U64Dict *)o;
        PyMem_Free(m->ent);
        PyMem_Free(m->idx);
        m->ent = NULL;
        m->idx = NULL;
        m->ent_cap = m->ent_n = m->head = m->used = m->idx_cap = 0;
    }
}

static void
tb_dealloc(PyObject *m)
{
    tb_clear_all(m);
    Py_TYPE(m)->tp_free(m);
}

static Py_ssize_t
tb_len(PyObject *m)
{
    return tb_used(m);
}

static PyObject *
tb_subscript(PyObject *m, PyObject *k)
{
    Py_ssize_t at;
    int rc = tb_lookup(m, k, &at);
    if (rc == 0)
        set_key_error(k);
    return rc > 0 ? tb_box(m, *ops_of(m)->val(m, at)) : NULL;
}

static int
tb_ass_subscript(PyObject *m, PyObject *k, PyObject *v)
{
    if (v == NULL) {
        Py_ssize_t at;
        int rc = tb_lookup(m, k, &at);
        if (rc == 0)
            set_key_error(k);
        if (rc <= 0)
            return -1;
        ops_of(m)->del_at(m, at);
        return 0;
    }
    uint64_t u;
    if (get_u64(k, &u) < 0 || tb_check_val(v) < 0)
        return -1;
    return tb_set(m, u, tb_of_obj(m, v));
}

static int
tb_contains(PyObject *m, PyObject *k)
{
    Py_ssize_t at;
    return tb_lookup(m, k, &at);
}

/* get(k[, default]) (pop = 0) or pop(k[, default]) (pop = 1). */
static PyObject *
tb_get_or_pop(PyObject *m, PyObject *const *args, Py_ssize_t nargs, int pop)
{
    if (nargs < 1 || nargs > 2) {
        PyErr_Format(PyExc_TypeError, "%s() takes 1 or 2 arguments", pop ? "pop" : "get");
        return NULL;
    }
    Py_ssize_t at;
    int rc = tb_lookup(m, args[0], &at);
    if (rc < 0)
        return NULL;
    if (rc == 0) {
        if (nargs == 2 || !pop)
            return Py_NewRef(nargs == 2 ? args[1] : Py_None);
        set_key_error(args[0]);
        return NULL;
    }
    PyObject *v = tb_box(m, *ops_of(m)->val(m, at));
    if (v != NULL && pop)
        ops_of(m)->del_at(m, at);
    return v;
}

static PyObject *
tb_get(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    return tb_get_or_pop(m, args, nargs, 0);
}

static PyObject *
tb_pop(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    return tb_get_or_pop(m, args, nargs, 1);
}

/* 0: keys, 1: values, 2: items; in table order, at most `limit`, as a new list. */
static PyObject *
tb_list(PyObject *m, int what, Py_ssize_t limit)
{
    Py_ssize_t n, used = tb_used(m);
    u64slot *slots = tb_slots(m, &n);
    PyObject *out = PyList_New(limit < used ? limit : used);
    Py_ssize_t got = 0, want = out == NULL ? 0 : PyList_GET_SIZE(out);
    for (Py_ssize_t i = 0; out != NULL && got < want && i < n; i++) {
        u64slot *s = &slots[i];
        if (s->val == 0)
            continue;
        PyObject *x;
        if (what == 1) {
            x = tb_box(m, s->val);
        }
        else {
            PyObject *k = PyLong_FromUnsignedLongLong(s->key);
            PyObject *v = what == 0 || k == NULL ? NULL : tb_box(m, s->val);
            x = what == 0 || k == NULL ? k : v == NULL ? NULL : PyTuple_Pack(2, k, v);
            if (what == 2) {
                Py_XDECREF(k);
                Py_XDECREF(v);
            }
        }
        if (x == NULL)
            Py_CLEAR(out);
        else
            PyList_SET_ITEM(out, got++, x);
    }
    return out;
}

static PyObject *
tb_keys(PyObject *m, PyObject *unused)
{
    return tb_list(m, 0, PY_SSIZE_T_MAX);
}

static PyObject *
tb_values(PyObject *m, PyObject *unused)
{
    return tb_list(m, 1, PY_SSIZE_T_MAX);
}

static PyObject *
tb_items(PyObject *m, PyObject *unused)
{
    return tb_list(m, 2, PY_SSIZE_T_MAX);
}

static PyObject *
tb_oldest(PyObject *m, PyObject *arg)
{
    Py_ssize_t n = PyLong_AsSsize_t(arg);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    return tb_list(m, 2, n < 0 ? 0 : n);
}

static PyObject *
tb_iter(PyObject *m)
{
    PyObject *keys = tb_list(m, 0, PY_SSIZE_T_MAX);
    if (keys == NULL)
        return NULL;
    PyObject *it = PyObject_GetIter(keys);
    Py_DECREF(keys);
    return it;
}

/* From a mapping (its items()) or an iterable of (key, value) pairs. */
static int
tb_update_from(PyObject *m, PyObject *src)
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
        PyObject *fast = PySequence_Fast(pair, "update: expected (key, value) pairs");
        Py_DECREF(pair);
        if (fast == NULL)
            goto fail;
        uint64_t u;
        int rc = -1;
        if (PySequence_Fast_GET_SIZE(fast) != 2)
            PyErr_SetString(PyExc_ValueError, "update: expected (key, value) pairs");
        else if (get_u64(PySequence_Fast_GET_ITEM(fast, 0), &u) == 0
                 && tb_check_val(PySequence_Fast_GET_ITEM(fast, 1)) == 0)
            rc = tb_set(m, u, tb_of_obj(m, PySequence_Fast_GET_ITEM(fast, 1)));
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
tb_update(PyObject *m, PyObject *src)
{
    if (tb_update_from(m, src) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
tb_clear(PyObject *m, PyObject *unused)
{
    tb_clear_all(m);
    Py_RETURN_NONE;
}

static PyObject *
tb_sizeof(PyObject *o, PyObject *unused)
{
    Py_ssize_t size;
    if (IS_U64MAP(o)) {
        U64Map *m = (U64Map *)o;
        size = (Py_ssize_t)sizeof(U64Map) + m->cap * (Py_ssize_t)sizeof(u64slot);
    }
    else {
        U64Dict *m = (U64Dict *)o;
        size = (Py_ssize_t)sizeof(U64Dict) + m->ent_cap * (Py_ssize_t)sizeof(u64slot)
               + m->idx_cap * (Py_ssize_t)sizeof(udix);
    }
    return PyLong_FromSsize_t(size);
}

static PyObject *
tb_boxed_bytes(PyObject *o, PyObject *unused)
{
    Py_ssize_t n, size = 0;
    u64slot *s = tb_slots(o, &n);
    for (Py_ssize_t i = 0; !IS_RAW(o) && i < n; i++)
        if (s[i].val != 0 && TV_IS_OBJ(s[i].val))
            size += long_bytes((PyObject *)s[i].val);
    return PyLong_FromSsize_t(size);
}

/* The set bits of a non-negative int, as little-endian bytes in *buf (grown as needed). */
static Py_ssize_t mask_bytes(PyObject *bits, unsigned char **buf, Py_ssize_t *cap);

static PyObject *
tb_pairs(PyObject *o, PyObject *live)
{
    if (!PyLong_Check(live) || _PyLong_Sign(live) < 0) {
        PyErr_SetString(PyExc_TypeError, "pairs: live must be a non-negative int");
        return NULL;
    }
    if (mask_table(o, "pairs") < 0)
        return NULL;
    unsigned char *lb = NULL, *buf = NULL;
    Py_ssize_t lcap = 0, cap = 0, n;
    Py_ssize_t nl = mask_bytes(live, &lb, &lcap);
    long long pairs = 0;
    uint64_t lo = 0;
    for (Py_ssize_t i = 0; i < nl && i < 8; i++)
        lo |= (uint64_t)lb[i] << (8 * i);
    int ok = nl >= 0;
    u64slot *s = tb_slots(o, &n);
    for (Py_ssize_t i = 0; ok && i < n; i++) {
        tval v = s[i].val;
        uint64_t sl[SET_MAX];
        if (v == 0)
            continue;
        if (v & 1) { /* no int object per value: counted in the word */
            pairs += __builtin_popcountll((uint64_t)(v >> 1) & lo);
            continue;
        }
        if ((v & 3) == 2) {
            for (int j = 0, k = tv_slots(v, sl); j < k; j++)
                pairs += (Py_ssize_t)(sl[j] / 8) < nl && (lb[sl[j] / 8] >> (sl[j] % 8)) & 1;
            continue;
        }
        Py_ssize_t nb = mask_bytes((PyObject *)v, &buf, &cap);
        ok = nb >= 0;
        for (Py_ssize_t b = 0; b < nb && b < nl; b++)
            pairs += __builtin_popcount(buf[b] & lb[b]);
    }
    PyMem_Free(lb);
    PyMem_Free(buf);
    return ok ? PyLong_FromLongLong(pairs) : NULL;
}

static PyObject *
tb_reduce(PyObject *m, PyObject *unused)
{
    PyObject *items = tb_list(m, 2, PY_SSIZE_T_MAX);
    if (items == NULL || !IS_RAW(m))
        return items == NULL ? NULL : Py_BuildValue("(O(N))", Py_TYPE(m), items);
    return Py_BuildValue("(O(NO))", Py_TYPE(m), items, Py_True);
}

static PyObject *
tb_repr(PyObject *m)
{
    return PyUnicode_FromFormat("%s(<%zd entries>)", Py_TYPE(m)->tp_name, tb_used(m));
}

static PyMethodDef tb_methods[] = {
    {"get", (PyCFunction)(void (*)(void))tb_get, METH_FASTCALL, "get(k, default=None)"},
    {"pop", (PyCFunction)(void (*)(void))tb_pop, METH_FASTCALL, "pop(k[, default])"},
    {"keys", (PyCFunction)tb_keys, METH_NOARGS, "The keys, in table order, as a list."},
    {"values", (PyCFunction)tb_values, METH_NOARGS, "The values, in table order, as a list."},
    {"items", (PyCFunction)tb_items, METH_NOARGS, "(key, value) pairs, in order, as a list."},
    {"oldest", (PyCFunction)tb_oldest, METH_O, "oldest(n): the first n (key, value) pairs."},
    {"update", (PyCFunction)tb_update, METH_O, "From a mapping or (key, value) pairs."},
    {"clear", (PyCFunction)tb_clear, METH_NOARGS, "Remove every entry (frees the tables)."},
    {"__sizeof__", (PyCFunction)tb_sizeof, METH_NOARGS, NULL},
    {"pairs", (PyCFunction)tb_pairs, METH_O,
     "pairs(live): the bits of every mask within live, summed (no int object per value)."},
    {"boxed_bytes", (PyCFunction)tb_boxed_bytes, METH_NOARGS,
     "Bytes of the int objects held for values that do not fit a slot's word (O(n))."},
    {"__reduce__", (PyCFunction)tb_reduce, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyMappingMethods tb_as_mapping = {tb_len, tb_subscript, tb_ass_subscript};

static PySequenceMethods tb_as_sequence = {.sq_contains = tb_contains};

#define TABLE_TYPE(NAME, STRUCT, DOC)                                                        \
    {                                                                                        \
        PyVarObject_HEAD_INIT(NULL, 0).tp_name = "kvray._speedups." NAME,                    \
        .tp_doc = PyDoc_STR(DOC), .tp_basicsize = sizeof(STRUCT),                            \
        .tp_flags = Py_TPFLAGS_DEFAULT, .tp_new = tb_new, .tp_dealloc = tb_dealloc,          \
        .tp_repr = tb_repr, .tp_as_mapping = &tb_as_mapping,                                 \
        .tp_as_sequence = &tb_as_sequence, .tp_iter = tb_iter, .tp_methods = tb_methods,     \
    }

static PyTypeObject U64Map_Type = TABLE_TYPE(
    "U64Map", U64Map,
    "U64Map([mapping or pairs], u64_values=False): a table of u64 keys to int values, in C,\n"
    "without order.\n\n"
    "Supports len, [], in, del, get, pop, keys, values, items (lists), update, clear.\n"
    "Keys must be ints in [0, 2**64); other keys are never present. With u64_values, values\n"
    "must be too, and each is kept in its slot (no int object for any value).");

static PyTypeObject U64Dict_Type = TABLE_TYPE(
    "U64Dict", U64Dict,
    "U64Dict([mapping or pairs]): an insertion-ordered table of u64 keys to int values.\n\n"
    "A dict's order semantics (assignment keeps a key's place, new keys go last); supports\n"
    "len, [], in, del, get, pop, keys, values, items (lists, in order), oldest(n), update,\n"
    "clear. Keys must be ints in [0, 2**64); other keys are never present.");

/* --- the index's maps: a dict, a U64Map or a U64Dict ------------------------------------------ */

static inline int
is_map(PyObject *o)
{
    return PyDict_CheckExact(o) || IS_TABLE(o);
}

/* A new reference to m[k], or NULL: absent (no error set) or an error. */
static inline PyObject *
map_get_ref(PyObject *m, PyObject *k)
{
    if (!IS_TABLE(m))
        return Py_XNewRef(PyDict_GetItemWithError(m, k));
    Py_ssize_t at;
    return tb_lookup(m, k, &at) > 0 ? tb_box(m, *ops_of(m)->val(m, at)) : NULL;
}

static inline int
map_set(PyObject *m, PyObject *k, PyObject *v)
{
    return IS_TABLE(m) ? tb_ass_subscript(m, k, v) : PyDict_SetItem(m, k, v);
}

static inline int
map_del(PyObject *m, PyObject *k)
{
    return IS_TABLE(m) ? tb_ass_subscript(m, k, NULL) : PyDict_DelItem(m, k);
}

static inline int
map_contains(PyObject *m, PyObject *k)
{
    return IS_TABLE(m) ? tb_contains(m, k) : PyDict_Contains(m, k);
}

PyDoc_STRVAR(or_bits_doc,
"or_bits(d, keys, bit, recency[, held]) -> int\n\n"
"d: a dict or a U64Map; keys: a list or tuple of ints, or an array('Q').\n"
"d[k] = d.get(k, 0) | bit for every k (with recency, k also moves to a dict's end; a U64Map\n"
"has no order); returns how many keys were new. held: None or a list, to which the position\n"
"i of every key whose mask already had bit is appended.");

static int dict_keys(PyObject *const *args, const char *name, keys_t *k);

static int
dict_args(PyObject *const *args, Py_ssize_t nargs, Py_ssize_t want, const char *name, keys_t *k)
{
    if (check_nargs(name, nargs, want) < 0)
        return -1;
    return dict_keys(args, name, k);
}

static int
dict_keys(PyObject *const *args, const char *name, keys_t *k)
{
    if (!is_map(args[0])) {
        PyErr_Format(PyExc_TypeError, "%s(): expected a dict or a U64Map", name);
        return -1;
    }
    return keys_open(args[1], k);
}

/* A mask argument of a call (a holder's bit, or keep: the complement of one or more bits), read
 * once per call rather than per key. */
typedef struct {
    PyObject *o;   /* borrowed, or owned (own); keep from slot_masks: made when first needed */
    int own;
    tval tv;       /* a bit: the value a new key gets (owned) */
    uint64_t lo;   /* the low 64 bits (two's complement) */
    int fits;      /* a bit: o is in [0, 2**64), so lo is all of it */
    long long cut; /* keep: e when o == ~(1 << e), else -1 */
    long long slot; /* a bit: e when o == 1 << e, else -1 */
} maskarg;

static int
mask_open(PyObject *o, maskarg *a)
{
    memset(a, 0, sizeof(*a));
    a->o = o;
    a->cut = a->slot = -1;
    return tb_check_val(o);
}

static int
bit_open(PyObject *o, maskarg *a)
{
    if (mask_open(o, a) < 0)
        return -1;
    uint64_t u;
    if (get_u64(o, &u) == 0) {
        a->fits = 1;
        a->lo = u;
    }
    else if (PyErr_ExceptionMatches(PyExc_OverflowError)) {
        PyErr_Clear();
    }
    else {
        return -1;
    }
    a->tv = tv_of_obj(o);
    uint64_t sl[SET_MAX];
    a->slot = a->tv != 0 && tv_slots(a->tv, sl) == 1 ? (long long)sl[0] : -1;
    return a->tv == 0 ? -1 : 0;
}

static int
keep_open(PyObject *o, maskarg *a)
{
    if (mask_open(o, a) < 0)
        return -1;
    a->lo = (uint64_t)PyLong_AsUnsignedLongLongMask(o);
    if (a->lo == (uint64_t)-1 && PyErr_Occurred())
        return -1;
    if (_PyLong_Sign(o) < 0) {
        PyObject *inv = PyNumber_Invert(o);
        if (inv == NULL)
            return -1;
        tval t = tv_of_obj(inv);
        Py_DECREF(inv);
        if (t == 0)
            return -1;
        uint64_t sl[SET_MAX];
        if (tv_slots(t, sl) == 1)
            a->cut = (long long)sl[0];
        tv_drop(t);
    }
    return 0;
}

/* bit = 1 << s and keep = ~bit for slot s >= 0, from the slot number: a replica applies an op
 * per event, and building ~(1 << s) from wide ints for each cost more than the op. */
static int
slot_masks(long s, maskarg *bit, maskarg *keep)
{
    memset(bit, 0, sizeof(*bit));
    memset(keep, 0, sizeof(*keep));
    bit->cut = keep->slot = -1;
    keep->cut = bit->slot = s;
    bit->fits = s < 64;
    bit->lo = s < 64 ? (uint64_t)1 << s : 0;
    keep->lo = ~bit->lo;
    bit->o = s < 64 ? PyLong_FromUnsignedLongLong(bit->lo) : pow2_new((uint64_t)s);
    bit->own = 1;
    bit->tv = s < 64 ? tv_of_u64(bit->lo) : tv_pow2((uint64_t)s);
    return bit->o == NULL || bit->tv == 0 ? -1 : 0;
}

/* keep's int (slot_masks makes it when the int path first needs it); NULL on error. */
static PyObject *
keep_obj(maskarg *keep)
{
    if (keep->o == NULL) {
        PyObject *b = pow2_new((uint64_t)keep->cut);
        keep->o = b == NULL ? NULL : PyNumber_Invert(b);
        keep->own = keep->o != NULL;
        Py_XDECREF(b);
    }
    return keep->o;
}

static void
mask_close(maskarg *a)
{
    tv_drop(a->tv);
    a->tv = 0;
    if (a->own)
        Py_CLEAR(a->o);
    a->own = 0;
}

/* old | bit, as a new value (0 with an exception on error); *same set when that equals old.
 * Masks in a word are OR-ed as words; wider ones as ints. */
static tval
mask_or(tval old, const maskarg *bit, int *same)
{
    uint64_t a;
    if (old == bit->tv) {
        *same = 1;
        return tv_dup(old);
    }
    if (bit->fits && tv_u64(old, &a)) {
        uint64_t r = a | bit->lo;
        *same = r == a;
        return *same ? tv_dup(old) : tv_of_u64(r);
    }
    if (old == 1) { /* 0 | bit */
        *same = 0;
        return tv_dup(bit->tv);
    }
    uint64_t sl[SET_MAX + 1];
    int k = bit->slot >= 0 ? tv_slots(old, sl) : -1;
    if (k >= 0) { /* a holder's bit into a few holders' slots */
        uint64_t b = (uint64_t)bit->slot;
        int i = 0;
        while (i < k && sl[i] < b)
            i++;
        *same = i < k && sl[i] == b;
        if (*same)
            return tv_dup(old);
        if (k < SET_MAX) {
            memmove(&sl[i + 1], &sl[i], (size_t)(k - i) * sizeof(uint64_t));
            sl[i] = b;
            return tv_of_slots(sl, k + 1);
        }
    }
    PyObject *o = tv_box(old);
    PyObject *m = o == NULL ? NULL : PyNumber_Or(o, bit->o);
    int eq = m == NULL ? -1 : PyObject_RichCompareBool(m, o, Py_EQ);
    /* Changed: two bits or more, and wider than a u64 (else the word case above took it). */
    tval out = eq < 0                 ? 0
               : eq                   ? tv_dup(old)
               : _PyLong_Sign(m) > 0 ? (tval)Py_NewRef(m)
                                      : tv_of_obj(m);
    Py_XDECREF(o);
    Py_XDECREF(m);
    *same = eq > 0;
    return out;
}

/* old & keep as a new value, or 0: *zero set when it is 0 (no exception), else an error. */
static tval
mask_and(tval old, maskarg *keep, int *zero)
{
    uint64_t a;
    *zero = 0;
    if (tv_u64(old, &a)) {
        uint64_t r = a & keep->lo;
        *zero = r == 0;
        return r == 0 ? 0 : r == a ? tv_dup(old) : tv_of_u64(r);
    }
    if ((old & 3) == 2 && keep->cut >= 0) { /* a few holders' slots, less one */
        uint64_t sl[SET_MAX];
        int k = tv_slots(old, sl), i = 0;
        while (i < k && sl[i] != (uint64_t)keep->cut)
            i++;
        if (i == k)
            return old; /* a set holds no reference */
        *zero = k == 1;
        if (*zero)
            return 0;
        memmove(&sl[i], &sl[i + 1], (size_t)(k - i - 1) * sizeof(uint64_t));
        return tv_of_slots(sl, k - 1);
    }
    PyObject *o = tv_box(old), *k = keep_obj(keep);
    PyObject *m = o == NULL || k == NULL ? NULL : PyNumber_And(o, k);
    int nonzero = m == NULL ? -1 : PyObject_IsTrue(m);
    tval out = nonzero > 0 ? tv_of_obj(m) : 0;
    *zero = nonzero == 0;
    Py_XDECREF(o);
    Py_XDECREF(m);
    return out;
}

/* The mask of key u at table position `at` |= bit, moved to a U64Dict's end with recency (a
 * U64Map has no order to keep): 0, or -1 on error; *same set when it had the bit already. */
static int
tb_or_at(PyObject *d, uint64_t u, Py_ssize_t at, const maskarg *bit, int recency, int *same)
{
    const table_ops *op = ops_of(d);
    tval m = mask_or(*op->val(d, at), bit, same);
    if (m == 0)
        return -1;
    if (recency && IS_U64DICT(d))
        return ud_move_last(d, u, at, m);
    tv_set(op->val(d, at), m);
    return 0;
}

/* Append i to held when old | bit (= m) left old unchanged, i.e. old already had the bit. */
static int
note_held(PyObject *held, PyObject *old, PyObject *m, Py_ssize_t i)
{
    int same = m == old ? 1 : PyObject_RichCompareBool(m, old, Py_EQ);
    if (same <= 0)
        return same;
    PyObject *pos = PyLong_FromSsize_t(i);
    if (pos == NULL)
        return -1;
    int rc = PyList_Append(held, pos);
    Py_DECREF(pos);
    return rc;
}

static PyObject *
or_bits(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    keys_t ks;
    if (nargs != 5 && check_nargs("or_bits", nargs, 4) < 0)
        return NULL;
    PyObject *held = nargs == 5 && args[4] != Py_None ? args[4] : NULL;
    if (held != NULL && !PyList_CheckExact(held)) {
        PyErr_SetString(PyExc_TypeError, "or_bits(): held must be a list or None");
        return NULL;
    }
    if (dict_keys(args, "or_bits", &ks) < 0)
        return NULL;
    PyObject *d = args[0], *bit = args[2];
    int recency = PyObject_IsTrue(args[3]);
    if (recency < 0) {
        keys_close(&ks);
        return NULL;
    }
    Py_ssize_t added = 0;
    if (IS_TABLE(d)) {
        const table_ops *op = ops_of(d);
        maskarg b;
        if (mask_table(d, "or_bits") < 0 || bit_open(bit, &b) < 0)
            goto fail;
        for (Py_ssize_t i = 0; i < ks.n; i++) {
            uint64_t u;
            int same = 0, rc = keys_u64(&ks, i, &u);
            Py_ssize_t at = rc < 0 ? -1 : op->find(d, u);
            if (rc == 0 && at < 0) {
                rc = op->add(d, u, tv_dup(b.tv));
                added += rc == 0;
            }
            else if (rc == 0) {
                rc = tb_or_at(d, u, at, &b, recency, &same);
            }
            if (rc == 0 && held != NULL && same) {
                PyObject *pos = PyLong_FromSsize_t(i);
                rc = pos == NULL ? -1 : PyList_Append(held, pos);
                Py_XDECREF(pos);
            }
            if (rc < 0) {
                mask_close(&b);
                goto fail;
            }
        }
        mask_close(&b);
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
            if (m != NULL && held != NULL && note_held(held, old, m, i) < 0)
                Py_CLEAR(m);
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

/* The mask at a table position &= keep, the entry deleted when that is 0: 1 when deleted, 0 when
 * kept, -1 on error. */
static int
tb_and_at(PyObject *d, Py_ssize_t at, maskarg *keep)
{
    const table_ops *op = ops_of(d);
    int zero;
    tval m = mask_and(*op->val(d, at), keep, &zero);
    if (zero) {
        op->del_at(d, at);
        return 1;
    }
    if (m == 0)
        return -1;
    tv_set(op->val(d, at), m);
    return 0;
}

/* d[k] &= keep when k is present (found once), deleting k when that is 0: 1 when k was deleted,
 * 0 when kept or absent, -1 on error. */
static int
clear_bits(PyObject *d, PyObject *k, maskarg *keep)
{
    if (IS_TABLE(d)) {
        Py_ssize_t at;
        int rc = tb_lookup(d, k, &at);
        return rc <= 0 ? rc : tb_and_at(d, at, keep);
    }
    PyObject *old = PyDict_GetItemWithError(d, k); /* borrowed: used before d changes */
    if (old == NULL)
        return PyErr_Occurred() ? -1 : 0;
    PyObject *m = PyNumber_And(old, keep->o);
    if (m == NULL)
        return -1;
    int nonzero = PyObject_IsTrue(m);
    int rc = nonzero < 0 ? -1 : nonzero ? PyDict_SetItem(d, k, m) : PyDict_DelItem(d, k);
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
    maskarg keep;
    Py_ssize_t deleted = 0;
    PyObject *d = args[0];
    if (mask_table(d, "and_bits") < 0 || keep_open(args[2], &keep) < 0)
        goto fail;
    if (IS_TABLE(d)) {
        const table_ops *op = ops_of(d);
        for (Py_ssize_t i = 0; i < ks.n; i++) {
            uint64_t u;
            if (keys_u64(&ks, i, &u) < 0)
                goto fail;
            Py_ssize_t at = op->find(d, u);
            int gone = at < 0 ? 0 : tb_and_at(d, at, &keep);
            if (gone < 0)
                goto fail;
            deleted += gone;
        }
        keys_close(&ks);
        return PyLong_FromSsize_t(deleted);
    }
    for (Py_ssize_t i = 0; i < ks.n; i++) {
        PyObject *k = keys_get(&ks, i);
        if (k == NULL)
            goto fail;
        int gone = clear_bits(d, k, &keep);
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
        PyObject *v = k == NULL ? NULL : map_get_ref(args[0], k);
        Py_XDECREF(k);
        if (v == NULL && (k == NULL || PyErr_Occurred()))
            Py_CLEAR(out);
        else
            PyList_SET_ITEM(out, i, v != NULL ? v : Py_NewRef(Py_None));
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
        PyObject *r = map_get_ref(emap, e);
        int indexed = r == NULL ? (PyErr_Occurred() ? -1 : 1) : indexed_in(tiers, r);
        if (indexed == 0) {
            indexed = map_del(emap, e);
            deleted++;
        }
        Py_XDECREF(r);
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
"add_engine(d, emap, keys, engine, bit, recency[, held]) -> int\n\n"
"or_bits(d, keys, bit, recency, held), then emap[engine[i]] = keys[i] for every i (keys and\n"
"engine are lists of equal length); returns how many keys were new in d.");

static PyObject *
add_engine(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 7 && check_nargs("add_engine", nargs, 6) < 0)
        return NULL;
    if (!is_map(args[1]) || !PyList_CheckExact(args[2]) || !PyList_CheckExact(args[3])) {
        PyErr_SetString(PyExc_TypeError, "add_engine(): expected map, map, list, list");
        return NULL;
    }
    if (PyList_GET_SIZE(args[2]) != PyList_GET_SIZE(args[3])) {
        PyErr_SetString(PyExc_ValueError, "add_engine(): keys and engine differ in length");
        return NULL;
    }
    PyObject *held = nargs == 7 ? args[6] : Py_None;
    PyObject *added =
        or_bits(self, (PyObject *const[]){args[0], args[2], args[4], args[5], held}, 5);
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
    if (check_nargs("remove_engine", nargs, 5) < 0)
        return NULL;
    PyObject *d = args[0], *emap = args[1];
    if (!is_map(d) || !is_map(emap)) {
        PyErr_SetString(PyExc_TypeError, "remove_engine(): expected two maps");
        return NULL;
    }
    maskarg keep;
    keys_t ks;
    if (mask_table(d, "remove_engine") < 0 || keep_open(args[3], &keep) < 0
        || keys_open(args[2], &ks) < 0)
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
        PyObject *r = map_get_ref(emap, e); /* a reference: emap's entry may go below */
        if (r == NULL) {
            Py_DECREF(e);
            if (PyErr_Occurred())
                goto fail;
            unknown++;
            continue;
        }
        int rc = PyList_Append(keys, r);
        if (rc == 0) {
            int gone = clear_bits(d, r, &keep); /* a table's key is found once */
            rc = gone < 0 ? -1 : 0;
            deleted += gone > 0;
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
    if (check_nargs("xor_u64", nargs, 2) < 0)
        return NULL;
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

PyDoc_STRVAR(clear_slots_doc,
"clear_slots(d, clear) -> int\n\n"
"Clear the bits of clear (a non-negative int) from every mask in d, deleting keys whose mask\n"
"becomes 0; returns how many were deleted. One pass over d: per key, not per (key, slot).");

/* The mask at *vp without the bits of `clear`: 1 when it became 0 (left in place for the caller
 * to delete), 0 otherwise, -1 on error. Only positive ints are built (an AND with ~clear would
 * build a complement of clear's width per key). */
static int
clear_one(PyObject **vp, PyObject *clear)
{
    PyObject *x = PyNumber_And(*vp, clear);
    if (x == NULL)
        return -1;
    int has = PyObject_IsTrue(x);
    if (has <= 0) {
        Py_DECREF(x);
        return has;
    }
    PyObject *m = PyNumber_Xor(*vp, x);
    Py_DECREF(x);
    if (m == NULL)
        return -1;
    int nonzero = PyObject_IsTrue(m);
    if (nonzero <= 0) {
        Py_DECREF(m);
        return nonzero < 0 ? -1 : 1;
    }
    Py_SETREF(*vp, m);
    return 0;
}

/* clear_one for a table's value (clear_lo: clear's low 64 bits). */
static int
tv_clear(tval *vp, PyObject *clear, uint64_t clear_lo)
{
    uint64_t a;
    if (tv_u64(*vp, &a)) {
        if ((a & clear_lo) == 0)
            return 0;
        if ((a & ~clear_lo) == 0)
            return 1;
        tval m = tv_of_u64(a & ~clear_lo);
        if (m == 0)
            return -1;
        tv_set(vp, m);
        return 0;
    }
    PyObject *o = tv_box(*vp), *orig = o;
    if (o == NULL)
        return -1;
    Py_INCREF(orig);
    int rc = clear_one(&o, clear);
    if (rc == 0 && o != orig) {
        tval m = tv_of_obj(o);
        if (m == 0)
            rc = -1;
        else
            tv_set(vp, m);
    }
    Py_DECREF(o);
    Py_DECREF(orig);
    return rc;
}

static PyObject *
clear_slots(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (check_nargs("clear_slots", nargs, 2) < 0)
        return NULL;
    PyObject *d = args[0], *clear = args[1];
    if (!PyLong_Check(clear) || _PyLong_Sign(clear) < 0) {
        PyErr_SetString(PyExc_TypeError, "clear_slots: clear must be a non-negative int");
        return NULL;
    }
    if (!IS_TABLE(d) && !PyDict_Check(d)) {
        PyErr_SetString(PyExc_TypeError, "clear_slots: expected a dict or a kvray table");
        return NULL;
    }
    if (mask_table(d, "clear_slots") < 0)
        return NULL;
    /* Keys to delete are collected and deleted after the pass: a deletion moves entries. */
    Py_ssize_t ndead = 0;
    if (IS_TABLE(d)) {
        uint64_t *dead = NULL;
        Py_ssize_t cap = 0;
        Py_ssize_t n;
        uint64_t clear_lo = (uint64_t)PyLong_AsUnsignedLongLongMask(clear);
        if (clear_lo == (uint64_t)-1 && PyErr_Occurred())
            return NULL;
        u64slot *slots = tb_slots(d, &n);
        for (Py_ssize_t i = 0; i < n; i++) {
            if (slots[i].val == 0)
                continue;
            int gone = tv_clear(&slots[i].val, clear, clear_lo);
            if (gone < 0) {
                PyMem_Free(dead);
                return NULL;
            }
            if (gone) {
                if (ndead == cap) {
                    Py_ssize_t grown_cap = cap ? 2 * cap : 1024;
                    uint64_t *grown = PyMem_Realloc(dead, (size_t)grown_cap * sizeof(uint64_t));
                    if (grown == NULL) {
                        PyMem_Free(dead);
                        return PyErr_NoMemory();
                    }
                    dead = grown;
                    cap = grown_cap;
                }
                dead[ndead++] = slots[i].key;
            }
        }
        const table_ops *op = ops_of(d);
        for (Py_ssize_t i = 0; i < ndead; i++) {
            Py_ssize_t at = op->find(d, dead[i]);
            if (at >= 0)
                op->del_at(d, at);
        }
        PyMem_Free(dead);
        return PyLong_FromSsize_t(ndead);
    }
    PyObject *dead = PyList_New(0);
    if (dead == NULL)
        return NULL;
    Py_ssize_t pos = 0;
    PyObject *k, *m;
    while (PyDict_Next(d, &pos, &k, &m)) {
        PyObject *v = Py_NewRef(m);
        int gone = clear_one(&v, clear);
        /* Replacing a present key's value is allowed while iterating (the keys stay). */
        int rc = gone < 0                ? -1
                 : gone                  ? PyList_Append(dead, k)
                 : v != m                ? PyDict_SetItem(d, k, v)
                                         : 0;
        Py_DECREF(v);
        if (rc < 0) {
            Py_DECREF(dead);
            return NULL;
        }
    }
    ndead = PyList_GET_SIZE(dead);
    for (Py_ssize_t i = 0; i < ndead; i++) {
        if (PyDict_DelItem(d, PyList_GET_ITEM(dead, i)) < 0) {
            Py_DECREF(dead);
            return NULL;
        }
    }
    Py_DECREF(dead);
    return PyLong_FromSsize_t(ndead);
}

PyDoc_STRVAR(slot_keys_doc,
"slot_keys(d, live[, packed]) -> dict\n\n"
"Slot → the keys whose mask in d has that slot's bit, within live (keys in d's order): the\n"
"index inverted, per key rather than per (key, slot) pair in Python. With packed true, each\n"
"slot's keys come as bytes, u64 little-endian (no int object per key: snapshots).");

/* The set bits of a non-negative int, as little-endian bytes in *buf (grown as needed);
 * returns the byte count, or -1 with an exception. */
static int
buf_reserve(unsigned char **buf, Py_ssize_t *cap, Py_ssize_t n)
{
    if (n > *cap) {
        unsigned char *grown = PyMem_Realloc(*buf, (size_t)n);
        if (grown == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        *buf = grown;
        *cap = n;
    }
    return 0;
}

static Py_ssize_t
mask_bytes(PyObject *bits, unsigned char **buf, Py_ssize_t *cap)
{
    size_t nbits = _PyLong_NumBits(bits);
    if (nbits == (size_t)-1 && PyErr_Occurred())
        return -1;
    Py_ssize_t n = (Py_ssize_t)((nbits + 7) / 8);
    if (buf_reserve(buf, cap, n) < 0)
        return -1;
    if (n == 0)
        return 0;
#if PY_VERSION_HEX >= 0x030D0000
    if (PyLong_AsNativeBytes(bits, *buf, n,
                             Py_ASNATIVEBYTES_LITTLE_ENDIAN | Py_ASNATIVEBYTES_UNSIGNED_BUFFER) < 0)
        return -1;
#else
    if (_PyLong_AsByteArray((PyLongObject *)bits, *buf, (size_t)n, 1, 0) < 0)
        return -1;
#endif
    return n;
}

/* mask_bytes of a table value: a mask in the word is written without an int object. */
static Py_ssize_t
tv_mask_bytes(tval v, unsigned char **buf, Py_ssize_t *cap)
{
    if (TV_IS_OBJ(v))
        return mask_bytes((PyObject *)v, buf, cap);
    uint64_t a = (uint64_t)(v >> 1), sl[SET_MAX];
    int k = (v & 1) ? 0 : tv_slots(v, sl);
    Py_ssize_t n = (v & 1) ? (a ? (64 - __builtin_clzll(a) + 7) / 8 : 0)
                           : (Py_ssize_t)(sl[k - 1] / 8 + 1);
    if (buf_reserve(buf, cap, n) < 0)
        return -1;
    if (v & 1) {
        for (Py_ssize_t i = 0; i < n; i++)
            (*buf)[i] = (unsigned char)(a >> (8 * i));
    }
    else {
        memset(*buf, 0, (size_t)n);
        for (int i = 0; i < k; i++)
            (*buf)[sl[i] / 8] |= (unsigned char)(1u << (sl[i] % 8));
    }
    return n;
}

/* Grow the array *arr of *n elements of `size` bytes to `want` (> *n), zeroing the new ones. */
static int
grow_zeroed(void **arr, Py_ssize_t *n, Py_ssize_t want, size_t size)
{
    char *grown = PyMem_Realloc(*arr, (size_t)want * size);
    if (grown == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    memset(grown + (size_t)*n * size, 0, (size_t)(want - *n) * size);
    *arr = grown;
    *n = want;
    return 0;
}

/* Append key `k` (created on first use in *key) to the list of every slot set in bytes
 * `mb[0..nb)` & `lb[0..nl)`; lists by slot in `lists` (grown), owned by `out`. */
static int
slot_keys_add(PyObject *out, PyObject ***lists, Py_ssize_t *nlists, uint64_t k, PyObject **key,
              const unsigned char *mb, Py_ssize_t nb, const unsigned char *lb, Py_ssize_t nl)
{
    Py_ssize_t n = nb < nl ? nb : nl;
    for (Py_ssize_t b = 0; b < n; b++) {
        unsigned int byte = mb[b] & lb[b];
        while (byte) {
            Py_ssize_t slot = b * 8 + __builtin_ctz(byte);
            byte &= byte - 1;
            if (slot >= *nlists
                && grow_zeroed((void **)lists, nlists, n * 8, sizeof(PyObject *)) < 0)
                return -1;
            if ((*lists)[slot] == NULL) {
                PyObject *lst = PyList_New(0), *sk = PyLong_FromSsize_t(slot);
                int rc = lst == NULL || sk == NULL ? -1 : PyDict_SetItem(out, sk, lst);
                Py_XDECREF(sk);
                Py_XDECREF(lst); /* `out` holds it */
                if (rc < 0)
                    return -1;
                (*lists)[slot] = lst;
            }
            if (*key == NULL && (*key = PyLong_FromUnsignedLongLong(k)) == NULL)
                return -1;
            if (PyList_Append((*lists)[slot], *key) < 0)
                return -1;
        }
    }
    return 0;
}

/* Packed mode: per slot, a growable u64 buffer; turned into bytes at the end. */
typedef struct {
    uint64_t *v;
    Py_ssize_t n, cap;
} u64vec;

/* Append x (the vector doubles when full): 0, or -1 with MemoryError. */
static int
u64vec_push(u64vec *v, uint64_t x)
{
    if (v->n == v->cap) {
        Py_ssize_t cap = v->cap ? v->cap * 2 : 64;
        uint64_t *g = PyMem_Realloc(v->v, (size_t)cap * sizeof(uint64_t));
        if (g == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        v->v = g;
        v->cap = cap;
    }
    v->v[v->n++] = x;
    return 0;
}

static int
slot_keys_push(u64vec **vecs, Py_ssize_t *nvecs, uint64_t k, const unsigned char *mb,
               Py_ssize_t nb, const unsigned char *lb, Py_ssize_t nl)
{
    Py_ssize_t n = nb < nl ? nb : nl;
    for (Py_ssize_t b = 0; b < n; b++) {
        unsigned int byte = mb[b] & lb[b];
        while (byte) {
            Py_ssize_t slot = b * 8 + __builtin_ctz(byte);
            byte &= byte - 1;
            if (slot >= *nvecs && grow_zeroed((void **)vecs, nvecs, n * 8, sizeof(u64vec)) < 0)
                return -1;
            if (u64vec_push(&(*vecs)[slot], k) < 0)
                return -1;
        }
    }
    return 0;
}

/* out[slot] = the slot's keys as u64 little-endian bytes, for every non-empty vector; frees
 * the vectors. */
static int
slot_keys_flush(PyObject *out, u64vec *vecs, Py_ssize_t nvecs, int ok)
{
    int rc = ok ? 0 : -1;
    for (Py_ssize_t s = 0; s < nvecs; s++) {
        u64vec *v = &vecs[s];
        if (rc == 0 && v->n) {
            PyObject *b = PyBytes_FromStringAndSize(NULL, v->n * 8);
            PyObject *sk = b == NULL ? NULL : PyLong_FromSsize_t(s);
            if (sk != NULL) {
                unsigned char *p = (unsigned char *)PyBytes_AS_STRING(b);
                for (Py_ssize_t i = 0; i < v->n; i++)
                    for (int j = 0; j < 8; j++)
                        p[i * 8 + j] = (unsigned char)(v->v[i] >> (8 * j));
                rc = PyDict_SetItem(out, sk, b);
            }
            else {
                rc = -1;
            }
            Py_XDECREF(sk);
            Py_XDECREF(b);
        }
        PyMem_Free(v->v);
    }
    PyMem_Free(vecs);
    return rc;
}

static PyObject *
slot_keys(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 && nargs != 3) {
        PyErr_Format(PyExc_TypeError, "slot_keys() takes 2 or 3 arguments (%zd given)", nargs);
        return NULL;
    }
    PyObject *d = args[0], *live = args[1];
    int packed = nargs == 3 ? PyObject_IsTrue(args[2]) : 0;
    if (packed < 0)
        return NULL;
    if (!PyLong_Check(live) || _PyLong_Sign(live) < 0) {
        PyErr_SetString(PyExc_TypeError, "slot_keys: live must be a non-negative int");
        return NULL;
    }
    if (!IS_TABLE(d) && !PyDict_Check(d)) {
        PyErr_SetString(PyExc_TypeError, "slot_keys: expected a dict or a kvray table");
        return NULL;
    }
    if (mask_table(d, "slot_keys") < 0)
        return NULL;
    PyObject *out = PyDict_New();
    PyObject **lists = NULL; /* by slot: the list in `out`, borrowed */
    u64vec *vecs = NULL;     /* packed: by slot, the keys so far */
    Py_ssize_t nlists = 0, nvecs = 0, cap = 0, lcap = 0;
    unsigned char *buf = NULL, *lbuf = NULL;
    Py_ssize_t nl = out == NULL ? -1 : mask_bytes(live, &lbuf, &lcap);
    if (nl < 0)
        goto fail;
    if (IS_TABLE(d)) {
        Py_ssize_t n;
        u64slot *slots = tb_slots(d, &n);
        for (Py_ssize_t i = 0; i < n; i++) {
            if (slots[i].val == 0)
                continue;
            PyObject *key = NULL;
            Py_ssize_t nb = tv_mask_bytes(slots[i].val, &buf, &cap);
            int rc = nb < 0    ? -1
                     : packed ? slot_keys_push(&vecs, &nvecs, slots[i].key, buf, nb, lbuf, nl)
                              : slot_keys_add(out, &lists, &nlists, slots[i].key, &key, buf, nb,
                                              lbuf, nl);
            Py_XDECREF(key);
            if (rc < 0)
                goto fail;
        }
    }
    else {
        Py_ssize_t pos = 0;
        PyObject *k, *m;
        while (PyDict_Next(d, &pos, &k, &m)) {
            uint64_t u;
            if (get_u64(k, &u) < 0)
                goto fail;
            if (!PyLong_Check(m) || _PyLong_Sign(m) < 0) {
                PyErr_SetString(PyExc_ValueError, "slot_keys: masks must be non-negative ints");
                goto fail;
            }
            PyObject *key = Py_NewRef(k);
            Py_ssize_t nb = mask_bytes(m, &buf, &cap);
            int rc = nb < 0    ? -1
                     : packed ? slot_keys_push(&vecs, &nvecs, u, buf, nb, lbuf, nl)
                              : slot_keys_add(out, &lists, &nlists, u, &key, buf, nb, lbuf, nl);
            Py_XDECREF(key);
            if (rc < 0)
                goto fail;
        }
    }
    PyMem_Free(lists);
    PyMem_Free(buf);
    PyMem_Free(lbuf);
    if (slot_keys_flush(out, vecs, nvecs, 1) < 0) {
        Py_DECREF(out);
        return NULL;
    }
    return out;
fail:
    Py_XDECREF(out);
    PyMem_Free(lists);
    PyMem_Free(buf);
    PyMem_Free(lbuf);
    slot_keys_flush(NULL, vecs, nvecs, 0);
    return NULL;
}

/* --- whole vLLM batches: scan_frame / apply_frames -----------------------------------------
 *
 * A shard decoded every batch into a Python object per event and walked them in Python: most of
 * its write time. Almost every frame has the shape real pods publish: BlockStored events with u64
 * hashes and their tokens, and runs of one-block BlockRemoved events, all on the GPU tier. These
 * functions take such a frame straight from its msgpack bytes.
 *
 * "Fast form" is a strict subset of what kvray.core.events.EventDecoder accepts, so a frame
 * accepted here is never malformed for the Python decoder and decodes to the same events:
 * a batch [ts (float32/64), events, rank (nil or an int < 2^31)]; events BlockStored /
 * BlockRemoved, all as maps whose first key is "type" (vLLM >= 0.24) or all as positional
 * arrays (older vLLM, trailing fields skipped); block hashes ints in [0, 2^64), at least one; a BlockStored
 * with a nil or int parent, its tokens (u32 ints, exactly n * block_size) and no LoRA name or
 * extra keys (an array of nils is none); medium nil or "GPU"; lora_id and group_idx nil or
 * ints; other map fields skipped (no ext types, no non-ASCII strings, nesting < 32); no field
 * twice; within the decoder's limits. For anything else the functions return None and the
 * Python path decodes the frame (and says what is malformed). */

/* Bytes taken by a u32 token whose encoding is the common kind: fixint, uint8/16/32 (0: another
 * encoding, left to mp_u32). A table instead of branches: token encodings alternate at random
 * with the token's size, and mispredicted branches were most of a scan. */
static unsigned char u32_size[256];

static void
u32_size_init(void)
{
    for (int b = 0; b < 0x80; b++)
        u32_size[b] = 1;
    u32_size[0xcc] = 2;
    u32_size[0xcd] = 3;
    u32_size[0xce] = 5;
}

/* Check n u32 tokens (any int encoding mp_u32 takes) and step over them. */
static int
mp_skip_u32s(const unsigned char **pp, const unsigned char *end, Py_ssize_t n)
{
    const unsigned char *p = *pp;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (p >= end)
            return -1;
        unsigned s = u32_size[*p];
        if (s && end - p >= (Py_ssize_t)s) {
            p += s;
            continue;
        }
        uint32_t v;
        if (mp_u32(&p, end, &v) < 0)
            return -1;
    }
    *pp = p;
    return 0;
}

/* One token already checked by mp_skip_u32s. */
static inline uint32_t
next_u32(const unsigned char **pp, const unsigned char *end)
{
    const unsigned char *p = *pp;
    unsigned s = u32_size[*p];
    if (s && end - p >= 5) {
        uint32_t x = ((uint32_t)p[1] << 24) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 8) | p[4];
        *pp = p + s;
        return s == 1 ? *p : x >> (8 * (5 - s));
    }
    uint32_t v = 0;
    (void)mp_u32(pp, end, &v);
    return v;
}

typedef struct {
    const unsigned char *hashes; /* the first block hash */
    const unsigned char *tokens; /* the first token (BlockStored) */
    Py_ssize_t n;                /* block hashes */
    Py_ssize_t ntok;
    Py_ssize_t block_size;
    uint64_t parent;
    char stored;     /* 1 BlockStored, 0 BlockRemoved */
    char has_parent;
    char has_tokens;
    char medium;     /* 0 nil, 1 "GPU" (a run of removals ends where it changes, as in Python) */
    char is_map;     /* the event's form */
} fev;

typedef struct {
    Py_ssize_t max_payload, max_events, max_blocks;
} flimits;

static int
mp_skip(const unsigned char **pp, const unsigned char *end, int depth)
{
    const unsigned char *p = *pp;
    if (p >= end || depth > 32)
        return -1;
    unsigned char b = *p++;
    Py_ssize_t n = 0, items = 0;
    int is_str = 0;
    if (b <= 0x7f || b >= 0xe0 || b == 0xc0 || b == 0xc2 || b == 0xc3) {
        n = 0;
    }
    else if (b >= 0xa0 && b <= 0xbf) {
        n = b & 0x1f;
        is_str = 1;
    }
    else if (b >= 0x90 && b <= 0x9f) {
        items = b & 0x0f;
    }
    else if (b >= 0x80 && b <= 0x8f) {
        items = 2 * (Py_ssize_t)(b & 0x0f);
    }
    else {
        int w = 0;
        switch (b) {
        case 0xcc: case 0xd0: n = 1; break;
        case 0xcd: case 0xd1: n = 2; break;
        case 0xce: case 0xd2: case 0xca: n = 4; break;
        case 0xcf: case 0xd3: case 0xcb: n = 8; break;
        case 0xc4: w = 1; break;
        case 0xc5: w = 2; break;
        case 0xc6: w = 4; break;
        case 0xd9: w = 1; is_str = 1; break;
        case 0xda: w = 2; is_str = 1; break;
        case 0xdb: w = 4; is_str = 1; break;
        case 0xdc: case 0xde: w = 2; break;
        case 0xdd: case 0xdf: w = 4; break;
        default: return -1; /* 0xc1 and the ext types */
        }
        if (w) {
            if (end - p < w)
                return -1;
            Py_ssize_t v = (Py_ssize_t)be(p, w);
            p += w;
            if (b == 0xdc || b == 0xdd)
                items = v;
            else if (b == 0xde || b == 0xdf)
                items = 2 * v;
            else
                n = v;
        }
    }
    if (n > end - p || items > end - p)
        return -1;
    if (is_str) {
        for (Py_ssize_t i = 0; i < n; i++)
            if (p[i] & 0x80)
                return -1; /* non-ASCII: the decoder checks its UTF-8 */
    }
    p += n;
    for (Py_ssize_t i = 0; i < items; i++)
        if (mp_skip(&p, end, depth + 1) < 0)
            return -1;
    *pp = p;
    return 0;
}

/* An ASCII str: its bytes in *s, *len. */
static int
mp_str(const unsigned char **pp, const unsigned char *end, const unsigned char **s, Py_ssize_t *len)
{
    const unsigned char *p = *pp;
    if (p >= end)
        return -1;
    unsigned char b = *p++;
    Py_ssize_t n;
    if (b >= 0xa0 && b <= 0xbf) {
        n = b & 0x1f;
    }
    else if (b == 0xd9 || b == 0xda || b == 0xdb) {
        int w = b == 0xd9 ? 1 : b == 0xda ? 2 : 4;
        if (end - p < w)
            return -1;
        n = (Py_ssize_t)be(p, w);
        p += w;
    }
    else {
        return -1;
    }
    if (n > end - p)
        return -1;
    for (Py_ssize_t i = 0; i < n; i++)
        if (p[i] & 0x80)
            return -1;
    *s = p;
    *len = n;
    *pp = p + n;
    return 0;
}

static inline int
str_is(const unsigned char *s, Py_ssize_t len, const char *want)
{
    size_t n = strlen(want);
    return (size_t)len == n && memcmp(s, want, n) == 0;
}

/* An int in [0, 2^64), in any msgpack int encoding. */
static int
mp_u64(const unsigned char **pp, const unsigned char *end, uint64_t *out)
{
    const unsigned char *p = *pp;
    if (p >= end)
        return -1;
    unsigned char b = *p++;
    if (b <= 0x7f) {
        *out = b;
        *pp = p;
        return 0;
    }
    if (b == 0xcf) { /* hashes are mostly full-width */
        if (end - p < 8)
            return -1;
#if defined(__GNUC__) && defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
        uint64_t v = 0;
        memcpy(&v, p, 8);
        *out = __builtin_bswap64(v);
#else
        *out = be(p, 8);
#endif
        *pp = p + 8;
        return 0;
    }
    int n = 0, is_signed = 0;
    switch (b) {
    case 0xcc: n = 1; break;
    case 0xcd: n = 2; break;
    case 0xce: n = 4; break;
    case 0xd0: n = 1; is_signed = 1; break;
    case 0xd1: n = 2; is_signed = 1; break;
    case 0xd2: n = 4; is_signed = 1; break;
    case 0xd3: n = 8; is_signed = 1; break;
    default: return -1;
    }
    if (end - p < n || (is_signed && (p[0] & 0x80)))
        return -1;
    *out = be(p, n);
    *pp = p + n;
    return 0;
}

/* nil, or any msgpack int (every one fits msgspec's int). */
static int
mp_nil_or_int(const unsigned char **pp, const unsigned char *end)
{
    const unsigned char *p = *pp;
    if (p >= end)
        return -1;
    unsigned char b = *p;
    if (b == 0xc0 || b <= 0x7f || b >= 0xe0) {
        *pp = p + 1;
        return 0;
    }
    if ((b >= 0xcc && b <= 0xcf) || (b >= 0xd0 && b <= 0xd3))
        return mp_skip(pp, end, 0);
    return -1;
}

/* A map header (*n pairs) or an array header (*n items); *is_map says which. */
static int
mp_container(const unsigned char **pp, const unsigned char *end, Py_ssize_t *n, int *is_map)
{
    const unsigned char *p = *pp;
    if (p >= end)
        return -1;
    unsigned char b = *p;
    if ((b >= 0x80 && b <= 0x8f) || b == 0xde || b == 0xdf) {
        p++;
        if (b <= 0x8f) {
            *n = b & 0x0f;
        }
        else {
            int w = b == 0xde ? 2 : 4;
            if (end - p < w)
                return -1;
            *n = (Py_ssize_t)be(p, w);
            p += w;
        }
        if (*n > (end - p) / 2)
            return -1;
        *is_map = 1;
        *pp = p;
        return 0;
    }
    *is_map = 0;
    return mp_array_head(pp, end, n);
}

enum { F_HASHES, F_PARENT, F_TOKENS, F_BLOCK_SIZE, F_LORA_ID, F_MEDIUM, F_LORA_NAME, F_EXTRA,
       F_GROUP, F_OTHER };

/* BlockStored's fields in vLLM's order (the positional form); BlockRemoved's are a subset. */
static const char *const field_names[] = {"block_hashes", "parent_block_hash", "token_ids",
    "block_size", "lora_id", "medium", "lora_name", "extra_keys", "group_idx"};
static const int removed_order[] = {F_HASHES, F_MEDIUM, F_GROUP};

static int
field_of(const unsigned char *s, Py_ssize_t len, int stored)
{
    int f;
    switch (len) { /* the names' lengths tell all but two apart */
    case 12: f = s[0] == 'b' ? F_HASHES : F_OTHER; break;
    case 17: f = F_PARENT; break;
    case 9: f = s[0] == 't' ? F_TOKENS : s[0] == 'l' ? F_LORA_NAME : F_GROUP; break;
    case 10: f = s[0] == 'b' ? F_BLOCK_SIZE : F_EXTRA; break;
    case 7: f = F_LORA_ID; break;
    case 6: f = F_MEDIUM; break;
    default: return F_OTHER;
    }
    if (f == F_OTHER || !str_is(s, len, field_names[f]))
        return F_OTHER;
    if (!stored && f != F_HASHES && f != F_MEDIUM && f != F_GROUP)
        return F_OTHER;
    return f;
}

/* One field's value into ev: 0, or -1 when it is not fast form. */
static int
fev_value(const unsigned char **pp, const unsigned char *end, fev *ev, int f, const flimits *lim)
{
    Py_ssize_t n;
    const unsigned char *s;
    uint64_t v;
    switch (f) {
    case F_HASHES:
        if (mp_array_head(pp, end, &n) < 0 || n == 0 || n > lim->max_blocks)
            return -1;
        ev->hashes = *pp;
        ev->n = n;
        for (Py_ssize_t i = 0; i < n; i++)
            if (mp_u64(pp, end, &v) < 0)
                return -1;
        return 0;
    case F_PARENT:
        if (*pp < end && **pp == 0xc0) {
            (*pp)++;
            ev->has_parent = 0;
            return 0;
        }
        ev->has_parent = 1;
        return mp_u64(pp, end, &ev->parent);
    case F_TOKENS:
        if (mp_array_head(pp, end, &n) < 0)
            return -1;
        ev->tokens = *pp;
        ev->ntok = n;
        ev->has_tokens = 1;
        return mp_skip_u32s(pp, end, n);
    case F_BLOCK_SIZE:
        if (mp_u64(pp, end, &v) < 0 || v == 0 || v > (1 << 24))
            return -1;
        ev->block_size = (Py_ssize_t)v;
        return 0;
    case F_LORA_ID:
    case F_GROUP:
        return mp_nil_or_int(pp, end);
    case F_MEDIUM:
        if (*pp < end && **pp == 0xc0) {
            (*pp)++;
            ev->medium = 0;
            return 0;
        }
        if (mp_str(pp, end, &s, &n) < 0 || !str_is(s, n, "GPU"))
            return -1;
        ev->medium = 1;
        return 0;
    case F_LORA_NAME:
        if (*pp >= end || **pp != 0xc0)
            return -1;
        (*pp)++;
        return 0;
    case F_EXTRA:
        if (*pp < end && **pp == 0xc0) {
            (*pp)++;
            return 0;
        }
        if (mp_array_head(pp, end, &n) < 0)
            return -1;
        for (Py_ssize_t i = 0; i < n; i++) {
            if (**pp != 0xc0) /* n <= the bytes left: *pp < end */
                return -1;
            (*pp)++;
        }
        return 0;
    default:
        return mp_skip(pp, end, 0);
    }
}

static int
fev_parse(const unsigned char **pp, const unsigned char *end, fev *ev, const flimits *lim)
{
    Py_ssize_t n, len;
    int is_map;
    const unsigned char *s;
    memset(ev, 0, sizeof(*ev));
    ev->block_size = 16; /* BlockStored's default */
    if (mp_container(pp, end, &n, &is_map) < 0 || n < (is_map ? 1 : 2))
        return -1;
    if (is_map && (mp_str(pp, end, &s, &len) < 0 || !str_is(s, len, "type")))
        return -1;
    if (mp_str(pp, end, &s, &len) < 0)
        return -1;
    if (str_is(s, len, "BlockStored"))
        ev->stored = 1;
    else if (!str_is(s, len, "BlockRemoved"))
        return -1; /* AllBlocksCleared and unknown types: the Python path */
    unsigned seen = 0;
    for (Py_ssize_t i = 1; i < n; i++) {
        int f;
        if (is_map) {
            if (mp_str(pp, end, &s, &len) < 0)
                return -1;
            f = field_of(s, len, ev->stored);
            if (f != F_OTHER) {
                if (seen & (1u << f))
                    return -1;
                seen |= 1u << f;
            }
        }
        else {
            Py_ssize_t at = i - 1;
            if (ev->stored)
                f = at < F_OTHER ? (int)at : F_OTHER;
            else
                f = at < 3 ? removed_order[at] : F_OTHER;
            if (f != F_OTHER)
                seen |= 1u << f;
        }
        if (fev_value(pp, end, ev, f, lim) < 0)
            return -1;
    }
    if (!(seen & (1u << F_HASHES)))
        return -1;
    if (ev->stored && (!ev->has_tokens || ev->ntok != ev->n * ev->block_size))
        return -1;
    return 0;
}

/* A fast-form frame into its ts, rank (-1: nil) and events (*evs: PyMem, freed by the caller).
 * 1 fast form, 0 not, -1 out of memory (an exception set). */
static int
frame_parse(const unsigned char *p, Py_ssize_t len, const flimits *lim, double *ts,
            long *rank, fev **evs, Py_ssize_t *nev)
{
    const unsigned char *end = p + len;
    Py_ssize_t n, count;
    *evs = NULL;
    if (len > lim->max_payload || mp_array_head(&p, end, &n) < 0 || n < 2 || n > 3)
        return 0;
    if (end - p >= 9 && *p == 0xcb) {
        uint64_t bits = be(p + 1, 8);
        memcpy(ts, &bits, 8);
        p += 9;
    }
    else if (end - p >= 5 && *p == 0xca) {
        uint32_t bits = (uint32_t)be(p + 1, 4);
        float f;
        memcpy(&f, &bits, 4);
        *ts = f;
        p += 5;
    }
    else {
        return 0;
    }
    if (mp_array_head(&p, end, &count) < 0 || count > lim->max_events)
        return 0;
    fev *out = PyMem_Malloc((size_t)(count ? count : 1) * sizeof(fev));
    if (out == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        /* the decoder takes a batch of map events or of array events, not a mixture */
        unsigned char b = p < end ? *p : 0;
        int is_map = (b >= 0x80 && b <= 0x8f) || b == 0xde || b == 0xdf;
        if ((i && is_map != out[0].is_map) || fev_parse(&p, end, &out[i], lim) < 0) {
            PyMem_Free(out);
            return 0;
        }
        out[i].is_map = (char)is_map;
    }
    *rank = -1;
    if (n == 3) {
        uint64_t r;
        if (p < end && *p == 0xc0)
            p++;
        else if (mp_u64(&p, end, &r) < 0 || r >= (1u << 31)) {
            PyMem_Free(out);
            return 0;
        }
        else
            *rank = (long)r;
    }
    if (p != end) {
        PyMem_Free(out);
        return 0;
    }
    *evs = out;
    *nev = count;
    return 1;
}

static int
limits_of(PyObject *const *args, flimits *lim)
{
    Py_ssize_t *v[] = {&lim->max_payload, &lim->max_events, &lim->max_blocks};
    for (int i = 0; i < 3; i++) {
        *v[i] = PyLong_AsSsize_t(args[i]);
        if (*v[i] == -1 && PyErr_Occurred())
            return -1;
    }
    return 0;
}

/* A frame scan_frame took, kept for apply_frames so the frame is not parsed twice: the
 * payload's buffer stays held (its bytes cannot change or move) with the events found in it and
 * the limits they were checked against. */
typedef struct {
    Py_buffer view;
    fev *evs;
    Py_ssize_t nev;
    flimits lim;
} fscan;

static const char FSCAN_NAME[] = "kvray._speedups.frame_scan";

static void
fscan_free(PyObject *capsule)
{
    fscan *f = PyCapsule_GetPointer(capsule, FSCAN_NAME);
    if (f == NULL)
        return;
    PyMem_Free(f->evs);
    PyBuffer_Release(&f->view);
    PyMem_Free(f);
}

PyDoc_STRVAR(scan_frame_doc,
"scan_frame(payload, max_payload, max_events, max_blocks[, keep]) -> tuple | None\n\n"
"(ts, rank) of a batch in fast form (rank None when nil), else None. With keep true,\n"
"(ts, rank, scan): scan holds the payload and what the scan found in it, and apply_frames\n"
"takes it in the payload's place without parsing the frame again.");

static PyObject *
scan_frame(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    flimits lim;
    if (nargs != 5 && check_nargs("scan_frame", nargs, 4) < 0)
        return NULL;
    if (limits_of(args + 1, &lim) < 0)
        return NULL;
    int keep = nargs == 5 ? PyObject_IsTrue(args[4]) : 0;
    if (keep < 0)
        return NULL;
    Py_buffer view;
    if (get_buffer(args[0], &view) < 0)
        return NULL;
    double ts;
    long rank;
    fev *evs;
    Py_ssize_t nev;
    int ok = frame_parse(view.buf, view.len, &lim, &ts, &rank, &evs, &nev);
    if (ok <= 0 || !keep) {
        PyBuffer_Release(&view);
        if (ok <= 0)
            return ok < 0 ? NULL : Py_NewRef(Py_None);
        PyMem_Free(evs);
        if (rank < 0)
            return Py_BuildValue("(dO)", ts, Py_None);
        return Py_BuildValue("(dl)", ts, rank);
    }
    fscan *f = PyMem_Malloc(sizeof(fscan));
    if (f == NULL) {
        PyMem_Free(evs);
        PyBuffer_Release(&view);
        return PyErr_NoMemory();
    }
    f->view = view;
    f->evs = evs;
    f->nev = nev;
    f->lim = lim;
    PyObject *capsule = PyCapsule_New(f, FSCAN_NAME, fscan_free);
    if (capsule == NULL) {
        PyMem_Free(evs);
        PyBuffer_Release(&f->view);
        PyMem_Free(f);
        return NULL;
    }
    if (rank < 0)
        return Py_BuildValue("(dON)", ts, Py_None, capsule);
    return Py_BuildValue("(dlN)", ts, rank, capsule);
}

/* A little-endian u64 (a packed key). */
static inline uint64_t
le64(const unsigned char *b)
{
    uint64_t k = 0;
    for (int x = 7; x >= 0; x--)
        k = (k << 8) | b[x];
    return k;
}

/* u64 keys as little-endian bytes (kvray.core.snapshot.pack_keys). */
static PyObject *
packed_bytes(const uint64_t *keys, Py_ssize_t n)
{
    PyObject *out = PyBytes_FromStringAndSize(NULL, n * 8);
    if (out == NULL)
        return NULL;
    unsigned char *b = (unsigned char *)PyBytes_AS_STRING(out);
    for (Py_ssize_t i = 0; i < n; i++)
        for (int j = 0; j < 8; j++)
            b[i * 8 + j] = (unsigned char)(keys[i] >> (8 * j));
    return out;
}

/* Append (kind, packed keys) to ops. */
static int
push_op(PyObject *ops, long kind, const uint64_t *keys, Py_ssize_t n)
{
    PyObject *packed = packed_bytes(keys, n);
    PyObject *op = packed == NULL ? NULL : Py_BuildValue("(lN)", kind, packed);
    int rc = op == NULL ? -1 : PyList_Append(ops, op);
    Py_XDECREF(op);
    return rc;
}

static int
push_int(PyObject *list, long long v)
{
    PyObject *x = PyLong_FromLongLong(v);
    int rc = x == NULL ? -1 : PyList_Append(list, x);
    Py_XDECREF(x);
    return rc;
}

/* 1 when some tier holds r, 0 when none does, -1 on error. */
static int
indexed_u64(PyObject *tiers, uint64_t r)
{
    for (Py_ssize_t j = 0; j < PySequence_Fast_GET_SIZE(tiers); j++) {
        PyObject *t = PySequence_Fast_GET_ITEM(tiers, j);
        int rc;
        if (IS_TABLE(t)) {
            rc = ops_of(t)->find(t, r) >= 0;
        }
        else {
            PyObject *k = PyLong_FromUnsignedLongLong(r);
            rc = k == NULL ? -1 : PyDict_Contains(t, k);
            Py_XDECREF(k);
        }
        if (rc != 0)
            return rc;
    }
    return 0;
}

/* A holder's extra copy of engine key e (a dict of engine key -> copies beyond the first):
 * add one (delta 1), or take one away when there is one (delta -1: 1 when taken, 0 when e has
 * no extra copy). -1 on error. */
static int
copies_step(PyObject *copies, uint64_t e, int delta)
{
    if (delta < 0 && PyDict_GET_SIZE(copies) == 0)
        return 0;
    PyObject *k = PyLong_FromUnsignedLongLong(e);
    if (k == NULL)
        return -1;
    PyObject *c = PyDict_GetItemWithError(copies, k); /* borrowed */
    int rc;
    if (c == NULL && PyErr_Occurred()) {
        rc = -1;
    }
    else if (delta > 0) {
        long long n = c == NULL ? 0 : PyLong_AsLongLong(c);
        PyObject *v = n == -1 && PyErr_Occurred() ? NULL : PyLong_FromLongLong(n + 1);
        rc = v == NULL ? -1 : PyDict_SetItem(copies, k, v);
        Py_XDECREF(v);
    }
    else if (c == NULL) {
        rc = 0;
    }
    else {
        long long n = PyLong_AsLongLong(c);
        if (n == -1 && PyErr_Occurred()) {
            rc = -1;
        }
        else if (n > 1) {
            PyObject *v = PyLong_FromLongLong(n - 1);
            rc = v == NULL ? -1 : PyDict_SetItem(copies, k, v);
            Py_XDECREF(v);
            rc = rc < 0 ? -1 : 1;
        }
        else {
            rc = PyDict_DelItem(copies, k) < 0 ? -1 : 1;
        }
    }
    Py_DECREF(k);
    return rc;
}

/* What apply_frames shares across the frames of one call: the holder's tables,
 * the outputs, and scratch buffers. */
typedef struct {
    PyObject *d, *emap, *tiers, *copies;
    maskarg bit, keep;
    int recency;
    uint64_t tag, root;
    Py_ssize_t bs;
    flimits lim;
    const table_ops *op;
    PyObject *ops, *pools;
    long long stored, removed, unknown_removed, unknown_parent, added, deleted;
    uint64_t *keys; /* keys_cap request keys, then keys_cap engine keys, then keys_cap guesses */
    Py_ssize_t keys_cap;
    uint32_t *block;
    u64vec run;
} fapply;

/* Parse apply_frames' arguments from the table d on (args[0]); 0, or -1
 * with an exception set. */
static int
fapply_open(fapply *c, PyObject *const *args)
{
    memset(c, 0, sizeof(*c));
    if (limits_of(args + 10, &c->lim) < 0)
        return -1;
    c->d = args[0];
    c->emap = args[1];
    c->copies = args[9];
    if (!IS_TABLE(c->d) || !IS_U64MAP(c->emap) || !PyDict_CheckExact(c->copies)) {
        PyErr_SetString(PyExc_TypeError, "apply_frames(): d, emap must be tables, copies a dict");
        return -1;
    }
    if (mask_table(c->d, "apply_frames") < 0)
        return -1;
    if (bit_open(args[3], &c->bit) < 0 || keep_open(args[4], &c->keep) < 0)
        return -1;
    c->recency = PyObject_IsTrue(args[5]);
    if (c->recency < 0 || get_u64(args[6], &c->tag) < 0 || get_u64(args[7], &c->root) < 0)
        return -1;
    c->bs = PyLong_AsSsize_t(args[8]);
    if (c->bs == -1 && PyErr_Occurred())
        return -1;
    c->op = ops_of(c->d);
    c->tiers = tiers_open(args[2], "apply_frames");
    c->ops = PyList_New(0);
    c->pools = PyList_New(0);
    c->block = PyMem_Malloc((size_t)(c->bs > 0 ? c->bs : 1) * sizeof(uint32_t));
    if (c->tiers == NULL || c->ops == NULL || c->pools == NULL)
        return -1;
    if (c->block == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

static void
fapply_close(fapply *c)
{
    Py_XDECREF(c->tiers);
    Py_XDECREF(c->ops);
    Py_XDECREF(c->pools);
    mask_close(&c->bit);
    PyMem_Free(c->keys);
    PyMem_Free(c->block);
    PyMem_Free(c->run.v);
}

/* *g = the request key engine key e maps to (0: none), its first line in c->d prefetched. */
static inline void
guess_key(fapply *c, PyObject *emap, uint64_t e, uint64_t *g)
{
    *g = 0;
    Py_ssize_t at = um_find(emap, e);
    if (at >= 0 && tb_get_u64(emap, *um_val(emap, at), g) == 0)
        c->op->prefetch(c->d, *g, 0);
    else if (at >= 0)
        PyErr_Clear(); /* not a u64 (cannot be: emap holds request keys); only a hint */
}

/* Apply one fast-form frame: 1 applied, 0 declined with nothing changed (not in fast form, or a
 * BlockStored's block_size differs), -1 on error. */
static int
fapply_one(fapply *c, PyObject *payload)
{
    /* A frame scan_frame kept (checked against the same limits) is not parsed again. */
    fscan *kept = NULL;
    if (PyCapsule_CheckExact(payload) && PyCapsule_IsValid(payload, FSCAN_NAME)) {
        fscan *f = PyCapsule_GetPointer(payload, FSCAN_NAME);
        if (memcmp(&f->lim, &c->lim, sizeof(flimits)) == 0)
            kept = f;
        else
            payload = f->view.obj; /* checked against other limits: parse it again */
    }
    Py_buffer view;
    double ts;
    long rank;
    fev *evs = NULL;
    Py_ssize_t nev = 0, maxn = 0;
    int ok;
    if (kept != NULL) {
        view = kept->view; /* borrowed: the capsule releases it */
        evs = kept->evs;
        nev = kept->nev;
        ok = 1;
    }
    else {
        if (payload == NULL || get_buffer(payload, &view) < 0) {
            if (payload == NULL)
                PyErr_SetString(PyExc_TypeError, "apply_frames(): a frame scan without a payload");
            return -1;
        }
        ok = frame_parse(view.buf, view.len, &c->lim, &ts, &rank, &evs, &nev);
    }
    const unsigned char *end = (const unsigned char *)view.buf + view.len;
    for (Py_ssize_t i = 0; ok > 0 && i < nev; i++) {
        if (evs[i].stored && evs[i].block_size != c->bs)
            ok = 0; /* the contract's block_size_mismatch: the Python path counts it */
        if (evs[i].n > maxn)
            maxn = evs[i].n;
    }
    if (ok > 0 && maxn > c->keys_cap) {
        uint64_t *k = PyMem_Realloc(c->keys, (size_t)maxn * 3 * sizeof(uint64_t));
        if (k == NULL) {
            PyErr_NoMemory();
            ok = -1;
        }
        else {
            c->keys = k;
            c->keys_cap = maxn;
        }
    }
    if (ok <= 0) {
        if (kept == NULL) {
            PyMem_Free(evs);
            PyBuffer_Release(&view);
        }
        return ok;
    }
    PyObject *d = c->d, *emap = c->emap, *copies = c->copies;
    const table_ops *op = c->op;
    uint64_t *keys = c->keys, tag = c->tag;
    uint64_t *eks = keys + c->keys_cap, *guess = eks + c->keys_cap;
    uint32_t *block = c->block;
    Py_ssize_t bs = c->bs;
    u64vec *run = &c->run;
    Py_ssize_t run_hashes = 0, run_left = 0;
    char run_medium = 0;
    int rc_out = -1;
    run->n = 0;
    /* A run of removals ends: its pool step, and its op unless copies absorbed all of it. */
#define FLUSH_RUN()                                                                          \
    do {                                                                                     \
        if (run_hashes) {                                                                    \
            if (push_int(c->pools, -run_hashes) < 0)                                         \
                goto done;                                                                   \
            if (run_left && push_op(c->ops, 1, run->v, run->n) < 0)                          \
                goto done;                                                                   \
            c->removed += run->n;                                                            \
            run->n = run_hashes = run_left = 0;                                              \
        }                                                                                    \
    } while (0)
    for (Py_ssize_t i = 0; i < nev; i++) {
        fev *ev = &evs[i];
        const unsigned char *hp = ev->hashes;
        if (!ev->stored) {
            if (run_hashes && ev->medium != run_medium)
                FLUSH_RUN();
            run_medium = ev->medium;
            run_hashes += ev->n;
            for (Py_ssize_t j = 0; j < ev->n; j++) {
                uint64_t h = 0;
                (void)mp_u64(&hp, end, &h); /* checked by frame_parse */
                eks[j] = h ^ tag;
                um_prefetch(emap, eks[j], 0); /* emap is a U64Map (fapply_open) */
            }
            /* Lookahead: the request key block j + PF_DIST maps to now, and its lines in d
             * (emap's line for it was fetched above). A guess for prefetching only: the loop
             * looks every key up again when it gets there. */
            for (Py_ssize_t x = 0; x < ev->n && x < PF_DIST; x++)
                guess_key(c, emap, eks[x], &guess[x]);
            for (Py_ssize_t j = 0; j < ev->n; j++) {
                uint64_t r;
                Py_ssize_t ahead = j + PF_DIST, near = j + PF_DIST / 2;
                if (ahead < ev->n)
                    guess_key(c, emap, eks[ahead], &guess[ahead]);
                if (near < ev->n && guess[near])
                    op->prefetch(d, guess[near], 1);
                uint64_t e = eks[j];
                int extra = copies_step(copies, e, -1);
                if (extra < 0)
                    goto done;
                if (extra)
                    continue; /* another copy stays held */
                run_left++;
                Py_ssize_t at = um_find(emap, e);
                if (at < 0) {
                    c->unknown_removed++;
                    continue;
                }
                if (tb_get_u64(emap, *um_val(emap, at), &r) < 0 || u64vec_push(run, r) < 0)
                    goto done;
                Py_ssize_t dat = op->find(d, r);
                int gone = dat >= 0 ? tb_and_at(d, dat, &c->keep) : 1;
                if (gone < 0)
                    goto done;
                c->deleted += dat >= 0 && gone;
                /* r still in d: indexed; else maybe in another tier */
                int indexed = gone ? indexed_u64(c->tiers, r) : 1;
                if (indexed < 0)
                    goto done;
                if (!indexed) /* emap is unchanged since it was found at `at` */
                    um_del_at(emap, at);
            }
            continue;
        }
        FLUSH_RUN();
        if (push_int(c->pools, ev->n) < 0)
            goto done;
        uint64_t key = c->root;
        if (ev->has_parent) {
            Py_ssize_t at = um_find(emap, ev->parent ^ tag);
            if (at < 0) {
                c->unknown_parent += ev->n;
                continue;
            }
            if (tb_get_u64(emap, *um_val(emap, at), &key) < 0)
                goto done;
        }
        const unsigned char *tp = ev->tokens;
        for (Py_ssize_t j = 0; j < ev->n; j++) {
            uint64_t h = 0;
            (void)mp_u64(&hp, end, &h);
            eks[j] = h ^ tag;
            um_prefetch(emap, eks[j], 0);
        }
        for (Py_ssize_t j = 0; j < ev->n; j++) {
            for (Py_ssize_t t = 0; t < bs; t++) {
                uint32_t v = next_u32(&tp, end); /* checked by frame_parse */
                unsigned char *b = (unsigned char *)&block[t];
                b[0] = (unsigned char)v;
                b[1] = (unsigned char)(v >> 8);
                b[2] = (unsigned char)(v >> 16);
                b[3] = (unsigned char)(v >> 24);
            }
            key = XXH3_64bits_withSeed(block, (size_t)bs * 4, key);
            keys[j] = key;
            op->prefetch(d, key, 0);
            if (j >= PF_DIST / 2)
                op->prefetch(d, keys[j - PF_DIST / 2], 1);
        }
        for (Py_ssize_t j = ev->n - PF_DIST / 2; j < ev->n; j++)
            if (j >= 0)
                op->prefetch(d, keys[j], 1); /* the last ones the loop above left */
        for (Py_ssize_t j = 0; j < ev->n; j++) {
            uint64_t e = eks[j];
            Py_ssize_t at = op->find(d, keys[j]);
            int same = 0, rc;
            if (at < 0) {
                rc = op->add(d, keys[j], tv_dup(c->bit.tv));
                c->added += rc == 0;
            }
            else {
                rc = tb_or_at(d, keys[j], at, &c->bit, c->recency, &same);
            }
            if (rc == 0 && same)
                rc = copies_step(copies, e, 1);
            if (rc < 0 || tb_set(emap, e, tb_of_u64(emap, keys[j])) < 0)
                goto done;
        }
        if (push_op(c->ops, 0, keys, ev->n) < 0)
            goto done;
        c->stored += ev->n;
    }
    FLUSH_RUN();
#undef FLUSH_RUN
    rc_out = 1;
done:
    if (kept == NULL) {
        PyMem_Free(evs);
        PyBuffer_Release(&view);
    }
    return rc_out;
}

PyDoc_STRVAR(apply_frames_doc,
"apply_frames(payloads, start, d, emap, tiers, bit, keep, recency, tag, root, block_size,\n"
"             copies, max_payload, max_events, max_blocks) -> tuple\n\n"
"Apply a run of one holder's fast-form frames (see kvray/_ext/speedups.c), payloads[start:] in\n"
"order (each the frame's bytes or the scan scan_frame kept of it), to a memory index, as\n"
"IndexWriter.apply_batch does with their events; stop at the\n"
"first frame not in fast form or with a BlockStored whose block_size differs (it and those\n"
"after it are left alone). d is the GPU tier (a table), emap the engine map, tiers every tier,\n"
"bit / keep the holder's bit and its complement, tag / root the model's engine-key tag and\n"
"request-key root, copies the holder's GPU copy counts (a dict: engine key -> copies beyond\n"
"the first; a store of a held block adds one, a removal takes one before it removes the\n"
"block). Returns (stop, ops, pools, stored, removed, unknown_removed, unknown_parent, added,\n"
"deleted): stop the index of the frame not taken (len(payloads): all were); ops the\n"
"change-stream ops in order (0 add / 1 remove, packed keys), one per BlockStored and per run\n"
"of removals that removes anything; pools the pool-gauge steps (+n stored, -n removed); then\n"
"the counts, summed over the frames taken.");

static PyObject *
apply_frames(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    fapply c;
    PyObject *result = NULL;
    if (check_nargs("apply_frames", nargs, 15) < 0)
        return NULL;
    PyObject *payloads = args[0];
    if (!PyList_CheckExact(payloads)) {
        PyErr_SetString(PyExc_TypeError, "apply_frames(): payloads must be a list");
        return NULL;
    }
    Py_ssize_t i = PyLong_AsSsize_t(args[1]);
    if (i == -1 && PyErr_Occurred())
        return NULL;
    if (i < 0)
        i = 0;
    if (fapply_open(&c, args + 2) == 0) {
        int ok = 1;
        for (; i < PyList_GET_SIZE(payloads); i++) {
            PyObject *p = Py_NewRef(PyList_GET_ITEM(payloads, i)); /* the list may change */
            ok = fapply_one(&c, p);
            Py_DECREF(p);
            if (ok <= 0)
                break;
        }
        if (ok >= 0)
            result = Py_BuildValue("(nOOLLLLLL)", i, c.ops, c.pools, c.stored, c.removed,
                                   c.unknown_removed, c.unknown_parent, c.added, c.deleted);
    }
    fapply_close(&c);
    return result;
}

/* --- a read replica's change messages: apply_ops ----------------------------------------- */

PyDoc_STRVAR(apply_ops_doc,
"apply_ops(ops, start, tiers, slots, holders) -> (stop, added, deleted)\n\n"
"Apply change-stream ops (op, holder, tier, packed keys, ttl) from ops[start] on to an index\n"
"whose tiers are tables (tiers: name -> table; slots: holder -> slot): an add ORs the holder's\n"
"bit into its keys (and adds the holder to the set holders), a remove clears it, deleting keys\n"
"left with no holder. Stops at the first op that needs more (an add with a TTL, of a holder\n"
"with no slot or to a tier with no table; any op on the speculative tier; a clear or reset)\n"
"and returns its index (len(ops) when none did), with the keys added and deleted.");

static PyObject *
apply_ops(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (check_nargs("apply_ops", nargs, 5) < 0)
        return NULL;
    PyObject *ops = args[0], *tiers = args[2], *slots = args[3], *holders = args[4];
    if (!PyList_CheckExact(ops) || !PyDict_CheckExact(tiers) || !PyDict_CheckExact(slots)
        || !PySet_Check(holders)) {
        PyErr_SetString(PyExc_TypeError, "apply_ops(): expected list, int, dict, dict, set");
        return NULL;
    }
    Py_ssize_t i = PyLong_AsSsize_t(args[1]);
    if (i == -1 && PyErr_Occurred())
        return NULL;
    if (i < 0)
        i = 0;
    long long added = 0, deleted = 0;
    for (; i < PyList_GET_SIZE(ops); i++) {
        PyObject *op = PyList_GET_ITEM(ops, i);
        if (!PyTuple_CheckExact(op) || PyTuple_GET_SIZE(op) != 5)
            break;
        PyObject *kind_o = PyTuple_GET_ITEM(op, 0), *holder = PyTuple_GET_ITEM(op, 1);
        PyObject *tier = PyTuple_GET_ITEM(op, 2), *raw = PyTuple_GET_ITEM(op, 3);
        PyObject *ttl = PyTuple_GET_ITEM(op, 4);
        if (!PyLong_CheckExact(kind_o) || !PyUnicode_CheckExact(tier) || !PyBytes_CheckExact(raw)
            || PyBytes_GET_SIZE(raw) % 8 || !PyFloat_CheckExact(ttl))
            break;
        long kind = PyLong_AsLong(kind_o);
        if ((kind != 0 && kind != 1) || PyFloat_AS_DOUBLE(ttl) != 0.0
            || PyUnicode_CompareWithASCIIString(tier, "SPECULATIVE") == 0)
            break;
        PyObject *d = PyDict_GetItemWithError(tiers, tier); /* borrowed */
        PyObject *slot = PyDict_GetItemWithError(slots, holder);
        if (PyErr_Occurred())
            return NULL;
        if (d == NULL || slot == NULL) {
            if (kind == 0)
                break; /* needs a slot or a table: the caller's path */
            continue;  /* a removal from nothing: nothing to do */
        }
        if (!IS_TABLE(d)) {
            PyErr_SetString(PyExc_TypeError, "apply_ops(): tiers must be tables");
            return NULL;
        }
        if (mask_table(d, "apply_ops") < 0)
            return NULL;
        long sl = PyLong_AsLong(slot);
        if (sl == -1 && PyErr_Occurred())
            return NULL;
        if (sl < 0) {
            PyErr_SetString(PyExc_ValueError, "apply_ops(): negative slot");
            return NULL;
        }
        maskarg bit, keep;
        int rc = slot_masks(sl, &bit, &keep);
        if (rc < 0) {
            mask_close(&bit);
            return NULL;
        }
        const table_ops *t = ops_of(d);
        const unsigned char *b = (const unsigned char *)PyBytes_AS_STRING(raw);
        Py_ssize_t n = PyBytes_GET_SIZE(raw) / 8;
        for (Py_ssize_t j = 0; rc == 0 && j < n; j++) {
            if (j + PF_DIST < n)
                t->prefetch(d, le64(b + (j + PF_DIST) * 8), 0);
            if (j + PF_DIST / 2 < n)
                t->prefetch(d, le64(b + (j + PF_DIST / 2) * 8), 1);
            uint64_t k = le64(b + j * 8);
            Py_ssize_t at = t->find(d, k);
            if (kind == 0 && at < 0) {
                rc = t->add(d, k, tv_dup(bit.tv));
                added += rc == 0;
            }
            else if (kind == 0) {
                int same;
                rc = tb_or_at(d, k, at, &bit, 1, &same); /* a U64Dict keeps recency order */
            }
            else if (at >= 0) {
                int gone = tb_and_at(d, at, &keep);
                rc = gone < 0 ? -1 : 0;
                deleted += gone > 0;
            }
        }
        mask_close(&bit);
        mask_close(&keep);
        if (rc == 0 && kind == 0)
            rc = PySet_Add(holders, holder);
        if (rc < 0)
            return NULL;
    }
    return Py_BuildValue("(nLL)", i, added, deleted);
}

/* --- ZMQ: a socket's queued messages in one call -----------------------------------------
 *
 * pyzmq's recv costs a Python call, a Frame object and a copy per frame, and reading its socket
 * options goes through an enum conversion: on a busy stream that was the largest part of a
 * shard reader's Python time. recv_messages takes every message a SUB socket has queued with
 * libzmq's own calls. The functions are libzmq's as pyzmq loaded it: their addresses are handed
 * over once (zmq_api, from kvray.ingest.zmq_source), so this extension neither links libzmq
 * nor could use another copy of it. The socket is pyzmq's (Socket.underlying); its owner
 * calls this only from the thread that reads it. */

typedef union {
    unsigned char bytes[64];
    void *align;
} zmsg; /* zmq_msg_t: 64 bytes, pointer-aligned (zmq.h) */

static struct {
    int (*init)(zmsg *);
    int (*recv)(zmsg *, void *, int);
    void *(*data)(zmsg *);
    size_t (*size)(const zmsg *);
    int (*more)(const zmsg *);
    int (*close)(zmsg *);
    int (*error)(void);
} zapi;

#define KV_ZMQ_DONTWAIT 1 /* ZMQ_DONTWAIT */

PyDoc_STRVAR(zmq_api_doc,
"zmq_api(msg_init, msg_recv, msg_data, msg_size, msg_more, msg_close, errno) -> None\n\n"
"The addresses of libzmq's zmq_msg_* functions and zmq_errno, as the process loaded them.");

static PyObject *
zmq_api(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (check_nargs("zmq_api", nargs, 7) < 0)
        return NULL;
    void *f[7];
    for (int i = 0; i < 7; i++) {
        f[i] = PyLong_AsVoidPtr(args[i]);
        if (f[i] == NULL) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "zmq_api(): a null function address");
            return NULL;
        }
    }
    /* object pointers to function pointers: what dlsym's callers do too */
    memcpy(&zapi.init, &f[0], sizeof(void *));
    memcpy(&zapi.recv, &f[1], sizeof(void *));
    memcpy(&zapi.data, &f[2], sizeof(void *));
    memcpy(&zapi.size, &f[3], sizeof(void *));
    memcpy(&zapi.more, &f[4], sizeof(void *));
    memcpy(&zapi.close, &f[5], sizeof(void *));
    memcpy(&zapi.error, &f[6], sizeof(void *));
    Py_RETURN_NONE;
}

PyDoc_STRVAR(recv_messages_doc,
"recv_messages(socket, max_messages) -> list[list[bytes]]\n\n"
"The messages queued on a libzmq socket (its address: pyzmq's Socket.underlying), at most\n"
"max_messages, each as its list of frames; never waits. Raises OSError when libzmq fails\n"
"with anything but EAGAIN before a message was read (after one, the messages read are\n"
"returned and the next call raises); RuntimeError before zmq_api was called.");

static PyObject *
recv_messages(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (check_nargs("recv_messages", nargs, 2) < 0)
        return NULL;
    if (zapi.recv == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "recv_messages(): zmq_api() was not called");
        return NULL;
    }
    void *sock = PyLong_AsVoidPtr(args[0]);
    if (sock == NULL) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "recv_messages(): a null socket");
        return NULL;
    }
    Py_ssize_t max = PyLong_AsSsize_t(args[1]);
    if (max == -1 && PyErr_Occurred())
        return NULL;
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    PyObject *frames = NULL;
    zmsg m;
    while (PyList_GET_SIZE(out) < max) {
        frames = PyList_New(0);
        if (frames == NULL)
            goto fail;
        int more = 1;
        while (more) {
            zapi.init(&m);
            if (zapi.recv(&m, sock, KV_ZMQ_DONTWAIT) < 0) {
                int err = zapi.error();
                zapi.close(&m);
                if (PyList_GET_SIZE(frames) > 0) /* a message cut short (libzmq delivers */
                    break;                       /* whole ones): its parser says so */
                Py_CLEAR(frames);
                if (err == EAGAIN || err == EINTR || PyList_GET_SIZE(out) > 0)
                    return out;
                errno = err;
                PyErr_SetFromErrno(PyExc_OSError);
                goto fail;
            }
            PyObject *b = PyBytes_FromStringAndSize(zapi.data(&m), (Py_ssize_t)zapi.size(&m));
            more = zapi.more(&m);
            zapi.close(&m);
            if (b == NULL || PyList_Append(frames, b) < 0) {
                Py_XDECREF(b);
                goto fail;
            }
            Py_DECREF(b);
        }
        if (PyList_Append(out, frames) < 0)
            goto fail;
        Py_CLEAR(frames);
    }
    return out;
fail:
    Py_XDECREF(frames);
    Py_DECREF(out);
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
    {"slot_keys", (PyCFunction)(void (*)(void))slot_keys, METH_FASTCALL, slot_keys_doc},
    {"clear_slots", (PyCFunction)(void (*)(void))clear_slots, METH_FASTCALL, clear_slots_doc},
    {"scan_frame", (PyCFunction)(void (*)(void))scan_frame, METH_FASTCALL, scan_frame_doc},
    {"apply_frames", (PyCFunction)(void (*)(void))apply_frames, METH_FASTCALL, apply_frames_doc},
    {"apply_ops", (PyCFunction)(void (*)(void))apply_ops, METH_FASTCALL, apply_ops_doc},
    {"zmq_api", (PyCFunction)(void (*)(void))zmq_api, METH_FASTCALL, zmq_api_doc},
    {"recv_messages", (PyCFunction)(void (*)(void))recv_messages, METH_FASTCALL,
     recv_messages_doc},
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
    u32_size_init();
    /* Seeds differ between processes too (a restarted shard refills tables from a snapshot a
     * process with the same table-creation order wrote). */
    PyObject *os = PyImport_ImportModule("os");
    PyObject *rnd = os == NULL ? NULL : PyObject_CallMethod(os, "urandom", "i", 8);
    Py_XDECREF(os);
    if (rnd == NULL || !PyBytes_Check(rnd) || PyBytes_GET_SIZE(rnd) != 8) {
        Py_XDECREF(rnd);
        return NULL;
    }
    memcpy(&seed_base, PyBytes_AS_STRING(rnd), 8);
    Py_DECREF(rnd);
    PyObject *mod = PyModule_Create(&module);
    if (mod != NULL && (PyModule_AddObjectRef(mod, "U64Map", (PyObject *)&U64Map_Type) < 0
                        || PyModule_AddObjectRef(mod, "U64Dict", (PyObject *)&U64Dict_Type) < 0))
        Py_CLEAR(mod);
    return mod;
}

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

static int
get_u64(PyObject *obj, uint64_t *out)
{
    if (!PyLong_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "expected an int, got %.100s", Py_TYPE(obj)->tp_name);
        return -1;
    }
    unsigned long long v = PyLong_AsUnsignedLongLong(obj);
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

PyDoc_STRVAR(or_bits_doc,
"or_bits(d, keys, bit, recency) -> int\n\n"
"keys: a list or tuple of ints, or an array('Q').\n"
"d[k] = d.get(k, 0) | bit for every k (with recency, k also moves to the dict's end);\n"
"returns how many keys were new.");

static int
dict_args(PyObject *const *args, Py_ssize_t nargs, Py_ssize_t want, const char *name, keys_t *k)
{
    if (nargs != want) {
        PyErr_Format(PyExc_TypeError, "%s() takes %zd arguments (%zd given)", name, want, nargs);
        return -1;
    }
    if (!PyDict_CheckExact(args[0])) {
        PyErr_Format(PyExc_TypeError, "%s(): expected a dict", name);
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
    PyObject *d = args[0], *keep = args[2];
    Py_ssize_t deleted = 0;
    for (Py_ssize_t i = 0; i < ks.n; i++) {
        PyObject *k = keys_get(&ks, i);
        if (k == NULL)
            goto fail;
        PyObject *old = PyDict_GetItemWithError(d, k);
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
        PyObject *v = k == NULL ? NULL : PyDict_GetItemWithError(args[0], k);
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
    PyObject *tiers = PySequence_Fast(obj, "tiers must be a sequence of dicts");
    if (tiers == NULL)
        return NULL;
    for (Py_ssize_t j = 0; j < PySequence_Fast_GET_SIZE(tiers); j++) {
        if (!PyDict_CheckExact(PySequence_Fast_GET_ITEM(tiers, j))) {
            PyErr_Format(PyExc_TypeError, "%s(): tiers must be dicts", name);
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
        int rc = PyDict_Contains(PySequence_Fast_GET_ITEM(tiers, j), r);
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
        PyObject *r = PyDict_GetItemWithError(emap, e);
        int indexed = r == NULL ? (PyErr_Occurred() ? -1 : 1) : indexed_in(tiers, r);
        if (indexed == 0) {
            indexed = PyDict_DelItem(emap, e);
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
    if (!PyDict_CheckExact(args[1]) || !PyList_CheckExact(args[2]) || !PyList_CheckExact(args[3])) {
        PyErr_SetString(PyExc_TypeError, "add_engine(): expected dict, dict, list, list");
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
        if (PyDict_SetItem(emap, PyList_GET_ITEM(engine, i), PyList_GET_ITEM(keys, i)) < 0) {
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
    if (!PyDict_CheckExact(d) || !PyDict_CheckExact(emap)) {
        PyErr_SetString(PyExc_TypeError, "remove_engine(): expected two dicts");
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
        PyObject *r = PyDict_GetItemWithError(emap, e);
        if (r == NULL) {
            Py_DECREF(e);
            if (PyErr_Occurred())
                goto fail;
            unknown++;
            continue;
        }
        Py_INCREF(r); /* emap's entry may go below */
        int rc = PyList_Append(keys, r);
        PyObject *m = rc < 0 ? NULL : PyDict_GetItemWithError(d, r);
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
            rc = indexed < 0 ? -1 : indexed ? 0 : PyDict_DelItem(emap, e);
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
    return PyModule_Create(&module);
}

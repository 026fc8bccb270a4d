/* The legacy stream (torch < 1.6, or _use_new_zipfile_serialization=False):
 * five pickles (magic number, protocol version, sys_info, the objects, the
 * storage keys) and then, per listed key, an int64 element count and the
 * storage's bytes. */
#include "load_internal.h"

#include "core/legacy.h"
#include "errors.h"
#include "session.h"
#include "tensors.h"
#include "unpickler.h"

/* Runs one of the small header pickles and returns its value (new ref). */
static PyObject *header_pickle(ck_session *s, size_t *pos, const char *what) {
    size_t used = 0;
    PyObject *r = ck_unpickle(s, s->buf + *pos, s->len - *pos, what, &used);
    if (ck_warn_protocol(s, r != NULL) < 0)
        Py_CLEAR(r);
    if (r != NULL)
        *pos += used;
    return r;
}

static int expect_int(ck_session *s, PyObject *value, const char *expected_hex, const char *what) {
    PyObject *want = PyLong_FromString(expected_hex, NULL, 16);
    if (want == NULL)
        return -1;
    int eq = PyLong_Check(value) ? PyObject_RichCompareBool(value, want, Py_EQ) : 0;
    Py_DECREF(want);
    if (eq < 0)
        return -1;
    if (!eq) {
        ck_raise(s->st->CheckpointError, s->filename, "%s", what);
        return -1;
    }
    return 0;
}

/* One storage of the layout: what its first persistent id says. */
static int layout_from_pids(ck_session *s, PyObject *pids, PyObject *roots, PyObject *views) {
    ck_state *st = s->st;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(pids); i++) {
        PyObject *pid = PyList_GET_ITEM(pids, i);
        if (!PyTuple_Check(pid) || PyTuple_GET_SIZE(pid) != 6)
            continue; /* refused (or a module) when the objects are built */
        PyObject *key = PyTuple_GET_ITEM(pid, 2);
        if (!PyUnicode_Check(key))
            continue;
        int seen = PyDict_Contains(roots, key);
        if (seen < 0)
            return -1;
        if (seen)
            continue;
        PyObject *code = PyDict_GetItemWithError(st->storage_dtype, PyTuple_GET_ITEM(pid, 1));
        if (code == NULL) {
            if (PyErr_Occurred())
                return -1;
            ck_raise(st->UnpicklingError, s->filename, "storage '%U' names an unknown storage type",
                     key);
            return -1;
        }
        PyObject *entry = PyTuple_Pack(2, code, PyTuple_GET_ITEM(pid, 4));
        if (entry == NULL || PyDict_SetItem(roots, key, entry) < 0) {
            Py_XDECREF(entry);
            return -1;
        }
        Py_DECREF(entry);
        PyObject *view = PyTuple_GET_ITEM(pid, 5);
        if (PyTuple_Check(view) && PyTuple_GET_SIZE(view) == 3 &&
            PyUnicode_Check(PyTuple_GET_ITEM(view, 0)) &&
            PySet_Add(views, PyTuple_GET_ITEM(view, 0)) < 0)
            return -1;
    }
    return 0;
}

static int add_slot(PyObject *slots, PyObject *key, Py_ssize_t *n) {
    int has = PyDict_Contains(slots, key);
    if (has != 0)
        return has < 0 ? -1 : 0;
    PyObject *idx = PyLong_FromSsize_t((*n)++);
    int rc = idx ? PyDict_SetItem(slots, key, idx) : -1;
    Py_XDECREF(idx);
    return rc;
}

/* The data after the pickles: per listed key, an int64 element count then
 * the bytes (walked by src/core/legacy.c). Each key's element size and count
 * come from its object first; the walk covers the keys before the first
 * whose object is missing or gives an invalid size, so that the faults are
 * reported in the order of the file: the earliest storage's first. Sets
 * each listed storage's bytes; 0, or -1 with an exception set. */
static int walk_data(ck_session *s, PyObject *keys, PyObject *roots, size_t pos) {
    ck_state *st = s->st;
    size_t n_keys = (size_t)PyList_GET_SIZE(keys);
    size_t n = n_keys ? n_keys : 1;
    /* in: elsize, expect; out: offset, length; n each */
    uint64_t *elsize = PyMem_Malloc(2 * n * sizeof(uint64_t));
    size_t *offset = PyMem_Malloc(2 * n * sizeof(size_t));
    if (elsize == NULL || offset == NULL) {
        PyMem_Free(elsize);
        PyMem_Free(offset);
        PyErr_NoMemory();
        return -1;
    }
    uint64_t *expect = elsize + n;
    size_t *length = offset + n;
    int rc = -1;
    size_t n_ok = 0;
    enum { ALL_SIZED, NO_OBJECT, INVALID_SIZE } stop = ALL_SIZED; /* why key n_ok ends the walk */
    for (; n_ok < n_keys; n_ok++) {
        PyObject *key = PyList_GET_ITEM(keys, (Py_ssize_t)n_ok);
        PyObject *entry = PyDict_GetItemWithError(roots, key);
        if (entry == NULL) {
            if (PyErr_Occurred())
                goto out;
            stop = NO_OBJECT;
            break;
        }
        int code = (int)PyLong_AsLong(PyTuple_GET_ITEM(entry, 0));
        long long numel = PyLong_Check(PyTuple_GET_ITEM(entry, 1))
                              ? PyLong_AsLongLong(PyTuple_GET_ITEM(entry, 1))
                              : -1;
        uint64_t nbytes;
        if (numel < 0 ||
            __builtin_mul_overflow((uint64_t)numel, (uint64_t)st->dtypes[code].elsize, &nbytes)) {
            PyErr_Clear();
            stop = INVALID_SIZE;
            break;
        }
        elsize[n_ok] = (uint64_t)st->dtypes[code].elsize;
        expect[n_ok] = (uint64_t)numel;
    }
    ck_legacy_walk walk;
    ck_error err;
    ck_error_clear(&err);
    if (ck_legacy_walk_storages(s->buf, s->len, pos, n_ok, elsize, expect, offset, length, &walk,
                                &err) != CK_OK) {
        PyObject *key = PyList_GET_ITEM(keys, (Py_ssize_t)walk.at);
        if (walk.fault == CK_LEGACY_NO_COUNT)
            ck_raise(st->CheckpointError, s->filename,
                     "the file ends before the data of storage '%U' (truncated)", key);
        else if (walk.fault == CK_LEGACY_COUNT_MISMATCH)
            ck_raise(st->CheckpointError, s->filename,
                     "storage '%U' has %llu elements in the file but %lld in its object", key,
                     (unsigned long long)walk.count, (long long)expect[walk.at]);
        else if (walk.fault == CK_LEGACY_NO_DATA)
            ck_raise(st->CheckpointError, s->filename,
                     "the file ends inside the data of storage '%U' (truncated)", key);
        else
            ck_raise_core(st, s->filename, &err);
        goto out;
    }
    if (stop == NO_OBJECT) {
        ck_raise(st->CheckpointError, s->filename, "storage '%U' has data but no object uses it",
                 PyList_GET_ITEM(keys, (Py_ssize_t)n_ok));
        goto out;
    }
    if (stop == INVALID_SIZE) {
        ck_raise(st->CheckpointError, s->filename, "storage '%U' has an invalid size",
                 PyList_GET_ITEM(keys, (Py_ssize_t)n_ok));
        goto out;
    }
    for (size_t i = 0; i < n_ok; i++) {
        ck_storage *e = &s->storages[i];
        e->src = s->buf + offset[i];
        e->src_size = length[i];
    }
    rc = 0;
out:
    PyMem_Free(elsize);
    PyMem_Free(offset);
    return rc;
}

PyObject *ck_load_legacy(ck_session *s) {
    ck_state *st = s->st;
    size_t pos = 0;
    PyObject *result = NULL, *pids = NULL, *keys = NULL, *roots = NULL, *views = NULL;
    PyObject *v = header_pickle(s, &pos, "magic number pickle");
    if (v == NULL)
        return NULL;
    int rc = expect_int(s, v, "1950a86a20f9469cfc6c",
                        "not a torch checkpoint: invalid magic number (corrupt file?)");
    Py_DECREF(v);
    if (rc < 0 || (v = header_pickle(s, &pos, "protocol version pickle")) == NULL)
        return NULL;
    rc = expect_int(s, v, "3e9", "invalid legacy protocol version (expected 1001)");
    Py_DECREF(v);
    if (rc < 0 || (v = header_pickle(s, &pos, "sys_info pickle")) == NULL)
        return NULL;
    Py_DECREF(v);

    /* the objects' pickle, first walked only for its persistent ids */
    size_t obj_pos = pos, obj_len = 0;
    pids = PyList_New(0);
    /* (torch warns of its protocol once, as it runs it: here, at the walk) */
    if (pids == NULL ||
        ck_warn_protocol(s, ck_unpickle_scan(s, s->buf + obj_pos, s->len - obj_pos, "object pickle",
                                             &obj_len, pids) == 0) <= 0)
        goto out;
    pos = obj_pos + obj_len;
    keys = header_pickle(s, &pos, "storage key list pickle");
    if (keys == NULL)
        goto out;
    if (!PyList_Check(keys)) {
        ck_raise(st->CheckpointError, s->filename, "the storage key list is not a list");
        goto out;
    }
    roots = PyDict_New();
    views = PySet_New(NULL);
    s->legacy_slots = PyDict_New();
    if (roots == NULL || views == NULL || s->legacy_slots == NULL ||
        layout_from_pids(s, pids, roots, views) < 0)
        goto out;
    Py_ssize_t n_slots = 0;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(keys); i++) {
        PyObject *key = PyList_GET_ITEM(keys, i);
        if (!PyUnicode_Check(key)) {
            ck_raise(st->CheckpointError, s->filename, "storage keys must be strings");
            goto out;
        }
        int twice = PyDict_Contains(s->legacy_slots, key);
        if (twice < 0)
            goto out;
        if (twice) {
            ck_raise(st->CheckpointError, s->filename, "storage '%U' is listed twice", key);
            goto out;
        }
        if (add_slot(s->legacy_slots, key, &n_slots) < 0)
            goto out;
    }
    PyObject *it = PyObject_GetIter(views);
    if (it == NULL)
        goto out;
    PyObject *vkey;
    while ((vkey = PyIter_Next(it)) != NULL) {
        rc = add_slot(s->legacy_slots, vkey, &n_slots);
        Py_DECREF(vkey);
        if (rc < 0)
            break;
    }
    Py_DECREF(it);
    if (PyErr_Occurred())
        goto out;
    if (ck_storages_alloc(s, (size_t)n_slots) < 0)
        goto out;

    if (walk_data(s, keys, roots, pos) < 0)
        goto out;
    /* every root an object names must have data */
    Py_ssize_t rpos = 0;
    PyObject *rkey, *rval;
    while (PyDict_Next(roots, &rpos, &rkey, &rval)) {
        int listed = PyDict_Contains(s->legacy_slots, rkey);
        if (listed < 0)
            goto out;
        int is_view = PySet_Contains(views, rkey);
        if (is_view < 0)
            goto out;
        if (!listed && !is_view) {
            ck_raise(st->CheckpointError, s->filename, "storage '%U' has no data in the file",
                     rkey);
            goto out;
        }
    }
    result = ck_unpickle(s, s->buf + obj_pos, obj_len, "object pickle", NULL);
out:
    Py_XDECREF(pids);
    Py_XDECREF(keys);
    Py_XDECREF(roots);
    Py_XDECREF(views);
    return result;
}

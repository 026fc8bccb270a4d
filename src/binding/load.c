#include "load.h"

#include <stdio.h>
#include <string.h>

#include "budget.h"
#include "errors.h"
#include "globals.h"
#include "mapping.h"
#include "session.h"
#include "tensors.h"
#include "unpickler.h"

/* The newest archive version torch's reader accepts
 * (kMaxSupportedFileFormatVersion in caffe2/serialize/versions.h). */
#define CK_MAX_ARCHIVE_VERSION 10

/* Compressed records may inflate to at most this many times the file's size
 * (and at least CK_INFLATE_FLOOR bytes) in all: torch never compresses, and
 * the cap keeps a small hostile file from asking for gigabytes. */
#define CK_INFLATE_RATIO 16
#define CK_INFLATE_FLOOR ((uint64_t)64 << 20)
/* Under weights_only (files not trusted) the floor is small, so that no
 * file makes the loader allocate more than a small multiple of its size. */
#define CK_INFLATE_FLOOR_SAFE ((uint64_t)1 << 20)

const char ck_load_doc[] =
    "load(mapping, filename, *, weights_only=True, encoding='utf-8', errors='strict',\n"
    "     map_kind=0, map_location=None, restore=None, user_globals=None, allow=0,\n"
    "     warn_protocol=False)\n"
    "Decodes the checkpoint held by mapping (see ckptio.load for the public API).\n"
    "warn_protocol: under weights_only, warn as torch >= 2.3's weights_only unpickler\n"
    "does of a pickle whose PROTO opcode names a protocol other than 2.";

static int host_is_little(void) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    return 0;
#else
    return 1;
#endif
}

/* records up to this size are copied by pread rather than read through the
 * mapping (see record_bytes) */
#define CK_PREAD_RECORD_MAX ((uint64_t)64 * 1024)

/* The bytes of a record by relative name: a pointer into the archive for a
 * stored record, or a copy in *owned (free with free()): inflated, or, when
 * the archive is a mapped file, read with pread (so that reading data.pkl
 * and the small records does not fault the mapping, which on a cold page
 * cache reads megabytes of tensors around them). whole: the caller parses
 * the record whole anyway (data.pkl), so a stored one is copied by pread
 * at any size (the copy charged to the budget); otherwise only small ones
 * are, and a large record stays in the mapping, so that a file-sized
 * 'version' or 'byteorder' costs no file-sized copy. Returns 1 when found,
 * 0 when absent, -1 on error. */
static int record_bytes(ck_session *s, const char *rel, int whole, const uint8_t **data,
                        size_t *len, uint8_t **owned, ptrdiff_t *index) {
    ptrdiff_t idx = ck_zip_find(&s->zip, rel, strlen(rel));
    if (index != NULL)
        *index = idx;
    *owned = NULL;
    if (idx < 0)
        return 0;
    const ck_zip_entry *e = &s->zip.entries[idx];
    if (e->method == CK_ZIP_METHOD_STORED && s->fd >= 0 &&
        (e->size <= CK_PREAD_RECORD_MAX || whole)) {
        static const uint8_t empty[1];
        ck_error err;
        ck_error_clear(&err);
        if (e->size > CK_PREAD_RECORD_MAX && ck_charge(s, e->size) < 0) {
            ck_raise_over_budget(s, rel);
            return -1;
        }
        if (ck_zip_read_stored(&s->zip, (size_t)idx, owned, len, &err) != CK_OK) {
            ck_raise_core(s->st, s->filename, &err);
            return -1;
        }
        *data = *owned != NULL ? *owned : empty;
        return 1;
    }
    if (e->method == CK_ZIP_METHOD_STORED) {
        *data = s->buf + e->data_offset;
        *len = (size_t)e->size;
        return 1;
    }
    if (e->size > s->inflate_budget) {
        ck_raise(s->st->CheckpointError, s->filename,
                 "compressed record %s would inflate to %llu bytes, past the limit of %llu", rel,
                 (unsigned long long)e->size, (unsigned long long)s->inflate_budget);
        return -1;
    }
    if (ck_charge(s, e->size) < 0) {
        ck_raise_over_budget(s, rel);
        return -1;
    }
    ck_error err;
    ck_error_clear(&err);
    size_t out_len = 0;
    if (ck_zip_extract(&s->zip, (size_t)idx, e->size, owned, &out_len, &err) != CK_OK) {
        ck_raise_core(s->st, s->filename, &err);
        return -1;
    }
    s->inflate_budget -= out_len;
    *data = *owned;
    *len = out_len;
    return 1;
}

static int check_version(ck_session *s) {
    const uint8_t *data;
    size_t len;
    uint8_t *owned;
    const char *name = ".data/version";
    int found = record_bytes(s, name, 0, &data, &len, &owned, NULL);
    if (found == 0) {
        name = "version";
        found = record_bytes(s, name, 0, &data, &len, &owned, NULL);
    }
    if (found < 0)
        return -1;
    if (found == 0) {
        ck_raise(s->st->CheckpointError, s->filename,
                 "the archive has no version record (not written by torch.save)");
        return -1;
    }
    uint64_t version = 0;
    size_t digits = 0;
    while (digits < len && digits < 20 && data[digits] >= '0' && data[digits] <= '9')
        version = version * 10 + (uint64_t)(data[digits++] - '0');
    free(owned);
    if (digits == 0 || digits == 20) {
        ck_raise(s->st->CheckpointError, s->filename, "record %s holds no version number", name);
        return -1;
    }
    if (version < 1 || version > CK_MAX_ARCHIVE_VERSION) {
        ck_raise(s->st->CheckpointError, s->filename,
                 "archive version %llu is outside the versions torch reads (1 to %d)",
                 (unsigned long long)version, CK_MAX_ARCHIVE_VERSION);
        return -1;
    }
    return 0;
}

static int check_byteorder(ck_session *s) {
    const uint8_t *data;
    size_t len;
    uint8_t *owned;
    int found = record_bytes(s, "byteorder", 0, &data, &len, &owned, NULL);
    if (found < 0)
        return -1;
    int little = 1; /* torch reads files without the record as little-endian */
    if (found) {
        if (len == 6 && memcmp(data, "little", 6) == 0)
            little = 1;
        else if (len == 3 && memcmp(data, "big", 3) == 0)
            little = 0;
        else {
            free(owned);
            ck_raise(s->st->CheckpointError, s->filename,
                     "record byteorder must be 'little' or 'big'");
            return -1;
        }
    }
    free(owned);
    s->byteswap = little != host_is_little();
    return 0;
}

/* torch.load's weights_only unpickler (torch >= 2.3; s->warn_protocol) warns at a PROTO opcode
 * other than 2, as soon as it reads it: the same warning (UserWarning, same
 * text), once per pickle that carried one, also when that pickle then fails
 * (the pending error is kept; an error raised by the warning itself, under
 * an "error" filter, replaces it, as in torch). torch.load(weights_only=False)
 * uses pickle's own unpickler, which does not warn. Returns ok, or -1. */
static int warn_protocol(ck_session *s, int ok) {
    int proto = ck_unpickle_protocol(s);
    if (!s->warn_protocol || proto < 0 || proto == 2)
        return ok;
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    if (PyErr_WarnFormat(PyExc_UserWarning, 1,
                         "Detected pickle protocol %d in the checkpoint, which was not the default "
                         "pickle protocol used by `torch.load` (2). The weights_only Unpickler "
                         "might not support all instructions implemented by this protocol, please "
                         "file an issue for adding support if you encounter this.",
                         proto) < 0) {
        Py_XDECREF(type);
        Py_XDECREF(value);
        Py_XDECREF(tb);
        return -1;
    }
    PyErr_Restore(type, value, tb);
    return ok;
}

static PyObject *load_zip(ck_session *s) {
    ck_state *st = s->st;
    ck_error err;
    ck_error_clear(&err);
    ck_status rc = ck_zip_open_file(&s->zip, s->buf, s->len, s->fd, s->fd_base, &err);
    if (rc != CK_OK)
        return ck_raise_core(st, s->filename, &err);
    s->is_zip = 1;
    if (ck_zip_find(&s->zip, "constants.pkl", 13) >= 0) {
        if (s->weights_only)
            return ck_raise(st->CheckpointError, s->filename,
                            "this is a TorchScript archive (torch.jit.save): load it with "
                            "torch.jit.load; weights_only=True cannot load TorchScript");
        return Py_NewRef(st->torchscript_marker);
    }
    if (check_version(s) < 0 || check_byteorder(s) < 0)
        return NULL;
    const uint8_t *pkl;
    size_t pkl_len;
    uint8_t *owned;
    ptrdiff_t pkl_idx;
    int found = record_bytes(s, "data.pkl", 1, &pkl, &pkl_len, &owned, &pkl_idx);
    if (found < 0)
        return NULL;
    if (found == 0)
        return ck_raise(st->CheckpointError, s->filename,
                        "the archive has no data.pkl record (not written by torch.save)");
    if (s->zip.entries[pkl_idx].method == CK_ZIP_METHOD_STORED &&
        ck_zip_check_crc_of(&s->zip, (size_t)pkl_idx, pkl, 0, &err) != CK_OK) {
        free(owned);
        ck_raise_core(st, s->filename, &err);
        return NULL;
    }
    PyObject *result = NULL;
    if (ck_storages_alloc(s, s->zip.n_entries) == 0)
        result = ck_unpickle(s, pkl, pkl_len, "data.pkl", NULL);
    if (warn_protocol(s, result != NULL) < 0)
        Py_CLEAR(result);
    free(owned);
    return result;
}

/* ---- legacy stream (torch < 1.6, or _use_new_zipfile_serialization=False) ---- */

/* Runs one of the small header pickles and returns its value (new ref). */
static PyObject *header_pickle(ck_session *s, size_t *pos, const char *what) {
    size_t used = 0;
    PyObject *r = ck_unpickle(s, s->buf + *pos, s->len - *pos, what, &used);
    if (warn_protocol(s, r != NULL) < 0)
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

static PyObject *load_legacy(ck_session *s) {
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
        warn_protocol(s, ck_unpickle_scan(s, s->buf + obj_pos, s->len - obj_pos, "object pickle",
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

    /* the data: per listed key, an int64 element count then the bytes */
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(keys); i++) {
        PyObject *key = PyList_GET_ITEM(keys, i);
        PyObject *entry = PyDict_GetItemWithError(roots, key);
        if (entry == NULL) {
            if (!PyErr_Occurred())
                ck_raise(st->CheckpointError, s->filename,
                         "storage '%U' has data but no object uses it", key);
            goto out;
        }
        int code = (int)PyLong_AsLong(PyTuple_GET_ITEM(entry, 0));
        long long numel = PyLong_Check(PyTuple_GET_ITEM(entry, 1))
                              ? PyLong_AsLongLong(PyTuple_GET_ITEM(entry, 1))
                              : -1;
        uint64_t nbytes;
        if (numel < 0 ||
            __builtin_mul_overflow((uint64_t)numel, (uint64_t)st->dtypes[code].elsize, &nbytes)) {
            PyErr_Clear();
            ck_raise(st->CheckpointError, s->filename, "storage '%U' has an invalid size", key);
            goto out;
        }
        if (s->len - pos < 8) {
            ck_raise(st->CheckpointError, s->filename,
                     "the file ends before the data of storage '%U' (truncated)", key);
            goto out;
        }
        uint64_t count = 0;
        for (int b = 7; b >= 0; b--)
            count = count << 8 | s->buf[pos + (size_t)b];
        if (count != (uint64_t)numel) {
            ck_raise(st->CheckpointError, s->filename,
                     "storage '%U' has %llu elements in the file but %lld in its object", key,
                     (unsigned long long)count, numel);
            goto out;
        }
        pos += 8;
        if (nbytes > s->len - pos) {
            ck_raise(st->CheckpointError, s->filename,
                     "the file ends inside the data of storage '%U' (truncated)", key);
            goto out;
        }
        ck_storage *e = &s->storages[i];
        e->src = s->buf + pos;
        e->src_size = nbytes;
        pos += nbytes;
    }
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

PyObject *ck_load_any(ck_session *s) {
    ck_state *st = s->st;
    const uint8_t *b = s->buf;
    size_t n = s->len;
    if (n == 0)
        return ck_raise(st->CheckpointError, s->filename, "the file is empty");
    if (n >= 4 && memcmp(b, "PK\x03\x04", 4) == 0)
        return load_zip(s);
    if (n >= 8 && memcmp(b, "PYTORCH1", 8) == 0)
        return ck_raise(st->CheckpointError, s->filename,
                        "preview-release archive (PYTORCH1): torch cannot load it either");
    if (n >= 262 && memcmp(b + 257, "ustar", 5) == 0)
        return ck_raise(st->CheckpointError, s->filename,
                        "tar format of torch 0.1.x: not supported (re-save it with torch.save)");
    /* a legacy stream starts with its magic number's pickle: PROTO (protocol 2
     * and up) or, written with pickle_protocol 0 or 1, the text LONG opcode */
    if (b[0] == 0x80 || b[0] == 'L') {
        s->byteswap = !host_is_little(); /* legacy data is always little-endian */
        return load_legacy(s);
    }
    char first[8];
    snprintf(first, sizeof first, "0x%02x", b[0]);
    return ck_raise(st->CheckpointError, s->filename,
                    "not a PyTorch checkpoint: unknown format (first byte %s)", first);
}

PyObject *ck_py_load(PyObject *module, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"mapping",      "filename", "weights_only",  "encoding",
                             "errors",       "map_kind", "map_location",  "restore",
                             "user_globals", "allow",    "warn_protocol", NULL};
    ck_state *st = ck_get_state(module);
    PyObject *mapping, *filename, *map_location = Py_None, *restore = Py_None,
                                  *user_globals = Py_None;
    int weights_only = 1, map_kind = CK_MAP_NONE, allow = 0, warn_proto = 0;
    const char *encoding = "utf-8", *errors = "strict";
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OU|$pssiOOOip", kwlist, &mapping, &filename,
                                     &weights_only, &encoding, &errors, &map_kind, &map_location,
                                     &restore, &user_globals, &allow, &warn_proto))
        return NULL;
    if (ck_torch_ready(st) < 0)
        return NULL;
    if (!ck_mapping_check(st, mapping)) {
        PyErr_SetString(PyExc_TypeError, "load: mapping must be a ckptio._native.Mapping");
        return NULL;
    }
    if (map_kind < CK_MAP_NONE || map_kind > CK_MAP_CALL) {
        PyErr_SetString(PyExc_ValueError, "load: invalid map_kind");
        return NULL;
    }
    if ((map_kind == CK_MAP_DICT && !PyDict_Check(map_location)) ||
        (map_kind != CK_MAP_CPU && !PyCallable_Check(restore))) {
        PyErr_SetString(PyExc_TypeError, "load: map_location and restore do not match map_kind");
        return NULL;
    }
    if (user_globals != Py_None && !PyDict_Check(user_globals)) {
        PyErr_SetString(PyExc_TypeError, "load: user_globals must be a dict");
        return NULL;
    }

    ck_session s;
    ck_session_begin(&s, st, filename, mapping);
    s.weights_only = weights_only;
    s.allow = allow;
    s.warn_protocol = weights_only && warn_proto;
    s.map_kind = (ck_map_kind)map_kind;
    s.map_location = map_location;
    s.restore = restore;
    s.user_globals = user_globals == Py_None ? NULL : user_globals;
    uint64_t budget = (uint64_t)s.len * CK_INFLATE_RATIO;
    uint64_t floor = weights_only ? CK_INFLATE_FLOOR_SAFE : CK_INFLATE_FLOOR;
    s.inflate_budget = budget > floor ? budget : floor;
    ck_budget_begin(&s);
    if (strcmp(encoding, "bytes") != 0) {
        s.encoding = PyUnicode_FromString(encoding);
        if (s.encoding == NULL)
            return NULL;
    }
    s.errors = PyUnicode_FromString(errors);

    PyObject *result = NULL;
    if (s.errors != NULL && ck_user_globals_prepare(&s) == 0)
        result = ck_load_any(&s);

    ck_session_end(&s);
    /* the headers have been read: the mapping needs its file no longer */
    ck_region_close_fd(&((ck_mapping *)mapping)->region);
    return result;
}

#include "tensors.h"

#include <string.h>

#include "budget.h"
#include "errors.h"
#include "mapping.h"
#include "npy.h"

/* Tensors ckptio builds have at most this many dimensions (NumPy's limit is
 * higher than any checkpoint needs; torch has no practical limit, so a file
 * with more is refused with a clear message rather than guessed at). */
#define CK_MAX_DIMS 64

typedef struct ck_storage_ref {
    PyObject_HEAD Py_ssize_t slot;
} ck_storage_ref;

static PyObject *storage_ref_repr(ck_storage_ref *self) {
    return PyUnicode_FromFormat("<ckptio storage reference %zd>", self->slot);
}

static void storage_ref_dealloc(ck_storage_ref *self) {
    PyTypeObject *tp = Py_TYPE(self);
    tp->tp_free(self);
    Py_DECREF(tp);
}

static PyType_Slot storage_ref_slots[] = {
    {Py_tp_dealloc, storage_ref_dealloc},
    {Py_tp_repr, storage_ref_repr},
    {Py_tp_doc, "A storage named by a persistent id, before it is needed as an object."},
    {0, NULL},
};

static PyType_Spec storage_ref_spec = {
    .name = "ckptio._native.StorageRef",
    .basicsize = sizeof(ck_storage_ref),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE | Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = storage_ref_slots,
};

/* A tuple whose items include a StorageRef or another RefTuple: the
 * arguments of torch's rebuild functions, built by the pickle machine. It
 * stays inside the machine (stack, memo, other RefTuples); wherever it
 * would reach Python code, a result or another container, its twin (the
 * same tuple with the storages torch would have made) goes instead. */
static PyType_Slot ref_tuple_slots[] = {
    {Py_tp_doc, "Rebuild arguments naming storages, before the storages are needed."},
    {0, NULL},
};

static PyType_Spec ref_tuple_spec = {
    .name = "ckptio._native.RefTuple",
    .basicsize = 0, /* tuple's */
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE | Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = ref_tuple_slots,
};

int ck_tensors_init(PyObject *m, ck_state *st) {
    st->StorageRefType = (PyTypeObject *)PyType_FromModuleAndSpec(m, &storage_ref_spec, NULL);
    if (st->StorageRefType == NULL)
        return -1;
    /* bases as a tuple: Python 3.9 takes no single type there */
    PyObject *bases = PyTuple_Pack(1, (PyObject *)&PyTuple_Type);
    if (bases == NULL)
        return -1;
    st->RefTupleType = (PyTypeObject *)PyType_FromModuleAndSpec(m, &ref_tuple_spec, bases);
    Py_DECREF(bases);
    return st->RefTupleType == NULL ? -1 : 0;
}

int ck_is_storage_ref(ck_state *st, PyObject *obj) {
    return Py_IS_TYPE(obj, st->StorageRefType);
}

int ck_holds_refs(ck_state *st, PyObject *obj) {
    return Py_IS_TYPE(obj, st->StorageRefType) || Py_IS_TYPE(obj, st->RefTupleType);
}

PyObject *ck_tuple_steal(ck_session *s, PyObject **items, Py_ssize_t n) {
    ck_state *st = s->st;
    int held = 0;
    for (Py_ssize_t i = 0; i < n && !held; i++)
        held = ck_holds_refs(st, items[i]);
    PyObject *t = held ? st->RefTupleType->tp_alloc(st->RefTupleType, n) : PyTuple_New(n);
    if (t == NULL) {
        for (Py_ssize_t i = 0; i < n; i++)
            Py_DECREF(items[i]);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++)
        PyTuple_SET_ITEM(t, i, items[i]);
    return t;
}

int ck_storages_alloc(ck_session *s, size_t n) {
    s->storages = PyMem_Calloc(n ? n : 1, sizeof(ck_storage));
    if (s->storages == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (size_t i = 0; i < n; i++) {
        s->storages[i].zip_index = -1;
        s->storages[i].view_of = -1;
    }
    s->n_storages = n;
    return 0;
}

void ck_storages_release(ck_session *s) {
    if (s->storages == NULL)
        return;
    for (size_t i = 0; i < s->n_storages; i++) {
        ck_storage *e = &s->storages[i];
        Py_CLEAR(e->owner);
        Py_CLEAR(e->location);
        Py_CLEAR(e->first);
        Py_CLEAR(e->ustorage);
        Py_CLEAR(e->typed);
        Py_CLEAR(e->ref);
    }
    PyMem_Free(s->storages);
    s->storages = NULL;
    s->n_storages = 0;
}

/* ---- persistent ids ---------------------------------------------------- */

/* str, or bytes decoded as ASCII (Python 2 era files): new reference. */
static PyObject *as_text(PyObject *obj) {
    if (PyUnicode_Check(obj))
        return Py_NewRef(obj);
    if (PyBytes_Check(obj))
        return PyUnicode_DecodeASCII(PyBytes_AS_STRING(obj), PyBytes_GET_SIZE(obj), "strict");
    return NULL;
}

static Py_ssize_t find_storage_record(ck_session *s, PyObject *key) {
    Py_ssize_t klen;
    const char *k = PyUnicode_AsUTF8AndSize(key, &klen);
    if (k == NULL)
        return -2;
    char stackbuf[256];
    char *name = stackbuf;
    size_t need = 5 + (size_t)klen;
    if (need > sizeof stackbuf) {
        name = PyMem_Malloc(need);
        if (name == NULL) {
            PyErr_NoMemory();
            return -2;
        }
    }
    memcpy(name, "data/", 5);
    memcpy(name + 5, k, (size_t)klen);
    ptrdiff_t idx = ck_zip_find(&s->zip, name, need);
    if (name != stackbuf)
        PyMem_Free(name);
    return idx;
}

/* The slot of a storage key: zip archives look the record "data/<key>" up
 * (and fill the slot's source on first use); legacy streams know their keys
 * from the layout pass. -1 with no exception when there is none. */
static Py_ssize_t storage_slot(ck_session *s, PyObject *key) {
    if (s->legacy_slots != NULL) {
        PyObject *slot = PyDict_GetItemWithError(s->legacy_slots, key);
        if (slot == NULL)
            return PyErr_Occurred() ? -2 : -1;
        return PyLong_AsSsize_t(slot);
    }
    Py_ssize_t idx = find_storage_record(s, key);
    if (idx >= 0) {
        ck_storage *e = &s->storages[idx];
        const ck_zip_entry *ze = &s->zip.entries[idx];
        if (e->zip_index < 0) {
            e->zip_index = idx;
            e->src = ze->method == CK_ZIP_METHOD_STORED ? s->buf + ze->data_offset : NULL;
            e->src_size = ze->size;
        }
    }
    return idx;
}

static long long nonneg_int(PyObject *obj) {
    long long v = PyLong_Check(obj) ? PyLong_AsLongLong(obj) : -1;
    if (v < 0)
        PyErr_Clear();
    return v;
}

/* Fills slot e on its first persistent id. */
static int claim(ck_session *s, ck_storage *e, PyObject *key, int dtype, int untyped,
                 uint64_t nbytes, PyObject *location) {
    if (e->used)
        return 0;
    /* torch.save writes each record with exactly its storage's bytes, and
     * torch.load refuses a record of any other size ("record size ... does
     * not match expected size"); so does ckptio, also where torch.load
     * (mmap=True) slices a larger record without looking */
    if (nbytes != e->src_size) {
        ck_raise(s->st->CheckpointError, s->filename,
                 "storage '%U' claims %llu bytes but its record holds %llu%s", key,
                 (unsigned long long)nbytes, (unsigned long long)e->src_size,
                 nbytes > e->src_size ? "" : " (torch.save writes exactly the storage's bytes)");
        return -1;
    }
    e->used = 1;
    e->dtype = dtype;
    e->untyped = untyped;
    e->nbytes = nbytes;
    e->location = Py_NewRef(location);
    return 0;
}

static PyObject *new_ref_for(ck_session *s, ck_storage *e, Py_ssize_t slot) {
    if (e->ref == NULL) {
        ck_storage_ref *ref = PyObject_New(ck_storage_ref, s->st->StorageRefType);
        if (ref == NULL)
            return NULL;
        ref->slot = slot;
        e->ref = (PyObject *)ref;
    }
    return Py_NewRef(e->ref);
}

PyObject *ck_persistent_load(ck_session *s, PyObject *pid) {
    ck_state *st = s->st;
    if (!PyTuple_Check(pid))
        return ck_raise(st->UnpicklingError, s->filename,
                        "persistent id must be a tuple, got %.80s", Py_TYPE(pid)->tp_name);
    Py_ssize_t n = PyTuple_GET_SIZE(pid);
    if (n < 1)
        return ck_raise(st->UnpicklingError, s->filename, "empty persistent id");
    PyObject *typename = as_text(PyTuple_GET_ITEM(pid, 0));
    if (typename == NULL) {
        PyErr_Clear();
        return ck_raise(st->UnpicklingError, s->filename,
                        "persistent id must start with 'storage', got a %.80s",
                        Py_TYPE(PyTuple_GET_ITEM(pid, 0))->tp_name);
    }
    int is_storage = PyUnicode_CompareWithASCIIString(typename, "storage") == 0;
    int is_module = PyUnicode_CompareWithASCIIString(typename, "module") == 0;
    Py_DECREF(typename);
    if (is_module && s->legacy_slots != NULL && !s->weights_only && n >= 2)
        /* a whole nn.Module saved by a pre-1.6 torch: the class itself (torch
         * only compares its source text, to warn) */
        return Py_NewRef(PyTuple_GET_ITEM(pid, 1));
    if (!is_storage)
        return ck_raise(st->UnpicklingError, s->filename,
                        "only persistent ids of storages are allowed, got another kind");
    Py_ssize_t want = s->legacy_slots != NULL ? 6 : 5;
    if (n != want)
        return ck_raise(st->UnpicklingError, s->filename,
                        "a storage persistent id has %zd items in this format, got %zd", want, n);

    PyObject *stype = PyTuple_GET_ITEM(pid, 1);
    PyObject *code_obj = PyDict_GetItemWithError(st->storage_dtype, stype);
    if (code_obj == NULL) {
        if (PyErr_Occurred())
            return NULL;
        return ck_raise(st->UnpicklingError, s->filename,
                        "persistent id names an unknown storage type (%.80s)",
                        Py_TYPE(stype)->tp_name);
    }
    int dtype = (int)PyLong_AsLong(code_obj);
    int untyped = stype == st->UntypedStorage;
    PyObject *result = NULL;
    PyObject *key = as_text(PyTuple_GET_ITEM(pid, 2));
    PyObject *location = key ? as_text(PyTuple_GET_ITEM(pid, 3)) : NULL;
    if (location == NULL) {
        PyErr_Clear();
        Py_XDECREF(key);
        return ck_raise(st->UnpicklingError, s->filename,
                        "storage key and location must be strings");
    }
    long long numel = nonneg_int(PyTuple_GET_ITEM(pid, 4));
    uint64_t elsize = (uint64_t)st->dtypes[dtype].elsize;
    uint64_t nbytes;
    if (numel < 0) {
        ck_raise(st->UnpicklingError, s->filename, "storage '%U' has an invalid element count",
                 key);
        goto out;
    }
    if (__builtin_mul_overflow((uint64_t)numel, elsize, &nbytes)) {
        ck_raise(st->CheckpointError, s->filename,
                 "storage '%U' claims %lld elements: the byte size overflows", key, numel);
        goto out;
    }
    Py_ssize_t slot = storage_slot(s, key);
    if (slot == -2)
        goto out;
    if (slot < 0) {
        if (s->legacy_slots != NULL)
            ck_raise(st->CheckpointError, s->filename, "storage '%U' has no data in the file", key);
        else
            ck_raise(st->CheckpointError, s->filename,
                     "storage '%U' has no record data/%U in the archive", key, key);
        goto out;
    }
    ck_storage *e = &s->storages[slot];
    if (claim(s, e, key, dtype, untyped, nbytes, location) < 0)
        goto out;
    PyObject *view = want == 6 ? PyTuple_GET_ITEM(pid, 5) : Py_None;
    if (view == Py_None) {
        result = new_ref_for(s, e, slot);
        goto out;
    }
    /* legacy view: (view_key, offset, size) in elements of the root */
    if (!PyTuple_Check(view) || PyTuple_GET_SIZE(view) != 3) {
        ck_raise(st->UnpicklingError, s->filename, "storage '%U' has a malformed view", key);
        goto out;
    }
    PyObject *vkey = as_text(PyTuple_GET_ITEM(view, 0));
    long long voff = nonneg_int(PyTuple_GET_ITEM(view, 1));
    long long vsize = nonneg_int(PyTuple_GET_ITEM(view, 2));
    uint64_t off_b, size_b, end_b;
    if (vkey == NULL || voff < 0 || vsize < 0 ||
        __builtin_mul_overflow((uint64_t)voff, elsize, &off_b) ||
        __builtin_mul_overflow((uint64_t)vsize, elsize, &size_b) ||
        __builtin_add_overflow(off_b, size_b, &end_b) || end_b > e->nbytes) {
        PyErr_Clear();
        Py_XDECREF(vkey);
        ck_raise(st->CheckpointError, s->filename, "storage '%U' has a view outside its bytes",
                 key);
        goto out;
    }
    Py_ssize_t vslot = storage_slot(s, vkey);
    Py_DECREF(vkey);
    if (vslot < 0) {
        if (vslot == -1)
            ck_raise(st->CheckpointError, s->filename, "storage '%U' has an unknown view", key);
        goto out;
    }
    ck_storage *ve = &s->storages[vslot];
    if (!ve->used) {
        /* a view of a view is a view of the root, at the sum of the offsets:
         * views never chain (a file of 20,000 views each of the previous one
         * would otherwise be placed by 20,000 nested calls) */
        ve->used = 1;
        ve->dtype = dtype;
        ve->untyped = untyped;
        ve->nbytes = size_b;
        ve->location = Py_NewRef(location);
        ve->view_of = e->view_of >= 0 ? e->view_of : slot;
        ve->view_offset = e->view_of >= 0 ? e->view_offset + off_b : off_b;
    }
    result = new_ref_for(s, ve, vslot);
out:
    Py_DECREF(key);
    Py_DECREF(location);
    return result;
}

/* ---- placing a storage's bytes ----------------------------------------- */

static void byteswap(uint8_t *p, uint64_t nbytes, int unit) {
    for (uint64_t i = 0; i + (uint64_t)unit <= nbytes; i += (uint64_t)unit) {
        for (int a = 0, b = unit - 1; a < b; a++, b--) {
            uint8_t t = p[i + a];
            p[i + a] = p[i + b];
            p[i + b] = t;
        }
    }
}

static int swap_unit(int dtype, int elsize) {
    if (dtype == CK_DT_COMPLEX128 || dtype == CK_DT_COMPLEX64 || dtype == CK_DT_COMPLEX32)
        return elsize / 2;
    return elsize;
}

/* A NumPy array of `type` over ptr, kept alive by owner. New reference. */
static PyObject *array_over(PyObject *owner, uint8_t *ptr, int type, int nd, npy_intp *dims,
                            npy_intp *strides) {
    static uint8_t empty_data[64];
    PyArray_Descr *descr = PyArray_DescrFromType(type);
    if (descr == NULL)
        return NULL;
    PyObject *arr = PyArray_NewFromDescr(&PyArray_Type, descr, nd, dims, strides,
                                         ptr != NULL ? (void *)ptr : (void *)empty_data,
                                         NPY_ARRAY_WRITEABLE, NULL);
    if (arr == NULL)
        return NULL;
    if (PyArray_SetBaseObject((PyArrayObject *)arr, Py_NewRef(owner)) < 0) {
        Py_DECREF(arr);
        return NULL;
    }
    return arr;
}

static int place_storage(ck_session *s, Py_ssize_t slot, ck_storage *e, int tensor_dtype);

/* The bytes of the storage in `slot` (inside the file, or a compressed zip
 * entry inflated into its own buffer; a legacy view lies inside its root),
 * copied once more where they must be byte-swapped or are not aligned for
 * their element type. */
static int place_bytes(ck_session *s, Py_ssize_t slot, ck_storage *e, int tensor_dtype) {
    ck_state *st = s->st;
    uint8_t *ptr;
    PyObject *owner;
    if (e->view_of >= 0) {
        ck_storage *root = &s->storages[e->view_of];
        if (root->view_of >= 0) { /* never: views are flattened as they are met */
            ck_raise(st->CheckpointError, s->filename, "a storage view's root is a view");
            return -1;
        }
        if (root->place == CK_PLACE_UNSET && place_storage(s, e->view_of, root, root->dtype) < 0)
            return -1;
        if (root->ptr == NULL) {
            ck_raise(st->CheckpointError, s->filename, "a storage view's root has no bytes");
            return -1;
        }
        e->ptr = root->ptr + e->view_offset;
        e->owner = Py_NewRef(root->owner);
        return 0;
    }
    if (e->src != NULL) {
        ptr = (uint8_t *)e->src;
        owner = Py_NewRef(s->owner);
    } else if (e->zip_index < 0) {
        ck_raise(st->CheckpointError, s->filename, "a storage has no data in the file");
        return -1;
    } else {
        const ck_zip_entry *ze = &s->zip.entries[e->zip_index];
        if (ze->size > s->inflate_budget) {
            ck_raise(st->CheckpointError, s->filename,
                     "compressed storage record %zd would inflate past the limit of %llu bytes "
                     "(16x the file; at least 1 MiB under weights_only, else 64 MiB) for "
                     "compressed records",
                     e->zip_index, (unsigned long long)s->inflate_budget);
            return -1;
        }
        if (ck_charge(s, ze->size) < 0) {
            ck_raise_over_budget(s, "inflating a compressed storage record");
            return -1;
        }
        uint8_t *out = NULL;
        size_t out_len = 0;
        ck_error err;
        ck_error_clear(&err);
        ck_status rc;
        Py_BEGIN_ALLOW_THREADS
            rc = ck_zip_extract(&s->zip, (size_t)e->zip_index, ze->size, &out, &out_len, &err);
        Py_END_ALLOW_THREADS
        if (rc != CK_OK) {
            ck_raise_core(st, s->filename, &err);
            return -1;
        }
        s->inflate_budget -= out_len;
        ck_region region = {out, out_len, out ? CK_REGION_HEAP : CK_REGION_NONE};
        owner = ck_mapping_new(st, &region);
        if (owner == NULL)
            return -1;
        ptr = out;
    }
    (void)slot;
    int elsize = st->dtypes[e->untyped ? tensor_dtype : e->dtype].elsize;
    int swap = s->byteswap && !e->untyped && elsize > 1;
    uintptr_t align = elsize >= 8 ? 8 : (uintptr_t)elsize;
    if (swap || (!s->unaligned_ok && align > 1 && ((uintptr_t)ptr % align) != 0)) {
        if (ck_charge(s, e->nbytes) < 0) {
            Py_DECREF(owner);
            ck_raise_over_budget(s, "copying a storage to align or byte-swap it");
            return -1;
        }
        ck_region copy = {0};
        ck_error err;
        ck_error_clear(&err);
        if (ck_region_alloc(e->nbytes, &copy, &err) != CK_OK) {
            Py_DECREF(owner);
            ck_raise_core(st, s->filename, &err);
            return -1;
        }
        if (e->nbytes)
            memcpy(copy.data, ptr, e->nbytes);
        if (swap)
            byteswap(copy.data, e->nbytes, swap_unit(e->dtype, elsize));
        Py_DECREF(owner);
        ptr = copy.data;
        owner = ck_mapping_new(st, &copy);
        if (owner == NULL)
            return -1;
    }
    e->ptr = ptr;
    e->owner = owner;
    return 0;
}

/* The storage's UntypedStorage on the CPU, over its bytes (cached). */
/* tensor.untyped_storage(), or tensor.storage()._storage on torch 1.13,
 * whose tensors have no untyped_storage(). */
static PyObject *untyped_of_tensor(PyObject *tensor, ck_state *st) {
    PyObject *u = PyObject_CallMethodNoArgs(tensor, st->s_untyped_storage);
    if (u != NULL || !PyErr_ExceptionMatches(PyExc_AttributeError))
        return u;
    PyErr_Clear();
    PyObject *typed = PyObject_CallMethod(tensor, "storage", NULL);
    if (typed == NULL)
        return NULL;
    u = PyObject_GetAttrString(typed, "_storage");
    Py_DECREF(typed);
    return u;
}

static PyObject *cpu_ustorage(ck_session *s, ck_storage *e) {
    ck_state *st = s->st;
    if (e->ustorage != NULL)
        return e->ustorage;
    PyObject *tensor;
    if (e->first != NULL) {
        tensor = Py_NewRef(e->first);
    } else {
        npy_intp dims[1] = {(npy_intp)e->nbytes};
        PyObject *arr = array_over(e->owner, e->ptr, NPY_UINT8, 1, dims, NULL);
        if (arr == NULL)
            return NULL;
        tensor = PyObject_CallOneArg(st->from_numpy, arr);
        Py_DECREF(arr);
        if (tensor == NULL)
            return NULL;
    }
    e->ustorage = untyped_of_tensor(tensor, st);
    Py_DECREF(tensor);
    return e->ustorage;
}

/* typed._untyped_storage, or typed._storage on torch 1.13. */
static PyObject *untyped_of_typed(PyObject *typed, ck_state *st) {
    PyObject *u = PyObject_GetAttr(typed, st->s_untyped_attr);
    if (u != NULL || !PyErr_ExceptionMatches(PyExc_AttributeError))
        return u;
    PyErr_Clear();
    return PyObject_GetAttrString(typed, "_storage");
}

/* Decides where the storage lives (map_location), calling restore() where
 * torch would, and records the answer in e->place. */
static int place_storage(ck_session *s, Py_ssize_t slot, ck_storage *e, int tensor_dtype) {
    ck_state *st = s->st;
    if (place_bytes(s, slot, e, tensor_dtype) < 0)
        return -1;
    int cpu = 0;
    switch (s->map_kind) {
    case CK_MAP_CPU:
        cpu = 1;
        break;
    case CK_MAP_NONE:
        cpu = PyUnicode_CompareWithASCIIString(e->location, "cpu") == 0;
        break;
    case CK_MAP_DICT: {
        PyObject *mapped = PyDict_GetItemWithError(s->map_location, e->location);
        if (mapped == NULL && PyErr_Occurred())
            return -1;
        PyObject *loc = mapped != NULL ? mapped : e->location;
        cpu = PyUnicode_Check(loc) && PyUnicode_CompareWithASCIIString(loc, "cpu") == 0;
        break;
    }
    case CK_MAP_CALL:
        cpu = 0;
        break;
    }
    if (cpu) {
        e->place = CK_PLACE_CPU;
        return 0;
    }
    PyObject *us = cpu_ustorage(s, e);
    if (us == NULL)
        return -1;
    PyObject *r = PyObject_CallFunctionObjArgs(s->restore, us, e->location, NULL);
    if (r == NULL)
        return -1;
    if (PyObject_TypeCheck(r, (PyTypeObject *)st->TypedStorage)) {
        PyObject *u = untyped_of_typed(r, st);
        Py_DECREF(r);
        if (u == NULL)
            return -1;
        r = u;
    }
    if (r == us) {
        Py_DECREF(r);
        e->place = CK_PLACE_CPU;
        return 0;
    }
    Py_SETREF(e->ustorage, r);
    e->place = CK_PLACE_OTHER;
    return 0;
}

/* ---- tensors ---------------------------------------------------------- */

typedef struct geometry {
    int ndim;
    int64_t size[CK_MAX_DIMS];
    int64_t stride[CK_MAX_DIMS];
    int64_t offset;
    int64_t extent; /* elements the tensor spans from the storage's start (0 if empty) */
} geometry;

static int int64_items(ck_session *s, PyObject *seq_obj, int64_t *out, int *n, const char *what) {
    PyObject *seq = PySequence_Fast(seq_obj, "");
    if (seq == NULL) {
        PyErr_Clear();
        ck_raise(s->st->CheckpointError, s->filename, "tensor %s must be a tuple, got %.80s", what,
                 Py_TYPE(seq_obj)->tp_name);
        return -1;
    }
    Py_ssize_t len = PySequence_Fast_GET_SIZE(seq);
    if (len > CK_MAX_DIMS) {
        Py_DECREF(seq);
        ck_raise(s->st->CheckpointError, s->filename,
                 "tensor has %zd dimensions; at most %d are supported", len, CK_MAX_DIMS);
        return -1;
    }
    PyObject **items = PySequence_Fast_ITEMS(seq);
    for (Py_ssize_t i = 0; i < len; i++) {
        long long v = PyLong_Check(items[i]) ? PyLong_AsLongLong(items[i]) : -1;
        if (v < 0) {
            PyErr_Clear();
            Py_DECREF(seq);
            ck_raise(s->st->CheckpointError, s->filename,
                     "tensor %s must hold non-negative integers (item %zd)", what, i);
            return -1;
        }
        out[i] = v;
    }
    *n = (int)len;
    Py_DECREF(seq);
    return 0;
}

static int parse_geometry(ck_session *s, PyObject *offset, PyObject *size, PyObject *stride,
                          geometry *g) {
    ck_state *st = s->st;
    int nstride = 0;
    if (int64_items(s, size, g->size, &g->ndim, "size") < 0)
        return -1;
    if (int64_items(s, stride, g->stride, &nstride, "stride") < 0)
        return -1;
    if (nstride != g->ndim) {
        ck_raise(st->CheckpointError, s->filename, "tensor has %d sizes but %d strides", g->ndim,
                 nstride);
        return -1;
    }
    long long off = PyLong_Check(offset) ? PyLong_AsLongLong(offset) : -1;
    if (off < 0) {
        PyErr_Clear();
        ck_raise(st->CheckpointError, s->filename,
                 "tensor storage offset must be a non-negative integer");
        return -1;
    }
    g->offset = off;
    int64_t numel = 1;
    for (int i = 0; i < g->ndim; i++) {
        if (__builtin_mul_overflow(numel, g->size[i], &numel))
            goto overflow;
    }
    if (numel == 0) {
        g->extent = 0;
        return 0;
    }
    int64_t last = g->offset;
    for (int i = 0; i < g->ndim; i++) {
        int64_t step;
        if (__builtin_mul_overflow(g->size[i] - 1, g->stride[i], &step) ||
            __builtin_add_overflow(last, step, &last))
            goto overflow;
    }
    if (__builtin_add_overflow(last, 1, &g->extent))
        goto overflow;
    return 0;
overflow:
    ck_raise(st->CheckpointError, s->filename,
             "tensor size, stride and offset overflow 64-bit element counts");
    return -1;
}

/* torch.from_numpy over the storage's bytes with the tensor's own shape and
 * strides, for a tensor that spans its whole storage from offset 0. Returns
 * NULL with no exception when the fast form does not apply. */
static PyObject *tensor_over_bytes(ck_session *s, ck_storage *e, int dtype, const geometry *g) {
    ck_state *st = s->st;
    const ck_dtype_info *di = &st->dtypes[dtype];
    npy_intp dims[CK_MAX_DIMS], strides[CK_MAX_DIMS];
    for (int i = 0; i < g->ndim; i++) {
        dims[i] = (npy_intp)g->size[i];
        if (__builtin_mul_overflow(g->stride[i], (int64_t)di->elsize, &strides[i]))
            return NULL;
    }
    PyObject *arr = array_over(e->owner, e->ptr, di->npy_type, g->ndim, dims, strides);
    if (arr == NULL)
        return NULL;
    PyObject *t = PyObject_CallOneArg(st->from_numpy, arr);
    Py_DECREF(arr);
    if (t == NULL || !di->needs_view)
        return t;
    /* same bytes, torch's dtype; detach so the result is not a view */
    PyObject *v = PyObject_CallMethodOneArg(t, st->s_view, di->dtype);
    Py_DECREF(t);
    if (v == NULL)
        return NULL;
    t = PyObject_CallMethodNoArgs(v, st->s_detach);
    Py_DECREF(v);
    return t;
}

/* An empty tensor of dtype on `device` (torch.empty((0,), dtype, device)). */
static PyObject *empty_on(ck_state *st, const ck_dtype_info *di, PyObject *device) {
    PyObject *args = Py_BuildValue("((i))", 0);
    PyObject *kwargs = Py_BuildValue("{sOsO}", "dtype", di->dtype, "device", device);
    PyObject *t = NULL;
    if (args != NULL && kwargs != NULL)
        t = PyObject_Call(st->torch_empty, args, kwargs);
    Py_XDECREF(args);
    Py_XDECREF(kwargs);
    return t;
}

static PyObject *build_tensor(ck_session *s, Py_ssize_t slot, int dtype, PyObject *offset,
                              PyObject *size, PyObject *stride) {
    ck_state *st = s->st;
    ck_storage *e = &s->storages[slot];
    const ck_dtype_info *di = &st->dtypes[dtype];
    if (di->dtype == NULL || di->elsize <= 0)
        return ck_raise(st->CheckpointError, s->filename,
                        "storage dtype is not available in this torch");
    if (di->cpu_template == NULL)
        /* quantized dtypes: torch's _rebuild_tensor fails on them too (an
         * internal assert); a quantized tensor is saved with
         * _rebuild_qtensor, which ckptio hands to torch */
        return ck_raise(st->CheckpointError, s->filename,
                        "a plain tensor rebuild names the quantized dtype %R: torch cannot "
                        "rebuild it either (quantized tensors are saved with _rebuild_qtensor)",
                        di->dtype);
    geometry g;
    if (parse_geometry(s, offset, size, stride, &g) < 0)
        return NULL;
    uint64_t snumel = e->nbytes / (uint64_t)di->elsize;
    if ((uint64_t)g.extent > snumel)
        return ck_raise(st->CheckpointError, s->filename,
                        "tensor (offset %lld, %d dims) needs %lld elements of its storage, "
                        "which holds %llu",
                        (long long)g.offset, g.ndim, (long long)g.extent,
                        (unsigned long long)snumel);
    if (e->place == CK_PLACE_UNSET && place_storage(s, slot, e, dtype) < 0)
        return NULL;

    if (e->place == CK_PLACE_CPU) {
        if (e->first == NULL && e->ustorage == NULL && di->npy_type >= 0 && g.offset == 0 &&
            (uint64_t)g.extent == snumel && snumel * (uint64_t)di->elsize == e->nbytes) {
            PyObject *t = tensor_over_bytes(s, e, dtype, &g);
            if (t != NULL) {
                e->first = Py_NewRef(t);
                return t;
            }
            if (PyErr_Occurred())
                return NULL;
        }
        PyObject *us = cpu_ustorage(s, e);
        if (us == NULL)
            return NULL;
        PyObject *t = PyObject_CallMethodNoArgs(di->cpu_template, st->s_new);
        if (t == NULL)
            return NULL;
        PyObject *args[5] = {t, us, offset, size, stride};
        PyObject *r = PyObject_VectorcallMethod(st->s_set_, args, 5, NULL);
        Py_DECREF(t);
        return r;
    }
    PyObject *device = PyObject_GetAttr(e->ustorage, st->s_device);
    if (device == NULL)
        return NULL;
    PyObject *t = empty_on(st, di, device);
    Py_DECREF(device);
    if (t == NULL)
        return NULL;
    PyObject *args[5] = {t, e->ustorage, offset, size, stride};
    PyObject *r = PyObject_VectorcallMethod(st->s_set_, args, 5, NULL);
    Py_DECREF(t);
    return r;
}

/* requires_grad, tensor metadata (conj/neg bits) and backward hooks, as
 * torch's _rebuild_tensor_v2/v3 apply them. Steals t; returns it or NULL.
 * hooks and metadata are the pickle's objects: what reaches torch is their
 * clean form (ck_clean). */
static PyObject *finish_tensor(ck_session *s, PyObject *t, PyObject *requires_grad, PyObject *hooks,
                               PyObject *metadata) {
    ck_state *st = s->st;
    PyObject *clean = NULL;
    if (requires_grad == Py_True) {
        PyObject *r = PyObject_CallMethodOneArg(t, st->s_requires_grad_, Py_True);
        if (r == NULL)
            goto fail;
        Py_DECREF(r);
    }
    if (metadata != NULL && metadata != Py_None) {
        int has = PyObject_IsTrue(metadata);
        if (has < 0)
            goto fail;
        if (has) {
            if ((clean = ck_clean(s, metadata)) == NULL)
                goto fail;
            PyObject *r = PyObject_CallFunctionObjArgs(st->set_tensor_metadata, t, clean, NULL);
            Py_CLEAR(clean);
            if (r == NULL)
                goto fail;
            Py_DECREF(r);
        }
    }
    /* torch attaches the (always empty) backward-hook dict it unpickled; an
     * empty one changes nothing, so only a non-empty one is attached. */
    if (hooks != NULL && hooks != Py_None) {
        int has = PyObject_IsTrue(hooks);
        if (has < 0)
            goto fail;
        if (has) {
            if ((clean = ck_clean(s, hooks)) == NULL)
                goto fail;
            int rc = PyObject_SetAttrString(t, "_backward_hooks", clean);
            Py_CLEAR(clean);
            if (rc < 0)
                goto fail;
        }
    }
    return t;
fail:
    Py_DECREF(t);
    return NULL;
}

/* torch sets tensor.requires_grad = requires_grad, which refuses anything
 * but a bool ("requires_grad must be a bool"); so does ckptio. */
static int check_requires_grad(ck_session *s, PyObject *requires_grad, const char *func) {
    if (PyBool_Check(requires_grad))
        return 0;
    ck_raise(s->st->CheckpointError, s->filename,
             "%s: requires_grad must be a bool, got %.80s (torch refuses it too)", func,
             Py_TYPE(requires_grad)->tp_name);
    return -1;
}

static Py_ssize_t ref_slot(ck_session *s, PyObject *obj) {
    return ck_is_storage_ref(s->st, obj) ? ((ck_storage_ref *)obj)->slot : -1;
}

/* _rebuild_tensor(storage, offset, size, stride),
 * _rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, metadata]),
 * _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype[, metadata]) */
static PyObject *rebuild_tensor(ck_session *s, int version, PyObject *args) {
    ck_state *st = s->st;
    Py_ssize_t slot = ref_slot(s, PyTuple_GET_ITEM(args, 0));
    ck_storage *e = &s->storages[slot];
    int dtype = e->dtype;
    PyObject *metadata = NULL;
    if (version == 3) {
        PyObject *code = PyDict_GetItemWithError(st->dtype_code, PyTuple_GET_ITEM(args, 6));
        if (code == NULL) {
            if (PyErr_Occurred())
                return NULL;
            return ck_raise(st->CheckpointError, s->filename,
                            "_rebuild_tensor_v3 names an unknown dtype (%.80s)",
                            Py_TYPE(PyTuple_GET_ITEM(args, 6))->tp_name);
        }
        dtype = (int)PyLong_AsLong(code);
        if (PyTuple_GET_SIZE(args) > 7)
            metadata = PyTuple_GET_ITEM(args, 7);
    } else if (version == 2 && PyTuple_GET_SIZE(args) > 6) {
        metadata = PyTuple_GET_ITEM(args, 6);
    }
    if (version > 1 &&
        check_requires_grad(s, PyTuple_GET_ITEM(args, 4),
                            version == 2 ? "_rebuild_tensor_v2" : "_rebuild_tensor_v3") < 0)
        return NULL;
    PyObject *t = build_tensor(s, slot, dtype, PyTuple_GET_ITEM(args, 1), PyTuple_GET_ITEM(args, 2),
                               PyTuple_GET_ITEM(args, 3));
    if (t == NULL)
        return NULL;
    if (version == 1)
        return t;
    return finish_tensor(s, t, PyTuple_GET_ITEM(args, 4), PyTuple_GET_ITEM(args, 5), metadata);
}

/* _rebuild_parameter(data, requires_grad, hooks) and
 * _rebuild_parameter_with_state(data, requires_grad, hooks, state), for
 * data that is a plain tensor (Parameter.__new__'s own fast path). */
static PyObject *rebuild_parameter(ck_session *s, PyObject *args, int with_state) {
    ck_state *st = s->st;
    PyObject *data = PyTuple_GET_ITEM(args, 0);
    PyObject *requires_grad = PyTuple_GET_ITEM(args, 1);
    if (check_requires_grad(s, requires_grad,
                            with_state ? "_rebuild_parameter_with_state" : "_rebuild_parameter") <
        0)
        return NULL;
    PyObject *param =
        PyObject_CallFunctionObjArgs(st->make_subclass, st->Parameter, data, requires_grad, NULL);
    if (param == NULL)
        return NULL;
    PyObject *hooks = PyTuple_GET_ITEM(args, 2);
    if (hooks != Py_None) {
        int has = PyObject_IsTrue(hooks);
        PyObject *clean = has > 0 ? ck_clean(s, hooks) : NULL;
        int rc =
            has < 0 ||
            (has && (clean == NULL || PyObject_SetAttrString(param, "_backward_hooks", clean) < 0));
        Py_XDECREF(clean);
        if (rc) {
            Py_DECREF(param);
            return NULL;
        }
    }
    if (!with_state)
        return param;
    PyObject *state = ck_clean(s, PyTuple_GET_ITEM(args, 3));
    PyObject *r =
        state != NULL ? PyObject_CallFunctionObjArgs(st->set_obj_state, param, state, NULL) : NULL;
    Py_XDECREF(state);
    Py_DECREF(param);
    return r;
}

/* The tail of torch._tensor._rebuild_from_type_v2 once ret is built. */
static PyObject *apply_type_and_state(ck_session *s, PyObject *ret, PyObject *new_type,
                                      PyObject *state) {
    ck_state *st = s->st;
    if ((PyObject *)Py_TYPE(ret) != new_type) {
        PyObject *sub = PyObject_CallMethodOneArg(ret, st->s_as_subclass, new_type);
        Py_DECREF(ret);
        if (sub == NULL)
            return NULL;
        ret = sub;
    }
    PyObject *setstate = PyObject_GetAttr((PyObject *)Py_TYPE(ret), st->s_setstate);
    if (setstate == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_AttributeError)) {
            Py_DECREF(ret);
            return NULL;
        }
        PyErr_Clear();
    }
    PyObject *r = NULL;
    PyObject *clean = ck_clean(s, state);
    if (clean == NULL) {
        /* nothing to call */
    } else if (setstate != NULL && setstate != st->tensor_setstate) {
        PyObject *done = PyObject_CallMethodOneArg(ret, st->s_setstate, clean);
        if (done != NULL) {
            Py_DECREF(done);
            r = Py_NewRef(ret);
        }
    } else {
        r = PyObject_CallFunctionObjArgs(st->set_obj_state, ret, clean, NULL);
    }
    Py_XDECREF(clean);
    Py_XDECREF(setstate);
    Py_DECREF(ret);
    return r;
}

static int is_plain_tensor(ck_state *st, PyObject *obj) {
    return (PyObject *)Py_TYPE(obj) == st->Tensor || (PyObject *)Py_TYPE(obj) == st->Parameter;
}

PyObject *ck_native_call(ck_session *s, PyObject *func, PyObject *args, int *handled) {
    ck_state *st = s->st;
    *handled = 0;
    if (!PyTuple_CheckExact(args) && !Py_IS_TYPE(args, st->RefTupleType))
        return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(args);
    PyObject *first = n > 0 ? PyTuple_GET_ITEM(args, 0) : NULL;
    if (func == st->rebuild_tensor_v2) {
        if ((n == 6 || n == 7) && ref_slot(s, first) >= 0) {
            *handled = 1;
            return rebuild_tensor(s, 2, args);
        }
    } else if (func == st->rebuild_tensor_v3) {
        if ((n == 7 || n == 8) && ref_slot(s, first) >= 0) {
            *handled = 1;
            return rebuild_tensor(s, 3, args);
        }
    } else if (func == st->rebuild_tensor) {
        if (n == 4 && ref_slot(s, first) >= 0) {
            *handled = 1;
            return rebuild_tensor(s, 1, args);
        }
    } else if (func == st->rebuild_parameter) {
        if (n == 3 && is_plain_tensor(st, first)) {
            *handled = 1;
            return rebuild_parameter(s, args, 0);
        }
    } else if (func == st->rebuild_parameter_with_state) {
        if (n == 4 && is_plain_tensor(st, first)) {
            *handled = 1;
            return rebuild_parameter(s, args, 1);
        }
    } else if (func == st->rebuild_from_type_v2) {
        if (n == 4 && PyType_Check(PyTuple_GET_ITEM(args, 1))) {
            int inner_handled = 0;
            PyObject *ret = ck_native_call(s, first, PyTuple_GET_ITEM(args, 2), &inner_handled);
            if (!inner_handled)
                return NULL;
            *handled = 1;
            if (ret == NULL)
                return NULL;
            return apply_type_and_state(s, ret, PyTuple_GET_ITEM(args, 1),
                                        PyTuple_GET_ITEM(args, 3));
        }
    }
    return NULL;
}

/* ---- storages handed to Python code ----------------------------------- */

PyObject *ck_storage_materialize(ck_session *s, PyObject *ref) {
    ck_state *st = s->st;
    Py_ssize_t slot = ((ck_storage_ref *)ref)->slot;
    ck_storage *e = &s->storages[slot];
    if (e->typed != NULL)
        return Py_NewRef(e->typed);
    if (ck_charge(s, 1024) < 0) /* a TypedStorage, its UntypedStorage and tensor */
        return ck_raise_over_budget(s, "making a storage object");
    if (e->place == CK_PLACE_UNSET && place_storage(s, slot, e, e->dtype) < 0)
        return NULL;
    PyObject *us = e->place == CK_PLACE_CPU ? cpu_ustorage(s, e) : e->ustorage;
    if (us == NULL)
        return NULL;
    PyObject *args = PyTuple_New(0);
    PyObject *kwargs = Py_BuildValue("{sOsOsO}", "wrap_storage", us, "dtype",
                                     st->dtypes[e->dtype].dtype, "_internal", Py_True);
    PyObject *typed = NULL;
    if (args != NULL && kwargs != NULL)
        typed = PyObject_Call(st->TypedStorage, args, kwargs);
    if (typed == NULL && kwargs != NULL && PyErr_ExceptionMatches(PyExc_TypeError)) {
        /* torch 1.13's TypedStorage takes no _internal (nor warns without it) */
        PyErr_Clear();
        if (PyDict_DelItemString(kwargs, "_internal") == 0)
            typed = PyObject_Call(st->TypedStorage, args, kwargs);
    }
    Py_XDECREF(args);
    Py_XDECREF(kwargs);
    if (typed == NULL)
        return NULL;
    e->typed = typed;
    return Py_NewRef(typed);
}

/* The twin of a RefTuple: the same items, each storage reference replaced
 * by its TypedStorage and each inner RefTuple by its own twin. Twins are
 * kept per RefTuple (s->twins: id -> (reftuple, twin), both strong, so no
 * id is reused), so each RefTuple is copied once however often it is
 * reached, and a memoized one gives the same tuple every time, as torch's
 * would be. RefTuples nest at most as deep as the machine's depth limit. */
static PyObject *twin_of(ck_session *s, PyObject *rt, int depth) {
    if (depth > CK_MAX_DEPTH)
        return ck_raise(s->st->CheckpointError, s->filename,
                        "storages are nested more than %d tuples deep", CK_MAX_DEPTH);
    if (s->twins == NULL && (s->twins = PyDict_New()) == NULL)
        return NULL;
    PyObject *key = PyLong_FromVoidPtr(rt);
    if (key == NULL)
        return NULL;
    PyObject *pair = PyDict_GetItemWithError(s->twins, key); /* borrowed */
    if (pair != NULL || PyErr_Occurred()) {
        Py_DECREF(key);
        return pair != NULL ? Py_NewRef(PyTuple_GET_ITEM(pair, 1)) : NULL;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(rt);
    if (ck_charge(s, ck_object_cost(s->st, rt) + 200) < 0) { /* the copy and its cache entry */
        Py_DECREF(key);
        return ck_raise_over_budget(s, "copying rebuild arguments");
    }
    PyObject *twin = PyTuple_New(n);
    for (Py_ssize_t i = 0; twin != NULL && i < n; i++) {
        PyObject *item = PyTuple_GET_ITEM(rt, i);
        PyObject *c = Py_IS_TYPE(item, s->st->RefTupleType) ? twin_of(s, item, depth + 1)
                      : ck_is_storage_ref(s->st, item)      ? ck_storage_materialize(s, item)
                                                            : Py_NewRef(item);
        if (c == NULL)
            Py_CLEAR(twin);
        else
            PyTuple_SET_ITEM(twin, i, c);
    }
    pair = twin != NULL ? PyTuple_Pack(2, rt, twin) : NULL;
    if (pair == NULL || PyDict_SetItem(s->twins, key, pair) < 0)
        Py_CLEAR(twin);
    Py_XDECREF(pair);
    Py_DECREF(key);
    return twin;
}

PyObject *ck_clean(ck_session *s, PyObject *obj) {
    PyObject *r;
    if (ck_is_storage_ref(s->st, obj))
        r = ck_storage_materialize(s, obj);
    else if (Py_IS_TYPE(obj, s->st->RefTupleType))
        r = twin_of(s, obj, 1);
    else
        return Py_NewRef(obj);
    /* placing a storage calls torch's restore_location (e.g. for a location
     * tag no device has): under weights_only, as for every call the pickle
     * causes, that failure becomes a CheckpointError with the original as
     * its cause */
    if (r == NULL && s->weights_only && !PyErr_ExceptionMatches(s->st->CheckpointError))
        return ck_wrap_pending(s->st, s->st->CheckpointError, s->filename,
                               "while placing the checkpoint's storages");
    return r;
}

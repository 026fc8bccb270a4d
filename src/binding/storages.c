#include "storages.h"

#include <string.h>

#include "budget.h"
#include "errors.h"
#include "heaptype.h"
#include "mapping.h"
#include "npy.h"

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

static PyType_Spec storage_ref_spec =
    CK_TYPE_SPEC("StorageRef", sizeof(ck_storage_ref), Py_TPFLAGS_IMMUTABLETYPE, storage_ref_slots);

/* A tuple whose items include a StorageRef or another RefTuple: the
 * arguments of torch's rebuild functions, built by the pickle machine. It
 * stays inside the machine (stack, memo, other RefTuples); wherever it
 * would reach Python code, a result or another container, its twin (the
 * same tuple with the storages torch would have made) goes instead. */
static PyType_Slot ref_tuple_slots[] = {
    {Py_tp_doc, "Rebuild arguments naming storages, before the storages are needed."},
    {0, NULL},
};

static PyType_Spec ref_tuple_spec =
    CK_TYPE_SPEC("RefTuple", 0 /* tuple's */, Py_TPFLAGS_IMMUTABLETYPE, ref_tuple_slots);

int ck_tensors_init(PyObject *m, ck_state *st) {
    if (ck_new_type(m, &storage_ref_spec, NULL, &st->StorageRefType) < 0)
        return -1;
    /* bases as a tuple: Python 3.9 takes no single type there */
    PyObject *bases = PyTuple_Pack(1, (PyObject *)&PyTuple_Type);
    if (bases == NULL)
        return -1;
    int rc = ck_new_type(m, &ref_tuple_spec, bases, &st->RefTupleType);
    Py_DECREF(bases);
    return rc;
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
PyObject *ck_array_over(PyObject *owner, uint8_t *ptr, int type, int nd, npy_intp *dims,
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
        if (root->place == CK_PLACE_UNSET && ck_storage_place(s, e->view_of, root, root->dtype) < 0)
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

PyObject *ck_storage_cpu_untyped(ck_session *s, ck_storage *e) {
    ck_state *st = s->st;
    if (e->ustorage != NULL)
        return e->ustorage;
    PyObject *tensor;
    if (e->first != NULL) {
        tensor = Py_NewRef(e->first);
    } else {
        npy_intp dims[1] = {(npy_intp)e->nbytes};
        PyObject *arr = ck_array_over(e->owner, e->ptr, NPY_UINT8, 1, dims, NULL);
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
    return PyObject_GetAttr(typed, st->s_storage_priv);
}

/* Decides where the storage lives (map_location), calling restore() where
 * torch would, and records the answer in e->place. */
int ck_storage_place(ck_session *s, Py_ssize_t slot, ck_storage *e, int tensor_dtype) {
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
    PyObject *us = ck_storage_cpu_untyped(s, e);
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

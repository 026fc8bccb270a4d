#include "save_hooks.h"

#include "heaptype.h"

/* The module state of a SaveState's module, or NULL with RuntimeError
 * when the state's save has ended. */
static ck_state *live_state(ck_save_state *self) {
    if (self->ids == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "ckptio save state used after its save ended");
        return NULL;
    }
    return PyType_GetModuleState(Py_TYPE(self));
}

/* obj.name(), or obj.old() where this torch has only that (torch 1.13's
 * TypedStorage: pickle_storage_type and size for _pickle_storage_type and
 * _size). */
static PyObject *call_method0_or(PyObject *obj, PyObject *name, PyObject *old) {
    PyObject *r = PyObject_CallMethodNoArgs(obj, name);
    if (r == NULL && PyErr_ExceptionMatches(PyExc_AttributeError)) {
        PyErr_Clear();
        r = PyObject_CallMethodNoArgs(obj, old);
    }
    return r;
}

/* The type name of storage.device ("cpu", "cuda", "meta"...), new reference. */
PyObject *ck_device_type(ck_state *st, PyObject *storage) {
    PyObject *dev = PyObject_GetAttr(storage, st->s_device);
    if (dev == NULL)
        return NULL;
    PyObject *t = PyObject_GetAttr(dev, st->s_type);
    Py_DECREF(dev);
    return t;
}

/* torch.serialization._save's persistent_id: a storage becomes
 * ('storage', storage_type, key, location, numel); anything else None. */
static PyObject *persistent_id(ck_save_state *self, PyObject *obj) {
    ck_state *st = live_state(self);
    if (st == NULL)
        return NULL;
    PyObject *storage = NULL, *dtype = NULL, *storage_type = NULL, *numel = NULL;
    PyObject *dev = NULL, *key = NULL, *location = NULL, *result = NULL;
    if (PyTuple_CheckExact(obj) && PyTuple_GET_SIZE(obj) == 3 &&
        PyTuple_GET_ITEM(obj, 0) == (PyObject *)self) {
        /* a token from reduce_tensor: (marker, untyped storage, dtype), what
         * torch's TypedStorage wrapper would say about it */
        storage = Py_NewRef(PyTuple_GET_ITEM(obj, 1));
        dtype = Py_NewRef(PyTuple_GET_ITEM(obj, 2));
        PyObject *row =
            PyDict_GetItemWithError(st->save_legacy, dtype); /* borrowed: (type, size) */
        if (row == NULL) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_RuntimeError, "save: storage token of an unknown dtype");
            goto done;
        }
        storage_type = Py_NewRef(PyTuple_GET_ITEM(row, 0));
        PyObject *nbytes = PyObject_CallMethodNoArgs(storage, st->s_nbytes);
        numel = nbytes ? PyNumber_FloorDivide(nbytes, PyTuple_GET_ITEM(row, 1)) : NULL;
        Py_XDECREF(nbytes);
    } else if (PyObject_TypeCheck(obj, (PyTypeObject *)st->TypedStorage)) {
        storage = PyObject_GetAttr(obj, st->s_untyped_attr);
        if (storage == NULL && PyErr_ExceptionMatches(PyExc_AttributeError)) {
            PyErr_Clear(); /* torch 1.13 calls it _storage */
            storage = PyObject_GetAttr(obj, st->s_storage_priv);
        }
        dtype = storage ? PyObject_GetAttr(obj, st->s_dtype) : NULL;
        PyObject *name =
            dtype ? call_method0_or(obj, st->s_pickle_storage_type, st->s_pickle_storage_type_old)
                  : NULL;
        storage_type = name ? PyObject_GetAttr(st->torch_module, name) : NULL;
        Py_XDECREF(name);
        numel = storage_type ? call_method0_or(obj, st->s_size_priv, st->s_size) : NULL;
    } else if ((PyObject *)Py_TYPE(obj) == st->UntypedStorage) {
        storage = Py_NewRef(obj);
        dtype = Py_NewRef(st->dtypes[CK_DT_UINT8].dtype);
        storage_type = PyObject_CallOneArg(st->normalize_storage_type, (PyObject *)Py_TYPE(obj));
        numel = storage_type ? PyObject_CallMethodNoArgs(obj, st->s_nbytes) : NULL;
    } else {
        Py_RETURN_NONE;
    }
    if (numel == NULL)
        goto done;

    dev = ck_device_type(st, storage);
    if (dev == NULL)
        goto done;
    int is_meta = PyUnicode_Compare(dev, st->s_meta) == 0;
    if (!is_meta) {
        PyObject *ptr = PyObject_CallMethodNoArgs(storage, st->s_data_ptr);
        if (ptr == NULL)
            goto done;
        int nonzero = PyObject_IsTrue(ptr);
        if (nonzero > 0) {
            PyObject *seen = PyDict_GetItemWithError(self->dtypes, ptr); /* borrowed */
            if (seen == NULL && !PyErr_Occurred()) {
                nonzero = PyDict_SetItem(self->dtypes, ptr, dtype) < 0 ? -1 : 1;
            } else if (seen != NULL) {
                int same = PyObject_RichCompareBool(seen, dtype, Py_EQ);
                if (same == 0)
                    PyErr_SetString(PyExc_RuntimeError,
                                    "Cannot save multiple tensors or storages that view the same "
                                    "data as different types");
                nonzero = same > 0 ? 1 : -1;
            } else {
                nonzero = -1;
            }
        }
        Py_DECREF(ptr);
        if (nonzero < 0)
            goto done;
    }

    PyObject *cdata = PyObject_GetAttr(storage, st->s_cdata);
    if (cdata == NULL)
        goto done;
    key = PyDict_GetItemWithError(self->ids, cdata); /* borrowed, made strong below */
    if (key != NULL) {
        Py_INCREF(key);
    } else if (!PyErr_Occurred()) {
        /* str(int), as torch makes it: PyUnicode_FromFormat would hand out
         * CPython's shared one-character strings, which the pickle memo
         * would then merge with equal strings elsewhere in the object. */
        PyObject *num = PyLong_FromSsize_t(PyDict_GET_SIZE(self->ids));
        key = num ? PyObject_Str(num) : NULL;
        Py_XDECREF(num);
        if (key != NULL && (PyDict_SetItem(self->ids, cdata, key) < 0 ||
                            PyList_Append(self->storages, storage) < 0))
            Py_CLEAR(key);
    }
    Py_DECREF(cdata);
    if (key == NULL)
        goto done;

    PyObject *fake = NULL;
    if (ck_lookup_attr(obj, st->s_fake_device, &fake) < 0)
        goto done;
    if (fake != NULL && fake != Py_None) {
        location = PyObject_Str(fake);
    } else if (PyUnicode_Compare(dev, st->s_cpu) == 0) {
        location = Py_NewRef(st->s_cpu);
    } else {
        location = PyObject_CallOneArg(st->location_tag, storage);
    }
    Py_XDECREF(fake);
    if (location == NULL)
        goto done;
    result = PyTuple_Pack(5, st->s_storage, storage_type, key, location, numel);
done:
    Py_XDECREF(storage);
    Py_XDECREF(dtype);
    Py_XDECREF(storage_type);
    Py_XDECREF(numel);
    Py_XDECREF(dev);
    Py_XDECREF(key);
    Py_XDECREF(location);
    return result;
}

/* torch.Tensor.__reduce_ex__ for the common case, in C: a plain CPU or
 * CUDA tensor (exact type, no Python attributes, no hooks, strided, not
 * quantized or nested, no conj/neg bit) reduces to
 * (_rebuild_tensor_v2, (storage, offset, size, stride, requires_grad,
 * OrderedDict())) as torch builds it, except that the TypedStorage torch
 * would create is replaced by a token persistent_id maps to the same
 * persistent id. Everything else returns NotImplemented: torch's own
 * __reduce_ex__ then runs. */
static PyObject *reduce_tensor(ck_save_state *self, PyObject *obj) {
    ck_state *st = live_state(self);
    if (st == NULL)
        return NULL;
    if (!self->fast || (PyObject *)Py_TYPE(obj) != st->Tensor)
        Py_RETURN_NOTIMPLEMENTED;
    PyObject *result = NULL, *dict = NULL, *hooks = NULL, *layout = NULL, *dev = NULL;
    PyObject *flag = NULL, *meta = NULL, *dtype = NULL, *untyped = NULL, *token = NULL;
    PyObject *offset = NULL, *size = NULL, *shape = NULL, *stride = NULL, *grad = NULL;
    PyObject *od = NULL, *args = NULL;
    int v3 = 0, plain = 0;

    dict = PyObject_GenericGetDict(obj, NULL);
    if (dict == NULL || PyDict_GET_SIZE(dict) != 0)
        goto fallback;
    /* None, or the empty OrderedDict torch.load leaves on every tensor it
     * rebuilds; hooks to warn about go through torch's path */
    hooks = PyObject_GetAttr(obj, st->s_backward_hooks);
    if (hooks == NULL ||
        (hooks != Py_None && !(PyDict_Check(hooks) && PyDict_GET_SIZE(hooks) == 0)))
        goto fallback;
    layout = PyObject_GetAttr(obj, st->s_layout);
    if (layout == NULL || layout != st->strided)
        goto fallback;
    dev = PyObject_GetAttr(obj, st->s_device);
    PyObject *dev_type = dev ? PyObject_GetAttr(dev, st->s_type) : NULL;
    plain = dev_type != NULL && (PyUnicode_Compare(dev_type, st->s_cpu) == 0 ||
                                 PyUnicode_Compare(dev_type, st->s_cuda) == 0);
    Py_XDECREF(dev_type);
    if (!plain)
        goto fallback;
    flag = PyObject_GetAttr(obj, st->s_is_quantized);
    if (flag == NULL || flag != Py_False)
        goto fallback;
    Py_CLEAR(flag);
    flag = PyObject_GetAttr(obj, st->s_is_nested);
    if (flag == NULL || flag != Py_False)
        goto fallback;
    meta = PyObject_CallOneArg(st->get_tensor_metadata, obj);
    if (meta == NULL || !PyDict_Check(meta) || PyDict_GET_SIZE(meta) != 0)
        goto fallback;
    dtype = PyObject_GetAttr(obj, st->s_dtype);
    if (dtype == NULL)
        goto fallback;
    if (PyDict_GetItemWithError(st->save_legacy, dtype) == NULL) {
        if (PyErr_Occurred())
            goto fallback;
        v3 = PySet_Contains(st->save_new_dtypes, dtype);
        if (v3 <= 0)
            goto fallback;
    }
    untyped = PyObject_CallMethodNoArgs(obj, st->s_untyped_storage);
    if (untyped == NULL)
        goto fallback;
    token = v3 ? Py_NewRef(untyped) : PyTuple_Pack(3, (PyObject *)self, untyped, dtype);
    offset = token ? PyObject_CallMethodNoArgs(obj, st->s_storage_offset) : NULL;
    size = offset ? PyObject_CallMethodNoArgs(obj, st->s_size) : NULL;
    shape = size ? PySequence_Tuple(size) : NULL;
    stride = shape ? PyObject_CallMethodNoArgs(obj, st->s_stride) : NULL;
    grad = stride ? PyObject_GetAttr(obj, st->s_requires_grad) : NULL;
    od = grad ? PyObject_CallNoArgs(st->OrderedDict) : NULL;
    if (od == NULL)
        goto done;
    args = v3 ? PyTuple_Pack(7, token, offset, shape, stride, grad, od, dtype)
              : PyTuple_Pack(6, token, offset, shape, stride, grad, od);
    if (args != NULL)
        result = PyTuple_Pack(2, v3 ? st->rebuild_tensor_v3 : st->rebuild_tensor_v2, args);
    goto done;
fallback:
    /* not the common case, or a lookup failed: torch's __reduce_ex__ decides
     * (and raises what it raises) */
    PyErr_Clear();
    result = Py_NewRef(Py_NotImplemented);
done:
    Py_XDECREF(dict);
    Py_XDECREF(hooks);
    Py_XDECREF(layout);
    Py_XDECREF(dev);
    Py_XDECREF(flag);
    Py_XDECREF(meta);
    Py_XDECREF(dtype);
    Py_XDECREF(untyped);
    Py_XDECREF(token);
    Py_XDECREF(offset);
    Py_XDECREF(size);
    Py_XDECREF(shape);
    Py_XDECREF(stride);
    Py_XDECREF(grad);
    Py_XDECREF(od);
    Py_XDECREF(args);
    return result;
}

/* ---- the SaveState type ---------------------------------------------------- */

static int state_traverse(ck_save_state *self, visitproc visit, void *arg) {
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->ids);
    Py_VISIT(self->storages);
    Py_VISIT(self->dtypes);
    return 0;
}

static int state_clear(ck_save_state *self) {
    Py_CLEAR(self->ids);
    Py_CLEAR(self->storages);
    Py_CLEAR(self->dtypes);
    return 0;
}

static void state_dealloc(ck_save_state *self) {
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    state_clear(self);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static PyMethodDef state_methods[] = {
    {"persistent_id", (PyCFunction)persistent_id, METH_O,
     "torch.save's persistent_id: a storage becomes ('storage', type, key, location, numel)."},
    {"reducer_override", (PyCFunction)reduce_tensor, METH_O,
     "torch.Tensor.__reduce_ex__ for plain tensors; NotImplemented for anything else."},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot state_slots[] = {
    {Py_tp_traverse, state_traverse},
    {Py_tp_clear, state_clear},
    {Py_tp_dealloc, state_dealloc},
    {Py_tp_methods, state_methods},
    {Py_tp_doc, "The pickling state of one ckptio save (its storages and their keys)."},
    {0, NULL},
};

static PyType_Spec state_spec =
    CK_TYPE_SPEC("SaveState", sizeof(ck_save_state), Py_TPFLAGS_HAVE_GC, state_slots);

int ck_save_hooks_init(PyObject *m, ck_state *st) {
    if (ck_new_type(m, &state_spec, NULL, &st->SaveStateType) < 0)
        return -1;
    /* the pickler class: a plain subclass of the C pickler, whose instances
     * have a __dict__ for the two hooks of their save */
    PyObject *pickle = PyImport_ImportModule("_pickle");
    PyObject *base = pickle ? PyObject_GetAttrString(pickle, "Pickler") : NULL;
    Py_XDECREF(pickle);
    if (base == NULL)
        return -1;
    st->SavePickler = PyObject_CallFunction(
        (PyObject *)&PyType_Type, "s(O){ssss}", "SavePickler", base, "__module__", "ckptio._native",
        "__doc__",
        "The pickler of ckptio.save. Each save gives its instance the persistent_id and "
        "reducer_override of that save's SaveState; the class itself is a plain _pickle.Pickler.");
    Py_DECREF(base);
    if (st->SavePickler == NULL)
        return -1;
    if (PyModule_AddObjectRef(m, "SavePickler", st->SavePickler) < 0 ||
        ck_add_type(m, &state_spec, st->SaveStateType) < 0)
        return -1;
    return 0;
}

static ck_save_state *state_new(ck_state *st, int fast) {
    ck_save_state *self = PyObject_GC_New(ck_save_state, st->SaveStateType);
    if (self == NULL)
        return NULL;
    self->fast = fast;
    self->ids = PyDict_New();
    self->storages = PyList_New(0);
    self->dtypes = PyDict_New();
    PyObject_GC_Track(self);
    if (self->ids == NULL || self->storages == NULL || self->dtypes == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    return self;
}

void ck_save_state_end(ck_save_state *state) {
    if (state == NULL)
        return;
    state_clear(state);
    Py_DECREF(state);
}

/* Sets obj.name = getattr(state, name): the bound method of this save. */
static int give_hook(PyObject *pickler, ck_save_state *state, const char *name) {
    PyObject *bound = PyObject_GetAttrString((PyObject *)state, name);
    if (bound == NULL)
        return -1;
    int rc = PyObject_SetAttrString(pickler, name, bound);
    Py_DECREF(bound);
    return rc;
}

PyObject *ck_save_pickle(ck_state *st, PyObject *obj, int fast, ck_save_state **state) {
    *state = NULL;
    PyObject *io = NULL, *buf = NULL, *pickler = NULL, *res = NULL;
    ck_save_state *self = state_new(st, fast);
    if (self == NULL)
        return NULL;
    io = PyImport_ImportModule("io");
    buf = io ? PyObject_CallMethod(io, "BytesIO", NULL) : NULL;
    pickler = buf ? PyObject_CallFunction(st->SavePickler, "Oi", buf, 2) : NULL;
    if (pickler != NULL && give_hook(pickler, self, "persistent_id") == 0 &&
        give_hook(pickler, self, "reducer_override") == 0)
        res = PyObject_CallMethod(pickler, "dump", "O", obj);
    Py_XDECREF(pickler);
    Py_XDECREF(io);
    if (res == NULL) {
        Py_XDECREF(buf);
        ck_save_state_end(self);
        return NULL;
    }
    Py_DECREF(res);
    *state = self;
    return buf;
}

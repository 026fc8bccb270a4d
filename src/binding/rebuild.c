#include "rebuild.h"

#include <string.h>

#include "budget.h"
#include "errors.h"
#include "materialize.h"
#include "storages.h"

/* Tensors ckptio builds have at most this many dimensions (NumPy's limit is
 * higher than any checkpoint needs; torch has no practical limit, so a file
 * with more is refused with a clear message rather than guessed at). */
#define CK_MAX_DIMS 64

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
    PyObject *arr = ck_array_over(e->owner, e->ptr, di->npy_type, g->ndim, dims, strides);
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
    if (e->place == CK_PLACE_UNSET && ck_storage_place(s, slot, e, dtype) < 0)
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
        PyObject *us = ck_storage_cpu_untyped(s, e);
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

/* *clean: the clean form (ck_clean) of obj, one of the pickle's objects,
 * when it is given (neither NULL nor None) and true; NULL otherwise.
 * Returns 0, or -1 with an exception set. */
static int clean_if_true(ck_session *s, PyObject *obj, PyObject **clean) {
    *clean = NULL;
    if (obj == NULL || obj == Py_None)
        return 0;
    int has = PyObject_IsTrue(obj);
    if (has <= 0)
        return has;
    *clean = ck_clean(s, obj);
    return *clean == NULL ? -1 : 0;
}

/* requires_grad, tensor metadata (conj/neg bits) and backward hooks, as
 * torch's _rebuild_tensor_v2/v3 apply them. Steals t; returns it or NULL.
 * hooks and metadata are the pickle's objects: what reaches torch is their
 * clean form (ck_clean). */
static PyObject *finish_tensor(ck_session *s, PyObject *t, PyObject *requires_grad, PyObject *hooks,
                               PyObject *metadata) {
    ck_state *st = s->st;
    PyObject *clean;
    if (requires_grad == Py_True) {
        PyObject *r = PyObject_CallMethodOneArg(t, st->s_requires_grad_, Py_True);
        if (r == NULL)
            goto fail;
        Py_DECREF(r);
    }
    if (clean_if_true(s, metadata, &clean) < 0)
        goto fail;
    if (clean != NULL) {
        PyObject *r = PyObject_CallFunctionObjArgs(st->set_tensor_metadata, t, clean, NULL);
        Py_DECREF(clean);
        if (r == NULL)
            goto fail;
        Py_DECREF(r);
    }
    /* torch attaches the (always empty) backward-hook dict it unpickled; an
     * empty one changes nothing, so only a non-empty one is attached. */
    if (clean_if_true(s, hooks, &clean) < 0)
        goto fail;
    if (clean != NULL) {
        int rc = PyObject_SetAttrString(t, "_backward_hooks", clean);
        Py_DECREF(clean);
        if (rc < 0)
            goto fail;
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

/* _rebuild_tensor(storage, offset, size, stride),
 * _rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, metadata]),
 * _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype[, metadata]) */
static PyObject *rebuild_tensor(ck_session *s, int version, PyObject *args) {
    ck_state *st = s->st;
    Py_ssize_t slot = ck_ref_slot(s->st, PyTuple_GET_ITEM(args, 0));
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
        if ((n == 6 || n == 7) && ck_ref_slot(s->st, first) >= 0) {
            *handled = 1;
            return rebuild_tensor(s, 2, args);
        }
    } else if (func == st->rebuild_tensor_v3) {
        if ((n == 7 || n == 8) && ck_ref_slot(s->st, first) >= 0) {
            *handled = 1;
            return rebuild_tensor(s, 3, args);
        }
    } else if (func == st->rebuild_tensor) {
        if (n == 4 && ck_ref_slot(s->st, first) >= 0) {
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

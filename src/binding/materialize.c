#include "materialize.h"

#include "budget.h"
#include "errors.h"
#include "storages.h"

PyObject *ck_storage_materialize(ck_session *s, PyObject *ref) {
    ck_state *st = s->st;
    Py_ssize_t slot = ((ck_storage_ref *)ref)->slot;
    ck_storage *e = &s->storages[slot];
    if (e->typed != NULL)
        return Py_NewRef(e->typed);
    if (ck_charge(s, 1024) < 0) /* a TypedStorage, its UntypedStorage and tensor */
        return ck_raise_over_budget(s, "making a storage object");
    if (e->place == CK_PLACE_UNSET && ck_storage_place(s, slot, e, e->dtype) < 0)
        return NULL;
    PyObject *us = e->place == CK_PLACE_CPU ? ck_storage_cpu_untyped(s, e) : e->ustorage;
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

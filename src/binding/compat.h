/* The CPython API ckptio uses that older supported Pythons lack, so that
 * one source builds on every version requires-python admits (3.9 up).
 * Each shim is the documented behaviour of the newer API; nothing here is
 * used on the version that introduced the real one. Included by state.h. */
#ifndef CKPTIO_BINDING_COMPAT_H
#define CKPTIO_BINDING_COMPAT_H

#include <Python.h>

#if PY_VERSION_HEX < 0x030A0000 /* 3.10: Py_NewRef, PyModule_AddObjectRef, type flags */

static inline PyObject *ck_compat_new_ref(PyObject *obj) {
    Py_INCREF(obj);
    return obj;
}
#define Py_NewRef(obj) ck_compat_new_ref((PyObject *)(obj))

/* Adds value to module under name without stealing the reference. */
static inline int ck_compat_add_object_ref(PyObject *module, const char *name, PyObject *value) {
    if (value == NULL) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_SystemError, "PyModule_AddObjectRef() must be called with "
                                               "an exception raised if value is NULL");
        return -1;
    }
    Py_INCREF(value);
    if (PyModule_AddObject(module, name, value) < 0) {
        Py_DECREF(value);
        return -1;
    }
    return 0;
}
#define PyModule_AddObjectRef ck_compat_add_object_ref

/* 3.9 has no immutable heap types (its types stay settable) and no flag
 * for "no instances from Python": a type whose spec has no Py_tp_new gets
 * tp_new = NULL after creation, which is what the 3.10 flag does. */
#define Py_TPFLAGS_IMMUTABLETYPE 0
#define Py_TPFLAGS_DISALLOW_INSTANTIATION 0

static inline PyObject *ck_compat_type_from_spec(PyObject *module, PyType_Spec *spec,
                                                 PyObject *bases) {
    PyObject *type = PyType_FromModuleAndSpec(module, spec, bases);
    if (type == NULL)
        return NULL;
    int has_new = 0;
    for (const PyType_Slot *slot = spec->slots; slot->slot != 0; slot++)
        has_new |= slot->slot == Py_tp_new;
    if (!has_new)
        ((PyTypeObject *)type)->tp_new = NULL;
    return type;
}
#define PyType_FromModuleAndSpec ck_compat_type_from_spec

#endif

#if PY_VERSION_HEX < 0x030B0000 /* 3.11: PyFloat_Unpack8 became public */
static inline double ck_compat_float_unpack8(const char *p, int le) {
    return _PyFloat_Unpack8((const unsigned char *)p, le);
}
#define PyFloat_Unpack8 ck_compat_float_unpack8
#endif

#endif

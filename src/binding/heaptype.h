/* The binding's own types (Mapping, HostArena, AtomicFile, SaveState,
 * StorageRef, RefTuple): heap types of ckptio._native, made from a spec
 * per module and kept in its state. Python code never instantiates them:
 * only C makes their objects. */
#ifndef CKPTIO_BINDING_HEAPTYPE_H
#define CKPTIO_BINDING_HEAPTYPE_H

#include "state.h"

#include <string.h>

/* The spec of ckptio._native.<type_name> (a string literal): instances of
 * size bytes (0: the base's), not instantiable from Python, with these
 * flags besides (Py_TPFLAGS_IMMUTABLETYPE, Py_TPFLAGS_HAVE_GC...). */
#define CK_TYPE_SPEC(type_name, size, more_flags, type_slots)                                      \
    {                                                                                              \
        .name = "ckptio._native." type_name, .basicsize = (size),                                  \
        .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_DISALLOW_INSTANTIATION | (more_flags),            \
        .slots = (type_slots),                                                                     \
    }

/* Creates the type of spec for module m (bases: NULL, or a tuple of base
 * types) into *type, a reference the module state owns. 0, or -1 with an
 * exception set. */
static inline int ck_new_type(PyObject *m, PyType_Spec *spec, PyObject *bases,
                              PyTypeObject **type) {
    *type = (PyTypeObject *)PyType_FromModuleAndSpec(m, spec, bases);
    return *type == NULL ? -1 : 0;
}

/* Adds type to module m under its name (the last part of its spec's). */
static inline int ck_add_type(PyObject *m, PyType_Spec *spec, PyTypeObject *type) {
    return PyModule_AddObjectRef(m, strrchr(spec->name, '.') + 1, (PyObject *)type);
}

/* ck_new_type without bases, then ck_add_type: the type is also the
 * module's attribute. */
static inline int ck_new_module_type(PyObject *m, PyType_Spec *spec, PyTypeObject **type) {
    if (ck_new_type(m, spec, NULL, type) < 0)
        return -1;
    return ck_add_type(m, spec, *type);
}

#endif

/* ckptio._native.load: decodes one checkpoint held by a Mapping. */
#ifndef CKPTIO_BINDING_LOAD_H
#define CKPTIO_BINDING_LOAD_H

#include "state.h"

extern const char ck_load_doc[];

PyObject *ck_py_load(PyObject *module, PyObject *args, PyObject *kwargs);

#endif

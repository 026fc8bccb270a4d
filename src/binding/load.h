/* ckptio._native.load: decodes one checkpoint held by a Mapping. */
#ifndef CKPTIO_BINDING_LOAD_H
#define CKPTIO_BINDING_LOAD_H

#include "session.h"

extern const char ck_load_doc[];

PyObject *ck_py_load(PyObject *module, PyObject *args, PyObject *kwargs);

/* Decodes the checkpoint in s->buf[0 .. s->len) (a torch.save zip archive
 * or a legacy stream) with the options already set in s; for callers that
 * decode part of a mapping (the .distcp items of src/binding/dcp.c). */
PyObject *ck_load_any(ck_session *s);

#endif

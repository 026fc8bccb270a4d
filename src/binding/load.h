/* ckptio._native.load: decodes one checkpoint held by a Mapping. */
#ifndef CKPTIO_BINDING_LOAD_H
#define CKPTIO_BINDING_LOAD_H

#include "session.h"

extern const char ck_load_doc[];

PyObject *ck_py_load(PyObject *module, PyObject *args, PyObject *kwargs);

/* The check of a decoder's user_globals argument (load, dcp.c's unpickle):
 * 0 if it is None or a dict, else -1 with TypeError "<fn>: user_globals
 * must be a dict". */
int ck_user_globals_arg(PyObject *user_globals, const char *fn);

/* Decodes the checkpoint in s->buf[0 .. s->len) (a torch.save zip archive
 * or a legacy stream) with the options already set in s; for callers that
 * decode part of a mapping (the .distcp items of src/binding/dcp.c). */
PyObject *ck_load_any(ck_session *s);

#endif

/* The one place where core statuses and binding failures become Python
 * exceptions. Every message starts with the name of the file being read. */
#ifndef CKPTIO_BINDING_ERRORS_H
#define CKPTIO_BINDING_ERRORS_H

#include "state.h"
#include "core/status.h"

/* Creates CheckpointError (RuntimeError subclass) and UnpicklingError
 * (subclass of pickle.UnpicklingError and CheckpointError) in st and adds
 * them to module m. Returns 0 or -1. */
int ck_errors_init(PyObject *m, ck_state *st);

/* Raises the exception for a core failure: OSError (the errno's subclass,
 * with the file name) for CK_E_IO, MemoryError for CK_E_NOMEM, else
 * CheckpointError "<file>: <message>". Returns NULL. */
PyObject *ck_raise_core(ck_state *st, PyObject *filename, const ck_error *err);

/* Raises exc_type with "<file>: " + the message, formatted by
 * PyUnicode_FromFormat (so %U and %R work; no '*' widths). Returns NULL. */
PyObject *ck_raise(PyObject *exc_type, PyObject *filename, const char *fmt, ...);

/* Replaces the pending exception with exc_type("<file>: <context>: <Type>:
 * <text>") whose __cause__ is the original. KeyboardInterrupt, SystemExit
 * and MemoryError are kept as they are, with the context added as a note.
 * Returns NULL. */
PyObject *ck_wrap_pending(ck_state *st, PyObject *exc_type, PyObject *filename,
                          const char *context);

/* Adds "<file>: <context>" as a note (PEP 678) to the pending exception,
 * keeping its type. Returns NULL. */
PyObject *ck_note_pending(ck_state *st, PyObject *filename, const char *context);

/* The pending exception, normalized (with its traceback attached), as one
 * new reference; NULL if none is pending. Clears the error indicator.
 * (Python 3.11 has no PyErr_GetRaisedException.) */
PyObject *ck_fetch_exception(void);

/* Raises exc again (steals the reference). */
void ck_restore_exception(PyObject *exc);

#endif

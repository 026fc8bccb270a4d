/* The one place where core statuses (and their errno) and binding failures
 * become Python exceptions. A message starts with the name of the file being
 * read, where there is one. */
#ifndef CKPTIO_BINDING_ERRORS_H
#define CKPTIO_BINDING_ERRORS_H

#include "state.h"
#include "core/status.h"

/* Creates CheckpointError (RuntimeError subclass) and UnpicklingError
 * (subclass of pickle.UnpicklingError and CheckpointError) in st and adds
 * them to module m. Returns 0 or -1. */
int ck_errors_init(PyObject *m, ck_state *st);

/* Where the input of a failed core call came from: the same status can be
 * the file's fault, the caller's or the transfer's. */
typedef enum ck_origin {
    CK_FROM_FILE,     /* a checkpoint's bytes, or the file system under it */
    CK_FROM_CALLER,   /* values the Python caller passed: segments, sizes, a library */
    CK_FROM_DOWNLOAD, /* a transfer of ck_http_download */
} ck_origin;

/* Raises the exception for a core failure. The one mapping of statuses to
 * exception types (status_type in errors.c):
 *
 *   status              CK_FROM_FILE      CK_FROM_CALLER    CK_FROM_DOWNLOAD
 *   CK_E_NOMEM          MemoryError       MemoryError       MemoryError
 *   CK_E_IO with errno  OSError           OSError           DownloadError
 *   CK_E_RANGE, LIMIT   CheckpointError   ValueError        DownloadError
 *   any other status    CheckpointError   CheckpointError   DownloadError
 *
 * The message is "<file>: <context>: <core message>", leaving out filename
 * when it is NULL or None and context when it is NULL. With errno, the
 * exception is built as type(errno, "<context>: <core message>", filename
 * or None), so OSError picks the errno's subclass (FileNotFoundError, ...)
 * and carries errno, strerror and filename; DownloadError is built as
 * DownloadError(errno, message), its url being set by http.c. MemoryError
 * without a context is PyErr_NoMemory()'s, which allocates nothing: the
 * core ran out of memory for its own records, not for one named buffer.
 * Returns NULL. */
PyObject *ck_raise_status(ck_state *st, ck_origin origin, PyObject *filename, const char *context,
                          const ck_error *err);

/* A failure reading or writing a checkpoint file:
 * ck_raise_status(st, CK_FROM_FILE, filename, NULL, err). Returns NULL. */
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

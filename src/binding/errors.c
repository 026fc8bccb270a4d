#include "errors.h"

#include <stdarg.h>

int ck_errors_init(PyObject *m, ck_state *st) {
    st->CheckpointError = PyErr_NewExceptionWithDoc(
        "ckptio.CheckpointError",
        "A checkpoint could not be read or written: the message names the file and the problem.",
        PyExc_RuntimeError, NULL);
    if (st->CheckpointError == NULL)
        return -1;
    PyObject *pickle = PyImport_ImportModule("pickle");
    if (pickle == NULL)
        return -1;
    PyObject *base = PyObject_GetAttrString(pickle, "UnpicklingError");
    Py_DECREF(pickle);
    if (base == NULL)
        return -1;
    PyObject *bases = PyTuple_Pack(2, base, st->CheckpointError);
    Py_DECREF(base);
    if (bases == NULL)
        return -1;
    st->UnpicklingError = PyErr_NewExceptionWithDoc(
        "ckptio.UnpicklingError",
        "A checkpoint's pickle names a global or an operation that the loader refuses.", bases,
        NULL);
    Py_DECREF(bases);
    if (st->UnpicklingError == NULL)
        return -1;
    if (PyModule_AddObjectRef(m, "CheckpointError", st->CheckpointError) < 0)
        return -1;
    if (PyModule_AddObjectRef(m, "UnpicklingError", st->UnpicklingError) < 0)
        return -1;
    return 0;
}

/* What each core status becomes, by origin (the table in errors.h). Every
 * status is named, with no default, so -Wswitch points here when one is
 * added to core/status.h. */
static PyObject *status_type(ck_state *st, ck_origin origin, const ck_error *err) {
    PyObject *fault = origin == CK_FROM_DOWNLOAD ? st->DownloadError : st->CheckpointError;
    switch (err->status) {
    case CK_E_NOMEM:
        return PyExc_MemoryError;
    case CK_E_IO:
        /* DownloadError is an OSError already; the others pick errno's subclass */
        return err->os_errno != 0 && origin != CK_FROM_DOWNLOAD ? PyExc_OSError : fault;
    case CK_E_RANGE:
    case CK_E_LIMIT:
        /* an offset or size the caller passed is a bad argument; one read
         * from a file or a server is the file's or the transfer's fault */
        return origin == CK_FROM_CALLER ? PyExc_ValueError : fault;
    case CK_OK: /* not a failure: a caller's bug, still reported as the fault */
    case CK_E_FORMAT:
    case CK_E_TRUNCATED:
    case CK_E_UNSUPPORTED:
    case CK_E_CRC:
    case CK_E_NOTFOUND:
    case CK_E_HTTP:
    case CK_E_INTERRUPTED:
    case CK_STATUS_COUNT:
        return fault;
    }
    return fault;
}

/* type(errno, text[, filename or None]): OSError's constructor picks the
 * errno's subclass and fills errno, strerror and filename. */
static PyObject *raise_errno(PyObject *type, ck_origin origin, PyObject *filename, int os_errno,
                             PyObject *text) {
    PyObject *args = origin == CK_FROM_DOWNLOAD
                         ? Py_BuildValue("(iO)", os_errno, text)
                         : Py_BuildValue("(iOO)", os_errno, text, filename ? filename : Py_None);
    if (args == NULL)
        return NULL;
    PyObject *exc = PyObject_Call(type, args, NULL);
    Py_DECREF(args);
    if (exc == NULL)
        return NULL;
    ck_restore_exception(exc);
    return NULL;
}

PyObject *ck_raise_status(ck_state *st, ck_origin origin, PyObject *filename, const char *context,
                          const ck_error *err) {
    PyObject *type = status_type(st, origin, err); /* borrowed */
    if (type == PyExc_MemoryError && context == NULL)
        return PyErr_NoMemory();
    /* %s decodes with errors="replace": a message quoting a file's bytes or
     * a path that is not UTF-8 still becomes the mapped exception */
    PyObject *text = context != NULL ? PyUnicode_FromFormat("%s: %s", context, err->msg)
                                     : PyUnicode_FromFormat("%s", err->msg);
    if (text == NULL)
        return NULL;
    if (err->status == CK_E_IO && err->os_errno != 0) {
        raise_errno(type, origin, filename, err->os_errno, text);
    } else if (filename != NULL && filename != Py_None) {
        PyErr_Format(type, "%U: %U", filename, text);
    } else {
        PyErr_SetObject(type, text);
    }
    Py_DECREF(text);
    return NULL;
}

PyObject *ck_raise_core(ck_state *st, PyObject *filename, const ck_error *err) {
    return ck_raise_status(st, CK_FROM_FILE, filename, NULL, err);
}

PyObject *ck_raise(PyObject *exc_type, PyObject *filename, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    PyObject *msg = PyUnicode_FromFormatV(fmt, ap);
    va_end(ap);
    if (msg == NULL)
        return NULL;
    if (filename != NULL && filename != Py_None)
        PyErr_Format(exc_type, "%U: %U", filename, msg);
    else
        PyErr_SetObject(exc_type, msg);
    Py_DECREF(msg);
    return NULL;
}

PyObject *ck_fetch_exception(void) {
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    if (type == NULL)
        return NULL;
    PyErr_NormalizeException(&type, &value, &tb);
    if (tb != NULL && value != NULL)
        PyException_SetTraceback(value, tb);
    Py_XDECREF(type);
    Py_XDECREF(tb);
    return value;
}

void ck_restore_exception(PyObject *exc) {
    PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
    Py_DECREF(exc);
}

static int is_kept_as_is(PyObject *exc) {
    return PyErr_GivenExceptionMatches(exc, PyExc_KeyboardInterrupt) ||
           PyErr_GivenExceptionMatches(exc, PyExc_SystemExit) ||
           PyErr_GivenExceptionMatches(exc, PyExc_MemoryError);
}

static void add_note(ck_state *st, PyObject *exc, PyObject *filename, const char *context) {
    PyObject *note = PyUnicode_FromFormat("while loading %U: %s", filename, context);
    if (note == NULL) {
        PyErr_Clear();
        return;
    }
    PyObject *r = PyObject_CallMethodOneArg(exc, st->s_add_note, note);
    Py_DECREF(note);
    if (r == NULL)
        PyErr_Clear();
    Py_XDECREF(r);
}

PyObject *ck_note_pending(ck_state *st, PyObject *filename, const char *context) {
    PyObject *exc = ck_fetch_exception();
    if (exc == NULL)
        return NULL;
    add_note(st, exc, filename, context);
    ck_restore_exception(exc);
    return NULL;
}

PyObject *ck_wrap_pending(ck_state *st, PyObject *exc_type, PyObject *filename,
                          const char *context) {
    PyObject *exc = ck_fetch_exception();
    if (exc == NULL)
        return NULL;
    if (is_kept_as_is(exc) || PyErr_GivenExceptionMatches(exc, st->CheckpointError)) {
        if (!PyErr_GivenExceptionMatches(exc, st->CheckpointError))
            add_note(st, exc, filename, context);
        ck_restore_exception(exc);
        return NULL;
    }
    PyObject *text = PyObject_Str(exc);
    if (text == NULL) {
        PyErr_Clear();
        text = PyUnicode_FromString("(message unavailable)");
        if (text == NULL) {
            Py_DECREF(exc);
            return NULL;
        }
    }
    PyErr_Format(exc_type, "%U: %s: %s: %U", filename, context, Py_TYPE(exc)->tp_name, text);
    Py_DECREF(text);
    PyObject *wrapped = ck_fetch_exception();
    if (wrapped != NULL) {
        PyException_SetCause(wrapped, exc); /* steals exc */
        PyException_SetContext(wrapped, Py_NewRef(exc));
        ck_restore_exception(wrapped);
    } else {
        Py_DECREF(exc);
    }
    return NULL;
}

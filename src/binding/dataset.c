#include "dataset.h"

#include <stdarg.h>
#include <string.h>

#include "histbuf.h"
#include "npdata.h"
#include "npy.h"

static const char hb_global[] = "mmengine.logging.history_buffer.HistoryBuffer";

int ck_why_set(ck_why *why, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    PyObject *msg = PyUnicode_FromFormatV(fmt, ap);
    va_end(ap);
    const char *text = msg ? PyUnicode_AsUTF8(msg) : NULL;
    if (text == NULL) {
        /* still a refusal, with the bare format for a reason */
        PyErr_Clear();
        text = fmt;
    }
    snprintf(why->text, sizeof why->text, "%s", text);
    Py_XDECREF(msg);
    return CK_DATA_REFUSED;
}

int ck_dataset_init(ck_state *st) {
    if (ck_np_init(st) < 0)
        return -1;
    PyObject *builtins = PyImport_ImportModule("builtins");
    st->builtin_getattr = builtins ? PyObject_GetAttrString(builtins, "getattr") : NULL;
    Py_XDECREF(builtins);
    PyObject *codecs = PyImport_ImportModule("_codecs");
    st->codecs_encode = codecs ? PyObject_GetAttrString(codecs, "encode") : NULL;
    Py_XDECREF(codecs);
    st->dataset_globals = PyDict_New();
    if (st->builtin_getattr == NULL || st->codecs_encode == NULL || st->dataset_globals == NULL)
        return -1;
    const struct {
        const char *name;
        PyObject *obj;
    } table[] = {
        {"numpy.core.multiarray._reconstruct", st->np_reconstruct},
        {"numpy._core.multiarray._reconstruct", st->np_reconstruct},
        {"numpy.core.multiarray.scalar", st->np_scalar},
        {"numpy._core.multiarray.scalar", st->np_scalar},
        {"numpy.ndarray", (PyObject *)&PyArray_Type},
        {"numpy.dtype", (PyObject *)&PyArrayDescr_Type},
        {"builtins.getattr", st->builtin_getattr},
        {"__builtin__.getattr", st->builtin_getattr},
        {"builtins.bytes", (PyObject *)&PyBytes_Type},
        {"__builtin__.bytes", (PyObject *)&PyBytes_Type},
        /* in torch 2's allowlist, not in torch 1.13's: mmcv 1.x files hold
         * numpy values, whose bytes protocol 2 writes through it (decoded
         * only as (str, 'latin1'), ck_dataset_reduce) */
        {"_codecs.encode", st->codecs_encode},
    };
    for (size_t i = 0; i < sizeof table / sizeof table[0]; i++)
        if (PyDict_SetItemString(st->dataset_globals, table[i].name, table[i].obj) < 0)
            return -1;
    return 0;
}

int ck_dataset_names(ck_state *st, PyObject *full) {
    if (PyUnicode_CompareWithASCIIString(full, hb_global) == 0)
        return 1;
    PyObject *hit = st->dataset_globals ? PyDict_GetItemWithError(st->dataset_globals, full) : NULL;
    if (hit == NULL)
        PyErr_Clear();
    return hit != NULL;
}

PyObject *ck_dataset_global(ck_session *s, PyObject *full) {
    if (!(s->allow & CK_ALLOW_OPENMMLAB))
        return NULL;
    if (PyUnicode_CompareWithASCIIString(full, hb_global) == 0)
        return ck_hb_class(s);
    PyObject *hit = PyDict_GetItemWithError(s->st->dataset_globals, full);
    return hit != NULL ? Py_NewRef(hit) : NULL;
}

/* _codecs.encode(text, 'latin1'): how pickle protocol 2 writes bytes. The
 * text is converted here (no codec lookup); nothing else is decoded. */
static int codecs_encode(PyObject *args, PyObject **out, ck_why *why) {
    if (PyTuple_GET_SIZE(args) != 2 || !PyUnicode_CheckExact(PyTuple_GET_ITEM(args, 1)) ||
        PyUnicode_CompareWithASCIIString(PyTuple_GET_ITEM(args, 1), "latin1") != 0)
        return ck_why_set(why, "_codecs.encode is decoded only as _codecs.encode(str, 'latin1') "
                               "(how pickle protocol 2 stores bytes): other codecs and "
                               "arguments are refused");
    PyObject *text = PyTuple_GET_ITEM(args, 0);
    if (!PyUnicode_CheckExact(text))
        return ck_why_set(why, "_codecs.encode is decoded only for str input, not %.80s",
                          Py_TYPE(text)->tp_name);
    if (PyUnicode_MAX_CHAR_VALUE(text) > 0xff)
        return ck_why_set(why, "_codecs.encode(..., 'latin1') of text outside latin-1");
    *out = PyUnicode_AsLatin1String(text);
    return *out == NULL ? CK_DATA_FAILED : CK_DATA_DONE;
}

int ck_dataset_reduce(ck_session *s, PyObject *func, PyObject *args, PyObject **out, ck_why *why) {
    ck_state *st = s->st;
    if (func == st->codecs_encode)
        return codecs_encode(args, out, why);
    if (!(s->allow & CK_ALLOW_OPENMMLAB))
        return CK_DATA_NO;
    if (ck_np_is_callable(st, func))
        return ck_np_reduce(s, func, args, out, why);
    if (func == st->builtin_getattr)
        return ck_hb_getattr(s, args, out, why);
    if (func == (PyObject *)&PyBytes_Type) {
        /* protocol 2 writes an empty bytes object (the data of an empty numpy
         * array or HistoryBuffer) as bytes() */
        if (PyTuple_GET_SIZE(args) != 0)
            return ck_why_set(why, "bytes is decoded only as bytes(), the empty bytes object");
        *out = PyBytes_FromStringAndSize(NULL, 0);
        return *out == NULL ? CK_DATA_FAILED : CK_DATA_DONE;
    }
    return CK_DATA_NO;
}

int ck_dataset_newobj(ck_session *s, PyObject *cls, PyObject *args, PyObject *kwargs,
                      PyObject **out, ck_why *why) {
    if (!(s->allow & CK_ALLOW_OPENMMLAB))
        return CK_DATA_NO;
    return ck_hb_newobj(s, cls, args, kwargs, out, why);
}

int ck_dataset_build(ck_session *s, PyObject *inst, PyObject *state, ck_why *why) {
    if (!(s->allow & CK_ALLOW_OPENMMLAB))
        return CK_DATA_NO;
    int rc = ck_np_build(s, inst, state, why);
    return rc != CK_DATA_NO ? rc : ck_hb_build(s, inst, state, why);
}

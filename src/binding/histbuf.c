#include "histbuf.h"

#include "errors.h"
#include "npy.h"

static const char hb_module[] = "mmengine.logging.history_buffer";

/* The statistics methods mmengine registers by default: the only names
 * getattr(HistoryBuffer, name) and statistics_methods may hold. */
static const char *const stat_names[] = {"min", "max", "current", "mean"};

static int is_stat_name(PyObject *name) {
    if (!PyUnicode_CheckExact(name))
        return 0;
    for (size_t i = 0; i < sizeof stat_names / sizeof stat_names[0]; i++)
        if (PyUnicode_CompareWithASCIIString(name, stat_names[i]) == 0)
            return 1;
    return 0;
}

/* Refuses name, not one of stat_names: "<refusal> min, max, current and
 * mean, not <repr of name>" (of a non-str name: its type). */
static int refuse_stat_name(ck_why *why, const char *refusal, PyObject *name) {
    int is_str = PyUnicode_CheckExact(name);
    return ck_why_set(why, "%s min, max, current and mean, not %s%R", refusal,
                      is_str ? "" : "a non-str ", is_str ? name : (PyObject *)Py_TYPE(name));
}

/* The function the class itself defines under name (borrowed), read from
 * its own __dict__: no descriptor or metaclass code runs. NULL if absent. */
static PyObject *own_function(PyObject *cls, const char *name) {
    PyObject *dict = ((PyTypeObject *)cls)->tp_dict;
    if (dict == NULL)
        return NULL;
    PyObject *f = PyDict_GetItemString(dict, name);
    return f != NULL && PyFunction_Check(f) ? f : NULL;
}

PyObject *ck_hb_class(ck_session *s) {
    ck_state *st = s->st;
    PyObject *mod = PyImport_ImportModule(hb_module);
    if (mod == NULL) {
        PyObject *exc = ck_fetch_exception();
        if (exc == NULL)
            return NULL;
        ck_raise(st->UnpicklingError, s->filename,
                 "GLOBAL %s.HistoryBuffer: mmengine's HistoryBuffer cannot be imported (%s: "
                 "%S); install mmengine to load this mmengine checkpoint",
                 hb_module, Py_TYPE(exc)->tp_name, exc);
        Py_DECREF(exc);
        return NULL;
    }
    PyObject *cls = PyObject_GetAttrString(mod, "HistoryBuffer");
    Py_DECREF(mod);
    if (cls == NULL)
        return NULL;
    /* a plain class of that module: no metaclass, defined there */
    int ok = PyType_Check(cls) && Py_TYPE(cls) == &PyType_Type &&
             (((PyTypeObject *)cls)->tp_flags & Py_TPFLAGS_HEAPTYPE);
    if (ok) {
        PyObject *where = PyDict_GetItemString(((PyTypeObject *)cls)->tp_dict, "__module__");
        ok = where != NULL && PyUnicode_CheckExact(where) &&
             PyUnicode_CompareWithASCIIString(where, hb_module) == 0;
    }
    if (!ok) {
        Py_DECREF(cls);
        return ck_raise(st->UnpicklingError, s->filename,
                        "GLOBAL %s.HistoryBuffer is not mmengine's HistoryBuffer class", hb_module);
    }
    Py_XSETREF(st->HistoryBuffer, Py_NewRef(cls));
    return cls;
}

/* A short description of obj for messages (no __repr__ of the file's objects). */
static const char *what_is(PyObject *obj) {
    if (PyType_Check(obj))
        return ((PyTypeObject *)obj)->tp_name;
    if (PyModule_Check(obj)) {
        const char *n = PyModule_GetName(obj);
        if (n == NULL)
            PyErr_Clear();
        return n ? n : "a module";
    }
    return Py_TYPE(obj)->tp_name;
}

int ck_hb_getattr(ck_session *s, PyObject *args, PyObject **out, ck_why *why) {
    PyObject *cls = s->st->HistoryBuffer;
    if (PyTuple_GET_SIZE(args) != 2)
        return ck_why_set(why, "getattr is decoded only as getattr(HistoryBuffer, name), with "
                               "two arguments");
    PyObject *obj = PyTuple_GET_ITEM(args, 0), *name = PyTuple_GET_ITEM(args, 1);
    if (cls == NULL || obj != cls)
        return ck_why_set(why,
                          "getattr is decoded only on mmengine's HistoryBuffer class, not on %s "
                          "(%s)",
                          what_is(obj), PyType_Check(obj) ? "a class" : "an object");
    if (!is_stat_name(name))
        return refuse_stat_name(
            why, "getattr(HistoryBuffer, ...) is decoded only for its statistics methods", name);
    PyObject *f = own_function(cls, PyUnicode_AsUTF8(name));
    if (f == NULL) {
        if (PyErr_Occurred())
            return CK_DATA_FAILED;
        return ck_why_set(why, "HistoryBuffer.%U is not a function of the class itself", name);
    }
    *out = Py_NewRef(f);
    return CK_DATA_DONE;
}

int ck_hb_newobj(ck_session *s, PyObject *cls, PyObject *args, PyObject *kwargs, PyObject **out,
                 ck_why *why) {
    if (cls != s->st->HistoryBuffer || cls == NULL)
        return CK_DATA_NO;
    if (PyTuple_GET_SIZE(args) != 0 || (kwargs != NULL && PyDict_GET_SIZE(kwargs) != 0))
        return ck_why_set(why, "HistoryBuffer is created only as HistoryBuffer.__new__"
                               "(HistoryBuffer), without arguments");
    PyTypeObject *t = (PyTypeObject *)cls;
    if (t->tp_new != PyBaseObject_Type.tp_new)
        return ck_why_set(why, "HistoryBuffer defines its own __new__: not decoded");
    *out = t->tp_new(t, args, NULL);
    return *out == NULL ? CK_DATA_FAILED : CK_DATA_DONE;
}

static int history_ok(PyObject *v) {
    if (!PyArray_CheckExact(v) || PyArray_NDIM((PyArrayObject *)v) != 1)
        return 0;
    int t = PyArray_TYPE((PyArrayObject *)v);
    return PyTypeNum_ISBOOL(t) || PyTypeNum_ISINTEGER(t) || PyTypeNum_ISFLOAT(t) ||
           PyTypeNum_ISCOMPLEX(t);
}

/* statistics_methods: {name: the class's own function of that name}. */
static int methods_ok(PyObject *cls, PyObject *methods, ck_why *why) {
    if (!PyDict_CheckExact(methods))
        return ck_why_set(why, "HistoryBuffer statistics_methods must be a dict, not %.80s",
                          Py_TYPE(methods)->tp_name);
    Py_ssize_t pos = 0;
    PyObject *k, *v;
    while (PyDict_Next(methods, &pos, &k, &v)) {
        if (!is_stat_name(k))
            return refuse_stat_name(why, "HistoryBuffer statistics_methods may name only", k);
        if (v != own_function(cls, PyUnicode_AsUTF8(k)))
            return ck_why_set(why,
                              "HistoryBuffer statistics_methods[%R] must be HistoryBuffer.%U "
                              "itself, not %s",
                              k, k, what_is(v));
    }
    return CK_DATA_DONE;
}

int ck_hb_build(ck_session *s, PyObject *inst, PyObject *state, ck_why *why) {
    PyObject *cls = s->st->HistoryBuffer;
    if (cls == NULL || (PyObject *)Py_TYPE(inst) != cls)
        return CK_DATA_NO;
    if (!PyDict_CheckExact(state))
        return ck_why_set(why, "HistoryBuffer state must be a dict, not %.80s",
                          Py_TYPE(state)->tp_name);
    int have_max = 0, have_log = 0, have_count = 0;
    Py_ssize_t pos = 0;
    PyObject *k, *v;
    while (PyDict_Next(state, &pos, &k, &v)) {
        if (!PyUnicode_CheckExact(k))
            return ck_why_set(why, "HistoryBuffer state keys must be str, not %.80s",
                              Py_TYPE(k)->tp_name);
        if (PyUnicode_CompareWithASCIIString(k, "max_length") == 0) {
            if (!PyLong_CheckExact(v))
                return ck_why_set(why, "HistoryBuffer max_length must be an int, not %.80s",
                                  Py_TYPE(v)->tp_name);
            have_max = 1;
        } else if (PyUnicode_CompareWithASCIIString(k, "_log_history") == 0 ||
                   PyUnicode_CompareWithASCIIString(k, "_count_history") == 0) {
            if (!history_ok(v))
                return ck_why_set(why, "HistoryBuffer %U must be a 1-d numeric numpy array", k);
            if (PyUnicode_CompareWithASCIIString(k, "_log_history") == 0)
                have_log = 1;
            else
                have_count = 1;
        } else if (PyUnicode_CompareWithASCIIString(k, "statistics_methods") == 0) {
            if (methods_ok(cls, v, why) != CK_DATA_DONE)
                return CK_DATA_REFUSED;
        } else {
            return ck_why_set(why,
                              "HistoryBuffer state may hold only max_length, _log_history, "
                              "_count_history and statistics_methods, not %R",
                              k);
        }
    }
    if (!have_max || !have_log || !have_count)
        return ck_why_set(why, "HistoryBuffer state lacks max_length, _log_history or "
                               "_count_history");
    /* the class's own __setstate__ on a copy (it pops statistics_methods) */
    PyObject *copy = PyDict_Copy(state);
    if (copy == NULL)
        return CK_DATA_FAILED;
    PyObject *setstate = own_function(cls, "__setstate__");
    int rc = CK_DATA_DONE;
    if (setstate != NULL) {
        PyObject *r = PyObject_CallFunctionObjArgs(setstate, inst, copy, NULL);
        Py_XDECREF(r);
        rc = r == NULL ? CK_DATA_FAILED : CK_DATA_DONE;
    } else {
        pos = 0;
        while (rc == CK_DATA_DONE && PyDict_Next(copy, &pos, &k, &v))
            if (PyUnicode_CompareWithASCIIString(k, "statistics_methods") != 0 &&
                PyObject_GenericSetAttr(inst, k, v) < 0)
                rc = CK_DATA_FAILED;
    }
    Py_DECREF(copy);
    return rc;
}

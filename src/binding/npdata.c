#include "npdata.h"

#include <limits.h>
#include <string.h>

#include "npy.h"

/* numpy 1.x arrays have at most 32 dimensions (2.x: 64); a pickle from
 * either never needs more. */
#define CK_NP_MAXDIMS 32

#if NPY_BYTE_ORDER == NPY_LITTLE_ENDIAN
#define CK_NATIVE '<'
#define CK_SWAPPED '>'
#else
#define CK_NATIVE '>'
#define CK_SWAPPED '<'
#endif

/* The function obj.__reduce__() names (the first item of its result), a
 * new reference, or NULL with an exception set. Steals obj, which may be
 * NULL (its creation failed); what names obj in the error message. */
static PyObject *reduce_function(PyObject *obj, const char *what) {
    PyObject *red = obj ? PyObject_CallMethod(obj, "__reduce__", NULL) : NULL;
    Py_XDECREF(obj);
    if (red == NULL)
        return NULL;
    if (!PyTuple_Check(red) || PyTuple_GET_SIZE(red) < 1) {
        Py_DECREF(red);
        PyErr_Format(PyExc_RuntimeError, "numpy: unexpected %s.__reduce__ result", what);
        return NULL;
    }
    PyObject *func = Py_NewRef(PyTuple_GET_ITEM(red, 0));
    Py_DECREF(red);
    return func;
}

int ck_np_init(ck_state *st) {
    /* the functions numpy's own __reduce__ names, whatever numpy.core is
     * called in this numpy */
    npy_intp zero = 0;
    st->np_reconstruct = reduce_function(PyArray_SimpleNew(1, &zero, NPY_DOUBLE), "ndarray");
    if (st->np_reconstruct == NULL)
        return -1;
    double one = 1.0;
    PyArray_Descr *f8 = PyArray_DescrFromType(NPY_DOUBLE);
    PyObject *sc = PyArray_Scalar(&one, f8, NULL); /* does not take f8's reference */
    Py_DECREF(f8);
    st->np_scalar = reduce_function(sc, "scalar");
    if (st->np_scalar == NULL)
        return -1;
    /* the method descriptor of the type: instances cannot override it */
    st->np_array_setstate = PyObject_GetAttrString((PyObject *)&PyArray_Type, "__setstate__");
    return st->np_array_setstate == NULL ? -1 : 0;
}

int ck_np_is_callable(ck_state *st, PyObject *func) {
    return func == (PyObject *)&PyArrayDescr_Type || func == st->np_reconstruct ||
           func == st->np_scalar;
}

/* ---- dtypes ---------------------------------------------------------------- */

/* The type numbers a decoded dtype may have (object only inside arrays). */
static int type_allowed(int type_num, int allow_object) {
    switch (type_num) {
    case NPY_BOOL:
    case NPY_BYTE:
    case NPY_UBYTE:
    case NPY_SHORT:
    case NPY_USHORT:
    case NPY_INT:
    case NPY_UINT:
    case NPY_LONG:
    case NPY_ULONG:
    case NPY_LONGLONG:
    case NPY_ULONGLONG:
    case NPY_HALF:
    case NPY_FLOAT:
    case NPY_DOUBLE:
    case NPY_LONGDOUBLE:
    case NPY_CFLOAT:
    case NPY_CDOUBLE:
    case NPY_CLONGDOUBLE:
    case NPY_STRING:
    case NPY_UNICODE:
        return 1;
    case NPY_OBJECT:
        return allow_object;
    default:
        return 0;
    }
}

/* 1 if obj is a dtype these builders may use; else fills why and 0. */
static int descr_ok(PyObject *obj, int allow_object, const char *what, ck_why *why) {
    if (!PyArray_DescrCheck(obj)) {
        ck_why_set(why, "%s must be a numpy dtype, not %.80s", what, Py_TYPE(obj)->tp_name);
        return 0;
    }
    PyArray_Descr *d = (PyArray_Descr *)obj;
    if (!type_allowed(d->type_num, allow_object) || PyDataType_HASFIELDS(d) ||
        PyDataType_HASSUBARRAY(d) || PyDataType_METADATA(d) != NULL) {
        ck_why_set(why,
                   "%s %R is not decoded: only bool, integer, float, complex, bytes (S) and str "
                   "(U) dtypes%s are",
                   what, obj, allow_object ? ", and object arrays," : "");
        return 0;
    }
    return 1;
}

/* numpy.dtype(typestr, align, copy) as numpy pickles it: ('f8', False, True). */
static int dtype_new(PyObject *args, PyObject **out, ck_why *why) {
    if (PyTuple_GET_SIZE(args) != 3 || !PyUnicode_CheckExact(PyTuple_GET_ITEM(args, 0)))
        return ck_why_set(why, "numpy.dtype is decoded only as dtype(typestr, False, True)");
    PyObject *align = PyTuple_GET_ITEM(args, 1), *copy = PyTuple_GET_ITEM(args, 2);
    /* bools since numpy 1.x; ints 0/1 in old files */
    int align_ok = align == Py_False || (PyLong_CheckExact(align) && PyLong_AsLong(align) == 0);
    int copy_ok = copy == Py_True || (PyLong_CheckExact(copy) && PyLong_AsLong(copy) == 1);
    PyErr_Clear();
    if (!align_ok || !copy_ok)
        return ck_why_set(why, "numpy.dtype is decoded only as dtype(typestr, False, True)");
    Py_ssize_t n;
    const char *ts = PyUnicode_AsUTF8AndSize(PyTuple_GET_ITEM(args, 0), &n);
    if (ts == NULL)
        return CK_DATA_FAILED;
    /* a kind letter and a decimal size, nothing else */
    char kind = n > 0 ? ts[0] : 0;
    unsigned long long size = 0;
    int digits_ok = n >= 2 && n <= 11;
    for (Py_ssize_t i = 1; digits_ok && i < n; i++) {
        if (ts[i] < '0' || ts[i] > '9')
            digits_ok = 0;
        else
            size = size * 10 + (unsigned long long)(ts[i] - '0');
    }
    int size_ok = 0;
    if (digits_ok) {
        switch (kind) {
        case 'b':
            size_ok = size == 1;
            break;
        case 'i':
        case 'u':
            size_ok = size == 1 || size == 2 || size == 4 || size == 8;
            break;
        case 'f':
            size_ok = size == 2 || size == 4 || size == 8 || size == 12 || size == 16;
            break;
        case 'c':
            size_ok = size == 8 || size == 16 || size == 24 || size == 32;
            break;
        case 'O':
            size_ok = size == sizeof(void *);
            break;
        case 'U':
            size_ok = size <= ((unsigned long long)1 << 28); /* characters of 4 bytes */
            break;
        case 'S':
            size_ok = size <= ((unsigned long long)1 << 30);
            break;
        default:
            break;
        }
    }
    if (!size_ok)
        return ck_why_set(why,
                          "numpy dtype %R is not decoded: only bool, integer, float, complex, "
                          "bytes (S), str (U) and object dtypes are",
                          PyTuple_GET_ITEM(args, 0));
    PyArray_Descr *base = NULL;
    if (!PyArray_DescrConverter(PyTuple_GET_ITEM(args, 0), &base))
        return CK_DATA_FAILED;
    /* the size is a character count for U, bytes otherwise */
    unsigned long long want = kind == 'U' ? size * 4 : size;
    if (base->kind != kind || (unsigned long long)PyDataType_ELSIZE(base) != want ||
        !type_allowed(base->type_num, 1)) {
        Py_DECREF(base);
        return ck_why_set(why, "numpy dtype %R is not available in this numpy",
                          PyTuple_GET_ITEM(args, 0));
    }
    /* copy=True: a dtype of its own, so that BUILD may set its byte order */
    PyArray_Descr *d = PyArray_DescrNew(base);
    Py_DECREF(base);
    if (d == NULL)
        return CK_DATA_FAILED;
    *out = (PyObject *)d;
    return CK_DATA_DONE;
}

static int exact_int_in(PyObject *o, long lo, long hi, long *value) {
    if (!PyLong_CheckExact(o))
        return 0;
    int overflow = 0;
    long x = PyLong_AsLongAndOverflow(o, &overflow);
    if (overflow || (x == -1 && PyErr_Occurred())) {
        PyErr_Clear();
        return 0;
    }
    if (x < lo || x > hi)
        return 0;
    if (value != NULL)
        *value = x;
    return 1;
}

/* BUILD on a dtype: (3, endian, None, None, None, elsize, alignment, flags),
 * or version 4 with a ninth item, the metadata, None. Only the byte order
 * can change; everything else must agree with the dtype as it is. */
static int dtype_build(PyArray_Descr *d, PyObject *state, ck_why *why) {
    if (!descr_ok((PyObject *)d, 1, "BUILD target", why))
        return CK_DATA_REFUSED;
    Py_ssize_t n = PyTuple_CheckExact(state) ? PyTuple_GET_SIZE(state) : 0;
    long version = 0, elsize = 0, align = 0;
    if ((n != 8 && n != 9) || !exact_int_in(PyTuple_GET_ITEM(state, 0), 3, 4, &version) ||
        version != n - 5)
        return ck_why_set(why, "numpy dtype state must be numpy's version 3 (or 4) tuple");
    PyObject *endian = PyTuple_GET_ITEM(state, 1);
    Py_ssize_t elen = 0;
    const char *e = PyUnicode_CheckExact(endian) ? PyUnicode_AsUTF8AndSize(endian, &elen) : NULL;
    if (e == NULL || elen != 1 || strchr("<>=|", e[0]) == NULL) {
        PyErr_Clear();
        return ck_why_set(why, "numpy dtype state: the byte order must be one of < > = |");
    }
    for (Py_ssize_t i = 2; i < 5; i++)
        if (PyTuple_GET_ITEM(state, i) != Py_None)
            return ck_why_set(why, "numpy dtype state: structured and sub-array dtypes are not "
                                   "decoded (subarray, names and fields must be None)");
    if (n == 9 && PyTuple_GET_ITEM(state, 8) != Py_None)
        return ck_why_set(why, "numpy dtype state: dtypes with metadata are not decoded");
    if (!exact_int_in(PyTuple_GET_ITEM(state, 5), -1, LONG_MAX, &elsize) ||
        !exact_int_in(PyTuple_GET_ITEM(state, 6), -1, 64, &align) ||
        !exact_int_in(PyTuple_GET_ITEM(state, 7), 0, LONG_MAX, NULL))
        return ck_why_set(why, "numpy dtype state: elsize, alignment and flags must be small ints");
    if ((elsize != -1 && elsize != (long)PyDataType_ELSIZE(d)) ||
        (align != -1 && align != (long)PyDataType_ALIGNMENT(d)))
        return ck_why_set(why,
                          "numpy dtype state: elsize %ld / alignment %ld disagree with the "
                          "dtype",
                          elsize, align);
    char want = e[0] == CK_NATIVE ? '=' : e[0];
    if (d->byteorder == '|')
        return CK_DATA_DONE; /* byte order does not apply (bool, 1-byte ints, S, O) */
    if (want == '|')
        return ck_why_set(why, "numpy dtype state: byte order '|' for a multi-byte dtype");
    if (want == d->byteorder || (want == '=' && d->byteorder == CK_NATIVE))
        return CK_DATA_DONE;
    /* only the fresh copy dtype_new made may change, never numpy's shared one */
    PyArray_Descr *shared = PyArray_DescrFromType(d->type_num);
    int is_shared = shared == d;
    Py_XDECREF(shared);
    if (is_shared)
        return ck_why_set(why, "numpy dtype state: BUILD on a shared dtype");
    d->byteorder = want == '=' ? '=' : CK_SWAPPED;
    return CK_DATA_DONE;
}

/* ---- arrays ------------------------------------------------------------------ */

/* Exactly numpy's own _reconstruct(ndarray, (0,), b'b'): an empty array of
 * int8 to be filled by BUILD. */
static int reconstruct(ck_state *st, PyObject *args, PyObject **out, ck_why *why) {
    (void)st;
    if (PyTuple_GET_SIZE(args) != 3 || PyTuple_GET_ITEM(args, 0) != (PyObject *)&PyArray_Type)
        return ck_why_set(why, "_reconstruct is decoded only for numpy.ndarray itself");
    PyObject *shape = PyTuple_GET_ITEM(args, 1), *code = PyTuple_GET_ITEM(args, 2);
    long dim = -1;
    if (!PyTuple_CheckExact(shape) || PyTuple_GET_SIZE(shape) != 1 ||
        !exact_int_in(PyTuple_GET_ITEM(shape, 0), 0, 0, &dim))
        return ck_why_set(why, "_reconstruct is decoded only as numpy writes it: shape (0,)");
    int code_ok = (PyBytes_CheckExact(code) && PyBytes_GET_SIZE(code) == 1 &&
                   PyBytes_AS_STRING(code)[0] == 'b') ||
                  (PyUnicode_CheckExact(code) && PyUnicode_CompareWithASCIIString(code, "b") == 0);
    if (!code_ok)
        return ck_why_set(why, "_reconstruct is decoded only as numpy writes it: typecode b'b'");
    npy_intp zero = 0;
    *out = PyArray_NewFromDescr(&PyArray_Type, PyArray_DescrFromType(NPY_BYTE), 1, &zero, NULL,
                                NULL, 0, NULL);
    return *out == NULL ? CK_DATA_FAILED : CK_DATA_DONE;
}

/* Bytes of rawdata (exact bytes, or str from a Python 2 pickle, latin-1 as
 * numpy reads it): a new reference, or NULL (why filled, or an error). */
static PyObject *raw_bytes(PyObject *raw, int *rc, ck_why *why) {
    if (PyBytes_CheckExact(raw))
        return Py_NewRef(raw);
    if (PyUnicode_CheckExact(raw)) {
        PyObject *b = PyUnicode_AsLatin1String(raw);
        *rc = b == NULL ? CK_DATA_FAILED : CK_DATA_DONE;
        return b;
    }
    *rc = ck_why_set(why, "numpy data must be bytes, not %.80s", Py_TYPE(raw)->tp_name);
    return NULL;
}

/* BUILD on an ndarray: (1, shape, dtype, is_fortran, rawdata). */
static int array_build(ck_state *st, PyObject *arr, PyObject *state, ck_why *why) {
    if (!PyTuple_CheckExact(state) || PyTuple_GET_SIZE(state) != 5 ||
        !exact_int_in(PyTuple_GET_ITEM(state, 0), 1, 1, NULL))
        return ck_why_set(why, "numpy array state must be numpy's (1, shape, dtype, is_fortran, "
                               "data) tuple");
    PyObject *shape = PyTuple_GET_ITEM(state, 1), *descr = PyTuple_GET_ITEM(state, 2);
    PyObject *fortran = PyTuple_GET_ITEM(state, 3), *raw = PyTuple_GET_ITEM(state, 4);
    if (!PyTuple_CheckExact(shape) || PyTuple_GET_SIZE(shape) > CK_NP_MAXDIMS)
        return ck_why_set(why, "numpy array shape must be a tuple of at most %d ints",
                          CK_NP_MAXDIMS);
    if (!descr_ok(descr, 1, "numpy array dtype", why))
        return CK_DATA_REFUSED;
    if (fortran != Py_True && fortran != Py_False)
        return ck_why_set(why, "numpy array state: is_fortran must be a bool");
    PyArray_Descr *d = (PyArray_Descr *)descr;
    /* elements and bytes, each product overflow-checked; numpy's "too big"
     * rule: the product of the non-zero dimensions must fit */
    uint64_t count = 1, nonzero = 1;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(shape); i++) {
        long dim = 0;
        if (!exact_int_in(PyTuple_GET_ITEM(shape, i), 0, LONG_MAX, &dim))
            return ck_why_set(why, "numpy array shape must hold non-negative ints");
        if (dim != 0 && __builtin_mul_overflow(nonzero, (uint64_t)dim, &nonzero))
            return ck_why_set(why, "numpy array shape %R is too large", shape);
        count = dim == 0 ? 0 : count * (uint64_t)dim;
    }
    uint64_t itemsize = (uint64_t)PyDataType_ELSIZE(d), nbytes = 0, span = 0;
    if (__builtin_mul_overflow(nonzero, itemsize > 0 ? itemsize : 1, &span) ||
        span > (uint64_t)PY_SSIZE_T_MAX)
        return ck_why_set(why, "numpy array shape %R is too large", shape);
    nbytes = count * itemsize;
    PyObject *data;
    int rc = CK_DATA_DONE;
    if (d->type_num == NPY_OBJECT) {
        /* numpy reads exactly size items from the list without checking its length */
        if (!PyList_CheckExact(raw) || (uint64_t)PyList_GET_SIZE(raw) != count)
            return ck_why_set(why,
                              "numpy object array of %llu elements needs a list of exactly that "
                              "many",
                              (unsigned long long)count);
        data = Py_NewRef(raw);
    } else {
        data = raw_bytes(raw, &rc, why);
        if (data == NULL)
            return rc;
        if ((uint64_t)PyBytes_GET_SIZE(data) != nbytes) {
            Py_ssize_t have = PyBytes_GET_SIZE(data);
            Py_DECREF(data);
            return ck_why_set(why,
                              "numpy array of shape %R and dtype %R needs %llu bytes, the pickle "
                              "holds %zd",
                              shape, descr, (unsigned long long)nbytes, have);
        }
    }
    PyObject *version = PyLong_FromLong(1);
    PyObject *checked = version ? PyTuple_Pack(5, version, shape, descr, fortran, data) : NULL;
    Py_XDECREF(version);
    Py_DECREF(data);
    PyObject *r =
        checked ? PyObject_CallFunctionObjArgs(st->np_array_setstate, arr, checked, NULL) : NULL;
    Py_XDECREF(checked);
    if (r == NULL)
        return CK_DATA_FAILED;
    Py_DECREF(r);
    return CK_DATA_DONE;
}

/* ---- scalars ------------------------------------------------------------------ */

/* scalar(dtype, bytes): the numpy scalar of those bytes. */
static int scalar(PyObject *args, PyObject **out, ck_why *why) {
    if (PyTuple_GET_SIZE(args) != 2)
        return ck_why_set(why, "numpy scalar is decoded only as scalar(dtype, bytes)");
    PyObject *descr = PyTuple_GET_ITEM(args, 0);
    if (!descr_ok(descr, 0, "numpy scalar dtype", why))
        return CK_DATA_REFUSED;
    int rc = CK_DATA_DONE;
    PyObject *data = raw_bytes(PyTuple_GET_ITEM(args, 1), &rc, why);
    if (data == NULL)
        return rc;
    PyArray_Descr *d = (PyArray_Descr *)descr;
    if ((uint64_t)PyBytes_GET_SIZE(data) != (uint64_t)PyDataType_ELSIZE(d)) {
        Py_ssize_t have = PyBytes_GET_SIZE(data);
        Py_DECREF(data);
        return ck_why_set(why, "numpy scalar of dtype %R needs %zd bytes, the pickle holds %zd",
                          descr, (Py_ssize_t)PyDataType_ELSIZE(d), have);
    }
    *out = PyArray_Scalar(PyBytes_AS_STRING(data), d, NULL);
    Py_DECREF(data);
    return *out == NULL ? CK_DATA_FAILED : CK_DATA_DONE;
}

int ck_np_reduce(ck_session *s, PyObject *func, PyObject *args, PyObject **out, ck_why *why) {
    ck_state *st = s->st;
    if (func == (PyObject *)&PyArrayDescr_Type)
        return dtype_new(args, out, why);
    if (func == st->np_reconstruct)
        return reconstruct(st, args, out, why);
    if (func == st->np_scalar)
        return scalar(args, out, why);
    return CK_DATA_NO;
}

int ck_np_build(ck_session *s, PyObject *inst, PyObject *state, ck_why *why) {
    if (PyArray_DescrCheck(inst))
        return dtype_build((PyArray_Descr *)inst, state, why);
    if (PyArray_CheckExact(inst))
        return array_build(s->st, inst, state, why);
    return CK_DATA_NO;
}

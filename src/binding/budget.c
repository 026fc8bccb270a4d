#include "budget.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "errors.h"
#include "npy.h"

/* CPython's GC header, in front of every container */
#define GC_HEAD 16
/* objects torch allocates outside Python's allocator: a tensor's TensorImpl
 * and StorageImpl, a TypedStorage's wrapper and __dict__ */
#define TORCH_OBJECT 512
/* the largest element of any dtype (complex128) */
#define MAX_ELSIZE 16

/* ---- the budget ------------------------------------------------------- */

void ck_budget_begin(ck_session *s) {
    uint64_t floor = s->weights_only ? CK_BUDGET_FLOOR : CK_BUDGET_FLOOR_TRUSTED;
    uint64_t total;
    if (__builtin_mul_overflow((uint64_t)s->len, (uint64_t)CK_BUDGET_RATIO, &total) ||
        __builtin_add_overflow(total, floor, &total))
        total = UINT64_MAX;
    s->budget_total = total;
    s->budget_left = total;
}

int ck_charge(ck_session *s, uint64_t bytes) {
    if (bytes > s->budget_left) {
        s->budget_left = 0;
        return -1;
    }
    s->budget_left -= bytes;
    return 0;
}

PyObject *ck_raise_over_budget(ck_session *s, const char *where) {
    return ck_raise(
        s->st->CheckpointError, s->filename,
        "%s%sloading would allocate more than %llu bytes, the bound for a file of "
        "%zu bytes (%d x its size + %llu MiB): no checkpoint needs that much",
        where ? where : "", where ? ": " : "", (unsigned long long)s->budget_total, s->len,
        CK_BUDGET_RATIO,
        (unsigned long long)((s->weights_only ? CK_BUDGET_FLOOR : CK_BUDGET_FLOOR_TRUSTED) >> 20));
}

/* ---- what objects cost ------------------------------------------------ */

static int is_shared_singleton(PyObject *o) {
    if (o == Py_None || o == Py_True || o == Py_False || o == Py_Ellipsis || o == Py_NotImplemented)
        return 1;
    if (PyLong_CheckExact(o)) {
        int overflow = 0;
        long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
        return !overflow && v >= -5 && v <= 256;
    }
    return PyTuple_CheckExact(o) && PyTuple_GET_SIZE(o) == 0;
}

uint64_t ck_item_cost(PyObject *target) {
    if (PyList_Check(target))
        return 16; /* a slot and its share of over-allocation */
    if (PyDict_CheckExact(target))
        return 72; /* entry, index and the table's growth */
    if (PyDict_Check(target))
        return 104; /* OrderedDict: also its node */
    if (PyAnySet_Check(target))
        return 128; /* sets keep at most 60% of 16-byte slots, grow 4x */
    return 64;
}

uint64_t ck_object_cost(ck_state *st, PyObject *o) {
    if (is_shared_singleton(o))
        return 0;
    PyTypeObject *t = Py_TYPE(o);
    if (PyUnicode_Check(o))
        return 64 + (uint64_t)PyUnicode_GET_LENGTH(o) * (uint64_t)PyUnicode_KIND(o);
    if (PyBytes_Check(o))
        return 40 + (uint64_t)PyBytes_GET_SIZE(o);
    if (PyByteArray_Check(o))
        return 64 + (uint64_t)PyByteArray_GET_SIZE(o);
    if (PyLong_Check(o) || PyFloat_Check(o) || PyComplex_Check(o))
        return 32; /* digits of big ints are charged where they are read */
    uint64_t n = (uint64_t)t->tp_basicsize;
    if (t->tp_itemsize != 0)
        n += (uint64_t)t->tp_itemsize * (uint64_t)(Py_SIZE(o) < 0 ? -Py_SIZE(o) : Py_SIZE(o));
    if (PyType_IS_GC(t))
        n += GC_HEAD;
    if (PyList_Check(o))
        n += 16 * (uint64_t)PyList_GET_SIZE(o);
    else if (PyDict_Check(o))
        n += ck_item_cost(o) * (uint64_t)PyDict_GET_SIZE(o);
    else if (PyAnySet_Check(o))
        n += 128 * (uint64_t)PySet_GET_SIZE(o);
    if (t->tp_dictoffset != 0)
        n += 104; /* an instance __dict__ */
    if (st->Tensor != NULL && PyObject_TypeCheck(o, (PyTypeObject *)st->Tensor))
        n += TORCH_OBJECT;
    return n;
}

/* ---- keys whose hashes a file can choose ------------------------------- */

static int collidable(PyObject *k) {
    if (PyTuple_Check(k) || PyFrozenSet_Check(k) || PyComplex_Check(k))
        return 1;
    if (PyLong_Check(k)) {
        int overflow = 0;
        long long v = PyLong_AsLongLongAndOverflow(k, &overflow);
        const long long lim = ((long long)1 << 61) - 2; /* hash(n) == n below this */
        return overflow || v > lim || v < -lim;
    }
    return 0;
}

static int too_many_keys(ck_session *s) {
    ck_raise(s->st->CheckpointError, s->filename,
             "more than %d dict keys or set items are tuples, frozensets, complex numbers or "
             "ints beyond 61 bits: their hashes can be made to collide (each insertion would "
             "compare with all the others), and a checkpoint does not need so many",
             CK_MAX_COLLIDABLE_KEYS);
    return -1;
}

int ck_count_keys(ck_session *s, PyObject *const *items, Py_ssize_t n, Py_ssize_t step) {
    if (!s->weights_only)
        return 0;
    for (Py_ssize_t i = 0; i < n; i += step)
        if (collidable(items[i]) && ++s->collidable_keys > CK_MAX_COLLIDABLE_KEYS)
            return too_many_keys(s);
    return 0;
}

int ck_count_keys_of(ck_session *s, PyObject *c, int pairs) {
    if (!s->weights_only)
        return 0;
    if (PyDict_Check(c)) {
        Py_ssize_t pos = 0;
        PyObject *k, *v;
        while (PyDict_Next(c, &pos, &k, &v))
            if (collidable(k) && ++s->collidable_keys > CK_MAX_COLLIDABLE_KEYS)
                return too_many_keys(s);
        return 0;
    }
    if (PyAnySet_Check(c)) {
        PyObject *it = PyObject_GetIter(c), *k;
        if (it == NULL)
            return -1;
        int rc = 0;
        while (rc == 0 && (k = PyIter_Next(it)) != NULL) {
            if (collidable(k) && ++s->collidable_keys > CK_MAX_COLLIDABLE_KEYS)
                rc = too_many_keys(s);
            Py_DECREF(k);
        }
        Py_DECREF(it);
        return rc < 0 || PyErr_Occurred() ? -1 : 0;
    }
    if (!PyList_Check(c) && !PyTuple_Check(c))
        return 0;
    PyObject *fast = PySequence_Fast(c, "");
    if (fast == NULL)
        return -1;
    int rc = 0;
    for (Py_ssize_t i = 0; rc == 0 && i < PySequence_Fast_GET_SIZE(fast); i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(fast, i);
        if (pairs && PyTuple_Check(item) && PyTuple_GET_SIZE(item) == 2)
            item = PyTuple_GET_ITEM(item, 0);
        if (collidable(item) && ++s->collidable_keys > CK_MAX_COLLIDABLE_KEYS)
            rc = too_many_keys(s);
    }
    Py_DECREF(fast);
    return rc;
}

/* ---- builders -------------------------------------------------------- */

/* How a builder's allocation follows from its arguments. */
enum policy {
    P_FREE = 1,     /* allocates what its result costs (charged after the call) */
    P_ITERATE,      /* set, frozenset, Counter, OrderedDict, torch.Size: iterates args[0] */
    P_BYTEARRAY,    /* bytearray(n | data) */
    P_TEXT,         /* complex(str), torch.device(str): parses its text */
    P_ENCODE,       /* _codecs.encode(obj, codec): output up to 10 bytes per input unit */
    P_SIZED,        /* legacy tensor and storage constructors: ints are sizes */
    P_FROM_CPU,     /* _rebuild_device_tensor_from_cpu_tensor(data, dtype, device, rg) */
    P_FROM_NUMPY,   /* _rebuild_device_tensor_from_numpy(data, dtype, device, rg) */
    P_QTENSOR,      /* _rebuild_qtensor(storage, offset, size, stride, qparams, ...) */
    P_TENSORS,      /* sparse and nested rebuilds: copy or check their tensors */
    P_FROM_TYPE_V2, /* _rebuild_from_type_v2(func, type, args, state): func(*args) */
    P_NEW_IS_EMPTY, /* set, Counter, OrderedDict, bytearray: __new__ makes an empty one */
};

static const struct {
    const char *name;
    int policy;
} torch_builders[] = {
    {"builtins.set", P_ITERATE},
    {"builtins.frozenset", P_ITERATE},
    {"collections.Counter", P_ITERATE},
    {"collections.OrderedDict", P_ITERATE},
    {"torch.Size", P_ITERATE},
    {"builtins.bytearray", P_BYTEARRAY},
    {"builtins.complex", P_TEXT},
    {"torch.device", P_TEXT},
    {"torch.serialization._get_layout", P_TEXT},
    {"_codecs.encode", P_ENCODE},
    {"torch._utils._rebuild_device_tensor_from_cpu_tensor", P_FROM_CPU},
    {"torch._utils._rebuild_device_tensor_from_numpy", P_FROM_NUMPY},
    {"torch._utils._rebuild_xla_tensor", P_FROM_NUMPY},
    {"torch._utils._rebuild_qtensor", P_QTENSOR},
    {"torch._utils._rebuild_sparse_tensor", P_TENSORS},
    {"torch._utils._rebuild_nested_tensor", P_TENSORS},
    {"torch._tensor._rebuild_from_type_v2", P_FROM_TYPE_V2},
    /* over storages and tensors already built: no allocation of their own */
    {"torch._utils._rebuild_tensor", P_FREE},
    {"torch._utils._rebuild_tensor_v2", P_FREE},
    {"torch._utils._rebuild_tensor_v3", P_FREE},
    {"torch._utils._rebuild_parameter", P_FREE},
    {"torch._utils._rebuild_parameter_with_state", P_FREE},
    {"torch._utils._rebuild_meta_tensor_no_storage", P_FREE}, /* meta: no bytes */
    {"torch._utils._rebuild_wrapper_subclass", P_FREE},       /* no storage */
    {"torch.nn.parameter.Parameter", P_FREE},
};

int ck_budget_configure(ck_state *st) {
    Py_XSETREF(st->builder_policy, PyDict_New());
    if (st->builder_policy == NULL)
        return -1;
    for (size_t i = 0; i < sizeof torch_builders / sizeof torch_builders[0]; i++) {
        PyObject *obj = PyDict_GetItemString(st->allowed, torch_builders[i].name);
        if (obj == NULL) {
            /* builtins that are not on torch's list (frozenset): by identity */
            if (strcmp(torch_builders[i].name, "builtins.frozenset") == 0)
                obj = (PyObject *)&PyFrozenSet_Type;
            else
                continue; /* this torch lacks it */
        }
        PyObject *id = PyLong_FromVoidPtr(obj);
        PyObject *code = PyLong_FromLong(torch_builders[i].policy);
        int rc = id && code ? PyDict_SetItem(st->builder_policy, id, code) : -1;
        Py_XDECREF(id);
        Py_XDECREF(code);
        if (rc < 0)
            return -1;
    }
    /* the legacy tensor types (torch.FloatTensor, torch.cuda.*, torch.sparse.*)
     * are instances of one metaclass, torch.tensortype, and no subclasses of
     * torch.Tensor: known by their metaclass */
    PyObject *legacy = PyDict_GetItemString(st->allowed, "torch.FloatTensor");
    if (legacy != NULL && PyType_Check(legacy) && Py_TYPE(legacy) != &PyType_Type) {
        PyObject *id = PyLong_FromVoidPtr((PyObject *)Py_TYPE(legacy));
        PyObject *code = PyLong_FromLong(P_SIZED);
        int rc = id && code ? PyDict_SetItem(st->builder_policy, id, code) : -1;
        Py_XDECREF(id);
        Py_XDECREF(code);
        if (rc < 0)
            return -1;
    }
    return 0;
}

static int lookup_policy(ck_state *st, PyObject *obj) {
    PyObject *id = PyLong_FromVoidPtr(obj);
    if (id == NULL)
        return -1;
    PyObject *code = PyDict_GetItemWithError(st->builder_policy, id);
    Py_DECREF(id);
    if (code == NULL)
        return PyErr_Occurred() ? -1 : 0;
    return (int)PyLong_AsLong(code);
}

static int policy_of(ck_state *st, PyObject *func, int newobj) {
    int p = lookup_policy(st, func);
    if (p == 0 && PyType_Check(func) && Py_TYPE(func) != &PyType_Type)
        p = lookup_policy(st, (PyObject *)Py_TYPE(func)); /* a legacy tensor type */
    if (p < 0)
        return -1;
    if (p == 0 && PyType_Check(func)) {
        /* torch.Tensor, the legacy tensor types (torch.FloatTensor, ...),
         * TypedStorage, UntypedStorage and their subclasses: sizes in ints */
        PyTypeObject *t = (PyTypeObject *)func;
        if ((st->Tensor && PyType_IsSubtype(t, (PyTypeObject *)st->Tensor) &&
             func != st->Parameter) ||
            (st->TypedStorage && PyType_IsSubtype(t, (PyTypeObject *)st->TypedStorage)) ||
            (st->UntypedStorage && PyType_IsSubtype(t, (PyTypeObject *)st->UntypedStorage)))
            p = P_SIZED;
        else if (t == &PyByteArray_Type)
            p = P_BYTEARRAY;
    }
    if (newobj && (func == (PyObject *)&PySet_Type || func == st->Counter ||
                   func == st->OrderedDict || func == (PyObject *)&PyByteArray_Type))
        p = P_NEW_IS_EMPTY;
    return p;
}

static int refuse_call(ck_session *s, PyObject *func, const char *fmt, ...) {
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    const char *name = PyType_Check(func) ? ((PyTypeObject *)func)->tp_name : NULL;
    PyObject *qual = name == NULL ? PyObject_GetAttrString(func, "__qualname__") : NULL;
    if (qual == NULL)
        PyErr_Clear();
    const char *q = qual != NULL && PyUnicode_Check(qual) ? PyUnicode_AsUTF8(qual) : NULL;
    if (q == NULL)
        PyErr_Clear();
    ck_raise(s->st->CheckpointError, s->filename, "%s(): %s",
             name ? name
             : q  ? q
                  : "a builder",
             msg);
    Py_XDECREF(qual);
    return -1;
}

static int over(ck_session *s, PyObject *func, uint64_t bytes, const char *what) {
    char amount[64];
    if (bytes == UINT64_MAX)
        snprintf(amount, sizeof amount, "more than 2**64");
    else
        snprintf(amount, sizeof amount, "%llu", (unsigned long long)bytes);
    return refuse_call(
        s, func,
        "%s would allocate %s bytes, more than the %llu left of the bound for "
        "this file (%d x its %zu bytes + %llu MiB)",
        what, amount, (unsigned long long)s->budget_left, CK_BUDGET_RATIO, s->len,
        (unsigned long long)((s->weights_only ? CK_BUDGET_FLOOR : CK_BUDGET_FLOOR_TRUSTED) >> 20));
}

static int take(ck_session *s, PyObject *func, uint64_t bytes, const char *what) {
    uint64_t left = s->budget_left;
    if (ck_charge(s, bytes) == 0)
        return 0;
    s->budget_left = left; /* say what was left */
    over(s, func, bytes, what);
    s->budget_left = 0;
    return -1;
}

/* Data the pickle made: iterating it is bounded by its length. */
static int is_data(PyObject *o) {
    return PyUnicode_Check(o) || PyBytes_Check(o) || PyByteArray_Check(o) || PyTuple_Check(o) ||
           PyList_Check(o) || PyDict_Check(o) || PyAnySet_Check(o);
}

static int is_tensor(ck_state *st, PyObject *o) {
    return st->Tensor != NULL && PyObject_TypeCheck(o, (PyTypeObject *)st->Tensor);
}

/* Elements of a tensor (numel()) times elsize (or its own element_size()
 * when elsize is 0), without overflow; -1 with an exception. */
static int tensor_bytes(PyObject *t, uint64_t elsize, uint64_t *out) {
    PyObject *n = PyObject_CallMethod(t, "numel", NULL);
    if (n == NULL)
        return -1;
    unsigned long long numel = PyLong_AsUnsignedLongLong(n);
    Py_DECREF(n);
    if (numel == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    if (elsize == 0) {
        PyObject *e = PyObject_CallMethod(t, "element_size", NULL);
        if (e == NULL)
            return -1;
        elsize = PyLong_AsUnsignedLongLong(e);
        Py_DECREF(e);
        if (elsize == (uint64_t)-1 && PyErr_Occurred())
            return -1;
    }
    if (__builtin_mul_overflow((uint64_t)numel, elsize, out))
        *out = UINT64_MAX;
    return 0;
}

static uint64_t elsize_of_dtype(ck_state *st, PyObject *dtype) {
    PyObject *code = PyDict_GetItemWithError(st->dtype_code, dtype);
    if (code == NULL) {
        PyErr_Clear();
        return MAX_ELSIZE;
    }
    long c = PyLong_AsLong(code);
    int e = c >= 0 && c < CK_DT_COUNT ? st->dtypes[c].elsize : 0;
    return e > 0 ? (uint64_t)e : MAX_ELSIZE;
}

/* The product of the ints among items (a size), without overflow. */
static int size_product(PyObject *seq, uint64_t *prod, int *any) {
    PyObject *fast = PySequence_Fast(seq, "");
    if (fast == NULL) {
        PyErr_Clear();
        return 0;
    }
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(fast); i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(fast, i);
        if (!PyLong_Check(item))
            continue;
        unsigned long long v = PyLong_AsUnsignedLongLong(item);
        if (v == (unsigned long long)-1 && PyErr_Occurred()) {
            PyErr_Clear(); /* negative or huge: the constructor refuses it */
            continue;
        }
        *any = 1;
        if (__builtin_mul_overflow(*prod, (uint64_t)v, prod))
            *prod = UINT64_MAX;
    }
    Py_DECREF(fast);
    return 0;
}

/* The tensors (and NumPy arrays) among args[0..8) and their tuple items. */
static int tensors_in(ck_session *s, PyObject *func, PyObject *args, int level, uint64_t *sum) {
    Py_ssize_t n = PyTuple_GET_SIZE(args);
    for (Py_ssize_t i = 0; i < n && i < 8; i++) {
        PyObject *a = PyTuple_GET_ITEM(args, i);
        uint64_t b = 0;
        if (is_tensor(s->st, a)) {
            if (tensor_bytes(a, 0, &b) < 0)
                return -1;
        } else if (PyArray_Check(a)) {
            b = (uint64_t)PyArray_NBYTES((PyArrayObject *)a);
        } else if (PyTuple_Check(a) && level == 0) {
            if (tensors_in(s, func, a, 1, &b) < 0)
                return -1;
        }
        if (__builtin_add_overflow(*sum, b, sum))
            *sum = UINT64_MAX;
    }
    return 0;
}

static int charge_call(ck_session *s, PyObject *func, PyObject *args, PyObject *kwargs, int newobj,
                       int level) {
    ck_state *st = s->st;
    if (!s->weights_only)
        return 0; /* a trusted file runs its own globals: nothing to bound */
    int p = policy_of(st, func, newobj);
    if (p < 0)
        return -1;
    Py_ssize_t n = PyTuple_GET_SIZE(args);
    PyObject *a0 = n > 0 ? PyTuple_GET_ITEM(args, 0) : NULL;
    uint64_t bytes = 0;
    switch (p) {
    case P_FREE:
    case P_NEW_IS_EMPTY:
        return 0;
    case P_ITERATE:
    case P_BYTEARRAY: {
        if (p == P_BYTEARRAY && a0 != NULL && PyLong_Check(a0)) {
            unsigned long long v = PyLong_AsUnsignedLongLong(a0);
            if (v == (unsigned long long)-1 && PyErr_Occurred()) {
                PyErr_Clear();
                return 0; /* negative: bytearray refuses it */
            }
            return take(s, func, (uint64_t)v, "a bytearray of that size");
        }
        if (a0 == NULL)
            return 0;
        if (!is_data(a0))
            return refuse_call(s, func,
                               "weights-only load passes it only data the pickle made (str, "
                               "bytes, tuple, list, dict, set), not a %.80s, which it would "
                               "iterate element by element",
                               Py_TYPE(a0)->tp_name);
        Py_ssize_t len = PyObject_Length(a0);
        if (len < 0)
            return -1;
        if (kwargs != NULL)
            len += PyDict_GET_SIZE(kwargs);
        uint64_t per = p == P_BYTEARRAY ? (PyUnicode_Check(a0) ? 4 : 1) : 128;
        if (take(s, func, per * (uint64_t)len, "iterating its argument") < 0)
            return -1;
        if (func == (PyObject *)&PySet_Type || func == (PyObject *)&PyFrozenSet_Type ||
            func == st->Counter || func == st->OrderedDict) /* they hash what they take */
            return ck_count_keys_of(s, a0, func == st->OrderedDict);
        return 0;
    }
    case P_ENCODE: {
        /* charged before the call: the result is charged again as an object
         * after it, but without this a chain encode(encode(x, 'hex'), 'hex')
         * would allocate twice what was left before the charge failed. 10
         * bytes per character or byte covers every codec of CPython
         * ('unicode_escape' writes a character as '\\U0010ffff', 'hex' 2,
         * 'quopri' 3, 'latin1' 1, which numpy arrays in protocol-2 pickles use) */
        PyObject *x = a0;
        uint64_t len = 0;
        if (x != NULL && PyUnicode_Check(x))
            len = (uint64_t)PyUnicode_GET_LENGTH(x);
        else if (x != NULL && PyBytes_Check(x))
            len = (uint64_t)PyBytes_GET_SIZE(x);
        else if (x != NULL && PyByteArray_Check(x))
            len = (uint64_t)PyByteArray_GET_SIZE(x);
        return take(s, func, 10 * len, "encoding its argument");
    }
    case P_TEXT:
        for (Py_ssize_t i = 0; i < n; i++)
            if (PyUnicode_Check(PyTuple_GET_ITEM(args, i)))
                bytes += 4 * (uint64_t)PyUnicode_GET_LENGTH(PyTuple_GET_ITEM(args, i));
        return take(s, func, bytes, "parsing its text");
    case P_SIZED: {
        uint64_t prod = 1, seq = 0;
        int any = 0;
        if (size_product(args, &prod, &any) < 0)
            return -1;
        for (Py_ssize_t i = 0; i < n; i++) {
            PyObject *a = PyTuple_GET_ITEM(args, i);
            if (PyTuple_Check(a) && PyTuple_GET_SIZE(a) > 0 &&
                PyLong_Check(PyTuple_GET_ITEM(a, 0))) {
                if (size_product(a, &prod, &any) < 0)
                    return -1;
            } else if (is_data(a)) {
                Py_ssize_t len = PyObject_Length(a);
                if (len < 0)
                    return -1;
                seq += (uint64_t)len;
            } else if (is_tensor(st, a)) {
                uint64_t b;
                if (tensor_bytes(a, 0, &b) < 0)
                    return -1;
                seq += b;
            }
        }
        if (any && __builtin_mul_overflow(prod, (uint64_t)MAX_ELSIZE, &bytes))
            bytes = UINT64_MAX;
        if (!any)
            bytes = 0;
        if (__builtin_add_overflow(bytes, seq * MAX_ELSIZE, &bytes))
            bytes = UINT64_MAX;
        return take(s, func, bytes, "a tensor or storage of that size");
    }
    case P_FROM_CPU:
    case P_FROM_NUMPY: {
        if (n < 2)
            return 0; /* torch raises */
        uint64_t el = elsize_of_dtype(st, PyTuple_GET_ITEM(args, 1));
        if (p == P_FROM_CPU && is_tensor(st, a0)) {
            if (tensor_bytes(a0, el, &bytes) < 0)
                return -1;
        } else if (p == P_FROM_NUMPY && PyArray_Check(a0)) {
            if (__builtin_mul_overflow((uint64_t)PyArray_SIZE((PyArrayObject *)a0), el, &bytes))
                bytes = UINT64_MAX;
        }
        return take(s, func, bytes, "copying its tensor (every element, also of a stride-0 view)");
    }
    case P_QTENSOR: {
        uint64_t prod = 1;
        int any = 0;
        if (n >= 3 && size_product(PyTuple_GET_ITEM(args, 2), &prod, &any) < 0)
            return -1;
        if (any && __builtin_mul_overflow(prod, (uint64_t)4, &bytes))
            bytes = UINT64_MAX;
        uint64_t q = 0;
        if (n >= 5 && PyTuple_Check(PyTuple_GET_ITEM(args, 4)) &&
            tensors_in(s, func, PyTuple_GET_ITEM(args, 4), 1, &q) < 0)
            return -1;
        if (__builtin_add_overflow(bytes, q, &bytes))
            bytes = UINT64_MAX;
        return take(s, func, bytes, "a quantized tensor of that size");
    }
    case P_FROM_TYPE_V2: {
        if (n != 4 || !PyTuple_Check(PyTuple_GET_ITEM(args, 2)))
            return 0; /* torch raises */
        if (level >= 8)
            return refuse_call(s, func, "nested more than 8 deep");
        return charge_call(s, a0, PyTuple_GET_ITEM(args, 2), NULL, 0, level + 1);
    }
    case P_TENSORS:
    default: /* any other allowlisted callable: by the tensors it is given */
        if (tensors_in(s, func, args, 0, &bytes) < 0)
            return -1;
        return take(s, func, bytes, "the elements of its tensors");
    }
}

int ck_charge_call(ck_session *s, PyObject *func, PyObject *args, PyObject *kwargs, int newobj) {
    return charge_call(s, func, args, kwargs, newobj, 0);
}

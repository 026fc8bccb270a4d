#include "unpickler.h"

#include <stdarg.h>
#include <string.h>

#include "budget.h"
#include "dataset.h"
#include "errors.h"
#include "globals.h"
#include "tensors.h"

/* The opcodes (CPython Lib/pickle.py), each with the call that loads it: this
 * one list makes the enum, op_name() and dispatch(). */
#define CK_OPCODES(X)                                                                              \
    X(MARK, '(', load_mark(v))                                                                     \
    X(STOP, '.', load_stop(v))                                                                     \
    X(POP, '0', load_pop(v))                                                                       \
    X(POP_MARK, '1', load_pop_mark(v))                                                             \
    X(DUP, '2', load_dup(v))                                                                       \
    X(FLOAT, 'F', load_float(v))                                                                   \
    X(INT, 'I', load_text_int(v, 0))                                                               \
    X(BININT, 'J', load_binint(v, 4))                                                              \
    X(BININT1, 'K', load_binint(v, 1))                                                             \
    X(LONG, 'L', load_text_int(v, 1))                                                              \
    X(BININT2, 'M', load_binint(v, 2))                                                             \
    X(NONE, 'N', load_const(v, Py_None))                                                           \
    X(PERSID, 'P', load_persid(v))                                                                 \
    X(BINPERSID, 'Q', load_binpersid(v))                                                           \
    X(REDUCE, 'R', do_reduce(v))                                                                   \
    X(STRING, 'S', load_quoted_string(v))                                                          \
    X(BINSTRING, 'T', load_counted_string(v, 4))                                                   \
    X(SHORT_BINSTRING, 'U', load_counted_string(v, 1))                                             \
    X(UNICODE, 'V', load_raw_unicode(v))                                                           \
    X(BINUNICODE, 'X', load_counted_unicode(v, 4))                                                 \
    X(APPEND, 'a', load_append(v))                                                                 \
    X(BUILD, 'b', do_build(v))                                                                     \
    X(GLOBAL, 'c', load_global(v))                                                                 \
    X(DICT, 'd', load_dict(v))                                                                     \
    X(EMPTY_DICT, '}', load_empty(v, PyDict_New()))                                                \
    X(APPENDS, 'e', load_marked_items(v, append_items))                                            \
    X(GET, 'g', load_get(v, 0))                                                                    \
    X(BINGET, 'h', load_get(v, 1))                                                                 \
    X(INST, 'i', load_inst(v))                                                                     \
    X(LONG_BINGET, 'j', load_get(v, 4))                                                            \
    X(LIST, 'l', load_list(v))                                                                     \
    X(EMPTY_LIST, ']', load_empty(v, PyList_New(0)))                                               \
    X(OBJ, 'o', load_obj(v))                                                                       \
    X(PUT, 'p', load_put(v, 0))                                                                    \
    X(BINPUT, 'q', load_put(v, 1))                                                                 \
    X(LONG_BINPUT, 'r', load_put(v, 4))                                                            \
    X(SETITEM, 's', load_setitem(v))                                                               \
    X(TUPLE, 't', load_tuple(v))                                                                   \
    X(EMPTY_TUPLE, ')', load_empty(v, PyTuple_New(0)))                                             \
    X(SETITEMS, 'u', load_marked_items(v, set_items))                                              \
    X(BINFLOAT, 'G', load_binfloat(v))                                                             \
    X(PROTO, 0x80, load_proto(v))                                                                  \
    X(NEWOBJ, 0x81, do_newobj(v, 0))                                                               \
    X(EXT1, 0x82, load_ext(v, 1))                                                                  \
    X(EXT2, 0x83, load_ext(v, 2))                                                                  \
    X(EXT4, 0x84, load_ext(v, 4))                                                                  \
    X(TUPLE1, 0x85, load_tuple_n(v, 1))                                                            \
    X(TUPLE2, 0x86, load_tuple_n(v, 2))                                                            \
    X(TUPLE3, 0x87, load_tuple_n(v, 3))                                                            \
    X(NEWTRUE, 0x88, load_const(v, Py_True))                                                       \
    X(NEWFALSE, 0x89, load_const(v, Py_False))                                                     \
    X(LONG1, 0x8a, load_binlong(v, 1))                                                             \
    X(LONG4, 0x8b, load_binlong(v, 4))                                                             \
    X(BINBYTES, 'B', load_counted_bytes(v, 4, PyBytes_FromStringAndSize))                          \
    X(SHORT_BINBYTES, 'C', load_counted_bytes(v, 1, PyBytes_FromStringAndSize))                    \
    X(SHORT_BINUNICODE, 0x8c, load_counted_unicode(v, 1))                                          \
    X(BINUNICODE8, 0x8d, load_counted_unicode(v, 8))                                               \
    X(BINBYTES8, 0x8e, load_counted_bytes(v, 8, PyBytes_FromStringAndSize))                        \
    X(EMPTY_SET, 0x8f, load_empty(v, PySet_New(NULL)))                                             \
    X(ADDITEMS, 0x90, load_marked_items(v, add_items))                                             \
    X(FROZENSET, 0x91, load_frozenset(v))                                                          \
    X(NEWOBJ_EX, 0x92, do_newobj(v, 1))                                                            \
    X(STACK_GLOBAL, 0x93, load_stack_global(v))                                                    \
    X(MEMOIZE, 0x94, load_memoize(v))                                                              \
    X(FRAME, 0x95, load_frame(v))                                                                  \
    X(BYTEARRAY8, 0x96, load_counted_bytes(v, 8, PyByteArray_FromStringAndSize))                   \
    X(NEXT_BUFFER, 0x97, load_buffer(v))                                                           \
    X(READONLY_BUFFER, 0x98, load_buffer(v))

enum {
#define X(name, code, call) OP_##name = code,
    CK_OPCODES(X)
#undef X
};

static const char *op_name(uint8_t op) {
    switch (op) {
#define X(name, code, call)                                                                        \
    case OP_##name:                                                                                \
        return #name;
        CK_OPCODES(X)
#undef X
    default:
        return "unknown opcode";
    }
}

typedef struct vm {
    ck_session *s;
    ck_state *st;
    const uint8_t *start;
    const uint8_t *p;
    const uint8_t *end;
    const char *what;
    PyObject **stack;
    uint32_t *depth; /* per stack slot: how deep the object nests (CK_MAX_DEPTH) */
    Py_ssize_t sp;
    Py_ssize_t scap;
    Py_ssize_t *marks;
    Py_ssize_t mp;
    Py_ssize_t mcap;
    PyObject **memo; /* dense part: indices < memo_cap */
    uint32_t *memo_depth;
    size_t memo_cap;
    size_t memo_limit;     /* the dense part never grows past this */
    size_t memo_count;     /* live entries, dense and sparse (MEMOIZE's next index) */
    PyObject *memo_sparse; /* dict int -> (object, depth) for indices >= memo_limit */
    int proto;
    uint8_t op;
    size_t op_pos;
    /* scan mode: nothing is called or resolved (globals other than storage
     * types become None); persistent ids are collected into `pids` */
    int scan;
    PyObject *pids;
    PyObject *result; /* STOP's object, for run() */
} vm;

/* ---- errors ------------------------------------------------------------ */

static void context(vm *v, char *buf, size_t n) {
    snprintf(buf, n, "%s at byte %zu (%s)", v->what, v->op_pos, op_name(v->op));
}

/* Raises exc with "<file>: <pickle> at byte N (OP): <message>". */
static int fail(vm *v, PyObject *exc, const char *fmt, ...) {
    char ctx[128], msg[768];
    context(v, ctx, sizeof ctx);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    ck_raise(exc, v->s->filename, "%s: %s", ctx, msg);
    return -1;
}

/* A Python call made for the pickle failed: under weights_only the error
 * becomes a CheckpointError naming the place (the original is its cause);
 * otherwise, as torch does, the original propagates, with a note. */
static int fail_call(vm *v) {
    char ctx[128];
    context(v, ctx, sizeof ctx);
    if (v->s->weights_only)
        ck_wrap_pending(v->st, v->st->CheckpointError, v->s->filename, ctx);
    else
        ck_note_pending(v->st, v->s->filename, ctx);
    return -1;
}

static int truncated(vm *v) {
    return fail(v, v->st->CheckpointError, "the pickle ends before its STOP opcode (truncated)");
}

static int underflow(vm *v) {
    return fail(v, v->st->UnpicklingError, "stack underflow");
}

/* Takes bytes from the load's memory budget (budget.h), or fails. */
static int charge(vm *v, uint64_t bytes) {
    if (ck_charge(v->s, bytes) == 0)
        return 0;
    char ctx[128];
    context(v, ctx, sizeof ctx);
    ck_raise_over_budget(v->s, ctx);
    return -1;
}

/* ---- stacks ------------------------------------------------------------ */

static int grow(void **arr, Py_ssize_t *cap, size_t item) {
    Py_ssize_t ncap = *cap ? *cap * 2 : 64;
    if ((size_t)ncap > PY_SSIZE_T_MAX / item) {
        PyErr_NoMemory();
        return -1;
    }
    void *n = PyMem_Realloc(*arr, (size_t)ncap * item);
    if (n == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    *arr = n;
    *cap = ncap;
    return 0;
}

static int grow_stack(vm *v) {
    Py_ssize_t cap = v->scap;
    if (charge(v, (uint64_t)(cap ? cap : 64) * (sizeof(PyObject *) + sizeof(uint32_t))) < 0 ||
        grow((void **)&v->stack, &cap, sizeof(PyObject *)) < 0)
        return -1;
    uint32_t *d = PyMem_Realloc(v->depth, (size_t)cap * sizeof(uint32_t));
    if (d == NULL) {
        PyErr_NoMemory();
        return -1; /* the larger stack is kept; scap still says the old size */
    }
    v->depth = d;
    v->scap = cap;
    return 0;
}

static int too_deep(vm *v) {
    return fail(v, v->st->CheckpointError,
                "objects nest more than %d levels deep (a checkpoint never does; CPython "
                "would recurse in C over them)",
                CK_MAX_DEPTH);
}

/* Pushes o (a new reference, stolen) nesting `depth` levels deep. o == NULL
 * means the call that made it failed: the error is passed on. */
static inline int push_d(vm *v, PyObject *o, uint32_t depth) {
    if (o == NULL)
        return -1;
    if (depth > CK_MAX_DEPTH) {
        Py_DECREF(o);
        return too_deep(v);
    }
    if (v->sp == v->scap && grow_stack(v) < 0) {
        Py_DECREF(o);
        return -1;
    }
    v->depth[v->sp] = depth;
    v->stack[v->sp++] = o;
    return 0;
}

/* Pushes o, an object just made (charged to the budget), `depth` deep. */
static inline int push_new(vm *v, PyObject *o, uint32_t depth) {
    if (o != NULL && charge(v, ck_object_cost(v->st, o)) < 0) {
        Py_DECREF(o);
        return -1;
    }
    return push_d(v, o, depth);
}

/* Pushes a leaf just made. */
static inline int push(vm *v, PyObject *o) {
    return push_new(v, o, 0);
}

/* The deepest of stack[k .. sp), plus one: the depth of a container of them. */
static uint32_t span_depth(const vm *v, Py_ssize_t k) {
    uint32_t d = 0;
    for (Py_ssize_t i = k; i < v->sp; i++)
        if (v->depth[i] > d)
            d = v->depth[i];
    return d + 1;
}

/* Slot i is about to be handed on (to a call, a container, the result):
 * a storage reference, or a tuple holding one, becomes its clean form. */
static int clean_slot(vm *v, Py_ssize_t i) {
    PyObject *o = v->stack[i];
    if (!ck_holds_refs(v->st, o))
        return 0;
    PyObject *c = ck_clean(v->s, o);
    if (c == NULL)
        return -1;
    v->stack[i] = c;
    Py_DECREF(o);
    return 0;
}

static int clean_span(vm *v, Py_ssize_t k) {
    for (Py_ssize_t i = k; i < v->sp; i++)
        if (clean_slot(v, i) < 0)
            return -1;
    return 0;
}

static inline Py_ssize_t fence(const vm *v) {
    return v->mp > 0 ? v->marks[v->mp - 1] : 0;
}

/* Pops the top (a reference the caller now owns), or NULL with an error. */
static inline PyObject *pop(vm *v) {
    if (v->sp <= fence(v)) {
        underflow(v);
        return NULL;
    }
    return v->stack[--v->sp];
}

/* The top, borrowed, or NULL with an error. */
static inline PyObject *top(vm *v) {
    if (v->sp <= fence(v)) {
        underflow(v);
        return NULL;
    }
    return v->stack[v->sp - 1];
}

/* Pops the innermost mark and returns where its items start, or -1. */
static Py_ssize_t pop_mark(vm *v) {
    if (v->mp == 0) {
        fail(v, v->st->UnpicklingError, "could not find MARK");
        return -1;
    }
    return v->marks[--v->mp];
}

/* The items from stack slot k up, or NULL when there are none (the stack
 * may not be allocated yet: NULL + 0 is undefined behaviour in C). */
static PyObject *const *span_items(vm *v, Py_ssize_t k) {
    return v->sp > k ? v->stack + k : NULL;
}

/* Moves stack[k .. sp) into a new tuple (a RefTuple when an item holds
 * storage references) and truncates the stack to k. */
static PyObject *take_tuple(vm *v, Py_ssize_t k) {
    Py_ssize_t n = v->sp - k;
    v->sp = k;
    return ck_tuple_steal(v->s, n > 0 ? v->stack + k : NULL, n); /* no stack yet when empty */
}

/* Pushes the tuple of stack[k .. sp) in their place. */
static int push_tuple(vm *v, Py_ssize_t k) {
    uint32_t d = span_depth(v, k);
    return push_new(v, take_tuple(v, k), d);
}

/* Moves the clean forms of stack[k .. sp) into a new list. */
static PyObject *take_list(vm *v, Py_ssize_t k) {
    if (clean_span(v, k) < 0)
        return NULL;
    Py_ssize_t n = v->sp - k;
    PyObject *l = PyList_New(n);
    if (l == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < n; i++)
        PyList_SET_ITEM(l, i, v->stack[k + i]);
    v->sp = k;
    return l;
}

static void drop_from(vm *v, Py_ssize_t k) {
    while (v->sp > k)
        Py_DECREF(v->stack[--v->sp]);
}

/* ---- reading ----------------------------------------------------------- */

/* The one read primitive: the opcode's next n argument bytes, at *out, or
 * the pickle is truncated. */
static int take(vm *v, uint64_t n, const uint8_t **out) {
    if ((uint64_t)(v->end - v->p) < n)
        return truncated(v);
    *out = v->p;
    v->p += n;
    return 0;
}

/* An unsigned little-endian integer argument of width 1, 2, 4 or 8 bytes. */
static int read_uint(vm *v, int width, uint64_t *out) {
    const uint8_t *p = NULL;
    if (take(v, (uint64_t)width, &p) < 0)
        return -1;
    uint64_t x = 0;
    for (int i = 0; i < width; i++)
        x |= (uint64_t)p[i] << (8 * i);
    *out = x;
    return 0;
}

/* A counted argument: a count of width 1, 2, 4 or 8 bytes, then that many
 * bytes (*n and *p). `what` names an opcode whose 4-byte count is signed
 * (NULL: unsigned). */
static int take_counted(vm *v, int width, const char *what, uint64_t *n, const uint8_t **p) {
    if (read_uint(v, width, n) < 0)
        return -1;
    if (what != NULL && width == 4 && (int32_t)(uint32_t)*n < 0)
        return fail(v, v->st->UnpicklingError, "%s pickle has negative byte count", what);
    return take(v, *n, p);
}

/* A line ending in '\n' (not included): sets *line and *n. */
static int read_line(vm *v, const char **line, size_t *n) {
    const uint8_t *nl = memchr(v->p, '\n', (size_t)(v->end - v->p));
    if (nl == NULL)
        return truncated(v);
    *line = (const char *)v->p;
    *n = (size_t)(nl - v->p);
    v->p = nl + 1;
    return 0;
}

/* The line as a NUL-terminated copy (for C parsers); free with PyMem_Free. */
static char *line_copy(vm *v, const char *line, size_t n) {
    char *c = PyMem_Malloc(n + 1);
    if (c == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    memcpy(c, line, n);
    c[n] = 0;
    if (memchr(line, 0, n) != NULL) {
        PyMem_Free(c);
        fail(v, v->st->UnpicklingError, "NUL byte in a text argument");
        return NULL;
    }
    return c;
}

/* A memo index written as a decimal line (GET, PUT). */
static int read_decimal_index(vm *v, uint64_t *out) {
    const char *line = NULL;
    size_t n = 0;
    if (read_line(v, &line, &n) < 0)
        return -1;
    uint64_t x = 0;
    if (n == 0 || n > 19)
        return fail(v, v->st->UnpicklingError, "invalid memo index");
    for (size_t i = 0; i < n; i++) {
        if (line[i] < '0' || line[i] > '9')
            return fail(v, v->st->UnpicklingError, "invalid memo index");
        x = x * 10 + (uint64_t)(line[i] - '0');
    }
    *out = x;
    return 0;
}

/* bytes, or str decoded with the session's encoding ('bytes' keeps bytes),
 * for the protocol 0-2 STRING family. */
static PyObject *decode_string(vm *v, const char *data, Py_ssize_t n) {
    if (v->s->encoding == NULL)
        return PyBytes_FromStringAndSize(data, n);
    return PyUnicode_Decode(data, n, PyUnicode_AsUTF8(v->s->encoding),
                            PyUnicode_AsUTF8(v->s->errors));
}

/* Little-endian two's complement integer of n bytes. */
static PyObject *decode_long(const uint8_t *p, size_t n) {
    if (n == 0)
        return PyLong_FromLong(0);
    if (n <= 8) {
        uint64_t x = 0;
        for (size_t i = 0; i < n; i++)
            x |= (uint64_t)p[i] << (8 * i);
        if (n < 8 && (p[n - 1] & 0x80))
            x |= ~(uint64_t)0 << (8 * n);
        return PyLong_FromLongLong((long long)x);
    }
    PyObject *bytes = PyBytes_FromStringAndSize((const char *)p, (Py_ssize_t)n);
    if (bytes == NULL)
        return NULL;
    PyObject *r =
        PyObject_CallMethod((PyObject *)&PyLong_Type, "from_bytes", "Os", bytes, "little");
    Py_DECREF(bytes);
    if (r == NULL)
        return NULL;
    if (p[n - 1] & 0x80) {
        /* negative: subtract 2**(8n) */
        PyObject *one = PyLong_FromLong(1);
        PyObject *bits = PyLong_FromSize_t(8 * n);
        PyObject *big = (one && bits) ? PyNumber_Lshift(one, bits) : NULL;
        PyObject *neg = big ? PyNumber_Subtract(r, big) : NULL;
        Py_XDECREF(one);
        Py_XDECREF(bits);
        Py_XDECREF(big);
        Py_SETREF(r, neg);
    }
    return r;
}

/* ---- memo ---------------------------------------------------------------- */

static int memo_put(vm *v, uint64_t idx, PyObject *obj, uint32_t depth) {
    if (idx < v->memo_limit) {
        if (idx >= v->memo_cap) {
            size_t ncap = v->memo_cap ? v->memo_cap : 256;
            while (ncap <= idx)
                ncap *= 2;
            if (ncap > v->memo_limit)
                ncap = v->memo_limit;
            if (charge(v, (ncap - v->memo_cap) * (sizeof(PyObject *) + sizeof(uint32_t))) < 0)
                return -1;
            PyObject **n = PyMem_Realloc(v->memo, ncap * sizeof(PyObject *));
            if (n == NULL) {
                PyErr_NoMemory();
                return -1;
            }
            memset(n + v->memo_cap, 0, (ncap - v->memo_cap) * sizeof(PyObject *));
            v->memo = n;
            uint32_t *d = PyMem_Realloc(v->memo_depth, ncap * sizeof(uint32_t));
            if (d == NULL) {
                PyErr_NoMemory();
                return -1; /* memo_cap still the old size: the new slots stay unused */
            }
            v->memo_depth = d;
            v->memo_cap = ncap;
        }
        if (v->memo[idx] == NULL)
            v->memo_count++;
        Py_XSETREF(v->memo[idx], Py_NewRef(obj));
        v->memo_depth[idx] = depth;
        return 0;
    }
    if (charge(v, 200) < 0) /* a dict entry, its key and (object, depth) */
        return -1;
    if (v->memo_sparse == NULL && (v->memo_sparse = PyDict_New()) == NULL)
        return -1;
    PyObject *key = PyLong_FromUnsignedLongLong(idx);
    PyObject *entry = key != NULL ? Py_BuildValue("(OI)", obj, (unsigned int)depth) : NULL;
    if (entry == NULL) {
        Py_XDECREF(key);
        return -1;
    }
    int had = PyDict_Contains(v->memo_sparse, key);
    int rc = had < 0 ? -1 : PyDict_SetItem(v->memo_sparse, key, entry);
    Py_DECREF(entry);
    Py_DECREF(key);
    if (rc == 0 && had == 0)
        v->memo_count++;
    return rc;
}

/* Pushes memo[idx]. */
static int memo_get(vm *v, uint64_t idx) {
    PyObject *obj = NULL;
    uint32_t depth = 0;
    if (idx < v->memo_cap) {
        obj = v->memo[idx];
        depth = obj != NULL ? v->memo_depth[idx] : 0;
    } else if (v->memo_sparse != NULL) {
        PyObject *key = PyLong_FromUnsignedLongLong(idx);
        if (key == NULL)
            return -1;
        PyObject *entry = PyDict_GetItemWithError(v->memo_sparse, key);
        Py_DECREF(key);
        if (entry == NULL && PyErr_Occurred())
            return -1;
        if (entry != NULL) {
            obj = PyTuple_GET_ITEM(entry, 0);
            depth = (uint32_t)PyLong_AsUnsignedLong(PyTuple_GET_ITEM(entry, 1));
        }
    }
    if (obj == NULL)
        return fail(v, v->st->UnpicklingError, "memo value not found at index %llu",
                    (unsigned long long)idx);
    return push_d(v, Py_NewRef(obj), depth);
}

/* ---- calls ------------------------------------------------------------- */

/* args as Python code may see them (storages, not storage references). */
static PyObject *ready_args(vm *v, PyObject *args) {
    return ck_clean(v->s, args);
}

static int is_ordered_dict_type(vm *v, PyObject *obj) {
    return (PyObject *)Py_TYPE(obj) == v->st->OrderedDict;
}

/* Refuses obj, shown by its repr when that is short by nature (a class or
 * a function: their names), else by its type: the repr of an object the
 * pickle built (a list of a million items, a storage) could be as large as
 * the file and take as long to make. */
static int refuse(vm *v, const char *fmt, PyObject *obj) {
    if (!PyType_Check(obj) && !PyCFunction_Check(obj) && !PyFunction_Check(obj)) {
        char what[128];
        snprintf(what, sizeof what, "a %.80s object", Py_TYPE(obj)->tp_name);
        return fail(v, v->st->UnpicklingError, fmt, what);
    }
    PyObject *r = PyObject_Repr(obj);
    if (r == NULL) {
        PyErr_Clear();
        return fail(v, v->st->UnpicklingError, fmt, Py_TYPE(obj)->tp_name);
    }
    const char *text = PyUnicode_AsUTF8(r);
    int rc = fail(v, v->st->UnpicklingError, fmt, text ? text : "?");
    Py_DECREF(r);
    return rc;
}

/* weights_only: 0 when obj is allowlisted, else -1, refused by fmt (see
 * refuse()) or with the lookup's error. */
static int require_allowed(vm *v, PyObject *obj, const char *fmt) {
    int ok = ck_is_allowed_object(v->s, obj);
    if (ok > 0)
        return 0;
    return ok < 0 ? -1 : refuse(v, fmt, obj);
}

/* A data-set builder refused the opcode (dataset.h). */
static int data_refused(vm *v, const ck_why *why) {
    return fail(v, v->st->UnpicklingError,
                "weights-only load refused: %s (load with weights_only=False, command line "
                "--unsafe, only if you trust the file's source)",
                why->text);
}

static int do_reduce(vm *v) {
    PyObject *args = pop(v);
    if (args == NULL)
        return -1;
    uint32_t depth = v->depth[v->sp]; /* the result nests as deep as its arguments */
    PyObject *func = top(v);
    if (func == NULL) {
        Py_DECREF(args);
        return -1;
    }
    if (v->scan) {
        Py_DECREF(args);
        Py_SETREF(v->stack[v->sp - 1], Py_NewRef(Py_None));
        return 0;
    }
    if (!PyTuple_Check(args)) {
        Py_DECREF(args);
        return fail(v, v->st->UnpicklingError, "REDUCE arguments must be a tuple");
    }
    int handled = 0;
    PyObject *r = ck_native_call(v->s, func, args, &handled);
    if (!handled && v->s->weights_only) {
        ck_why why;
        int d = ck_dataset_reduce(v->s, func, args, &r, &why);
        if (d == CK_DATA_REFUSED) {
            Py_DECREF(args);
            return data_refused(v, &why);
        }
        handled = d != CK_DATA_NO;
    }
    if (!handled) {
        if (clean_slot(v, v->sp - 1) < 0) {
            Py_DECREF(args);
            return -1;
        }
        func = v->stack[v->sp - 1];
        if (v->s->weights_only && func != v->st->OrderedDict &&
            require_allowed(v, func,
                            "weights-only load refused to call %s: only allowlisted functions "
                            "may be called") < 0) {
            Py_DECREF(args);
            return -1;
        }
        PyObject *a = ready_args(v, args);
        if (a != NULL && ck_charge_call(v->s, func, a, NULL, 0) < 0) {
            Py_DECREF(a);
            Py_DECREF(args);
            return -1;
        }
        r = a != NULL ? PyObject_Call(func, a, NULL) : NULL;
        Py_XDECREF(a);
    }
    Py_DECREF(args);
    if (r == NULL)
        return fail_call(v);
    Py_SETREF(v->stack[v->sp - 1], r);
    if (charge(v, ck_object_cost(v->st, r)) < 0)
        return -1;
    if (v->depth[v->sp - 1] < depth)
        v->depth[v->sp - 1] = depth;
    return 0;
}

/* cls.__new__(cls, *args, **kwargs) */
static PyObject *call_new(vm *v, PyObject *cls, PyObject *args, PyObject *kwargs) {
    PyObject *newfn = PyObject_GetAttr(cls, v->st->s_dunder_new);
    if (newfn == NULL)
        return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(args);
    PyObject *full = PyTuple_New(n + 1);
    if (full == NULL) {
        Py_DECREF(newfn);
        return NULL;
    }
    PyTuple_SET_ITEM(full, 0, Py_NewRef(cls));
    for (Py_ssize_t i = 0; i < n; i++)
        PyTuple_SET_ITEM(full, i + 1, Py_NewRef(PyTuple_GET_ITEM(args, i)));
    PyObject *r = PyObject_Call(newfn, full, kwargs);
    Py_DECREF(full);
    Py_DECREF(newfn);
    return r;
}

static int do_newobj(vm *v, int ex) {
    PyObject *kwargs = NULL;
    uint32_t depth = 0;
    if (ex) {
        if ((kwargs = pop(v)) == NULL)
            return -1;
        depth = v->depth[v->sp];
    }
    PyObject *args = pop(v);
    if (args != NULL && v->depth[v->sp] > depth)
        depth = v->depth[v->sp];
    PyObject *cls = args ? pop(v) : NULL;
    int rc = -1;
    if (cls == NULL)
        goto out;
    if (!v->scan && ck_holds_refs(v->st, cls)) {
        PyObject *c = ck_clean(v->s, cls);
        if (c == NULL)
            goto out;
        Py_SETREF(cls, c);
    }
    if (v->scan) {
        rc = push(v, Py_NewRef(Py_None));
        goto out;
    }
    if (!PyTuple_Check(args) || (kwargs != NULL && !PyDict_Check(kwargs))) {
        fail(v, v->st->UnpicklingError, "NEWOBJ arguments must be a tuple (and a dict)");
        goto out;
    }
    if (!PyType_Check(cls)) {
        refuse(v, "NEWOBJ class argument %s is not a type", cls);
        goto out;
    }
    PyObject *r;
    PyObject *a = ready_args(v, args);
    if (a == NULL)
        goto out;
    ck_why why;
    int d = CK_DATA_NO;
    r = NULL;
    if (ck_charge_call(v->s, cls, a, kwargs, 1) < 0) {
        Py_DECREF(a);
        goto out;
    }
    if (v->s->weights_only && cls == v->st->Parameter) {
        r = PyObject_Call(cls, a, kwargs);
    } else if (v->s->weights_only &&
               (d = ck_dataset_newobj(v->s, cls, a, kwargs, &r, &why)) != CK_DATA_NO) {
        if (d == CK_DATA_REFUSED) {
            Py_DECREF(a);
            data_refused(v, &why);
            goto out;
        }
    } else {
        if (v->s->weights_only &&
            require_allowed(v, cls,
                            "weights-only load refused to create an instance of %s: only "
                            "nn.Parameter and allowlisted classes may be created") < 0) {
            Py_DECREF(a);
            goto out;
        }
        r = call_new(v, cls, a, kwargs);
    }
    Py_DECREF(a);
    if (r == NULL) {
        fail_call(v);
        goto out;
    }
    rc = push_new(v, r, depth);
out:
    Py_XDECREF(kwargs);
    Py_XDECREF(args);
    Py_XDECREF(cls);
    return rc;
}

/* INST and OBJ: pickle's _instantiate; the result nests `depth` deep. */
static int instantiate(vm *v, PyObject *cls, PyObject *args, uint32_t depth) {
    if (v->scan)
        return push(v, Py_NewRef(Py_None));
    if (v->s->weights_only && require_allowed(v, cls,
                                              "weights-only load refused to instantiate %s: "
                                              "only allowlisted classes may be created") < 0)
        return -1;
    PyObject *a = ready_args(v, args);
    if (a == NULL)
        return -1;
    if (ck_charge_call(v->s, cls, a, NULL, 0) < 0) {
        Py_DECREF(a);
        return -1;
    }
    PyObject *r;
    int has_initargs = PyObject_HasAttrString(cls, "__getinitargs__");
    if (PyTuple_GET_SIZE(a) > 0 || !PyType_Check(cls) || has_initargs)
        r = PyObject_Call(cls, a, NULL);
    else
        r = call_new(v, cls, a, NULL);
    Py_DECREF(a);
    if (r == NULL)
        return fail_call(v);
    return push_new(v, r, depth);
}

/* BUILD with pickle's semantics: __setstate__, else __dict__ and slots. */
static int build_generic(vm *v, PyObject *inst, PyObject *state) {
    PyObject *setstate;
    if (ck_lookup_attr(inst, v->st->s_setstate, &setstate) < 0)
        return -1;
    if (setstate != NULL) {
        PyObject *r = PyObject_CallOneArg(setstate, state);
        Py_DECREF(setstate);
        if (r == NULL)
            return -1;
        Py_DECREF(r);
        return 0;
    }
    PyObject *slotstate = NULL;
    if (PyTuple_Check(state) && PyTuple_GET_SIZE(state) == 2) {
        slotstate = PyTuple_GET_ITEM(state, 1);
        state = PyTuple_GET_ITEM(state, 0);
    }
    if (state != Py_None) {
        int has = PyObject_IsTrue(state);
        if (has < 0)
            return -1;
        if (has) {
            if (!PyDict_Check(state)) {
                PyErr_SetString(PyExc_TypeError, "state is not a dictionary");
                return -1;
            }
            PyObject *d = PyObject_GetAttr(inst, v->st->s_dict);
            if (d == NULL)
                return -1;
            Py_ssize_t pos = 0;
            PyObject *k, *val;
            int rc = 0;
            while (rc == 0 && PyDict_Next(state, &pos, &k, &val)) {
                if (PyUnicode_CheckExact(k)) {
                    Py_INCREF(k);
                    PyUnicode_InternInPlace(&k);
                    rc = PyObject_SetItem(d, k, val);
                    Py_DECREF(k);
                } else {
                    rc = PyObject_SetItem(d, k, val);
                }
            }
            Py_DECREF(d);
            if (rc < 0)
                return -1;
        }
    }
    if (slotstate != NULL && slotstate != Py_None) {
        int has = PyObject_IsTrue(slotstate);
        if (has < 0)
            return -1;
        if (has) {
            if (!PyDict_Check(slotstate)) {
                PyErr_SetString(PyExc_TypeError, "slot state is not a dictionary");
                return -1;
            }
            Py_ssize_t pos = 0;
            PyObject *k, *val;
            while (PyDict_Next(slotstate, &pos, &k, &val))
                if (PyObject_SetAttr(inst, k, val) < 0)
                    return -1;
        }
    }
    return 0;
}

/* 0 when r (a call's result, or NULL) succeeded; releases it. */
static int done(PyObject *r) {
    int rc = r != NULL ? 0 : -1;
    Py_XDECREF(r);
    return rc;
}

static int do_build(vm *v) {
    PyObject *state = pop(v);
    if (state == NULL)
        return -1;
    uint32_t depth = v->depth[v->sp] + 1;
    PyObject *inst = top(v);
    if (inst == NULL || v->scan) {
        Py_DECREF(state);
        return inst == NULL ? -1 : 0;
    }
    if (v->depth[v->sp - 1] < depth) {
        if (depth > CK_MAX_DEPTH) {
            Py_DECREF(state);
            return too_deep(v);
        }
        v->depth[v->sp - 1] = depth;
    }
    PyObject *st_ready = ready_args(v, state);
    Py_DECREF(state);
    if (st_ready == NULL || clean_slot(v, v->sp - 1) < 0) {
        Py_XDECREF(st_ready);
        return -1;
    }
    inst = v->stack[v->sp - 1];
    /* the state's items go into the instance's __dict__ (or its own items) */
    Py_ssize_t items = PyDict_Check(st_ready)    ? PyDict_GET_SIZE(st_ready)
                       : PyTuple_Check(st_ready) ? PyTuple_GET_SIZE(st_ready)
                                                 : 0;
    if (charge(v, 104 * (uint64_t)items) < 0 ||
        (PyDict_Check(st_ready) && ck_count_keys_of(v->s, st_ready, 0) < 0)) {
        Py_DECREF(st_ready);
        return -1;
    }
    ck_state *st = v->st;
    int rc = 0, data;
    ck_why why;
    PyObject *type = (PyObject *)Py_TYPE(inst);
    if (v->s->weights_only) {
        if (type == st->Tensor) {
            /* legacy tensors: inst.set_(*state) */
            if (!PyTuple_Check(st_ready)) {
                Py_DECREF(st_ready);
                return fail(v, st->UnpicklingError, "tensor BUILD state must be a tuple");
            }
            PyObject *set_ = PyObject_GetAttr(inst, st->s_set_);
            rc = done(set_ ? PyObject_Call(set_, st_ready, NULL) : NULL);
            Py_XDECREF(set_);
        } else if (type == st->Parameter) {
            rc = done(PyObject_CallMethodOneArg(inst, st->s_setstate, st_ready));
        } else if (is_ordered_dict_type(v, inst)) {
            PyObject *d = PyObject_GetAttr(inst, st->s_dict);
            rc = d ? PyDict_Update(d, st_ready) : -1;
            Py_XDECREF(d);
        } else if ((data = ck_dataset_build(v->s, inst, st_ready, &why)) != CK_DATA_NO) {
            Py_DECREF(st_ready);
            if (data == CK_DATA_REFUSED)
                return data_refused(v, &why);
            return data == CK_DATA_DONE ? 0 : fail_call(v);
        } else if (require_allowed(v, type,
                                   "weights-only load refused to BUILD an instance of %s: only "
                                   "Tensor, Parameter, OrderedDict and allowlisted types may be "
                                   "built") < 0) {
            Py_DECREF(st_ready);
            return -1;
        } else {
            rc = build_generic(v, inst, st_ready);
        }
    } else {
        rc = build_generic(v, inst, st_ready);
    }
    Py_DECREF(st_ready);
    return rc < 0 ? fail_call(v) : 0;
}

static int is_setitem_target(vm *v, PyObject *obj) {
    PyObject *t = (PyObject *)Py_TYPE(obj);
    return PyDict_CheckExact(obj) || t == v->st->OrderedDict || t == v->st->Counter;
}

/* Before stack[k .. sp) go into the container at k - 1: the container now
 * nests one deeper than its deepest new item, and what goes in is clean. */
static int fill_target(vm *v, Py_ssize_t k) {
    uint32_t depth = span_depth(v, k);
    if (depth > CK_MAX_DEPTH)
        return too_deep(v);
    if (v->depth[k - 1] < depth)
        v->depth[k - 1] = depth;
    if (clean_slot(v, k - 1) < 0 || clean_span(v, k) < 0)
        return -1;
    uint64_t n = (uint64_t)(v->sp - k);
    if (v->op == OP_SETITEM || v->op == OP_SETITEMS)
        n /= 2;
    return charge(v, n * ck_item_cost(v->stack[k - 1]));
}

typedef int (*items_fn)(vm *, Py_ssize_t, PyObject *);

/* stack[k .. sp) go into stack[k - 1] by `add` (set_items, append_items or
 * add_items); a scan drops them. */
static int put_items(vm *v, Py_ssize_t k, items_fn add) {
    if (v->scan) {
        drop_from(v, k);
        return 0;
    }
    if (fill_target(v, k) < 0)
        return -1;
    return add(v, k, v->stack[k - 1]);
}

/* SETITEM(S): the pairs stack[k .. sp) into target, stack[k - 1]. */
static int set_items(vm *v, Py_ssize_t k, PyObject *target) {
    if (v->s->weights_only && !is_setitem_target(v, target))
        return fail(v, v->st->UnpicklingError,
                    "weights-only load can only set items of dict, OrderedDict or Counter, "
                    "not %.80s",
                    Py_TYPE(target)->tp_name);
    if ((v->sp - k) % 2 != 0)
        return fail(v, v->st->UnpicklingError, "odd number of items for SETITEMS");
    if (PyDict_Check(target) && ck_count_keys(v->s, span_items(v, k), v->sp - k, 2) < 0)
        return -1;
    int exact = PyDict_CheckExact(target);
    for (Py_ssize_t i = k; i < v->sp; i += 2) {
        int rc = exact ? PyDict_SetItem(target, v->stack[i], v->stack[i + 1])
                       : PyObject_SetItem(target, v->stack[i], v->stack[i + 1]);
        if (rc < 0)
            return fail_call(v);
    }
    drop_from(v, k);
    return 0;
}

/* APPEND(S): stack[k .. sp) onto target, stack[k - 1]. */
static int append_items(vm *v, Py_ssize_t k, PyObject *target) {
    if (PyList_CheckExact(target)) {
        for (Py_ssize_t i = k; i < v->sp; i++)
            if (PyList_Append(target, v->stack[i]) < 0)
                return -1;
        drop_from(v, k);
        return 0;
    }
    if (v->s->weights_only)
        return fail(v, v->st->UnpicklingError,
                    "weights-only load can only append to lists, not %.80s",
                    Py_TYPE(target)->tp_name);
    PyObject *items = take_list(v, k);
    if (items == NULL)
        return -1;
    PyObject *extend;
    if (ck_lookup_attr(target, v->st->s_extend, &extend) < 0) {
        Py_DECREF(items);
        return fail_call(v);
    }
    int rc = 0;
    if (extend != NULL) {
        rc = done(PyObject_CallOneArg(extend, items));
        Py_DECREF(extend);
    } else {
        for (Py_ssize_t i = 0; rc == 0 && i < PyList_GET_SIZE(items); i++)
            rc =
                done(PyObject_CallMethodOneArg(target, v->st->s_append, PyList_GET_ITEM(items, i)));
    }
    Py_DECREF(items);
    return rc < 0 ? fail_call(v) : 0;
}

/* ADDITEMS: stack[k .. sp) into target, the set stack[k - 1]. */
static int add_items(vm *v, Py_ssize_t k, PyObject *target) {
    if (PySet_Check(target) && !PyFrozenSet_Check(target)) {
        if (ck_count_keys(v->s, span_items(v, k), v->sp - k, 1) < 0)
            return -1;
        for (Py_ssize_t i = k; i < v->sp; i++)
            if (PySet_Add(target, v->stack[i]) < 0)
                return fail_call(v);
        drop_from(v, k);
        return 0;
    }
    if (v->s->weights_only)
        return fail(v, v->st->UnpicklingError, "weights-only load can only add to sets, not %.80s",
                    Py_TYPE(target)->tp_name);
    for (Py_ssize_t i = k; i < v->sp; i++) {
        if (done(PyObject_CallMethodOneArg(target, v->st->s_add, v->stack[i])) < 0)
            return fail_call(v);
    }
    drop_from(v, k);
    return 0;
}

static int do_global(vm *v, PyObject *module, PyObject *name) {
    if (v->scan) {
        /* only storage types matter to the layout of a legacy file */
        PyObject *hit =
            PyUnicode_Check(name) ? PyDict_GetItemWithError(v->st->storage_by_name, name) : NULL;
        if (hit == NULL && PyErr_Occurred())
            return -1;
        if (hit == NULL && PyUnicode_Check(name) &&
            PyUnicode_CompareWithASCIIString(name, "UntypedStorage") == 0)
            hit = v->st->UntypedStorage; /* newer dtypes are saved as bytes */
        return push(v, Py_NewRef(hit != NULL ? hit : Py_None));
    }
    PyObject *obj = ck_resolve_global(v->s, module, name, v->proto);
    if (obj == NULL)
        return fail_call(v);
    return push_d(v, obj, 0); /* an existing object: nothing allocated */
}

static int do_ext(vm *v, long code) {
    if (v->scan)
        return push(v, Py_NewRef(Py_None));
    if (v->s->weights_only)
        return fail(v, v->st->UnpicklingError,
                    "weights-only load refuses extension-registry opcodes (EXT1/2/4)");
    if (code <= 0)
        return fail(v, v->st->UnpicklingError, "EXT specifies code <= 0");
    PyObject *key = PyLong_FromLong(code);
    if (key == NULL)
        return -1;
    PyObject *entry = PyDict_GetItemWithError(v->st->extension_registry, key);
    Py_DECREF(key);
    if (entry == NULL) {
        if (PyErr_Occurred())
            return -1;
        return fail(v, v->st->UnpicklingError, "unregistered extension code %ld", code);
    }
    if (!PyTuple_Check(entry) || PyTuple_GET_SIZE(entry) != 2)
        return fail(v, v->st->UnpicklingError, "malformed extension registry entry");
    return do_global(v, PyTuple_GET_ITEM(entry, 0), PyTuple_GET_ITEM(entry, 1));
}

static int do_persid(vm *v, PyObject *pid) {
    if (v->scan) {
        int rc = PyList_Append(v->pids, pid);
        Py_DECREF(pid);
        return rc < 0 ? -1 : push(v, Py_NewRef(Py_None));
    }
    PyObject *r = ck_persistent_load(v->s, pid);
    Py_DECREF(pid);
    if (r == NULL)
        return fail_call(v);
    return push_d(v, r, 0); /* the storage's one reference (storages.c charges storages) */
}

/* ---- the opcode families -------------------------------------------------
 * Each returns 0 to go on, -1 with an exception set, 1 at STOP. */

static int load_proto(vm *v) {
    uint64_t x = 0;
    if (read_uint(v, 1, &x) < 0)
        return -1;
    v->proto = (int)x;
    v->s->pickle_proto = v->proto;
    if (v->proto > 5)
        return fail(v, v->st->UnpicklingError, "unsupported pickle protocol %d", v->proto);
    return 0;
}

static int load_frame(vm *v) {
    uint64_t n = 0;
    if (read_uint(v, 8, &n) < 0)
        return -1;
    if (n > (uint64_t)(v->end - v->p))
        return truncated(v);
    return 0;
}

static int load_stop(vm *v) {
    PyObject *r = pop(v);
    if (r == NULL)
        return -1;
    Py_SETREF(r, ck_clean(v->s, r));
    if (r == NULL)
        return -1;
    v->result = r;
    return 1;
}

static int load_mark(vm *v) {
    if (v->mp == v->mcap &&
        (charge(v, (uint64_t)(v->mcap ? v->mcap : 64) * sizeof(Py_ssize_t)) < 0 ||
         grow((void **)&v->marks, &v->mcap, sizeof(Py_ssize_t)) < 0))
        return -1;
    v->marks[v->mp++] = v->sp;
    return 0;
}

static int load_pop(vm *v) {
    if (v->mp > 0 && v->marks[v->mp - 1] == v->sp) {
        v->mp--;
        return 0;
    }
    PyObject *o = pop(v);
    if (o == NULL)
        return -1;
    Py_DECREF(o);
    return 0;
}

static int load_pop_mark(vm *v) {
    Py_ssize_t k = pop_mark(v);
    if (k < 0)
        return -1;
    drop_from(v, k);
    return 0;
}

static int load_dup(vm *v) {
    PyObject *o = top(v);
    if (o == NULL)
        return -1;
    return push_d(v, Py_NewRef(o), v->depth[v->sp - 1]);
}

static int load_const(vm *v, PyObject *o) {
    return push(v, Py_NewRef(o));
}

/* BININT (4 bytes, signed), BININT1 and BININT2 (unsigned). */
static int load_binint(vm *v, int width) {
    uint64_t x = 0;
    if (read_uint(v, width, &x) < 0)
        return -1;
    return push(v, PyLong_FromLong(width == 4 ? (long)(int32_t)(uint32_t)x : (long)x));
}

/* LONG1 (1-byte count) and LONG4 (4-byte signed count). */
static int load_binlong(vm *v, int width) {
    uint64_t u = 0;
    const uint8_t *p = NULL;
    if (take_counted(v, width, "LONG", &u, &p) < 0)
        return -1;
    /* LONG4 charges the digits, and from_bytes' bytes */
    if (charge(v, width == 4 ? 2 * u : u) < 0)
        return -1;
    return push(v, decode_long(p, (size_t)u));
}

/* INT and LONG: a decimal line ("00"/"01" are INT's False/True). */
static int load_text_int(vm *v, int is_long) {
    const char *line = NULL;
    size_t n = 0;
    if (read_line(v, &line, &n) < 0)
        return -1;
    if (!is_long && n == 2 && line[0] == '0' && (line[1] == '0' || line[1] == '1'))
        return push(v, Py_NewRef(line[1] == '1' ? Py_True : Py_False));
    if (is_long && n > 0 && line[n - 1] == 'L')
        n--;
    if (charge(v, n) < 0)
        return -1;
    char *c = line_copy(v, line, n);
    if (c == NULL)
        return -1;
    PyObject *x = PyLong_FromString(c, NULL, 0);
    PyMem_Free(c);
    return x ? push(v, x) : fail_call(v);
}

static int load_float(vm *v) {
    const char *line = NULL;
    size_t n = 0;
    if (read_line(v, &line, &n) < 0)
        return -1;
    PyObject *b = PyBytes_FromStringAndSize(line, (Py_ssize_t)n);
    PyObject *x = b ? PyFloat_FromString(b) : NULL;
    Py_XDECREF(b);
    return x ? push(v, x) : fail_call(v);
}

static int load_binfloat(vm *v) {
    const uint8_t *p = NULL;
    if (take(v, 8, &p) < 0)
        return -1;
    double d = PyFloat_Unpack8((const char *)p, 0);
    if (d == -1.0 && PyErr_Occurred())
        return -1;
    return push(v, PyFloat_FromDouble(d));
}

/* SHORT_BINUNICODE, BINUNICODE, BINUNICODE8: UTF-8 after a 1, 4 or 8-byte count. */
static int load_counted_unicode(vm *v, int width) {
    uint64_t n = 0;
    const uint8_t *p = NULL;
    if (take_counted(v, width, NULL, &n, &p) < 0)
        return -1;
    PyObject *x = PyUnicode_DecodeUTF8((const char *)p, (Py_ssize_t)n, "surrogatepass");
    return x ? push(v, x) : fail_call(v);
}

/* SHORT_BINSTRING (1-byte count), BINSTRING (4-byte signed count). */
static int load_counted_string(vm *v, int width) {
    uint64_t n = 0;
    const uint8_t *p = NULL;
    if (take_counted(v, width, "BINSTRING", &n, &p) < 0)
        return -1;
    PyObject *x = decode_string(v, (const char *)p, (Py_ssize_t)n);
    return x ? push(v, x) : fail_call(v);
}

/* SHORT_BINBYTES, BINBYTES, BINBYTES8 and BYTEARRAY8: made by `make`. */
static int load_counted_bytes(vm *v, int width, PyObject *(*make)(const char *, Py_ssize_t)) {
    uint64_t n = 0;
    const uint8_t *p = NULL;
    if (take_counted(v, width, NULL, &n, &p) < 0)
        return -1;
    return push(v, make((const char *)p, (Py_ssize_t)n));
}

static int load_quoted_string(vm *v) {
    const char *line = NULL;
    size_t n = 0;
    if (read_line(v, &line, &n) < 0)
        return -1;
    if (n < 2 || line[0] != line[n - 1] || (line[0] != '\'' && line[0] != '"'))
        return fail(v, v->st->UnpicklingError, "the STRING opcode argument must be quoted");
    PyObject *raw = PyBytes_DecodeEscape(line + 1, (Py_ssize_t)n - 2, NULL, 0, NULL);
    if (raw == NULL)
        return fail_call(v);
    PyObject *x = decode_string(v, PyBytes_AS_STRING(raw), PyBytes_GET_SIZE(raw));
    Py_DECREF(raw);
    return x ? push(v, x) : fail_call(v);
}

static int load_raw_unicode(vm *v) {
    const char *line = NULL;
    size_t n = 0;
    if (read_line(v, &line, &n) < 0)
        return -1;
    PyObject *x = PyUnicode_DecodeRawUnicodeEscape(line, (Py_ssize_t)n, NULL);
    return x ? push(v, x) : fail_call(v);
}

static int load_buffer(vm *v) {
    return fail(v, v->st->UnpicklingError,
                "out-of-band buffers (pickle protocol 5) cannot appear in a checkpoint");
}

/* EMPTY_TUPLE, EMPTY_LIST, EMPTY_DICT, EMPTY_SET: a new, empty container. */
static int load_empty(vm *v, PyObject *o) {
    return push_new(v, o, 1);
}

static int load_tuple(vm *v) {
    Py_ssize_t k = pop_mark(v);
    if (k < 0)
        return -1;
    return push_tuple(v, k);
}

/* TUPLE1, TUPLE2, TUPLE3: the top n items. */
static int load_tuple_n(vm *v, Py_ssize_t n) {
    if (v->sp - fence(v) < n)
        return underflow(v);
    return push_tuple(v, v->sp - n);
}

static int load_list(vm *v) {
    Py_ssize_t k = pop_mark(v);
    if (k < 0)
        return -1;
    uint32_t d = span_depth(v, k);
    return push_new(v, take_list(v, k), d);
}

/* DICT and FROZENSET: stack[k .. sp), `per` items a key, made clean and
 * counted as keys; *depth: how deep their container nests. */
static int ready_keys(vm *v, Py_ssize_t k, Py_ssize_t per, uint32_t *depth) {
    *depth = span_depth(v, k);
    if (*depth > CK_MAX_DEPTH)
        return too_deep(v);
    if (clean_span(v, k) < 0 || ck_count_keys(v->s, span_items(v, k), v->sp - k, per) < 0)
        return -1;
    return 0;
}

static int load_dict(vm *v) {
    Py_ssize_t k = pop_mark(v);
    if (k < 0)
        return -1;
    if ((v->sp - k) % 2 != 0)
        return fail(v, v->st->UnpicklingError, "odd number of items for DICT");
    uint32_t depth = 0;
    if (ready_keys(v, k, 2, &depth) < 0)
        return -1;
    PyObject *d = PyDict_New();
    if (d == NULL)
        return -1;
    for (Py_ssize_t i = k; i < v->sp; i += 2) {
        if (PyDict_SetItem(d, v->stack[i], v->stack[i + 1]) < 0) {
            Py_DECREF(d);
            return fail_call(v);
        }
    }
    drop_from(v, k);
    return push_new(v, d, depth);
}

static int load_frozenset(vm *v) {
    Py_ssize_t k = pop_mark(v);
    if (k < 0)
        return -1;
    uint32_t depth = 0;
    if (ready_keys(v, k, 1, &depth) < 0)
        return -1;
    PyObject *items = take_tuple(v, k);
    PyObject *fs = items ? PyFrozenSet_New(items) : NULL;
    Py_XDECREF(items);
    return fs ? push_new(v, fs, depth) : fail_call(v);
}

static int load_append(vm *v) {
    PyObject *item = pop(v);
    if (item == NULL)
        return -1;
    PyObject *target = top(v);
    if (target == NULL) {
        Py_DECREF(item);
        return -1;
    }
    if (push_d(v, item, v->depth[v->sp]) < 0)
        return -1;
    return put_items(v, v->sp - 1, append_items);
}

/* APPENDS, SETITEMS, ADDITEMS: the items since the mark go into the object below it. */
static int load_marked_items(vm *v, items_fn add) {
    Py_ssize_t k = pop_mark(v);
    if (k < 0)
        return -1;
    if (k <= fence(v))
        return underflow(v);
    return put_items(v, k, add);
}

static int load_setitem(vm *v) {
    if (v->sp - fence(v) < 3)
        return underflow(v);
    return put_items(v, v->sp - 2, set_items);
}

/* A memo index: a decimal line (width 0), or 1 or 4 bytes. */
static int read_memo_index(vm *v, int width, uint64_t *idx) {
    if (width == 0)
        return read_decimal_index(v, idx);
    return read_uint(v, width, idx);
}

/* GET, BINGET, LONG_BINGET. */
static int load_get(vm *v, int width) {
    uint64_t idx = 0;
    if (read_memo_index(v, width, &idx) < 0)
        return -1;
    return memo_get(v, idx);
}

static int memo_put_top(vm *v, uint64_t idx) {
    PyObject *o = top(v);
    if (o == NULL)
        return -1;
    return memo_put(v, idx, o, v->depth[v->sp - 1]);
}

/* PUT, BINPUT, LONG_BINPUT. */
static int load_put(vm *v, int width) {
    uint64_t idx = 0;
    if (read_memo_index(v, width, &idx) < 0)
        return -1;
    return memo_put_top(v, idx);
}

static int load_memoize(vm *v) {
    return memo_put_top(v, v->memo_count);
}

/* GLOBAL and INST: a module line and a name line. */
static int read_two_lines(vm *v, const char **ml, size_t *mn, const char **nl, size_t *nn) {
    if (read_line(v, ml, mn) < 0 || read_line(v, nl, nn) < 0)
        return -1;
    return 0;
}

static int load_global(vm *v) {
    const char *ml = NULL, *nl = NULL;
    size_t mn = 0, nn = 0;
    if (read_two_lines(v, &ml, &mn, &nl, &nn) < 0)
        return -1;
    PyObject *module = PyUnicode_DecodeUTF8(ml, (Py_ssize_t)mn, "strict");
    PyObject *name = module ? PyUnicode_DecodeUTF8(nl, (Py_ssize_t)nn, "strict") : NULL;
    int rc = name ? do_global(v, module, name) : fail_call(v);
    Py_XDECREF(module);
    Py_XDECREF(name);
    return rc;
}

static int load_stack_global(vm *v) {
    PyObject *name = pop(v);
    PyObject *module = name ? pop(v) : NULL;
    if (module == NULL) {
        Py_XDECREF(name);
        return -1;
    }
    int rc;
    if (!PyUnicode_CheckExact(name) || !PyUnicode_CheckExact(module))
        rc = fail(v, v->st->UnpicklingError, "STACK_GLOBAL requires str");
    else
        rc = do_global(v, module, name);
    Py_DECREF(module);
    Py_DECREF(name);
    return rc;
}

/* EXT1, EXT2 (unsigned), EXT4 (signed). */
static int load_ext(vm *v, int width) {
    uint64_t x = 0;
    if (read_uint(v, width, &x) < 0)
        return -1;
    return do_ext(v, width == 4 ? (long)(int32_t)(uint32_t)x : (long)x);
}

static int load_inst(vm *v) {
    const char *ml = NULL, *nl = NULL;
    size_t mn = 0, nn = 0;
    if (read_two_lines(v, &ml, &mn, &nl, &nn) < 0)
        return -1;
    Py_ssize_t k = pop_mark(v);
    if (k < 0)
        return -1;
    PyObject *module = PyUnicode_DecodeASCII(ml, (Py_ssize_t)mn, "strict");
    PyObject *name = module ? PyUnicode_DecodeASCII(nl, (Py_ssize_t)nn, "strict") : NULL;
    PyObject *cls = name == NULL ? NULL
                    : v->scan    ? Py_NewRef(Py_None)
                                 : ck_resolve_global(v->s, module, name, v->proto);
    Py_XDECREF(module);
    Py_XDECREF(name);
    if (cls == NULL)
        return fail_call(v);
    uint32_t depth = span_depth(v, k);
    PyObject *args = take_tuple(v, k);
    int rc = args ? instantiate(v, cls, args, depth) : -1;
    Py_XDECREF(args);
    Py_DECREF(cls);
    return rc;
}

static int load_obj(vm *v) {
    Py_ssize_t k = pop_mark(v);
    if (k < 0)
        return -1;
    if (v->sp - k < 1)
        return fail(v, v->st->UnpicklingError, "OBJ needs a class after its MARK");
    if (!v->scan && clean_slot(v, k) < 0)
        return -1;
    PyObject *cls = Py_NewRef(v->stack[k]);
    uint32_t depth = span_depth(v, k + 1);
    PyObject *args = take_tuple(v, k + 1);
    drop_from(v, k);
    int rc = args ? instantiate(v, cls, args, depth) : -1;
    Py_XDECREF(args);
    Py_DECREF(cls);
    return rc;
}

static int load_persid(vm *v) {
    const char *line = NULL;
    size_t n = 0;
    if (read_line(v, &line, &n) < 0)
        return -1;
    PyObject *pid = PyUnicode_DecodeASCII(line, (Py_ssize_t)n, "strict");
    return pid ? do_persid(v, pid) : fail_call(v);
}

static int load_binpersid(vm *v) {
    PyObject *pid = pop(v);
    if (pid == NULL)
        return -1;
    return do_persid(v, pid);
}

/* ---- the loop ----------------------------------------------------------- */

static int dispatch(vm *v) {
    switch (v->op) {
#define X(name, code, call)                                                                        \
    case OP_##name:                                                                                \
        return call;
        CK_OPCODES(X)
#undef X
    default:
        return fail(v, v->st->UnpicklingError, "invalid opcode 0x%02x", v->op);
    }
}

/* One opcode at a time until STOP (1) or an error (-1). */
static PyObject *run(vm *v) {
    int rc = 0;
    while (rc == 0) {
        if (v->p >= v->end) {
            rc = truncated(v);
            break;
        }
        v->op_pos = (size_t)(v->p - v->start);
        v->op = *v->p++;
        rc = dispatch(v);
    }
    return rc > 0 ? v->result : NULL;
}
static PyObject *unpickle(ck_session *s, const uint8_t *data, size_t len, const char *what,
                          size_t *consumed, PyObject *pids) {
    static const uint8_t empty[1];
    if (data == NULL) /* an empty record (e.g. inflated to nothing): no bytes, no pointer */
        data = empty, len = 0;
    vm v;
    memset(&v, 0, sizeof v);
    v.scan = pids != NULL;
    v.pids = pids;
    v.s = s;
    v.st = s->st;
    v.start = v.p = data;
    v.end = data + len;
    v.what = what;
    v.proto = 0;
    s->pickle_proto = -1;
    /* every PUT or MEMOIZE takes at least one byte, so a valid pickle's
     * memo indices stay below len; larger ones go to the sparse dict */
    v.memo_limit = len + 16;

    /* a scan's objects are gone before the real pass: it has a budget of its own */
    uint64_t budget = s->budget_left;
    PyObject *result = run(&v);
    if (v.scan)
        s->budget_left = budget;
    if (result != NULL && consumed != NULL)
        *consumed = (size_t)(v.p - v.start);

    drop_from(&v, 0);
    PyMem_Free(v.stack);
    PyMem_Free(v.depth);
    PyMem_Free(v.marks);
    for (size_t i = 0; i < v.memo_cap; i++)
        Py_XDECREF(v.memo[i]);
    PyMem_Free(v.memo);
    PyMem_Free(v.memo_depth);
    Py_XDECREF(v.memo_sparse);
    return result;
}

PyObject *ck_unpickle(ck_session *s, const uint8_t *data, size_t len, const char *what,
                      size_t *consumed) {
    return unpickle(s, data, len, what, consumed, NULL);
}

int ck_unpickle_protocol(const ck_session *s) {
    return s->pickle_proto;
}

int ck_unpickle_scan(ck_session *s, const uint8_t *data, size_t len, const char *what,
                     size_t *consumed, PyObject *pids) {
    PyObject *r = unpickle(s, data, len, what, consumed, pids);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

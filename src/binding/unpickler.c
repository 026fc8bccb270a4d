#include "unpickler.h"

#include <stdarg.h>
#include <string.h>

#include "budget.h"
#include "dataset.h"
#include "errors.h"
#include "globals.h"
#include "tensors.h"

/* Opcodes (CPython Lib/pickle.py). */
enum {
    OP_MARK = '(',
    OP_STOP = '.',
    OP_POP = '0',
    OP_POP_MARK = '1',
    OP_DUP = '2',
    OP_FLOAT = 'F',
    OP_INT = 'I',
    OP_BININT = 'J',
    OP_BININT1 = 'K',
    OP_LONG = 'L',
    OP_BININT2 = 'M',
    OP_NONE = 'N',
    OP_PERSID = 'P',
    OP_BINPERSID = 'Q',
    OP_REDUCE = 'R',
    OP_STRING = 'S',
    OP_BINSTRING = 'T',
    OP_SHORT_BINSTRING = 'U',
    OP_UNICODE = 'V',
    OP_BINUNICODE = 'X',
    OP_APPEND = 'a',
    OP_BUILD = 'b',
    OP_GLOBAL = 'c',
    OP_DICT = 'd',
    OP_EMPTY_DICT = '}',
    OP_APPENDS = 'e',
    OP_GET = 'g',
    OP_BINGET = 'h',
    OP_INST = 'i',
    OP_LONG_BINGET = 'j',
    OP_LIST = 'l',
    OP_EMPTY_LIST = ']',
    OP_OBJ = 'o',
    OP_PUT = 'p',
    OP_BINPUT = 'q',
    OP_LONG_BINPUT = 'r',
    OP_SETITEM = 's',
    OP_TUPLE = 't',
    OP_EMPTY_TUPLE = ')',
    OP_SETITEMS = 'u',
    OP_BINFLOAT = 'G',
    OP_PROTO = 0x80,
    OP_NEWOBJ = 0x81,
    OP_EXT1 = 0x82,
    OP_EXT2 = 0x83,
    OP_EXT4 = 0x84,
    OP_TUPLE1 = 0x85,
    OP_TUPLE2 = 0x86,
    OP_TUPLE3 = 0x87,
    OP_NEWTRUE = 0x88,
    OP_NEWFALSE = 0x89,
    OP_LONG1 = 0x8a,
    OP_LONG4 = 0x8b,
    OP_BINBYTES = 'B',
    OP_SHORT_BINBYTES = 'C',
    OP_SHORT_BINUNICODE = 0x8c,
    OP_BINUNICODE8 = 0x8d,
    OP_BINBYTES8 = 0x8e,
    OP_EMPTY_SET = 0x8f,
    OP_ADDITEMS = 0x90,
    OP_FROZENSET = 0x91,
    OP_NEWOBJ_EX = 0x92,
    OP_STACK_GLOBAL = 0x93,
    OP_MEMOIZE = 0x94,
    OP_FRAME = 0x95,
    OP_BYTEARRAY8 = 0x96,
    OP_NEXT_BUFFER = 0x97,
    OP_READONLY_BUFFER = 0x98,
};

static const char *op_name(uint8_t op) {
    switch (op) {
#define N(o, s)                                                                                    \
    case o:                                                                                        \
        return s;
        N(OP_MARK, "MARK")
        N(OP_STOP, "STOP")
        N(OP_POP, "POP")
        N(OP_POP_MARK, "POP_MARK")
        N(OP_DUP, "DUP")
        N(OP_FLOAT, "FLOAT")
        N(OP_INT, "INT")
        N(OP_BININT, "BININT")
        N(OP_BININT1, "BININT1")
        N(OP_LONG, "LONG")
        N(OP_BININT2, "BININT2")
        N(OP_NONE, "NONE")
        N(OP_PERSID, "PERSID")
        N(OP_BINPERSID, "BINPERSID")
        N(OP_REDUCE, "REDUCE")
        N(OP_STRING, "STRING")
        N(OP_BINSTRING, "BINSTRING")
        N(OP_SHORT_BINSTRING, "SHORT_BINSTRING")
        N(OP_UNICODE, "UNICODE")
        N(OP_BINUNICODE, "BINUNICODE")
        N(OP_APPEND, "APPEND")
        N(OP_BUILD, "BUILD")
        N(OP_GLOBAL, "GLOBAL")
        N(OP_DICT, "DICT")
        N(OP_EMPTY_DICT, "EMPTY_DICT")
        N(OP_APPENDS, "APPENDS")
        N(OP_GET, "GET")
        N(OP_BINGET, "BINGET")
        N(OP_INST, "INST")
        N(OP_LONG_BINGET, "LONG_BINGET")
        N(OP_LIST, "LIST")
        N(OP_EMPTY_LIST, "EMPTY_LIST")
        N(OP_OBJ, "OBJ")
        N(OP_PUT, "PUT")
        N(OP_BINPUT, "BINPUT")
        N(OP_LONG_BINPUT, "LONG_BINPUT")
        N(OP_SETITEM, "SETITEM")
        N(OP_TUPLE, "TUPLE")
        N(OP_EMPTY_TUPLE, "EMPTY_TUPLE")
        N(OP_SETITEMS, "SETITEMS")
        N(OP_BINFLOAT, "BINFLOAT")
        N(OP_PROTO, "PROTO")
        N(OP_NEWOBJ, "NEWOBJ")
        N(OP_EXT1, "EXT1")
        N(OP_EXT2, "EXT2")
        N(OP_EXT4, "EXT4")
        N(OP_TUPLE1, "TUPLE1")
        N(OP_TUPLE2, "TUPLE2")
        N(OP_TUPLE3, "TUPLE3")
        N(OP_NEWTRUE, "NEWTRUE")
        N(OP_NEWFALSE, "NEWFALSE")
        N(OP_LONG1, "LONG1")
        N(OP_LONG4, "LONG4")
        N(OP_BINBYTES, "BINBYTES")
        N(OP_SHORT_BINBYTES, "SHORT_BINBYTES")
        N(OP_SHORT_BINUNICODE, "SHORT_BINUNICODE")
        N(OP_BINUNICODE8, "BINUNICODE8")
        N(OP_BINBYTES8, "BINBYTES8")
        N(OP_EMPTY_SET, "EMPTY_SET")
        N(OP_ADDITEMS, "ADDITEMS")
        N(OP_FROZENSET, "FROZENSET")
        N(OP_NEWOBJ_EX, "NEWOBJ_EX")
        N(OP_STACK_GLOBAL, "STACK_GLOBAL")
        N(OP_MEMOIZE, "MEMOIZE")
        N(OP_FRAME, "FRAME")
        N(OP_BYTEARRAY8, "BYTEARRAY8")
        N(OP_NEXT_BUFFER, "NEXT_BUFFER")
        N(OP_READONLY_BUFFER, "READONLY_BUFFER")
#undef N
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

/* In run(): the opcode's argument needs n more bytes. */
#define NEED(n)                                                                                    \
    do {                                                                                           \
        if ((uint64_t)(v->end - v->p) < (uint64_t)(n)) {                                           \
            truncated(v);                                                                          \
            return NULL;                                                                           \
        }                                                                                          \
    } while (0)

static inline uint32_t rd_u32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static inline uint64_t rd_u64(const uint8_t *p) {
    return (uint64_t)rd_u32(p) | (uint64_t)rd_u32(p + 4) << 32;
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
        if (v->s->weights_only && func != v->st->OrderedDict) {
            int ok = ck_is_allowed_object(v->s, func);
            if (ok <= 0) {
                Py_DECREF(args);
                return ok < 0 ? -1
                              : refuse(v,
                                       "weights-only load refused to call %s: only allowlisted "
                                       "functions may be called",
                                       func);
            }
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
        if (v->s->weights_only) {
            int ok = ck_is_allowed_object(v->s, cls);
            if (ok <= 0) {
                Py_DECREF(a);
                if (ok == 0)
                    refuse(v,
                           "weights-only load refused to create an instance of %s: only "
                           "nn.Parameter and allowlisted classes may be created",
                           cls);
                goto out;
            }
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
    if (v->s->weights_only) {
        int ok = ck_is_allowed_object(v->s, cls);
        if (ok <= 0)
            return ok < 0 ? -1
                          : refuse(v,
                                   "weights-only load refused to instantiate %s: only "
                                   "allowlisted classes may be created",
                                   cls);
    }
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
        } else {
            int ok = ck_is_allowed_object(v->s, type);
            if (ok <= 0) {
                Py_DECREF(st_ready);
                return ok < 0 ? -1
                              : refuse(v,
                                       "weights-only load refused to BUILD an instance of %s: "
                                       "only Tensor, Parameter, OrderedDict and allowlisted "
                                       "types may be built",
                                       type);
            }
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

/* SETITEM(S): the pairs stack[k .. sp) into stack[k - 1]. */
static int set_items(vm *v, Py_ssize_t k) {
    if (v->scan) {
        drop_from(v, k);
        return 0;
    }
    if (fill_target(v, k) < 0)
        return -1;
    PyObject *target = v->stack[k - 1];
    if (v->s->weights_only && !is_setitem_target(v, target))
        return fail(v, v->st->UnpicklingError,
                    "weights-only load can only set items of dict, OrderedDict or Counter, "
                    "not %.80s",
                    Py_TYPE(target)->tp_name);
    if ((v->sp - k) % 2 != 0)
        return fail(v, v->st->UnpicklingError, "odd number of items for SETITEMS");
    if (PyDict_Check(target) && ck_count_keys(v->s, v->stack + k, v->sp - k, 2) < 0)
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

/* APPEND(S): stack[k .. sp) onto stack[k - 1]. */
static int append_items(vm *v, Py_ssize_t k) {
    if (v->scan) {
        drop_from(v, k);
        return 0;
    }
    if (fill_target(v, k) < 0)
        return -1;
    PyObject *target = v->stack[k - 1];
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

/* ADDITEMS: stack[k .. sp) into the set stack[k - 1]. */
static int add_items(vm *v, Py_ssize_t k) {
    if (v->scan) {
        drop_from(v, k);
        return 0;
    }
    if (fill_target(v, k) < 0)
        return -1;
    PyObject *target = v->stack[k - 1];
    if (PySet_Check(target) && !PyFrozenSet_Check(target)) {
        if (ck_count_keys(v->s, v->stack + k, v->sp - k, 1) < 0)
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
    return push_d(v, r, 0); /* the storage's one reference (tensors.c charges storages) */
}

/* ---- the loop ----------------------------------------------------------- */

static PyObject *run(vm *v) {
    ck_state *st = v->st;
    for (;;) {
        if (v->p >= v->end) {
            truncated(v);
            return NULL;
        }
        v->op_pos = (size_t)(v->p - v->start);
        v->op = *v->p++;
        int rc = 0;
        switch (v->op) {
        case OP_PROTO:
            if (v->end == v->p) {
                truncated(v);
                return NULL;
            }
            v->proto = *v->p++;
            if (v->proto > 5)
                rc = fail(v, st->UnpicklingError, "unsupported pickle protocol %d", v->proto);
            break;
        case OP_FRAME: {
            if ((uint64_t)(v->end - v->p) < 8) {
                truncated(v);
                return NULL;
            }
            uint64_t n = rd_u64(v->p);
            v->p += 8;
            if (n > (uint64_t)(v->end - v->p))
                rc = truncated(v);
            break;
        }
        case OP_STOP: {
            PyObject *r = pop(v);
            if (r == NULL)
                return NULL;
            Py_SETREF(r, ck_clean(v->s, r));
            return r;
        }
        case OP_MARK:
            if (v->mp == v->mcap &&
                (charge(v, (uint64_t)(v->mcap ? v->mcap : 64) * sizeof(Py_ssize_t)) < 0 ||
                 grow((void **)&v->marks, &v->mcap, sizeof(Py_ssize_t)) < 0))
                return NULL;
            v->marks[v->mp++] = v->sp;
            break;
        case OP_POP:
            if (v->mp > 0 && v->marks[v->mp - 1] == v->sp) {
                v->mp--;
            } else {
                PyObject *o = pop(v);
                if (o == NULL)
                    return NULL;
                Py_DECREF(o);
            }
            break;
        case OP_POP_MARK: {
            Py_ssize_t k = pop_mark(v);
            if (k < 0)
                return NULL;
            drop_from(v, k);
            break;
        }
        case OP_DUP: {
            PyObject *o = top(v);
            if (o == NULL)
                return NULL;
            rc = push_d(v, Py_NewRef(o), v->depth[v->sp - 1]);
            break;
        }
        case OP_NONE:
            rc = push(v, Py_NewRef(Py_None));
            break;
        case OP_NEWTRUE:
            rc = push(v, Py_NewRef(Py_True));
            break;
        case OP_NEWFALSE:
            rc = push(v, Py_NewRef(Py_False));
            break;
        case OP_BININT:
            NEED(4);
            rc = push(v, PyLong_FromLong((long)(int32_t)rd_u32(v->p)));
            v->p += 4;
            break;
        case OP_BININT1:
            NEED(1);
            rc = push(v, PyLong_FromLong(v->p[0]));
            v->p += 1;
            break;
        case OP_BININT2:
            NEED(2);
            rc = push(v, PyLong_FromLong((long)v->p[0] | (long)v->p[1] << 8));
            v->p += 2;
            break;
        case OP_LONG1: {
            NEED(1);
            size_t n = v->p[0];
            v->p += 1;
            NEED(n);
            if (charge(v, n) < 0)
                return NULL;
            rc = push(v, decode_long(v->p, n));
            v->p += n;
            break;
        }
        case OP_LONG4: {
            NEED(4);
            int32_t n = (int32_t)rd_u32(v->p);
            v->p += 4;
            if (n < 0) {
                rc = fail(v, st->UnpicklingError, "LONG pickle has negative byte count");
                break;
            }
            NEED(n);
            if (charge(v, 2 * (uint64_t)n) < 0) /* the digits, and from_bytes' bytes */
                return NULL;
            rc = push(v, decode_long(v->p, (size_t)n));
            v->p += n;
            break;
        }
        case OP_INT:
        case OP_LONG: {
            const char *line = NULL;
            size_t n = 0;
            if (read_line(v, &line, &n) < 0)
                return NULL;
            if (v->op == OP_INT && n == 2 && line[0] == '0' && (line[1] == '0' || line[1] == '1')) {
                rc = push(v, Py_NewRef(line[1] == '1' ? Py_True : Py_False));
                break;
            }
            if (v->op == OP_LONG && n > 0 && line[n - 1] == 'L')
                n--;
            if (charge(v, n) < 0)
                return NULL;
            char *c = line_copy(v, line, n);
            if (c == NULL)
                return NULL;
            PyObject *x = PyLong_FromString(c, NULL, 0);
            PyMem_Free(c);
            rc = x ? push(v, x) : fail_call(v);
            break;
        }
        case OP_FLOAT: {
            const char *line = NULL;
            size_t n = 0;
            if (read_line(v, &line, &n) < 0)
                return NULL;
            PyObject *b = PyBytes_FromStringAndSize(line, (Py_ssize_t)n);
            PyObject *x = b ? PyFloat_FromString(b) : NULL;
            Py_XDECREF(b);
            rc = x ? push(v, x) : fail_call(v);
            break;
        }
        case OP_BINFLOAT: {
            NEED(8);
            double d = PyFloat_Unpack8((const char *)v->p, 0);
            v->p += 8;
            if (d == -1.0 && PyErr_Occurred())
                return NULL;
            rc = push(v, PyFloat_FromDouble(d));
            break;
        }
        case OP_BINUNICODE:
        case OP_SHORT_BINUNICODE:
        case OP_BINUNICODE8: {
            uint64_t n;
            if (v->op == OP_SHORT_BINUNICODE) {
                NEED(1);
                n = v->p[0];
                v->p += 1;
            } else if (v->op == OP_BINUNICODE) {
                NEED(4);
                n = rd_u32(v->p);
                v->p += 4;
            } else {
                NEED(8);
                n = rd_u64(v->p);
                v->p += 8;
            }
            NEED(n);
            PyObject *x = PyUnicode_DecodeUTF8((const char *)v->p, (Py_ssize_t)n, "surrogatepass");
            v->p += n;
            rc = x ? push(v, x) : fail_call(v);
            break;
        }
        case OP_SHORT_BINSTRING:
        case OP_BINSTRING: {
            uint64_t n;
            if (v->op == OP_SHORT_BINSTRING) {
                NEED(1);
                n = v->p[0];
                v->p += 1;
            } else {
                NEED(4);
                int32_t m = (int32_t)rd_u32(v->p);
                v->p += 4;
                if (m < 0) {
                    rc = fail(v, st->UnpicklingError, "BINSTRING pickle has negative byte count");
                    break;
                }
                n = (uint64_t)m;
            }
            NEED(n);
            PyObject *x = decode_string(v, (const char *)v->p, (Py_ssize_t)n);
            v->p += n;
            rc = x ? push(v, x) : fail_call(v);
            break;
        }
        case OP_STRING: {
            const char *line = NULL;
            size_t n = 0;
            if (read_line(v, &line, &n) < 0)
                return NULL;
            if (n < 2 || line[0] != line[n - 1] || (line[0] != '\'' && line[0] != '"')) {
                rc = fail(v, st->UnpicklingError, "the STRING opcode argument must be quoted");
                break;
            }
            PyObject *raw = PyBytes_DecodeEscape(line + 1, (Py_ssize_t)n - 2, NULL, 0, NULL);
            if (raw == NULL) {
                rc = fail_call(v);
                break;
            }
            PyObject *x = decode_string(v, PyBytes_AS_STRING(raw), PyBytes_GET_SIZE(raw));
            Py_DECREF(raw);
            rc = x ? push(v, x) : fail_call(v);
            break;
        }
        case OP_UNICODE: {
            const char *line = NULL;
            size_t n = 0;
            if (read_line(v, &line, &n) < 0)
                return NULL;
            PyObject *x = PyUnicode_DecodeRawUnicodeEscape(line, (Py_ssize_t)n, NULL);
            rc = x ? push(v, x) : fail_call(v);
            break;
        }
        case OP_BINBYTES:
        case OP_SHORT_BINBYTES:
        case OP_BINBYTES8:
        case OP_BYTEARRAY8: {
            uint64_t n;
            if (v->op == OP_SHORT_BINBYTES) {
                NEED(1);
                n = v->p[0];
                v->p += 1;
            } else if (v->op == OP_BINBYTES) {
                NEED(4);
                n = rd_u32(v->p);
                v->p += 4;
            } else {
                NEED(8);
                n = rd_u64(v->p);
                v->p += 8;
            }
            NEED(n);
            PyObject *x = v->op == OP_BYTEARRAY8
                              ? PyByteArray_FromStringAndSize((const char *)v->p, (Py_ssize_t)n)
                              : PyBytes_FromStringAndSize((const char *)v->p, (Py_ssize_t)n);
            v->p += n;
            rc = push(v, x);
            break;
        }
        case OP_NEXT_BUFFER:
        case OP_READONLY_BUFFER:
            rc = fail(v, st->UnpicklingError,
                      "out-of-band buffers (pickle protocol 5) cannot appear in a checkpoint");
            break;
        case OP_EMPTY_TUPLE:
            rc = push_new(v, PyTuple_New(0), 1);
            break;
        case OP_TUPLE: {
            Py_ssize_t k = pop_mark(v);
            if (k < 0)
                return NULL;
            rc = push_tuple(v, k);
            break;
        }
        case OP_TUPLE1:
        case OP_TUPLE2:
        case OP_TUPLE3: {
            Py_ssize_t n = v->op - OP_TUPLE1 + 1;
            if (v->sp - fence(v) < n) {
                underflow(v);
                return NULL;
            }
            rc = push_tuple(v, v->sp - n);
            break;
        }
        case OP_EMPTY_LIST:
            rc = push_new(v, PyList_New(0), 1);
            break;
        case OP_LIST: {
            Py_ssize_t k = pop_mark(v);
            if (k < 0)
                return NULL;
            uint32_t d = span_depth(v, k);
            rc = push_new(v, take_list(v, k), d);
            break;
        }
        case OP_EMPTY_DICT:
            rc = push_new(v, PyDict_New(), 1);
            break;
        case OP_DICT: {
            Py_ssize_t k = pop_mark(v);
            if (k < 0)
                return NULL;
            if ((v->sp - k) % 2 != 0) {
                rc = fail(v, st->UnpicklingError, "odd number of items for DICT");
                break;
            }
            uint32_t depth = span_depth(v, k);
            if (depth > CK_MAX_DEPTH) {
                rc = too_deep(v);
                break;
            }
            if (clean_span(v, k) < 0 || ck_count_keys(v->s, v->stack + k, v->sp - k, 2) < 0)
                return NULL;
            PyObject *d = PyDict_New();
            if (d == NULL)
                return NULL;
            for (Py_ssize_t i = k; i < v->sp; i += 2) {
                if (PyDict_SetItem(d, v->stack[i], v->stack[i + 1]) < 0) {
                    Py_DECREF(d);
                    d = NULL;
                    break;
                }
            }
            if (d == NULL) {
                rc = fail_call(v);
                break;
            }
            drop_from(v, k);
            rc = push_new(v, d, depth);
            break;
        }
        case OP_EMPTY_SET:
            rc = push_new(v, PySet_New(NULL), 1);
            break;
        case OP_FROZENSET: {
            Py_ssize_t k = pop_mark(v);
            if (k < 0)
                return NULL;
            uint32_t depth = span_depth(v, k);
            if (depth > CK_MAX_DEPTH) {
                rc = too_deep(v);
                break;
            }
            if (clean_span(v, k) < 0 || ck_count_keys(v->s, v->stack + k, v->sp - k, 1) < 0)
                return NULL;
            PyObject *items = take_tuple(v, k);
            PyObject *fs = items ? PyFrozenSet_New(items) : NULL;
            Py_XDECREF(items);
            rc = fs ? push_new(v, fs, depth) : fail_call(v);
            break;
        }
        case OP_APPEND: {
            PyObject *item = pop(v);
            if (item == NULL)
                return NULL;
            PyObject *target = top(v);
            if (target == NULL) {
                Py_DECREF(item);
                return NULL;
            }
            if (push_d(v, item, v->depth[v->sp]) < 0)
                return NULL;
            rc = append_items(v, v->sp - 1);
            break;
        }
        case OP_APPENDS:
        case OP_SETITEMS:
        case OP_ADDITEMS: {
            Py_ssize_t k = pop_mark(v);
            if (k < 0)
                return NULL;
            if (k <= fence(v)) {
                underflow(v);
                return NULL;
            }
            rc = v->op == OP_APPENDS    ? append_items(v, k)
                 : v->op == OP_SETITEMS ? set_items(v, k)
                                        : add_items(v, k);
            break;
        }
        case OP_SETITEM: {
            if (v->sp - fence(v) < 3) {
                underflow(v);
                return NULL;
            }
            rc = set_items(v, v->sp - 2);
            break;
        }
        case OP_GET:
        case OP_BINGET:
        case OP_LONG_BINGET: {
            uint64_t idx;
            if (v->op == OP_GET) {
                if (read_decimal_index(v, &idx) < 0)
                    return NULL;
            } else if (v->op == OP_BINGET) {
                NEED(1);
                idx = v->p[0];
                v->p += 1;
            } else {
                NEED(4);
                idx = rd_u32(v->p);
                v->p += 4;
            }
            rc = memo_get(v, idx);
            break;
        }
        case OP_PUT:
        case OP_BINPUT:
        case OP_LONG_BINPUT:
        case OP_MEMOIZE: {
            uint64_t idx;
            if (v->op == OP_PUT) {
                if (read_decimal_index(v, &idx) < 0)
                    return NULL;
            } else if (v->op == OP_BINPUT) {
                NEED(1);
                idx = v->p[0];
                v->p += 1;
            } else if (v->op == OP_LONG_BINPUT) {
                NEED(4);
                idx = rd_u32(v->p);
                v->p += 4;
            } else {
                idx = v->memo_count;
            }
            PyObject *o = top(v);
            if (o == NULL)
                return NULL;
            rc = memo_put(v, idx, o, v->depth[v->sp - 1]);
            break;
        }
        case OP_GLOBAL: {
            const char *ml = NULL, *nl = NULL;
            size_t mn = 0, nn = 0;
            if (read_line(v, &ml, &mn) < 0 || read_line(v, &nl, &nn) < 0)
                return NULL;
            PyObject *module = PyUnicode_DecodeUTF8(ml, (Py_ssize_t)mn, "strict");
            PyObject *name = module ? PyUnicode_DecodeUTF8(nl, (Py_ssize_t)nn, "strict") : NULL;
            rc = name ? do_global(v, module, name) : fail_call(v);
            Py_XDECREF(module);
            Py_XDECREF(name);
            break;
        }
        case OP_STACK_GLOBAL: {
            PyObject *name = pop(v);
            PyObject *module = name ? pop(v) : NULL;
            if (module == NULL) {
                Py_XDECREF(name);
                return NULL;
            }
            if (!PyUnicode_CheckExact(name) || !PyUnicode_CheckExact(module))
                rc = fail(v, st->UnpicklingError, "STACK_GLOBAL requires str");
            else
                rc = do_global(v, module, name);
            Py_DECREF(module);
            Py_DECREF(name);
            break;
        }
        case OP_EXT1:
            NEED(1);
            rc = do_ext(v, v->p[0]);
            v->p += 1;
            break;
        case OP_EXT2:
            NEED(2);
            rc = do_ext(v, (long)v->p[0] | (long)v->p[1] << 8);
            v->p += 2;
            break;
        case OP_EXT4:
            NEED(4);
            rc = do_ext(v, (long)(int32_t)rd_u32(v->p));
            v->p += 4;
            break;
        case OP_REDUCE:
            rc = do_reduce(v);
            break;
        case OP_NEWOBJ:
            rc = do_newobj(v, 0);
            break;
        case OP_NEWOBJ_EX:
            rc = do_newobj(v, 1);
            break;
        case OP_BUILD:
            rc = do_build(v);
            break;
        case OP_INST: {
            const char *ml = NULL, *nl = NULL;
            size_t mn = 0, nn = 0;
            if (read_line(v, &ml, &mn) < 0 || read_line(v, &nl, &nn) < 0)
                return NULL;
            Py_ssize_t k = pop_mark(v);
            if (k < 0)
                return NULL;
            PyObject *module = PyUnicode_DecodeASCII(ml, (Py_ssize_t)mn, "strict");
            PyObject *name = module ? PyUnicode_DecodeASCII(nl, (Py_ssize_t)nn, "strict") : NULL;
            PyObject *cls = name == NULL ? NULL
                            : v->scan    ? Py_NewRef(Py_None)
                                         : ck_resolve_global(v->s, module, name, v->proto);
            Py_XDECREF(module);
            Py_XDECREF(name);
            if (cls == NULL) {
                rc = fail_call(v);
                break;
            }
            uint32_t depth = span_depth(v, k);
            PyObject *args = take_tuple(v, k);
            rc = args ? instantiate(v, cls, args, depth) : -1;
            Py_XDECREF(args);
            Py_DECREF(cls);
            break;
        }
        case OP_OBJ: {
            Py_ssize_t k = pop_mark(v);
            if (k < 0)
                return NULL;
            if (v->sp - k < 1) {
                rc = fail(v, st->UnpicklingError, "OBJ needs a class after its MARK");
                break;
            }
            if (!v->scan && clean_slot(v, k) < 0)
                return NULL;
            PyObject *cls = Py_NewRef(v->stack[k]);
            uint32_t depth = span_depth(v, k + 1);
            PyObject *args = take_tuple(v, k + 1);
            drop_from(v, k);
            rc = args ? instantiate(v, cls, args, depth) : -1;
            Py_XDECREF(args);
            Py_DECREF(cls);
            break;
        }
        case OP_PERSID: {
            const char *line = NULL;
            size_t n = 0;
            if (read_line(v, &line, &n) < 0)
                return NULL;
            PyObject *pid = PyUnicode_DecodeASCII(line, (Py_ssize_t)n, "strict");
            rc = pid ? do_persid(v, pid) : fail_call(v);
            break;
        }
        case OP_BINPERSID: {
            PyObject *pid = pop(v);
            if (pid == NULL)
                return NULL;
            rc = do_persid(v, pid);
            break;
        }
        default:
            rc = fail(v, st->UnpicklingError, "invalid opcode 0x%02x", v->op);
            break;
        }
        if (rc < 0)
            return NULL;
    }
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

int ck_unpickle_scan(ck_session *s, const uint8_t *data, size_t len, const char *what,
                     size_t *consumed, PyObject *pids) {
    PyObject *r = unpickle(s, data, len, what, consumed, pids);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

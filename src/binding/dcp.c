#include "dcp.h"

#include <string.h>

#include "core/atomic.h"
#include "core/zipwrite.h"
#include "budget.h"
#include "errors.h"
#include "globals.h"
#include "heaptype.h"
#include "load.h"
#include "mapping.h"
#include "tensors.h"
#include "unpickler.h"

/* Compressed records of an item may inflate to at most this many times the
 * item's size (at least 1 MiB), as a weights-only ckptio.load allows. */
#define DCP_INFLATE_RATIO 16
#define DCP_INFLATE_FLOOR ((uint64_t)1 << 20)

/* Sets the options every decode of this unit uses: weights-only, every
 * storage to the CPU, utf-8 strings. Returns 0 or -1. */
static int session_options(ck_session *s, PyObject *user_globals) {
    s->weights_only = 1;
    s->map_kind = CK_MAP_CPU;
    s->map_location = Py_None;
    s->restore = Py_None;
    s->user_globals = user_globals;
    uint64_t budget = (uint64_t)s->len * DCP_INFLATE_RATIO;
    s->inflate_budget = budget > DCP_INFLATE_FLOOR ? budget : DCP_INFLATE_FLOOR;
    ck_budget_begin(s); /* the memory bound of a load of this unit (budget.h) */
    s->encoding = PyUnicode_FromString("utf-8");
    s->errors = s->encoding ? PyUnicode_FromString("strict") : NULL;
    if (s->errors == NULL)
        return -1;
    return ck_user_globals_prepare(s);
}

/* ---- dcp_item ------------------------------------------------------------- */

static PyObject *py_dcp_item(PyObject *module, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"mapping", "offset", "length", "name", "aligned", NULL};
    ck_state *st = ck_get_state(module);
    PyObject *mapping, *name;
    unsigned long long offset, length;
    int aligned = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OKKU|$p:dcp_item", kwlist, &mapping, &offset,
                                     &length, &name, &aligned))
        return NULL;
    if (ck_torch_ready(st) < 0 || ck_mapping_arg(st, mapping, "dcp_item") < 0)
        return NULL;
    size_t size = ((ck_mapping *)mapping)->region.len;
    if (offset > size || length > size - offset)
        return ck_raise(st->CheckpointError, name,
                        "the item at offset %llu with %llu bytes lies outside the file "
                        "(%zu bytes): truncated file or wrong metadata",
                        offset, length, size);
    ck_session s;
    ck_session_begin(&s, st, name, mapping);
    s.buf += offset;
    s.len = (size_t)length;
    s.fd_base = offset; /* the item is a range of the mapped file */
    PyObject *result = NULL;
    s.unaligned_ok = !aligned;
    if (session_options(&s, NULL) == 0)
        result = ck_load_any(&s);
    ck_session_end(&s);
    if (result == st->torchscript_marker) /* refused under weights_only: not reached */
        Py_CLEAR(result);
    return result;
}

/* ---- unpickle --------------------------------------------------------------- */

static PyObject *py_unpickle(PyObject *module, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"mapping", "name", "user_globals", "weights_only", NULL};
    ck_state *st = ck_get_state(module);
    PyObject *mapping, *name, *user_globals = Py_None;
    int weights_only = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OU|O$p:unpickle", kwlist, &mapping, &name,
                                     &user_globals, &weights_only))
        return NULL;
    if (ck_torch_ready(st) < 0 || ck_mapping_arg(st, mapping, "unpickle") < 0 ||
        ck_user_globals_arg(user_globals, "unpickle") < 0)
        return NULL;
    ck_session s;
    ck_session_begin(&s, st, name, mapping);
    PyObject *result = NULL;
    if (session_options(&s, user_globals == Py_None ? NULL : user_globals) == 0) {
        s.weights_only = weights_only;
        ck_budget_begin(&s); /* the trusted floor when weights_only is off */
        if (s.len == 0)
            ck_raise(st->CheckpointError, name, "the file is empty");
        else
            result = ck_unpickle(&s, s.buf, s.len, "pickle", NULL);
    }
    ck_session_end(&s);
    return result;
}

/* ---- AtomicFile ------------------------------------------------------------- */

typedef struct atomic_file {
    PyObject_HEAD ck_atomic at;
    ck_fd_sink sink;
    int open;       /* 1 until commit or abort */
    PyObject *path; /* str, for messages */
} atomic_file;

static void atomic_file_dealloc(atomic_file *self) {
    PyTypeObject *tp = Py_TYPE(self);
    if (self->open)
        ck_atomic_abort(&self->at);
    Py_CLEAR(self->path);
    tp->tp_free(self);
    Py_DECREF(tp);
}

static ck_state *file_state(atomic_file *self) {
    return ck_get_state(PyType_GetModule(Py_TYPE(self)));
}

static int check_open(atomic_file *self) {
    if (self->open)
        return 0;
    PyErr_SetString(PyExc_ValueError, "I/O operation on a committed or aborted AtomicFile");
    return -1;
}

static PyObject *atomic_file_write(atomic_file *self, PyObject *data) {
    if (check_open(self) < 0)
        return NULL;
    Py_buffer buf;
    if (PyObject_GetBuffer(data, &buf, PyBUF_SIMPLE) < 0)
        return NULL;
    if (buf.len == 0) {
        PyBuffer_Release(&buf);
        return PyLong_FromLong(0);
    }
    struct iovec iov = {buf.buf, (size_t)buf.len};
    ck_error err;
    ck_error_clear(&err);
    ck_status status;
    Py_BEGIN_ALLOW_THREADS
        status = ck_zipw_fd_sink(&self->sink, &iov, 1, &err);
    Py_END_ALLOW_THREADS
    Py_ssize_t n = buf.len;
    PyBuffer_Release(&buf);
    if (status != CK_OK)
        return ck_raise_core(file_state(self), self->path, &err);
    return PyLong_FromSsize_t(n);
}

static PyObject *atomic_file_tell(atomic_file *self, PyObject *unused) {
    (void)unused;
    return PyLong_FromUnsignedLongLong(self->sink.written);
}

static PyObject *atomic_file_fileno(atomic_file *self, PyObject *unused) {
    (void)unused;
    if (check_open(self) < 0)
        return NULL;
    return PyLong_FromLong(self->at.fd);
}

static PyObject *atomic_file_flush(atomic_file *self, PyObject *unused) {
    (void)unused;
    if (check_open(self) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *atomic_file_commit(atomic_file *self, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"fsync", NULL};
    int do_fsync = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|p:commit", kwlist, &do_fsync))
        return NULL;
    if (check_open(self) < 0)
        return NULL;
    self->open = 0;
    ck_error err;
    ck_error_clear(&err);
    ck_status status;
    Py_BEGIN_ALLOW_THREADS
        status = ck_atomic_commit(&self->at, do_fsync, &err);
    Py_END_ALLOW_THREADS
    if (status != CK_OK)
        return ck_raise_core(file_state(self), self->path, &err);
    Py_RETURN_NONE;
}

static PyObject *atomic_file_abort(atomic_file *self, PyObject *unused) {
    (void)unused;
    if (self->open) {
        self->open = 0;
        ck_atomic_abort(&self->at);
    }
    Py_RETURN_NONE;
}

static PyObject *atomic_file_enter(atomic_file *self, PyObject *unused) {
    (void)unused;
    return Py_NewRef(self);
}

static PyObject *atomic_file_exit(atomic_file *self, PyObject *args) {
    (void)args;
    return atomic_file_abort(self, NULL);
}

static PyObject *atomic_file_true(atomic_file *self, PyObject *unused) {
    (void)self;
    (void)unused;
    Py_RETURN_TRUE;
}

static PyObject *atomic_file_false(atomic_file *self, PyObject *unused) {
    (void)self;
    (void)unused;
    Py_RETURN_FALSE;
}

static PyObject *atomic_file_get_closed(atomic_file *self, void *closure) {
    (void)closure;
    return PyBool_FromLong(!self->open);
}

static PyObject *atomic_file_get_name(atomic_file *self, void *closure) {
    (void)closure;
    return Py_NewRef(self->path);
}

static PyMethodDef atomic_file_methods[] = {
    {"write", (PyCFunction)atomic_file_write, METH_O,
     "write(b) -> int: appends all of b (the GIL is released during the write)."},
    {"tell", (PyCFunction)atomic_file_tell, METH_NOARGS, "Bytes written so far."},
    {"fileno", (PyCFunction)atomic_file_fileno, METH_NOARGS, "The temporary file's descriptor."},
    {"flush", (PyCFunction)atomic_file_flush, METH_NOARGS, "Nothing to flush: writes are direct."},
    {"commit", (PyCFunction)(void (*)(void))atomic_file_commit, METH_VARARGS | METH_KEYWORDS,
     "commit(fsync=True): fsync, rename over the target, fsync the directory."},
    {"abort", (PyCFunction)atomic_file_abort, METH_NOARGS,
     "Removes the temporary file; the target stays as it was."},
    {"writable", (PyCFunction)atomic_file_true, METH_NOARGS, NULL},
    {"readable", (PyCFunction)atomic_file_false, METH_NOARGS, NULL},
    {"seekable", (PyCFunction)atomic_file_false, METH_NOARGS, NULL},
    {"__enter__", (PyCFunction)atomic_file_enter, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)atomic_file_exit, METH_VARARGS,
     "Aborts the file unless it was committed."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef atomic_file_getset[] = {
    {"closed", (getter)atomic_file_get_closed, NULL, "True once committed or aborted.", NULL},
    {"name", (getter)atomic_file_get_name, NULL, "The target path.", NULL},
    {NULL},
};

static PyType_Slot atomic_file_slots[] = {
    {Py_tp_dealloc, atomic_file_dealloc},
    {Py_tp_methods, atomic_file_methods},
    {Py_tp_getset, atomic_file_getset},
    {Py_tp_doc, "A new file for a target path (src/core/atomic.c): written sequentially, "
                "it replaces the target only on commit(); until then, and after abort() or "
                "a crash, the target is untouched."},
    {0, NULL},
};

static PyType_Spec atomic_file_spec =
    CK_TYPE_SPEC("AtomicFile", sizeof(atomic_file), Py_TPFLAGS_IMMUTABLETYPE, atomic_file_slots);

int ck_dcp_init(PyObject *m, ck_state *st) {
    return ck_new_module_type(m, &atomic_file_spec, &st->AtomicFileType);
}

static PyObject *py_atomic_file(PyObject *module, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"path", "writeback", NULL};
    ck_state *st = ck_get_state(module);
    PyObject *path;
    int writeback = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "U|$p:atomic_file", kwlist, &path, &writeback))
        return NULL;
    PyTypeObject *tp = ck_get_state(module)->AtomicFileType; /* borrowed */
    PyObject *encoded = PyUnicode_EncodeFSDefault(path);
    if (encoded == NULL)
        return NULL;
    atomic_file *self = PyObject_New(atomic_file, tp);
    if (self == NULL) {
        Py_DECREF(encoded);
        return NULL;
    }
    self->open = 0;
    self->path = Py_NewRef(path);
    memset(&self->at, 0, sizeof self->at);
    self->at.fd = self->at.dir_fd = -1;
    ck_error err;
    ck_error_clear(&err);
    ck_status status;
    const char *target = PyBytes_AS_STRING(encoded);
    Py_BEGIN_ALLOW_THREADS
        status = ck_atomic_open(&self->at, target, 0, &err);
    Py_END_ALLOW_THREADS
    Py_DECREF(encoded);
    if (status != CK_OK) {
        ck_raise_core(st, path, &err);
        Py_DECREF(self);
        return NULL;
    }
    self->open = 1;
    self->sink = (ck_fd_sink){self->at.fd, writeback, 0, 0};
    return (PyObject *)self;
}

PyMethodDef ck_dcp_methods[] = {
    {"dcp_item", (PyCFunction)(void (*)(void))py_dcp_item, METH_VARARGS | METH_KEYWORDS,
     "dcp_item(mapping, offset, length, name, *, aligned=True) -> object\n\n"
     "Decodes the torch.save archive at mapping[offset:offset+length] (one item of a\n"
     ".distcp file) with the loader: weights-only, storages on the CPU, tensors viewing\n"
     "the mapping (no copy). aligned=False leaves storages whose bytes are not aligned\n"
     "for their dtype in place (for tensors that are only copied from) instead of\n"
     "copying them to aligned memory."},
    {"unpickle", (PyCFunction)(void (*)(void))py_unpickle, METH_VARARGS | METH_KEYWORDS,
     "unpickle(mapping, name, user_globals=None, *, weights_only=True) -> object\n\n"
     "Runs the plain pickle held by mapping (e.g. a DCP .metadata file) through the\n"
     "loader's VM: under weights_only only torch's allowlist and user_globals resolve."},
    {"atomic_file", (PyCFunction)(void (*)(void))py_atomic_file, METH_VARARGS | METH_KEYWORDS,
     "atomic_file(path, *, writeback=True) -> AtomicFile\n\n"
     "A temporary file that replaces path on commit() (src/core/atomic.c); writes go\n"
     "through the zip writer's descriptor sink, starting writeback as data goes out."},
    {NULL, NULL, 0, NULL},
};

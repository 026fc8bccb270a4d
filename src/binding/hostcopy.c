#include "hostcopy.h"

#include <string.h>

#include "core/devcopy.h"
#include "core/memcopy.h"
#include "errors.h"
#include "heaptype.h"

/* ---- HostArena ---------------------------------------------------------------- */

typedef struct host_arena {
    PyObject_HEAD ck_cudart rt; /* the runtime that allocated data, kept open */
    void *data;                 /* the arena, NULL when len == 0 */
    size_t len;
    ck_devcopy_memory memory; /* how data was allocated, so how to free it */
    Py_ssize_t exports;
} host_arena;

static void arena_dealloc(host_arena *self) {
    PyTypeObject *tp = Py_TYPE(self);
    ck_devcopy_free(&self->rt, self->data, self->memory);
    ck_cudart_close(&self->rt);
    tp->tp_free(self);
    Py_DECREF(tp);
}

static int arena_getbuffer(host_arena *self, Py_buffer *view, int flags) {
    static char empty[1];
    void *data = self->data != NULL ? self->data : (void *)empty;
    if (PyBuffer_FillInfo(view, (PyObject *)self, data, (Py_ssize_t)self->len, 0, flags) < 0)
        return -1;
    self->exports++;
    return 0;
}

static void arena_releasebuffer(host_arena *self, Py_buffer *view) {
    (void)view;
    self->exports--;
}

static PyObject *arena_repr(host_arena *self) {
    return PyUnicode_FromFormat("<ckptio HostArena of %zu %s bytes>", self->len,
                                self->memory == CK_DEVCOPY_PINNED ? "pinned" : "pageable");
}

static PyObject *arena_get_size(host_arena *self, void *closure) {
    (void)closure;
    return PyLong_FromSize_t(self->len);
}

static PyObject *arena_get_pinned(host_arena *self, void *closure) {
    (void)closure;
    return PyBool_FromLong(self->memory == CK_DEVCOPY_PINNED);
}

static PyGetSetDef arena_getset[] = {
    {"size", (getter)arena_get_size, NULL, "Number of bytes.", NULL},
    {"pinned", (getter)arena_get_pinned, NULL, "True: page-locked (cudaMallocHost) memory.", NULL},
    {NULL},
};

static PyType_Slot arena_slots[] = {
    {Py_tp_dealloc, arena_dealloc},
    {Py_tp_repr, arena_repr},
    {Py_tp_getset, arena_getset},
    {Py_bf_getbuffer, arena_getbuffer},
    {Py_bf_releasebuffer, arena_releasebuffer},
    {Py_tp_doc, "Host memory filled by copy_to_host; freed (cudaFreeHost when pinned) when "
                "the last tensor built over it dies."},
    {0, NULL},
};

static PyType_Spec arena_spec =
    CK_TYPE_SPEC("HostArena", sizeof(host_arena), Py_TPFLAGS_IMMUTABLETYPE, arena_slots);

int ck_hostcopy_init(PyObject *m, ck_state *st) {
    return ck_new_module_type(m, &arena_spec, &st->HostArenaType);
}

/* ---- copy_to_host ---------------------------------------------------------------- */

/* Fills seg from a (data_ptr, nbytes, device) tuple. */
static int parse_segment(PyObject *item, Py_ssize_t i, ck_devcopy_segment *seg) {
    if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 3) {
        PyErr_Format(PyExc_TypeError,
                     "copy_to_host: segment %zd must be a (data_ptr, nbytes, device) tuple", i);
        return -1;
    }
    unsigned long long src = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(item, 0));
    if (src == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    size_t nbytes = PyLong_AsSize_t(PyTuple_GET_ITEM(item, 1));
    if (nbytes == (size_t)-1 && PyErr_Occurred())
        return -1;
    int overflow = 0;
    long device = PyLong_AsLongAndOverflow(PyTuple_GET_ITEM(item, 2), &overflow);
    if (device == -1 && PyErr_Occurred())
        return -1;
    if (overflow || device < 0 || device > 0xFFFF) {
        PyErr_Format(PyExc_ValueError, "copy_to_host: segment %zd: bad device index", i);
        return -1;
    }
    if (src == 0 && nbytes != 0) {
        PyErr_Format(PyExc_ValueError, "copy_to_host: segment %zd: null data pointer", i);
        return -1;
    }
    seg->src = (uint64_t)src;
    seg->nbytes = nbytes;
    seg->device = (int)device;
    seg->offset = 0;
    return 0;
}

static PyObject *py_copy_to_host(PyObject *module, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"segments", "library", "pinned", NULL};
    PyObject *segments;
    PyObject *library = Py_None; /* borrowed */
    int pinned = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|O$p:copy_to_host", kwlist, &segments,
                                     &library, &pinned))
        return NULL;
    ck_devcopy_memory memory = pinned ? CK_DEVCOPY_PINNED : CK_DEVCOPY_PAGEABLE;
    ck_state *st = ck_get_state(module);
    PyTypeObject *tp = ck_get_state(module)->HostArenaType; /* borrowed */
    const char *path = NULL;
    if (library != Py_None) {
        path = PyUnicode_AsUTF8(library); /* borrowed from library */
        if (path == NULL)
            return NULL;
    }
    PyObject *seq = PySequence_Fast(segments, "copy_to_host: segments must be a sequence");
    if (seq == NULL) /* owned */
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    ck_devcopy_segment *segs = PyMem_New(ck_devcopy_segment, n ? n : 1);
    if (segs == NULL) {
        Py_DECREF(seq);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (parse_segment(PySequence_Fast_GET_ITEM(seq, i), i, &segs[i]) < 0) {
            PyMem_Free(segs);
            Py_DECREF(seq);
            return NULL;
        }
    }
    Py_DECREF(seq);

    PyObject *result = NULL;
    host_arena *arena = NULL;
    PyObject *offsets = NULL;
    ck_error err;
    ck_error_clear(&err);
    size_t total = 0;
    ck_cudart rt;
    memset(&rt, 0, sizeof rt);
    if (ck_devcopy_plan(segs, (size_t)n, CK_DEVCOPY_ALIGN, &total, &err) != CK_OK) {
        ck_raise_status(st, CK_FROM_CALLER, NULL, "copy_to_host", &err);
        goto done;
    }
    if (ck_cudart_open(path, &rt, &err) != CK_OK) {
        if (path == NULL && err.status == CK_E_NOTFOUND) {
            result = Py_NewRef(Py_None); /* no runtime: the caller copies tensor by tensor */
            goto done;
        }
        ck_raise_status(st, CK_FROM_CALLER, NULL, "copy_to_host", &err);
        goto done;
    }
    offsets = PyTuple_New(n); /* owned */
    if (offsets == NULL)
        goto done;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *off = PyLong_FromSize_t(segs[i].offset);
        if (off == NULL)
            goto done;
        PyTuple_SET_ITEM(offsets, i, off); /* stolen */
    }
    arena = PyObject_New(host_arena, tp); /* owned; holds a reference to tp */
    if (arena == NULL)
        goto done;
    arena->data = NULL;
    arena->len = 0;
    arena->exports = 0;
    arena->memory = memory;
    memset(&arena->rt, 0, sizeof arena->rt);

    void *host = NULL;
    ck_status status;
    /* the copies can take tens of milliseconds; they touch no Python object */
    PyThreadState *ts = PyEval_SaveThread();
    status = ck_devcopy_run(&rt, segs, (size_t)n, total, memory, &host, &err);
    PyEval_RestoreThread(ts);
    if (status != CK_OK) {
        /* the message names the arena that could not be allocated, or the copy */
        const char *context = "copy_to_host: device-to-host copy";
        char arena_context[96];
        if (status == CK_E_NOMEM) {
            snprintf(arena_context, sizeof arena_context, "copy_to_host: %zu bytes of %s memory",
                     total, pinned ? "pinned" : "pageable");
            context = arena_context;
        }
        ck_raise_status(st, CK_FROM_CALLER, NULL, context, &err);
        goto done;
    }
    arena->rt = rt; /* the arena now owns the runtime reference */
    memset(&rt, 0, sizeof rt);
    arena->data = host;
    arena->len = total;
    result = PyTuple_Pack(2, (PyObject *)arena, offsets);
done:
    ck_cudart_close(&rt);
    Py_XDECREF(arena);
    Py_XDECREF(offsets);
    PyMem_Free(segs);
    return result;
}

/* ---- copy_into ------------------------------------------------------------------ */

/* Fills one (data_ptr, nbytes, device, offset) tuple; device -1 is host memory. */
static int parse_into_segment(PyObject *item, Py_ssize_t i, unsigned long long *src, size_t *nbytes,
                              long *device, size_t *offset) {
    if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 4) {
        PyErr_Format(PyExc_TypeError,
                     "copy_into: segment %zd must be a (data_ptr, nbytes, device, offset) tuple",
                     i);
        return -1;
    }
    *src = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(item, 0));
    if (*src == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    *nbytes = PyLong_AsSize_t(PyTuple_GET_ITEM(item, 1));
    if (*nbytes == (size_t)-1 && PyErr_Occurred())
        return -1;
    int overflow = 0;
    *device = PyLong_AsLongAndOverflow(PyTuple_GET_ITEM(item, 2), &overflow);
    if (*device == -1 && PyErr_Occurred())
        return -1;
    if (overflow || *device < -1 || *device > 0xFFFF) {
        PyErr_Format(PyExc_ValueError, "copy_into: segment %zd: bad device index", i);
        return -1;
    }
    *offset = PyLong_AsSize_t(PyTuple_GET_ITEM(item, 3));
    if (*offset == (size_t)-1 && PyErr_Occurred())
        return -1;
    if (*src == 0 && *nbytes != 0) {
        PyErr_Format(PyExc_ValueError, "copy_into: segment %zd: null data pointer", i);
        return -1;
    }
    return 0;
}

/* Host runs by memcpy, then device runs through the runtime; no Python. */
static ck_status copy_runs(const ck_cudart *rt, Py_buffer *arena, const ck_memcopy_segment *host,
                           size_t n_host, const ck_devcopy_segment *dev, size_t n_dev, int threads,
                           ck_error *err) {
    size_t total = (size_t)arena->len;
    ck_status status = ck_memcopy_segments(arena->buf, total, host, n_host, threads, err);
    if (status == CK_OK && n_dev > 0)
        status = ck_devcopy_into(rt, dev, n_dev, arena->buf, total, err);
    return status;
}

static PyObject *py_copy_into(PyObject *module, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"arena", "segments", "library", "threads", NULL};
    PyObject *arena_obj, *segments;
    PyObject *library = Py_None; /* borrowed */
    int threads = 2;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO|O$i:copy_into", kwlist, &arena_obj,
                                     &segments, &library, &threads))
        return NULL;
    ck_state *st = ck_get_state(module);
    const char *path = NULL;
    if (library != Py_None && (path = PyUnicode_AsUTF8(library)) == NULL)
        return NULL;
    Py_buffer arena;
    if (PyObject_GetBuffer(arena_obj, &arena, PyBUF_WRITABLE | PyBUF_SIMPLE) < 0)
        return NULL;
    PyObject *seq = PySequence_Fast(segments, "copy_into: segments must be a sequence");
    ck_memcopy_segment *host = NULL;
    ck_devcopy_segment *dev = NULL;
    PyObject *result = NULL;
    ck_cudart rt;
    memset(&rt, 0, sizeof rt);
    if (seq == NULL)
        goto done;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    host = PyMem_New(ck_memcopy_segment, n ? n : 1);
    dev = PyMem_New(ck_devcopy_segment, n ? n : 1);
    if (host == NULL || dev == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    size_t n_host = 0, n_dev = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned long long src;
        size_t nbytes, offset;
        long device;
        if (parse_into_segment(PySequence_Fast_GET_ITEM(seq, i), i, &src, &nbytes, &device,
                               &offset) < 0)
            goto done;
        if (device < 0)
            host[n_host++] = (ck_memcopy_segment){(const void *)(uintptr_t)src, nbytes, offset};
        else
            dev[n_dev++] = (ck_devcopy_segment){(uint64_t)src, nbytes, (int)device, offset};
    }
    ck_error err;
    ck_error_clear(&err);
    if (n_dev > 0 && ck_cudart_open(path, &rt, &err) != CK_OK) {
        ck_raise_status(st, CK_FROM_CALLER, NULL, "copy_into", &err);
        goto done;
    }
    /* the copies touch no Python object; the caller keeps the sources alive */
    PyThreadState *ts = PyEval_SaveThread();
    ck_status status = copy_runs(&rt, &arena, host, n_host, dev, n_dev, threads, &err);
    PyEval_RestoreThread(ts);
    /* a failing CUDA call (CK_E_IO) is named the copy's; the segments' and the
     * memory's failures speak for themselves */
    if (status != CK_OK)
        ck_raise_status(st, CK_FROM_CALLER, NULL,
                        status == CK_E_IO ? "copy_into: device-to-host copy" : "copy_into", &err);
    else
        result = Py_NewRef(Py_None);
done:
    ck_cudart_close(&rt);
    PyMem_Free(host);
    PyMem_Free(dev);
    Py_XDECREF(seq);
    PyBuffer_Release(&arena);
    return result;
}

PyMethodDef ck_hostcopy_methods[] = {
    {"copy_into", (PyCFunction)(void (*)(void))py_copy_into, METH_VARARGS | METH_KEYWORDS,
     "copy_into(arena, segments, library=None, *, threads=2)\n\n"
     "Copies every (data_ptr, nbytes, device, offset) segment into the writable buffer\n"
     "arena at offset: device -1 is host memory (memcpy, split over `threads` threads for\n"
     "large batches), other devices go through the CUDA runtime (library, or the one this\n"
     "process loaded), one stream per device and one synchronisation. The GIL is released;\n"
     "the caller keeps every source alive and unchanged for the call."},
    {"copy_to_host", (PyCFunction)(void (*)(void))py_copy_to_host, METH_VARARGS | METH_KEYWORDS,
     "copy_to_host(segments, library=None, *, pinned=True) -> (HostArena, offsets) or None\n\n"
     "Copies every (data_ptr, nbytes, device) segment of device memory into one host arena\n"
     "(page-locked with cudaMallocHost, or pageable heap memory) with the CUDA runtime\n"
     "(library, or the libcudart.so this process loaded), one stream per device and one\n"
     "synchronisation. offsets[i] is where segment i starts (64-byte aligned). None when\n"
     "library is None and no CUDA runtime is found."},
    {NULL, NULL, 0, NULL},
};

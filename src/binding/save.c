#include "save.h"

#include <pthread.h>
#include <signal.h>
#include <string.h>

#include "core/atomic.h"
#include "core/crc.h"
#include "core/zipwrite.h"
#include "errors.h"
#include "save_hooks.h"

/* ---- sinks -------------------------------------------------------------- */

/* Writes to a Python binary file object: f.write(memoryview) until all is
 * taken. Runs with the GIL held. */
static ck_status pyfile_sink(void *ctx, const struct iovec *iov, int n, ck_error *err) {
    PyObject *write = ctx;
    for (int i = 0; i < n; i++) {
        char *p = iov[i].iov_base;
        size_t left = iov[i].iov_len;
        while (left > 0) {
            Py_ssize_t step = left > ((size_t)1 << 30) ? ((Py_ssize_t)1 << 30) : (Py_ssize_t)left;
            PyObject *view = PyMemoryView_FromMemory(p, step, PyBUF_READ);
            if (view == NULL)
                return ck_fail(err, CK_E_INTERRUPTED, "python exception");
            PyObject *r = PyObject_CallOneArg(write, view);
            Py_DECREF(view);
            if (r == NULL)
                return ck_fail(err, CK_E_INTERRUPTED, "python exception");
            Py_ssize_t done = step;
            if (r != Py_None) {
                done = PyLong_AsSsize_t(r);
                if (done < 0 || done > step) {
                    Py_DECREF(r);
                    if (!PyErr_Occurred())
                        PyErr_SetString(PyExc_OSError, "file object's write returned a bad count");
                    return ck_fail(err, CK_E_INTERRUPTED, "python exception");
                }
                if (done == 0) {
                    Py_DECREF(r);
                    PyErr_SetString(PyExc_OSError, "file object's write made no progress");
                    return ck_fail(err, CK_E_INTERRUPTED, "python exception");
                }
            }
            Py_DECREF(r);
            p += done;
            left -= (size_t)done;
        }
    }
    return CK_OK;
}

/* Writing to a descriptor runs without the GIL; between chunks the stop
 * hook takes it back briefly to let signal handlers (Ctrl-C) run. */
typedef struct fd_io {
    ck_fd_sink sink;
    PyThreadState *ts; /* non-NULL while the GIL is released */
} fd_io;

static int fd_stop(void *ctx) {
    fd_io *io = ctx;
    if (io->ts == NULL)
        return PyErr_CheckSignals() < 0;
    PyEval_RestoreThread(io->ts);
    int stop = PyErr_CheckSignals() < 0;
    io->ts = PyEval_SaveThread();
    return stop;
}

/* ---- save --------------------------------------------------------------- */

/* Replaces, in out, each storage not on the CPU by a CPU copy: one call
 * to_cpu(list of those storages) -> list of CPU storages when to_cpu is
 * not None (a batched device copier), else storage.cpu() one by one. */
static int move_to_cpu(ck_state *st, PyObject *out, PyObject *to_cpu) {
    Py_ssize_t n = PyList_GET_SIZE(out);
    PyObject *away = PyList_New(0), *where = PyList_New(0), *moved = NULL;
    int rc = -1;
    if (away == NULL || where == NULL)
        goto done;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *s = PyList_GET_ITEM(out, i); /* borrowed */
        PyObject *dev = ck_device_type(st, s);
        if (dev == NULL)
            goto done;
        int on_cpu = PyUnicode_Compare(dev, st->s_cpu) == 0;
        Py_DECREF(dev);
        if (on_cpu)
            continue;
        PyObject *index = PyLong_FromSsize_t(i);
        int bad = index == NULL || PyList_Append(away, s) < 0 || PyList_Append(where, index) < 0;
        Py_XDECREF(index);
        if (bad)
            goto done;
    }
    Py_ssize_t k = PyList_GET_SIZE(away);
    if (k == 0) {
        rc = 0;
        goto done;
    }
    if (to_cpu != Py_None) {
        PyObject *got = PyObject_CallOneArg(to_cpu, away);
        moved = got ? PySequence_List(got) : NULL;
        Py_XDECREF(got);
        if (moved == NULL)
            goto done;
        if (PyList_GET_SIZE(moved) != k) {
            PyErr_Format(PyExc_ValueError, "save: to_cpu returned %zd storages for %zd",
                         PyList_GET_SIZE(moved), k);
            goto done;
        }
    } else {
        moved = PyList_New(k);
        if (moved == NULL)
            goto done;
        for (Py_ssize_t j = 0; j < k; j++) {
            PyObject *cpu = PyObject_CallMethodNoArgs(PyList_GET_ITEM(away, j), st->s_cpu);
            if (cpu == NULL)
                goto done;
            PyList_SET_ITEM(moved, j, cpu); /* steals */
        }
    }
    for (Py_ssize_t j = 0; j < k; j++) {
        Py_ssize_t i = PyLong_AsSsize_t(PyList_GET_ITEM(where, j));
        PyObject *cpu = PyList_GET_ITEM(moved, j); /* borrowed; the list below takes a ref */
        PyObject *dev = ck_device_type(st, cpu);
        if (dev == NULL)
            goto done;
        int on_cpu = PyUnicode_Compare(dev, st->s_cpu) == 0;
        Py_DECREF(dev);
        if (!on_cpu) {
            PyErr_SetString(PyExc_ValueError, "save: to_cpu returned a storage not on the CPU");
            goto done;
        }
        if (PyList_SetItem(out, i, Py_NewRef(cpu)) < 0)
            goto done;
    }
    rc = 0;
done:
    Py_XDECREF(away);
    Py_XDECREF(where);
    Py_XDECREF(moved);
    return rc;
}

/* CPU versions of the storages (the storage itself when on the CPU) with
 * their data pointers and sizes. Returns a new list (holding every storage
 * whose memory is written) or NULL. */
static PyObject *cpu_storages(ck_state *st, ck_save_state *state, PyObject *to_cpu, void ***ptrs,
                              uint64_t **sizes) {
    Py_ssize_t n = PyList_GET_SIZE(state->storages);
    PyObject *out = PyList_GetSlice(state->storages, 0, n);
    *ptrs = PyMem_Calloc((size_t)n + 1, sizeof **ptrs);
    *sizes = PyMem_Calloc((size_t)n + 1, sizeof **sizes);
    if (out == NULL || *ptrs == NULL || *sizes == NULL || move_to_cpu(st, out, to_cpu) < 0)
        goto fail;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *cpu = PyList_GET_ITEM(out, i); /* borrowed: out holds it */
        PyObject *ptr = PyObject_CallMethodNoArgs(cpu, st->s_data_ptr);
        PyObject *nb = ptr ? PyObject_CallMethodNoArgs(cpu, st->s_nbytes) : NULL;
        if (nb == NULL) {
            Py_XDECREF(ptr);
            goto fail;
        }
        (*ptrs)[i] = PyLong_AsVoidPtr(ptr);
        unsigned long long size = PyLong_AsUnsignedLongLong(nb);
        Py_DECREF(ptr);
        Py_DECREF(nb);
        if (PyErr_Occurred())
            goto fail;
        (*sizes)[i] = size;
        if (size > 0 && (*ptrs)[i] == NULL) {
            PyErr_Format(PyExc_RuntimeError, "storage %zd has no data to save", i);
            goto fail;
        }
    }
    return out;
fail:
    Py_XDECREF(out);
    PyMem_Free(*ptrs);
    PyMem_Free(*sizes);
    *ptrs = NULL;
    *sizes = NULL;
    return NULL;
}

/* A write past RLIMIT_FSIZE must fail with EFBIG, not kill the process:
 * SIGXFSZ is ignored while any save writes a file (saves on several
 * threads share one count; the disposition found first is put back when
 * the last one ends). */
static pthread_mutex_t xfsz_lock = PTHREAD_MUTEX_INITIALIZER;
static int xfsz_depth;
static struct sigaction xfsz_old;
static int xfsz_have_old;

static void xfsz_ignore(void) {
    pthread_mutex_lock(&xfsz_lock);
    if (xfsz_depth++ == 0) {
        struct sigaction ign;
        memset(&ign, 0, sizeof ign);
        ign.sa_handler = SIG_IGN;
        sigemptyset(&ign.sa_mask);
        xfsz_have_old = sigaction(SIGXFSZ, &ign, &xfsz_old) == 0;
    }
    pthread_mutex_unlock(&xfsz_lock);
}

static void xfsz_restore(void) {
    pthread_mutex_lock(&xfsz_lock);
    if (--xfsz_depth == 0 && xfsz_have_old)
        sigaction(SIGXFSZ, &xfsz_old, NULL);
    pthread_mutex_unlock(&xfsz_lock);
}

typedef struct save_args {
    PyObject *target; /* str path, or a file object's write method */
    int to_path;
    int fsync;
    PyObject *byteorder;
    uint64_t alignment;
    uint64_t zip64_threshold;
    int compute_crc;
    int named_temp; /* never O_TMPFILE (tests of the fallback) */
} save_args;

/* Writes every record. The GIL is released around data writes to a
 * descriptor (io->ts set); pickle bytes and storages stay alive through
 * the references the caller holds. */
static ck_status write_archive(ck_zipw *w, fd_io *io, const save_args *a, const Py_buffer *pkl,
                               const ck_save_state *state, void **ptrs, const uint64_t *sizes,
                               ck_error *err) {
    char align_text[24];
    snprintf(align_text, sizeof align_text, "%llu", (unsigned long long)a->alignment);
    Py_ssize_t bo_len = 0;
    const char *bo = PyUnicode_AsUTF8AndSize(a->byteorder, &bo_len);
    if (bo == NULL)
        return ck_fail(err, CK_E_INTERRUPTED, "python exception");
    Py_ssize_t n = PyList_GET_SIZE(state->storages);
    /* from the first byte: a FIFO's reader may be a thread of this process */
    if (io != NULL)
        io->ts = PyEval_SaveThread();
    ck_status st;
    if ((st = ck_zipw_add(w, "data.pkl", pkl->buf, (uint64_t)pkl->len, err)) == CK_OK &&
        (st = ck_zipw_add(w, ".format_version", "1", 1, err)) == CK_OK &&
        (st = ck_zipw_add(w, ".storage_alignment", align_text, strlen(align_text), err)) == CK_OK)
        st = ck_zipw_add(w, "byteorder", bo, (uint64_t)bo_len, err);
    for (Py_ssize_t i = 0; i < n && st == CK_OK; i++) {
        char name[40];
        snprintf(name, sizeof name, "data/%zd", i);
        st = ck_zipw_add(w, name, ptrs[i], sizes[i], err);
    }
    if (st == CK_OK)
        st = ck_zipw_finish(w, err);
    if (io != NULL && io->ts != NULL) {
        PyEval_RestoreThread(io->ts);
        io->ts = NULL;
    }
    return st;
}

/* ck_atomic_open with the GIL released (opening a FIFO waits for its
 * reader); a signal that interrupts that wait runs its Python handler, and
 * the open is retried unless the handler raised. */
static ck_status open_target(ck_atomic *at, const char *path, int named_temp, ck_error *err) {
    ck_status status;
    for (;;) {
        ck_error_clear(err);
        Py_BEGIN_ALLOW_THREADS
            status = ck_atomic_open(at, path, named_temp ? CK_ATOMIC_NAMED_TEMP : 0, err);
        Py_END_ALLOW_THREADS
        if (status != CK_E_INTERRUPTED)
            return status;
        if (PyErr_CheckSignals() < 0)
            return status;
    }
}

static PyObject *py_save(PyObject *module, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {
        "obj",    "target",     "prefix",    "fast",          "to_path",
        "fsync",  "byteorder",  "alignment", "compute_crc32", "zip64_threshold",
        "to_cpu", "named_temp", NULL};
    ck_state *st = ck_get_state(module);
    PyObject *obj, *prefix;
    int fast = 1;
    save_args a = {0};
    unsigned long long alignment = 64, threshold = 0xFFFFFFFFull;
    PyObject *to_cpu = Py_None; /* borrowed argument */
    a.compute_crc = 1;
    a.fsync = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOU|$pppUKpKOp", kwlist, &obj, &a.target,
                                     &prefix, &fast, &a.to_path, &a.fsync, &a.byteorder, &alignment,
                                     &a.compute_crc, &threshold, &to_cpu, &a.named_temp))
        return NULL;
    if (a.byteorder == NULL) {
        PyErr_SetString(PyExc_TypeError, "save: byteorder is required");
        return NULL;
    }
    if (threshold == 0) {
        PyErr_SetString(PyExc_ValueError, "save: zip64_threshold must be positive");
        return NULL;
    }
    if (ck_torch_ready(st) < 0)
        return NULL;
    if (st->torch_module == NULL || st->torch_module == Py_None ||
        !PyType_Check(st->TypedStorage)) {
        /* configured for verify's scan only (no torch): nothing to save with */
        PyErr_SetString(PyExc_RuntimeError, "ckptio._native.save needs torch: use ckptio.save");
        return NULL;
    }
    a.alignment = alignment;
    a.zip64_threshold = threshold;
    PyObject *filename = a.to_path ? a.target : Py_None; /* borrowed, for messages */

    ck_save_state *state = NULL;
    PyObject *result = NULL, *pkl_io = NULL, *pkl_view = NULL, *cpu = NULL, *path_bytes = NULL;
    Py_buffer pkl = {0};
    void **ptrs = NULL;
    uint64_t *sizes = NULL;
    pkl_io = ck_save_pickle(st, obj, fast, &state);
    if (pkl_io == NULL)
        goto out;
    pkl_view = PyObject_CallMethod(pkl_io, "getbuffer", NULL);
    if (pkl_view == NULL || PyObject_GetBuffer(pkl_view, &pkl, PyBUF_SIMPLE) < 0)
        goto out;
    cpu = cpu_storages(st, state, to_cpu, &ptrs, &sizes);
    if (cpu == NULL)
        goto out;

    Py_ssize_t prefix_len = 0;
    const char *prefix_s = PyUnicode_AsUTF8AndSize(prefix, &prefix_len);
    if (prefix_s == NULL)
        goto out;
    ck_error err;
    ck_error_clear(&err);
    ck_zipw w;
    if (ck_zipw_init(&w, prefix_s, (size_t)prefix_len, a.alignment, NULL, NULL, &err) != CK_OK) {
        ck_zipw_free(&w);
        ck_raise_core(st, filename, &err);
        goto out;
    }
    w.zip64_threshold = a.zip64_threshold;
    w.compute_crc = a.compute_crc;
    ck_status status;
    if (a.to_path) {
        /* the file system's encoding, as open() uses (surrogateescape) */
        path_bytes = PyUnicode_EncodeFSDefault(a.target);
        if (path_bytes == NULL) {
            ck_zipw_free(&w);
            goto out;
        }
        ck_atomic at;
        if (open_target(&at, PyBytes_AS_STRING(path_bytes), a.named_temp, &err) != CK_OK) {
            ck_zipw_free(&w);
            if (!PyErr_Occurred())
                ck_raise_core(st, filename, &err);
            goto out;
        }
        /* no writeback hints for a FIFO or device written in place */
        fd_io io = {{at.fd, a.fsync && !at.direct, 0, 0}, NULL};
        w.write = ck_zipw_fd_sink;
        w.write_ctx = &io.sink;
        w.stop = fd_stop;
        w.stop_ctx = &io;
        xfsz_ignore();
        status = write_archive(&w, &io, &a, &pkl, state, ptrs, sizes, &err);
        if (status == CK_OK) {
            Py_BEGIN_ALLOW_THREADS
                status = ck_atomic_commit(&at, a.fsync, &err);
            Py_END_ALLOW_THREADS
        } else {
            ck_atomic_abort(&at);
        }
        xfsz_restore();
    } else {
        w.write = pyfile_sink;
        w.write_ctx = a.target;
        w.stop = fd_stop;
        fd_io no_release = {{-1, 0, 0, 0}, NULL};
        w.stop_ctx = &no_release;
        status = write_archive(&w, NULL, &a, &pkl, state, ptrs, sizes, &err);
    }
    ck_zipw_free(&w);
    if (status != CK_OK) {
        if (!PyErr_Occurred())
            ck_raise_core(st, filename, &err);
        goto out;
    }
    result = Py_NewRef(Py_None);
out:
    if (pkl.obj != NULL)
        PyBuffer_Release(&pkl);
    Py_XDECREF(pkl_view);
    Py_XDECREF(pkl_io);
    Py_XDECREF(cpu);
    Py_XDECREF(path_bytes);
    PyMem_Free(ptrs);
    PyMem_Free(sizes);
    ck_save_state_end(state);
    return result;
}

/* ---- crc32 (benchmark) ---------------------------------------------------- */

static PyObject *py_crc32(PyObject *module, PyObject *args, PyObject *kwargs) {
    (void)module;
    static char *kwlist[] = {"data", "value", NULL};
    Py_buffer buf;
    unsigned int value = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "y*|I", kwlist, &buf, &value))
        return NULL;
    uint32_t crc;
    Py_BEGIN_ALLOW_THREADS
        crc = ck_crc32(value, buf.buf, (size_t)buf.len);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&buf);
    return PyLong_FromUnsignedLong(crc);
}

PyMethodDef ck_save_methods[] = {
    {"save", (PyCFunction)(void (*)(void))py_save, METH_VARARGS | METH_KEYWORDS,
     "save(obj, target, prefix, *, fast=True, to_path, fsync, byteorder, alignment=64,\n"
     "     compute_crc32=True, zip64_threshold=0xFFFFFFFF, to_cpu=None, named_temp=False)\n"
     "Writes obj in torch.save's zip format (see ckptio.save for the public API)."},
    {"crc32", (PyCFunction)(void (*)(void))py_crc32, METH_VARARGS | METH_KEYWORDS,
     "crc32(data, value=0) -> int: CRC-32 by libdeflate (zlib's is zlib.crc32)."},
    {NULL, NULL, 0, NULL},
};

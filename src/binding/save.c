#include "save.h"

#include <pthread.h>
#include <signal.h>
#include <string.h>

#include "core/atomic.h"
#include "core/crc.h"
#include "core/zipwrite.h"
#include "errors.h"

/* What persistent_id and reducer_override need, alive for one save. The
 * torch objects are borrowed from the hooks tuple (the caller's argument,
 * alive for the whole call); the rest are strong references owned by the
 * save call (released in save_ctx_clear). */
typedef struct save_ctx {
    ck_state *st;
    /* torch's objects, from the hooks tuple */
    PyObject *TypedStorage, *UntypedStorage, *normalize_storage_type, *location_tag, *torch, *uint8;
    PyObject *Tensor, *rebuild_v2, *rebuild_v3, *OrderedDict, *legacy, *new_dtypes, *metadata_of,
        *strided;
    int fast;           /* reducer_override may reduce plain tensors itself */
    PyObject *marker;   /* first item of the storage tokens reducer_override makes */
    PyObject *ids;      /* dict: storage._cdata -> key */
    PyObject *storages; /* list: storage per key, in key order */
    PyObject *dtypes;   /* dict: data_ptr -> dtype, to refuse one memory saved as two dtypes */
    /* interned strings (torch's literals are interned too: the pickle memo
     * then treats them alike) */
    PyObject *s_storage, *s_cpu, *s_meta, *s_fake_device, *s_cuda;
} save_ctx;

static void save_ctx_clear(save_ctx *c) {
    Py_CLEAR(c->ids);
    Py_CLEAR(c->storages);
    Py_CLEAR(c->dtypes);
    Py_CLEAR(c->s_storage);
    Py_CLEAR(c->s_cpu);
    Py_CLEAR(c->s_meta);
    Py_CLEAR(c->s_fake_device);
    Py_CLEAR(c->s_cuda);
    Py_CLEAR(c->marker);
}

static PyObject *call_method0(PyObject *obj, const char *name) {
    return PyObject_CallMethod(obj, name, NULL);
}

/* The type name of storage.device ("cpu", "cuda", "meta"...), new reference. */
static PyObject *device_type(PyObject *storage) {
    PyObject *dev = PyObject_GetAttrString(storage, "device");
    if (dev == NULL)
        return NULL;
    PyObject *t = PyObject_GetAttrString(dev, "type");
    Py_DECREF(dev);
    return t;
}

/* torch.serialization._save's persistent_id: a storage becomes
 * ('storage', storage_type, key, location, numel); anything else None. */
static PyObject *persistent_id(PyObject *capsule, PyObject *obj) {
    save_ctx *c = PyCapsule_GetPointer(capsule, NULL);
    if (c == NULL)
        return NULL;
    PyObject *storage = NULL, *dtype = NULL, *storage_type = NULL, *numel = NULL;
    PyObject *dev = NULL, *key = NULL, *location = NULL, *result = NULL;
    if (PyTuple_CheckExact(obj) && PyTuple_GET_SIZE(obj) == 3 &&
        PyTuple_GET_ITEM(obj, 0) == c->marker) {
        /* a token from reduce_tensor: (marker, untyped storage, dtype), what
         * torch's TypedStorage wrapper would say about it */
        storage = Py_NewRef(PyTuple_GET_ITEM(obj, 1));
        dtype = Py_NewRef(PyTuple_GET_ITEM(obj, 2));
        PyObject *row = PyDict_GetItemWithError(c->legacy, dtype); /* borrowed: (type, size) */
        if (row == NULL) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_RuntimeError, "save: storage token of an unknown dtype");
            goto done;
        }
        storage_type = Py_NewRef(PyTuple_GET_ITEM(row, 0));
        PyObject *nbytes = call_method0(storage, "nbytes");
        numel = nbytes ? PyNumber_FloorDivide(nbytes, PyTuple_GET_ITEM(row, 1)) : NULL;
        Py_XDECREF(nbytes);
    } else if (PyObject_TypeCheck(obj, (PyTypeObject *)c->TypedStorage)) {
        storage = PyObject_GetAttrString(obj, "_untyped_storage");
        dtype = storage ? PyObject_GetAttrString(obj, "dtype") : NULL;
        PyObject *name = dtype ? call_method0(obj, "_pickle_storage_type") : NULL;
        storage_type = name ? PyObject_GetAttr(c->torch, name) : NULL;
        Py_XDECREF(name);
        numel = storage_type ? call_method0(obj, "_size") : NULL;
    } else if ((PyObject *)Py_TYPE(obj) == c->UntypedStorage) {
        storage = Py_NewRef(obj);
        dtype = Py_NewRef(c->uint8);
        storage_type = PyObject_CallOneArg(c->normalize_storage_type, (PyObject *)Py_TYPE(obj));
        numel = storage_type ? call_method0(obj, "nbytes") : NULL;
    } else {
        Py_RETURN_NONE;
    }
    if (numel == NULL)
        goto done;

    dev = device_type(storage);
    if (dev == NULL)
        goto done;
    int is_meta = PyUnicode_Compare(dev, c->s_meta) == 0;
    if (!is_meta) {
        PyObject *ptr = call_method0(storage, "data_ptr");
        if (ptr == NULL)
            goto done;
        int nonzero = PyObject_IsTrue(ptr);
        if (nonzero > 0) {
            PyObject *seen = PyDict_GetItemWithError(c->dtypes, ptr); /* borrowed */
            if (seen == NULL && !PyErr_Occurred()) {
                nonzero = PyDict_SetItem(c->dtypes, ptr, dtype) < 0 ? -1 : 1;
            } else if (seen != NULL) {
                int same = PyObject_RichCompareBool(seen, dtype, Py_EQ);
                if (same == 0)
                    PyErr_SetString(PyExc_RuntimeError,
                                    "Cannot save multiple tensors or storages that view the same "
                                    "data as different types");
                nonzero = same > 0 ? 1 : -1;
            } else {
                nonzero = -1;
            }
        }
        Py_DECREF(ptr);
        if (nonzero < 0)
            goto done;
    }

    PyObject *cdata = PyObject_GetAttrString(storage, "_cdata");
    if (cdata == NULL)
        goto done;
    key = PyDict_GetItemWithError(c->ids, cdata); /* borrowed, made strong below */
    if (key != NULL) {
        Py_INCREF(key);
    } else if (!PyErr_Occurred()) {
        /* str(int), as torch makes it: PyUnicode_FromFormat would hand out
         * CPython's shared one-character strings, which the pickle memo
         * would then merge with equal strings elsewhere in the object. */
        PyObject *num = PyLong_FromSsize_t(PyDict_GET_SIZE(c->ids));
        key = num ? PyObject_Str(num) : NULL;
        Py_XDECREF(num);
        if (key != NULL &&
            (PyDict_SetItem(c->ids, cdata, key) < 0 || PyList_Append(c->storages, storage) < 0))
            Py_CLEAR(key);
    }
    Py_DECREF(cdata);
    if (key == NULL)
        goto done;

    PyObject *fake = NULL;
    if (ck_lookup_attr(obj, c->s_fake_device, &fake) < 0)
        goto done;
    if (fake != NULL && fake != Py_None) {
        location = PyObject_Str(fake);
    } else if (PyUnicode_Compare(dev, c->s_cpu) == 0) {
        location = Py_NewRef(c->s_cpu);
    } else {
        location = PyObject_CallOneArg(c->location_tag, storage);
    }
    Py_XDECREF(fake);
    if (location == NULL)
        goto done;
    result = PyTuple_Pack(5, c->s_storage, storage_type, key, location, numel);
done:
    Py_XDECREF(storage);
    Py_XDECREF(dtype);
    Py_XDECREF(storage_type);
    Py_XDECREF(numel);
    Py_XDECREF(dev);
    Py_XDECREF(key);
    Py_XDECREF(location);
    return result;
}

/* torch.Tensor.__reduce_ex__ for the common case, in C: a plain CPU or
 * CUDA tensor (exact type, no Python attributes, no hooks, strided, not
 * quantized or nested, no conj/neg bit) reduces to
 * (_rebuild_tensor_v2, (storage, offset, size, stride, requires_grad,
 * OrderedDict())) as torch builds it, except that the TypedStorage torch
 * would create is replaced by a token persistent_id maps to the same
 * persistent id. Everything else returns NotImplemented: torch's own
 * __reduce_ex__ then runs. */
static PyObject *reduce_tensor(PyObject *capsule, PyObject *obj) {
    save_ctx *c = PyCapsule_GetPointer(capsule, NULL);
    if (c == NULL)
        return NULL;
    if (!c->fast || (PyObject *)Py_TYPE(obj) != c->Tensor)
        Py_RETURN_NOTIMPLEMENTED;
    PyObject *result = NULL, *dict = NULL, *hooks = NULL, *layout = NULL, *dev = NULL;
    PyObject *flag = NULL, *meta = NULL, *dtype = NULL, *untyped = NULL, *token = NULL;
    PyObject *offset = NULL, *size = NULL, *shape = NULL, *stride = NULL, *grad = NULL;
    PyObject *od = NULL, *args = NULL;
    int v3 = 0, plain = 0;

    dict = PyObject_GenericGetDict(obj, NULL);
    if (dict == NULL || PyDict_GET_SIZE(dict) != 0)
        goto fallback;
    /* None, or the empty OrderedDict torch.load leaves on every tensor it
     * rebuilds; hooks to warn about go through torch's path */
    hooks = PyObject_GetAttrString(obj, "_backward_hooks");
    if (hooks == NULL ||
        (hooks != Py_None && !(PyDict_Check(hooks) && PyDict_GET_SIZE(hooks) == 0)))
        goto fallback;
    layout = PyObject_GetAttrString(obj, "layout");
    if (layout == NULL || layout != c->strided)
        goto fallback;
    dev = PyObject_GetAttrString(obj, "device");
    PyObject *dev_type = dev ? PyObject_GetAttrString(dev, "type") : NULL;
    plain = dev_type != NULL && (PyUnicode_Compare(dev_type, c->s_cpu) == 0 ||
                                 PyUnicode_Compare(dev_type, c->s_cuda) == 0);
    Py_XDECREF(dev_type);
    if (!plain)
        goto fallback;
    flag = PyObject_GetAttrString(obj, "is_quantized");
    if (flag == NULL || flag != Py_False)
        goto fallback;
    Py_CLEAR(flag);
    flag = PyObject_GetAttrString(obj, "is_nested");
    if (flag == NULL || flag != Py_False)
        goto fallback;
    meta = PyObject_CallOneArg(c->metadata_of, obj);
    if (meta == NULL || !PyDict_Check(meta) || PyDict_GET_SIZE(meta) != 0)
        goto fallback;
    dtype = PyObject_GetAttrString(obj, "dtype");
    if (dtype == NULL)
        goto fallback;
    if (PyDict_GetItemWithError(c->legacy, dtype) == NULL) {
        if (PyErr_Occurred())
            goto fallback;
        v3 = PySet_Contains(c->new_dtypes, dtype);
        if (v3 <= 0)
            goto fallback;
    }
    untyped = call_method0(obj, "untyped_storage");
    if (untyped == NULL)
        goto fallback;
    token = v3 ? Py_NewRef(untyped) : PyTuple_Pack(3, c->marker, untyped, dtype);
    offset = token ? call_method0(obj, "storage_offset") : NULL;
    size = offset ? call_method0(obj, "size") : NULL;
    shape = size ? PySequence_Tuple(size) : NULL;
    stride = shape ? call_method0(obj, "stride") : NULL;
    grad = stride ? PyObject_GetAttrString(obj, "requires_grad") : NULL;
    od = grad ? PyObject_CallNoArgs(c->OrderedDict) : NULL;
    if (od == NULL)
        goto done;
    args = v3 ? PyTuple_Pack(7, token, offset, shape, stride, grad, od, dtype)
              : PyTuple_Pack(6, token, offset, shape, stride, grad, od);
    if (args != NULL)
        result = PyTuple_Pack(2, v3 ? c->rebuild_v3 : c->rebuild_v2, args);
    goto done;
fallback:
    /* not the common case, or a lookup failed: torch's __reduce_ex__ decides
     * (and raises what it raises) */
    PyErr_Clear();
    result = Py_NewRef(Py_NotImplemented);
done:
    Py_XDECREF(dict);
    Py_XDECREF(hooks);
    Py_XDECREF(layout);
    Py_XDECREF(dev);
    Py_XDECREF(flag);
    Py_XDECREF(meta);
    Py_XDECREF(dtype);
    Py_XDECREF(untyped);
    Py_XDECREF(token);
    Py_XDECREF(offset);
    Py_XDECREF(size);
    Py_XDECREF(shape);
    Py_XDECREF(stride);
    Py_XDECREF(grad);
    Py_XDECREF(od);
    Py_XDECREF(args);
    return result;
}

static PyMethodDef persistent_id_def = {"persistent_id", persistent_id, METH_O,
                                        "torch's persistent_id for storages."};
static PyMethodDef reduce_tensor_def = {"reducer_override", reduce_tensor, METH_O,
                                        "torch.Tensor.__reduce_ex__ for plain tensors."};

/* Pickles obj at protocol 2 with persistent_id and reducer_override;
 * returns a BytesIO holding the pickle (new reference). The two hooks are
 * attributes of a subclass of _pickle.Pickler made for this save (builtin
 * functions do not bind, so the pickler calls them with the object alone). */
static PyObject *pickle_obj(save_ctx *c, PyObject *obj) {
    PyObject *pickle = NULL, *io = NULL, *buf = NULL, *pickler = NULL, *pid = NULL;
    PyObject *reduce = NULL, *base = NULL, *ns = NULL, *cls = NULL, *res = NULL;
    pickle = PyImport_ImportModule("_pickle");
    io = pickle ? PyImport_ImportModule("io") : NULL;
    buf = io ? PyObject_CallMethod(io, "BytesIO", NULL) : NULL;
    base = buf ? PyObject_GetAttrString(pickle, "Pickler") : NULL;
    pid = base ? PyCFunction_New(&persistent_id_def, c->marker) : NULL;
    reduce = pid ? PyCFunction_New(&reduce_tensor_def, c->marker) : NULL;
    ns = reduce ? Py_BuildValue("{sOsO}", "persistent_id", pid, "reducer_override", reduce) : NULL;
    cls = ns ? PyObject_CallFunction((PyObject *)&PyType_Type, "s(O)O", "CkptioPickler", base, ns)
             : NULL;
    pickler = cls ? PyObject_CallFunction(cls, "Oi", buf, 2) : NULL;
    if (pickler != NULL)
        res = PyObject_CallMethod(pickler, "dump", "O", obj);
    /* The class (freed by the cycle collector, as classes are) keeps the
     * functions and their capsule, whose pointer to c dangles after this
     * save: harmless, as nothing else can reach that class to call them. */
    Py_XDECREF(pickler);
    Py_XDECREF(cls);
    Py_XDECREF(ns);
    Py_XDECREF(reduce);
    Py_XDECREF(pid);
    Py_XDECREF(base);
    Py_XDECREF(pickle);
    Py_XDECREF(io);
    if (res == NULL) {
        Py_XDECREF(buf);
        return NULL;
    }
    Py_DECREF(res);
    return buf;
}

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

static int unpack_hooks(save_ctx *c, PyObject *hooks) {
    if (!PyTuple_Check(hooks) || PyTuple_GET_SIZE(hooks) != 15) {
        PyErr_SetString(PyExc_TypeError, "save: hooks must be a 15-tuple");
        return -1;
    }
    /* borrowed from the hooks tuple, which the caller keeps alive */
    PyObject **slots[] = {&c->TypedStorage, &c->UntypedStorage, &c->normalize_storage_type,
                          &c->location_tag, &c->torch,          &c->uint8,
                          &c->Tensor,       &c->rebuild_v2,     &c->rebuild_v3,
                          &c->OrderedDict,  &c->legacy,         &c->new_dtypes,
                          &c->metadata_of,  &c->strided};
    for (size_t i = 0; i < sizeof slots / sizeof slots[0]; i++)
        *slots[i] = PyTuple_GET_ITEM(hooks, (Py_ssize_t)i);
    c->fast = PyObject_IsTrue(PyTuple_GET_ITEM(hooks, 14));
    if (c->fast < 0)
        return -1;
    if (!PyType_Check(c->TypedStorage) || !PyDict_Check(c->legacy) ||
        !PyAnySet_Check(c->new_dtypes)) {
        PyErr_SetString(PyExc_TypeError, "save: malformed hooks");
        return -1;
    }
    c->ids = PyDict_New();
    c->storages = PyList_New(0);
    c->dtypes = PyDict_New();
    c->s_storage = PyUnicode_InternFromString("storage");
    c->s_cpu = PyUnicode_InternFromString("cpu");
    c->s_meta = PyUnicode_InternFromString("meta");
    c->s_fake_device = PyUnicode_InternFromString("_fake_device");
    c->s_cuda = PyUnicode_InternFromString("cuda");
    /* the token marker doubles as the capsule the hook functions carry */
    c->marker = PyCapsule_New(c, NULL, NULL);
    if (!c->ids || !c->storages || !c->dtypes || !c->s_storage || !c->s_cpu || !c->s_meta ||
        !c->s_fake_device || !c->s_cuda || !c->marker)
        return -1;
    return 0;
}

/* Replaces, in out, each storage not on the CPU by a CPU copy: one call
 * to_cpu(list of those storages) -> list of CPU storages when to_cpu is
 * not None (a batched device copier), else storage.cpu() one by one. */
static int move_to_cpu(save_ctx *c, PyObject *out, PyObject *to_cpu) {
    Py_ssize_t n = PyList_GET_SIZE(out);
    PyObject *away = PyList_New(0), *where = PyList_New(0), *moved = NULL;
    int rc = -1;
    if (away == NULL || where == NULL)
        goto done;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *s = PyList_GET_ITEM(out, i); /* borrowed */
        PyObject *dev = device_type(s);
        if (dev == NULL)
            goto done;
        int on_cpu = PyUnicode_Compare(dev, c->s_cpu) == 0;
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
            PyObject *cpu = call_method0(PyList_GET_ITEM(away, j), "cpu");
            if (cpu == NULL)
                goto done;
            PyList_SET_ITEM(moved, j, cpu); /* steals */
        }
    }
    for (Py_ssize_t j = 0; j < k; j++) {
        Py_ssize_t i = PyLong_AsSsize_t(PyList_GET_ITEM(where, j));
        PyObject *cpu = PyList_GET_ITEM(moved, j); /* borrowed; the list below takes a ref */
        PyObject *dev = device_type(cpu);
        if (dev == NULL)
            goto done;
        int on_cpu = PyUnicode_Compare(dev, c->s_cpu) == 0;
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
static PyObject *cpu_storages(save_ctx *c, PyObject *to_cpu, void ***ptrs, uint64_t **sizes) {
    Py_ssize_t n = PyList_GET_SIZE(c->storages);
    PyObject *out = PyList_GetSlice(c->storages, 0, n);
    *ptrs = PyMem_Calloc((size_t)n + 1, sizeof **ptrs);
    *sizes = PyMem_Calloc((size_t)n + 1, sizeof **sizes);
    if (out == NULL || *ptrs == NULL || *sizes == NULL || move_to_cpu(c, out, to_cpu) < 0)
        goto fail;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *cpu = PyList_GET_ITEM(out, i); /* borrowed: out holds it */
        PyObject *ptr = call_method0(cpu, "data_ptr");
        PyObject *nb = ptr ? call_method0(cpu, "nbytes") : NULL;
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
                               save_ctx *c, void **ptrs, const uint64_t *sizes, ck_error *err) {
    char align_text[24];
    snprintf(align_text, sizeof align_text, "%llu", (unsigned long long)a->alignment);
    Py_ssize_t bo_len = 0;
    const char *bo = PyUnicode_AsUTF8AndSize(a->byteorder, &bo_len);
    if (bo == NULL)
        return ck_fail(err, CK_E_INTERRUPTED, "python exception");
    Py_ssize_t n = PyList_GET_SIZE(c->storages);
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
        Py_BEGIN_ALLOW_THREADS status =
            ck_atomic_open(at, path, named_temp ? CK_ATOMIC_NAMED_TEMP : 0, err);
        Py_END_ALLOW_THREADS
        if (status != CK_E_INTERRUPTED)
            return status;
        if (PyErr_CheckSignals() < 0)
            return status;
    }
}

static PyObject *py_save(PyObject *module, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"obj",           "target",          "prefix",    "hooks",
                             "to_path",       "fsync",           "byteorder", "alignment",
                             "compute_crc32", "zip64_threshold", "to_cpu",    "named_temp", NULL};
    ck_state *st = ck_get_state(module);
    PyObject *obj, *prefix, *hooks;
    save_args a = {0};
    unsigned long long alignment = 64, threshold = 0xFFFFFFFFull;
    PyObject *to_cpu = Py_None; /* borrowed argument */
    a.compute_crc = 1;
    a.fsync = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOUO|$ppUKpKOp", kwlist, &obj, &a.target,
                                     &prefix, &hooks, &a.to_path, &a.fsync, &a.byteorder,
                                     &alignment, &a.compute_crc, &threshold, &to_cpu,
                                     &a.named_temp))
        return NULL;
    if (a.byteorder == NULL) {
        PyErr_SetString(PyExc_TypeError, "save: byteorder is required");
        return NULL;
    }
    if (threshold == 0) {
        PyErr_SetString(PyExc_ValueError, "save: zip64_threshold must be positive");
        return NULL;
    }
    a.alignment = alignment;
    a.zip64_threshold = threshold;
    PyObject *filename = a.to_path ? a.target : Py_None; /* borrowed, for messages */

    save_ctx c = {.st = st};
    PyObject *result = NULL, *pkl_io = NULL, *pkl_view = NULL, *cpu = NULL, *path_bytes = NULL;
    Py_buffer pkl = {0};
    void **ptrs = NULL;
    uint64_t *sizes = NULL;
    if (unpack_hooks(&c, hooks) < 0)
        goto out;
    pkl_io = pickle_obj(&c, obj);
    if (pkl_io == NULL)
        goto out;
    pkl_view = PyObject_CallMethod(pkl_io, "getbuffer", NULL);
    if (pkl_view == NULL || PyObject_GetBuffer(pkl_view, &pkl, PyBUF_SIMPLE) < 0)
        goto out;
    cpu = cpu_storages(&c, to_cpu, &ptrs, &sizes);
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
        status = write_archive(&w, &io, &a, &pkl, &c, ptrs, sizes, &err);
        if (status == CK_OK) {
            Py_BEGIN_ALLOW_THREADS status = ck_atomic_commit(&at, a.fsync, &err);
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
        status = write_archive(&w, NULL, &a, &pkl, &c, ptrs, sizes, &err);
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
    save_ctx_clear(&c);
    return result;
}

/* ---- crc32 (benchmark) ---------------------------------------------------- */

static PyObject *py_crc32(PyObject *module, PyObject *args, PyObject *kwargs) {
    (void)module;
    static char *kwlist[] = {"data", "value", "impl", NULL};
    Py_buffer buf;
    unsigned int value = 0;
    const char *impl = "libdeflate";
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "y*|I$s", kwlist, &buf, &value, &impl))
        return NULL;
    int zlib = strcmp(impl, "zlib") == 0;
    if (!zlib && strcmp(impl, "libdeflate") != 0) {
        PyBuffer_Release(&buf);
        PyErr_Format(PyExc_ValueError, "crc32: impl must be 'libdeflate' or 'zlib', not %s", impl);
        return NULL;
    }
    uint32_t crc;
    Py_BEGIN_ALLOW_THREADS crc = zlib ? ck_crc32_zlib(value, buf.buf, (size_t)buf.len)
                                      : ck_crc32(value, buf.buf, (size_t)buf.len);
    Py_END_ALLOW_THREADS PyBuffer_Release(&buf);
    return PyLong_FromUnsignedLong(crc);
}

PyMethodDef ck_save_methods[] = {
    {"save", (PyCFunction)(void (*)(void))py_save, METH_VARARGS | METH_KEYWORDS,
     "save(obj, target, prefix, hooks, *, to_path, fsync, byteorder, alignment=64,\n"
     "     compute_crc32=True, zip64_threshold=0xFFFFFFFF, to_cpu=None, named_temp=False)\n"
     "Writes obj in torch.save's zip format (see ckptio.save for the public API)."},
    {"crc32", (PyCFunction)(void (*)(void))py_crc32, METH_VARARGS | METH_KEYWORDS,
     "crc32(data, value=0, *, impl='libdeflate') -> int: CRC-32 by libdeflate or zlib."},
    {NULL, NULL, 0, NULL},
};

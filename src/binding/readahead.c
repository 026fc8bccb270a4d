#include "readahead.h"

#include "core/ahead.h"
#include "mapping.h"

#define CK_AHEAD_CAPSULE "ckptio._native.read_ahead"

/* What a read_ahead capsule owns: the thread, its pieces, and a strong
 * reference to the Mapping whose pages it asks for (so that they stay
 * mapped while it runs). */
typedef struct {
    ck_ahead ahead;
    ck_piece *pieces;
    PyObject *mapping;
} ahead_job;

/* Stops the thread (the GIL released while it is joined) and frees the job,
 * which the capsule's context points to while it runs (NULL after). */
static void job_end(PyObject *capsule) {
    ahead_job *job = PyCapsule_GetContext(capsule);
    if (job == NULL)
        return;
    (void)PyCapsule_SetContext(capsule, NULL);
    Py_BEGIN_ALLOW_THREADS
        ck_ahead_stop(&job->ahead);
    Py_END_ALLOW_THREADS
    PyMem_Free(job->pieces);
    Py_CLEAR(job->mapping);
    PyMem_Free(job);
}

/* The ranges argument: (offset, length) pairs inside the mapping's len
 * bytes, as pieces (dst unused); -1 with an exception set. */
static int ranges_arg(PyObject *ranges, size_t len, ck_piece **out, size_t *n) {
    PyObject *seq = PySequence_Fast(ranges, "read_ahead: ranges must be a sequence");
    if (seq == NULL)
        return -1;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(seq);
    ck_piece *pieces = PyMem_Calloc((size_t)count + 1, sizeof *pieces);
    if (pieces == NULL) {
        Py_DECREF(seq);
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        unsigned long long off, nbytes;
        PyObject *item = PySequence_Fast_GET_ITEM(seq, i);
        if (!PyTuple_Check(item) || !PyArg_ParseTuple(item, "KK:read_ahead range", &off, &nbytes)) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_TypeError, "read_ahead: each range is (offset, length)");
            goto fail;
        }
        if (off > len || nbytes > len - off) {
            PyErr_Format(PyExc_ValueError,
                         "read_ahead: bytes %llu..%llu lie outside the mapping (%zu bytes)", off,
                         off + nbytes, len);
            goto fail;
        }
        pieces[i] = (ck_piece){off, NULL, (size_t)nbytes};
    }
    Py_DECREF(seq);
    *out = pieces;
    *n = (size_t)count;
    return 0;
fail:
    Py_DECREF(seq);
    PyMem_Free(pieces);
    return -1;
}

/* read_ahead(mapping, ranges) -> capsule or None */
static PyObject *py_read_ahead(PyObject *module, PyObject *args) {
    ck_state *st = ck_get_state(module);
    PyObject *mapping, *ranges;
    if (!PyArg_ParseTuple(args, "OO:read_ahead", &mapping, &ranges))
        return NULL;
    if (ck_mapping_arg(st, mapping, "read_ahead") < 0)
        return NULL;
    const uint8_t *pages = ck_mapping_file_pages(st, mapping);
    ck_piece *pieces;
    size_t n;
    if (ranges_arg(ranges, ((ck_mapping *)mapping)->region.len, &pieces, &n) < 0)
        return NULL;
    ahead_job *job = NULL;
    if (pages == NULL || (job = PyMem_Calloc(1, sizeof *job)) == NULL ||
        ck_ahead_start_map(&job->ahead, pages, pieces, n) != 0) {
        PyMem_Free(job); /* a heap buffer, little to read, or no thread: nothing to ask */
        PyMem_Free(pieces);
        Py_RETURN_NONE;
    }
    job->pieces = pieces;
    job->mapping = Py_NewRef(mapping);
    PyObject *capsule = PyCapsule_New(job, CK_AHEAD_CAPSULE, job_end);
    if (capsule == NULL || PyCapsule_SetContext(capsule, job) < 0) {
        Py_BEGIN_ALLOW_THREADS
            ck_ahead_stop(&job->ahead);
        Py_END_ALLOW_THREADS
        Py_XDECREF(capsule); /* its context is not set: the destructor does nothing */
        Py_DECREF(job->mapping);
        PyMem_Free(pieces);
        PyMem_Free(job);
        return NULL;
    }
    return capsule;
}

/* read_ahead_stop(handle): handle is read_ahead's result (None: nothing) */
static PyObject *py_read_ahead_stop(PyObject *module, PyObject *handle) {
    (void)module;
    if (handle == Py_None)
        Py_RETURN_NONE;
    if (!PyCapsule_IsValid(handle, CK_AHEAD_CAPSULE)) {
        PyErr_SetString(PyExc_TypeError, "read_ahead_stop: expected what read_ahead returned");
        return NULL;
    }
    job_end(handle);
    Py_RETURN_NONE;
}

PyMethodDef ck_readahead_methods[] = {
    {"read_ahead", py_read_ahead, METH_VARARGS,
     "read_ahead(mapping, ranges) -> handle or None: a thread asks the kernel for the pages of "
     "each (offset, length) range of a file Mapping, in order, skipping cached ones (and ending "
     "at once on a warm file); None when there is nothing worth asking for (a heap buffer, or "
     "under 64 MiB in all). Stop it with read_ahead_stop(handle) (the handle's end does too)."},
    {"read_ahead_stop", py_read_ahead_stop, METH_O,
     "read_ahead_stop(handle): stops and joins read_ahead's thread (None: nothing to do)."},
    {NULL, NULL, 0, NULL},
};

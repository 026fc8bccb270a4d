#include "readinto.h"

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/memcopy.h"
#include "core/preads.h"
#include "errors.h"
#include "mapping.h"

/* The buffers of one call's jobs (pread_into, copy_buffers): the jobs as a
 * fast sequence, and the views taken of their buffers, views[0..held). */
typedef struct {
    PyObject *seq; /* strong */
    Py_buffer *views;
    Py_ssize_t n, held;
} job_views;

/* Opens jobs with room for per_job views a job, and *out: a zeroed array
 * of one item_size item a job (the caller's to free, NULL at first); -1
 * with an exception set (job_views_close still to be called). */
static int job_views_open(job_views *j, PyObject *jobs, size_t per_job, const char *not_seq,
                          void **out, size_t item_size) {
    *j = (job_views){0};
    if ((j->seq = PySequence_Fast(jobs, not_seq)) == NULL)
        return -1;
    j->n = PySequence_Fast_GET_SIZE(j->seq);
    j->views = PyMem_Calloc(per_job * (size_t)j->n + 1, sizeof *j->views);
    *out = PyMem_Calloc((size_t)j->n + 1, item_size);
    if (j->views == NULL || *out == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

/* obj's buffer (PyBUF_C_CONTIGUOUS | flags) as the next view; NULL with an
 * exception set. */
static Py_buffer *job_view(job_views *j, PyObject *obj, int flags) {
    if (PyObject_GetBuffer(obj, &j->views[j->held], PyBUF_C_CONTIGUOUS | flags) < 0)
        return NULL;
    return &j->views[j->held++];
}

/* Releases the views taken, the array and the sequence. */
static void job_views_close(job_views *j) {
    for (Py_ssize_t i = 0; i < j->held; i++)
        PyBuffer_Release(&j->views[i]);
    PyMem_Free(j->views);
    Py_XDECREF(j->seq);
}

static PyObject *raise_read(int err, const char *what) {
    if (err == -1) {
        PyErr_Format(PyExc_EOFError, "%s: the file ended before the bytes asked for", what);
        return NULL;
    }
    errno = err;
    return PyErr_SetFromErrno(PyExc_OSError);
}

/* pread_into(fd, jobs, threads=2): jobs is a sequence of (offset, buffer):
 * each writable C-contiguous buffer is filled from the file's bytes at
 * offset, which must lie inside the file. */
static PyObject *py_pread_into(PyObject *module, PyObject *args, PyObject *kwargs) {
    (void)module;
    static char *kwlist[] = {"fd", "jobs", "threads", NULL};
    int fd, threads = 2;
    PyObject *jobs_obj;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "iO|i:pread_into", kwlist, &fd, &jobs_obj,
                                     &threads))
        return NULL;
    job_views j;
    ck_piece *pieces = NULL;
    PyObject *result = NULL;
    if (job_views_open(&j, jobs_obj, 1, "pread_into: jobs must be a sequence", (void **)&pieces,
                       sizeof *pieces) < 0)
        goto done;
    Py_ssize_t n = j.n;
    struct stat st;
    if (fstat(fd, &st) != 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *job = PySequence_Fast_GET_ITEM(j.seq, i);
        unsigned long long off;
        PyObject *buf;
        if (!PyTuple_Check(job) || !PyArg_ParseTuple(job, "KO:pread_into job", &off, &buf)) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_TypeError, "pread_into: each job is (offset, buffer)");
            goto done;
        }
        const Py_buffer *view = job_view(&j, buf, PyBUF_WRITABLE);
        if (view == NULL)
            goto done;
        uint64_t len = (uint64_t)view->len;
        if (off > (uint64_t)st.st_size || len > (uint64_t)st.st_size - off) {
            PyErr_Format(PyExc_ValueError,
                         "pread_into: bytes %llu..%llu lie outside the file (%lld bytes)", off,
                         (unsigned long long)(off + len), (long long)st.st_size);
            goto done;
        }
        pieces[i] = (ck_piece){off, view->buf, (size_t)len};
    }
    int err;
    Py_BEGIN_ALLOW_THREADS
        err = ck_pread_pieces(fd, pieces, (size_t)n, threads);
    Py_END_ALLOW_THREADS
    if (err != 0) {
        raise_read(err, "pread_into");
        goto done;
    }
    result = Py_NewRef(Py_None);
done:
    job_views_close(&j);
    PyMem_Free(pieces);
    return result;
}

/* pread_file(path, threads=2) -> Mapping: the whole regular file read into
 * one 64-byte aligned heap buffer with large preads on two threads and a
 * read-ahead thread (core/preads.c). Huge pages are not asked for: on this
 * build machine, with memory fragmented by the page cache, MADV_HUGEPAGE's
 * compaction made a 1.25 GB read 1.6x slower warm and cold (C harness).
 * Anything but a regular file, and every open or fstat error, is left to
 * read_file, whose errors are the loader's. */
static PyObject *py_pread_file(PyObject *module, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"path", "threads", NULL};
    PyObject *path;
    int threads = 2;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|i:pread_file", kwlist, &path, &threads))
        return NULL;
    ck_state *st = ck_get_state(module);
    PyObject *bytes_path = NULL;
    if (!PyUnicode_FSConverter(path, &bytes_path))
        return NULL;
    int fd;
    struct stat sb;
    Py_BEGIN_ALLOW_THREADS
        fd = open(PyBytes_AS_STRING(bytes_path), O_RDONLY | O_CLOEXEC);
    Py_END_ALLOW_THREADS
    Py_DECREF(bytes_path);
    if (fd < 0 || fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode) || sb.st_size == 0) {
        if (fd >= 0)
            close(fd);
        return ck_py_read_file(module, path);
    }
    ck_region region = {0};
    ck_error cerr;
    ck_error_clear(&cerr);
    if (ck_region_alloc((size_t)sb.st_size, &region, &cerr) != CK_OK) {
        close(fd);
        return ck_raise_core(st, path, &cerr);
    }
    int err;
    char extra;
    ssize_t more = 0;
    Py_BEGIN_ALLOW_THREADS(void)
        posix_fadvise(fd, 0, 0, POSIX_FADV_SEQUENTIAL);
        ck_piece whole = {0, region.data, region.len};
        err = ck_pread_pieces(fd, &whole, 1, threads);
        if (err == 0) {
            do {
                more = pread(fd, &extra, 1, (off_t)region.len);
            } while (more < 0 && errno == EINTR);
        }
    Py_END_ALLOW_THREADS
    close(fd);
    if (err != 0 || more > 0) {
        if (err > 0)
            ck_fail_errno(&cerr, err, "cannot read the file");
        else if (err == -1)
            ck_fail(&cerr, CK_E_IO, "the file shrank while it was read");
        else
            ck_fail(&cerr, CK_E_IO, "the file grew while it was read");
        ck_region_release(&region);
        return ck_raise_core(st, path, &cerr);
    }
    return ck_mapping_new(st, &region);
}

/* copy_buffers(jobs, threads=2): jobs is a sequence of (source, destination)
 * C-contiguous buffers of equal length (destinations writable): each
 * source's bytes are copied into its destination, the batch split over
 * `threads` threads when large (core/memcopy.c), the GIL released. For
 * scattered copies out of a mapped checkpoint whose pages are in the page
 * cache: two threads take the mapping's page faults and copy at once. */
static PyObject *py_copy_buffers(PyObject *module, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"jobs", "threads", NULL};
    PyObject *jobs_obj;
    int threads = 2;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|i:copy_buffers", kwlist, &jobs_obj, &threads))
        return NULL;
    job_views j;
    ck_memcopy_run *runs = NULL;
    PyObject *result = NULL;
    if (job_views_open(&j, jobs_obj, 2, "copy_buffers: jobs must be a sequence", (void **)&runs,
                       sizeof *runs) < 0)
        goto done;
    Py_ssize_t n = j.n;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *job = PySequence_Fast_GET_ITEM(j.seq, i);
        PyObject *src, *dst;
        if (!PyTuple_Check(job) || !PyArg_ParseTuple(job, "OO:copy_buffers job", &src, &dst)) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_TypeError, "copy_buffers: each job is (source, destination)");
            goto done;
        }
        const Py_buffer *a = job_view(&j, src, 0);
        const Py_buffer *b = a == NULL ? NULL : job_view(&j, dst, PyBUF_WRITABLE);
        if (b == NULL)
            goto done;
        if (a->len != b->len) {
            PyErr_Format(PyExc_ValueError,
                         "copy_buffers: job %zd copies %zd bytes into a buffer of %zd", i, a->len,
                         b->len);
            goto done;
        }
        runs[i] = (ck_memcopy_run){a->buf, b->buf, (size_t)a->len};
    }
    ck_error err;
    ck_error_clear(&err);
    ck_status status;
    Py_BEGIN_ALLOW_THREADS
        status = ck_memcopy_runs(runs, (size_t)n, threads, &err);
    Py_END_ALLOW_THREADS
    if (status != CK_OK) {
        ck_raise_status(ck_get_state(module), CK_FROM_CALLER, NULL, "copy_buffers", &err);
        goto done;
    }
    result = Py_NewRef(Py_None);
done:
    job_views_close(&j);
    PyMem_Free(runs);
    return result;
}

/* mapping_span(mapping) -> (address, size, kind): where a Mapping's bytes
 * lie in this process, to tell whether a loaded tensor is a view of them
 * and at which offset of the file. */
static PyObject *py_mapping_span(PyObject *module, PyObject *obj) {
    ck_state *st = ck_get_state(module);
    if (!ck_mapping_check(st, obj)) {
        PyErr_SetString(PyExc_TypeError, "mapping_span: expected a ckptio._native.Mapping");
        return NULL;
    }
    ck_mapping *m = (ck_mapping *)obj;
    const char *kind = m->region.kind == CK_REGION_MMAP   ? "mmap"
                       : m->region.kind == CK_REGION_HEAP ? "heap"
                                                          : "empty";
    return Py_BuildValue("(Kns)", (unsigned long long)(uintptr_t)m->region.data,
                         (Py_ssize_t)m->region.len, kind);
}

PyMethodDef ck_readinto_methods[] = {
    {"pread_into", (PyCFunction)(void (*)(void))py_pread_into, METH_VARARGS | METH_KEYWORDS,
     "pread_into(fd, jobs, threads=2): each (offset, writable buffer) in jobs filled from the "
     "file's bytes at offset, with large preads, the GIL released."},
    {"pread_file", (PyCFunction)(void (*)(void))py_pread_file, METH_VARARGS | METH_KEYWORDS,
     "pread_file(path, threads=2) -> Mapping: the file read into one heap buffer with large "
     "preads on two threads, the GIL released."},
    {"copy_buffers", (PyCFunction)(void (*)(void))py_copy_buffers, METH_VARARGS | METH_KEYWORDS,
     "copy_buffers(jobs, threads=2): each (source, writable destination) pair of equal-length "
     "C-contiguous buffers in jobs copied, on two threads for large batches, the GIL released."},
    {"mapping_span", py_mapping_span, METH_O,
     "mapping_span(mapping) -> (address, size, kind) of a Mapping's bytes."},
    {NULL, NULL, 0, NULL},
};

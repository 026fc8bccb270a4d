/* download(url, dst, ...): src/core/http with the GIL released. The
 * progress callback takes the GIL back for a moment every 50 ms to check for
 * signals (so Ctrl-C stops a download) and to call the Python progress
 * callable. */
#include "http.h"

#include "core/http.h"
#include "errors.h"

int ck_http_init(PyObject *m, ck_state *st) {
    /* OSError first, so that its __init__ fills errno and strerror */
    PyObject *bases = PyTuple_Pack(2, PyExc_OSError, st->CheckpointError);
    if (bases == NULL)
        return -1;
    st->DownloadError = PyErr_NewExceptionWithDoc(
        "ckptio.DownloadError",
        "A download failed: HTTP status, transport error, truncated or HTML body, or hash "
        "mismatch. Attributes url and status (the last HTTP status, 0 for none).",
        bases, NULL);
    Py_DECREF(bases);
    if (st->DownloadError == NULL)
        return -1;
    return PyModule_AddObjectRef(m, "DownloadError", st->DownloadError);
}

typedef struct progress_ctx {
    PyThreadState *ts;  /* this thread's state while the GIL is released */
    PyObject *callable; /* borrowed from the caller's arguments; may be NULL */
    PyObject *exc;      /* owned: what the callable or a signal handler raised */
    PyObject *note;     /* borrowed: note(level, message), or NULL */
} progress_ctx;

/* Hands a line of the core's to note(level, message) (a logger's log, with
 * levels 1 info and 2 warning mapped by the caller); what it raises is
 * reported as unraisable, not allowed to stop the download. */
static void on_note(void *p, int level, const char *msg) {
    progress_ctx *ctx = p;
    PyEval_RestoreThread(ctx->ts);
    PyObject *r = PyObject_CallFunction(ctx->note, "is", level, msg);
    if (r == NULL)
        PyErr_WriteUnraisable(ctx->note);
    Py_XDECREF(r);
    ctx->ts = PyEval_SaveThread();
}

static int on_progress(void *p, uint64_t done, uint64_t total) {
    progress_ctx *ctx = p;
    PyEval_RestoreThread(ctx->ts);
    int stop = 0;
    if (PyErr_CheckSignals() < 0) {
        stop = 1;
    } else if (ctx->callable != NULL) {
        PyObject *r = PyObject_CallFunction(ctx->callable, "KK", (unsigned long long)done,
                                            (unsigned long long)total);
        if (r == NULL)
            stop = 1;
        Py_XDECREF(r);
    }
    if (stop && ctx->exc == NULL)
        ctx->exc = ck_fetch_exception();
    PyErr_Clear();
    ctx->ts = PyEval_SaveThread();
    return stop;
}

/* The failure's exception comes from errors.c (DownloadError, or MemoryError);
 * a DownloadError gets the url and the last HTTP status. */
static PyObject *raise_download_error(ck_state *st, const char *url, const ck_error *err,
                                      long status) {
    ck_raise_status(st, CK_FROM_DOWNLOAD, NULL, NULL, err);
    if (!PyErr_ExceptionMatches(st->DownloadError))
        return NULL;
    PyObject *exc = ck_fetch_exception();
    if (exc == NULL)
        return NULL;
    PyObject *u = PyUnicode_DecodeFSDefault(url);
    PyObject *code = PyLong_FromLong(status);
    if (u == NULL || code == NULL || PyObject_SetAttrString(exc, "url", u) < 0 ||
        PyObject_SetAttrString(exc, "status", code) < 0) {
        Py_XDECREF(u);
        Py_XDECREF(code);
        Py_DECREF(exc);
        return NULL;
    }
    Py_DECREF(u);
    Py_DECREF(code);
    ck_restore_exception(exc);
    return NULL;
}

static PyObject *result_dict(const ck_http_result *res) {
    return Py_BuildValue("{s:K,s:s,s:K,s:i,s:l,s:O}", "size", (unsigned long long)res->size,
                         "sha256", res->sha256_hex, "resumed_from",
                         (unsigned long long)res->resumed_from, "attempts", res->attempts, "status",
                         res->http_status, "existed", res->existed ? Py_True : Py_False);
}

static PyObject *py_download(PyObject *module, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {
        "url",          "dst",        "hash_prefix",     "progress",       "retries",
        "backoff",      "timeout",    "low_speed_limit", "low_speed_time", "keep_partial",
        "fsync",        "user_agent", "if_missing",      "sha256",         "note",
        "lock_timeout", NULL};
    ck_state *st = ck_get_state(module);
    const char *url;
    PyObject *dst_bytes = NULL; /* owned, from PyUnicode_FSConverter */
    const char *hash_prefix = NULL;
    PyObject *progress = Py_None; /* borrowed */
    PyObject *note = Py_None;     /* borrowed */
    const char *user_agent = NULL;
    ck_http_opts opts;
    ck_http_opts_init(&opts);
    if (!PyArg_ParseTupleAndKeywords(
            args, kwargs, "sO&|$zOiddllppzppOd", kwlist, &url, PyUnicode_FSConverter, &dst_bytes,
            &hash_prefix, &progress, &opts.retries, &opts.backoff_s, &opts.connect_timeout_s,
            &opts.low_speed_limit, &opts.low_speed_time_s, &opts.keep_partial, &opts.fsync,
            &user_agent, &opts.if_missing, &opts.sha256, &note, &opts.lock_timeout_s))
        return NULL;
    if ((progress != Py_None && !PyCallable_Check(progress)) ||
        (note != Py_None && !PyCallable_Check(note))) {
        Py_DECREF(dst_bytes);
        PyErr_SetString(PyExc_TypeError, "download: progress and note must be callable or None");
        return NULL;
    }
    if (opts.retries < 0 || opts.backoff_s < 0 || !(opts.lock_timeout_s > 0)) {
        Py_DECREF(dst_bytes);
        PyErr_SetString(PyExc_ValueError,
                        "download: retries and backoff must be >= 0, lock_timeout > 0");
        return NULL;
    }
    opts.hash_prefix = hash_prefix;
    opts.user_agent = user_agent;
    progress_ctx ctx = {NULL, progress == Py_None ? NULL : progress, NULL,
                        note == Py_None ? NULL : note};
    opts.progress = on_progress;
    opts.progress_ctx = &ctx;
    if (ctx.note != NULL) {
        opts.note = on_note;
        opts.note_ctx = &ctx;
    }
    const char *dst = PyBytes_AS_STRING(dst_bytes);

    ck_http_result res;
    ck_error err;
    ctx.ts = PyEval_SaveThread();
    ck_status s = ck_http_download(url, dst, &opts, &res, &err);
    PyEval_RestoreThread(ctx.ts);

    PyObject *out = NULL;
    if (ctx.exc != NULL) {
        /* KeyboardInterrupt, or what the progress callable raised */
        ck_restore_exception(ctx.exc);
        ctx.exc = NULL;
    } else if (s != CK_OK) {
        raise_download_error(st, url, &err, res.http_status);
    } else {
        out = result_dict(&res);
    }
    Py_DECREF(dst_bytes);
    return out;
}

PyMethodDef ck_http_methods[] = {
    {"download", (PyCFunction)(void (*)(void))py_download, METH_VARARGS | METH_KEYWORDS,
     "download(url, dst, *, hash_prefix=None, progress=None, retries=4, backoff=1.0,\n"
     "         timeout=30.0, low_speed_limit=1024, low_speed_time=30, keep_partial=True,\n"
     "         fsync=True, user_agent=None, if_missing=False, sha256=True, note=None,\n"
     "         lock_timeout=300.0) -> dict\n\n"
     "Downloads url into dst through dst + '.partial' (resumed when possible), hashing\n"
     "with SHA-256 on the way; progress(done, total) is called about every 50 ms.\n"
     "if_missing: when dst exists once the partial is locked (another process finished\n"
     "it meanwhile), keep it and transfer nothing. sha256=False skips the digest\n"
     "unless hash_prefix is given (result sha256 is then '').\n"
     "note(level, message): retries, waits, resumes (1 info, 2 warning).\n"
     "lock_timeout: seconds to wait for another download's lock while its partial does not\n"
     "grow, then DownloadError.\n"
     "Returns {size, sha256, resumed_from, attempts, status, existed}; raises DownloadError."},
    {NULL, NULL, 0, NULL},
};

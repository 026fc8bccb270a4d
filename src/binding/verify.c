/* _native.verify(mapping, filename) -> dict: the integrity checks of
 * ckptio.verify that need no Python objects built from the pickle.
 *
 * For a zip archive (torch >= 1.6):
 *   - the container: ck_zip_open's validation (end records, central
 *     directory, every record inside the data area, no overlaps, names);
 *   - every record's CRC-32 (stored records here, compressed ones while
 *     they are inflated, within the loader's inflation limit; data.pkl is
 *     inflated first and kept, so that the storage checks always run or a
 *     problem says why they cannot);
 *   - the version and data.pkl records are present;
 *   - data.pkl is walked in the loader's scan mode (nothing imported or
 *     called) and each persistent id is given to the loader's own
 *     persistent_load, which checks that its record data/<key> exists and
 *     holds exactly the bytes the pickle claims, as torch.save writes them
 *     and torch.load requires (no tensor is built).
 * TorchScript archives (format "torchscript") get the container and CRC
 * checks only. For other formats only the format is reported; ckptio.verify
 * (Python) then runs the loader itself, which checks the rest.
 *
 * The result: {"format": str, "problems": [(kind, record or None, offset
 * or None, message)], and counts: "records", "compressed", "crc_checked",
 * "crc_unrecorded", "storages", "storage_bytes", "unused_records",
 * "bytes"}. Problems name what they concern; messages carry no file name.
 */
#include "verify.h"

#include <string.h>

#include "budget.h"
#include "core/ahead.h"
#include "errors.h"
#include "mapping.h"
#include "session.h"
#include "tensors.h"
#include "unpickler.h"

/* as in load.c for weights_only loads (files not trusted): compressed
 * records inflate to at most this, in all */
#define CK_VERIFY_INFLATE_RATIO 16
#define CK_VERIFY_INFLATE_FLOOR ((uint64_t)1 << 20)

typedef struct report {
    PyObject *problems; /* strong list */
    PyObject *filename; /* borrowed str */
    unsigned long long records, compressed, crc_checked, crc_unrecorded;
    unsigned long long storages, storage_bytes, unused_records;
    int torchscript; /* the archive holds constants.pkl (torch.jit.save) */
} report;

/* Appends (kind, record, offset, message); record may be NULL, offset < 0
 * means none. Returns 0 or -1 (exception set). */
static int add(report *r, const char *kind, const char *record, size_t record_len, long long offset,
               PyObject *message) {
    PyObject *rec = record != NULL
                        ? PyUnicode_DecodeUTF8(record, (Py_ssize_t)record_len, "backslashreplace")
                        : Py_NewRef(Py_None);
    PyObject *off = offset >= 0 ? PyLong_FromLongLong(offset) : Py_NewRef(Py_None);
    PyObject *item = NULL;
    if (rec != NULL && off != NULL)
        item = Py_BuildValue("(sOOO)", kind, rec, off, message);
    Py_XDECREF(rec);
    Py_XDECREF(off);
    int rc = item != NULL ? PyList_Append(r->problems, item) : -1;
    Py_XDECREF(item);
    return rc;
}

static int add_text(report *r, const char *kind, const char *record, size_t record_len,
                    long long offset, const char *text) {
    PyObject *msg = PyUnicode_DecodeUTF8(text, (Py_ssize_t)strlen(text), "backslashreplace");
    if (msg == NULL)
        return -1;
    int rc = add(r, kind, record, record_len, offset, msg);
    Py_DECREF(msg);
    return rc;
}

/* Turns the pending exception into a problem (its message, without the
 * "<file>: " prefix the loader puts in front). Exceptions that are not
 * about the file (MemoryError, KeyboardInterrupt) stay pending: -1. */
static int add_pending(report *r, const char *kind, const char *record, long long offset) {
    if (PyErr_ExceptionMatches(PyExc_MemoryError) ||
        PyErr_ExceptionMatches(PyExc_KeyboardInterrupt))
        return -1;
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    PyObject *text = value != NULL ? PyObject_Str(value) : NULL;
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
    if (text == NULL)
        return -1;
    PyObject *prefix = PyUnicode_FromFormat("%U: ", r->filename);
    if (prefix == NULL) {
        Py_DECREF(text);
        return -1;
    }
    if (PyUnicode_Tailmatch(text, prefix, 0, PY_SSIZE_T_MAX, -1) == 1)
        Py_SETREF(text, PyUnicode_Substring(text, PyUnicode_GET_LENGTH(prefix),
                                            PyUnicode_GET_LENGTH(text)));
    Py_DECREF(prefix);
    if (text == NULL)
        return -1;
    int rc = add(r, kind, record, record ? strlen(record) : 0, offset, text);
    Py_DECREF(text);
    return rc;
}

/* Starts a read-ahead thread over every record's data (core/ahead.h), when
 * the archive is the start of a file mapping (and its records hold enough
 * bytes for ck_ahead_start_map to start one): on a cold page cache the disk then runs
 * ahead of the CRCs, which read the mapping in file order. Returns the
 * pieces to free after ck_ahead_stop, or NULL (no thread; a->started 0). */
static ck_piece *ahead_of_records(const ck_session *s, ck_ahead *a) {
    a->started = 0;
    const uint8_t *pages = ck_mapping_file_pages(s->st, s->owner);
    if (pages == NULL || pages != s->buf)
        return NULL;
    ck_piece *pieces = PyMem_RawCalloc(s->zip.n_entries, sizeof *pieces);
    if (pieces == NULL)
        return NULL; /* only slower */
    for (size_t i = 0; i < s->zip.n_entries; i++)
        pieces[i] =
            (ck_piece){s->zip.entries[i].data_offset, NULL, (size_t)s->zip.entries[i].comp_size};
    if (ck_ahead_start_map(a, s->buf, pieces, s->zip.n_entries) != 0) {
        PyMem_RawFree(pieces);
        return NULL;
    }
    return pieces;
}

/* Checks every record's CRC-32; inflates compressed ones (within the
 * budget) to check theirs. Entry `done` (or -1) was inflated and checked
 * already. */
static int check_each_record(ck_session *s, report *r, uint64_t *budget, ptrdiff_t done) {
    ck_zip *zip = &s->zip;
    for (size_t i = 0; i < zip->n_entries; i++) {
        const ck_zip_entry *e = &zip->entries[i];
        ck_error err;
        ck_error_clear(&err);
        r->records++;
        if ((ptrdiff_t)i == done) {
            r->compressed++;
            r->crc_checked++;
            continue;
        }
        if (e->method == CK_ZIP_METHOD_STORED) {
            if (e->crc32 == 0 && e->size > 0) {
                /* torch >= 2.6 may leave CRCs unrecorded: nothing to compare */
                r->crc_unrecorded++;
                continue;
            }
            ck_status rc;
            Py_BEGIN_ALLOW_THREADS
                rc = ck_zip_check_crc(zip, i, 1, &err);
            Py_END_ALLOW_THREADS
            r->crc_checked++;
            if (rc != CK_OK &&
                add_text(r, "crc", e->name, e->name_len, (long long)e->data_offset, err.msg) < 0)
                return -1;
            continue;
        }
        r->compressed++;
        if (e->size > *budget) {
            char msg[200];
            snprintf(msg, sizeof msg,
                     "compressed record inflates to %llu bytes, past the limit of %llu left for "
                     "compressed records (16x the file, at least 1 MiB)",
                     (unsigned long long)e->size, (unsigned long long)*budget);
            if (add_text(r, "limit", e->name, e->name_len, (long long)e->data_offset, msg) < 0)
                return -1;
            continue;
        }
        uint8_t *out = NULL;
        size_t out_len = 0;
        ck_status rc;
        Py_BEGIN_ALLOW_THREADS
            rc = ck_zip_extract(zip, i, e->size, &out, &out_len, &err);
        Py_END_ALLOW_THREADS
        free(out);
        if (rc == CK_E_NOMEM) { /* no finding about the file: verify stops */
            ck_raise_core(s->st, s->filename, &err);
            return -1;
        }
        *budget -= out_len;
        r->crc_checked++;
        if (rc != CK_OK && add_text(r, rc == CK_E_CRC ? "crc" : "record", e->name, e->name_len,
                                    (long long)e->data_offset, err.msg) < 0)
            return -1;
    }
    return 0;
}

/* check_each_record, with a read-ahead thread over the records beside it. */
static int check_records(ck_session *s, report *r, uint64_t *budget, ptrdiff_t done) {
    ck_ahead ahead;
    ck_piece *pieces = ahead_of_records(s, &ahead);
    int rc = check_each_record(s, r, budget, done);
    if (pieces != NULL) {
        Py_BEGIN_ALLOW_THREADS
            ck_ahead_stop(&ahead);
        Py_END_ALLOW_THREADS
        PyMem_RawFree(pieces);
    }
    return rc;
}

/* The name of entry idx relative to the archive folder, NUL-terminated into
 * buf (cut to fit). */
static const char *rel_name(const ck_zip *zip, size_t idx, char *buf, size_t cap) {
    const ck_zip_entry *e = &zip->entries[idx];
    size_t len = e->name_len - zip->prefix_len - 1;
    if (len >= cap)
        len = cap - 1;
    memcpy(buf, e->name + zip->prefix_len + 1, len);
    buf[len] = 0;
    return buf;
}

/* Walks data.pkl for its persistent ids and checks each storage against its
 * record with the loader's own persistent_load. */
static int check_storages(ck_session *s, report *r, const uint8_t *pkl, size_t pkl_len) {
    PyObject *pids = PyList_New(0);
    if (pids == NULL)
        return -1;
    size_t used = 0;
    if (ck_unpickle_scan(s, pkl, pkl_len, "data.pkl", &used, pids) < 0) {
        Py_DECREF(pids);
        return add_pending(r, "pickle", "data.pkl", -1);
    }
    if (ck_storages_alloc(s, s->zip.n_entries) < 0) {
        Py_DECREF(pids);
        return -1;
    }
    int rc = 0;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(pids) && rc == 0; i++) {
        PyObject *ref = ck_persistent_load(s, PyList_GET_ITEM(pids, i)); /* new or NULL */
        if (ref == NULL) {
            /* name the record the id points at, when it names one */
            PyObject *pid = PyList_GET_ITEM(pids, i); /* borrowed */
            const char *key = NULL;
            if (PyTuple_Check(pid) && PyTuple_GET_SIZE(pid) >= 3 &&
                PyUnicode_Check(PyTuple_GET_ITEM(pid, 2))) {
                PyObject *type, *value, *tb;
                PyErr_Fetch(&type, &value, &tb);
                key = PyUnicode_AsUTF8(PyTuple_GET_ITEM(pid, 2));
                if (key == NULL)
                    PyErr_Clear();
                PyErr_Restore(type, value, tb);
            }
            char what[128];
            if (key != NULL)
                snprintf(what, sizeof what, "data/%s", key);
            else
                snprintf(what, sizeof what, "persistent id %zd", i);
            rc = add_pending(r, "storage", what, -1);
        }
        Py_XDECREF(ref);
    }
    Py_DECREF(pids);
    for (size_t i = 0; i < s->n_storages && rc == 0; i++) {
        const ck_storage *e = &s->storages[i];
        char name[256];
        const char *rel = rel_name(&s->zip, i, name, sizeof name);
        int is_data = strncmp(rel, "data/", 5) == 0;
        if (!e->used) {
            r->unused_records += is_data;
            continue;
        }
        r->storages++;
        r->storage_bytes += e->nbytes; /* == the record's size: persistent_load checked it */
    }
    return rc;
}

static int verify_zip(ck_session *s, report *r) {
    ck_error err;
    ck_error_clear(&err);
    if (ck_zip_open(&s->zip, s->buf, s->len, &err) != CK_OK)
        return add_text(r, "container", NULL, 0, -1, err.msg);
    s->is_zip = 1;
    uint64_t budget = (uint64_t)s->len * CK_VERIFY_INFLATE_RATIO;
    if (budget < CK_VERIFY_INFLATE_FLOOR)
        budget = CK_VERIFY_INFLATE_FLOOR;
    if (ck_zip_find(&s->zip, "constants.pkl", 13) >= 0) {
        r->torchscript = 1; /* records checked; its pickles are torch.jit's to read */
        return check_records(s, r, &budget, -1);
    }
    /* data.pkl is inflated first, once, and kept for the storage checks: they
     * must never be skipped for want of budget left by the other records */
    ptrdiff_t pkl = ck_zip_find(&s->zip, "data.pkl", 8);
    const ck_zip_entry *pe = pkl >= 0 ? &s->zip.entries[pkl] : NULL;
    const uint8_t *pkl_data = NULL;
    size_t pkl_len = 0;
    uint8_t *owned = NULL;
    int pkl_ready = 0;
    ptrdiff_t done = -1;
    if (pe != NULL && pe->method == CK_ZIP_METHOD_STORED) {
        pkl_data = s->buf + pe->data_offset;
        pkl_len = (size_t)pe->size;
        pkl_ready = 1; /* its CRC is checked with the other records */
    } else if (pe != NULL && pe->size > budget) {
        char msg[200];
        snprintf(msg, sizeof msg,
                 "data.pkl inflates to %llu bytes, past the limit of %llu for compressed records "
                 "(16x the file, at least 1 MiB): its storages cannot be checked",
                 (unsigned long long)pe->size, (unsigned long long)budget);
        if (add_text(r, "limit", pe->name, pe->name_len, (long long)pe->data_offset, msg) < 0)
            return -1;
        done = pkl;
    } else if (pe != NULL) {
        ck_status rc;
        Py_BEGIN_ALLOW_THREADS
            rc = ck_zip_extract(&s->zip, (size_t)pkl, pe->size, &owned, &pkl_len, &err);
        Py_END_ALLOW_THREADS
        if (rc == CK_E_NOMEM) { /* no finding about the file: verify stops */
            ck_raise_core(s->st, s->filename, &err);
            return -1;
        }
        done = pkl;
        if (rc != CK_OK) {
            if (add_text(r, rc == CK_E_CRC ? "crc" : "record", pe->name, pe->name_len,
                         (long long)pe->data_offset, err.msg) < 0)
                return -1;
        } else {
            budget -= pkl_len;
            pkl_data = owned;
            pkl_ready = 1;
        }
    }
    int rc = check_records(s, r, &budget, done);
    if (rc == 0 && ck_zip_find(&s->zip, "version", 7) < 0 &&
        ck_zip_find(&s->zip, ".data/version", 13) < 0)
        rc = add_text(r, "record", "version", 7, -1, "the archive has no version record");
    if (rc == 0 && pe == NULL)
        rc = add_text(r, "record", "data.pkl", 8, -1, "the archive has no data.pkl record");
    if (rc == 0 && pkl_ready)
        rc = check_storages(s, r, pkl_data, pkl_len);
    free(owned);
    return rc;
}

static const char *format_of(const uint8_t *b, size_t n) {
    if (n >= 4 && memcmp(b, "PK\x03\x04", 4) == 0)
        return "zip";
    if (n >= 8 && memcmp(b, "PYTORCH1", 8) == 0)
        return "pytorch1";
    if (n >= 262 && memcmp(b + 257, "ustar", 5) == 0)
        return "tar";
    if (n >= 1 && (b[0] == 0x80 || b[0] == 'L')) /* PROTO, or LONG (protocols 0, 1) */
        return "legacy";
    return "unknown";
}

static PyObject *py_verify(PyObject *module, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"mapping", "filename", "encoding", "errors", NULL};
    PyObject *mapping, *filename;
    const char *encoding = "utf-8", *errors = "strict";
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OU|$ss:verify", kwlist, &mapping, &filename,
                                     &encoding, &errors))
        return NULL;
    ck_state *st = ck_get_state(module);
    if (ck_torch_ready(st) < 0)
        return NULL;
    if (!ck_mapping_check(st, mapping)) {
        PyErr_SetString(PyExc_TypeError, "verify: mapping must be a ckptio._native.Mapping");
        return NULL;
    }
    ck_session s;
    ck_session_begin(&s, st, filename, mapping);
    s.weights_only = 1;
    s.map_kind = CK_MAP_CPU;
    s.inflate_budget = 0; /* the scan inflates nothing */
    ck_budget_begin(&s);
    /* strings of Python 2 era pickles decode as the load would decode them */
    s.encoding = strcmp(encoding, "bytes") != 0 ? PyUnicode_FromString(encoding) : NULL;
    s.errors = PyUnicode_FromString(errors);
    report r = {0};
    r.filename = filename;
    r.problems = PyList_New(0);
    const char *format = format_of(s.buf, s.len);
    int rc = (s.encoding != NULL || strcmp(encoding, "bytes") == 0) && s.errors != NULL &&
                     r.problems != NULL
                 ? 0
                 : -1;
    if (rc == 0 && strcmp(format, "zip") == 0)
        rc = verify_zip(&s, &r);
    PyObject *result = NULL;
    if (r.torchscript)
        format = "torchscript";
    if (rc == 0)
        result = Py_BuildValue("{sssOsKsKsKsKsKsKsKsn}", "format", format, "problems", r.problems,
                               "records", r.records, "compressed", r.compressed, "crc_checked",
                               r.crc_checked, "crc_unrecorded", r.crc_unrecorded, "storages",
                               r.storages, "storage_bytes", r.storage_bytes, "unused_records",
                               r.unused_records, "bytes", (Py_ssize_t)s.len);
    ck_session_end(&s);
    Py_XDECREF(r.problems);
    return result;
}

/* scan_pickle(data, filename, file_size, *, encoding='utf-8') -> int: walks
 * the pickle at the start of data in scan mode (nothing imported or called)
 * under the limits of a load of a file_size-byte file (nesting depth, the
 * memory bound, every length checked); returns the bytes it used, or raises
 * the CheckpointError a load would raise. ckptio info runs it before
 * Python's own unpickler sees the bytes: that one recurses without a limit
 * (a tuple 10^6 deep crashes CPython's tuple hash) and has no memory bound. */
static PyObject *py_scan_pickle(PyObject *module, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"data", "filename", "file_size", "encoding", NULL};
    Py_buffer view;
    PyObject *filename;
    Py_ssize_t file_size;
    const char *encoding = "utf-8";
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "y*Un|$s:scan_pickle", kwlist, &view, &filename,
                                     &file_size, &encoding))
        return NULL;
    ck_state *st = ck_get_state(module);
    if (ck_torch_ready(st) < 0) {
        PyBuffer_Release(&view);
        return NULL;
    }
    ck_session s;
    memset(&s, 0, sizeof s);
    s.st = st;
    s.filename = filename;
    s.weights_only = 1;
    s.map_kind = CK_MAP_CPU;
    s.buf = view.buf;
    s.fd = -1; /* bytes, not a mapped file */
    /* the bound of a load of the whole file, not of this pickle alone */
    s.len = (size_t)(file_size > view.len ? file_size : view.len);
    ck_budget_begin(&s);
    s.len = (size_t)view.len;
    s.encoding = strcmp(encoding, "bytes") != 0 ? PyUnicode_FromString(encoding) : NULL;
    s.errors = PyUnicode_FromString("strict");
    PyObject *pids = PyList_New(0);
    size_t used = 0;
    int rc =
        (s.encoding != NULL || strcmp(encoding, "bytes") == 0) && s.errors != NULL && pids != NULL
            ? ck_unpickle_scan(&s, view.buf, (size_t)view.len, "the pickle", &used, pids)
            : -1;
    Py_XDECREF(pids);
    ck_session_end(&s);
    PyBuffer_Release(&view);
    return rc < 0 ? NULL : PyLong_FromSize_t(used);
}

PyMethodDef ck_verify_methods[] = {
    {"scan_pickle", (PyCFunction)(void (*)(void))py_scan_pickle, METH_VARARGS | METH_KEYWORDS,
     "scan_pickle(data, filename, file_size, *, encoding='utf-8') -> int: walks the pickle at "
     "the start of data without calling anything, under a load's limits; the bytes it used."},
    {"verify", (PyCFunction)(void (*)(void))py_verify, METH_VARARGS | METH_KEYWORDS,
     "verify(mapping, filename, *, encoding='utf-8', errors='strict') -> dict: CRCs, container "
     "and storage checks (see ckptio.verify)."},
    {NULL, NULL, 0, NULL},
};

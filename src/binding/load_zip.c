/* The torch.save zip archive (torch >= 1.6): its version and byteorder
 * records, then data.pkl run over the archive's storages. */
#include "load_internal.h"

#include <string.h>

#include "budget.h"
#include "errors.h"
#include "session.h"
#include "tensors.h"
#include "unpickler.h"

/* The newest archive version torch's reader accepts
 * (kMaxSupportedFileFormatVersion in caffe2/serialize/versions.h). */
#define CK_MAX_ARCHIVE_VERSION 10

/* records up to this size are copied by pread rather than read through the
 * mapping (see record_bytes) */
#define CK_PREAD_RECORD_MAX ((uint64_t)64 * 1024)

/* The bytes of a record by relative name: a pointer into the archive for a
 * stored record, or a copy in *owned (free with free()): inflated, or, when
 * the archive is a mapped file, read with pread (so that reading data.pkl
 * and the small records does not fault the mapping, which on a cold page
 * cache reads megabytes of tensors around them). whole: the caller parses
 * the record whole anyway (data.pkl), so a stored one is copied by pread
 * at any size (the copy charged to the budget); otherwise only small ones
 * are, and a large record stays in the mapping, so that a file-sized
 * 'version' or 'byteorder' costs no file-sized copy. Returns 1 when found,
 * 0 when absent, -1 on error. */
static int record_bytes(ck_session *s, const char *rel, int whole, const uint8_t **data,
                        size_t *len, uint8_t **owned, ptrdiff_t *index) {
    ptrdiff_t idx = ck_zip_find(&s->zip, rel, strlen(rel));
    if (index != NULL)
        *index = idx;
    *owned = NULL;
    if (idx < 0)
        return 0;
    const ck_zip_entry *e = &s->zip.entries[idx];
    if (e->method == CK_ZIP_METHOD_STORED && s->fd >= 0 &&
        (e->size <= CK_PREAD_RECORD_MAX || whole)) {
        static const uint8_t empty[1];
        ck_error err;
        ck_error_clear(&err);
        if (e->size > CK_PREAD_RECORD_MAX && ck_charge(s, e->size) < 0) {
            ck_raise_over_budget(s, rel);
            return -1;
        }
        if (ck_zip_read_stored(&s->zip, (size_t)idx, owned, len, &err) != CK_OK) {
            ck_raise_core(s->st, s->filename, &err);
            return -1;
        }
        *data = *owned != NULL ? *owned : empty;
        return 1;
    }
    if (e->method == CK_ZIP_METHOD_STORED) {
        *data = s->buf + e->data_offset;
        *len = (size_t)e->size;
        return 1;
    }
    if (e->size > s->inflate_budget) {
        ck_raise(s->st->CheckpointError, s->filename,
                 "compressed record %s would inflate to %llu bytes, past the limit of %llu", rel,
                 (unsigned long long)e->size, (unsigned long long)s->inflate_budget);
        return -1;
    }
    if (ck_charge(s, e->size) < 0) {
        ck_raise_over_budget(s, rel);
        return -1;
    }
    ck_error err;
    ck_error_clear(&err);
    size_t out_len = 0;
    if (ck_zip_extract(&s->zip, (size_t)idx, e->size, owned, &out_len, &err) != CK_OK) {
        ck_raise_core(s->st, s->filename, &err);
        return -1;
    }
    s->inflate_budget -= out_len;
    *data = *owned;
    *len = out_len;
    return 1;
}

static int check_version(ck_session *s) {
    const uint8_t *data;
    size_t len;
    uint8_t *owned;
    const char *name = ".data/version";
    int found = record_bytes(s, name, 0, &data, &len, &owned, NULL);
    if (found == 0) {
        name = "version";
        found = record_bytes(s, name, 0, &data, &len, &owned, NULL);
    }
    if (found < 0)
        return -1;
    if (found == 0) {
        ck_raise(s->st->CheckpointError, s->filename,
                 "the archive has no version record (not written by torch.save)");
        return -1;
    }
    uint64_t version = 0;
    size_t digits = 0;
    while (digits < len && digits < 20 && data[digits] >= '0' && data[digits] <= '9')
        version = version * 10 + (uint64_t)(data[digits++] - '0');
    free(owned);
    if (digits == 0 || digits == 20) {
        ck_raise(s->st->CheckpointError, s->filename, "record %s holds no version number", name);
        return -1;
    }
    if (version < 1 || version > CK_MAX_ARCHIVE_VERSION) {
        ck_raise(s->st->CheckpointError, s->filename,
                 "archive version %llu is outside the versions torch reads (1 to %d)",
                 (unsigned long long)version, CK_MAX_ARCHIVE_VERSION);
        return -1;
    }
    return 0;
}

static int check_byteorder(ck_session *s) {
    const uint8_t *data;
    size_t len;
    uint8_t *owned;
    int found = record_bytes(s, "byteorder", 0, &data, &len, &owned, NULL);
    if (found < 0)
        return -1;
    int little = 1; /* torch reads files without the record as little-endian */
    if (found) {
        if (len == 6 && memcmp(data, "little", 6) == 0)
            little = 1;
        else if (len == 3 && memcmp(data, "big", 3) == 0)
            little = 0;
        else {
            free(owned);
            ck_raise(s->st->CheckpointError, s->filename,
                     "record byteorder must be 'little' or 'big'");
            return -1;
        }
    }
    free(owned);
    s->byteswap = little != ck_host_is_little();
    return 0;
}

PyObject *ck_load_zip(ck_session *s) {
    ck_state *st = s->st;
    ck_error err;
    ck_error_clear(&err);
    ck_status rc = ck_zip_open_file(&s->zip, s->buf, s->len, s->fd, s->fd_base, &err);
    if (rc != CK_OK)
        return ck_raise_core(st, s->filename, &err);
    s->is_zip = 1;
    if (ck_zip_find(&s->zip, "constants.pkl", 13) >= 0) {
        if (s->weights_only)
            return ck_raise(st->CheckpointError, s->filename,
                            "this is a TorchScript archive (torch.jit.save): load it with "
                            "torch.jit.load; weights_only=True cannot load TorchScript");
        return Py_NewRef(st->torchscript_marker);
    }
    if (check_version(s) < 0 || check_byteorder(s) < 0)
        return NULL;
    const uint8_t *pkl;
    size_t pkl_len;
    uint8_t *owned;
    ptrdiff_t pkl_idx;
    int found = record_bytes(s, "data.pkl", 1, &pkl, &pkl_len, &owned, &pkl_idx);
    if (found < 0)
        return NULL;
    if (found == 0)
        return ck_raise(st->CheckpointError, s->filename,
                        "the archive has no data.pkl record (not written by torch.save)");
    if (s->zip.entries[pkl_idx].method == CK_ZIP_METHOD_STORED &&
        ck_zip_check_crc_of(&s->zip, (size_t)pkl_idx, pkl, 0, &err) != CK_OK) {
        free(owned);
        ck_raise_core(st, s->filename, &err);
        return NULL;
    }
    PyObject *result = NULL;
    if (ck_storages_alloc(s, s->zip.n_entries) == 0)
        result = ck_unpickle(s, pkl, pkl_len, "data.pkl", NULL);
    if (ck_warn_protocol(s, result != NULL) < 0)
        Py_CLEAR(result);
    free(owned);
    return result;
}

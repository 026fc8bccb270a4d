#include "zipread.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <libdeflate.h>

#include "crc.h"
#include "fdio.h"

#define SIG_LOCAL 0x04034b50u
#define SIG_CENTRAL 0x02014b50u
#define SIG_EOCD 0x06054b50u
#define SIG_Z64_EOCD 0x06064b50u
#define SIG_Z64_LOCATOR 0x07064b50u

#define EOCD_SIZE 22
#define Z64_LOCATOR_SIZE 20
#define Z64_EOCD_MIN 56
#define CENTRAL_SIZE 46
#define LOCAL_SIZE 30
#define MAX_COMMENT 65535

/* ---- little-endian reads (callers check bounds first) ------------------- */

static uint16_t le16(const uint8_t *p) {
    return (uint16_t)(p[0] | p[1] << 8);
}

static uint32_t le32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t le64(const uint8_t *p) {
    return (uint64_t)le32(p) | (uint64_t)le32(p + 4) << 32;
}

/* A record name fit for a message: printable ASCII kept, other bytes as
 * \xNN, cut at about 80 characters. */
static const char *show(char out[128], const char *name, size_t len) {
    size_t o = 0;
    for (size_t i = 0; i < len && o < 100; i++) {
        unsigned char c = (unsigned char)name[i];
        if (c >= 0x20 && c < 0x7f && c != '\\')
            out[o++] = (char)c;
        else
            o += (size_t)snprintf(out + o, 128 - o, "\\x%02x", c);
    }
    if (o >= 100)
        o = (size_t)snprintf(out + 100, 28, "...") + 100;
    out[o] = 0;
    return out;
}

/* ---- where the bytes come from -------------------------------------------- */

/* While an archive is opened its structures are read either straight from
 * the buffer or, when the buffer maps a file and fd is that file, with
 * pread: a few bytes per header instead of a page fault, which on a cold
 * page cache makes the kernel read megabytes around each header. */
typedef struct zsrc {
    const uint8_t *buf;
    size_t len;
    int fd;        /* -1: read the buffer */
    uint64_t base; /* the file offset of buf[0] */
} zsrc;

/* Points *out at bytes [off, off + n) of the archive (the caller checked
 * that they lie inside it): into the buffer, or into scratch (n bytes or
 * more) filled by pread. */
static ck_status zread(const zsrc *z, uint64_t off, size_t n, uint8_t *scratch, const uint8_t **out,
                       ck_error *err) {
    if (z->fd < 0) {
        *out = z->buf + off;
        return CK_OK;
    }
    if (off > UINT64_MAX - z->base)
        return ck_fail(err, CK_E_RANGE, "offset %llu lies past the largest file offset",
                       (unsigned long long)off);
    ssize_t got = ck_pread_all(z->fd, scratch, n, z->base + off);
    if (got < 0)
        return ck_fail_errno(err, errno, "cannot read %zu bytes at offset %llu", n,
                             (unsigned long long)off);
    if ((size_t)got < n)
        return ck_fail(err, CK_E_TRUNCATED,
                       "the file ends at offset %llu, before the %zu bytes at %llu it held when "
                       "it was opened (changed while read?)",
                       (unsigned long long)(off + (uint64_t)got), n, (unsigned long long)off);
    *out = scratch;
    return CK_OK;
}

/* ---- the end records ---------------------------------------------------- */

typedef struct end_info {
    uint64_t n_entries;
    uint64_t cd_size;
    uint64_t cd_offset;
    uint64_t limit; /* the central directory must end at or before this */
    int zip64;
} end_info;

static ck_status find_end(const zsrc *z, end_info *end, ck_error *err) {
    size_t len = z->len;
    if (len < EOCD_SIZE)
        return ck_fail(err, CK_E_FORMAT, "too short to be a zip archive (%zu bytes)", len);
    size_t lowest = len - EOCD_SIZE > MAX_COMMENT ? len - EOCD_SIZE - MAX_COMMENT : 0;
    /* the end of the file, where the end record is searched */
    uint8_t *tail_copy = NULL;
    if (z->fd >= 0 && (tail_copy = malloc(len - lowest)) == NULL)
        return ck_fail(err, CK_E_NOMEM, "cannot allocate %zu bytes", len - lowest);
    const uint8_t *tail;
    ck_status rc = zread(z, lowest, len - lowest, tail_copy, &tail, err);
    if (rc != CK_OK) {
        free(tail_copy);
        return rc;
    }
    size_t eocd = SIZE_MAX, loose = SIZE_MAX;
    for (size_t i = len - EOCD_SIZE + 1; i-- > lowest;) {
        if (le32(tail + (i - lowest)) != SIG_EOCD)
            continue;
        size_t comment = le16(tail + (i - lowest) + 20);
        if (i + EOCD_SIZE + comment == len) {
            eocd = i;
            break;
        }
        if (loose == SIZE_MAX && i + EOCD_SIZE + comment <= len)
            loose = i;
    }
    if (eocd == SIZE_MAX)
        eocd = loose;
    if (eocd == SIZE_MAX) {
        free(tail_copy);
        return ck_fail(err, CK_E_FORMAT,
                       "no end of central directory record (not a zip archive, or truncated)");
    }
    uint8_t e[EOCD_SIZE];
    memcpy(e, tail + (eocd - lowest), EOCD_SIZE);
    free(tail_copy);
    uint16_t disk = le16(e + 4), cd_disk = le16(e + 6);
    uint16_t n_disk = le16(e + 8), n_total = le16(e + 10);
    end->n_entries = n_total;
    end->cd_size = le32(e + 12);
    end->cd_offset = le32(e + 16);
    end->limit = eocd;
    end->zip64 = 0;

    uint8_t scratch[Z64_EOCD_MIN];
    const uint8_t *loc_bytes = NULL;
    if (eocd >= Z64_LOCATOR_SIZE) {
        rc = zread(z, eocd - Z64_LOCATOR_SIZE, Z64_LOCATOR_SIZE, scratch, &loc_bytes, err);
        if (rc != CK_OK)
            return rc;
    }
    if (loc_bytes != NULL && le32(loc_bytes) == SIG_Z64_LOCATOR) {
        size_t loc = eocd - Z64_LOCATOR_SIZE;
        uint32_t z64_disk = le32(loc_bytes + 4);
        uint64_t z64_off = le64(loc_bytes + 8);
        uint32_t disks = le32(loc_bytes + 16);
        if (z64_disk != 0 || disks > 1)
            return ck_fail(err, CK_E_UNSUPPORTED, "multi-disk zip archives are not supported");
        if (z64_off > loc || loc - z64_off < Z64_EOCD_MIN)
            return ck_fail(err, CK_E_RANGE,
                           "the zip64 end record offset %llu is not before its locator at %zu",
                           (unsigned long long)z64_off, loc);
        const uint8_t *zr;
        rc = zread(z, z64_off, Z64_EOCD_MIN, scratch, &zr, err);
        if (rc != CK_OK)
            return rc;
        if (le32(zr) != SIG_Z64_EOCD)
            return ck_fail(err, CK_E_FORMAT, "no zip64 end record at offset %llu",
                           (unsigned long long)z64_off);
        uint64_t rest = le64(zr + 4);
        if (rest < Z64_EOCD_MIN - 12 || rest > loc - z64_off - 12)
            return ck_fail(err, CK_E_RANGE, "the zip64 end record's size (%llu) is invalid",
                           (unsigned long long)rest);
        if (le32(zr + 16) != 0 || le32(zr + 20) != 0)
            return ck_fail(err, CK_E_UNSUPPORTED, "multi-disk zip archives are not supported");
        uint64_t z_disk = le64(zr + 24), z_total = le64(zr + 32);
        if (z_disk != z_total)
            return ck_fail(err, CK_E_UNSUPPORTED, "multi-disk zip archives are not supported");
        end->n_entries = z_total;
        end->cd_size = le64(zr + 40);
        end->cd_offset = le64(zr + 48);
        end->limit = z64_off;
        end->zip64 = 1;
        return CK_OK;
    }
    if (disk != 0 || cd_disk != 0 || n_disk != n_total)
        return ck_fail(err, CK_E_UNSUPPORTED, "multi-disk zip archives are not supported");
    return CK_OK;
}

/* ---- names ---------------------------------------------------------------- */

static ck_status check_name(size_t i, const char *name, size_t len, ck_error *err) {
    char shown[128];
    if (len == 0)
        return ck_fail(err, CK_E_FORMAT, "central directory entry %zu has an empty name", i);
    if (memchr(name, 0, len) != NULL)
        return ck_fail(err, CK_E_FORMAT, "record name '%s' holds a NUL byte",
                       show(shown, name, len));
    if (name[0] == '/')
        return ck_fail(err, CK_E_FORMAT, "record name '%s' is an absolute path",
                       show(shown, name, len));
    for (size_t start = 0; start <= len;) {
        const char *slash = memchr(name + start, '/', len - start);
        size_t end = slash ? (size_t)(slash - name) : len;
        if (end - start == 2 && name[start] == '.' && name[start + 1] == '.')
            return ck_fail(err, CK_E_FORMAT, "record name '%s' holds a '..' component",
                           show(shown, name, len));
        start = end + 1;
    }
    return CK_OK;
}

/* ---- sorting ------------------------------------------------------------- */

/* Orders entry indices; ctx is the archive (no file-scope state, so that
 * any number of archives may be opened at once, from any thread). */
typedef int (*index_cmp)(const ck_zip *zip, uint32_t a, uint32_t b);

/* Stable bottom-up merge sort of idx[0 .. n): O(n log n) comparisons
 * whatever the input (qsort gives no such promise on every libc). */
static int sort_indices(uint32_t *idx, size_t n, index_cmp cmp, const ck_zip *zip) {
    if (n < 2)
        return 0;
    uint32_t *tmp = malloc(n * sizeof *tmp);
    if (tmp == NULL)
        return -1;
    uint32_t *src = idx, *dst = tmp;
    for (size_t width = 1; width < n; width *= 2) {
        for (size_t lo = 0; lo < n; lo += 2 * width) {
            size_t mid = lo + width < n ? lo + width : n;
            size_t hi = mid + width < n ? mid + width : n;
            size_t a = lo, b = mid, o = lo;
            while (a < mid && b < hi)
                dst[o++] = cmp(zip, src[b], src[a]) < 0 ? src[b++] : src[a++];
            while (a < mid)
                dst[o++] = src[a++];
            while (b < hi)
                dst[o++] = src[b++];
        }
        uint32_t *t = src;
        src = dst;
        dst = t;
    }
    if (src != idx)
        memcpy(idx, src, n * sizeof *idx);
    free(tmp);
    return 0;
}

/* ---- the name index ------------------------------------------------------- */

/* The names are looked up through a sorted array and binary search rather
 * than a hash table: a file chooses its names, and names chosen to collide
 * in an unkeyed hash turn every insertion into a scan of the table (100,000
 * such names took 29 s). Sorting costs O(n log n) name comparisons for any
 * choice of names and finds duplicates as neighbours. */

static const char *rel_name(const ck_zip *zip, size_t idx, size_t *len) {
    const ck_zip_entry *e = &zip->entries[idx];
    *len = e->name_len - zip->prefix_len - 1;
    return e->name + zip->prefix_len + 1;
}

static int cmp_names(const char *a, size_t alen, const char *b, size_t blen) {
    int c = memcmp(a, b, alen < blen ? alen : blen);
    if (c != 0)
        return c;
    return alen < blen ? -1 : alen > blen;
}

static int by_name(const ck_zip *zip, uint32_t a, uint32_t b) {
    size_t alen, blen;
    const char *an = rel_name(zip, a, &alen), *bn = rel_name(zip, b, &blen);
    return cmp_names(an, alen, bn, blen);
}

static ck_status build_index(ck_zip *zip, ck_error *err) {
    size_t n = zip->n_entries;
    zip->index_ = malloc(n * sizeof *zip->index_);
    if (zip->index_ == NULL)
        return ck_fail(err, CK_E_NOMEM, "cannot allocate the record index");
    for (size_t i = 0; i < n; i++)
        zip->index_[i] = (uint32_t)i;
    if (sort_indices(zip->index_, n, by_name, zip) < 0)
        return ck_fail(err, CK_E_NOMEM, "cannot allocate the record index");
    for (size_t k = 1; k < n; k++) {
        if (by_name(zip, zip->index_[k - 1], zip->index_[k]) == 0) {
            const ck_zip_entry *e = &zip->entries[zip->index_[k]];
            char shown[128];
            return ck_fail(err, CK_E_FORMAT, "duplicate record name '%s'",
                           show(shown, e->name, e->name_len));
        }
    }
    return CK_OK;
}

ptrdiff_t ck_zip_find(const ck_zip *zip, const char *rel, size_t rel_len) {
    if (zip->index_ == NULL)
        return -1;
    size_t lo = 0, hi = zip->n_entries;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2, len;
        const char *name = rel_name(zip, zip->index_[mid], &len);
        int c = cmp_names(name, len, rel, rel_len);
        if (c == 0)
            return (ptrdiff_t)zip->index_[mid];
        if (c < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return -1;
}

/* ---- the central directory ------------------------------------------------ */

/* Reads the zip64 extended information for the saturated fields. */
static ck_status zip64_fields(size_t i, const uint8_t *extra, size_t xlen, uint64_t *usize,
                              uint64_t *csize, uint64_t *offset, uint32_t *disk, ck_error *err) {
    int need_u = *usize == 0xFFFFFFFFu, need_c = *csize == 0xFFFFFFFFu;
    int need_o = *offset == 0xFFFFFFFFu, need_d = *disk == 0xFFFFu;
    if (!need_u && !need_c && !need_o && !need_d)
        return CK_OK;
    size_t p = 0;
    while (xlen - p >= 4) {
        uint16_t id = le16(extra + p), size = le16(extra + p + 2);
        p += 4;
        if (size > xlen - p)
            return ck_fail(err, CK_E_FORMAT,
                           "central directory entry %zu: an extra field runs past its entry", i);
        if (id == 0x0001) {
            size_t q = 0;
            size_t want = 8 * (size_t)(need_u + need_c + need_o) + 4 * (size_t)need_d;
            if (size < want)
                return ck_fail(err, CK_E_FORMAT,
                               "central directory entry %zu: the zip64 extra field holds %u "
                               "bytes, %zu are needed",
                               i, (unsigned)size, want);
            const uint8_t *z = extra + p;
            if (need_u) {
                *usize = le64(z + q);
                q += 8;
            }
            if (need_c) {
                *csize = le64(z + q);
                q += 8;
            }
            if (need_o) {
                *offset = le64(z + q);
                q += 8;
            }
            if (need_d)
                *disk = le32(z + q);
            return CK_OK;
        }
        p += size;
    }
    return ck_fail(err, CK_E_FORMAT,
                   "central directory entry %zu: saturated sizes but no zip64 extra field", i);
}

/* cd: the central directory's bytes (end->cd_size of them). */
static ck_status read_central(ck_zip *zip, const end_info *end, const uint8_t *cd, ck_error *err) {
    uint64_t p = 0, cd_end = end->cd_size;
    char shown[128];
    for (size_t i = 0; i < zip->n_entries; i++) {
        if (cd_end - p < CENTRAL_SIZE)
            return ck_fail(err, CK_E_FORMAT, "the central directory ends inside entry %zu of %zu",
                           i, zip->n_entries);
        const uint8_t *c = cd + p;
        if (le32(c) != SIG_CENTRAL)
            return ck_fail(err, CK_E_FORMAT, "central directory entry %zu has a bad signature", i);
        uint16_t flags = le16(c + 8), method = le16(c + 10);
        uint32_t crc = le32(c + 16);
        uint64_t csize = le32(c + 20), usize = le32(c + 24);
        size_t nlen = le16(c + 28), xlen = le16(c + 30), clen = le16(c + 32);
        uint32_t disk = le16(c + 34);
        uint64_t offset = le32(c + 42);
        if (CENTRAL_SIZE + nlen + xlen + clen > cd_end - p)
            return ck_fail(err, CK_E_FORMAT,
                           "central directory entry %zu runs past the central directory", i);
        const char *name = (const char *)c + CENTRAL_SIZE;
        ck_status rc = check_name(i, name, nlen, err);
        if (rc == CK_OK)
            rc =
                zip64_fields(i, c + CENTRAL_SIZE + nlen, xlen, &usize, &csize, &offset, &disk, err);
        if (rc != CK_OK)
            return rc;
        if (disk != 0)
            return ck_fail(err, CK_E_UNSUPPORTED, "multi-disk zip archives are not supported");
        if (flags & 1)
            return ck_fail(err, CK_E_UNSUPPORTED, "record '%s' is encrypted: not supported",
                           show(shown, name, nlen));
        if (method == CK_ZIP_METHOD_STORED && csize != usize)
            return ck_fail(
                err, CK_E_FORMAT, "stored record '%s' has compressed size %llu but size %llu",
                show(shown, name, nlen), (unsigned long long)csize, (unsigned long long)usize);
        ck_zip_entry *e = &zip->entries[i];
        e->name = name;
        e->name_len = nlen;
        e->method = method;
        e->flags = flags;
        e->crc32 = crc;
        e->comp_size = csize;
        e->size = usize;
        e->header_offset = offset;
        p += CENTRAL_SIZE + nlen + xlen + clen;
    }
    if (p != cd_end)
        return ck_fail(err, CK_E_FORMAT,
                       "the central directory holds %llu bytes after its %zu entries",
                       (unsigned long long)(cd_end - p), zip->n_entries);
    return CK_OK;
}

static ck_status read_locals(ck_zip *zip, const zsrc *z, ck_error *err) {
    char shown[128];
    uint64_t cd = zip->cd_offset;
    uint8_t *scratch = NULL;
    if (z->fd >= 0) {
        /* one read-ahead request per header first, so that on a cold page
         * cache the disk sees them all at once rather than one at a time */
        size_t longest = 0;
        for (size_t i = 0; i < zip->n_entries; i++) {
            const ck_zip_entry *e = &zip->entries[i];
            longest = e->name_len > longest ? e->name_len : longest;
            if (e->header_offset < cd && cd - e->header_offset >= LOCAL_SIZE)
                (void)posix_fadvise(z->fd, (off_t)(z->base + e->header_offset),
                                    (off_t)(LOCAL_SIZE + e->name_len), POSIX_FADV_WILLNEED);
        }
        if ((scratch = malloc(LOCAL_SIZE + longest)) == NULL)
            return ck_fail(err, CK_E_NOMEM, "cannot allocate %zu bytes", LOCAL_SIZE + longest);
    }
    ck_status rc = CK_OK;
    for (size_t i = 0; i < zip->n_entries && rc == CK_OK; i++) {
        ck_zip_entry *e = &zip->entries[i];
        const char *nm = show(shown, e->name, e->name_len);
        if (e->header_offset > cd || cd - e->header_offset < LOCAL_SIZE) {
            rc = ck_fail(err, CK_E_RANGE,
                         "record '%s': local header at %llu is not before the central "
                         "directory at %llu",
                         nm, (unsigned long long)e->header_offset, (unsigned long long)cd);
            break;
        }
        /* the fixed part and as much of the name as lies before the central
         * directory (all of it whenever the data range below is valid) */
        uint64_t room = cd - e->header_offset - LOCAL_SIZE;
        size_t want = LOCAL_SIZE + (size_t)(room < e->name_len ? room : e->name_len);
        const uint8_t *l;
        if ((rc = zread(z, e->header_offset, want, scratch, &l, err)) != CK_OK)
            break;
        if (le32(l) != SIG_LOCAL) {
            rc = ck_fail(err, CK_E_FORMAT, "record '%s': no local header at %llu", nm,
                         (unsigned long long)e->header_offset);
            break;
        }
        uint64_t lnlen = le16(l + 26), lxlen = le16(l + 28);
        uint64_t data = e->header_offset + LOCAL_SIZE + lnlen + lxlen;
        if (data > cd || e->comp_size > cd - data) {
            rc = ck_fail(err, CK_E_RANGE,
                         "record '%s': data [%llu, +%llu) extends past the central directory "
                         "at %llu",
                         nm, (unsigned long long)data, (unsigned long long)e->comp_size,
                         (unsigned long long)cd);
            break;
        }
        if (lnlen != e->name_len || memcmp(l + LOCAL_SIZE, e->name, e->name_len) != 0) {
            rc =
                ck_fail(err, CK_E_FORMAT, "record '%s': its local header names another record", nm);
            break;
        }
        e->data_offset = data;
    }
    free(scratch);
    return rc;
}

static int by_header(const ck_zip *zip, uint32_t a, uint32_t b) {
    uint64_t x = zip->entries[a].header_offset, y = zip->entries[b].header_offset;
    return x < y ? -1 : x > y;
}

static ck_status check_overlaps(ck_zip *zip, ck_error *err) {
    size_t n = zip->n_entries;
    uint32_t *order = malloc(n * sizeof *order);
    if (order == NULL)
        return ck_fail(err, CK_E_NOMEM, "cannot allocate %zu indices", n);
    for (size_t i = 0; i < n; i++)
        order[i] = (uint32_t)i;
    if (sort_indices(order, n, by_header, zip) < 0) {
        free(order);
        return ck_fail(err, CK_E_NOMEM, "cannot allocate %zu indices", n);
    }
    ck_status rc = CK_OK;
    for (size_t k = 1; k < n && rc == CK_OK; k++) {
        const ck_zip_entry *a = &zip->entries[order[k - 1]], *b = &zip->entries[order[k]];
        if (a->data_offset + a->comp_size > b->header_offset) {
            char sa[128], sb[128];
            rc = ck_fail(err, CK_E_RANGE, "records '%s' and '%s' overlap",
                         show(sa, a->name, a->name_len), show(sb, b->name, b->name_len));
        }
    }
    free(order);
    return rc;
}

static ck_status check_prefix(ck_zip *zip, ck_error *err) {
    char shown[128];
    const ck_zip_entry *first = &zip->entries[0];
    const char *slash = memchr(first->name, '/', first->name_len);
    if (slash == NULL || slash == first->name)
        return ck_fail(err, CK_E_FORMAT,
                       "first record '%s' is not inside a top folder (not written by torch.save)",
                       show(shown, first->name, first->name_len));
    zip->prefix_len = (size_t)(slash - first->name);
    for (size_t i = 1; i < zip->n_entries; i++) {
        const ck_zip_entry *e = &zip->entries[i];
        if (e->name_len <= zip->prefix_len + 1 ||
            memcmp(e->name, first->name, zip->prefix_len + 1) != 0)
            return ck_fail(err, CK_E_FORMAT, "record '%s' is outside the archive folder '%.*s'",
                           show(shown, e->name, e->name_len), (int)zip->prefix_len, first->name);
    }
    if (first->name_len <= zip->prefix_len + 1)
        return ck_fail(err, CK_E_FORMAT, "the archive's first record is its folder only");
    return CK_OK;
}

ck_status ck_zip_open(ck_zip *zip, const uint8_t *buf, size_t len, ck_error *err) {
    return ck_zip_open_file(zip, buf, len, -1, 0, err);
}

ck_status ck_zip_open_file(ck_zip *zip, const uint8_t *buf, size_t len, int fd, uint64_t base,
                           ck_error *err) {
    memset(zip, 0, sizeof *zip);
    zip->buf = buf;
    zip->len = len;
    zip->fd = fd;
    zip->base = fd >= 0 ? base : 0;
    zsrc z = {buf, len, fd, zip->base};
    end_info end = {0};
    ck_status rc = find_end(&z, &end, err);
    if (rc != CK_OK)
        return rc;
    if (end.cd_offset > end.limit || end.cd_size > end.limit - end.cd_offset)
        return ck_fail(err, CK_E_RANGE,
                       "the central directory [%llu, +%llu) lies outside the archive (%llu bytes "
                       "before its end records)",
                       (unsigned long long)end.cd_offset, (unsigned long long)end.cd_size,
                       (unsigned long long)end.limit);
    if (end.n_entries == 0)
        return ck_fail(err, CK_E_FORMAT, "the archive holds no records");
    if (end.n_entries > end.cd_size / CENTRAL_SIZE || end.n_entries > UINT32_MAX - 1)
        return ck_fail(err, CK_E_FORMAT,
                       "the central directory announces %llu entries but its %llu bytes hold at "
                       "most %llu",
                       (unsigned long long)end.n_entries, (unsigned long long)end.cd_size,
                       (unsigned long long)(end.cd_size / CENTRAL_SIZE));
    zip->n_entries = (size_t)end.n_entries;
    zip->cd_offset = end.cd_offset;
    zip->cd_size = end.cd_size;
    zip->zip64 = end.zip64;
    zip->entries = calloc(zip->n_entries, sizeof *zip->entries);
    if (zip->entries == NULL)
        return ck_fail(err, CK_E_NOMEM, "cannot allocate %zu entries", zip->n_entries);
    /* the central directory (read whole: the entries' names point into it;
     * its size is bounded by the file's, checked above) */
    if (fd >= 0 && (zip->cd_copy_ = malloc((size_t)end.cd_size)) == NULL)
        rc = ck_fail(err, CK_E_NOMEM, "cannot allocate %llu bytes for the central directory",
                     (unsigned long long)end.cd_size);
    const uint8_t *cd = NULL;
    if (rc == CK_OK)
        rc = zread(&z, end.cd_offset, (size_t)end.cd_size, zip->cd_copy_, &cd, err);
    if (rc == CK_OK)
        rc = read_central(zip, &end, cd, err);
    if (rc == CK_OK)
        rc = read_locals(zip, &z, err);
    if (rc == CK_OK)
        rc = check_overlaps(zip, err);
    if (rc == CK_OK)
        rc = check_prefix(zip, err);
    if (rc == CK_OK)
        rc = build_index(zip, err);
    if (rc != CK_OK)
        ck_zip_close(zip);
    return rc;
}

void ck_zip_close(ck_zip *zip) {
    if (zip == NULL)
        return;
    free(zip->entries);
    free(zip->cd_copy_);
    free(zip->index_);
    if (zip->inflater_ != NULL)
        libdeflate_free_decompressor(zip->inflater_);
    memset(zip, 0, sizeof *zip);
}

const uint8_t *ck_zip_stored_data(const ck_zip *zip, size_t idx) {
    if (idx >= zip->n_entries || zip->entries[idx].method != CK_ZIP_METHOD_STORED)
        return NULL;
    return zip->buf + zip->entries[idx].data_offset;
}

ck_status ck_zip_check_crc(const ck_zip *zip, size_t idx, int strict, ck_error *err) {
    if (zip->entries[idx].method != CK_ZIP_METHOD_STORED)
        return CK_OK;
    return ck_zip_check_crc_of(zip, idx, zip->buf + zip->entries[idx].data_offset, strict, err);
}

ck_status ck_zip_check_crc_of(const ck_zip *zip, size_t idx, const uint8_t *data, int strict,
                              ck_error *err) {
    const ck_zip_entry *e = &zip->entries[idx];
    char shown[128];
    if (e->method != CK_ZIP_METHOD_STORED)
        return CK_OK;
    if (e->crc32 == 0 && e->size > 0 && !strict)
        return CK_OK;
    uint32_t crc = ck_crc32(0, data, (size_t)e->size);
    if (crc != e->crc32)
        return ck_fail(err, CK_E_CRC, "record '%s' fails its CRC-32 check (%08x, expected %08x)",
                       show(shown, e->name, e->name_len), crc, e->crc32);
    return CK_OK;
}

ck_status ck_zip_read_stored(const ck_zip *zip, size_t idx, uint8_t **out, size_t *out_len,
                             ck_error *err) {
    const ck_zip_entry *e = &zip->entries[idx];
    char shown[128];
    *out = NULL;
    *out_len = 0;
    if (e->method != CK_ZIP_METHOD_STORED)
        return ck_fail(err, CK_E_UNSUPPORTED, "record '%s' is compressed",
                       show(shown, e->name, e->name_len));
    if (e->size == 0)
        return CK_OK;
    uint8_t *buf = NULL;
    if (posix_memalign((void **)&buf, 64, (size_t)e->size) != 0)
        return ck_fail(err, CK_E_NOMEM, "cannot allocate %llu bytes for record '%s'",
                       (unsigned long long)e->size, show(shown, e->name, e->name_len));
    zsrc z = {zip->buf, zip->len, zip->fd, zip->base};
    const uint8_t *data;
    ck_status rc = zread(&z, e->data_offset, (size_t)e->size, buf, &data, err);
    if (rc != CK_OK) {
        free(buf);
        return rc;
    }
    if (data != buf)
        memcpy(buf, data, (size_t)e->size);
    *out = buf;
    *out_len = (size_t)e->size;
    return CK_OK;
}

ck_status ck_zip_extract(const ck_zip *zip_in, size_t idx, uint64_t max_size, uint8_t **out,
                         size_t *out_len, ck_error *err) {
    ck_zip *zip = (ck_zip *)zip_in; /* the decompressor is a cache */
    const ck_zip_entry *e = &zip->entries[idx];
    char shown[128];
    const char *nm = show(shown, e->name, e->name_len);
    *out = NULL;
    *out_len = 0;
    if (e->size > max_size)
        return ck_fail(err, CK_E_LIMIT, "record '%s' inflates to %llu bytes, over the limit %llu",
                       nm, (unsigned long long)e->size, (unsigned long long)max_size);
    if (e->size > SIZE_MAX)
        return ck_fail(err, CK_E_LIMIT, "record '%s' is too large for this address space", nm);
    if (e->size == 0)
        return CK_OK;
    uint8_t *buf = NULL;
    if (posix_memalign((void **)&buf, 64, (size_t)e->size) != 0)
        return ck_fail(err, CK_E_NOMEM, "cannot allocate %llu bytes for record '%s'",
                       (unsigned long long)e->size, nm);
    if (e->method == CK_ZIP_METHOD_STORED) {
        memcpy(buf, zip->buf + e->data_offset, (size_t)e->size);
        ck_status rc = ck_zip_check_crc(zip, idx, 0, err);
        if (rc != CK_OK) {
            free(buf);
            return rc;
        }
        *out = buf;
        *out_len = (size_t)e->size;
        return CK_OK;
    }
    ck_status rc = CK_OK;
    if (e->method != CK_ZIP_METHOD_DEFLATE) {
        rc = ck_fail(err, CK_E_UNSUPPORTED,
                     "record '%s' uses compression method %u; torch.save files hold only stored "
                     "(0) and deflated (8) records, the two torch.load reads",
                     nm, (unsigned)e->method);
        goto done;
    }
    if (zip->inflater_ == NULL) {
        zip->inflater_ = libdeflate_alloc_decompressor();
        if (zip->inflater_ == NULL) {
            rc = ck_fail(err, CK_E_NOMEM, "cannot allocate a decompressor for record '%s'", nm);
            goto done;
        }
    }
    /* one call over the whole stream: the output is bounded by the size
     * checked above, the input by the record's extent checked at open */
    size_t in_used = 0, got = 0;
    enum libdeflate_result r = libdeflate_deflate_decompress_ex(
        zip->inflater_, zip->buf + e->data_offset, (size_t)e->comp_size, buf, (size_t)e->size,
        &in_used, &got);
    if (r == LIBDEFLATE_INSUFFICIENT_SPACE)
        rc = ck_fail(err, CK_E_FORMAT, "record '%s' inflates past its announced size %llu", nm,
                     (unsigned long long)e->size);
    else if (r != LIBDEFLATE_SUCCESS)
        rc = ck_fail(err, CK_E_FORMAT, "cannot inflate record '%s': invalid deflate data", nm);
    else if (got != e->size)
        rc = ck_fail(err, CK_E_TRUNCATED, "record '%s' inflates to %llu bytes, not %llu", nm,
                     (unsigned long long)got, (unsigned long long)e->size);
    if (rc == CK_OK) {
        uint32_t crc = ck_crc32(0, buf, (size_t)e->size);
        if (crc != e->crc32)
            rc = ck_fail(err, CK_E_CRC, "record '%s' fails its CRC-32 check (%08x, expected %08x)",
                         nm, crc, e->crc32);
    }
done:
    if (rc != CK_OK) {
        free(buf);
        return rc;
    }
    *out = buf;
    *out_len = (size_t)e->size;
    return CK_OK;
}

/* Reading the records of a zip archive held in memory, as torch.save
 * writes it (zip format, torch >= 1.6) or as a user re-zipped it.
 *
 * ck_zip_open validates the whole archive structure before returning, so
 * that every entry it returns can be used without further range checks:
 *   - the end of central directory record (and the zip64 record and
 *     locator when present) lie inside the buffer and agree with it;
 *   - the central directory lies inside the buffer, before its end
 *     records, and holds exactly the announced entries (the count is
 *     checked against the directory's size before anything is allocated);
 *   - each entry's local header lies before the central directory, carries
 *     the same name as its central entry, and its data
 *     [data_offset, data_offset + comp_size) lies before the central
 *     directory; no two entries' [header_offset, data end) ranges overlap;
 *   - zip64 extra fields are used exactly where a 32-bit field is
 *     saturated, and are bounded by their extra block;
 *   - names are non-empty, hold no NUL byte, no ".." path component and do
 *     not start with '/'; no name appears twice;
 *   - every name starts with the archive's top folder ("<prefix>/"), taken
 *     from the first central entry up to its first '/';
 *   - stored entries (method 0) have comp_size == size; encrypted entries
 *     (flag bit 0) and multi-disk archives are refused (CK_E_UNSUPPORTED).
 *   Other compression methods are accepted here and refused by
 *   ck_zip_extract (torch reads only stored and deflated records).
 *
 * Nothing is copied: names point into the buffer, which must outlive the
 * ck_zip. All arithmetic on sizes read from the buffer is overflow-checked.
 *
 * ck_zip_open_file validates the same way, but when the buffer is a mapping
 * of a file it reads the end records, the central directory (copied; names
 * then point into the copy) and every local header with pread on the file
 * instead of touching the mapping: a few hundred small reads, issued to the
 * disk together, where faulting the mapping on a cold page cache makes the
 * kernel read megabytes around each header. The buffer may be a range of
 * the file (a DCP item inside a .distcp file): base is the file offset of
 * buf[0], and every pread adds it.
 */
#ifndef CKPTIO_CORE_ZIPREAD_H
#define CKPTIO_CORE_ZIPREAD_H

#include <stddef.h>
#include <stdint.h>

#include "status.h"

#define CK_ZIP_METHOD_STORED 0
#define CK_ZIP_METHOD_DEFLATE 8

typedef struct ck_zip_entry {
    const char *name; /* full name inside the buffer, not NUL-terminated */
    size_t name_len;
    uint16_t method;        /* 0 stored, 8 deflate, other: refused by ck_zip_extract */
    uint16_t flags;         /* general purpose bit flags from the central entry */
    uint32_t crc32;         /* from the central entry */
    uint64_t comp_size;     /* bytes of data in the archive */
    uint64_t size;          /* bytes once decompressed */
    uint64_t header_offset; /* local file header */
    uint64_t data_offset;   /* first byte of the entry's data */
} ck_zip_entry;

typedef struct ck_zip {
    const uint8_t *buf;
    size_t len;
    ck_zip_entry *entries; /* in central directory order */
    size_t n_entries;
    size_t prefix_len; /* top folder = entries[0].name[0 .. prefix_len) */
    uint64_t cd_offset;
    uint64_t cd_size;
    int zip64;     /* 1 when a zip64 end record was used */
    int fd;        /* the file buf maps, read with pread (ck_zip_open_file), or -1 */
    uint64_t base; /* the file offset of buf[0] (fd >= 0) */
    /* private: the central directory, read from fd (entry names point in) */
    uint8_t *cd_copy_;
    /* private: the entry indices sorted by name relative to the prefix
     * (binary search; see build_index) */
    uint32_t *index_;
    /* private: libdeflate's decompressor, made for the first compressed
     * record and reused */
    struct libdeflate_decompressor *inflater_;
} ck_zip;

/* Parses and validates the archive in buf[0 .. len). On success *zip owns
 * its entry array and index (release with ck_zip_close). On failure *zip is
 * left empty (ck_zip_close is still safe) and err says what and where, e.g.
 * "central directory entry 3 (name 'x/data/2'): data [100, 900) extends
 * past the central directory at 800". */
ck_status ck_zip_open(ck_zip *zip, const uint8_t *buf, size_t len, ck_error *err);

/* ck_zip_open for a buffer that maps bytes [base, base + len) of the file
 * open at fd: the structures are read with pread on fd at base + offset,
 * never through buf (see above); fd stays the caller's and must stay open
 * while the ck_zip is used by ck_zip_read_stored. Offsets in entries and
 * messages are relative to buf. fd < 0 is ck_zip_open. */
ck_status ck_zip_open_file(ck_zip *zip, const uint8_t *buf, size_t len, int fd, uint64_t base,
                           ck_error *err);

/* Frees what ck_zip_open allocated and zeroes *zip. */
void ck_zip_close(ck_zip *zip);

/* Index of the entry named "<prefix>/<rel>", or -1. rel is relative to the
 * top folder, e.g. "data.pkl" or "data/0". */
ptrdiff_t ck_zip_find(const ck_zip *zip, const char *rel, size_t rel_len);

/* Pointer to the entry's data inside the buffer, for stored entries only
 * (method 0); NULL for any other method. */
const uint8_t *ck_zip_stored_data(const ck_zip *zip, size_t idx);

/* Decompresses entry idx (stored or deflated, with libdeflate) into a newly
 * allocated 64-byte aligned buffer of exactly entries[idx].size bytes
 * (free with free()), checking its CRC-32. Refuses (CK_E_LIMIT) an entry
 * whose announced size exceeds max_size, before allocating. A stored entry
 * is copied. For size 0, *out is NULL and *out_len 0. */
ck_status ck_zip_extract(const ck_zip *zip, size_t idx, uint64_t max_size, uint8_t **out,
                         size_t *out_len, ck_error *err);

/* Computes the CRC-32 of a stored entry's data and compares it with the
 * central directory's. A recorded CRC of 0 on a non-empty entry is taken
 * as "not computed" (torch >= 2.6 can write files so) and passes unless
 * strict is set. Compressed entries are checked by ck_zip_extract. */
ck_status ck_zip_check_crc(const ck_zip *zip, size_t idx, int strict, ck_error *err);

/* The same check on a copy of the entry's data (entries[idx].size bytes). */
ck_status ck_zip_check_crc_of(const ck_zip *zip, size_t idx, const uint8_t *data, int strict,
                              ck_error *err);

/* A copy of stored entry idx's data in a newly allocated 64-byte aligned
 * buffer (free with free()): read with pread when the zip was opened on a
 * file, else copied from the buffer. No CRC check. For size 0, *out is
 * NULL. CK_E_UNSUPPORTED for a compressed entry. */
ck_status ck_zip_read_stored(const ck_zip *zip, size_t idx, uint8_t **out, size_t *out_len,
                             ck_error *err);

#endif

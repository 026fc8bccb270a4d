/* A zip writer that lays records out exactly as torch's PyTorchStreamWriter
 * (miniz with zip64 enabled) does: stored records, every record's data
 * aligned by an `FB` extra field padded with 'Z', data descriptors after
 * non-empty records, zip64 extra fields from 0xFFFFFFFF on, and zip64 end
 * records always. Record data is written straight from the caller's memory
 * (no copy), in chunks whose CRC-32 is computed just before each chunk is
 * written, while the chunk is warm in cache.
 *
 * Small records are not written one by one: headers, descriptors and the
 * data of several records are queued (the data by reference, not copied)
 * and written with one writev, so a checkpoint of thousands of small
 * tensors costs few system calls. Record data must therefore stay valid
 * until ck_zipw_finish returns (or the writer is freed).
 *
 * Bytes go to a sink: ck_zipw_fd_sink writes to a file descriptor; the
 * binding supplies one that writes to a Python file object.
 */
#ifndef CKPTIO_CORE_ZIPWRITE_H
#define CKPTIO_CORE_ZIPWRITE_H

#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

#include "crc_worker.h"
#include "serial_id.h"
#include "status.h"

/* Writes all of iov[0..n) in order, or fails. */
typedef ck_status (*ck_zipw_write_fn)(void *ctx, const struct iovec *iov, int n, ck_error *err);

/* Asks whether to stop (e.g. a pending signal); nonzero stops the write with
 * CK_E_INTERRUPTED. Called between chunks; may be NULL. */
typedef int (*ck_zipw_stop_fn)(void *ctx);

#define CK_ZIPW_MAX_SEGMENTS 64

/* A queued piece of output: caller memory (ptr), or pending header bytes
 * at pend[off] when ptr is NULL (pend may move as it grows). */
typedef struct ck_zipw_segment {
    const void *ptr;
    size_t off;
    size_t len;
} ck_zipw_segment;

typedef struct ck_zipw_entry {
    char *name; /* full name, prefix included, NUL-terminated */
    uint16_t name_len;
    uint32_t crc;
    uint64_t size;
    uint64_t offset; /* of the local header */
} ck_zipw_entry;

typedef struct ck_zipw {
    ck_zipw_write_fn write;
    void *write_ctx;
    ck_zipw_stop_fn stop;
    void *stop_ctx;
    char *prefix; /* archive folder + "/" */
    size_t prefix_len;
    uint64_t alignment;       /* data alignment, a power of two, 1..32768 */
    uint64_t zip64_threshold; /* sizes/offsets >= this use zip64 fields */
    int compute_crc;          /* 0: CRC fields are 0, as torch's compute_crc32=False */
    size_t chunk;             /* bytes per write of record data */
    uint64_t pos;             /* bytes handed to the sink so far */
    unsigned char *pend;      /* headers and descriptors not yet written */
    size_t pend_len, pend_cap;
    size_t pend_queued; /* pend[0..pend_queued) is already in segs */
    ck_zipw_segment segs[CK_ZIPW_MAX_SEGMENTS];
    int nsegs;
    uint64_t queued; /* bytes queued (pend and data) and not yet written */
    ck_zipw_entry *entries;
    size_t count, cap;
    ck_serial_id sid;
    ck_crc_worker *crc_worker; /* started on the first big record; NULL before */
    int crc_inline;            /* 1: no worker thread (it could not start) */
} ck_zipw;

/* Fills in a writer of records under folder `prefix` (no slash; must not
 * be empty). alignment: 64 for torch's default. Returns CK_OK, or
 * CK_E_NOMEM / CK_E_RANGE (bad prefix or alignment). */
ck_status ck_zipw_init(ck_zipw *w, const char *prefix, size_t prefix_len, uint64_t alignment,
                       ck_zipw_write_fn write, void *write_ctx, ck_error *err);

/* Appends record `name` (relative to the folder) holding data[0..size).
 * data may be NULL when size is 0. Names must be distinct. */
ck_status ck_zipw_add(ck_zipw *w, const char *name, const void *data, uint64_t size, ck_error *err);

/* Adds the `version` and `.data/serialization_id` records torch's writer
 * adds at the end, then the central directory and end records, and writes
 * out everything pending. The writer accepts no more records after. */
ck_status ck_zipw_finish(ck_zipw *w, ck_error *err);

/* Releases what w holds (not the sink). */
void ck_zipw_free(ck_zipw *w);

/* The context of ck_zipw_fd_sink. With writeback set, the sink asks the
 * kernel (sync_file_range) to start writing each 32 MiB to disk as soon as
 * it is written, so that a final fsync overlaps with the rest of the save
 * instead of following it. */
typedef struct ck_fd_sink {
    int fd;
    int writeback;
    uint64_t written; /* bytes written through this sink */
    uint64_t kicked;  /* bytes whose writeback was started */
} ck_fd_sink;

/* A sink for ck_zipw_init: ctx points to a ck_fd_sink. Retries short
 * writes and EINTR; EFBIG/ENOSPC/... fail with CK_E_IO. */
ck_status ck_zipw_fd_sink(void *ctx, const struct iovec *iov, int n, ck_error *err);

#endif

/* Copies of host memory, split over a few threads when the batch is large:
 * runs into one arena (a snapshot of a checkpoint's tensor bytes: the copy
 * is all a caller of ckptio.async_save waits for), or scattered runs from a
 * mapped checkpoint into the tensors that receive them (DCP items, the
 * direct load into a model from a file in the page cache). */
#ifndef CKPTIO_CORE_MEMCOPY_H
#define CKPTIO_CORE_MEMCOPY_H

#include <stddef.h>
#include <stdint.h>

#include "status.h"

/* One run: nbytes from src to arena + offset. */
typedef struct ck_memcopy_segment {
    const void *src;
    size_t nbytes;
    size_t offset;
} ck_memcopy_segment;

/* One scattered run: nbytes from src to dst. */
typedef struct ck_memcopy_run {
    const void *src;
    void *dst;
    size_t nbytes;
} ck_memcopy_run;

/* Batches smaller than this are copied by the calling thread alone. */
#define CK_MEMCOPY_PARALLEL_MIN ((size_t)64 << 20)

/* Copies every segment into arena (total bytes; CK_E_RANGE, nothing copied,
 * when a segment lies outside it). With threads > 1 and a batch of at least
 * CK_MEMCOPY_PARALLEL_MIN bytes, the bytes are split into `threads` equal
 * shares (a share may cut a segment), the caller copying one share and
 * worker threads the others; where a thread cannot be started its share is
 * copied by the caller. Does not touch Python. */
ck_status ck_memcopy_segments(void *arena, size_t total, const ck_memcopy_segment *segs, size_t n,
                              int threads, ck_error *err);

/* Copies every run (src and dst of each must not overlap; CK_E_RANGE,
 * nothing copied, when a run of nonzero length has no source or no
 * destination), split over threads as ck_memcopy_segments. Does not touch
 * Python. */
ck_status ck_memcopy_runs(const ck_memcopy_run *runs, size_t n, int threads, ck_error *err);

#endif

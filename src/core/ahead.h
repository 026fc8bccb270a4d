/* A read-ahead thread: while other threads read a file's byte ranges with
 * pread() (or through a mapping of it), it asks the kernel for those bytes in order (posix_fadvise
 * WILLNEED, which starts the reads and does not wait for them), skipping the
 * steps already in the page cache (mincore over a mapping nobody touches),
 * and stopping at once when a sample of pages says the file is warm.
 * On a cold cache this keeps many reads in flight where each pread() has a
 * window or two; measured on a virtual disk, the two-thread read of a
 * 1.25 GB checkpoint took 0.56 s instead of 0.88 s (medians of eight). On a
 * warm cache it costs a thread and CK_AHEAD_SAMPLES mincore calls. Does not touch Python. */
#ifndef CKPTIO_CORE_AHEAD_H
#define CKPTIO_CORE_AHEAD_H

#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include "preads.h"

/* Pages looked at first to tell a warm file (see ahead.c). */
#define CK_AHEAD_SAMPLES 64u

/* The bytes asked for at once: small enough that the first arrive soon. */
#define CK_AHEAD_STEP ((size_t)2 << 20)

typedef struct ck_ahead {
    int fd;
    uint8_t *map; /* ck_ahead_start_map's mapping, or NULL */
    const ck_piece *pieces;
    size_t n;
    uint64_t total; /* the pieces' bytes */
    atomic_int stop;
    int started;
    pthread_t thread;
    size_t asked;  /* steps asked for (read after ck_ahead_stop) */
    size_t cached; /* steps found in the page cache and skipped */
    int warm;      /* every sampled page was in the page cache: nothing asked */
} ck_ahead;

/* Starts the thread over pieces[0..n) (kept until ck_ahead_stop); returns 0,
 * or -1 (nothing to stop then) when the pieces hold fewer than
 * CK_PREADS_PARALLEL_MIN bytes (too little to be worth a thread) or no
 * thread could be started. */
int ck_ahead_start(ck_ahead *a, int fd, const ck_piece *pieces, size_t n);

/* The same for a caller's read-only shared mapping of the file (map, page
 * aligned; piece offsets count from it, their dst unused): the pages are
 * asked for with madvise(MADV_WILLNEED), for a consumer that reads the
 * mapping in file order (verify's CRCs, an export). The mapping must stay
 * until ck_ahead_stop. -1 as ck_ahead_start, or when map is not page aligned. */
int ck_ahead_start_map(ck_ahead *a, const uint8_t *map, const ck_piece *pieces, size_t n);

/* Tells the thread to stop after its current step and joins it. */
void ck_ahead_stop(ck_ahead *a);

#endif

/* Reading scattered byte ranges of a file into memory with large pread()s:
 * on two threads when there is much to read, with a third asking the kernel
 * for the bytes ahead of them (core/ahead.c). For the direct load into a
 * model's parameters and for reading a whole checkpoint into the heap
 * (mmap=False). Does not touch Python. */
#ifndef CKPTIO_CORE_PREADS_H
#define CKPTIO_CORE_PREADS_H

#include <stddef.h>
#include <stdint.h>

/* len bytes of the file at off, to be read into dst. */
typedef struct ck_piece {
    uint64_t off;
    uint8_t *dst;
    size_t len;
} ck_piece;

/* Below this many bytes in all, the pieces are read by the calling thread
 * alone: a second thread, or read-ahead, costs more than it gives. */
#define CK_PREADS_PARALLEL_MIN ((uint64_t)64 << 20)

/* Reads every piece. With threads >= 2 and at least CK_PREADS_PARALLEL_MIN
 * bytes, the pieces (in the order given, which should be file order) are cut
 * into two runs of about equal bytes, each read in order by one thread, while
 * a read-ahead thread asks the kernel for the pieces' bytes that are not yet
 * in the page cache (ck_ahead_start); where a thread cannot be started the
 * caller does its work. Returns 0, an errno, or -1 when the file ended
 * before a piece's last byte. */
int ck_pread_pieces(int fd, const ck_piece *pieces, size_t n, int threads);

#endif

/* A region: the bytes of one checkpoint in memory, either mapped from a
 * file (MAP_PRIVATE, readable and writable: writes are copy-on-write and
 * never reach the file) or read into one heap buffer.
 *
 * The region owns its memory; ck_region_release gives it back. Tensors
 * built on a region keep its owner alive in the binding, never here.
 */
#ifndef CKPTIO_CORE_REGION_H
#define CKPTIO_CORE_REGION_H

#include <stddef.h>
#include <stdint.h>

#include "status.h"

typedef enum ck_region_kind {
    CK_REGION_NONE = 0,
    CK_REGION_MMAP, /* munmap on release */
    CK_REGION_HEAP  /* free on release; base is 64-byte aligned */
} ck_region_kind;

typedef struct ck_region {
    uint8_t *data; /* NULL when len == 0 */
    size_t len;
    ck_region_kind kind;
    int has_fd; /* fd is open on the mapped file (until ck_region_close_fd) */
    int fd;
} ck_region;

/* Maps the whole file at path. An empty file gives a region with len 0 and
 * data NULL (no mapping is made). Fails with CK_E_IO naming the OS error.
 * The file stays open (has_fd, fd) so that the container's headers can be
 * read with pread rather than through the mapping; ck_region_close_fd
 * closes it once they have been read (ck_region_release does too). */
ck_status ck_region_map_file(const char *path, ck_region *out, ck_error *err);

/* Closes the region's file descriptor, if it has one. */
void ck_region_close_fd(ck_region *region);

/* Reads the whole file at path into one 64-byte aligned heap buffer, with
 * as few read() calls as the kernel allows. The file's size is taken from
 * fstat and a file that changes size while read is an error. */
ck_status ck_region_read_file(const char *path, ck_region *out, ck_error *err);

/* Allocates an uninitialised 64-byte aligned heap region of len bytes
 * (len 0 gives data NULL). */
ck_status ck_region_alloc(size_t len, ck_region *out, ck_error *err);

/* Releases the memory and resets the region to CK_REGION_NONE. Safe to call
 * on a zeroed or already released region. */
void ck_region_release(ck_region *region);

#endif

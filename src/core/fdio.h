/* Writing a whole buffer to a file descriptor, and reading a range of one. */
#ifndef CKPTIO_CORE_FDIO_H
#define CKPTIO_CORE_FDIO_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/* Writes all n bytes of buf to fd, retrying short writes and EINTR.
 * Returns 0, or -1 with errno set by the failing write(). */
int ck_write_all(int fd, const void *buf, size_t n);

/* Reads n bytes at offset off of fd into buf with pread, retrying short
 * reads and EINTR. Returns the bytes read (less than n only at the end of
 * the file), or -1 with errno set by the failing pread(). */
ssize_t ck_pread_all(int fd, void *buf, size_t n, uint64_t off);

#endif

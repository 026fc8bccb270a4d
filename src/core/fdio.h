/* Writing a whole buffer to a file descriptor. */
#ifndef CKPTIO_CORE_FDIO_H
#define CKPTIO_CORE_FDIO_H

#include <stddef.h>

/* Writes all n bytes of buf to fd, retrying short writes and EINTR.
 * Returns 0, or -1 with errno set by the failing write(). */
int ck_write_all(int fd, const void *buf, size_t n);

#endif

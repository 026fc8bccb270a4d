#include "region.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

/* Clears `out` (the region the file will fill), opens path for reading and
 * checks that it is a regular file that fits in memory: the descriptor (the
 * file's size in *len), or -1. */
static int open_regular(const char *path, ck_region *out, size_t *len, ck_error *err) {
    memset(out, 0, sizeof *out);
    struct stat st;
    int fd;
    do {
        fd = open(path, O_RDONLY | O_CLOEXEC);
    } while (fd < 0 && errno == EINTR);
    if (fd < 0) {
        ck_fail_errno(err, errno, "cannot open the file");
        return -1;
    }
    if (fstat(fd, &st) != 0) {
        ck_fail_errno(err, errno, "cannot stat the file");
        close(fd);
        return -1;
    }
    if (!S_ISREG(st.st_mode)) {
        ck_fail_errno(err, S_ISDIR(st.st_mode) ? EISDIR : EINVAL, "not a regular file");
        close(fd);
        return -1;
    }
    if ((uint64_t)st.st_size > (uint64_t)SIZE_MAX) {
        ck_fail(err, CK_E_LIMIT, "the file is too large for this address space");
        close(fd);
        return -1;
    }
    *len = (size_t)st.st_size;
    return fd;
}

ck_status ck_region_map_file(const char *path, ck_region *out, ck_error *err) {
    size_t len = 0;
    int fd = open_regular(path, out, &len, err);
    if (fd < 0)
        return err ? err->status : CK_E_IO;
    if (len == 0) {
        close(fd);
        return CK_OK;
    }
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
        int mmap_errno = errno;
        close(fd);
        return ck_fail_errno(err, mmap_errno, "cannot map the file");
    }
    out->data = p;
    out->len = len;
    out->kind = CK_REGION_MMAP;
    out->has_fd = 1;
    out->fd = fd;
    return CK_OK;
}

void ck_region_close_fd(ck_region *region) {
    if (region != NULL && region->has_fd) {
        close(region->fd);
        region->has_fd = 0;
        region->fd = -1;
    }
}

ck_status ck_region_alloc(size_t len, ck_region *out, ck_error *err) {
    memset(out, 0, sizeof *out);
    if (len == 0)
        return CK_OK;
    void *p = NULL;
    if (posix_memalign(&p, 64, len) != 0)
        return ck_fail(err, CK_E_NOMEM, "cannot allocate %zu bytes", len);
    out->data = p;
    out->len = len;
    out->kind = CK_REGION_HEAP;
    return CK_OK;
}

ck_status ck_region_read_file(const char *path, ck_region *out, ck_error *err) {
    size_t len = 0;
    int fd = open_regular(path, out, &len, err);
    if (fd < 0)
        return err ? err->status : CK_E_IO;
    ck_status rc = ck_region_alloc(len, out, err);
    if (rc != CK_OK) {
        close(fd);
        return rc;
    }
    size_t got = 0;
    while (got < len) {
        ssize_t n = read(fd, out->data + got, len - got);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            rc = ck_fail_errno(err, errno, "cannot read the file");
            break;
        }
        if (n == 0) {
            rc = ck_fail(err, CK_E_IO, "the file shrank while it was read (%zu of %zu bytes)", got,
                         len);
            break;
        }
        got += (size_t)n;
    }
    if (rc == CK_OK) {
        char extra;
        ssize_t n;
        do {
            n = read(fd, &extra, 1);
        } while (n < 0 && errno == EINTR);
        if (n > 0)
            rc = ck_fail(err, CK_E_IO, "the file grew while it was read");
    }
    close(fd);
    if (rc != CK_OK)
        ck_region_release(out);
    return rc;
}

void ck_region_release(ck_region *region) {
    if (region == NULL)
        return;
    ck_region_close_fd(region);
    if (region->kind == CK_REGION_MMAP && region->data != NULL)
        munmap(region->data, region->len);
    else if (region->kind == CK_REGION_HEAP)
        free(region->data);
    memset(region, 0, sizeof *region);
}

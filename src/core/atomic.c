#include "atomic.h"

#include <errno.h>
#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static void release(ck_atomic *a) {
    if (a->fd >= 0)
        close(a->fd);
    if (a->dir_fd >= 0)
        close(a->dir_fd);
    free(a->target);
    free(a->base);
    free(a->tmp_name);
    a->fd = a->dir_fd = -1;
    a->target = a->base = a->tmp_name = NULL;
    a->unnamed = 0;
}

void ck_atomic_abort(ck_atomic *a) {
    if (a->tmp_name != NULL && a->dir_fd >= 0)
        unlinkat(a->dir_fd, a->tmp_name, 0);
    release(a);
}

/* Splits target into its directory (opened as a->dir_fd) and a->base. */
static ck_status open_dir(ck_atomic *a, const char *target, ck_error *err) {
    const char *slash = strrchr(target, '/');
    const char *base = slash ? slash + 1 : target;
    if (*base == '\0')
        return ck_fail(err, CK_E_RANGE, "%s names a directory, not a file", target);
    a->base = strdup(base);
    a->target = strdup(target);
    char *dir = slash ? strndup(target, (size_t)(slash - target) + 1) : strdup(".");
    if (a->base == NULL || a->target == NULL || dir == NULL) {
        free(dir);
        return ck_fail(err, CK_E_NOMEM, "out of memory");
    }
    a->dir_fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    int e = errno;
    free(dir);
    if (a->dir_fd < 0)
        return ck_fail_errno(err, e, "cannot open the directory of %s", target);
    return CK_OK;
}

/* A fresh temporary name ".<base>.ckptio-XXXXXX" with the X's filled in
 * from a counter and the pid (for the link of an O_TMPFILE inode). */
static char *temp_name(const char *base, unsigned attempt) {
    static const char tail[] = ".ckptio-";
    size_t n = strlen(base) + sizeof tail + 32;
    char *s = malloc(n);
    if (s != NULL)
        snprintf(s, n, ".%s%s%ld-%u", base, tail, (long)getpid(), attempt);
    return s;
}

/* Removes ".<base>.ckptio-<pid>-<n>" files whose process is gone: a save
 * killed between naming its file and the rename leaves one behind. Files of
 * live processes (or of pids we may not signal) are left alone. Best effort:
 * errors are ignored. */
static void remove_stale(ck_atomic *a) {
    int fd = dup(a->dir_fd);
    if (fd < 0)
        return;
    DIR *d = fdopendir(fd);
    if (d == NULL) {
        close(fd);
        return;
    }
    size_t base_len = strlen(a->base);
    static const char tail[] = ".ckptio-";
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        const char *n = e->d_name;
        if (n[0] != '.' || strncmp(n + 1, a->base, base_len) != 0 ||
            strncmp(n + 1 + base_len, tail, sizeof tail - 1) != 0)
            continue;
        char *end;
        long pid = strtol(n + 1 + base_len + sizeof tail - 1, &end, 10);
        if (pid <= 0 || *end != '-' || pid == (long)getpid())
            continue;
        if (kill((pid_t)pid, 0) != 0 && errno == ESRCH)
            unlinkat(a->dir_fd, n, 0);
    }
    closedir(d);
}

ck_status ck_atomic_open(ck_atomic *a, const char *target, ck_error *err) {
    a->fd = a->dir_fd = -1;
    a->unnamed = 0;
    a->target = a->base = a->tmp_name = NULL;
    ck_status st = open_dir(a, target, err);
    if (st != CK_OK) {
        release(a);
        return st;
    }
    remove_stale(a);
    struct stat old;
    int have_old = fstatat(a->dir_fd, a->base, &old, 0) == 0 && S_ISREG(old.st_mode);
#ifdef O_TMPFILE
    a->fd = openat(a->dir_fd, ".", O_TMPFILE | O_WRONLY | O_CLOEXEC, 0666);
    if (a->fd >= 0)
        a->unnamed = 1;
#endif
    if (a->fd < 0) {
        /* mkstemp-like, relative to dir_fd: O_EXCL on names we make up. */
        for (unsigned attempt = 0; attempt < 100 && a->fd < 0; attempt++) {
            free(a->tmp_name);
            a->tmp_name = temp_name(a->base, attempt);
            if (a->tmp_name == NULL) {
                release(a);
                return ck_fail(err, CK_E_NOMEM, "out of memory");
            }
            a->fd = openat(a->dir_fd, a->tmp_name, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
            if (a->fd < 0 && errno != EEXIST) {
                int e = errno;
                free(a->tmp_name);
                a->tmp_name = NULL;
                release(a);
                return ck_fail_errno(err, e, "cannot create a temporary file beside %s", target);
            }
        }
        if (a->fd < 0) {
            free(a->tmp_name);
            a->tmp_name = NULL;
            release(a);
            return ck_fail(err, CK_E_IO, "cannot create a temporary file beside %s", target);
        }
    }
    if (have_old && fchmod(a->fd, old.st_mode & 07777) != 0) {
        int e = errno;
        ck_atomic_abort(a);
        return ck_fail_errno(err, e, "cannot set the permissions of the new %s", target);
    }
    return CK_OK;
}

/* Gives an O_TMPFILE inode the name a->tmp_name. */
static ck_status link_unnamed(ck_atomic *a, ck_error *err) {
    char proc[64];
    snprintf(proc, sizeof proc, "/proc/self/fd/%d", a->fd);
    for (unsigned attempt = 0; attempt < 100; attempt++) {
        free(a->tmp_name);
        a->tmp_name = temp_name(a->base, attempt);
        if (a->tmp_name == NULL)
            return ck_fail(err, CK_E_NOMEM, "out of memory");
        if (linkat(AT_FDCWD, proc, a->dir_fd, a->tmp_name, AT_SYMLINK_FOLLOW) == 0) {
            a->unnamed = 0;
            return CK_OK;
        }
        if (errno != EEXIST) {
            int e = errno;
            free(a->tmp_name);
            a->tmp_name = NULL;
            return ck_fail_errno(err, e, "cannot link the new file beside %s", a->target);
        }
    }
    free(a->tmp_name);
    a->tmp_name = NULL;
    return ck_fail(err, CK_E_IO, "cannot name the new file beside %s", a->target);
}

ck_status ck_atomic_commit(ck_atomic *a, int do_fsync, ck_error *err) {
    ck_status st = CK_OK;
    if (do_fsync && fsync(a->fd) != 0)
        st = ck_fail_errno(err, errno, "fsync failed");
    if (st == CK_OK && a->unnamed)
        st = link_unnamed(a, err);
    if (st == CK_OK) {
        int rc = close(a->fd);
        a->fd = -1;
        if (rc != 0)
            st = ck_fail_errno(err, errno, "close failed");
    }
    if (st == CK_OK && renameat(a->dir_fd, a->tmp_name, a->dir_fd, a->base) != 0)
        st = ck_fail_errno(err, errno, "cannot rename the new file over %s", a->target);
    if (st != CK_OK) {
        ck_atomic_abort(a);
        return st;
    }
    free(a->tmp_name);
    a->tmp_name = NULL;
    if (do_fsync && fsync(a->dir_fd) != 0)
        st = ck_fail_errno(err, errno, "fsync of the directory of %s failed", a->target);
    release(a);
    return st;
}

#include "atomic.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

/* The build defines _GNU_SOURCE once for every file (setup.py, Makefile);
 * without it glibc hides O_TMPFILE and the unnamed temporary would silently
 * be compiled out, as it once was. */
#if defined(__linux__) && !defined(O_TMPFILE)
#error "O_TMPFILE undeclared: build with -D_GNU_SOURCE (as setup.py and the Makefile do)"
#endif

#define TEMP_TAG ".ckptio-"
#define TEMP_TAG_LEN (sizeof TEMP_TAG - 1)
/* bytes of the target's name kept in a temporary's name, so that it stays
 * within NAME_MAX (255) with the tag, pid and counter */
#define TEMP_BASE_MAX 200

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
    a->unnamed = a->direct = 0;
}

void ck_atomic_abort(ck_atomic *a) {
    if (a->tmp_name != NULL && a->dir_fd >= 0)
        unlinkat(a->dir_fd, a->tmp_name, 0);
    release(a);
}

/* The directory part of path, up to and including its last '/' ("" when
 * there is none), malloc'ed. */
static char *dir_prefix(const char *path) {
    const char *slash = strrchr(path, '/');
    return strndup(path, slash ? (size_t)(slash - path) + 1 : 0);
}

/* Follows path's chain of symbolic links. On success *out is the final
 * path (malloc'ed) and *exists says whether something is there (then *st
 * is its lstat). Returns 0 or an errno value. */
static int resolve(const char *path, char **out, struct stat *st, int *exists) {
    char *cur = strdup(path);
    char *link = malloc(PATH_MAX);
    int rc = 0;
    if (cur == NULL || link == NULL) {
        rc = ENOMEM;
        goto done;
    }
    for (int hops = 0;; hops++) {
        if (lstat(cur, st) != 0) {
            if (errno != ENOENT) {
                rc = errno;
                goto done;
            }
            *exists = 0;
            break;
        }
        if (!S_ISLNK(st->st_mode)) {
            *exists = 1;
            break;
        }
        if (hops == CK_ATOMIC_MAX_LINKS) {
            rc = ELOOP;
            goto done;
        }
        ssize_t n = readlink(cur, link, PATH_MAX);
        if (n < 0 || n >= PATH_MAX) {
            rc = n < 0 ? errno : ENAMETOOLONG;
            goto done;
        }
        link[n] = 0;
        char *dir = link[0] == '/' ? strdup("") : dir_prefix(cur);
        char *next = dir ? malloc(strlen(dir) + (size_t)n + 1) : NULL;
        if (next != NULL) {
            strcpy(next, dir);
            strcat(next, link);
        }
        free(dir);
        if (next == NULL) {
            rc = ENOMEM;
            goto done;
        }
        free(cur);
        cur = next;
    }
done:
    free(link);
    if (rc != 0) {
        free(cur);
        cur = NULL;
    }
    *out = cur;
    return rc;
}

/* Opens path's directory as a->dir_fd and sets a->base. */
static ck_status open_dir(ck_atomic *a, const char *path, ck_error *err) {
    const char *slash = strrchr(path, '/');
    a->base = strdup(slash ? slash + 1 : path);
    char *dir = slash ? strndup(path, (size_t)(slash - path) + 1) : strdup(".");
    if (a->base == NULL || dir == NULL) {
        free(dir);
        return ck_fail(err, CK_E_NOMEM, "out of memory");
    }
    a->dir_fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    int e = errno;
    free(dir);
    if (a->dir_fd < 0)
        return ck_fail_errno(err, e, "cannot open the directory of %s", a->target);
    return CK_OK;
}

/* A fresh temporary name ".<base>.ckptio-<pid>-<attempt>", the base cut to
 * TEMP_BASE_MAX bytes. */
static char *temp_name(const char *base, unsigned attempt) {
    size_t keep = strlen(base) < TEMP_BASE_MAX ? strlen(base) : TEMP_BASE_MAX;
    size_t n = keep + TEMP_TAG_LEN + 48;
    char *s = malloc(n);
    if (s != NULL)
        snprintf(s, n, ".%.*s%s%ld-%u", (int)keep, base, TEMP_TAG, (long)getpid(), attempt);
    return s;
}

/* Parses ".<something>.ckptio-<pid>-<n>"; returns the pid, or 0 when name
 * is not such a name. */
static long temp_pid(const char *name) {
    if (name[0] != '.')
        return 0;
    const char *tag = NULL;
    for (const char *p = strstr(name + 1, TEMP_TAG); p != NULL; p = strstr(p + 1, TEMP_TAG))
        tag = p;
    if (tag == NULL || tag == name + 1)
        return 0;
    const char *p = tag + TEMP_TAG_LEN;
    long pid = 0;
    int digits = 0;
    for (; *p >= '0' && *p <= '9' && digits < 10; p++, digits++)
        pid = pid * 10 + (*p - '0');
    if (digits == 0 || *p++ != '-' || *p == 0)
        return 0;
    for (; *p != 0; p++)
        if (*p < '0' || *p > '9')
            return 0;
    return pid;
}

/* Whether the temporary `name` (a regular file of ours, whose pid is gone)
 * is not held by a running save: its lock is free, or locks are not
 * available there. */
static int lock_is_free(int dir_fd, const char *name, const struct stat *st) {
    int fd = openat(dir_fd, name, O_WRONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0 && errno == EACCES)
        fd = openat(dir_fd, name, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0)
        return errno == EACCES; /* cannot lock what we may not open: the pid decides */
    struct stat now;
    int free_ = fstat(fd, &now) == 0 && now.st_dev == st->st_dev && now.st_ino == st->st_ino;
    if (free_ && flock(fd, LOCK_EX | LOCK_NB) != 0)
        free_ = errno != EWOULDBLOCK && errno != EAGAIN && errno != EINTR;
    close(fd); /* the lock (if any) goes with it; the name is unlinked just after */
    return free_;
}

int ck_atomic_remove_stale(int dir_fd) {
    int fd = dup(dir_fd);
    if (fd < 0)
        return 0;
    DIR *d = fdopendir(fd);
    if (d == NULL) {
        close(fd);
        return 0;
    }
    rewinddir(d);
    int removed = 0;
    uid_t me = geteuid();
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        const char *n = e->d_name;
        long pid = temp_pid(n);
        if (pid <= 0)
            continue;
        struct stat st;
        if (fstatat(dir_fd, n, &st, AT_SYMLINK_NOFOLLOW) != 0 || !S_ISREG(st.st_mode) ||
            st.st_uid != me)
            continue;
        if (kill((pid_t)pid, 0) == 0 || errno != ESRCH)
            continue; /* alive (or not ours to signal): maybe a save in progress */
        if (lock_is_free(dir_fd, n, &st) && unlinkat(dir_fd, n, 0) == 0)
            removed++;
    }
    closedir(d);
    return removed;
}

/* The temporary for a regular (or new) target at path. */
static ck_status open_temp(ck_atomic *a, const char *path, int flags, ck_error *err) {
    ck_status st = open_dir(a, path, err);
    if (st != CK_OK)
        return st;
    ck_atomic_remove_stale(a->dir_fd);
    struct stat old;
    int have_old =
        fstatat(a->dir_fd, a->base, &old, AT_SYMLINK_NOFOLLOW) == 0 && S_ISREG(old.st_mode);
#ifdef O_TMPFILE
    /* naming the inode at commit goes through /proc/self/fd */
    if (!(flags & CK_ATOMIC_NAMED_TEMP) && access("/proc/self/fd", X_OK) == 0) {
        a->fd = openat(a->dir_fd, ".", O_TMPFILE | O_WRONLY | O_CLOEXEC, 0666);
        if (a->fd >= 0)
            a->unnamed = 1;
    }
#else
    (void)flags;
#endif
    /* mkstemp-like, relative to dir_fd: O_EXCL on names we make up */
    for (unsigned attempt = 0; attempt < 100 && a->fd < 0; attempt++) {
        free(a->tmp_name);
        a->tmp_name = temp_name(a->base, attempt);
        if (a->tmp_name == NULL)
            return ck_fail(err, CK_E_NOMEM, "out of memory");
        a->fd = openat(a->dir_fd, a->tmp_name, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
        if (a->fd < 0 && errno != EEXIST) {
            int e = errno;
            free(a->tmp_name);
            a->tmp_name = NULL;
            return ck_fail_errno(err, e, "cannot create a temporary file beside %s", a->target);
        }
    }
    if (a->fd < 0) {
        free(a->tmp_name);
        a->tmp_name = NULL;
        return ck_fail(err, CK_E_IO, "cannot create a temporary file beside %s", a->target);
    }
    /* held until this save ends: tells ck_atomic_remove_stale it is alive */
    flock(a->fd, LOCK_EX | LOCK_NB);
    if (have_old) {
        /* owner first (chown clears set-id bits), where we may; then the mode */
        if ((old.st_uid != geteuid() || old.st_gid != getegid()) &&
            fchown(a->fd, old.st_uid, old.st_gid) != 0 && old.st_gid != getegid())
            (void)!fchown(a->fd, (uid_t)-1, old.st_gid);
        if (fchmod(a->fd, old.st_mode & 07777) != 0)
            return ck_fail_errno(err, errno, "cannot set the permissions of the new %s", a->target);
    }
    return CK_OK;
}

/* Opens a FIFO or device for writing in place, through the links of the
 * target as given (the kernel's resolution, so that /dev/stdout or
 * /proc/self/fd/N reach what they name, as in torch). Returns CK_OK with
 * a->fd set, CK_OK with a->fd < 0 when it turned out to be a regular file
 * (replaced meanwhile), or a failure. */
static ck_status open_direct(ck_atomic *a, ck_error *err) {
    int fd = open(a->target, O_WRONLY | O_NOCTTY | O_CLOEXEC);
    if (fd < 0) {
        if (errno == EINTR)
            return ck_fail(err, CK_E_INTERRUPTED, "interrupted while opening %s", a->target);
        return ck_fail_errno(err, errno, "cannot open %s", a->target);
    }
    struct stat st;
    if (fstat(fd, &st) != 0) {
        int e = errno;
        close(fd);
        return ck_fail_errno(err, e, "cannot stat %s", a->target);
    }
    if (S_ISREG(st.st_mode)) {
        close(fd);
        return CK_OK;
    }
    a->fd = fd;
    a->direct = 1;
    return CK_OK;
}

ck_status ck_atomic_open(ck_atomic *a, const char *target, int flags, ck_error *err) {
    a->fd = a->dir_fd = -1;
    a->unnamed = a->direct = 0;
    a->base = a->tmp_name = NULL;
    a->target = strdup(target);
    if (a->target == NULL)
        return ck_fail(err, CK_E_NOMEM, "out of memory");
    const char *slash = strrchr(target, '/');
    if ((slash ? slash[1] : target[0]) == '\0') {
        release(a);
        return ck_fail(err, CK_E_RANGE, "%s names a directory, not a file", target);
    }
    ck_status st = CK_OK;
    for (int tries = 0; tries < 8; tries++) {
        /* the kernel's view first: what open() would reach through every
         * link (also /proc's magic ones, which readlink cannot follow) */
        struct stat s;
        int found = stat(target, &s) == 0;
        int stat_errno = errno;
        if (found && !S_ISREG(s.st_mode)) {
            if (S_ISDIR(s.st_mode))
                st = ck_fail_errno(err, EISDIR, "cannot save to %s", target);
            else if (S_ISSOCK(s.st_mode))
                st = ck_fail_errno(err, ENXIO, "cannot save to %s", target);
            else
                st = open_direct(a, err); /* FIFO, character or block device */
            if (st != CK_OK) {
                ck_atomic_abort(a);
                return st;
            }
            if (a->fd >= 0)
                return CK_OK;
            continue; /* became a regular file meanwhile */
        } else if (!found && stat_errno == ELOOP) {
            release(a);
            return ck_fail_errno(err, ELOOP, "cannot save to %s", target);
        }
        /* a regular file or nothing yet: the file at the end of the links is
         * replaced in its own directory */
        char *path;
        int exists = 0;
        int e = resolve(target, &path, &s, &exists);
        if (e != 0) {
            release(a);
            return e == ENOMEM ? ck_fail(err, CK_E_NOMEM, "out of memory")
                               : ck_fail_errno(err, e, "cannot save to %s", target);
        }
        if (exists && !S_ISREG(s.st_mode)) {
            free(path); /* changed since the stat above: look again */
            continue;
        }
        st = open_temp(a, path, flags, err);
        free(path);
        if (st != CK_OK) {
            ck_atomic_abort(a);
            return st;
        }
        return CK_OK;
    }
    release(a);
    return ck_fail(err, CK_E_IO, "cannot save to %s: it keeps changing", target);
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
    if (a->direct) {
        /* a FIFO or device: the bytes are already there */
        if (close(a->fd) != 0 && errno != EINTR)
            st = ck_fail_errno(err, errno, "close of %s failed", a->target);
        a->fd = -1;
        release(a);
        return st;
    }
    if (do_fsync && fsync(a->fd) != 0)
        st = ck_fail_errno(err, errno, "fsync failed");
    if (st == CK_OK && a->unnamed)
        st = link_unnamed(a, err);
    /* the lock lives on the open file description: a duplicate keeps it
     * until the name is gone, so that no cleaner (one in another PID
     * namespace sees our pid as dead) removes the temporary between the
     * close and the rename */
    int lock_fd = st == CK_OK ? fcntl(a->fd, F_DUPFD_CLOEXEC, 0) : -1;
    if (st == CK_OK) {
        int rc = close(a->fd); /* reports write errors (NFS) before the rename */
        a->fd = -1;
        if (rc != 0)
            st = ck_fail_errno(err, errno, "close failed");
    }
    if (st == CK_OK && renameat(a->dir_fd, a->tmp_name, a->dir_fd, a->base) != 0)
        st = ck_fail_errno(err, errno, "cannot rename the new file over %s", a->target);
    if (lock_fd >= 0)
        close(lock_fd);
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

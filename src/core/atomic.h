/* Atomic replacement of a file: the new content is written to a temporary
 * file in the target's directory (an unnamed O_TMPFILE inode where the file
 * system supports it, else a mkstemp name), then, on commit, flushed to disk,
 * renamed over the target, and the directory flushed. Until commit the old
 * target is untouched; ck_atomic_abort removes every trace of the new file.
 * A process killed mid-write leaves the old target intact (an O_TMPFILE
 * inode simply disappears). A process killed in the short window between
 * naming the file ".<target>.ckptio-<pid>-<n>" and the rename leaves that
 * file behind; the next save to the same target removes such files of
 * processes that no longer exist.
 */
#ifndef CKPTIO_CORE_ATOMIC_H
#define CKPTIO_CORE_ATOMIC_H

#include "status.h"

typedef struct ck_atomic {
    int fd;         /* the temporary file, open for writing; -1 when closed */
    int dir_fd;     /* the target's directory */
    int unnamed;    /* 1: O_TMPFILE inode, not yet linked */
    char *target;   /* the target's path as given */
    char *base;     /* the target's name inside its directory */
    char *tmp_name; /* the temporary name inside the directory, or NULL */
} ck_atomic;

/* Creates the temporary file for target. The new file gets the target's
 * permission bits if the target exists, else 0666 less the umask. */
ck_status ck_atomic_open(ck_atomic *a, const char *target, ck_error *err);

/* Makes the written content the target: fsync (when do_fsync), give the
 * file a name, rename it over the target, fsync the directory (when
 * do_fsync). On failure the temporary file is removed and the old target
 * left as it was. Closes everything either way. */
ck_status ck_atomic_commit(ck_atomic *a, int do_fsync, ck_error *err);

/* Removes the temporary file and closes everything. Safe to call after a
 * failed commit or twice. */
void ck_atomic_abort(ck_atomic *a);

#endif

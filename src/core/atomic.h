/* Writing a checkpoint to a path: atomic replacement of a regular file, or
 * a plain write into a FIFO or device, as torch.save does.
 *
 * The target is resolved first: a chain of symbolic links is followed (at
 * most CK_ATOMIC_MAX_LINKS; a longer chain or a loop fails with ELOOP, as
 * torch's open() does), and the link itself is kept.
 *
 * - A regular file, or a name that does not exist yet: the new content is
 *   written to a temporary file in the final target's directory, an unnamed
 *   O_TMPFILE inode where the file system supports it, else a file named
 *   ".<target>.ckptio-<pid>-<n>" made with O_EXCL. On commit it is flushed
 *   to disk, given that name if it had none, renamed over the target and
 *   the directory flushed. Until commit the old target is untouched;
 *   ck_atomic_abort removes every trace of the new file. A process killed
 *   mid-write leaves the old target intact: an O_TMPFILE inode simply
 *   disappears, and a named temporary (the fallback, or the short window
 *   between naming an O_TMPFILE inode and the rename) is removed by the
 *   next save of any file in that directory.
 * - A FIFO or a character or block device (as open() reaches it, through
 *   /proc's magic links too: /dev/stdout): opened for writing and written
 *   in place, as torch.save writes into it (a rename would replace the
 *   device node, /dev/null for one, with a regular file). Nothing can be
 *   undone there; no fsync.
 * - A directory fails with EISDIR, a socket with ENXIO (as torch's open()).
 *
 * Stale temporaries: each temporary is flock()ed by the save that made it
 * for as long as that save runs. Before making its own, a save removes
 * every ".<name>.ckptio-<pid>-<n>" entry of the directory that is a regular
 * file owned by the caller's effective uid, whose pid is not a live
 * process, and whose lock it can take; anything else (a live or
 * concurrent save's temporary, another user's file, a link) is left alone.
 */
#ifndef CKPTIO_CORE_ATOMIC_H
#define CKPTIO_CORE_ATOMIC_H

#include "status.h"

/* Links followed before giving up with ELOOP (Linux's MAXSYMLINKS). */
#define CK_ATOMIC_MAX_LINKS 40

/* ck_atomic_open flags */
enum {
    CK_ATOMIC_NAMED_TEMP = 1, /* never O_TMPFILE: always a named temporary (tests) */
};

typedef struct ck_atomic {
    int fd;         /* the file written to, open for writing; -1 when closed */
    int dir_fd;     /* the final target's directory; -1 for a direct target */
    int unnamed;    /* 1: O_TMPFILE inode, not yet linked */
    int direct;     /* 1: a FIFO or device, written in place (no temporary) */
    char *target;   /* the target's path as given */
    char *base;     /* the final target's name inside its directory */
    char *tmp_name; /* the temporary name inside the directory, or NULL */
} ck_atomic;

/* Resolves target and opens what the content is written to (see above).
 * The new file gets the target's permission bits if the target exists
 * (and, where the process may change them, its owner and group), else
 * 0666 less the umask. Opening a FIFO blocks until a reader opens it; a
 * signal then makes this fail with CK_E_INTERRUPTED (call again once the
 * caller's signal handling let it). */
ck_status ck_atomic_open(ck_atomic *a, const char *target, int flags, ck_error *err);

/* Makes the written content the target: fsync (when do_fsync), give the
 * file a name, rename it over the target, fsync the directory (when
 * do_fsync); for a direct target, only closes it. On failure the temporary
 * file is removed and the old target left as it was. Closes everything
 * either way. */
ck_status ck_atomic_commit(ck_atomic *a, int do_fsync, ck_error *err);

/* Removes the temporary file and closes everything. Safe to call after a
 * failed commit or twice. */
void ck_atomic_abort(ck_atomic *a);

/* Removes the stale temporaries of dir_fd as described above; returns how
 * many it removed. ck_atomic_open calls it; best effort, errors ignored. */
int ck_atomic_remove_stale(int dir_fd);

#endif

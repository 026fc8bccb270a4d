/* Tests of the core's file writers: atomic.c (temporaries, O_TMPFILE and
 * its fallback, stale temporaries, targets that are links, FIFOs, devices,
 * directories) and hashsink.c's writeback.
 *
 * Same conventions as test_core.c: CHECK counts, exit 1 on any failure.
 * Everything happens in a fresh directory under $TMPDIR (or /tmp).
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include "core/atomic.h"
#include "core/hashsink.h"
#include "core/status.h"

#include "check.h"

static char dir[4096];

static const char *at(const char *name) {
    static char buf[2][8192];
    static int k;
    k ^= 1;
    snprintf(buf[k], sizeof buf[k], "%s/%s", dir, name);
    return buf[k];
}

/* Number of entries of the test directory whose name contains part. */
static int entries(const char *part) {
    DIR *d = opendir(dir);
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL)
        if (strcmp(e->d_name, ".") != 0 && strcmp(e->d_name, "..") != 0 &&
            strstr(e->d_name, part) != NULL)
            n++;
    closedir(d);
    return n;
}

static void put_file(const char *path, const char *text) {
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0 || write(fd, text, strlen(text)) != (ssize_t)strlen(text))
        perror(path);
    close(fd);
}

/* The file's content, or "" (static buffer). */
static const char *content(const char *path) {
    static char buf[256];
    buf[0] = 0;
    int fd = open(path, O_RDONLY);
    if (fd < 0)
        return buf;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    buf[n > 0 ? n : 0] = 0;
    close(fd);
    return buf;
}

static int write_text(ck_atomic *a, const char *text) {
    return write(a->fd, text, strlen(text)) == (ssize_t)strlen(text);
}

/* A pid that no process has: a child that has exited and been reaped. */
static pid_t dead_pid(void) {
    pid_t pid = fork();
    if (pid == 0)
        _exit(0);
    waitpid(pid, NULL, 0);
    return pid;
}

/* Whether this file system makes O_TMPFILE inodes. */
static int has_o_tmpfile(void) {
    int fd = open(dir, O_TMPFILE | O_WRONLY, 0600);
    if (fd < 0)
        return 0;
    close(fd);
    return 1;
}

static void test_unnamed_temporary(void) {
    ck_error err;
    ck_atomic a;
    const char *target = at("model.pth");
    put_file(target, "old");
    int tmpfile = has_o_tmpfile();
    CHECK(tmpfile); /* every Linux file system CI runs on has it (ext4, tmpfs, xfs, btrfs) */
    CHECK(ck_atomic_open(&a, target, 0, &err) == CK_OK);
    CHECK(a.unnamed == tmpfile && a.direct == 0);
    CHECK(a.fd >= 0 && write_text(&a, "new"));
    /* mid-save: nothing but the old target in the directory */
    CHECK(entries("") == 1 && strcmp(content(target), "old") == 0);
    CHECK(ck_atomic_commit(&a, 1, &err) == CK_OK);
    CHECK(strcmp(content(target), "new") == 0);
    CHECK(entries("") == 1 && entries(".ckptio-") == 0);

    /* abort leaves the old file and nothing else */
    CHECK(ck_atomic_open(&a, target, 0, &err) == CK_OK);
    CHECK(write_text(&a, "torn"));
    ck_atomic_abort(&a);
    ck_atomic_abort(&a); /* twice is allowed */
    CHECK(strcmp(content(target), "new") == 0 && entries("") == 1);
    unlink(target);
}

static void test_named_temporary(void) {
    ck_error err;
    ck_atomic a;
    const char *target = at("named.pth");
    CHECK(ck_atomic_open(&a, target, CK_ATOMIC_NAMED_TEMP, &err) == CK_OK);
    CHECK(a.unnamed == 0 && a.tmp_name != NULL);
    char want[64];
    snprintf(want, sizeof want, ".named.pth.ckptio-%ld-", (long)getpid());
    CHECK(a.tmp_name != NULL && strncmp(a.tmp_name, want, strlen(want)) == 0);
    CHECK(entries(".ckptio-") == 1 && entries("") == 1);
    /* held by this save: another save's cleanup leaves it alone */
    int dfd = open(dir, O_RDONLY | O_DIRECTORY);
    CHECK(ck_atomic_remove_stale(dfd) == 0 && entries(".ckptio-") == 1);
    CHECK(write_text(&a, "named"));
    CHECK(ck_atomic_commit(&a, 0, &err) == CK_OK);
    CHECK(strcmp(content(target), "named") == 0 && entries(".ckptio-") == 0);

    CHECK(ck_atomic_open(&a, target, CK_ATOMIC_NAMED_TEMP, &err) == CK_OK);
    ck_atomic_abort(&a);
    CHECK(entries(".ckptio-") == 0 && strcmp(content(target), "named") == 0);
    unlink(target);
    close(dfd);
}

static void test_long_name(void) {
    /* a temporary's name must fit NAME_MAX even for a 250-byte target name */
    char name[251];
    memset(name, 'n', 250);
    name[250] = 0;
    memcpy(name + 246, ".pth", 4);
    for (int flags = 0; flags <= CK_ATOMIC_NAMED_TEMP; flags += CK_ATOMIC_NAMED_TEMP) {
        ck_error err;
        ck_atomic a;
        CHECK(ck_atomic_open(&a, at(name), flags, &err) == CK_OK);
        CHECK(write_text(&a, "long"));
        CHECK(ck_atomic_commit(&a, 0, &err) == CK_OK);
        CHECK(strcmp(content(at(name)), "long") == 0);
        CHECK(entries("") == 1);
        unlink(at(name));
    }
}

static void test_stale_temporaries(void) {
    int dfd = open(dir, O_RDONLY | O_DIRECTORY);
    char dead[64], alive[64], locked[64], link_[64], sub[64], mine[64];
    pid_t gone = dead_pid();
    /* left by a killed save of another file of this directory */
    snprintf(dead, sizeof dead, ".other.pth.ckptio-%ld-0", (long)gone);
    put_file(at(dead), "stale");
    /* a live process's (the parent of this test is alive) */
    snprintf(alive, sizeof alive, ".a.pth.ckptio-%ld-3", (long)getppid());
    put_file(at(alive), "live");
    /* a dead pid, but a save holds its lock (another pid namespace) */
    snprintf(locked, sizeof locked, ".b.pth.ckptio-%ld-1", (long)gone);
    put_file(at(locked), "held");
    int held = open(at(locked), O_WRONLY);
    CHECK(flock(held, LOCK_EX | LOCK_NB) == 0);
    /* the same pattern on a link and a directory: not ours to remove */
    snprintf(link_, sizeof link_, ".c.pth.ckptio-%ld-0", (long)gone);
    CHECK(symlink("/nonexistent", at(link_)) == 0);
    snprintf(sub, sizeof sub, ".d.pth.ckptio-%ld-0", (long)gone);
    CHECK(mkdir(at(sub), 0755) == 0);
    /* this process's own pid: a save on another thread */
    snprintf(mine, sizeof mine, ".e.pth.ckptio-%ld-0", (long)getpid());
    put_file(at(mine), "mine");
    /* names that only look alike */
    char lookalike[4][64];
    snprintf(lookalike[0], 64, "x.pth.ckptio-%ld-0", (long)gone);   /* no leading dot */
    snprintf(lookalike[1], 64, ".x.pth.ckptio-%ld-", (long)gone);   /* no counter */
    snprintf(lookalike[2], 64, ".ckptio-%ld-0", (long)gone);        /* no name */
    snprintf(lookalike[3], 64, ".x.pth.ckptio-%ld-0~", (long)gone); /* a suffix */
    for (int i = 0; i < 4; i++)
        put_file(at(lookalike[i]), "other");
    int other_uid = geteuid() == 0;
    char foreign[64];
    snprintf(foreign, sizeof foreign, ".f.pth.ckptio-%ld-0", (long)gone);
    if (other_uid) {
        /* root: a temporary of another user is theirs */
        put_file(at(foreign), "theirs");
        CHECK(chown(at(foreign), 12345, 12345) == 0);
    }
    int before = entries("");

    /* a save of yet another file clears only the stale one */
    ck_error err;
    ck_atomic a;
    CHECK(ck_atomic_open(&a, at("third.pth"), 0, &err) == CK_OK);
    CHECK(access(at(dead), F_OK) != 0);
    CHECK(entries("") == before - 1 + (a.unnamed ? 0 : 1));
    CHECK(access(at(alive), F_OK) == 0 && access(at(locked), F_OK) == 0);
    CHECK(access(at(mine), F_OK) == 0 && access(at(sub), F_OK) == 0);
    struct stat st;
    CHECK(lstat(at(link_), &st) == 0 && S_ISLNK(st.st_mode));
    for (int i = 0; i < 4; i++)
        CHECK(access(at(lookalike[i]), F_OK) == 0);
    if (other_uid)
        CHECK(access(at(foreign), F_OK) == 0);
    ck_atomic_abort(&a);

    /* the lock released (its save ended): removed by the next one */
    close(held);
    CHECK(ck_atomic_remove_stale(dfd) == 1 && access(at(locked), F_OK) != 0);
    CHECK(ck_atomic_remove_stale(dfd) == 0);

    unlink(at(alive));
    unlink(at(mine));
    unlink(at(link_));
    rmdir(at(sub));
    for (int i = 0; i < 4; i++)
        unlink(at(lookalike[i]));
    if (other_uid)
        unlink(at(foreign));
    close(dfd);
    CHECK(entries("") == 0);
}

static void test_symbolic_links(void) {
    ck_error err;
    ck_atomic a;
    CHECK(mkdir(at("real"), 0755) == 0);
    put_file(at("real/epoch_3.pth"), "old");
    /* latest.pth -> mid.pth -> real/epoch_3.pth (relative links) */
    CHECK(symlink("real/epoch_3.pth", at("mid.pth")) == 0);
    CHECK(symlink("mid.pth", at("latest.pth")) == 0);
    CHECK(ck_atomic_open(&a, at("latest.pth"), 0, &err) == CK_OK);
    CHECK(write_text(&a, "new"));
    CHECK(ck_atomic_commit(&a, 1, &err) == CK_OK);
    struct stat st;
    CHECK(lstat(at("latest.pth"), &st) == 0 && S_ISLNK(st.st_mode));
    CHECK(lstat(at("mid.pth"), &st) == 0 && S_ISLNK(st.st_mode));
    CHECK(strcmp(content(at("real/epoch_3.pth")), "new") == 0);

    /* a dangling link: the file is made where it points, as torch does */
    CHECK(symlink("real/fresh.pth", at("dangling.pth")) == 0);
    CHECK(ck_atomic_open(&a, at("dangling.pth"), 0, &err) == CK_OK);
    CHECK(write_text(&a, "fresh") && ck_atomic_commit(&a, 0, &err) == CK_OK);
    CHECK(strcmp(content(at("real/fresh.pth")), "fresh") == 0);
    CHECK(lstat(at("dangling.pth"), &st) == 0 && S_ISLNK(st.st_mode));

    /* a loop fails with ELOOP and leaves the links alone */
    CHECK(symlink("loop2", at("loop1")) == 0);
    CHECK(symlink("loop1", at("loop2")) == 0);
    CHECK(ck_atomic_open(&a, at("loop1"), 0, &err) == CK_E_IO && err.os_errno == ELOOP);
    CHECK(lstat(at("loop1"), &st) == 0 && S_ISLNK(st.st_mode));
    /* a chain longer than the kernel's limit too */
    char name[32], next[32];
    for (int i = 0; i < CK_ATOMIC_MAX_LINKS + 1; i++) {
        snprintf(name, sizeof name, "chain%d", i);
        snprintf(next, sizeof next, "chain%d", i + 1);
        CHECK(symlink(next, at(name)) == 0);
    }
    CHECK(ck_atomic_open(&a, at("chain0"), 0, &err) == CK_E_IO && err.os_errno == ELOOP);
    CHECK(ck_atomic_open(&a, at("chain1"), 0, &err) == CK_OK);
    ck_atomic_abort(&a);
    CHECK(access(at("chain41"), F_OK) != 0);
    for (int i = 0; i < CK_ATOMIC_MAX_LINKS + 1; i++) {
        snprintf(name, sizeof name, "chain%d", i);
        unlink(at(name));
    }
    unlink(at("loop1"));
    unlink(at("loop2"));
    unlink(at("latest.pth"));
    unlink(at("mid.pth"));
    unlink(at("dangling.pth"));
    unlink(at("real/epoch_3.pth"));
    unlink(at("real/fresh.pth"));
    rmdir(at("real"));
}

static void test_non_regular_targets(void) {
    ck_error err;
    ck_atomic a;
    struct stat before, after;
    /* a FIFO is written into (its reader is opened first, so the open does
     * not wait) and stays a FIFO */
    CHECK(mkfifo(at("pipe"), 0644) == 0);
    int reader = open(at("pipe"), O_RDONLY | O_NONBLOCK);
    CHECK(reader >= 0);
    CHECK(ck_atomic_open(&a, at("pipe"), 0, &err) == CK_OK);
    CHECK(a.direct == 1 && a.tmp_name == NULL && a.unnamed == 0);
    CHECK(write_text(&a, "through"));
    CHECK(entries("") == 1);
    CHECK(ck_atomic_commit(&a, 1, &err) == CK_OK);
    char buf[16] = {0};
    CHECK(read(reader, buf, sizeof buf - 1) == 7 && strcmp(buf, "through") == 0);
    close(reader);
    CHECK(lstat(at("pipe"), &after) == 0 && S_ISFIFO(after.st_mode));
    /* a link to the FIFO writes into the FIFO */
    CHECK(symlink("pipe", at("to-pipe")) == 0);
    reader = open(at("pipe"), O_RDONLY | O_NONBLOCK);
    CHECK(ck_atomic_open(&a, at("to-pipe"), 0, &err) == CK_OK && a.direct == 1);
    ck_atomic_abort(&a);
    close(reader);
    unlink(at("to-pipe"));
    unlink(at("pipe"));

    /* /proc's magic links (/dev/fd/N, /dev/stdout) reach what they name, as
     * open() does: here the write end of a pipe */
    int fds[2];
    CHECK(pipe(fds) == 0);
    char magic[64];
    snprintf(magic, sizeof magic, "/dev/fd/%d", fds[1]);
    CHECK(ck_atomic_open(&a, magic, 0, &err) == CK_OK && a.direct == 1);
    CHECK(write_text(&a, "piped") && ck_atomic_commit(&a, 1, &err) == CK_OK);
    close(fds[1]);
    memset(buf, 0, sizeof buf);
    CHECK(read(fds[0], buf, sizeof buf - 1) == 5 && strcmp(buf, "piped") == 0);
    close(fds[0]);

    /* /dev/null is written into, never replaced (as root a rename could) */
    CHECK(stat("/dev/null", &before) == 0 && S_ISCHR(before.st_mode));
    CHECK(ck_atomic_open(&a, "/dev/null", 0, &err) == CK_OK);
    CHECK(a.direct == 1);
    if (a.direct) {
        CHECK(write_text(&a, "gone"));
        CHECK(ck_atomic_commit(&a, 1, &err) == CK_OK);
    } else {
        ck_atomic_abort(&a); /* never rename over /dev/null, even when broken */
    }
    CHECK(stat("/dev/null", &after) == 0 && S_ISCHR(after.st_mode) &&
          after.st_ino == before.st_ino && after.st_rdev == before.st_rdev);

    /* a directory: EISDIR; a socket: ENXIO (as open() says to torch) */
    CHECK(mkdir(at("adir"), 0755) == 0);
    CHECK(ck_atomic_open(&a, at("adir"), 0, &err) == CK_E_IO && err.os_errno == EISDIR);
    CHECK(ck_atomic_open(&a, at("adir/"), 0, &err) == CK_E_RANGE);
    rmdir(at("adir"));
    int s = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    snprintf(addr.sun_path, sizeof addr.sun_path, "%s", at("sock"));
    if (strlen(at("sock")) < sizeof addr.sun_path &&
        bind(s, (struct sockaddr *)&addr, sizeof addr) == 0) {
        CHECK(ck_atomic_open(&a, at("sock"), 0, &err) == CK_E_IO && err.os_errno == ENXIO);
        unlink(at("sock"));
    }
    close(s);
    /* a missing directory */
    CHECK(ck_atomic_open(&a, at("nope/x.pth"), 0, &err) == CK_E_IO && err.os_errno == ENOENT);
    CHECK(entries("") == 0);
}

static void test_permissions(void) {
    ck_error err;
    ck_atomic a;
    put_file(at("p.pth"), "old");
    chmod(at("p.pth"), 0640);
    for (int flags = 0; flags <= CK_ATOMIC_NAMED_TEMP; flags += CK_ATOMIC_NAMED_TEMP) {
        CHECK(ck_atomic_open(&a, at("p.pth"), flags, &err) == CK_OK);
        CHECK(ck_atomic_commit(&a, 0, &err) == CK_OK);
        struct stat st;
        CHECK(stat(at("p.pth"), &st) == 0 && (st.st_mode & 07777) == 0640);
    }
    if (geteuid() == 0) {
        /* root replacing another user's file keeps its owner, as an in-place
         * write (torch's) would */
        CHECK(chown(at("p.pth"), 12345, 12346) == 0);
        CHECK(ck_atomic_open(&a, at("p.pth"), 0, &err) == CK_OK);
        CHECK(ck_atomic_commit(&a, 0, &err) == CK_OK);
        struct stat st;
        CHECK(stat(at("p.pth"), &st) == 0 && st.st_uid == 12345 && st.st_gid == 12346);
        CHECK((st.st_mode & 07777) == 0640);
    }
    unlink(at("p.pth"));
}

static void test_hashsink_writeback(void) {
    /* writeback (sync_file_range) starts every 32 MiB: 40 MiB start it once */
    const char *path = at("sink.bin");
    int fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_TRUNC, 0600);
    ck_error err;
    ck_hashsink *sink = NULL;
    CHECK(ck_hashsink_open(fd, path, 1, 1, &sink, &err) == CK_OK);
    static unsigned char block[1 << 20];
    memset(block, 0x5a, sizeof block);
    for (int i = 0; i < 40 && sink != NULL; i++)
        CHECK(ck_hashsink_put(sink, block, sizeof block, &err) == CK_OK);
    char hex[65];
    CHECK(sink != NULL && ck_hashsink_hex(sink, hex, &err) == CK_OK && strlen(hex) == 64);
    CHECK(sink != NULL && ck_hashsink_writebacks(sink) == 1);
    ck_hashsink_close(sink);
    /* and none without writeback */
    sink = NULL;
    CHECK(ck_hashsink_open(fd, path, 0, 0, &sink, &err) == CK_OK);
    for (int i = 0; i < 40 && sink != NULL; i++)
        CHECK(ck_hashsink_put(sink, block, sizeof block, &err) == CK_OK);
    CHECK(sink != NULL && ck_hashsink_flush(sink, &err) == CK_OK);
    CHECK(sink != NULL && ck_hashsink_writebacks(sink) == 0);
    ck_hashsink_close(sink);
    struct stat st;
    CHECK(fstat(fd, &st) == 0 && st.st_size == 80 << 20);
    close(fd);
    unlink(path);
}

int main(void) {
    const char *tmp = getenv("TMPDIR");
    snprintf(dir, sizeof dir, "%s/ckptio-atomic-XXXXXX", tmp && *tmp ? tmp : "/tmp");
    if (mkdtemp(dir) == NULL) {
        perror("mkdtemp");
        return 2;
    }
    test_unnamed_temporary();
    test_named_temporary();
    test_long_name();
    test_stale_temporaries();
    test_symbolic_links();
    test_non_regular_targets();
    test_permissions();
    test_hashsink_writeback();
    if (rmdir(dir) != 0)
        fprintf(stderr, "test_atomic: %s not empty\n", dir);
    return check_report("test_atomic");
}

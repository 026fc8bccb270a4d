#include "http.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "curlshim.h"
#include "hashsink.h"
#include "fdio.h"

#define BUFFER_SIZE (1024L * 1024L)     /* CURLOPT_BUFFERSIZE: fewer, larger reads */
#define PROGRESS_INTERVAL_NS 50000000LL /* 50 ms between progress calls */
#define MAX_BACKOFF_S 30.0
#define MAX_RETRY_AFTER_S 60.0
#define SNIFF_LEN 64
#define VALIDATOR_MAX 256
#define META_MAX 8192

/* How one attempt ended. */
typedef enum outcome {
    OUT_DONE,      /* body complete */
    OUT_RETRY,     /* transient: try again after a pause */
    OUT_RESTART,   /* the partial was discarded: try again from zero at once */
    OUT_FINAL,     /* permanent failure: err is set */
    OUT_INTERRUPT, /* the progress callback asked to stop */
    OUT_COMPLETE,  /* the partial already held the whole file (416 for its end) */
} outcome;

typedef struct download {
    const char *url;
    const ck_http_opts *opts;
    CURL *curl;
    int fd;
    char *part_path;
    char *meta_path;
    ck_hashsink *sink; /* appends to fd and hashes, on two threads */
    uint64_t have;     /* bytes of the file held, in the partial or in the sink */
    uint64_t total;    /* expected size of the file, 0 unknown */
    uint64_t resumed_from;
    int attempts;  /* requests made, over every pass */
    int spliced;   /* bytes of an earlier response were kept (a 206 or a complete partial) */
    int no_resume; /* a spliced result failed its hash: no more resumes by date */
    /* validators of the file being assembled in the partial */
    char etag[VALIDATOR_MAX];
    char last_modified[VALIDATOR_MAX];
    /* the current response */
    uint64_t range_from; /* first byte asked for (0: whole file) */
    int started;         /* response_start ran */
    long status;
    char r_etag[VALIDATOR_MAX];
    char r_last_modified[VALIDATOR_MAX];
    char r_content_range[VALIDATOR_MAX];
    double r_retry_after; /* seconds, < 0 when absent */
    unsigned char sniff[SNIFF_LEN];
    size_t sniff_len;
    int sniff_done;
    /* why a callback stopped the transfer */
    outcome cb_outcome;
    int cb_failed;
    ck_error *err;
    struct timespec last_progress;
    char curl_msg[CURL_ERROR_SIZE];
} download;

/* ---- libcurl setup ------------------------------------------------------ */

static pthread_once_t global_once = PTHREAD_ONCE_INIT;
static CURLcode global_rc = CURLE_FAILED_INIT;

static void global_init_once(void) {
    global_rc = curl_global_init(CURL_GLOBAL_DEFAULT);
}

ck_status ck_http_global_init(ck_error *err) {
    pthread_once(&global_once, global_init_once);
    if (global_rc != CURLE_OK)
        return ck_fail(err, CK_E_UNSUPPORTED, "libcurl failed to initialise: %s",
                       curl_easy_strerror(global_rc));
    return CK_OK;
}

void ck_http_opts_init(ck_http_opts *opts) {
    memset(opts, 0, sizeof *opts);
    opts->retries = 4;
    opts->backoff_s = 1.0;
    opts->connect_timeout_s = 30.0;
    opts->low_speed_limit = 1024;
    opts->low_speed_time_s = 30;
    opts->keep_partial = 1;
    opts->fsync = 1;
    opts->sha256 = 1;
    opts->lock_timeout_s = 300.0;
}

/* ---- small helpers ------------------------------------------------------ */

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static char *concat(const char *a, const char *b) {
    size_t la = strlen(a), lb = strlen(b);
    char *s = malloc(la + lb + 1);
    if (s != NULL) {
        memcpy(s, a, la);
        memcpy(s + la, b, lb + 1);
    }
    return s;
}

/* The directory part of path ("." when it has none), malloc'ed. */
static char *dir_of(const char *path) {
    const char *slash = strrchr(path, '/');
    if (slash == NULL)
        return concat(".", "");
    size_t n = slash == path ? 1 : (size_t)(slash - path);
    char *d = malloc(n + 1);
    if (d != NULL) {
        memcpy(d, path, n);
        d[n] = 0;
    }
    return d;
}

/* Copies a header value (after "Name:"), trimmed, into out; values that do
 * not fit or hold control characters are dropped (out = ""). */
static void header_value(const char *v, size_t n, char *out, size_t cap) {
    while (n > 0 && (*v == ' ' || *v == '\t')) {
        v++;
        n--;
    }
    while (n > 0 && isspace((unsigned char)v[n - 1]))
        n--;
    out[0] = 0;
    if (n >= cap)
        return;
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)v[i] < 0x20 || v[i] == 0x7f)
            return;
    memcpy(out, v, n);
    out[n] = 0;
}

static int has_prefix_ci(const char *s, size_t n, const char *prefix) {
    size_t k = strlen(prefix);
    return n >= k && strncasecmp(s, prefix, k) == 0;
}

/* Whether the file in the partial has a strong ETag (not W/"..."). */
static int strong_etag(const download *d) {
    return d->etag[0] != 0 && strncmp(d->etag, "W/", 2) != 0;
}

/* The validator a resume may rely on, or NULL (no resume: the file is taken
 * from its first byte). A strong ETag names one exact representation. A weak
 * one never does, and a Last-Modified date alone does not either (a file
 * rewritten within the same second, or by a server that keeps the date,
 * would be spliced from two versions); the date is used only when a hash
 * prefix checks the whole result, and a mismatch after a resume then takes
 * the file again from zero (ck_http_download). */
static const char *resume_validator(const download *d) {
    if (strong_etag(d))
        return d->etag;
    if (d->last_modified[0] != 0 && d->opts->hash_prefix != NULL && !d->no_resume)
        return d->last_modified;
    return NULL;
}

/* Whether st is a file this user made for itself: regular, ours, private
 * (no group or other bits) and with one name (not a hard link planted to
 * one of our files elsewhere). A partial or meta file failing this is never
 * adopted, written or truncated: it is removed and made afresh. */
static int is_private_file(const struct stat *st) {
    return S_ISREG(st->st_mode) && st->st_uid == geteuid() && (st->st_mode & 077) == 0 &&
           st->st_nlink == 1;
}

/* ---- the hash ----------------------------------------------------------- */

/* Hashes the first n bytes of the partial (a resumed prefix). */
static ck_status hash_prefix_of_file(download *d, uint64_t n, ck_error *err) {
    size_t cap = 4u << 20;
    unsigned char *buf = malloc(cap);
    if (buf == NULL)
        return ck_fail(err, CK_E_NOMEM, "no memory to hash %s", d->part_path);
    uint64_t off = 0;
    while (off < n) {
        size_t want = n - off < cap ? (size_t)(n - off) : cap;
        ssize_t r = pread(d->fd, buf, want, (off_t)off);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0) {
            int e = r < 0 ? errno : EIO;
            free(buf);
            return ck_fail_errno(err, e, "cannot read back %s", d->part_path);
        }
        ck_hashsink_absorb(d->sink, buf, (size_t)r);
        off += (uint64_t)r;
    }
    free(buf);
    return CK_OK;
}

/* ---- the partial and its meta file --------------------------------------- */

static int report_progress(download *d, int force);

/* One line for the caller's log (opts->note). */
__attribute__((format(printf, 3, 4))) static void note(download *d, int level, const char *fmt,
                                                       ...) {
    if (d->opts->note == NULL)
        return;
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    d->opts->note(d->opts->note_ctx, level, msg);
}

/* Opens and locks the partial, in append mode so that writes follow a
 * truncation to zero, never through a symbolic link (a shared cache
 * directory must not redirect the write), created private (0600; the mode
 * a file made by open() would get is given at commit). Whatever is at the
 * path and is not a private file of this user (is_private_file: another
 * user's partial, a link, a hard link to one of our files, a FIFO) is
 * removed and replaced, never adopted. The lock is polled every 50 ms with
 * a progress report in between, so that a wait for another download can be
 * interrupted; it fails once the partial has not grown for
 * opts->lock_timeout_s. A lock won after the other process renamed or
 * removed the file is on a stale inode: open the path again. */
static ck_status open_partial(download *d, ck_error *err) {
    for (int tries = 0; tries < 64; tries++) {
        int fd = open(d->part_path,
                      O_RDWR | O_CREAT | O_APPEND | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK, 0600);
        int e = errno;
        struct stat a = {0};
        /* ELOOP: a symbolic link; EACCES/EPERM: another user's file */
        int foreign = fd < 0 && (e == ELOOP || e == EACCES || e == EPERM) &&
                      lstat(d->part_path, &a) == 0 && a.st_uid != geteuid();
        if (fd < 0 && e == ELOOP)
            foreign = 1;
        if (fd < 0 && !foreign)
            return ck_fail_errno(err, e, "cannot create %s", d->part_path);
        if (fd >= 0 && fstat(fd, &a) != 0) {
            e = errno;
            close(fd);
            return ck_fail_errno(err, e, "cannot stat %s", d->part_path);
        }
        if (foreign || !is_private_file(&a)) {
            /* not a partial this user made: not ours to resume or write */
            if (fd >= 0)
                close(fd);
            note(d, 2, "replacing %s: not a partial download of this user (uid %u, mode %04o)",
                 d->part_path, (unsigned)a.st_uid, (unsigned)(a.st_mode & 07777));
            if (unlink(d->part_path) != 0 && errno != ENOENT)
                return ck_fail_errno(err, errno,
                                     "cannot replace %s (uid %u, mode %04o, %u links): not a "
                                     "partial download of this user",
                                     d->part_path, (unsigned)a.st_uid,
                                     (unsigned)(a.st_mode & 07777), (unsigned)a.st_nlink);
            unlink(d->meta_path); /* whatever describes it is as foreign */
            continue;
        }
        fcntl(fd, F_SETFL, O_APPEND); /* O_NONBLOCK was for the open only */
        int rc, waited = 0;
        off_t seen = a.st_size;
        int64_t quiet_since = now_ns();
        while ((rc = flock(fd, LOCK_EX | LOCK_NB)) < 0 &&
               (errno == EWOULDBLOCK || errno == EINTR)) {
            if (!waited++)
                note(d, 1, "waiting: another download of %s holds %s", d->url, d->part_path);
            struct timespec ts = {0, PROGRESS_INTERVAL_NS};
            nanosleep(&ts, NULL);
            if (report_progress(d, 1) != 0) {
                close(fd);
                return ck_fail(err, CK_E_INTERRUPTED, "interrupted while another download held %s",
                               d->part_path);
            }
            struct stat now;
            if (fstat(fd, &now) == 0 && now.st_size != seen) {
                seen = now.st_size; /* the holder is making progress */
                quiet_since = now_ns();
            } else if ((double)(now_ns() - quiet_since) / 1e9 >= d->opts->lock_timeout_s) {
                close(fd);
                return ck_fail(err, CK_E_LIMIT,
                               "another download has held %s for %g s without progress: gave "
                               "up waiting for it (remove the file if no download is running)",
                               d->part_path, d->opts->lock_timeout_s);
            }
        }
        if (rc < 0) {
            int e = errno;
            close(fd);
            return ck_fail_errno(err, e, "cannot lock %s", d->part_path);
        }
        struct stat b;
        if (fstat(fd, &a) == 0 && lstat(d->part_path, &b) == 0 && a.st_ino == b.st_ino &&
            a.st_dev == b.st_dev) {
            d->fd = fd;
            return CK_OK;
        }
        close(fd);
    }
    return ck_fail(err, CK_E_IO, "%s keeps being replaced by someone else", d->part_path);
}

static void remove_meta(download *d) {
    unlink(d->meta_path);
}

/* Records what the partial holds, before any of its bytes are written, so
 * that a later call can tell whether the server still has the same file. */
static ck_status write_meta(download *d, ck_error *err) {
    if (resume_validator(d) == NULL) {
        remove_meta(d);
        return CK_OK;
    }
    char text[META_MAX];
    int n = snprintf(text, sizeof text,
                     "ckptio-partial 1\nurl %s\netag %s\nlast-modified %s\ntotal %" PRIu64 "\n",
                     d->url, d->etag, d->last_modified, d->total);
    if (n < 0 || (size_t)n >= sizeof text) {
        remove_meta(d); /* a URL this long is simply not resumed */
        return CK_OK;
    }
    /* a fresh private file: never written through what someone left there */
    remove_meta(d);
    int fd = open(d->meta_path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0600);
    if (fd < 0 && errno == EEXIST)
        return CK_OK; /* someone keeps putting one there: this partial is not resumable */
    if (fd < 0)
        return ck_fail_errno(err, errno, "cannot create %s", d->meta_path);
    int bad = ck_write_all(fd, text, (size_t)n) < 0 || (d->opts->fsync && fsync(fd) < 0);
    int e = errno;
    close(fd);
    if (bad) {
        remove_meta(d);
        return ck_fail_errno(err, e, "cannot write %s", d->meta_path);
    }
    return CK_OK;
}

/* Finds "key value\n" in text and copies value into out (cap bytes). */
static int meta_field(const char *text, const char *key, char *out, size_t cap) {
    size_t k = strlen(key);
    for (const char *line = text; *line != 0;) {
        const char *end = strchr(line, '\n');
        size_t len = end ? (size_t)(end - line) : strlen(line);
        if (len > k && strncmp(line, key, k) == 0 && line[k] == ' ') {
            size_t vn = len - k - 1;
            if (vn >= cap)
                return 0;
            memcpy(out, line + k + 1, vn);
            out[vn] = 0;
            return 1;
        }
        if (end == NULL)
            break;
        line = end + 1;
    }
    return 0;
}

/* Takes over a partial left by an earlier call when its meta file names the
 * same URL and a validator; otherwise empties it. */
static ck_status adopt_partial(download *d, ck_error *err) {
    struct stat st;
    if (fstat(d->fd, &st) < 0)
        return ck_fail_errno(err, errno, "cannot stat %s", d->part_path);
    uint64_t size = (uint64_t)st.st_size;
    int ok = 0;
    char text[META_MAX + 1];
    int mfd = size > 0 ? open(d->meta_path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK) : -1;
    struct stat mst;
    if (mfd >= 0 && (fstat(mfd, &mst) != 0 || !is_private_file(&mst))) {
        close(mfd); /* not written by this user: ignored (and replaced) */
        mfd = -1;
    }
    if (mfd >= 0) {
        ssize_t n = read(mfd, text, META_MAX);
        close(mfd);
        char url[META_MAX], total[32];
        if (n > 0) {
            text[n] = 0;
            ok = strncmp(text, "ckptio-partial 1\n", 17) == 0 &&
                 meta_field(text, "url", url, sizeof url) && strcmp(url, d->url) == 0 &&
                 meta_field(text, "etag", d->etag, sizeof d->etag) &&
                 meta_field(text, "last-modified", d->last_modified, sizeof d->last_modified) &&
                 meta_field(text, "total", total, sizeof total) && resume_validator(d) != NULL;
            if (ok) {
                char *endp;
                errno = 0;
                unsigned long long t = strtoull(total, &endp, 10);
                ok = errno == 0 && *endp == 0 && (t == 0 || size <= t);
                d->total = t;
            }
        }
    }
    if (ok) {
        if (d->opts->sha256 || d->opts->hash_prefix != NULL) {
            ck_status s = hash_prefix_of_file(d, size, err);
            if (s != CK_OK)
                return s;
        }
        d->have = size;
        d->resumed_from = size;
        note(d, 1, "%s holds %" PRIu64 " bytes of %s from an earlier download", d->part_path, size,
             d->url);
        return CK_OK;
    }
    if (size > 0)
        note(d, 1, "discarding %" PRIu64 " bytes of %s: no resume record for %s", size,
             d->part_path, d->url);
    d->etag[0] = d->last_modified[0] = 0;
    d->total = 0;
    remove_meta(d);
    if (size > 0 && ftruncate(d->fd, 0) < 0)
        return ck_fail_errno(err, errno, "cannot empty %s", d->part_path);
    return CK_OK;
}

/* Empties the partial to take the file from its first byte. */
static ck_status restart_partial(download *d, ck_error *err) {
    if (d->have > 0)
        note(d, 1, "taking %s from its first byte again: %" PRIu64 " bytes of %s discarded", d->url,
             d->have, d->part_path);
    ck_status s = ck_hashsink_reset(d->sink, err);
    if (s != CK_OK)
        return s;
    if (ftruncate(d->fd, 0) < 0)
        return ck_fail_errno(err, errno, "cannot empty %s", d->part_path);
    d->have = d->resumed_from = 0;
    d->total = 0;
    d->etag[0] = d->last_modified[0] = 0;
    remove_meta(d);
    return CK_OK;
}

/* ---- callbacks ----------------------------------------------------------- */

static size_t on_header(char *line, size_t size, size_t nitems, void *userdata) {
    download *d = userdata;
    size_t n = size * nitems;
    if (has_prefix_ci(line, n, "HTTP/")) {
        /* a new response (a redirect, or 100 Continue, came before) */
        d->r_etag[0] = d->r_last_modified[0] = d->r_content_range[0] = 0;
        d->r_retry_after = -1;
    } else if (has_prefix_ci(line, n, "etag:")) {
        header_value(line + 5, n - 5, d->r_etag, sizeof d->r_etag);
    } else if (has_prefix_ci(line, n, "last-modified:")) {
        header_value(line + 14, n - 14, d->r_last_modified, sizeof d->r_last_modified);
    } else if (has_prefix_ci(line, n, "content-range:")) {
        header_value(line + 14, n - 14, d->r_content_range, sizeof d->r_content_range);
    } else if (has_prefix_ci(line, n, "retry-after:")) {
        char v[32];
        header_value(line + 12, n - 12, v, sizeof v);
        char *endp;
        long secs = strtol(v, &endp, 10);
        if (v[0] != 0 && *endp == 0 && secs >= 0)
            d->r_retry_after = (double)secs;
    }
    return n;
}

static outcome cb_stop(download *d, outcome o) {
    d->cb_outcome = o;
    d->cb_failed = 1;
    return o;
}

static int retryable_status(long status) {
    return status >= 500 || status == 429 || status == 408;
}

/* Parses "bytes a-b/t" (t may be "*"). */
static int parse_content_range(const char *s, uint64_t *start, uint64_t *total) {
    unsigned long long a, b, t;
    char star;
    if (sscanf(s, "bytes %llu-%llu/%llu", &a, &b, &t) == 3 && a <= b && b < t) {
        *start = a;
        *total = t;
        return 1;
    }
    if (sscanf(s, "bytes %llu-%llu/%c", &a, &b, &star) == 3 && star == '*' && a <= b) {
        *start = a;
        *total = 0;
        return 1;
    }
    return 0;
}

/* A 416 for a range starting at the partial's end whose Content-Range (an
 * unsatisfied range: "*", then the size) says the file is that long, and
 * which carries the partial's validator: the earlier call received the whole
 * file and stopped before the rename. */
static int partial_is_complete(const download *d) {
    unsigned long long n;
    char end;
    if (sscanf(d->r_content_range, "bytes */%llu%c", &n, &end) != 1 || n != d->have)
        return 0;
    const char *v = resume_validator(d);
    if (v == NULL)
        return 0;
    if (v == d->etag)
        return strcmp(d->r_etag, d->etag) == 0;
    return strcmp(d->r_last_modified, d->last_modified) == 0;
}

/* Checks the response once its headers are in: status, range, type. */
static outcome response_start(download *d) {
    d->started = 1;
    curl_easy_getinfo(d->curl, CURLINFO_RESPONSE_CODE, &d->status);
    if (d->status >= 400) {
        if (retryable_status(d->status)) {
            ck_fail(d->err, CK_E_HTTP, "HTTP %ld from %s", d->status, d->url);
            return cb_stop(d, OUT_RETRY);
        }
        if (d->status == 416 && d->range_from > 0) {
            if (partial_is_complete(d)) {
                d->spliced = 1;
                return cb_stop(d, OUT_COMPLETE);
            }
            /* the partial is not a prefix of what the server has now */
            if (restart_partial(d, d->err) != CK_OK)
                return cb_stop(d, OUT_FINAL);
            return cb_stop(d, OUT_RESTART);
        }
        ck_fail(d->err, CK_E_HTTP, "HTTP %ld from %s", d->status, d->url);
        return cb_stop(d, OUT_FINAL);
    }
    if (d->status < 200 || d->status >= 300) {
        ck_fail(d->err, CK_E_HTTP, "unexpected HTTP %ld from %s", d->status, d->url);
        return cb_stop(d, OUT_FINAL);
    }
    curl_off_t length = -1;
    curl_easy_getinfo(d->curl, CURLINFO_CONTENT_LENGTH_DOWNLOAD_T, &length);
    if (d->status == 206) {
        uint64_t start = 0, total = 0;
        int same = d->range_from > 0 && parse_content_range(d->r_content_range, &start, &total) &&
                   start == d->have && (total == 0 || d->total == 0 || total == d->total) &&
                   (d->r_etag[0] == 0 || d->etag[0] == 0 || strcmp(d->r_etag, d->etag) == 0);
        /* resumed by date (a hash checks the result): the date must still match */
        if (same && !strong_etag(d))
            same = d->r_last_modified[0] != 0 && strcmp(d->r_last_modified, d->last_modified) == 0;
        if (!same) {
            if (restart_partial(d, d->err) != CK_OK)
                return cb_stop(d, OUT_FINAL);
            return cb_stop(d, OUT_RESTART);
        }
        d->spliced = 1;
        if (total != 0)
            d->total = total;
        else if (length >= 0)
            d->total = start + (uint64_t)length;
        return OUT_DONE;
    }
    /* the whole file, from its first byte (also when a range was asked) */
    if (d->have > 0 && restart_partial(d, d->err) != CK_OK)
        return cb_stop(d, OUT_FINAL);
    d->sniff_len = 0;
    d->sniff_done = 0;
    char *ctype = NULL;
    curl_easy_getinfo(d->curl, CURLINFO_CONTENT_TYPE, &ctype);
    if (ctype != NULL && strncasecmp(ctype, "text/html", 9) == 0) {
        ck_fail(d->err, CK_E_HTTP,
                "%s sent an HTML page (HTTP %ld, Content-Type %s), not a file: check the URL "
                "and your access to it",
                d->url, d->status, ctype);
        return cb_stop(d, OUT_FINAL);
    }
    memcpy(d->etag, d->r_etag, sizeof d->etag);
    memcpy(d->last_modified, d->r_last_modified, sizeof d->last_modified);
    d->total = length >= 0 ? (uint64_t)length : 0;
    if (write_meta(d, d->err) != CK_OK)
        return cb_stop(d, OUT_FINAL);
    return OUT_DONE;
}

/* An HTML document where a checkpoint was expected: a login or error page
 * served with status 200. */
static int looks_like_html(const unsigned char *p, size_t n) {
    size_t i = 0;
    if (n >= 3 && p[0] == 0xef && p[1] == 0xbb && p[2] == 0xbf)
        i = 3;
    while (i < n && isspace(p[i]))
        i++;
    return (n - i >= 9 && strncasecmp((const char *)p + i, "<!doctype", 9) == 0) ||
           (n - i >= 5 && strncasecmp((const char *)p + i, "<html", 5) == 0);
}

static int check_sniff(download *d) {
    d->sniff_done = 1;
    if (!looks_like_html(d->sniff, d->sniff_len))
        return 0;
    ck_fail(d->err, CK_E_HTTP,
            "%s sent an HTML page (HTTP %ld), not a file: check the URL and "
            "your access to it",
            d->url, d->status);
    return 1;
}

static size_t on_body(char *ptr, size_t size, size_t nmemb, void *userdata) {
    download *d = userdata;
    size_t n = size * nmemb;
    if (!d->started && response_start(d) != OUT_DONE)
        return 0;
    if (!d->sniff_done && d->have == d->sniff_len) {
        size_t k = n < SNIFF_LEN - d->sniff_len ? n : SNIFF_LEN - d->sniff_len;
        memcpy(d->sniff + d->sniff_len, ptr, k);
        d->sniff_len += k;
        if (d->sniff_len == SNIFF_LEN && check_sniff(d)) {
            cb_stop(d, OUT_FINAL);
            return 0;
        }
    }
    if (d->total != 0 && n > d->total - d->have) {
        ck_fail(d->err, CK_E_HTTP, "%s sent more than the %" PRIu64 " bytes it announced", d->url,
                d->total);
        cb_stop(d, OUT_FINAL);
        return 0;
    }
    if (ck_hashsink_put(d->sink, ptr, n, d->err) != CK_OK) {
        cb_stop(d, OUT_FINAL);
        return 0;
    }
    d->have += n;
    return n;
}

static int report_progress(download *d, int force) {
    if (d->opts->progress == NULL)
        return 0;
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    int64_t gap = (int64_t)(ts.tv_sec - d->last_progress.tv_sec) * 1000000000LL +
                  (ts.tv_nsec - d->last_progress.tv_nsec);
    if (!force && gap < PROGRESS_INTERVAL_NS)
        return 0;
    d->last_progress = ts;
    return d->opts->progress(d->opts->progress_ctx, d->have, d->total);
}

static int on_progress(void *clientp, curl_off_t dltotal, curl_off_t dlnow, curl_off_t ultotal,
                       curl_off_t ulnow) {
    (void)dltotal, (void)dlnow, (void)ultotal, (void)ulnow;
    download *d = clientp;
    if (report_progress(d, 0) != 0) {
        cb_stop(d, OUT_INTERRUPT);
        return 1;
    }
    return 0;
}

/* ---- one attempt ----------------------------------------------------------- */

static int final_curl_error(CURLcode rc) {
    switch (rc) {
    case CURLE_UNSUPPORTED_PROTOCOL:
    case CURLE_URL_MALFORMAT:
    case CURLE_NOT_BUILT_IN:
    case CURLE_TOO_MANY_REDIRECTS:
    case CURLE_PEER_FAILED_VERIFICATION:
    case CURLE_SSL_CERTPROBLEM:
    case CURLE_SSL_CACERT_BADFILE:
    case CURLE_LOGIN_DENIED:
    case CURLE_REMOTE_ACCESS_DENIED:
        return 1;
    default:
        return 0;
    }
}

static outcome attempt(download *d) {
    d->started = 0;
    d->status = 0;
    d->cb_failed = 0;
    d->sniff_len = 0;
    d->sniff_done = d->have > 0;
    d->r_etag[0] = d->r_last_modified[0] = d->r_content_range[0] = 0;
    d->r_retry_after = -1;
    d->curl_msg[0] = 0;
    d->range_from = d->have > 0 && resume_validator(d) != NULL ? d->have : 0;

    struct curl_slist *headers = NULL;
    char range[48], ifrange[VALIDATOR_MAX + 16];
    if (d->range_from > 0) {
        note(d, 1, "resuming %s from byte %" PRIu64, d->url, d->range_from);
        snprintf(range, sizeof range, "%" PRIu64 "-", d->range_from);
        snprintf(ifrange, sizeof ifrange, "If-Range: %s", resume_validator(d));
        headers = curl_slist_append(NULL, ifrange);
        if (headers == NULL) {
            ck_fail(d->err, CK_E_NOMEM, "no memory for request headers");
            return OUT_FINAL;
        }
    } else if (d->have > 0) {
        /* no validator to resume with */
        if (restart_partial(d, d->err) != CK_OK)
            return OUT_FINAL;
    }
    curl_easy_setopt(d->curl, CURLOPT_RANGE, d->range_from > 0 ? range : NULL);
    curl_easy_setopt(d->curl, CURLOPT_HTTPHEADER, headers);
    CURLcode rc = curl_easy_perform(d->curl);
    curl_easy_setopt(d->curl, CURLOPT_HTTPHEADER, NULL);
    curl_slist_free_all(headers);

    if (d->cb_failed)
        return d->cb_outcome;
    if (rc == CURLE_OK && !d->started && response_start(d) != OUT_DONE)
        return d->cb_outcome; /* an empty body: its status still counts */
    if (rc != CURLE_OK) {
        ck_fail(d->err, CK_E_HTTP, "download of %s failed: %s (curl error %d)", d->url,
                d->curl_msg[0] ? d->curl_msg : curl_easy_strerror(rc), (int)rc);
        return final_curl_error(rc) ? OUT_FINAL : OUT_RETRY;
    }
    if (!d->sniff_done && check_sniff(d))
        return OUT_FINAL;
    if (d->total != 0 && d->have < d->total) {
        ck_fail(d->err, CK_E_HTTP, "download of %s ended after %" PRIu64 " of %" PRIu64 " bytes",
                d->url, d->have, d->total);
        return OUT_RETRY;
    }
    return OUT_DONE;
}

/* Sleeps for secs, calling the progress callback so that it can interrupt. */
static int pause_before_retry(download *d, double secs) {
    int64_t end = now_ns() + (int64_t)(secs * 1e9);
    for (;;) {
        int64_t left = end - now_ns();
        if (left <= 0)
            return 0;
        int64_t step = left < PROGRESS_INTERVAL_NS ? left : PROGRESS_INTERVAL_NS;
        struct timespec ts = {(time_t)(step / 1000000000LL), (long)(step % 1000000000LL)};
        nanosleep(&ts, NULL);
        if (report_progress(d, 1) != 0)
            return -1;
    }
}

static ck_status setup_curl(download *d, ck_error *err) {
    d->curl = curl_easy_init();
    if (d->curl == NULL)
        return ck_fail(err, CK_E_NOMEM, "curl_easy_init failed");
    const ck_http_opts *o = d->opts;
    CURL *c = d->curl;
    CURLcode rc = CURLE_OK;
#define SET(opt, val)                                                                              \
    if (rc == CURLE_OK)                                                                            \
    rc = curl_easy_setopt(c, opt, val)
    SET(CURLOPT_URL, d->url);
    SET(CURLOPT_PROTOCOLS_STR, "http,https");
    SET(CURLOPT_REDIR_PROTOCOLS_STR, "http,https");
    SET(CURLOPT_FOLLOWLOCATION, 1L);
    SET(CURLOPT_MAXREDIRS, 16L);
    SET(CURLOPT_USERAGENT, o->user_agent ? o->user_agent : "ckptio");
    SET(CURLOPT_NOSIGNAL, 1L);
    SET(CURLOPT_BUFFERSIZE, BUFFER_SIZE);
    SET(CURLOPT_ERRORBUFFER, d->curl_msg);
    SET(CURLOPT_WRITEFUNCTION, on_body);
    SET(CURLOPT_WRITEDATA, d);
    SET(CURLOPT_HEADERFUNCTION, on_header);
    SET(CURLOPT_HEADERDATA, d);
    SET(CURLOPT_NOPROGRESS, 0L);
    SET(CURLOPT_XFERINFOFUNCTION, on_progress);
    SET(CURLOPT_XFERINFODATA, d);
    /* the CA certificates Python's ssl (so torch.hub) would trust: OpenSSL's
     * variables, then the curl tool's; else libcurl's built-in bundle */
    const char *ca_file = getenv("SSL_CERT_FILE");
    if (ca_file == NULL || ca_file[0] == 0)
        ca_file = getenv("CURL_CA_BUNDLE");
    const char *ca_dir = getenv("SSL_CERT_DIR");
    if (ca_file != NULL && ca_file[0] != 0)
        SET(CURLOPT_CAINFO, ca_file);
    if (ca_dir != NULL && ca_dir[0] != 0)
        SET(CURLOPT_CAPATH, ca_dir);
    if (o->connect_timeout_s > 0)
        SET(CURLOPT_CONNECTTIMEOUT_MS, (long)(o->connect_timeout_s * 1000.0));
    if (o->low_speed_time_s > 0 && o->low_speed_limit > 0) {
        SET(CURLOPT_LOW_SPEED_LIMIT, o->low_speed_limit);
        SET(CURLOPT_LOW_SPEED_TIME, o->low_speed_time_s);
    }
#undef SET
    if (rc != CURLE_OK)
        return ck_fail(err, CK_E_UNSUPPORTED, "libcurl refused an option: %s",
                       curl_easy_strerror(rc));
    return CK_OK;
}

/* The process's umask, read without changing it (umask(2) cannot read it
 * without setting it, which would race with other threads); 022 when
 * /proc is not there. */
static mode_t current_umask(void) {
    mode_t mask = 022;
    FILE *f = fopen("/proc/self/status", "re");
    if (f == NULL)
        return mask;
    char line[128];
    unsigned int v;
    while (fgets(line, sizeof line, f) != NULL)
        if (sscanf(line, "Umask: %o", &v) == 1) {
            mask = (mode_t)(v & 0777);
            break;
        }
    fclose(f);
    return mask;
}

/* Makes the finished partial the file at dst. */
static ck_status commit(download *d, const char *dst, ck_error *err) {
    if (d->opts->fsync && fsync(d->fd) < 0)
        return ck_fail_errno(err, errno, "cannot flush %s", d->part_path);
    if (rename(d->part_path, dst) < 0)
        return ck_fail_errno(err, errno, "cannot move %s to %s", d->part_path, dst);
    /* the partial was private; the file gets what open() would have given it.
     * Only after the rename: a waiting download that opened the partial sees
     * a file that is no longer private as foreign and removes its name, so a
     * chmod before the rename let it unlink the partial under this one. */
    if (fchmod(d->fd, 0666 & ~current_umask()) < 0)
        return ck_fail_errno(err, errno, "cannot set the mode of %s", dst);
    remove_meta(d);
    if (d->opts->fsync) {
        char *dir = dir_of(dst);
        int dfd = dir ? open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC) : -1;
        free(dir);
        if (dfd >= 0) {
            fsync(dfd); /* the rename is durable; a failure here loses nothing */
            close(dfd);
        }
    }
    return CK_OK;
}

static ck_status finish(download *d, const char *dst, ck_http_result *res, ck_error *err) {
    char hex[65];
    ck_status s = ck_hashsink_hex(d->sink, hex, err);
    if (s != CK_OK)
        return s;
    if (res != NULL)
        memcpy(res->sha256_hex, hex, sizeof hex);
    const char *want = d->opts->hash_prefix;
    if (want != NULL && strncmp(hex, want, strlen(want)) != 0)
        return ck_fail(err, CK_E_CRC, "invalid hash value (expected \"%.64s\", got \"%s\")", want,
                       hex);
    return commit(d, dst, err);
}

/* Makes attempts until the body is complete, a final failure, an
 * interruption, or the retries are spent. */
static outcome transfer(download *d, ck_http_result *res, ck_error *err) {
    const ck_http_opts *opts = d->opts;
    outcome o = OUT_RETRY;
    double backoff = opts->backoff_s > 0 ? opts->backoff_s : 0;
    for (int n = 0; n <= opts->retries || o == OUT_RESTART; n++) {
        if (o == OUT_RETRY && n > 0) {
            double pause = backoff;
            if (d->r_retry_after >= 0)
                pause = d->r_retry_after < MAX_RETRY_AFTER_S ? d->r_retry_after : MAX_RETRY_AFTER_S;
            note(d, 2, "retrying %s in %.1f s%s (attempt %d of %d): %s", d->url, pause,
                 d->r_retry_after >= 0 ? " (Retry-After)" : "", n + 1, opts->retries + 1, err->msg);
            if (pause_before_retry(d, pause) != 0) {
                o = OUT_INTERRUPT;
                break;
            }
            backoff = backoff * 2 < MAX_BACKOFF_S ? backoff * 2 : MAX_BACKOFF_S;
        }
        if (o == OUT_RESTART && n > opts->retries + 1)
            break; /* a server that keeps changing its file */
        ck_error_clear(err);
        o = attempt(d);
        d->attempts++;
        if (res != NULL) {
            res->attempts = d->attempts;
            res->http_status = d->status;
        }
        if (o == OUT_COMPLETE)
            o = OUT_DONE;
        if (o == OUT_DONE || o == OUT_FINAL || o == OUT_INTERRUPT)
            break;
    }
    return o;
}

ck_status ck_http_download(const char *url, const char *dst, const ck_http_opts *opts,
                           ck_http_result *res, ck_error *err) {
    ck_error_clear(err);
    if (res != NULL)
        memset(res, 0, sizeof *res);
    ck_status s = ck_http_global_init(err);
    if (s != CK_OK)
        return s;
    if (opts->hash_prefix != NULL && strlen(opts->hash_prefix) > 64)
        return ck_fail(err, CK_E_RANGE, "hash prefix longer than a SHA-256 digest");
    download d;
    memset(&d, 0, sizeof d);
    d.url = url;
    d.opts = opts;
    d.fd = -1;
    d.err = err;
    d.part_path = concat(dst, ".partial");
    d.meta_path = concat(dst, ".partial.meta");
    clock_gettime(CLOCK_MONOTONIC, &d.last_progress);
    if (d.part_path == NULL || d.meta_path == NULL) {
        s = ck_fail(err, CK_E_NOMEM, "no memory to download %s", url);
        goto out;
    }
    if ((s = setup_curl(&d, err)) != CK_OK || (s = open_partial(&d, err)) != CK_OK)
        goto out;
    struct stat existing;
    if (opts->if_missing && stat(dst, &existing) == 0 && S_ISREG(existing.st_mode)) {
        /* finished by the download that held the lock: its partial is gone
         * and what is at our partial's path is ours, or stale */
        unlink(d.part_path);
        remove_meta(&d);
        note(&d, 1, "%s was completed by another download meanwhile: using it", dst);
        if (res != NULL) {
            res->existed = 1;
            res->size = (uint64_t)existing.st_size;
        }
        goto out;
    }
    int hash = opts->sha256 || opts->hash_prefix != NULL;
    if ((s = ck_hashsink_open(d.fd, d.part_path, opts->fsync, hash, &d.sink, err)) != CK_OK ||
        (s = adopt_partial(&d, err)) != CK_OK)
        goto out;

    int keep = 0;
    outcome o;
    for (;;) {
        o = transfer(&d, res, err);
        if (o != OUT_DONE)
            break;
        report_progress(&d, 1);
        s = finish(&d, dst, res, err);
        if (s == CK_E_CRC && d.spliced && !strong_etag(&d) && !d.no_resume) {
            /* resumed by date and the whole fails its hash: the server changed
             * the file and kept the date. Once more, from zero, no resume. */
            note(&d, 2, "%s failed its hash after a resume by date: downloading it again", url);
            d.no_resume = 1;
            d.spliced = 0;
            if ((s = restart_partial(&d, err)) == CK_OK)
                continue;
        }
        break;
    }
    if (o == OUT_DONE) {
        keep = 0;
    } else if (o == OUT_INTERRUPT) {
        s = ck_fail(err, CK_E_INTERRUPTED, "download of %s interrupted", url);
        keep = opts->keep_partial;
    } else {
        s = err->status != CK_OK ? err->status
                                 : ck_fail(err, CK_E_HTTP, "download of %s failed", url);
        if (o == OUT_RESTART)
            s = ck_fail(err, CK_E_HTTP, "%s kept changing during the download", url);
        keep = o != OUT_FINAL && opts->keep_partial;
    }
    if (keep) {
        ck_error flush_err; /* a partial that cannot be completed is not kept */
        keep = ck_hashsink_flush(d.sink, &flush_err) == CK_OK;
    }
    if (res != NULL) {
        res->size = d.have;
        res->resumed_from = d.resumed_from;
    }
    if (s != CK_OK && !(keep && d.have > 0 && resume_validator(&d) != NULL)) {
        unlink(d.part_path);
        remove_meta(&d);
    } else if (s != CK_OK) {
        note(&d, 1, "keeping %s (%" PRIu64 " bytes) to resume %s later", d.part_path, d.have, url);
    }
out:
    ck_hashsink_close(d.sink);
    if (d.fd >= 0 && s != CK_OK && d.have == 0)
        unlink(d.part_path);
    if (d.fd >= 0)
        close(d.fd);
    if (d.curl != NULL)
        curl_easy_cleanup(d.curl);
    free(d.part_path);
    free(d.meta_path);
    return s;
}

/* HTTP(S) download of one file into place, with libcurl's easy API.
 *
 * The body goes into "<dst>.partial" in the destination's directory, a
 * private file (0600) until the commit gives it mode 0666 less the umask,
 * like a file Python's open() makes;
 * the bytes are written and fed to SHA-256 as they arrive, on two threads
 * (core/hashsink.h), so the hash needs no second pass over the file and
 * costs little wall time. On success the partial is fsynced and renamed
 * onto dst, so dst is either absent, its old content, or the complete new
 * file, never a torn one.
 *
 * Resume: only with a validator that pins the exact bytes: a strong ETag,
 * or a Last-Modified date when opts->hash_prefix checks the whole result (a
 * weak W/ ETag, or a date alone, never: a server that rewrites a file and
 * keeps its date would have two versions spliced). The validator is stored
 * with the URL and the expected length in "<dst>.partial.meta". A later
 * attempt, in this call or a later one, hashes the bytes already in the
 * partial and asks for the rest with Range and If-Range; a server that
 * answers 200 instead (no range support, or the file changed) is taken from
 * the start again, and a 206 whose validator or start differs from what was
 * asked is refused and the transfer restarted from zero. A result resumed
 * by date whose hash does not match is downloaded once more from zero.
 *
 * Ownership: a partial or meta file is adopted only if it is a private
 * regular file of this user with a single link (as this code makes them);
 * anything else at those paths (another user's file in a shared cache, a
 * symbolic or hard link, a FIFO) is removed and replaced, never resumed,
 * written through or truncated.
 *
 * Failures: transport errors (connect, reset, low speed, short body) and HTTP
 * 5xx/429/408 are retried with exponential backoff (Retry-After honoured up to
 * a cap); other HTTP statuses >= 400, an HTML body where a file was expected,
 * a body longer than announced and a hash mismatch are final. A transient
 * failure that survives every retry keeps the partial (and its meta file) for
 * the next call to resume when opts->keep_partial is set and the server gave
 * a validator; every final failure removes both. dst itself is never touched
 * by a failure.
 *
 * TLS: peers are verified against libcurl's CA bundle, or the file and
 * directory named by SSL_CERT_FILE / SSL_CERT_DIR (what Python's ssl, so
 * torch.hub, trusts) or CURL_CA_BUNDLE. Proxies come from the environment
 * (http_proxy, https_proxy, no_proxy), as libcurl reads them. The partial and
 * its meta file are never opened through a symbolic link.
 *
 * Concurrency: the partial is flock()ed, so two processes downloading to the
 * same dst take turns instead of interleaving their bytes; with
 * opts->if_missing, the one that waited finds dst in place and stops there
 * (a cache filled by whichever process came first). The wait ends with
 * CK_E_LIMIT once the holder's partial has not grown for
 * opts->lock_timeout_s (a hung or stopped holder).
 *
 * No Python here: the progress callback is how the binding reports progress
 * and checks for signals.
 */
#ifndef CKPTIO_CORE_HTTP_H
#define CKPTIO_CORE_HTTP_H

#include <stdint.h>

#include "status.h"

/* Called about every 50 ms while a transfer runs, the retry loop sleeps or
 * the download waits for another one's lock, and once when the body is
 * complete. done counts the bytes of the file held so far (including a
 * resumed prefix); total is the file's size, or 0 while it is unknown. A
 * non-zero return aborts the download with CK_E_INTERRUPTED (the partial is
 * kept for resume as for a transient failure). */
typedef int (*ck_http_progress_fn)(void *ctx, uint64_t done, uint64_t total);

/* Called for what a log should tell: a retry and its pause (level 2,
 * warning), waiting for another process's download, resuming or
 * discarding a partial, keeping one for later, using a file another process
 * finished (level 1, info). msg is one line naming the URL or file; it is
 * valid during the call only. */
typedef void (*ck_http_note_fn)(void *ctx, int level, const char *msg);

typedef struct ck_http_opts {
    const char *hash_prefix;  /* lowercase hex the SHA-256 must start with, or NULL */
    const char *user_agent;   /* NULL: "ckptio" */
    int retries;              /* attempts after the first one (>= 0) */
    double backoff_s;         /* pause before the first retry; doubled each time, capped */
    double connect_timeout_s; /* CURLOPT_CONNECTTIMEOUT_MS; <= 0: libcurl's default */
    long low_speed_limit;     /* bytes/s; slower than this for low_speed_time_s aborts */
    long low_speed_time_s;    /* <= 0: no low-speed abort */
    int keep_partial;         /* keep the partial after a transient failure, for resume */
    int fsync;                /* fsync the file and its directory before and after rename */
    int if_missing;           /* dst there once the partial is locked: keep it, no transfer */
    int sha256;               /* compute the SHA-256 (always when hash_prefix is set) */
    double lock_timeout_s;    /* give up waiting for the lock after this long without progress */
    ck_http_progress_fn progress; /* may be NULL */
    void *progress_ctx;
    ck_http_note_fn note; /* may be NULL */
    void *note_ctx;
} ck_http_opts;

/* Sets the defaults: 4 retries, 1 s backoff, 30 s connect timeout, abort
 * below 1 KiB/s for 30 s, keep_partial, fsync and sha256 on, no hash prefix,
 * no progress, 300 s lock timeout. */
void ck_http_opts_init(ck_http_opts *opts);

typedef struct ck_http_result {
    uint64_t size;         /* bytes in the final file */
    uint64_t resumed_from; /* bytes taken from an earlier partial (0: none) */
    int attempts;          /* requests made */
    long http_status;      /* status of the last response (0: none) */
    char sha256_hex[65];   /* lowercase, NUL-terminated ("" when existed or not computed) */
    int existed;           /* if_missing found dst in place: nothing was transferred */
} ck_http_result;

/* Initialises libcurl once per process (thread-safe). Returns CK_OK or
 * CK_E_UNSUPPORTED when libcurl cannot start. ck_http_download calls it. */
ck_status ck_http_global_init(ck_error *err);

/* Downloads url to dst as described above. res may be NULL. On failure err
 * says what happened: CK_E_HTTP (an HTTP status, HTML body, transport error
 * or short body, with the URL and, for a status, the number), CK_E_CRC (hash
 * mismatch: 'invalid hash value (expected "<prefix>", got "<digest>")', the
 * same text as torch.hub), CK_E_IO (the local file), CK_E_LIMIT (the lock
 * wait timed out), CK_E_INTERRUPTED (the progress callback asked to stop) or
 * CK_E_NOMEM. */
ck_status ck_http_download(const char *url, const char *dst, const ck_http_opts *opts,
                           ck_http_result *res, ck_error *err);

#endif

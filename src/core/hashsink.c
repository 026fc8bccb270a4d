#include "hashsink.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "fdio.h"
#include "sha256.h"

/* _GNU_SOURCE comes from the build (setup.py, Makefile), once for every
 * file; without it the writeback below was silently compiled out. */
#if defined(__linux__) && !defined(SYNC_FILE_RANGE_WRITE)
#error "sync_file_range undeclared: build with -D_GNU_SOURCE (as setup.py, Makefile do)"
#endif

#define SLOT_SIZE (1u << 20)
#define SLOTS 4
#define WRITEBACK_STEP (32ULL << 20)

struct ck_hashsink {
    int fd;
    const char *path;
    int writeback;
    int hash;            /* 0: no worker, no digest */
    uint64_t written;    /* bytes written by this sink */
    uint64_t synced;     /* writeback started up to here */
    uint64_t writebacks; /* sync_file_range calls made */
    ck_sha256 *sha;
    unsigned char *slots[SLOTS];
    size_t len[SLOTS];
    size_t cur_len; /* bytes gathered in slot posted % SLOTS */
    /* under mu: slots posted to the worker and slots it has hashed; slot
     * k % SLOTS is free again once hashed > k - SLOTS */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    uint64_t posted;
    uint64_t hashed;
    int stop;
    pthread_t worker;
    int worker_started;
};

static void *worker_main(void *arg) {
    ck_hashsink *s = arg;
    pthread_mutex_lock(&s->mu);
    for (;;) {
        while (s->hashed == s->posted && !s->stop)
            pthread_cond_wait(&s->cv, &s->mu);
        if (s->hashed == s->posted)
            break; /* stop, and nothing left */
        unsigned idx = (unsigned)(s->hashed % SLOTS);
        size_t n = s->len[idx];
        pthread_mutex_unlock(&s->mu);
        ck_sha256_update(s->sha, s->slots[idx], n);
        pthread_mutex_lock(&s->mu);
        s->hashed++;
        pthread_cond_broadcast(&s->cv);
    }
    pthread_mutex_unlock(&s->mu);
    return NULL;
}

ck_status ck_hashsink_open(int fd, const char *path, int writeback, int hash, ck_hashsink **out,
                           ck_error *err) {
    *out = NULL;
    ck_hashsink *s = calloc(1, sizeof *s);
    if (s == NULL)
        return ck_fail(err, CK_E_NOMEM, "no memory for a download buffer");
    s->fd = fd;
    s->path = path;
    s->writeback = writeback;
    s->hash = hash;
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->cv, NULL);
    s->sha = ck_sha256_new(0);
    int ok = s->sha != NULL;
    for (int i = 0; ok && i < SLOTS; i++)
        ok = (s->slots[i] = malloc(SLOT_SIZE)) != NULL;
    if (!ok) {
        ck_hashsink_close(s);
        return ck_fail(err, CK_E_NOMEM, "no memory for a download buffer");
    }
    if (!hash) {
        *out = s;
        return CK_OK;
    }
    int rc = pthread_create(&s->worker, NULL, worker_main, s);
    if (rc != 0) {
        ck_hashsink_close(s);
        return ck_fail_errno(err, rc, "cannot start the hashing thread");
    }
    s->worker_started = 1;
    *out = s;
    return CK_OK;
}

/* Hands the current slot to the worker, then writes it: the worker only
 * reads the slot, so both run at once. */
static ck_status post_current(ck_hashsink *s, ck_error *err) {
    if (s->cur_len == 0)
        return CK_OK;
    pthread_mutex_lock(&s->mu);
    unsigned idx = (unsigned)(s->posted % SLOTS);
    size_t n = s->cur_len;
    s->len[idx] = n;
    s->posted++;
    if (!s->hash)
        s->hashed = s->posted; /* nothing to wait for */
    pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->mu);
    s->cur_len = 0;
    if (ck_write_all(s->fd, s->slots[idx], n) < 0)
        return ck_fail_errno(err, errno, "cannot write %s", s->path);
    s->written += n;
#ifdef SYNC_FILE_RANGE_WRITE
    if (s->writeback && s->written - s->synced >= WRITEBACK_STEP) {
        /* the whole file: pages already clean or under writeback are skipped */
        sync_file_range(s->fd, 0, 0, SYNC_FILE_RANGE_WRITE);
        s->synced = s->written;
        s->writebacks++;
    }
#endif
    return CK_OK;
}

/* Waits until the slot that the next bytes go into is free. */
static void wait_for_slot(ck_hashsink *s) {
    pthread_mutex_lock(&s->mu);
    while (s->posted - s->hashed >= SLOTS)
        pthread_cond_wait(&s->cv, &s->mu);
    pthread_mutex_unlock(&s->mu);
}

ck_status ck_hashsink_put(ck_hashsink *s, const void *p, size_t n, ck_error *err) {
    const unsigned char *src = p;
    while (n > 0) {
        if (s->cur_len == 0)
            wait_for_slot(s);
        unsigned idx = (unsigned)(s->posted % SLOTS);
        size_t k = SLOT_SIZE - s->cur_len;
        if (k > n)
            k = n;
        memcpy(s->slots[idx] + s->cur_len, src, k);
        s->cur_len += k;
        src += k;
        n -= k;
        if (s->cur_len == SLOT_SIZE) {
            ck_status st = post_current(s, err);
            if (st != CK_OK)
                return st;
        }
    }
    return CK_OK;
}

static void drain(ck_hashsink *s) {
    pthread_mutex_lock(&s->mu);
    while (s->hashed != s->posted)
        pthread_cond_wait(&s->cv, &s->mu);
    pthread_mutex_unlock(&s->mu);
}

ck_status ck_hashsink_flush(ck_hashsink *s, ck_error *err) {
    ck_status st = post_current(s, err);
    drain(s);
    return st;
}

void ck_hashsink_absorb(ck_hashsink *s, const void *p, size_t n) {
    if (s->hash)
        ck_sha256_update(s->sha, p, n);
}

ck_status ck_hashsink_reset(ck_hashsink *s, ck_error *err) {
    drain(s);
    s->cur_len = 0;
    s->written = s->synced = 0;
    if (ck_sha256_reset(s->sha) != 0)
        return ck_fail(err, CK_E_NOMEM, "SHA-256 initialisation failed");
    return CK_OK;
}

ck_status ck_hashsink_hex(ck_hashsink *s, char hex[65], ck_error *err) {
    ck_status st = ck_hashsink_flush(s, err);
    if (st != CK_OK)
        return st;
    hex[0] = 0;
    if (!s->hash)
        return CK_OK;
    unsigned char md[32];
    if (ck_sha256_final(s->sha, md) != 0)
        return ck_fail(err, CK_E_NOMEM, "SHA-256 finalisation failed");
    for (unsigned i = 0; i < 32; i++)
        snprintf(hex + 2 * i, 3, "%02x", md[i]);
    return CK_OK;
}

uint64_t ck_hashsink_writebacks(const ck_hashsink *s) {
    return s->writebacks;
}

void ck_hashsink_close(ck_hashsink *s) {
    if (s == NULL)
        return;
    if (s->worker_started) {
        pthread_mutex_lock(&s->mu);
        s->stop = 1;
        pthread_cond_broadcast(&s->cv);
        pthread_mutex_unlock(&s->mu);
        pthread_join(s->worker, NULL);
    }
    for (int i = 0; i < SLOTS; i++)
        free(s->slots[i]);
    ck_sha256_free(s->sha);
    pthread_mutex_destroy(&s->mu);
    pthread_cond_destroy(&s->cv);
    free(s);
}

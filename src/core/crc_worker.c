#include "crc_worker.h"

#include <pthread.h>
#include <stdlib.h>

#include "crc.h"

struct ck_crc_worker {
    pthread_t thread;
    pthread_mutex_t lock;
    pthread_cond_t cond;
    const void *data;
    size_t len;
    uint32_t crc;
    int busy; /* a job is submitted and not finished */
    int quit;
};

static void *run(void *arg) {
    ck_crc_worker *w = arg;
    pthread_mutex_lock(&w->lock);
    for (;;) {
        while (!w->busy && !w->quit)
            pthread_cond_wait(&w->cond, &w->lock);
        if (w->quit && !w->busy)
            break;
        const void *data = w->data;
        size_t len = w->len;
        pthread_mutex_unlock(&w->lock);
        uint32_t crc = ck_crc32(0, data, len);
        pthread_mutex_lock(&w->lock);
        w->crc = crc;
        w->busy = 0;
        pthread_cond_broadcast(&w->cond);
    }
    pthread_mutex_unlock(&w->lock);
    return NULL;
}

ck_status ck_crc_worker_start(ck_crc_worker **out, ck_error *err) {
    ck_crc_worker *w = calloc(1, sizeof *w);
    if (w == NULL)
        return ck_fail(err, CK_E_NOMEM, "out of memory");
    pthread_mutex_init(&w->lock, NULL);
    pthread_cond_init(&w->cond, NULL);
    int rc = pthread_create(&w->thread, NULL, run, w);
    if (rc != 0) {
        pthread_cond_destroy(&w->cond);
        pthread_mutex_destroy(&w->lock);
        free(w);
        return ck_fail_errno(err, rc, "cannot start the CRC thread");
    }
    *out = w;
    return CK_OK;
}

void ck_crc_worker_submit(ck_crc_worker *w, const void *data, size_t len) {
    pthread_mutex_lock(&w->lock);
    w->data = data;
    w->len = len;
    w->busy = 1;
    pthread_cond_broadcast(&w->cond);
    pthread_mutex_unlock(&w->lock);
}

uint32_t ck_crc_worker_wait(ck_crc_worker *w) {
    pthread_mutex_lock(&w->lock);
    while (w->busy)
        pthread_cond_wait(&w->cond, &w->lock);
    uint32_t crc = w->crc;
    pthread_mutex_unlock(&w->lock);
    return crc;
}

void ck_crc_worker_stop(ck_crc_worker *w) {
    if (w == NULL)
        return;
    pthread_mutex_lock(&w->lock);
    w->quit = 1;
    pthread_cond_broadcast(&w->cond);
    pthread_mutex_unlock(&w->lock);
    pthread_join(w->thread, NULL);
    pthread_cond_destroy(&w->cond);
    pthread_mutex_destroy(&w->lock);
    free(w);
}

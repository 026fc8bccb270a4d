#include "memcopy.h"

#include <pthread.h>
#include <string.h>

#define CK_MEMCOPY_MAX_THREADS 8

/* The bytes [begin, end) of the batch, counted over its runs in order: the
 * segments into arena, or (segs NULL) the scattered runs. */
typedef struct share {
    uint8_t *arena;
    const ck_memcopy_segment *segs;
    const ck_memcopy_run *runs;
    size_t n;
    size_t begin, end;
} share;

static ck_memcopy_run run_at(const share *sh, size_t i) {
    if (sh->segs == NULL)
        return sh->runs[i];
    const ck_memcopy_segment *g = &sh->segs[i];
    return (ck_memcopy_run){g->src, sh->arena + g->offset, g->nbytes};
}

static void copy_share(const share *sh) {
    size_t pos = 0;
    for (size_t i = 0; i < sh->n && pos < sh->end; i++) {
        ck_memcopy_run r = run_at(sh, i);
        size_t lo = pos, hi = pos + r.nbytes;
        pos = hi;
        if (hi <= sh->begin)
            continue;
        size_t from = lo < sh->begin ? sh->begin - lo : 0;
        size_t to = hi > sh->end ? sh->end - lo : r.nbytes;
        if (to > from)
            memcpy((uint8_t *)r.dst + from, (const uint8_t *)r.src + from, to - from);
    }
}

static void *share_thread(void *arg) {
    copy_share(arg);
    return NULL;
}

/* Copies the batch's bytes, on `threads` threads when it is large. */
static void copy_batch(share all, size_t bytes, int threads) {
    if (threads > CK_MEMCOPY_MAX_THREADS)
        threads = CK_MEMCOPY_MAX_THREADS;
    if (threads < 2 || bytes < CK_MEMCOPY_PARALLEL_MIN) {
        all.begin = 0;
        all.end = bytes;
        copy_share(&all);
        return;
    }
    share shares[CK_MEMCOPY_MAX_THREADS];
    pthread_t tids[CK_MEMCOPY_MAX_THREADS];
    int started[CK_MEMCOPY_MAX_THREADS] = {0};
    size_t step = bytes / (size_t)threads;
    for (int t = 0; t < threads; t++) {
        shares[t] = all;
        shares[t].begin = step * (size_t)t;
        shares[t].end = t == threads - 1 ? bytes : step * (size_t)(t + 1);
    }
    for (int t = 1; t < threads; t++)
        started[t] = pthread_create(&tids[t], NULL, share_thread, &shares[t]) == 0;
    copy_share(&shares[0]);
    for (int t = 1; t < threads; t++) {
        if (started[t])
            pthread_join(tids[t], NULL);
        else
            copy_share(&shares[t]);
    }
}

/* Checks every run of the batch (a source and a destination where it has
 * bytes; the total fits a size_t), then copies the batch. */
static ck_status copy_checked(share all, const char *what, int threads, ck_error *err) {
    size_t bytes = 0;
    for (size_t i = 0; i < all.n; i++) {
        ck_memcopy_run r = run_at(&all, i);
        if (r.nbytes > 0 && (r.src == NULL || r.dst == NULL))
            return ck_fail(err, CK_E_RANGE, "%s %zu has no source or no destination", what, i);
        bytes += r.nbytes;
        if (bytes < r.nbytes)
            return ck_fail(err, CK_E_LIMIT, "the batch size overflows");
    }
    copy_batch(all, bytes, threads);
    return CK_OK;
}

ck_status ck_memcopy_segments(void *arena, size_t total, const ck_memcopy_segment *segs, size_t n,
                              int threads, ck_error *err) {
    for (size_t i = 0; i < n; i++) {
        if (segs[i].offset > total || segs[i].nbytes > total - segs[i].offset)
            return ck_fail(err, CK_E_RANGE, "segment %zu lies outside the arena", i);
    }
    return copy_checked((share){arena, segs, NULL, n, 0, 0}, "segment", threads, err);
}

ck_status ck_memcopy_runs(const ck_memcopy_run *runs, size_t n, int threads, ck_error *err) {
    return copy_checked((share){NULL, NULL, runs, n, 0, 0}, "run", threads, err);
}

#include "memcopy.h"

#include <pthread.h>
#include <string.h>

#define CK_MEMCOPY_MAX_THREADS 8

/* The bytes [begin, end) of the batch, counted over the segments in order. */
typedef struct share {
    uint8_t *arena;
    const ck_memcopy_segment *segs;
    size_t n;
    size_t begin, end;
} share;

static void copy_share(const share *sh) {
    size_t pos = 0;
    for (size_t i = 0; i < sh->n && pos < sh->end; i++) {
        const ck_memcopy_segment *g = &sh->segs[i];
        size_t lo = pos, hi = pos + g->nbytes;
        pos = hi;
        if (hi <= sh->begin)
            continue;
        size_t from = lo < sh->begin ? sh->begin - lo : 0;
        size_t to = hi > sh->end ? sh->end - lo : g->nbytes;
        if (to > from)
            memcpy(sh->arena + g->offset + from, (const uint8_t *)g->src + from, to - from);
    }
}

static void *share_thread(void *arg) {
    copy_share(arg);
    return NULL;
}

ck_status ck_memcopy_segments(void *arena, size_t total, const ck_memcopy_segment *segs, size_t n,
                              int threads, ck_error *err) {
    size_t bytes = 0;
    for (size_t i = 0; i < n; i++) {
        if (segs[i].offset > total || segs[i].nbytes > total - segs[i].offset)
            return ck_fail(err, CK_E_RANGE, "segment %zu lies outside the arena", i);
        if (segs[i].nbytes > 0 && segs[i].src == NULL)
            return ck_fail(err, CK_E_RANGE, "segment %zu has no source", i);
        bytes += segs[i].nbytes;
        if (bytes < segs[i].nbytes)
            return ck_fail(err, CK_E_LIMIT, "the batch size overflows");
    }
    if (threads > CK_MEMCOPY_MAX_THREADS)
        threads = CK_MEMCOPY_MAX_THREADS;
    if (threads < 2 || bytes < CK_MEMCOPY_PARALLEL_MIN) {
        share all = {arena, segs, n, 0, bytes};
        copy_share(&all);
        return CK_OK;
    }
    share shares[CK_MEMCOPY_MAX_THREADS];
    pthread_t tids[CK_MEMCOPY_MAX_THREADS];
    int started[CK_MEMCOPY_MAX_THREADS] = {0};
    size_t step = bytes / (size_t)threads;
    for (int t = 0; t < threads; t++) {
        shares[t] = (share){arena, segs, n, step * (size_t)t,
                            t == threads - 1 ? bytes : step * (size_t)(t + 1)};
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
    return CK_OK;
}

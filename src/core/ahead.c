#include "ahead.h"

#include <fcntl.h>
#include <stdint.h>
#include <sys/mman.h>
#include <unistd.h>

/* Whether every page of [addr, addr + len) (addr page-aligned) of a mapping
 * is in the page cache; 0 when mincore cannot say. */
static int resident(const uint8_t *addr, size_t len, size_t page) {
    unsigned char vec[CK_AHEAD_STEP / 4096 + 2];
    size_t pages = (len + page - 1) / page;
    if (pages > sizeof vec || mincore((void *)addr, len, vec) != 0)
        return 0;
    for (size_t i = 0; i < pages; i++)
        if (!(vec[i] & 1))
            return 0;
    return 1;
}

/* Whether CK_AHEAD_SAMPLES pages spread evenly over the pieces' bytes are
 * all in the page cache: then the file is taken to be warm, and the thread
 * ends at once rather than asking mincore about every step (on a warm
 * 1.25 GB file that took ~8 ms beside the readers' copy, on two cores). */
static int sampled_resident(const ck_ahead *a, const uint8_t *map, uint64_t base, size_t page) {
    uint64_t seen = 0;
    size_t i = 0;
    for (unsigned k = 0; k < CK_AHEAD_SAMPLES; k++) {
        uint64_t want = a->total / CK_AHEAD_SAMPLES * k; /* the byte of the pieces to look at */
        while (i < a->n && seen + a->pieces[i].len <= want)
            seen += a->pieces[i++].len;
        if (i == a->n)
            break;
        uint64_t off = a->pieces[i].off + (want - seen);
        off -= off % page;
        if (!resident(map + (off - base), page, page))
            return 0;
    }
    return 1;
}

/* Asks for [off, off + len) (off on a page): from the file, or for the
 * pages of a caller's mapping of it. */
static void ask(const ck_ahead *a, uint64_t off, size_t len) {
    if (a->map != NULL)
        (void)madvise(a->map + off, len, MADV_WILLNEED);
    else
        (void)posix_fadvise(a->fd, (off_t)off, (off_t)len, POSIX_FADV_WILLNEED);
}

static void *ahead_run(void *arg) {
    ck_ahead *a = arg;
    long pg = sysconf(_SC_PAGESIZE);
    size_t page = pg > 0 && (size_t)pg <= CK_AHEAD_STEP ? (size_t)pg : 4096;
    uint64_t lo = UINT64_MAX, hi = 0;
    for (size_t i = 0; i < a->n; i++) {
        if (a->pieces[i].len == 0)
            continue;
        lo = a->pieces[i].off < lo ? a->pieces[i].off : lo;
        hi = a->pieces[i].off + a->pieces[i].len > hi ? a->pieces[i].off + a->pieces[i].len : hi;
    }
    if (lo >= hi)
        return NULL;
    /* mincore looks at map, which holds the file from offset base: the
     * caller's mapping (base 0), or one made here for mincore only, never
     * read, so that it faults nothing in */
    uint64_t base = 0;
    uint8_t *map = a->map, *own = MAP_FAILED;
    if (map == NULL) {
        base = lo - lo % page;
        if (hi - base <= SIZE_MAX)
            own = mmap(NULL, (size_t)(hi - base), PROT_READ, MAP_SHARED, a->fd, (off_t)base);
        map = own == MAP_FAILED ? NULL : own;
    }
    if (map != NULL && sampled_resident(a, map, base, page))
        a->warm = 1;
    for (size_t i = 0; i < a->n && !a->warm && !atomic_load(&a->stop); i++) {
        if (a->pieces[i].len == 0)
            continue;
        /* each piece in steps that start on a page (so that mincore can be asked) */
        uint64_t off = a->pieces[i].off - a->pieces[i].off % page;
        uint64_t end = a->pieces[i].off + a->pieces[i].len;
        while (off < end && !atomic_load(&a->stop)) {
            size_t len = end - off < CK_AHEAD_STEP ? (size_t)(end - off) : CK_AHEAD_STEP;
            if (map != NULL && resident(map + (off - base), len, page)) {
                a->cached++;
            } else {
                ask(a, off, len);
                a->asked++;
            }
            off += len;
        }
    }
    if (own != MAP_FAILED)
        munmap(own, (size_t)(hi - base));
    return NULL;
}

static int start(ck_ahead *a, int fd, uint8_t *map, const ck_piece *pieces, size_t n) {
    a->fd = fd;
    a->map = map;
    a->pieces = pieces;
    a->n = n;
    a->total = 0;
    for (size_t i = 0; i < n; i++)
        a->total += pieces[i].len;
    a->asked = a->cached = 0;
    a->warm = 0;
    a->started = 0;
    if (a->total < CK_PREADS_PARALLEL_MIN)
        return -1;
    atomic_init(&a->stop, 0);
    a->started = pthread_create(&a->thread, NULL, ahead_run, a) == 0;
    return a->started ? 0 : -1;
}

int ck_ahead_start(ck_ahead *a, int fd, const ck_piece *pieces, size_t n) {
    return start(a, fd, NULL, pieces, n);
}

int ck_ahead_start_map(ck_ahead *a, const uint8_t *map, const ck_piece *pieces, size_t n) {
    long page = sysconf(_SC_PAGESIZE);
    if (map == NULL || page <= 0 || (uintptr_t)map % (uintptr_t)page != 0) {
        a->started = 0;
        return -1;
    }
    return start(a, -1, (uint8_t *)map, pieces, n);
}

void ck_ahead_stop(ck_ahead *a) {
    if (!a->started)
        return;
    atomic_store(&a->stop, 1);
    pthread_join(a->thread, NULL);
    a->started = 0;
}

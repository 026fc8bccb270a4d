#include "preads.h"

#include <errno.h>
#include <pthread.h>
#include <unistd.h>

#include "ahead.h"

/* One pread() asks for at most this much (Linux caps a call at 0x7ffff000). */
#define CK_PREAD_MAX ((size_t)1 << 30)

typedef struct reader {
    int fd;
    const ck_piece *pieces;
    size_t n;
    size_t first_len; /* bytes of pieces[0] this reader skips (it starts part way in) */
    size_t last_len;  /* bytes of pieces[n-1] it reads (0: the whole piece) */
    int err;          /* errno, or -1: the file ended early */
} reader;

/* Reads len bytes at off into dst, retrying short reads and EINTR. */
static int pread_all(int fd, uint8_t *dst, size_t len, uint64_t off) {
    while (len > 0) {
        size_t ask = len < CK_PREAD_MAX ? len : CK_PREAD_MAX;
        ssize_t n = pread(fd, dst, ask, (off_t)off);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return errno != 0 ? errno : EIO;
        }
        if (n == 0)
            return -1;
        dst += n;
        off += (uint64_t)n;
        len -= (size_t)n;
    }
    return 0;
}

static void *reader_run(void *arg) {
    reader *r = arg;
    for (size_t i = 0; i < r->n && r->err == 0; i++) {
        ck_piece p = r->pieces[i];
        if (i == 0) {
            p.off += r->first_len;
            p.dst += r->first_len;
            p.len -= r->first_len;
        }
        if (i == r->n - 1 && r->last_len != 0)
            p.len = r->last_len - (i == 0 ? r->first_len : 0);
        r->err = pread_all(r->fd, p.dst, p.len, p.off);
    }
    return NULL;
}

/* The two readers of ck_pread_pieces: the pieces cut at half their bytes
 * (pieces[k] may be split), a helper thread reading the second run while
 * the caller reads the first. */
static int read_halves(int fd, const ck_piece *pieces, size_t n, uint64_t total) {
    reader a = {fd, pieces, n, 0, 0, 0};
    /* cut at total/2: pieces[k] is split at byte `at` */
    uint64_t half = total / 2, seen = 0;
    size_t k = 0;
    while (k < n && seen + pieces[k].len <= half)
        seen += pieces[k++].len;
    size_t at = (size_t)(half - seen);
    reader b;
    if (k == n) { /* cannot happen with total > 0; read on one thread */
        reader_run(&a);
        return a.err;
    }
    a.n = at == 0 ? k : k + 1;
    a.last_len = at; /* 0 when the cut falls on a boundary: pieces[k-1] whole */
    b = (reader){fd, pieces + k, n - k, at, 0, 0};
    if (a.n == 0) {
        reader_run(&b);
        return b.err;
    }
    pthread_t tid;
    if (pthread_create(&tid, NULL, reader_run, &b) != 0) {
        reader_run(&a);
        if (a.err == 0)
            reader_run(&b);
        return a.err != 0 ? a.err : b.err;
    }
    reader_run(&a);
    pthread_join(tid, NULL);
    return a.err != 0 ? a.err : b.err;
}

int ck_pread_pieces(int fd, const ck_piece *pieces, size_t n, int threads) {
    uint64_t total = 0;
    for (size_t i = 0; i < n; i++)
        total += pieces[i].len;
    if (threads < 2 || total < CK_PREADS_PARALLEL_MIN || n == 0) {
        reader one = {fd, pieces, n, 0, 0, 0};
        reader_run(&one);
        return one.err;
    }
    ck_ahead ahead;
    int asking = ck_ahead_start(&ahead, fd, pieces, n) == 0;
    int err = read_halves(fd, pieces, n, total);
    if (asking)
        ck_ahead_stop(&ahead);
    return err;
}

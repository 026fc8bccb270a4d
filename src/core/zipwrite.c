#include "zipwrite.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "crc.h"

/* _GNU_SOURCE comes from the build (setup.py, Makefile), once for every file */
#if defined(__linux__) && !defined(SYNC_FILE_RANGE_WRITE)
#error "sync_file_range undeclared: build with -D_GNU_SOURCE (as setup.py, Makefile do)"
#endif

#define SIG_LOCAL 0x04034b50u
#define SIG_DESCRIPTOR 0x08074b50u
#define SIG_CENTRAL 0x02014b50u
#define SIG_ZIP64_END 0x06064b50u
#define SIG_ZIP64_LOCATOR 0x07064b50u
#define SIG_END 0x06054b50u
#define FLAG_DESCRIPTOR 0x0008u
#define FLAG_UTF8 0x0800u
#define U32_LIMIT 0xFFFFFFFFu
#define DEFAULT_CHUNK ((size_t)2 << 20)
/* Records this big get their CRC from the worker thread. */
#define PARALLEL_CRC ((uint64_t)4 << 20)
#define WRITEBACK_STEP ((uint64_t)32 << 20)
/* One writev never carries more than this much record data, so that a
 * single call stays within what Linux transfers at once (0x7ffff000). */
#define MAX_IO ((size_t)1 << 30)

static void put16(unsigned char *p, uint32_t v) {
    p[0] = (unsigned char)v;
    p[1] = (unsigned char)(v >> 8);
}

static void put32(unsigned char *p, uint32_t v) {
    put16(p, v & 0xFFFFu);
    put16(p + 2, v >> 16);
}

static void put64(unsigned char *p, uint64_t v) {
    put32(p, (uint32_t)v);
    put32(p + 4, (uint32_t)(v >> 32));
}

static uint32_t get32(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* Room for n more pending bytes; returns where they go, or NULL. */
static unsigned char *pend_grow(ck_zipw *w, size_t n, ck_error *err) {
    if (w->pend_cap - w->pend_len < n) {
        size_t cap = w->pend_cap ? w->pend_cap : 4096;
        while (cap - w->pend_len < n) {
            if (cap > SIZE_MAX / 2) {
                ck_fail(err, CK_E_NOMEM, "zip writer: header buffer too large");
                return NULL;
            }
            cap *= 2;
        }
        unsigned char *p = realloc(w->pend, cap);
        if (p == NULL) {
            ck_fail(err, CK_E_NOMEM, "zip writer: out of memory");
            return NULL;
        }
        w->pend = p;
        w->pend_cap = cap;
    }
    unsigned char *at = w->pend + w->pend_len;
    w->pend_len += n;
    return at;
}

/* Writes everything queued with one call to the sink. */
static ck_status flush(ck_zipw *w, ck_error *err) {
    if (w->pend_len > w->pend_queued) {
        w->segs[w->nsegs++] = (ck_zipw_segment){NULL, w->pend_queued, w->pend_len - w->pend_queued};
        w->queued += w->pend_len - w->pend_queued;
        w->pend_queued = w->pend_len;
    }
    if (w->nsegs == 0)
        return CK_OK;
    struct iovec iov[CK_ZIPW_MAX_SEGMENTS];
    for (int i = 0; i < w->nsegs; i++) {
        const ck_zipw_segment *g = &w->segs[i];
        iov[i].iov_base = g->ptr ? (void *)g->ptr : w->pend + g->off;
        iov[i].iov_len = g->len;
    }
    ck_status st = w->write(w->write_ctx, iov, w->nsegs, err);
    if (st != CK_OK)
        return st;
    w->pos += w->queued;
    w->queued = 0;
    w->nsegs = 0;
    w->pend_len = w->pend_queued = 0;
    if (w->stop != NULL && w->stop(w->stop_ctx))
        return ck_fail(err, CK_E_INTERRUPTED, "interrupted");
    return CK_OK;
}

/* Queues data[0..len) (caller memory) after the pending header bytes;
 * writes the queue out when it is full or holds a chunk's worth. */
static ck_status queue(ck_zipw *w, const void *data, size_t len, ck_error *err) {
    if (w->pend_len > w->pend_queued) {
        w->segs[w->nsegs++] = (ck_zipw_segment){NULL, w->pend_queued, w->pend_len - w->pend_queued};
        w->queued += w->pend_len - w->pend_queued;
        w->pend_queued = w->pend_len;
    }
    if (len > 0) {
        w->segs[w->nsegs++] = (ck_zipw_segment){data, 0, len};
        w->queued += len;
    }
    /* room for the next call's header and data segments */
    if (w->nsegs > CK_ZIPW_MAX_SEGMENTS - 3 || w->queued >= w->chunk)
        return flush(w, err);
    return CK_OK;
}

ck_status ck_zipw_fd_sink(void *ctx, const struct iovec *iov, int n, ck_error *err) {
    ck_fd_sink *sink = ctx;
    struct iovec local[CK_ZIPW_MAX_SEGMENTS];
    if (n > CK_ZIPW_MAX_SEGMENTS)
        return ck_fail(err, CK_E_RANGE, "zip writer: too many buffers in one write");
    memcpy(local, iov, (size_t)n * sizeof *iov);
    struct iovec *v = local;
    while (n > 0) {
        ssize_t done = writev(sink->fd, v, n);
        if (done < 0) {
            if (errno == EINTR)
                continue;
            return ck_fail_errno(err, errno, "write failed");
        }
        if (done == 0)
            return ck_fail(err, CK_E_IO, "write made no progress");
        sink->written += (uint64_t)done;
        size_t left = (size_t)done;
        while (n > 0 && left >= v->iov_len) {
            left -= v->iov_len;
            v++;
            n--;
        }
        if (n > 0) {
            v->iov_base = (char *)v->iov_base + left;
            v->iov_len -= left;
        }
    }
#ifdef SYNC_FILE_RANGE_WRITE
    if (sink->writeback && sink->written - sink->kicked >= WRITEBACK_STEP) {
        /* Best effort: the final fsync reports any error. */
        sync_file_range(sink->fd, (off_t)sink->kicked, (off_t)(sink->written - sink->kicked),
                        SYNC_FILE_RANGE_WRITE);
        sink->kicked = sink->written;
    }
#endif
    return CK_OK;
}

ck_status ck_zipw_init(ck_zipw *w, const char *prefix, size_t prefix_len, uint64_t alignment,
                       ck_zipw_write_fn write, void *write_ctx, ck_error *err) {
    memset(w, 0, sizeof *w);
    ck_serial_id_init(&w->sid);
    if (prefix_len == 0 || prefix_len > 0xFFF0)
        return ck_fail(err, CK_E_RANGE, "invalid archive folder name (empty or too long)");
    if (alignment == 0 || alignment > 32768 || (alignment & (alignment - 1)) != 0)
        return ck_fail(err, CK_E_RANGE, "alignment %llu is not a power of two up to 32768",
                       (unsigned long long)alignment);
    w->prefix = malloc(prefix_len + 2);
    if (w->prefix == NULL)
        return ck_fail(err, CK_E_NOMEM, "zip writer: out of memory");
    memcpy(w->prefix, prefix, prefix_len);
    w->prefix[prefix_len] = '/';
    w->prefix[prefix_len + 1] = '\0';
    w->prefix_len = prefix_len + 1;
    w->alignment = alignment;
    w->zip64_threshold = U32_LIMIT;
    w->compute_crc = 1;
    w->chunk = DEFAULT_CHUNK;
    w->write = write;
    w->write_ctx = write_ctx;
    return CK_OK;
}

void ck_zipw_free(ck_zipw *w) {
    for (size_t i = 0; i < w->count; i++)
        free(w->entries[i].name);
    free(w->entries);
    free(w->pend);
    free(w->prefix);
    ck_serial_id_free(&w->sid);
    ck_crc_worker_stop(w->crc_worker);
    memset(w, 0, sizeof *w);
    ck_serial_id_init(&w->sid);
}

/* The zip64 extra field (id 1) for an entry, into out; returns its length
 * (0 when the entry needs none). The local header carries the compressed
 * size as 0, as miniz writes it before the data. */
static size_t zip64_extra(const ck_zipw *w, uint64_t size, uint64_t comp, uint64_t offset,
                          unsigned char out[28]) {
    int big_size = size >= w->zip64_threshold, big_offset = offset >= w->zip64_threshold;
    if (!big_size && !big_offset)
        return 0;
    size_t n = 4;
    if (big_size) {
        put64(out + n, size);
        put64(out + n + 8, comp);
        n += 16;
    }
    if (big_offset) {
        put64(out + n, offset);
        n += 8;
    }
    put16(out, 1);
    put16(out + 2, (uint32_t)(n - 4));
    return n;
}

/* Writes data in chunks. The CRC of a record of at least PARALLEL_CRC
 * bytes runs on the worker thread meanwhile; smaller ones are CRC'd inline,
 * chunk by chunk, just before each chunk is queued. */
static ck_status write_data(ck_zipw *w, const unsigned char *data, uint64_t size, uint32_t *crc,
                            ck_error *err) {
    uint32_t c = 0;
    int parallel = 0;
    if (w->compute_crc && size >= PARALLEL_CRC && !w->crc_inline) {
        if (w->crc_worker == NULL) {
            ck_error ignored;
            if (ck_crc_worker_start(&w->crc_worker, &ignored) != CK_OK)
                w->crc_inline = 1; /* no thread: the CRC runs inline */
        }
        if (w->crc_worker != NULL) {
            ck_crc_worker_submit(w->crc_worker, data, (size_t)size);
            parallel = 1;
        }
    }
    size_t step = w->compute_crc && !parallel ? w->chunk : MAX_IO;
    ck_status st = CK_OK;
    while (size > 0 && st == CK_OK) {
        size_t n = size < step ? (size_t)size : step;
        if (w->compute_crc && !parallel)
            c = ck_crc32(c, data, n);
        st = queue(w, data, n, err);
        data += n;
        size -= n;
    }
    if (parallel) /* also on failure: the worker reads data until it is done */
        c = ck_crc_worker_wait(w->crc_worker);
    *crc = c;
    return st;
}

ck_status ck_zipw_add(ck_zipw *w, const char *name, const void *data, uint64_t size,
                      ck_error *err) {
    size_t rel_len = strlen(name);
    if (rel_len > 0xFFFF - w->prefix_len)
        return ck_fail(err, CK_E_RANGE, "record name too long: %s", name);
    if (w->count == w->cap) {
        size_t cap = w->cap ? w->cap * 2 : 16;
        ck_zipw_entry *e = realloc(w->entries, cap * sizeof *e);
        if (e == NULL)
            return ck_fail(err, CK_E_NOMEM, "zip writer: out of memory");
        w->entries = e;
        w->cap = cap;
    }
    ck_status st = ck_serial_id_add_name(&w->sid, name, rel_len, err);
    if (st != CK_OK)
        return st;
    size_t name_len = w->prefix_len + rel_len;
    char *full = malloc(name_len + 1);
    if (full == NULL)
        return ck_fail(err, CK_E_NOMEM, "zip writer: out of memory");
    memcpy(full, w->prefix, w->prefix_len);
    memcpy(full + w->prefix_len, name, rel_len + 1);

    uint64_t offset = w->pos + w->queued + (w->pend_len - w->pend_queued);
    unsigned char z64[28];
    size_t z64_len = zip64_extra(w, size, 0, offset, z64);
    uint64_t start = offset + 30 + name_len + 4 + z64_len;
    size_t pad = (size_t)((w->alignment - start % w->alignment) % w->alignment);
    uint32_t flags = FLAG_UTF8 | (size > 0 ? FLAG_DESCRIPTOR : 0);

    unsigned char *h = pend_grow(w, 30 + name_len + z64_len + 4 + pad, err);
    if (h == NULL) {
        free(full);
        return err->status;
    }
    memset(h, 0, 30);
    put32(h, SIG_LOCAL);
    put16(h + 6, flags);
    put16(h + 26, (uint32_t)name_len);
    put16(h + 28, (uint32_t)(z64_len + 4 + pad));
    memcpy(h + 30, full, name_len);
    memcpy(h + 30 + name_len, z64, z64_len);
    unsigned char *fb = h + 30 + name_len + z64_len;
    fb[0] = 'F';
    fb[1] = 'B';
    put16(fb + 2, (uint32_t)pad);
    memset(fb + 4, 'Z', pad);

    w->entries[w->count++] = (ck_zipw_entry){full, (uint16_t)name_len, 0, size, offset};
    uint32_t crc = 0;
    st = write_data(w, data, size, &crc, err);
    if (st != CK_OK)
        return st;
    w->entries[w->count - 1].crc = crc;
    if (size == 0)
        return CK_OK;

    /* torch folds each descriptor's CRC into the id as it passes through its
     * write callback, and takes a data write that happens to start with the
     * descriptor signature for one too. */
    const unsigned char *d = data;
    if (size >= 8 && get32(d) == SIG_DESCRIPTOR)
        ck_serial_id_add_crc(&w->sid, get32(d + 4));
    ck_serial_id_add_crc(&w->sid, crc);

    size_t desc_len = z64_len ? 24 : 16;
    unsigned char *desc = pend_grow(w, desc_len, err);
    if (desc == NULL)
        return err->status;
    put32(desc, SIG_DESCRIPTOR);
    put32(desc + 4, crc);
    if (z64_len) {
        put64(desc + 8, size);
        put64(desc + 16, size);
    } else {
        put32(desc + 8, (uint32_t)size);
        put32(desc + 12, (uint32_t)size);
    }
    return CK_OK;
}

static ck_status add_central(ck_zipw *w, const ck_zipw_entry *e, ck_error *err) {
    unsigned char z64[28];
    size_t z64_len = zip64_extra(w, e->size, e->size, e->offset, z64);
    unsigned char *c = pend_grow(w, 46 + e->name_len + z64_len, err);
    if (c == NULL)
        return err->status;
    int big_size = e->size >= w->zip64_threshold, big_offset = e->offset >= w->zip64_threshold;
    memset(c, 0, 46);
    put32(c, SIG_CENTRAL);
    put16(c + 8, FLAG_UTF8 | (e->size > 0 ? FLAG_DESCRIPTOR : 0));
    put32(c + 16, e->crc);
    put32(c + 20, big_size ? U32_LIMIT : (uint32_t)e->size);
    put32(c + 24, big_size ? U32_LIMIT : (uint32_t)e->size);
    put16(c + 28, e->name_len);
    put16(c + 30, (uint32_t)z64_len);
    put32(c + 42, big_offset ? U32_LIMIT : (uint32_t)e->offset);
    memcpy(c + 46, e->name, e->name_len);
    memcpy(c + 46 + e->name_len, z64, z64_len);
    return CK_OK;
}

ck_status ck_zipw_finish(ck_zipw *w, ck_error *err) {
    static const char version[] = "3\n";
    ck_status st = ck_zipw_add(w, "version", version, 2, err);
    if (st != CK_OK)
        return st;
    char sid[CK_SERIAL_ID_LEN];
    ck_serial_id_format(&w->sid, sid);
    st = ck_zipw_add(w, ".data/serialization_id", sid, CK_SERIAL_ID_LEN, err);
    if (st != CK_OK)
        return st;

    st = flush(w, err);
    if (st != CK_OK)
        return st;
    uint64_t cd_offset = w->pos;
    size_t cd_start = w->pend_len;
    for (size_t i = 0; i < w->count; i++)
        if ((st = add_central(w, &w->entries[i], err)) != CK_OK)
            return st;
    uint64_t cd_size = w->pend_len - cd_start;
    uint64_t end64 = cd_offset + cd_size;
    uint64_t n = w->count;

    unsigned char *e = pend_grow(w, 56 + 20 + 22, err);
    if (e == NULL)
        return err->status;
    memset(e, 0, 56 + 20 + 22);
    put32(e, SIG_ZIP64_END);
    put64(e + 4, 44);
    put16(e + 12, 0x031E);
    put16(e + 14, 0x002D);
    put64(e + 24, n);
    put64(e + 32, n);
    put64(e + 40, cd_size);
    put64(e + 48, cd_offset);
    unsigned char *loc = e + 56;
    put32(loc, SIG_ZIP64_LOCATOR);
    put64(loc + 8, end64);
    put32(loc + 16, 1);
    unsigned char *end = loc + 20;
    put32(end, SIG_END);
    put16(end + 8, n > 0xFFFF ? 0xFFFF : (uint32_t)n);
    put16(end + 10, n > 0xFFFF ? 0xFFFF : (uint32_t)n);
    put32(end + 12, cd_size >= w->zip64_threshold ? U32_LIMIT : (uint32_t)cd_size);
    put32(end + 16, cd_offset >= w->zip64_threshold ? U32_LIMIT : (uint32_t)cd_offset);
    return flush(w, err);
}

/* Tests of the plain-C core (src/core): status, region, crc, zipread, memcopy,
 * the legacy storage walk.
 *
 * No framework: CHECK counts passes and failures and prints each failure
 * with its line; the program exits 1 when any check failed. Zip archives
 * are built in memory by a small writer below and then damaged byte by
 * byte at offsets the writer records, so that every rejection in
 * zipread.h is reached by exactly the fault it names.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include "core/ahead.h"
#include "core/crc.h"
#include "core/legacy.h"
#include "core/memcopy.h"
#include "core/preads.h"
#include "core/region.h"
#include "core/status.h"
#include "core/zipread.h"

#include "check.h"

/* CHECK that a status is the expected one, printing the error message when not. */
#define CHECK_ST(got, want, err)                                                                   \
    do {                                                                                           \
        ck_status got_ = (got);                                                                    \
        if (got_ == (want)) {                                                                      \
            n_pass++;                                                                              \
        } else {                                                                                   \
            n_fail++;                                                                              \
            fprintf(stderr, "%s:%d: status %s, expected %s (%s)\n", __FILE__, __LINE__,            \
                    ck_status_name(got_), ck_status_name(want), (err)->msg);                       \
        }                                                                                          \
    } while (0)

/* ---- little-endian writes -------------------------------------------------- */

static void put16(uint8_t *p, uint16_t v) {
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
}

static void put32(uint8_t *p, uint32_t v) {
    put16(p, (uint16_t)v);
    put16(p + 2, (uint16_t)(v >> 16));
}

static void put64(uint8_t *p, uint64_t v) {
    put32(p, (uint32_t)v);
    put32(p + 4, (uint32_t)(v >> 32));
}

/* ---- a minimal zip writer ------------------------------------------------- */

#define MAX_ENTRIES 64

typedef struct zent {
    const char *name;
    size_t name_len; /* 0: strlen(name) */
    const uint8_t *data;
    size_t len;
    int deflate;
} zent;

enum { Z64_NONE = 0, Z64_END = 1, Z64_EXTRA = 2 };

typedef struct zbuf {
    uint8_t *buf;
    size_t len, cap;
    size_t n;
    size_t local_off[MAX_ENTRIES];
    size_t central_off[MAX_ENTRIES];
    size_t cd_off, cd_size;
    size_t z64_off, loc_off; /* zip64 end record and locator, when written */
    size_t eocd_off;
} zbuf;

static uint8_t *grow(zbuf *z, size_t more) {
    if (z->len + more > z->cap) {
        size_t cap = z->cap ? z->cap : 1024;
        while (cap < z->len + more)
            cap *= 2;
        uint8_t *p = realloc(z->buf, cap);
        if (p == NULL) {
            fprintf(stderr, "out of memory\n");
            exit(2);
        }
        z->buf = p;
        z->cap = cap;
    }
    uint8_t *at = z->buf + z->len;
    memset(at, 0, more);
    z->len += more;
    return at;
}

static void append(zbuf *z, const void *data, size_t len) {
    if (len > 0)
        memcpy(grow(z, len), data, len);
}

/* Raw deflate of data; returns a malloc'ed buffer and its size in *out_len. */
static uint8_t *deflate_raw(const uint8_t *data, size_t len, size_t *out_len) {
    z_stream s;
    memset(&s, 0, sizeof s);
    if (deflateInit2(&s, 6, Z_DEFLATED, -15, 8, Z_DEFAULT_STRATEGY) != Z_OK)
        exit(2);
    size_t cap = deflateBound(&s, (uLong)len) + 16;
    uint8_t *out = malloc(cap);
    s.next_in = (Bytef *)data;
    s.avail_in = (uInt)len;
    s.next_out = out;
    s.avail_out = (uInt)cap;
    if (out == NULL || deflate(&s, Z_FINISH) != Z_STREAM_END)
        exit(2);
    *out_len = cap - s.avail_out;
    deflateEnd(&s);
    return out;
}

/* Writes the entries, the central directory, optionally the zip64 end
 * record and locator (Z64_END) and zip64 extra fields with saturated
 * 32-bit fields in every central entry (Z64_EXTRA, implies Z64_END). */
static void zbuild(zbuf *z, const zent *ents, size_t n, int z64) {
    memset(z, 0, sizeof *z);
    z->n = n;
    uint8_t *comp[MAX_ENTRIES];
    size_t comp_len[MAX_ENTRIES];
    uint32_t crcs[MAX_ENTRIES];
    for (size_t i = 0; i < n; i++) {
        const zent *e = &ents[i];
        size_t nlen = e->name_len ? e->name_len : strlen(e->name);
        crcs[i] = (uint32_t)crc32(0, e->data, (uInt)e->len);
        if (e->deflate) {
            comp[i] = deflate_raw(e->data, e->len, &comp_len[i]);
        } else {
            comp[i] = NULL;
            comp_len[i] = e->len;
        }
        z->local_off[i] = z->len;
        uint8_t *h = grow(z, 30);
        put32(h, 0x04034b50u);
        put16(h + 4, 20);
        put16(h + 8, e->deflate ? 8 : 0);
        put32(h + 14, crcs[i]);
        put32(h + 18, (uint32_t)comp_len[i]);
        put32(h + 22, (uint32_t)e->len);
        put16(h + 26, (uint16_t)nlen);
        append(z, e->name, nlen);
        append(z, e->deflate ? comp[i] : e->data, comp_len[i]);
    }
    z->cd_off = z->len;
    for (size_t i = 0; i < n; i++) {
        const zent *e = &ents[i];
        size_t nlen = e->name_len ? e->name_len : strlen(e->name);
        z->central_off[i] = z->len;
        uint8_t *c = grow(z, 46);
        put32(c, 0x02014b50u);
        put16(c + 4, 45);
        put16(c + 6, 45);
        put16(c + 10, e->deflate ? 8 : 0);
        put32(c + 16, crcs[i]);
        put16(c + 28, (uint16_t)nlen);
        if (z64 == Z64_EXTRA) {
            put32(c + 20, 0xFFFFFFFFu);
            put32(c + 24, 0xFFFFFFFFu);
            put32(c + 42, 0xFFFFFFFFu);
            put16(c + 30, 28);
        } else {
            put32(c + 20, (uint32_t)comp_len[i]);
            put32(c + 24, (uint32_t)e->len);
            put32(c + 42, (uint32_t)z->local_off[i]);
        }
        append(z, e->name, nlen);
        if (z64 == Z64_EXTRA) {
            uint8_t *x = grow(z, 28);
            put16(x, 0x0001);
            put16(x + 2, 24);
            put64(x + 4, e->len);
            put64(x + 12, comp_len[i]);
            put64(x + 20, z->local_off[i]);
        }
        free(comp[i]);
    }
    z->cd_size = z->len - z->cd_off;
    z->z64_off = z->loc_off = 0;
    if (z64 != Z64_NONE) {
        z->z64_off = z->len;
        uint8_t *r = grow(z, 56);
        put32(r, 0x06064b50u);
        put64(r + 4, 44);
        put16(r + 12, 45);
        put16(r + 14, 45);
        put64(r + 24, n);
        put64(r + 32, n);
        put64(r + 40, z->cd_size);
        put64(r + 48, z->cd_off);
        z->loc_off = z->len;
        uint8_t *l = grow(z, 20);
        put32(l, 0x07064b50u);
        put64(l + 8, z->z64_off);
        put32(l + 16, 1);
    }
    z->eocd_off = z->len;
    uint8_t *e = grow(z, 22);
    put32(e, 0x06054b50u);
    put16(e + 8, z64 ? 0xFFFF : (uint16_t)n);
    put16(e + 10, z64 ? 0xFFFF : (uint16_t)n);
    put32(e + 12, z64 ? 0xFFFFFFFFu : (uint32_t)z->cd_size);
    put32(e + 16, z64 ? 0xFFFFFFFFu : (uint32_t)z->cd_off);
}

static void zfree(zbuf *z) {
    free(z->buf);
    memset(z, 0, sizeof *z);
}

/* A file descriptor on a file holding bytes buf[0 .. len) (a memfd), or -1. */
static int file_of(const uint8_t *buf, size_t len) {
    int fd = memfd_create("zip", MFD_CLOEXEC);
    if (fd >= 0 && len > 0 && write(fd, buf, len) != (ssize_t)len) {
        close(fd);
        fd = -1;
    }
    if (fd < 0)
        perror("memfd");
    return fd;
}

/* ck_zip_open on buf, and ck_zip_open_file on a file holding the same
 * bytes: the two readers must agree on the status, the message and every
 * record. Leaves the buffer reader's result in *zip and err. */
static ck_status open_both(ck_zip *zip, const uint8_t *buf, size_t len, ck_error *err) {
    ck_status rc = ck_zip_open(zip, buf, len, err);
    int fd = file_of(buf, len);
    if (fd < 0) {
        n_fail++;
        return rc;
    }
    ck_zip fz;
    ck_error ferr;
    ck_error_clear(&ferr);
    ck_status frc = ck_zip_open_file(&fz, buf, len, fd, 0, &ferr);
    int same = frc == rc && (rc == CK_OK || strcmp(ferr.msg, err->msg) == 0);
    if (same && rc == CK_OK) {
        same = fz.n_entries == zip->n_entries && fz.prefix_len == zip->prefix_len &&
               fz.zip64 == zip->zip64 && fz.cd_offset == zip->cd_offset;
        for (size_t i = 0; same && i < fz.n_entries; i++) {
            const ck_zip_entry *a = &zip->entries[i], *b = &fz.entries[i];
            same = a->name_len == b->name_len && memcmp(a->name, b->name, a->name_len) == 0 &&
                   a->data_offset == b->data_offset && a->size == b->size &&
                   a->comp_size == b->comp_size && a->crc32 == b->crc32 && a->method == b->method;
            /* names point into the central directory's copy, not the buffer */
            same = same && (b->name < (const char *)buf || b->name >= (const char *)buf + len);
        }
    }
    if (same) {
        n_pass++;
    } else {
        n_fail++;
        fprintf(stderr, "open_both: buffer reader gave %s (%s), pread reader %s (%s)\n",
                ck_status_name(rc), err->msg, ck_status_name(frc), ferr.msg);
    }
    ck_zip_close(&fz);
    close(fd);
    return rc;
}

/* Opens z and expects status want; the message must hold needle (if not NULL). */
static ck_status open_expect(const zbuf *z, ck_status want, const char *needle, int line) {
    ck_zip zip;
    ck_error err;
    ck_error_clear(&err);
    ck_status rc = open_both(&zip, z->buf, z->len, &err);
    if (rc != want) {
        n_fail++;
        fprintf(stderr, "test_core.c:%d: ck_zip_open gave %s (%s), expected %s\n", line,
                ck_status_name(rc), err.msg, ck_status_name(want));
    } else if (needle != NULL && strstr(err.msg, needle) == NULL) {
        n_fail++;
        fprintf(stderr, "test_core.c:%d: message '%s' lacks '%s'\n", line, err.msg, needle);
    } else {
        n_pass++;
    }
    if (rc != CK_OK) {
        /* a failed open leaves the zip empty and closable */
        CHECK(zip.entries == NULL && zip.n_entries == 0);
        CHECK(err.msg[0] != 0);
    }
    ck_zip_close(&zip);
    return rc;
}

#define EXPECT_OPEN(z, want, needle) open_expect((z), (want), (needle), __LINE__)

/* Sets the little-endian field of `width` bytes at p (inside z) to `bad`,
 * expects the open to give want and needle, then puts the field back. */
static void lie_expect(const zbuf *z, uint8_t *p, int width, uint64_t bad, ck_status want,
                       const char *needle, int line) {
    uint64_t good = 0;
    for (int i = 0; i < width; i++)
        good |= (uint64_t)p[i] << (8 * i);
    for (int i = 0; i < width; i++)
        p[i] = (uint8_t)(bad >> (8 * i));
    open_expect(z, want, needle, line);
    for (int i = 0; i < width; i++)
        p[i] = (uint8_t)(good >> (8 * i));
}

#define EXPECT_LIE(z, p, width, bad, want, needle)                                                 \
    lie_expect((z), (p), (width), (bad), (want), (needle), __LINE__)

/* ---- status ------------------------------------------------------------------ */

static void test_status(void) {
    ck_error err;
    ck_error_clear(&err);
    CHECK(err.status == CK_OK && err.os_errno == 0 && err.msg[0] == 0);
    ck_error_clear(NULL);

    CHECK(ck_fail(&err, CK_E_RANGE, "entry %d at %s", 3, "x") == CK_E_RANGE);
    CHECK(err.status == CK_E_RANGE);
    CHECK(strcmp(err.msg, "entry 3 at x") == 0);
    CHECK(err.os_errno == 0);

    /* a NULL error record is allowed and the status still comes back */
    CHECK(ck_fail(NULL, CK_E_LIMIT, "ignored") == CK_E_LIMIT);

    /* long messages are cut to the record's size and stay terminated */
    char big[2000];
    memset(big, 'a', sizeof big - 1);
    big[sizeof big - 1] = 0;
    ck_fail(&err, CK_E_FORMAT, "%s", big);
    CHECK(strlen(err.msg) == CK_ERROR_MSG_SIZE - 1);

    /* an empty format gives a message naming the status, never empty */
    ck_fail(&err, CK_E_CRC, "%s", "");
    CHECK(strcmp(err.msg, "crc error") == 0);

    CHECK(ck_fail_errno(&err, ENOENT, "cannot open %s", "f") == CK_E_IO);
    CHECK(err.status == CK_E_IO && err.os_errno == ENOENT);
    char want[256];
    snprintf(want, sizeof want, "cannot open f: %s", strerror(ENOENT));
    CHECK(strcmp(err.msg, want) == 0);

    /* a message that fills the record gets no errno suffix and no overflow */
    ck_fail_errno(&err, EACCES, "%s", big);
    CHECK(strlen(err.msg) == CK_ERROR_MSG_SIZE - 1 && err.os_errno == EACCES);

    CHECK(strcmp(ck_status_name(CK_OK), "ok") == 0);
    CHECK(strcmp(ck_status_name(CK_E_TRUNCATED), "truncated") == 0);
    CHECK(strcmp(ck_status_name(CK_E_INTERRUPTED), "interrupted") == 0);
    CHECK(strcmp(ck_status_name(CK_STATUS_COUNT), "unknown") == 0);
    CHECK(strcmp(ck_status_name((ck_status)-1), "unknown") == 0);
    for (int s = 0; s < CK_STATUS_COUNT; s++)
        CHECK(ck_status_name((ck_status)s) != NULL && ck_status_name((ck_status)s)[0] != 0);
}

/* ---- region ------------------------------------------------------------------ */

static char tmpdir[] = "/tmp/ckptio-ctest-XXXXXX";

static void write_file(const char *path, const void *data, size_t len) {
    FILE *f = fopen(path, "wb");
    if (f == NULL || (len > 0 && fwrite(data, 1, len, f) != len) || fclose(f) != 0) {
        perror(path);
        exit(2);
    }
}

static void test_region(void) {
    char path[256], empty[256], missing[256];
    snprintf(path, sizeof path, "%s/data.bin", tmpdir);
    snprintf(empty, sizeof empty, "%s/empty.bin", tmpdir);
    snprintf(missing, sizeof missing, "%s/missing.bin", tmpdir);
    uint8_t data[10000];
    for (size_t i = 0; i < sizeof data; i++)
        data[i] = (uint8_t)(i * 7 + 3);
    write_file(path, data, sizeof data);
    write_file(empty, NULL, 0);

    ck_region r;
    ck_error err;
    ck_error_clear(&err);

    CHECK_ST(ck_region_map_file(path, &r, &err), CK_OK, &err);
    CHECK(r.kind == CK_REGION_MMAP && r.len == sizeof data);
    CHECK(r.data != NULL && memcmp(r.data, data, sizeof data) == 0);
    /* the mapped file stays open for pread until closed */
    uint8_t head[16];
    CHECK(r.has_fd && pread(r.fd, head, sizeof head, 0) == (ssize_t)sizeof head);
    CHECK(memcmp(head, data, sizeof head) == 0);
    int mapped_fd = r.fd;
    ck_region_close_fd(&r);
    CHECK(!r.has_fd && fcntl(mapped_fd, F_GETFD) == -1 && errno == EBADF);
    ck_region_close_fd(&r);                        /* twice is safe */
    CHECK(r.data != NULL && r.data[5] == data[5]); /* the mapping outlives the fd */
    /* the mapping is private: a write changes the copy, never the file */
    r.data[0] ^= 0xFF;
    ck_region_release(&r);
    CHECK(r.kind == CK_REGION_NONE && r.data == NULL && r.len == 0);
    ck_region_release(&r); /* twice is safe */

    CHECK_ST(ck_region_read_file(path, &r, &err), CK_OK, &err);
    CHECK(r.kind == CK_REGION_HEAP && r.len == sizeof data);
    CHECK(((uintptr_t)r.data & 63) == 0);
    CHECK(memcmp(r.data, data, sizeof data) == 0); /* the mapped write did not reach the file */
    ck_region_release(&r);

    CHECK_ST(ck_region_map_file(empty, &r, &err), CK_OK, &err);
    CHECK(r.data == NULL && r.len == 0);
    ck_region_release(&r);
    CHECK_ST(ck_region_read_file(empty, &r, &err), CK_OK, &err);
    CHECK(r.data == NULL && r.len == 0);
    ck_region_release(&r);

    CHECK_ST(ck_region_map_file(missing, &r, &err), CK_E_IO, &err);
    CHECK(err.os_errno == ENOENT && strstr(err.msg, "cannot open") != NULL);
    CHECK(r.data == NULL && r.len == 0);
    ck_region_release(&r);
    CHECK_ST(ck_region_read_file(missing, &r, &err), CK_E_IO, &err);
    CHECK(err.os_errno == ENOENT);

    CHECK_ST(ck_region_map_file(tmpdir, &r, &err), CK_E_IO, &err);
    CHECK(err.os_errno == EISDIR && strstr(err.msg, "not a regular file") != NULL);
    CHECK_ST(ck_region_read_file(tmpdir, &r, &err), CK_E_IO, &err);
    CHECK(err.os_errno == EISDIR);

    CHECK_ST(ck_region_alloc(1000, &r, &err), CK_OK, &err);
    CHECK(r.kind == CK_REGION_HEAP && r.len == 1000 && ((uintptr_t)r.data & 63) == 0);
    memset(r.data, 1, r.len);
    ck_region_release(&r);
    CHECK_ST(ck_region_alloc(0, &r, &err), CK_OK, &err);
    CHECK(r.data == NULL && r.len == 0);
    ck_region_release(&r);
    CHECK_ST(ck_region_alloc(SIZE_MAX - 4096, &r, &err), CK_E_NOMEM, &err);
    CHECK(r.data == NULL && r.len == 0);

    unlink(path);
    unlink(empty);
}

/* ---- crc ----------------------------------------------------------------------- */

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;

static uint32_t rnd(void) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (uint32_t)(rng_state >> 16);
}

static void test_crc(void) {
    CHECK(ck_crc32(0, "123456789", 9) == 0xCBF43926u);
    CHECK((uint32_t)crc32(0, (const Bytef *)"123456789", 9) == 0xCBF43926u);
    CHECK(ck_crc32(0, "", 0) == 0);
    CHECK(ck_crc32(0, NULL, 0) == 0);
    CHECK(ck_crc32(0, "The quick brown fox jumps over the lazy dog", 43) == 0x414FA339u);
    uint8_t zeros[32] = {0};
    CHECK(ck_crc32(0, zeros, 32) == 0x190A55ADu);

    size_t cap = 1 << 20;
    uint8_t *buf = malloc(cap);
    if (buf == NULL)
        exit(2);
    for (size_t i = 0; i < cap; i++)
        buf[i] = (uint8_t)rnd();
    int agree = 1, chunked = 1;
    for (int t = 0; t < 200; t++) {
        size_t len = t < 100 ? (size_t)t : rnd() % cap;
        size_t off = rnd() % 64;
        if (off + len > cap)
            len = cap - off;
        uint32_t a = ck_crc32(0, buf + off, len);
        uint32_t b = (uint32_t)crc32_z(0, buf + off, len);
        agree &= a == b;
        size_t cut = len ? rnd() % len : 0;
        uint32_t c = ck_crc32(ck_crc32(0, buf + off, cut), buf + off + cut, len - cut);
        chunked &= c == a;
    }
    CHECK(agree);
    CHECK(chunked);
    free(buf);
}

/* ---- zipread: good archives ------------------------------------------------------- */

static const uint8_t PKL[] = "\x80\x02}q\x00.";
static const uint8_t VERSION[] = "3\n";

static uint8_t tensor_bytes[4096];

/* three entries as torch.save writes them: arch/data.pkl, arch/data/0, arch/version */
static void standard(zbuf *z, int z64, int deflate_tensor) {
    zent ents[3] = {
        {"arch/data.pkl", 0, PKL, sizeof PKL - 1, 0},
        {"arch/data/0", 0, tensor_bytes, sizeof tensor_bytes, deflate_tensor},
        {"arch/version", 0, VERSION, 2, 0},
    };
    zbuild(z, ents, 3, z64);
}

static void check_standard(const zbuf *z, int z64) {
    ck_zip zip;
    ck_error err;
    ck_error_clear(&err);
    CHECK_ST(open_both(&zip, z->buf, z->len, &err), CK_OK, &err);
    if (zip.entries == NULL)
        return;
    CHECK(zip.n_entries == 3);
    CHECK(zip.prefix_len == 4);
    CHECK(zip.zip64 == z64);
    CHECK(zip.cd_offset == z->cd_off && zip.cd_size == z->cd_size);
    CHECK(ck_zip_find(&zip, "data.pkl", 8) == 0);
    CHECK(ck_zip_find(&zip, "data/0", 6) == 1);
    CHECK(ck_zip_find(&zip, "version", 7) == 2);
    CHECK(ck_zip_find(&zip, "data/1", 6) == -1);
    CHECK(ck_zip_find(&zip, "arch/data.pkl", 13) == -1);
    CHECK(ck_zip_find(&zip, "", 0) == -1);
    const ck_zip_entry *e = &zip.entries[1];
    CHECK(e->name_len == 11 && memcmp(e->name, "arch/data/0", 11) == 0);
    CHECK(e->size == sizeof tensor_bytes);
    CHECK(e->header_offset == z->local_off[1]);
    CHECK(e->data_offset == z->local_off[1] + 30 + 11);
    CHECK(e->crc32 == ck_crc32(0, tensor_bytes, sizeof tensor_bytes));
    if (e->method == CK_ZIP_METHOD_STORED) {
        const uint8_t *d = ck_zip_stored_data(&zip, 1);
        CHECK(d != NULL && memcmp(d, tensor_bytes, sizeof tensor_bytes) == 0);
        CHECK(e->comp_size == e->size);
    } else {
        CHECK(ck_zip_stored_data(&zip, 1) == NULL);
    }
    CHECK(ck_zip_stored_data(&zip, 3) == NULL); /* out of range index */
    for (size_t i = 0; i < 3; i++)
        CHECK_ST(ck_zip_check_crc(&zip, i, 1, &err), CK_OK, &err);
    ck_zip_close(&zip);
    CHECK(zip.entries == NULL && zip.index_ == NULL);
    ck_zip_close(&zip); /* twice is safe */
}

static void test_zip_good(void) {
    zbuf z;
    /* each zip64 form with a stored tensor, and a deflated one */
    static const struct {
        int z64, deflate;
    } forms[] = {{Z64_NONE, 0}, {Z64_END, 0}, {Z64_EXTRA, 0}, {Z64_NONE, 1}};
    for (size_t i = 0; i < sizeof forms / sizeof forms[0]; i++) {
        standard(&z, forms[i].z64, forms[i].deflate);
        check_standard(&z, forms[i].z64 != Z64_NONE);
        zfree(&z);
    }

    /* an archive comment after the end record is allowed */
    standard(&z, Z64_NONE, 0);
    put16(z.buf + z.eocd_off + 20, 5);
    append(&z, "hello", 5);
    check_standard(&z, 0);
    zfree(&z);

    /* many entries exercise the name index beyond its first size */
    static char names[40][24];
    zent many[MAX_ENTRIES];
    for (int i = 0; i < MAX_ENTRIES; i++) {
        snprintf(names[i], sizeof names[i], "top/data/%d", i);
        many[i] = (zent){names[i], 0, VERSION, 2, 0};
    }
    zbuild(&z, many, MAX_ENTRIES, Z64_NONE);
    ck_zip zip;
    ck_error err;
    CHECK_ST(ck_zip_open(&zip, z.buf, z.len, &err), CK_OK, &err);
    for (int i = 0; i < MAX_ENTRIES; i++) {
        char rel[24];
        int n = snprintf(rel, sizeof rel, "data/%d", i);
        CHECK(ck_zip_find(&zip, rel, (size_t)n) == i);
    }
    ck_zip_close(&zip);
    zfree(&z);

    /* ".." inside a longer component is an ordinary name */
    zent dots[2] = {{"a/..x", 0, VERSION, 2, 0}, {"a/x..", 0, VERSION, 2, 0}};
    zbuild(&z, dots, 2, Z64_NONE);
    EXPECT_OPEN(&z, CK_OK, NULL);
    zfree(&z);
}

/* The name index is a sorted array searched by halves: names that share
 * prefixes, differ only in length or in high bytes are all found at their
 * own entry, absent names (between, before and after the present ones) are
 * not, and a duplicate is found however far apart the two are. */
static void test_zip_index(void) {
    static const char *const rel[] = {"b",    "a",   "ab",       "a/b",    "aa",      "\xff",
                                      "\x01", "a b", "data",     "data/1", "data/10", "data/9",
                                      "zz",   "z",   "data.pkl", "data/1/"};
    enum { N = sizeof rel / sizeof rel[0] };
    static char names[N + 1][32];
    zent ents[N + 1];
    for (int i = 0; i < N; i++) {
        snprintf(names[i], sizeof names[i], "t/%s", rel[i]);
        ents[i] = (zent){names[i], 0, VERSION, 2, 0};
    }
    zbuf z;
    zbuild(&z, ents, N, Z64_NONE);
    ck_zip zip;
    ck_error err;
    CHECK_ST(ck_zip_open(&zip, z.buf, z.len, &err), CK_OK, &err);
    for (int i = 0; i < N; i++)
        CHECK(ck_zip_find(&zip, rel[i], strlen(rel[i])) == i);
    static const char *const absent[] = {"",      "0",      "a/",  "a/bb", "ac",       "b ",
                                         "data/", "data/2", "zzz", "\xfe", "\xff\xff", "t/a"};
    for (size_t i = 0; i < sizeof absent / sizeof absent[0]; i++)
        CHECK(ck_zip_find(&zip, absent[i], strlen(absent[i])) == -1);
    CHECK(ck_zip_find(&zip, "ab", 1) == 1); /* the length counts, not a NUL */
    ck_zip_close(&zip);
    zfree(&z);

    /* the first and the last of many entries share a name */
    snprintf(names[N], sizeof names[N], "t/%s", rel[0]);
    ents[N] = (zent){names[N], 0, VERSION, 2, 0};
    zbuild(&z, ents, N + 1, Z64_NONE);
    EXPECT_OPEN(&z, CK_E_FORMAT, "duplicate record name 't/b'");
    zfree(&z);
}

/* Two threads open their own archives at once: nothing in the reader is
 * shared between archives (the sorts carry their archive as context). */
typedef struct opener {
    zbuf z;
    int expect_overlap;
    int wrong;
} opener;

static void *open_many(void *arg) {
    opener *o = arg;
    for (int k = 0; k < 2000; k++) {
        ck_zip zip;
        ck_error err;
        ck_error_clear(&err);
        ck_status rc = ck_zip_open(&zip, o->z.buf, o->z.len, &err);
        if ((rc == CK_E_RANGE) != o->expect_overlap ||
            (!o->expect_overlap && ck_zip_find(&zip, "data/0", 6) != 1))
            o->wrong++;
        ck_zip_close(&zip);
    }
    return NULL;
}

static void test_zip_reentrant(void) {
    opener a = {0}, b = {0};
    standard(&a.z, Z64_NONE, 0);
    standard(&b.z, Z64_NONE, 0);
    /* b: data.pkl's data runs over the next record */
    put32(b.z.buf + b.z.central_off[0] + 20, 200);
    put32(b.z.buf + b.z.central_off[0] + 24, 200);
    b.expect_overlap = 1;
    pthread_t ta, tb;
    CHECK(pthread_create(&ta, NULL, open_many, &a) == 0);
    CHECK(pthread_create(&tb, NULL, open_many, &b) == 0);
    pthread_join(ta, NULL);
    pthread_join(tb, NULL);
    CHECK(a.wrong == 0 && b.wrong == 0);
    zfree(&a.z);
    zfree(&b.z);
}

static void test_zip_crc(void) {
    zbuf z;
    standard(&z, Z64_NONE, 0);
    ck_zip zip;
    ck_error err;
    /* damage one tensor byte: the structure is fine, the CRC is not */
    z.buf[z.local_off[1] + 30 + 11 + 100] ^= 1;
    CHECK_ST(ck_zip_open(&zip, z.buf, z.len, &err), CK_OK, &err);
    CHECK_ST(ck_zip_check_crc(&zip, 1, 0, &err), CK_E_CRC, &err);
    CHECK(strstr(err.msg, "arch/data/0") != NULL && strstr(err.msg, "CRC") != NULL);
    CHECK_ST(ck_zip_check_crc(&zip, 0, 0, &err), CK_OK, &err);
    ck_zip_close(&zip);

    /* a recorded CRC of 0 means "not computed" unless strict */
    put32(z.buf + z.central_off[1] + 16, 0);
    CHECK_ST(ck_zip_open(&zip, z.buf, z.len, &err), CK_OK, &err);
    CHECK_ST(ck_zip_check_crc(&zip, 1, 0, &err), CK_OK, &err);
    CHECK_ST(ck_zip_check_crc(&zip, 1, 1, &err), CK_E_CRC, &err);
    ck_zip_close(&zip);
    zfree(&z);
}

/* ---- zipread: rejections ------------------------------------------------------------ */

static void test_zip_end_records(void) {
    zbuf z;
    uint8_t tiny[21] = {0};
    ck_zip zip;
    ck_error err;
    CHECK_ST(ck_zip_open(&zip, tiny, sizeof tiny, &err), CK_E_FORMAT, &err);
    CHECK(strstr(err.msg, "too short") != NULL);
    CHECK_ST(ck_zip_open(&zip, NULL, 0, &err), CK_E_FORMAT, &err);

    /* truncated end record: the signature is there, its fields are not */
    standard(&z, Z64_NONE, 0);
    z.len -= 3;
    EXPECT_OPEN(&z, CK_E_FORMAT, "no end of central directory");
    zfree(&z);

    /* a comment length that runs past the end */
    standard(&z, Z64_NONE, 0);
    put16(z.buf + z.eocd_off + 20, 100);
    EXPECT_OPEN(&z, CK_E_FORMAT, "no end of central directory");
    zfree(&z);

    /* not a zip at all */
    uint8_t junk[4096];
    for (size_t i = 0; i < sizeof junk; i++)
        junk[i] = (uint8_t)rnd();
    CHECK_ST(ck_zip_open(&zip, junk, sizeof junk, &err), CK_E_FORMAT, &err);

    /* central directory out of range */
    standard(&z, Z64_NONE, 0);
    uint8_t *eocd = z.buf + z.eocd_off;
    EXPECT_LIE(&z, eocd + 16, 4, z.eocd_off, CK_E_RANGE, "outside the archive");
    EXPECT_LIE(&z, eocd + 16, 4, 0xFFFFFF00u, CK_E_RANGE, "outside the archive");
    EXPECT_LIE(&z, eocd + 12, 4, 0xFFFFFFF0u, CK_E_RANGE, "outside the archive");
    EXPECT_OPEN(&z, CK_OK, NULL);
    /* a directory that starts elsewhere finds no entry signature */
    EXPECT_LIE(&z, eocd + 16, 4, z.cd_off - 4, CK_E_FORMAT, "bad signature");

    /* entry count lies (this disk's and the total): more than fit, fewer
     * than present, zero */
    static const struct {
        uint16_t n;
        const char *needle;
    } counts[] = {{60000, "announces 60000 entries"},
                  {4, "hold at most 3"},
                  {2, "after its 2 entries"},
                  {0, "no records"}};
    for (size_t i = 0; i < sizeof counts / sizeof counts[0]; i++) {
        put16(eocd + 8, counts[i].n);
        put16(eocd + 10, counts[i].n);
        EXPECT_OPEN(&z, CK_E_FORMAT, counts[i].needle);
    }
    put16(eocd + 8, 3);
    put16(eocd + 10, 3);

    /* multi-disk, in each place a disk number lives */
    EXPECT_LIE(&z, eocd + 4, 2, 1, CK_E_UNSUPPORTED, "multi-disk");
    EXPECT_LIE(&z, eocd + 6, 2, 1, CK_E_UNSUPPORTED, "multi-disk");
    EXPECT_LIE(&z, eocd + 8, 2, 2, CK_E_UNSUPPORTED, "multi-disk");
    EXPECT_LIE(&z, z.buf + z.central_off[1] + 34, 2, 1, CK_E_UNSUPPORTED, "multi-disk");
    EXPECT_OPEN(&z, CK_OK, NULL);
    zfree(&z);
}

static void test_zip_zip64_lies(void) {
    zbuf z;
    standard(&z, Z64_END, 0);
    EXPECT_OPEN(&z, CK_OK, NULL);
    uint8_t *loc = z.buf + z.loc_off, *r = z.buf + z.z64_off;

    /* the locator */
    EXPECT_LIE(&z, loc + 4, 4, 1, CK_E_UNSUPPORTED, "multi-disk");
    EXPECT_LIE(&z, loc + 16, 4, 2, CK_E_UNSUPPORTED, "multi-disk");
    EXPECT_LIE(&z, loc + 8, 8, z.loc_off, CK_E_RANGE, "not before its locator");
    EXPECT_LIE(&z, loc + 8, 8, UINT64_MAX, CK_E_RANGE, "not before its locator");
    EXPECT_LIE(&z, loc + 8, 8, z.z64_off - 8, CK_E_FORMAT, "no zip64 end record");

    /* the zip64 end record */
    EXPECT_LIE(&z, r + 4, 8, 10, CK_E_RANGE, "size");
    EXPECT_LIE(&z, r + 4, 8, UINT64_MAX, CK_E_RANGE, "size");
    EXPECT_LIE(&z, r + 16, 4, 1, CK_E_UNSUPPORTED, "multi-disk");
    EXPECT_LIE(&z, r + 24, 8, 2, CK_E_UNSUPPORTED, "multi-disk");
    EXPECT_LIE(&z, r + 48, 8, UINT64_MAX - 10, CK_E_RANGE, "outside the archive");
    EXPECT_LIE(&z, r + 40, 8, UINT64_MAX, CK_E_RANGE, "outside the archive");
    put64(r + 24, UINT64_MAX);
    put64(r + 32, UINT64_MAX);
    EXPECT_OPEN(&z, CK_E_FORMAT, "announces");
    put64(r + 24, 3);
    put64(r + 32, 3);
    EXPECT_OPEN(&z, CK_OK, NULL);
    zfree(&z);

    /* zip64 extra fields: lying values, too short, missing */
    standard(&z, Z64_EXTRA, 0);
    uint8_t *x1 = z.buf + z.central_off[1] + 46 + 11; /* entry 1's extra block */
    /* the local header offset */
    EXPECT_LIE(&z, x1 + 4 + 16, 8, UINT64_MAX - 5, CK_E_RANGE, "local header");
    put64(x1 + 4 + 8, UINT64_MAX); /* compressed size */
    put64(x1 + 4, UINT64_MAX);     /* size */
    EXPECT_OPEN(&z, CK_E_RANGE, "extends past the central directory");
    put64(x1 + 4 + 8, sizeof tensor_bytes);
    EXPECT_OPEN(&z, CK_E_FORMAT, "compressed size");
    put64(x1 + 4, sizeof tensor_bytes);
    EXPECT_OPEN(&z, CK_OK, NULL);
    /* the field claims fewer bytes than its three saturated fields need,
     * then more than its extra block has */
    EXPECT_LIE(&z, x1 + 2, 2, 16, CK_E_FORMAT, "zip64 extra field holds 16");
    EXPECT_LIE(&z, x1 + 2, 2, 60, CK_E_FORMAT, "runs past its entry");
    /* another field's id: no zip64 field at all */
    EXPECT_LIE(&z, x1, 2, 0x7075, CK_E_FORMAT, "no zip64 extra field");
    EXPECT_OPEN(&z, CK_OK, NULL);
    /* a central entry whose extra length runs past the directory */
    put16(z.buf + z.central_off[2] + 30, 200);
    EXPECT_OPEN(&z, CK_E_FORMAT, "runs past the central directory");
    zfree(&z);
}

static void test_zip_entries(void) {
    zbuf z;
    /* overlapping entries: entry 0's data claims entry 1's header */
    standard(&z, Z64_NONE, 0);
    put32(z.buf + z.central_off[0] + 20, (uint32_t)(sizeof PKL - 1 + 20));
    put32(z.buf + z.central_off[0] + 24, (uint32_t)(sizeof PKL - 1 + 20));
    EXPECT_OPEN(&z, CK_E_RANGE, "overlap");
    zfree(&z);

    /* two central entries naming one local header */
    zent two[3] = {
        {"arch/a", 0, VERSION, 2, 0}, {"arch/b", 0, VERSION, 2, 0}, {"arch/c", 0, VERSION, 2, 0}};
    zbuild(&z, two, 3, Z64_NONE);
    put32(z.buf + z.central_off[1] + 42, (uint32_t)z.local_off[0]);
    EXPECT_OPEN(&z, CK_E_FORMAT, "names another record");
    zfree(&z);

    /* local header problems */
    standard(&z, Z64_NONE, 0);
    uint8_t *local2 = z.buf + z.local_off[2], *central1 = z.buf + z.central_off[1];
    EXPECT_LIE(&z, local2, 4, 0x12345678u, CK_E_FORMAT, "no local header");
    /* the local extra runs past the directory */
    EXPECT_LIE(&z, local2 + 28, 2, 60000, CK_E_RANGE, "extends past the central directory");
    EXPECT_LIE(&z, z.buf + z.central_off[2] + 42, 4, z.cd_off - 10, CK_E_RANGE,
               "not before the central directory");
    /* the local name differs */
    EXPECT_LIE(&z, local2 + 30, 1, 'X', CK_E_FORMAT, "names another record");
    EXPECT_OPEN(&z, CK_OK, NULL);

    /* central entry problems */
    EXPECT_LIE(&z, central1, 4, 0x02014b51u, CK_E_FORMAT, "entry 1 has a bad signature");
    EXPECT_LIE(&z, central1 + 8, 2, 1, CK_E_UNSUPPORTED, "encrypted");
    /* the data descriptor bit alone is fine */
    EXPECT_LIE(&z, central1 + 8, 2, 8, CK_OK, NULL);
    /* stored, comp_size != size */
    EXPECT_LIE(&z, central1 + 20, 4, 100, CK_E_FORMAT, "compressed size 100 but size 4096");
    zfree(&z);
}

static void name_case(const char *n0, size_t l0, const char *n1, size_t l1, ck_status want,
                      const char *needle, int line) {
    zbuf z;
    zent ents[2] = {{n0, l0, VERSION, 2, 0}, {n1, l1, VERSION, 2, 0}};
    zbuild(&z, ents, 2, Z64_NONE);
    open_expect(&z, want, needle, line);
    zfree(&z);
}

#define NAME_CASE(n0, l0, n1, l1, want, needle)                                                    \
    name_case((n0), (l0), (n1), (l1), (want), (needle), __LINE__)

static void test_zip_names(void) {
    NAME_CASE("arch/data.pkl", 0, "arch/data/0", 0, CK_OK, NULL);
    NAME_CASE("arch/data.pkl", 0, "arch/../etc/passwd", 0, CK_E_FORMAT, "'..' component");
    NAME_CASE("arch/data.pkl", 0, "arch/data/..", 0, CK_E_FORMAT, "'..' component");
    NAME_CASE("../arch/x", 0, "../arch/y", 0, CK_E_FORMAT, "'..' component");
    NAME_CASE("arch/data.pkl", 0, "arch/a\0b", 8, CK_E_FORMAT, "NUL byte");
    NAME_CASE("arch/data.pkl", 0, "/arch/x", 0, CK_E_FORMAT, "absolute path");
    NAME_CASE("/arch/data.pkl", 0, "/arch/x", 0, CK_E_FORMAT, "absolute path");
    NAME_CASE("arch/data.pkl", 0, "arch/data.pkl", 0, CK_E_FORMAT, "duplicate record name");
    NAME_CASE("arch/data.pkl", 0, "other/data/0", 0, CK_E_FORMAT, "outside the archive folder");
    NAME_CASE("arch/data.pkl", 0, "archive/data/0", 0, CK_E_FORMAT, "outside the archive folder");
    NAME_CASE("arch/data.pkl", 0, "arch/", 0, CK_E_FORMAT, "outside the archive folder");
    NAME_CASE("data.pkl", 0, "data/0", 0, CK_E_FORMAT, "not inside a top folder");
    NAME_CASE("arch/", 0, "arch/data.pkl", 0, CK_E_FORMAT, "folder only");
    NAME_CASE("arch/x", 0, "", 0, CK_E_FORMAT, "empty name");
    /* names are compared as bytes, not as text */
    NAME_CASE("a/\xff\x01", 4, "a/\xff\x01", 4, CK_E_FORMAT, "duplicate record name");
}

/* ---- zipread: extraction ------------------------------------------------------------- */

/* Opens z (which must open) and extracts its entry 1, which must fail
 * leaving nothing: returns the extraction's status. */
static ck_status extract_refused(const zbuf *z) {
    ck_zip zip;
    ck_error err;
    uint8_t *out = NULL;
    size_t out_len = 0;
    CHECK_ST(ck_zip_open(&zip, z->buf, z->len, &err), CK_OK, &err);
    ck_status rc = ck_zip_extract(&zip, 1, UINT64_MAX, &out, &out_len, &err);
    CHECK(rc == CK_OK || (out == NULL && out_len == 0));
    free(out);
    ck_zip_close(&zip);
    return rc;
}

static void test_zip_extract(void) {
    zbuf z;
    ck_zip zip;
    ck_error err;
    uint8_t *out;
    size_t out_len;

    standard(&z, Z64_NONE, 1);
    CHECK_ST(ck_zip_open(&zip, z.buf, z.len, &err), CK_OK, &err);
    CHECK(zip.entries[1].method == CK_ZIP_METHOD_DEFLATE);
    CHECK(zip.entries[1].comp_size < zip.entries[1].size);
    CHECK_ST(ck_zip_check_crc(&zip, 1, 1, &err), CK_OK, &err); /* left to extract */
    CHECK_ST(ck_zip_extract(&zip, 1, UINT64_MAX, &out, &out_len, &err), CK_OK, &err);
    CHECK(out != NULL && out_len == sizeof tensor_bytes && ((uintptr_t)out & 63) == 0);
    CHECK(out != NULL && memcmp(out, tensor_bytes, sizeof tensor_bytes) == 0);
    free(out);
    /* a second extraction reuses the decompressor */
    CHECK_ST(ck_zip_extract(&zip, 1, sizeof tensor_bytes, &out, &out_len, &err), CK_OK, &err);
    free(out);
    /* the size limit is applied before anything is allocated */
    out = (uint8_t *)&out;
    CHECK_ST(ck_zip_extract(&zip, 1, sizeof tensor_bytes - 1, &out, &out_len, &err), CK_E_LIMIT,
             &err);
    CHECK(out == NULL && out_len == 0 && strstr(err.msg, "over the limit") != NULL);
    /* stored entries are copied */
    CHECK_ST(ck_zip_extract(&zip, 2, 100, &out, &out_len, &err), CK_OK, &err);
    CHECK(out_len == 2 && memcmp(out, "3\n", 2) == 0);
    free(out);
    ck_zip_close(&zip);
    zfree(&z);

    /* CRC mismatch of a deflated entry */
    standard(&z, Z64_NONE, 1);
    put32(z.buf + z.central_off[1] + 16, 0xDEADBEEFu);
    put32(z.buf + z.local_off[1] + 14, 0xDEADBEEFu);
    CHECK(extract_refused(&z) == CK_E_CRC);
    zfree(&z);

    /* CRC mismatch of a stored entry when copied */
    standard(&z, Z64_NONE, 0);
    z.buf[z.local_off[1] + 30 + 11] ^= 0x40;
    CHECK(extract_refused(&z) == CK_E_CRC);
    zfree(&z);

    /* a deflated entry that announces more bytes than it inflates to */
    standard(&z, Z64_NONE, 1);
    put32(z.buf + z.central_off[1] + 24, sizeof tensor_bytes + 100);
    put32(z.buf + z.local_off[1] + 22, sizeof tensor_bytes + 100);
    ck_status rc = extract_refused(&z);
    CHECK(rc == CK_E_TRUNCATED || rc == CK_E_FORMAT || rc == CK_E_CRC);
    zfree(&z);

    /* ... and one that announces fewer */
    standard(&z, Z64_NONE, 1);
    put32(z.buf + z.central_off[1] + 24, sizeof tensor_bytes - 100);
    put32(z.buf + z.local_off[1] + 22, sizeof tensor_bytes - 100);
    rc = extract_refused(&z);
    CHECK(rc == CK_E_FORMAT || rc == CK_E_CRC);
    zfree(&z);

    /* a corrupt deflate stream */
    standard(&z, Z64_NONE, 1);
    memset(z.buf + z.local_off[1] + 30 + 11, 0xFF, 16);
    CHECK(extract_refused(&z) != CK_OK);
    zfree(&z);

    /* an empty entry gives NULL and 0 */
    zent empty[2] = {{"e/a", 0, VERSION, 0, 1}, {"e/b", 0, VERSION, 0, 0}};
    zbuild(&z, empty, 2, Z64_NONE);
    CHECK_ST(ck_zip_open(&zip, z.buf, z.len, &err), CK_OK, &err);
    for (size_t i = 0; i < 2; i++) {
        out = (uint8_t *)&out;
        out_len = 7;
        CHECK_ST(ck_zip_extract(&zip, i, 0, &out, &out_len, &err), CK_OK, &err);
        CHECK(out == NULL && out_len == 0);
        CHECK_ST(ck_zip_check_crc(&zip, i, 1, &err), CK_OK, &err);
    }
    ck_zip_close(&zip);
    zfree(&z);
}

/* Every prefix of a valid archive is refused cleanly (or, for a prefix that
 * still holds a whole archive, accepted); every single-byte change in the
 * end records and directory gives a status, never a crash. */
static void test_zip_mutations(void) {
    zbuf z;
    standard(&z, Z64_EXTRA, 0);
    ck_zip zip;
    ck_error err;
    int cut_refused = 1;
    for (size_t len = 0; len < z.len; len++) {
        uint8_t *copy = malloc(len ? len : 1);
        memcpy(copy, z.buf, len);
        if (open_both(&zip, copy, len, &err) == CK_OK)
            cut_refused = 0;
        ck_zip_close(&zip);
        free(copy);
    }
    CHECK(cut_refused);
    size_t ok = 0, refused = 0;
    for (size_t pos = z.cd_off; pos < z.len; pos++) {
        for (int v = 0; v < 3; v++) {
            uint8_t *copy = malloc(z.len);
            memcpy(copy, z.buf, z.len);
            copy[pos] = v == 0 ? 0 : v == 1 ? 0xFF : (uint8_t)(copy[pos] + 1);
            ck_error_clear(&err);
            ck_status rc = open_both(&zip, copy, z.len, &err);
            if (rc == CK_OK)
                ok++;
            else if (err.msg[0] != 0 && err.status == rc)
                refused++;
            ck_zip_close(&zip);
            free(copy);
        }
    }
    CHECK(ok + refused == 3 * (z.len - z.cd_off));
    CHECK(refused > 0);
    zfree(&z);
}

/* ---- memcopy ------------------------------------------------------------- */

static void test_memcopy(void) {
    ck_error err;
    /* a batch past the parallel threshold, split over 3 threads: shares cut
     * segments, and every byte lands at its segment's offset */
    size_t n = CK_MEMCOPY_PARALLEL_MIN + 12345;
    uint8_t *src = malloc(n), *dst = malloc(n + 4096);
    CHECK(src != NULL && dst != NULL);
    if (src == NULL || dst == NULL) {
        free(src);
        free(dst);
        return;
    }
    for (size_t i = 0; i < n; i++)
        src[i] = (uint8_t)(i * 31 + (i >> 12));
    memset(dst, 0xAA, n + 4096);
    size_t cut = n / 3 + 7;
    ck_memcopy_segment segs[3] = {
        {src, cut, 64},
        {src + cut, 0, 64 + cut},
        {src + cut, n - cut, 128 + cut},
    };
    ck_error_clear(&err);
    CHECK(ck_memcopy_segments(dst, n + 4096, segs, 3, 3, &err) == CK_OK);
    CHECK(memcmp(dst + 64, src, cut) == 0);
    CHECK(memcmp(dst + 128 + cut, src + cut, n - cut) == 0);
    CHECK(dst[63] == 0xAA && dst[64 + cut] == 0xAA && dst[127 + cut] == 0xAA);
    CHECK(dst[128 + n] == 0xAA);
    /* one thread gives the same bytes */
    memset(dst, 0, n + 4096);
    CHECK(ck_memcopy_segments(dst, n + 4096, segs, 3, 1, &err) == CK_OK);
    CHECK(memcmp(dst + 128 + cut, src + cut, n - cut) == 0);
    /* a segment outside the arena copies nothing */
    memset(dst, 0x55, 256);
    ck_memcopy_segment bad[2] = {{src, 16, 0}, {src, 100, n + 4000}};
    CHECK(ck_memcopy_segments(dst, n + 4096, bad, 2, 2, &err) == CK_E_RANGE);
    CHECK(dst[0] == 0x55 && strstr(err.msg, "segment 1") != NULL);
    ck_memcopy_segment wrap[1] = {{src, SIZE_MAX, 1}};
    CHECK(ck_memcopy_segments(dst, n, wrap, 1, 2, &err) == CK_E_RANGE);
    ck_memcopy_segment null_src[1] = {{NULL, 4, 0}};
    CHECK(ck_memcopy_segments(dst, n, null_src, 1, 2, &err) == CK_E_RANGE);
    CHECK(ck_memcopy_segments(dst, n, NULL, 0, 2, &err) == CK_OK);

    /* scattered runs, in reverse destination order, past the threshold on 2
     * and 4 threads: every run lands at its own destination, nothing else */
    for (int threads = 1; threads <= 4; threads *= 2) {
        memset(dst, 0xAA, n + 4096);
        size_t tail = n - cut - 4096;
        ck_memcopy_run runs[3] = {
            {src, dst + 64 + tail, cut},
            {src + cut, dst + 17, 0},
            {src + cut, dst + 32, tail},
        };
        CHECK(ck_memcopy_runs(runs, 3, threads, &err) == CK_OK);
        CHECK(memcmp(dst + 32, src + cut, tail) == 0);
        CHECK(memcmp(dst + 64 + tail, src, cut) == 0);
        CHECK(dst[31] == 0xAA && dst[32 + tail] == 0xAA && dst[63 + tail] == 0xAA);
        CHECK(dst[64 + tail + cut] == 0xAA);
    }
    ck_memcopy_run no_dst[2] = {{src, dst, 8}, {src, NULL, 8}};
    memset(dst, 0x55, 16);
    CHECK(ck_memcopy_runs(no_dst, 2, 2, &err) == CK_E_RANGE);
    CHECK(dst[0] == 0x55 && strstr(err.msg, "run 1") != NULL);
    ck_memcopy_run empty_null[1] = {{NULL, NULL, 0}};
    CHECK(ck_memcopy_runs(empty_null, 1, 2, &err) == CK_OK);
    ck_memcopy_run huge[2] = {{src, dst, SIZE_MAX}, {src, dst, 2}};
    CHECK(ck_memcopy_runs(huge, 2, 2, &err) == CK_E_LIMIT);
    free(src);
    free(dst);
}

/* ---- legacy storage walk ------------------------------------------------- */

/* Appends one storage as torch's legacy writer does: its element count as 8
 * little-endian bytes (count), then nbytes bytes of data. */
static size_t put_storage(uint8_t *p, uint64_t count, size_t nbytes) {
    put64(p, count);
    for (size_t i = 0; i < nbytes; i++)
        p[8 + i] = (uint8_t)(0x40 + i);
    return 8 + nbytes;
}

static void test_legacy_walk(void) {
    ck_error err;
    ck_legacy_walk walk;
    size_t offset[4], length[4];
    /* a good section after 5 bytes of pickles: 3 floats, 0 doubles, 2 int16s,
     * then bytes the walk does not look at */
    uint8_t file[128];
    memset(file, 0xee, sizeof file);
    size_t pos = 5, at = pos;
    at += put_storage(file + at, 3, 12);
    at += put_storage(file + at, 0, 0);
    at += put_storage(file + at, 2, 4);
    size_t end = at;
    const uint64_t elsize[3] = {4, 8, 2}, expect[3] = {3, 0, 2};
    ck_error_clear(&err);
    CHECK_ST(
        ck_legacy_walk_storages(file, end + 7, pos, 3, elsize, expect, offset, length, &walk, &err),
        CK_OK, &err);
    CHECK(walk.fault == CK_LEGACY_OK && walk.end == end);
    CHECK(offset[0] == pos + 8 && length[0] == 12);
    CHECK(offset[1] == pos + 28 && length[1] == 0);
    CHECK(offset[2] == pos + 36 && length[2] == 4 && offset[2] + length[2] == end);
    CHECK(file[offset[0]] == 0x40 && file[offset[2] + 3] == 0x43);
    /* the same without expected counts, and exactly as long as the section */
    CHECK_ST(ck_legacy_walk_storages(file, end, pos, 3, elsize, NULL, offset, length, &walk, &err),
             CK_OK, &err);
    CHECK(walk.end == end && length[0] == 12 && length[2] == 4);

    /* zero storages: an empty section, anywhere up to the end */
    CHECK_ST(ck_legacy_walk_storages(file, 5, 5, 0, NULL, NULL, NULL, NULL, &walk, &err), CK_OK,
             &err);
    CHECK(walk.end == 5 && walk.fault == CK_LEGACY_OK);
    CHECK_ST(ck_legacy_walk_storages(file, 4, 5, 0, NULL, NULL, NULL, NULL, &walk, &err),
             CK_E_RANGE, &err);
    CHECK(walk.fault == CK_LEGACY_START);

    /* truncated count: each cut inside the third storage's count */
    for (size_t cut = offset[2] - 8; cut < offset[2]; cut++) {
        ck_error_clear(&err);
        CHECK_ST(
            ck_legacy_walk_storages(file, cut, pos, 3, elsize, expect, offset, length, &walk, &err),
            CK_E_TRUNCATED, &err);
        CHECK(walk.fault == CK_LEGACY_NO_COUNT && walk.at == 2);
        CHECK(strstr(err.msg, "storage 2") != NULL && strstr(err.msg, "count") != NULL);
        CHECK(offset[1] == pos + 28); /* the storages before it are set */
    }
    /* truncated data: each cut inside the first storage's bytes */
    for (size_t cut = pos + 8; cut < pos + 20; cut++) {
        CHECK_ST(
            ck_legacy_walk_storages(file, cut, pos, 3, elsize, expect, offset, length, &walk, &err),
            CK_E_TRUNCATED, &err);
        CHECK(walk.fault == CK_LEGACY_NO_DATA && walk.at == 0 && walk.count == 3);
        CHECK(strstr(err.msg, "storage 0") != NULL);
    }

    /* a count other than the objects': refused before its bytes are measured */
    uint8_t one[16];
    put64(one, (uint64_t)1 << 40);
    const uint64_t four[1] = {4}, f32[1] = {4};
    CHECK_ST(ck_legacy_walk_storages(one, sizeof one, 0, 1, f32, four, offset, length, &walk, &err),
             CK_E_FORMAT, &err);
    CHECK(walk.fault == CK_LEGACY_COUNT_MISMATCH && walk.at == 0 &&
          walk.count == (uint64_t)1 << 40);
    CHECK(strstr(err.msg, "1099511627776") != NULL);

    /* count overflow: count * element size past 64 bits */
    put64(one, (uint64_t)1 << 62);
    CHECK_ST(ck_legacy_walk_storages(one, sizeof one, 0, 1, f32, NULL, offset, length, &walk, &err),
             CK_E_RANGE, &err);
    CHECK(walk.fault == CK_LEGACY_SIZE_OVERFLOW && walk.count == (uint64_t)1 << 62);
    put64(one, UINT64_MAX);
    const uint64_t byte1[1] = {1}, huge_elsize[1] = {(uint64_t)1 << 63};
    CHECK_ST(ck_legacy_walk_storages(one, sizeof one, 0, 1, huge_elsize, NULL, offset, length,
                                     &walk, &err),
             CK_E_RANGE, &err);
    CHECK(walk.fault == CK_LEGACY_SIZE_OVERFLOW);
    /* huge count that fits 64 bits: the bytes it asks for are not there */
    CHECK_ST(
        ck_legacy_walk_storages(one, sizeof one, 0, 1, byte1, NULL, offset, length, &walk, &err),
        CK_E_TRUNCATED, &err);
    CHECK(walk.fault == CK_LEGACY_NO_DATA && walk.count == UINT64_MAX);
    put64(one, (uint64_t)1 << 61);
    CHECK_ST(ck_legacy_walk_storages(one, sizeof one, 0, 1, f32, NULL, offset, length, &walk, &err),
             CK_E_TRUNCATED, &err);
    CHECK(walk.fault == CK_LEGACY_NO_DATA);
    /* zero-sized elements: any count is zero bytes */
    const uint64_t zero[1] = {0};
    CHECK_ST(ck_legacy_walk_storages(one, 8, 0, 1, zero, NULL, offset, length, &walk, &err), CK_OK,
             &err);
    CHECK(length[0] == 0 && walk.end == 8);
}

/* The pread reader: copies of stored records, CRC of a copy, and a file that
 * no longer holds the bytes it held when it was mapped. */
static void test_zip_pread(void) {
    zbuf z;
    ck_zip zip;
    ck_error err;
    uint8_t *out;
    size_t out_len;
    standard(&z, Z64_EXTRA, 0);
    int fd = file_of(z.buf, z.len);
    CHECK_ST(ck_zip_open_file(&zip, z.buf, z.len, fd, 0, &err), CK_OK, &err);
    CHECK(zip.fd == fd);
    CHECK_ST(ck_zip_read_stored(&zip, 1, &out, &out_len, &err), CK_OK, &err);
    CHECK(out != NULL && out_len == sizeof tensor_bytes && ((uintptr_t)out & 63) == 0);
    CHECK(out != NULL && memcmp(out, tensor_bytes, sizeof tensor_bytes) == 0);
    CHECK_ST(ck_zip_check_crc_of(&zip, 1, out, 1, &err), CK_OK, &err);
    out[3] ^= 1;
    CHECK_ST(ck_zip_check_crc_of(&zip, 1, out, 1, &err), CK_E_CRC, &err);
    CHECK(strstr(err.msg, "arch/data/0") != NULL);
    free(out);
    /* the file shrank after the open: a clear error, not stale bytes */
    CHECK(ftruncate(fd, (off_t)(zip.entries[1].data_offset + 10)) == 0);
    CHECK_ST(ck_zip_read_stored(&zip, 1, &out, &out_len, &err), CK_E_TRUNCATED, &err);
    CHECK(out == NULL && strstr(err.msg, "changed while read") != NULL);
    ck_zip_close(&zip);
    /* ... or before it: the end records are gone */
    CHECK_ST(ck_zip_open_file(&zip, z.buf, z.len, fd, 0, &err), CK_E_TRUNCATED, &err);
    CHECK(zip.entries == NULL);
    ck_zip_close(&zip);
    close(fd);
    /* without a file, copies come from the buffer */
    CHECK_ST(ck_zip_open(&zip, z.buf, z.len, &err), CK_OK, &err);
    CHECK(zip.fd == -1);
    CHECK_ST(ck_zip_read_stored(&zip, 1, &out, &out_len, &err), CK_OK, &err);
    CHECK(out != NULL && memcmp(out, tensor_bytes, sizeof tensor_bytes) == 0);
    free(out);
    ck_zip_close(&zip);
    zfree(&z);
    /* compressed records are not for read_stored */
    standard(&z, Z64_NONE, 1);
    fd = file_of(z.buf, z.len);
    CHECK_ST(ck_zip_open_file(&zip, z.buf, z.len, fd, 0, &err), CK_OK, &err);
    CHECK_ST(ck_zip_read_stored(&zip, 1, &out, &out_len, &err), CK_E_UNSUPPORTED, &err);
    CHECK_ST(ck_zip_extract(&zip, 1, UINT64_MAX, &out, &out_len, &err), CK_OK, &err);
    CHECK(out != NULL && memcmp(out, tensor_bytes, sizeof tensor_bytes) == 0);
    free(out);
    ck_zip_close(&zip);
    close(fd);
    zfree(&z);
}

/* An archive that is a range of its file (a DCP item inside a .distcp
 * file): with the range's file offset as base, the pread reader reads the
 * archive's own bytes; with base 0 it reads the file's start and refuses. */
static void test_zip_pread_base(void) {
    zbuf z;
    ck_zip zip;
    ck_error err;
    uint8_t *out;
    size_t out_len;
    standard(&z, Z64_NONE, 0);
    const size_t pre = 4096 + 13, post = 77;
    uint8_t *file = calloc(1, pre + z.len + post);
    CHECK(file != NULL);
    if (file == NULL)
        return;
    memset(file, 'x', pre);
    memcpy(file + pre, z.buf, z.len);
    memset(file + pre + z.len, 'y', post);
    int fd = file_of(file, pre + z.len + post);
    const uint8_t *item = file + pre;
    CHECK_ST(ck_zip_open_file(&zip, item, z.len, fd, pre, &err), CK_OK, &err);
    CHECK(zip.base == pre && zip.n_entries == 3);
    CHECK_ST(ck_zip_read_stored(&zip, 1, &out, &out_len, &err), CK_OK, &err);
    CHECK(out != NULL && out_len == sizeof tensor_bytes);
    CHECK(out != NULL && memcmp(out, tensor_bytes, sizeof tensor_bytes) == 0);
    free(out);
    ck_zip_close(&zip);
    /* the entries agree with the buffer reader's */
    ck_zip bz;
    CHECK_ST(ck_zip_open(&bz, item, z.len, &err), CK_OK, &err);
    CHECK_ST(ck_zip_open_file(&zip, item, z.len, fd, pre, &err), CK_OK, &err);
    for (size_t i = 0; i < bz.n_entries && i < zip.n_entries; i++)
        CHECK(bz.entries[i].data_offset == zip.entries[i].data_offset &&
              bz.entries[i].size == zip.entries[i].size);
    ck_zip_close(&bz);
    ck_zip_close(&zip);
    /* base 0 reads the file's first bytes, not the item: refused */
    CHECK(ck_zip_open_file(&zip, item, z.len, fd, 0, &err) != CK_OK);
    ck_zip_close(&zip);
    close(fd);
    free(file);
    zfree(&z);
}

/* ---- preads and read-ahead ------------------------------------------------ */

/* The byte at offset off of the pread test file. */
static uint8_t pattern_at(uint64_t off) {
    return (uint8_t)((off * 2654435761u) >> 13);
}

/* A file of len pattern bytes in tmpdir, open read-only; -1 on failure. */
static int pattern_file(const char *name, size_t len) {
    char path[128];
    snprintf(path, sizeof path, "%s/%s", tmpdir, name);
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
    if (fd < 0)
        return -1;
    uint8_t *chunk = malloc(1 << 20);
    size_t done = 0;
    while (chunk != NULL && done < len) {
        size_t n = len - done < (1u << 20) ? len - done : (1u << 20);
        for (size_t i = 0; i < n; i++)
            chunk[i] = pattern_at(done + i);
        if (write(fd, chunk, n) != (ssize_t)n)
            break;
        done += n;
    }
    free(chunk);
    unlink(path);
    if (done != len || fsync(fd) != 0) {
        close(fd);
        return -1;
    }
    return fd;
}

/* Whether piece p holds the file's bytes. */
static int piece_ok(const ck_piece *p) {
    for (size_t i = 0; i < p->len; i++)
        if (p->dst[i] != pattern_at(p->off + i))
            return 0;
    return 1;
}

/* The fraction (0..1) of [0, len) of fd in the page cache. */
static double resident_part(int fd, size_t len) {
    long page = sysconf(_SC_PAGESIZE);
    size_t pages = (len + (size_t)page - 1) / (size_t)page, in = 0;
    unsigned char *vec = malloc(pages);
    void *map = mmap(NULL, len, PROT_READ, MAP_SHARED, fd, 0);
    if (vec != NULL && map != MAP_FAILED && mincore(map, len, vec) == 0)
        for (size_t i = 0; i < pages; i++)
            in += vec[i] & 1;
    if (map != MAP_FAILED)
        munmap(map, len);
    free(vec);
    return pages ? (double)in / (double)pages : 0.0;
}

static void test_preads(void) {
    const size_t flen = ((size_t)72 << 20) + 12345;
    int fd = pattern_file("preads", flen);
    CHECK(fd >= 0);
    if (fd < 0)
        return;
    uint8_t *dst = malloc(flen);
    CHECK(dst != NULL);
    if (dst == NULL) {
        close(fd);
        return;
    }
    /* pieces in file order with gaps, a tiny one, an empty one, and one
     * that the half of the bytes falls inside */
    const uint64_t offs[] = {0, 100, 4096, 4200, (uint64_t)30 << 20, (uint64_t)60 << 20};
    const size_t lens[] = {
        64, 3, 0, ((size_t)30 << 20) - 4300, (size_t)29 << 20, ((size_t)12 << 20) + 12345};
    ck_piece pieces[6];
    for (int threads = 1; threads <= 2; threads++) {
        size_t at = 0;
        memset(dst, 0, flen);
        for (int i = 0; i < 6; i++) {
            pieces[i] = (ck_piece){offs[i], dst + at, lens[i]};
            at += lens[i];
        }
        CHECK(ck_pread_pieces(fd, pieces, 6, threads) == 0);
        int ok = 1;
        for (int i = 0; i < 6; i++)
            ok &= piece_ok(&pieces[i]);
        CHECK(ok);
        /* the whole file as one piece: cut inside it */
        ck_piece whole = {0, dst, flen};
        memset(dst, 0, flen);
        CHECK(ck_pread_pieces(fd, &whole, 1, threads) == 0 && piece_ok(&whole));
        /* a piece past the end of the file: -1, on either path */
        ck_piece past[2] = {{0, dst, (size_t)40 << 20}, {(uint64_t)40 << 20, dst, flen}};
        CHECK(ck_pread_pieces(fd, past, 2, threads) == -1);
        CHECK(ck_pread_pieces(-1, pieces, 6, threads) == EBADF);
    }
    /* the read-ahead thread, run to its end: on a warm file it asks nothing */
    ck_ahead a;
    ck_piece whole = {0, dst, flen};
    /* under CK_PREADS_PARALLEL_MIN bytes, no thread is started */
    ck_piece little = {0, dst, (size_t)CK_PREADS_PARALLEL_MIN - 1};
    CHECK(ck_ahead_start(&a, fd, &little, 1) == -1 && a.started == 0);
    ck_ahead_stop(&a); /* nothing to stop */
    CHECK(ck_pread_pieces(fd, &whole, 1, 1) == 0);
    CHECK(ck_ahead_start(&a, fd, &whole, 1) == 0);
    pthread_join(a.thread, NULL);
    a.started = 0;
    CHECK(a.warm == 1 && a.asked == 0 && a.cached == 0);
    ck_ahead_stop(&a); /* joined already: nothing to do */
    /* cold (where this file system lets its pages be dropped): every step is
     * asked for or found cached, and the pages come in */
    (void)posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
    if (resident_part(fd, flen) < 0.5) {
        CHECK(ck_ahead_start(&a, fd, &whole, 1) == 0);
        pthread_join(a.thread, NULL);
        a.started = 0;
        size_t steps = (flen + CK_AHEAD_STEP - 1) / CK_AHEAD_STEP;
        CHECK(a.warm == 0 && a.asked > 0 && a.asked + a.cached == steps);
        for (int i = 0; i < 200 && resident_part(fd, flen) < 0.99; i++)
            usleep(10000);
        CHECK(resident_part(fd, flen) >= 0.99);
    } else {
        printf("test_preads: pages of %s stay resident; cold read-ahead not checked\n", tmpdir);
    }
    /* stopped at once: joins, whatever it had done */
    (void)posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
    CHECK(ck_ahead_start(&a, fd, &whole, 1) == 0);
    ck_ahead_stop(&a);
    CHECK(a.started == 0);
    /* a read on two threads of a dropped file gives the same bytes */
    memset(dst, 0, flen);
    CHECK(ck_pread_pieces(fd, &whole, 1, 2) == 0 && piece_ok(&whole));
    free(dst);
    close(fd);
}

int main(void) {
    if (mkdtemp(tmpdir) == NULL) {
        perror("mkdtemp");
        return 2;
    }
    for (size_t i = 0; i < sizeof tensor_bytes; i++)
        tensor_bytes[i] = (uint8_t)(i % 13 == 0 ? rnd() : i / 64);
    test_status();
    test_region();
    test_crc();
    test_zip_good();
    test_zip_crc();
    test_zip_end_records();
    test_zip_zip64_lies();
    test_zip_entries();
    test_zip_names();
    test_zip_index();
    test_zip_reentrant();
    test_zip_extract();
    test_zip_mutations();
    test_memcopy();
    test_legacy_walk();
    test_zip_pread();
    test_zip_pread_base();
    test_preads();
    rmdir(tmpdir);
    return check_report("test_core");
}

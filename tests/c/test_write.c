/* C tests of the write side of src/core: the zip writer read back by the
 * zip reader (names, sizes, CRC-32s, data alignment, the reader's refusal of
 * every truncation), the serialization id, and the device-copy planner's
 * layout (CPU only: ck_devcopy_plan touches no CUDA runtime).
 *
 * No framework: CHECK counts passes and failures; exit status 1 on failure.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <zlib.h>

#include "core/devcopy.h"
#include "core/serial_id.h"
#include "core/status.h"
#include "core/zipread.h"
#include "core/zipwrite.h"

#include "check.h"

/* ---- a sink into a growing memory buffer --------------------------------- */

typedef struct membuf {
    uint8_t *p;
    size_t len, cap;
} membuf;

static ck_status mem_sink(void *ctx, const struct iovec *iov, int n, ck_error *err) {
    membuf *m = ctx;
    (void)err;
    for (int i = 0; i < n; i++) {
        if (m->len + iov[i].iov_len > m->cap) {
            size_t cap = (m->len + iov[i].iov_len) * 2;
            uint8_t *p = realloc(m->p, cap);
            if (!p)
                return CK_E_NOMEM;
            m->p = p;
            m->cap = cap;
        }
        if (iov[i].iov_len)
            memcpy(m->p + m->len, iov[i].iov_base, iov[i].iov_len);
        m->len += iov[i].iov_len;
    }
    return CK_OK;
}

/* ---- zip writer -> zip reader --------------------------------------------- */

static void test_zip_roundtrip(uint64_t alignment) {
    enum { N = 5 };
    static const char *names[N] = {"data.pkl", "data/0", "data/1", "data/2", "byteorder"};
    static const size_t sizes[N] = {37, 0, 1, 300000, 6};
    uint8_t *bufs[N];
    for (int i = 0; i < N; i++) {
        bufs[i] = malloc(sizes[i] ? sizes[i] : 1);
        for (size_t j = 0; j < sizes[i]; j++)
            bufs[i][j] = (uint8_t)(j * 31 + (size_t)i * 7);
    }
    membuf m = {0};
    ck_error err = {0};
    ck_zipw w;
    CHECK(ck_zipw_init(&w, "archive", 7, alignment, mem_sink, &m, &err) == CK_OK);
    for (int i = 0; i < N; i++)
        CHECK(ck_zipw_add(&w, names[i], sizes[i] ? bufs[i] : NULL, sizes[i], &err) == CK_OK);
    CHECK(ck_zipw_finish(&w, &err) == CK_OK);
    ck_zipw_free(&w);

    ck_zip zip;
    ck_status st = ck_zip_open(&zip, m.p, m.len, &err);
    CHECK(st == CK_OK);
    if (st != CK_OK) {
        fprintf(stderr, "ck_zip_open: %s\n", err.msg);
    } else {
        /* the records, then torch's version and .data/serialization_id */
        CHECK(zip.n_entries == N + 2);
        CHECK(zip.prefix_len == 7); /* "archive" (the slash follows) */
        for (int i = 0; i < N; i++) {
            ptrdiff_t k = ck_zip_find(&zip, names[i], strlen(names[i]));
            CHECK(k == i); /* central directory in write order */
            if (k < 0)
                continue;
            const ck_zip_entry *e = &zip.entries[k];
            CHECK(e->method == CK_ZIP_METHOD_STORED);
            CHECK(e->size == sizes[i] && e->comp_size == sizes[i]);
            CHECK(e->crc32 == (uint32_t)crc32(0, bufs[i], (uInt)sizes[i]));
            CHECK(e->data_offset % alignment == 0);
            const uint8_t *d = ck_zip_stored_data(&zip, (size_t)k);
            CHECK(sizes[i] == 0 || (d && memcmp(d, bufs[i], sizes[i]) == 0));
            CHECK(ck_zip_check_crc(&zip, (size_t)k, 1, &err) == CK_OK);
        }
        ptrdiff_t v = ck_zip_find(&zip, "version", 7);
        ptrdiff_t s = ck_zip_find(&zip, ".data/serialization_id", 22);
        CHECK(v >= 0 && s >= 0);
        if (s >= 0) {
            CHECK(zip.entries[s].size == CK_SERIAL_ID_LEN);
            const uint8_t *d = ck_zip_stored_data(&zip, (size_t)s);
            int digits = d != NULL;
            for (int j = 0; d && j < CK_SERIAL_ID_LEN; j++)
                digits &= d[j] >= '0' && d[j] <= '9';
            CHECK(digits);
        }
        ck_zip_close(&zip);
    }

    /* every truncation of the archive is refused, never read past its end */
    int refused = 1;
    for (size_t cut = 0; cut < m.len; cut += (cut < 4096 || m.len - cut < 4096) ? 1 : 997) {
        uint8_t *t = malloc(cut ? cut : 1);
        memcpy(t, m.p, cut);
        ck_zip z;
        ck_status r = ck_zip_open(&z, t, cut, &err);
        if (r == CK_OK) {
            refused = 0;
            fprintf(stderr, "truncated to %zu of %zu bytes: accepted\n", cut, m.len);
            ck_zip_close(&z);
        }
        free(t);
    }
    CHECK(refused);

    free(m.p);
    for (int i = 0; i < N; i++)
        free(bufs[i]);
}

static void test_zipw_refusals(void) {
    membuf m = {0};
    ck_error err = {0};
    ck_zipw w;
    CHECK(ck_zipw_init(&w, "a", 1, 3, mem_sink, &m, &err) == CK_E_RANGE); /* not a power of 2 */
    CHECK(ck_zipw_init(&w, "", 0, 64, mem_sink, &m, &err) == CK_E_RANGE); /* empty prefix */
    free(m.p);
}

/* ---- serialization id ----------------------------------------------------- */

static void test_serial_id(void) {
    ck_error err = {0};
    ck_serial_id a, b;
    char da[CK_SERIAL_ID_LEN], db[CK_SERIAL_ID_LEN];

    /* deterministic: the same names and CRCs give the same digits */
    for (int pass = 0; pass < 2; pass++) {
        ck_serial_id *s = pass ? &b : &a;
        ck_serial_id_init(s);
        char name[32];
        for (int i = 0; i < 1000; i++) { /* past several rehashes */
            int n = snprintf(name, sizeof name, "data/%d", i);
            CHECK(ck_serial_id_add_name(s, name, (size_t)n, &err) == CK_OK);
            ck_serial_id_add_crc(s, (uint32_t)i * 2654435761u);
        }
        CHECK(s->count == 1000);
    }
    ck_serial_id_format(&a, da);
    ck_serial_id_format(&b, db);
    CHECK(memcmp(da, db, CK_SERIAL_ID_LEN) == 0);
    int digits = 1;
    for (int j = 0; j < CK_SERIAL_ID_LEN; j++)
        digits &= da[j] >= '0' && da[j] <= '9';
    CHECK(digits);

    /* a different CRC changes the second half only */
    ck_serial_id_add_crc(&b, 1);
    ck_serial_id_format(&b, db);
    CHECK(memcmp(da, db, 20) == 0);
    CHECK(memcmp(da + 20, db + 20, 20) != 0);

    /* another name changes the first half */
    CHECK(ck_serial_id_add_name(&a, "extra", 5, &err) == CK_OK);
    ck_serial_id_format(&a, da);
    CHECK(memcmp(da, db, 20) != 0);
    ck_serial_id_free(&a);
    ck_serial_id_free(&b);

    /* empty: reusable after free and init */
    ck_serial_id_init(&a);
    ck_serial_id_format(&a, da);
    ck_serial_id_free(&a);
    ck_serial_id_init(&a);
    ck_serial_id_format(&a, db);
    CHECK(memcmp(da, db, CK_SERIAL_ID_LEN) == 0);
    ck_serial_id_free(&a);

    /* libstdc++'s std::hash<std::string> is deterministic and length-sensitive */
    CHECK(ck_std_string_hash("abc", 3) == ck_std_string_hash("abc", 3));
    CHECK(ck_std_string_hash("abc", 3) != ck_std_string_hash("abc", 2));
}

/* ---- device-copy planner (no CUDA) ---------------------------------------- */

static void test_devcopy_plan(void) {
    ck_error err = {0};
    ck_devcopy_segment s[6] = {
        {0x1000, 10, 0, 0}, {0x2000, 0, 0, 0},  {0x3000, 64, 1, 0},
        {0x4000, 1, 0, 0},  {0x5000, 65, 2, 0}, {0x6000, 0, 0, 0},
    };
    size_t total = 0;
    CHECK(ck_devcopy_plan(s, 6, CK_DEVCOPY_ALIGN, &total, &err) == CK_OK);
    int ok = 1;
    size_t end = 0;
    for (int i = 0; i < 6; i++) {
        ok &= s[i].offset % CK_DEVCOPY_ALIGN == 0; /* aligned */
        ok &= s[i].offset >= end;                  /* in order, no overlap */
        if (s[i].nbytes)
            end = s[i].offset + s[i].nbytes;
    }
    CHECK(ok);
    CHECK(total >= end);
    CHECK(total < end + CK_DEVCOPY_ALIGN); /* no slack beyond the last segment's padding */
    CHECK(s[0].offset == 0);

    size_t t0 = 99;
    CHECK(ck_devcopy_plan(s, 0, CK_DEVCOPY_ALIGN, &t0, &err) == CK_OK);
    CHECK(t0 == 0);

    CHECK(ck_devcopy_plan(s, 6, 48, &total, &err) == CK_E_RANGE); /* not a power of two */
    ck_devcopy_segment neg = {0x1000, 8, -1, 0};
    CHECK(ck_devcopy_plan(&neg, 1, 64, &total, &err) == CK_E_RANGE);
    ck_devcopy_segment big[2] = {{0x1000, SIZE_MAX / 2 + 1, 0, 0},
                                 {0x2000, SIZE_MAX / 2 + 1, 0, 0}};
    CHECK(ck_devcopy_plan(big, 2, 64, &total, &err) == CK_E_LIMIT); /* sum overflows */
}

int main(void) {
    test_zip_roundtrip(64);
    test_zip_roundtrip(4096);
    test_zipw_refusals();
    test_serial_id();
    test_devcopy_plan();
    return check_report("test_write");
}

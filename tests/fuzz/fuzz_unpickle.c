/* libFuzzer harness for the pickle machine: each input becomes the data.pkl
 * of a torch-shaped zip archive (stored records, written here) that also
 * holds byteorder, version and sixteen storage records data/0 .. data/15 of
 * 256 bytes, so that persistent ids naming small storages resolve and the
 * tensor-building paths run. The archive goes to ckptio.load through the
 * embedded interpreter (pyembed.h). Built with -DCK_FUZZ_REPLAY, main()
 * replays files. */
#include <string.h>
#include <zlib.h>

#include "pyembed.h"
#include "replay.h"

#define N_STORAGES 16
#define STORAGE_BYTES 256

typedef struct out {
    uint8_t *buf;
    size_t len, cap;
} out;

static void put(out *o, const void *p, size_t n) {
    if (o->len + n > o->cap) {
        size_t cap = o->cap ? o->cap : 4096;
        while (cap < o->len + n)
            cap *= 2;
        uint8_t *b = realloc(o->buf, cap);
        if (b == NULL)
            abort();
        o->buf = b;
        o->cap = cap;
    }
    if (n > 0)
        memcpy(o->buf + o->len, p, n);
    o->len += n;
}

static void le(out *o, uint64_t v, int bytes) {
    uint8_t b[8];
    for (int i = 0; i < bytes; i++)
        b[i] = (uint8_t)(v >> (8 * i));
    put(o, b, (size_t)bytes);
}

typedef struct rec {
    char name[32];
    const uint8_t *data;
    size_t len;
    size_t offset;
    uint32_t crc;
} rec;

static uint8_t storage_bytes[STORAGE_BYTES];

/* What a local header and its central entry share: version 2.0 needed, no
 * flags, stored, no time or date, the CRC and both sizes, the name's length
 * and no extra field. */
static void shared_fields(out *o, const rec *r, size_t nl) {
    le(o, 20, 2);
    le(o, 0, 2);
    le(o, 0, 2);
    le(o, 0, 4);
    le(o, r->crc, 4);
    le(o, r->len, 4);
    le(o, r->len, 4);
    le(o, nl, 2);
    le(o, 0, 2);
}

static void build(out *o, const uint8_t *pkl, size_t pkl_len) {
    rec recs[3 + N_STORAGES];
    size_t n = 0;
    snprintf(recs[n].name, sizeof recs[n].name, "a/data.pkl");
    recs[n].data = pkl;
    recs[n++].len = pkl_len;
    snprintf(recs[n].name, sizeof recs[n].name, "a/byteorder");
    recs[n].data = (const uint8_t *)"little";
    recs[n++].len = 6;
    for (int i = 0; i < N_STORAGES; i++) {
        snprintf(recs[n].name, sizeof recs[n].name, "a/data/%d", i);
        recs[n].data = storage_bytes;
        recs[n++].len = STORAGE_BYTES;
    }
    snprintf(recs[n].name, sizeof recs[n].name, "a/version");
    recs[n].data = (const uint8_t *)"3\n";
    recs[n++].len = 2;
    o->len = 0;
    for (size_t i = 0; i < n; i++) {
        rec *r = &recs[i];
        size_t nl = strlen(r->name);
        r->offset = o->len;
        r->crc = (uint32_t)crc32(0, r->data, (uInt)r->len);
        le(o, 0x04034b50u, 4);
        shared_fields(o, r, nl);
        put(o, r->name, nl);
        put(o, r->data, r->len);
    }
    size_t cd = o->len;
    for (size_t i = 0; i < n; i++) {
        rec *r = &recs[i];
        size_t nl = strlen(r->name);
        le(o, 0x02014b50u, 4);
        le(o, 20, 2); /* made by version 2.0 */
        shared_fields(o, r, nl);
        le(o, 0, 2);
        le(o, 0, 2);
        le(o, 0, 2);
        le(o, 0, 4);
        le(o, r->offset, 4);
        put(o, r->name, nl);
    }
    size_t cd_size = o->len - cd;
    le(o, 0x06054b50u, 4);
    le(o, 0, 2);
    le(o, 0, 2);
    le(o, n, 2);
    le(o, n, 2);
    le(o, cd_size, 4);
    le(o, cd, 4);
    le(o, 0, 2);
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc;
    (void)argv;
    for (size_t i = 0; i < STORAGE_BYTES; i++)
        storage_bytes[i] = (uint8_t)(i * 37 + 11);
    ck_fuzz_python_init();
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static out o;
    if (size > (1 << 20))
        return 0; /* keep the archive's 32-bit fields honest */
    build(&o, data, size);
    ck_fuzz_python_load(o.buf, o.len);
    return 0;
}

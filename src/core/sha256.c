#include "sha256.h"
#include "dynlib.h"

#include <dlfcn.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

/* ---- libcrypto, opened at run time ---------------------------------------
 * The EVP digest API is the same in OpenSSL 1.1 and 3; the prototypes are
 * declared here so that the build needs no OpenSSL headers. */

typedef void evp_md_ctx;
typedef void evp_md;

static struct {
    evp_md_ctx *(*ctx_new)(void);
    void (*ctx_free)(evp_md_ctx *);
    const evp_md *(*sha256)(void);
    int (*init)(evp_md_ctx *, const evp_md *, void *);
    int (*update)(evp_md_ctx *, const void *, size_t);
    int (*final)(evp_md_ctx *, unsigned char *, unsigned int *);
    const char *name; /* the file opened, or NULL */
} evp;

static pthread_once_t evp_once = PTHREAD_ONCE_INIT;

/* Takes the libcrypto at h (ck_dl_open_first) when it has the EVP digest API. */
static int accept_crypto(void *h, const char *name) {
    *(void **)&evp.ctx_new = dlsym(h, "EVP_MD_CTX_new");
    *(void **)&evp.ctx_free = dlsym(h, "EVP_MD_CTX_free");
    *(void **)&evp.sha256 = dlsym(h, "EVP_sha256");
    *(void **)&evp.init = dlsym(h, "EVP_DigestInit_ex");
    *(void **)&evp.update = dlsym(h, "EVP_DigestUpdate");
    *(void **)&evp.final = dlsym(h, "EVP_DigestFinal_ex");
    if (evp.ctx_new && evp.ctx_free && evp.sha256 && evp.init && evp.update && evp.final) {
        evp.name = name;
        return 1;
    }
    memset(&evp, 0, sizeof evp);
    return 0;
}

static void evp_load(void) {
    /* CKPTIO_LIBCRYPTO, when set, is the only file tried */
    static const char *const names[] = {"libcrypto.so.3", "libcrypto.so.1.1"};
    ck_dl_open_first("CKPTIO_LIBCRYPTO", names, sizeof names / sizeof names[0], accept_crypto,
                     NULL);
}

/* ---- the portable implementation (FIPS 180-4) ----------------------------- */

typedef struct builtin_ctx {
    uint32_t h[8];
    uint64_t bytes;
    unsigned char block[64];
    size_t used;
} builtin_ctx;

static const uint32_t K[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
};

static uint32_t ror(uint32_t x, unsigned n) {
    return (x >> n) | (x << (32 - n));
}

static void compress(uint32_t h[8], const unsigned char *p) {
    uint32_t w[64];
    for (int i = 0; i < 16; i++)
        w[i] = (uint32_t)p[4 * i] << 24 | (uint32_t)p[4 * i + 1] << 16 |
               (uint32_t)p[4 * i + 2] << 8 | (uint32_t)p[4 * i + 3];
    for (int i = 16; i < 64; i++) {
        uint32_t s0 = ror(w[i - 15], 7) ^ ror(w[i - 15], 18) ^ (w[i - 15] >> 3);
        uint32_t s1 = ror(w[i - 2], 17) ^ ror(w[i - 2], 19) ^ (w[i - 2] >> 10);
        w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4], f = h[5], g = h[6], k = h[7];
    for (int i = 0; i < 64; i++) {
        uint32_t t1 =
            k + (ror(e, 6) ^ ror(e, 11) ^ ror(e, 25)) + ((e & f) ^ (~e & g)) + K[i] + w[i];
        uint32_t t2 = (ror(a, 2) ^ ror(a, 13) ^ ror(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
        k = g;
        g = f;
        f = e;
        e = d + t1;
        d = c;
        c = b;
        b = a;
        a = t1 + t2;
    }
    h[0] += a, h[1] += b, h[2] += c, h[3] += d, h[4] += e, h[5] += f, h[6] += g, h[7] += k;
}

static void builtin_reset(builtin_ctx *c) {
    static const uint32_t init[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                                     0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
    memcpy(c->h, init, sizeof init);
    c->bytes = 0;
    c->used = 0;
}

static void builtin_update(builtin_ctx *c, const unsigned char *p, size_t n) {
    c->bytes += n;
    if (c->used > 0) {
        size_t take = 64 - c->used < n ? 64 - c->used : n;
        memcpy(c->block + c->used, p, take);
        c->used += take;
        p += take;
        n -= take;
        if (c->used < 64)
            return;
        compress(c->h, c->block);
        c->used = 0;
    }
    for (; n >= 64; p += 64, n -= 64)
        compress(c->h, p);
    memcpy(c->block, p, n);
    c->used = n;
}

static void builtin_final(builtin_ctx *c, unsigned char md[32]) {
    uint64_t bits = c->bytes * 8;
    unsigned char pad[72] = {0x80};
    size_t padlen = (c->used < 56 ? 56 : 120) - c->used;
    for (int i = 0; i < 8; i++)
        pad[padlen + i] = (unsigned char)(bits >> (56 - 8 * i));
    builtin_update(c, pad, padlen + 8);
    for (int i = 0; i < 8; i++) {
        md[4 * i] = (unsigned char)(c->h[i] >> 24);
        md[4 * i + 1] = (unsigned char)(c->h[i] >> 16);
        md[4 * i + 2] = (unsigned char)(c->h[i] >> 8);
        md[4 * i + 3] = (unsigned char)c->h[i];
    }
}

/* ---- the public API ---------------------------------------------------------- */

struct ck_sha256 {
    evp_md_ctx *evp; /* NULL: the builtin context */
    builtin_ctx b;
};

ck_sha256 *ck_sha256_new(int builtin) {
    pthread_once(&evp_once, evp_load);
    ck_sha256 *c = calloc(1, sizeof *c);
    if (c == NULL)
        return NULL;
    if (!builtin && evp.name != NULL) {
        c->evp = evp.ctx_new();
        if (c->evp == NULL) {
            free(c);
            return NULL;
        }
    }
    if (ck_sha256_reset(c) != 0) {
        ck_sha256_free(c);
        return NULL;
    }
    return c;
}

int ck_sha256_reset(ck_sha256 *c) {
    if (c->evp != NULL)
        return evp.init(c->evp, evp.sha256(), NULL) == 1 ? 0 : -1;
    builtin_reset(&c->b);
    return 0;
}

void ck_sha256_update(ck_sha256 *c, const void *data, size_t len) {
    if (c->evp != NULL)
        evp.update(c->evp, data, len);
    else
        builtin_update(&c->b, data, len);
}

int ck_sha256_final(ck_sha256 *c, unsigned char md[32]) {
    if (c->evp != NULL) {
        unsigned char out[64];
        unsigned int n = 0;
        if (evp.final(c->evp, out, &n) != 1 || n != 32)
            return -1;
        memcpy(md, out, 32);
        return 0;
    }
    builtin_final(&c->b, md);
    return 0;
}

void ck_sha256_free(ck_sha256 *c) {
    if (c == NULL)
        return;
    if (c->evp != NULL)
        evp.ctx_free(c->evp);
    free(c);
}

const char *ck_sha256_backend(void) {
    pthread_once(&evp_once, evp_load);
    return evp.name != NULL ? evp.name : "builtin";
}

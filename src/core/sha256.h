/* SHA-256 of downloads (torch.hub's "name-<sha256 prefix>.pth" check).
 *
 * OpenSSL's libcrypto is opened at run time (dlopen of libcrypto.so.3, then
 * libcrypto.so.1.1; CKPTIO_LIBCRYPTO names the one file to try) for its SHA-NI and
 * AVX2 code, about 2 GB/s here; where no libcrypto can be opened the digest
 * is computed by the portable implementation in sha256.c (FIPS 180-4), so a
 * wheel needs no libcrypto to check hashes. Both give the same digest; the
 * tests compare them with hashlib.
 */
#ifndef CKPTIO_CORE_SHA256_H
#define CKPTIO_CORE_SHA256_H

#include <stddef.h>
#include <stdint.h>

typedef struct ck_sha256 ck_sha256;

/* A context ready for data (backend chosen on the first call in the
 * process), or NULL when out of memory. builtin != 0 forces the portable
 * code (tests). */
ck_sha256 *ck_sha256_new(int builtin);

/* Starts over. Returns 0, or -1 when the backend fails. */
int ck_sha256_reset(ck_sha256 *c);

void ck_sha256_update(ck_sha256 *c, const void *data, size_t len);

/* The digest of everything since the last reset. Returns 0 or -1. */
int ck_sha256_final(ck_sha256 *c, unsigned char md[32]);

void ck_sha256_free(ck_sha256 *c);

/* "libcrypto.so.3" (the file opened) or "builtin": the backend that new
 * contexts use. */
const char *ck_sha256_backend(void);

#endif

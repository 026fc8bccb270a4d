/* CRC-32 (the zip/gzip polynomial), computed with libdeflate, which is
 * several times faster than zlib's crc32 on this class of machine. */
#ifndef CKPTIO_CORE_CRC_H
#define CKPTIO_CORE_CRC_H

#include <stddef.h>
#include <stdint.h>

/* Continues a CRC-32: pass 0 as crc for the first block. Accepts any len,
 * including blocks larger than 4 GiB. */
uint32_t ck_crc32(uint32_t crc, const void *data, size_t len);

#endif

#include "crc.h"

#include <libdeflate.h>
#include <zlib.h>

uint32_t ck_crc32(uint32_t crc, const void *data, size_t len) {
    return libdeflate_crc32(crc, data, len);
}

uint32_t ck_crc32_zlib(uint32_t crc, const void *data, size_t len) {
    return (uint32_t)crc32_z(crc, data, len);
}

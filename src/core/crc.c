#include "crc.h"

#include <libdeflate.h>

uint32_t ck_crc32(uint32_t crc, const void *data, size_t len) {
    return libdeflate_crc32(crc, data, len);
}

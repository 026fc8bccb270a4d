#include "core/legacy.h"

static void stop(ck_legacy_walk *walk, size_t at, ck_legacy_fault fault, uint64_t count) {
    walk->at = at;
    walk->fault = fault;
    walk->count = count;
}

ck_status ck_legacy_walk_storages(const uint8_t *buf, size_t len, size_t pos, size_t n,
                                  const uint64_t *elsize, const uint64_t *expect, size_t *offset,
                                  size_t *length, ck_legacy_walk *walk, ck_error *err) {
    walk->end = pos;
    stop(walk, 0, CK_LEGACY_OK, 0);
    if (pos > len) {
        stop(walk, 0, CK_LEGACY_START, 0);
        return ck_fail(err, CK_E_RANGE, "the storage data starts at byte %zu, past the end (%zu)",
                       pos, len);
    }
    for (size_t i = 0; i < n; i++) {
        if (len - pos < 8) {
            stop(walk, i, CK_LEGACY_NO_COUNT, 0);
            return ck_fail(err, CK_E_TRUNCATED,
                           "the file ends before the element count of storage %zu (truncated)", i);
        }
        uint64_t count = 0;
        for (int b = 7; b >= 0; b--)
            count = count << 8 | buf[pos + (size_t)b];
        if (expect != NULL && count != expect[i]) {
            stop(walk, i, CK_LEGACY_COUNT_MISMATCH, count);
            return ck_fail(err, CK_E_FORMAT,
                           "storage %zu has %llu elements in the file but %llu expected", i,
                           (unsigned long long)count, (unsigned long long)expect[i]);
        }
        pos += 8;
        uint64_t nbytes;
        if (__builtin_mul_overflow(count, elsize[i], &nbytes)) {
            stop(walk, i, CK_LEGACY_SIZE_OVERFLOW, count);
            return ck_fail(err, CK_E_RANGE,
                           "storage %zu: %llu elements of %llu bytes overflow 64 bits", i,
                           (unsigned long long)count, (unsigned long long)elsize[i]);
        }
        if (nbytes > len - pos) {
            stop(walk, i, CK_LEGACY_NO_DATA, count);
            return ck_fail(err, CK_E_TRUNCATED,
                           "the file ends inside the %llu bytes of storage %zu (truncated)",
                           (unsigned long long)nbytes, i);
        }
        offset[i] = pos;
        length[i] = (size_t)nbytes;
        pos += (size_t)nbytes;
    }
    walk->end = pos;
    return CK_OK;
}

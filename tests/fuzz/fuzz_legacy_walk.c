/* libFuzzer harness for the legacy storage-section walk (src/core/legacy.c),
 * plain C. An input is a small description followed by the section:
 *
 *   byte 0        n = low 4 bits (0..15 storages); bit 4: counts expected
 *   byte 1        pos, where the walk starts in the section (may lie past it)
 *   n bytes       element sizes: e < 0x80 is e bytes, else 1 << (e & 63)
 *   n * 8 bytes   (when bit 4 is set) the expected counts, little-endian
 *   the rest      the section: buf[0 .. len)
 *
 * The section is the input's tail, so a read past its end is a read past
 * the input (AddressSanitizer under libFuzzer; the replay copies each file
 * to an exact-size buffer). Every result is checked against the section
 * itself: the storages before the one at fault (all, on success) lie end
 * to end from pos, each after its 8-byte count, with count * element-size
 * bytes inside the section, and the fault named is the one that is there.
 *
 * Built with -fsanitize=fuzzer (make fuzz) it is a fuzzer; built with
 * -DCK_FUZZ_REPLAY (make fuzz-replay) its main() replays the files and
 * folders given as arguments. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "core/legacy.h"
#include "replay.h"

#define MAX_STORAGES 15

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc;
    (void)argv;
    return 0;
}

static uint64_t le64(const uint8_t *p) {
    uint64_t v = 0;
    for (int b = 7; b >= 0; b--)
        v = v << 8 | p[b];
    return v;
}

/* The status each fault is reported with (legacy.h). */
static ck_status fault_status(ck_legacy_fault fault) {
    switch (fault) {
    case CK_LEGACY_NO_COUNT:
    case CK_LEGACY_NO_DATA:
        return CK_E_TRUNCATED;
    case CK_LEGACY_COUNT_MISMATCH:
        return CK_E_FORMAT;
    case CK_LEGACY_START:
    case CK_LEGACY_SIZE_OVERFLOW:
        return CK_E_RANGE;
    case CK_LEGACY_OK:
        break;
    }
    return CK_OK;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 2)
        return 0;
    size_t n = data[0] & 0x0f, pos = data[1];
    int expected = (data[0] & 0x10) != 0;
    size_t head = 2 + n + (expected ? 8 * n : 0);
    if (size < head)
        return 0;
    uint64_t elsize[MAX_STORAGES], expect[MAX_STORAGES];
    for (size_t i = 0; i < n; i++) {
        uint8_t e = data[2 + i];
        elsize[i] = e < 0x80 ? e : (uint64_t)1 << (e & 63);
        expect[i] = expected ? le64(data + 2 + n + 8 * i) : 0;
    }
    const uint8_t *buf = data + head;
    size_t len = size - head;

    /* out arrays poisoned, so that a storage the walk did not set is seen */
    size_t offset[MAX_STORAGES], length[MAX_STORAGES];
    memset(offset, 0xa5, sizeof offset);
    memset(length, 0xa5, sizeof length);
    ck_legacy_walk walk;
    ck_error err;
    ck_error_clear(&err);
    ck_status rc = ck_legacy_walk_storages(buf, len, pos, n, elsize, expected ? expect : NULL,
                                           offset, length, &walk, &err);

    if (pos > len) {
        if (rc != CK_E_RANGE || walk.fault != CK_LEGACY_START)
            abort();
    }
    if (rc != CK_OK) {
        if (err.msg[0] == 0 || err.status != rc || walk.fault == CK_LEGACY_OK ||
            fault_status(walk.fault) != rc)
            abort(); /* a failure must say why, in fields and in words */
        if (walk.fault != CK_LEGACY_START && walk.at >= n)
            abort();
    } else if (walk.fault != CK_LEGACY_OK) {
        abort();
    }
    if (rc == CK_E_RANGE && walk.fault == CK_LEGACY_START)
        return 0;

    /* the storages the walk set, one after the other from pos */
    size_t done = rc == CK_OK ? n : walk.at, at = pos;
    volatile uint8_t sink = 0;
    for (size_t i = 0; i < done; i++) {
        if (len - at < 8 || offset[i] != at + 8)
            abort();
        uint64_t count = le64(buf + at);
        uint64_t nbytes;
        if ((expected && count != expect[i]) || __builtin_mul_overflow(count, elsize[i], &nbytes) ||
            nbytes != length[i] || length[i] > len - offset[i])
            abort();
        if (length[i] > 0)
            sink ^= buf[offset[i]] ^ buf[offset[i] + length[i] - 1];
        at = offset[i] + length[i];
    }
    (void)sink;
    if (rc == CK_OK) {
        if (walk.end != at)
            abort();
        return 0;
    }

    /* the fault named is the one at that storage */
    size_t i = walk.at;
    if (walk.fault == CK_LEGACY_NO_COUNT) {
        if (len - at >= 8)
            abort();
        return 0;
    }
    if (len - at < 8 || walk.count != le64(buf + at))
        abort();
    uint64_t nbytes;
    int overflows = __builtin_mul_overflow(walk.count, elsize[i], &nbytes);
    if (walk.fault == CK_LEGACY_COUNT_MISMATCH) {
        if (!expected || walk.count == expect[i])
            abort();
    } else if (expected && walk.count != expect[i]) {
        abort(); /* a wrong count is refused before its bytes are measured */
    } else if (walk.fault == CK_LEGACY_SIZE_OVERFLOW) {
        if (!overflows)
            abort();
    } else if (walk.fault == CK_LEGACY_NO_DATA) {
        if (overflows || nbytes <= len - at - 8)
            abort();
    } else {
        abort();
    }
    return 0;
}

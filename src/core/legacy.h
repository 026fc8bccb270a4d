/* The storage section of a legacy stream (torch < 1.6, or
 * _use_new_zipfile_serialization=False), the bytes after its five pickles.
 *
 * For each key of the storage key list, in the list's order, torch wrote
 * the storage's element count as 8 little-endian bytes and then its
 * count * element-size bytes, one storage right after the other. The walk
 * below finds where each storage's bytes lie, checking every count the file
 * gives against the bytes left and its byte size against overflow, before
 * anything is built from it. The pickles themselves (and which element size
 * and count each storage's objects give) are the binding's
 * (src/binding/load_legacy.c).
 */
#ifndef CKPTIO_CORE_LEGACY_H
#define CKPTIO_CORE_LEGACY_H

#include <stddef.h>
#include <stdint.h>

#include "core/status.h"

/* What is wrong with the storage a walk stopped at. */
typedef enum ck_legacy_fault {
    CK_LEGACY_OK = 0,
    CK_LEGACY_START,          /* the section starts past the end of the buffer */
    CK_LEGACY_NO_COUNT,       /* fewer than 8 bytes are left for its element count */
    CK_LEGACY_COUNT_MISMATCH, /* the file's count is not the expected one */
    CK_LEGACY_SIZE_OVERFLOW,  /* count * element size does not fit 64 bits */
    CK_LEGACY_NO_DATA,        /* fewer bytes are left than count * element size */
} ck_legacy_fault;

/* Where a walk ended, or where and why it stopped. */
typedef struct ck_legacy_walk {
    size_t end;            /* on success: the offset just past the last storage's bytes */
    size_t at;             /* on failure: the index of the storage at fault */
    ck_legacy_fault fault; /* on failure: what is wrong with it (CK_LEGACY_OK on success) */
    uint64_t count;        /* on failure: its element count from the file, when it was read */
} ck_legacy_walk;

/* Walks the n storages of a legacy stream's storage section, which starts at
 * buf[pos] and runs to at most buf[len]. elsize[i]: the bytes per element of
 * storage i. expect: NULL, or the element count of each storage as its
 * objects give it; a file count that differs is refused (before its bytes
 * are measured, so the count is what the message names). On CK_OK, storage
 * i's bytes are buf[offset[i] .. offset[i] + length[i]) and walk->end is the
 * offset after the last one (bytes past it are not looked at). On failure
 * (CK_E_TRUNCATED for NO_COUNT and NO_DATA, CK_E_FORMAT for COUNT_MISMATCH,
 * CK_E_RANGE for START and SIZE_OVERFLOW), err says which storage (by index)
 * and what, walk says the same in fields, and offset/length are set for the
 * storages before walk->at only. n == 0 is an empty section: CK_OK, end pos.
 * Reads nothing outside buf[pos .. len); no allocation. */
ck_status ck_legacy_walk_storages(const uint8_t *buf, size_t len, size_t pos, size_t n,
                                  const uint64_t *elsize, const uint64_t *expect, size_t *offset,
                                  size_t *length, ck_legacy_walk *walk, ck_error *err);

#endif

/* The `.data/serialization_id` record torch's zip writer (PyTorchStreamWriter)
 * appends to every archive: 40 ASCII digits, a 20-digit hash of the record
 * names then a 20-digit hash of the records' CRC-32s.
 *
 * torch combines the name hashes in the iteration order of the C++
 * std::unordered_set<std::string> that holds the names, so this unit
 * replays libstdc++'s hashtable (std::hash<std::string>, the prime rehash
 * policy, its node list) to reproduce the digits byte for byte. The CRC half
 * combines, in write order, the CRC of every data descriptor written, i.e.
 * of every record with at least one byte.
 */
#ifndef CKPTIO_CORE_SERIAL_ID_H
#define CKPTIO_CORE_SERIAL_ID_H

#include <stddef.h>
#include <stdint.h>

#include "status.h"

#define CK_SERIAL_ID_LEN 40

typedef struct ck_serial_id {
    uint64_t crc_hash;     /* combined CRC-32s so far */
    size_t count;          /* names added */
    size_t cap;            /* allocated nodes */
    uint64_t *hash;        /* per node: std::hash of its name */
    size_t *next;          /* per node: the next node in iteration order */
    size_t *bucket_before; /* per bucket: the node before its first node */
    size_t buckets;        /* bucket count */
    size_t next_resize;    /* element count that triggers the next rehash */
    size_t head;           /* first node in iteration order */
} ck_serial_id;

/* Starts an empty id. Never fails (allocation happens on the first name). */
void ck_serial_id_init(ck_serial_id *s);

/* Adds a record name (relative, without the archive's folder), in write
 * order. Names must be distinct. Returns CK_OK or CK_E_NOMEM. */
ck_status ck_serial_id_add_name(ck_serial_id *s, const char *name, size_t len, ck_error *err);

/* Adds the CRC-32 of a record's data descriptor, in write order. */
void ck_serial_id_add_crc(ck_serial_id *s, uint32_t crc);

/* Writes the 40 digits (no terminator) to out. */
void ck_serial_id_format(const ck_serial_id *s, char out[CK_SERIAL_ID_LEN]);

/* Releases what s holds; s may be reused after ck_serial_id_init. */
void ck_serial_id_free(ck_serial_id *s);

/* std::hash<std::string> of libstdc++ on 64-bit targets (exposed for tests). */
uint64_t ck_std_string_hash(const void *data, size_t len);

#endif

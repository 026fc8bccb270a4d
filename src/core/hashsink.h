/* A sink that appends bytes to a file and hashes them with SHA-256 at the
 * same time, on two threads: the caller's thread gathers the bytes into
 * 1 MiB slots and writes each full slot, while a worker thread hashes the
 * slots in order. A download thus costs max(receive + write, hash) rather
 * than their sum, and the file gets one write() per MiB.
 *
 * One caller thread at a time; the worker is private. Bytes given to
 * ck_hashsink_put are in the file and in the digest once ck_hashsink_flush
 * returns CK_OK.
 */
#ifndef CKPTIO_CORE_HASHSINK_H
#define CKPTIO_CORE_HASHSINK_H

#include <stddef.h>
#include <stdint.h>

#include "status.h"

typedef struct ck_hashsink ck_hashsink;

/* Makes a sink that appends to fd (opened O_APPEND by the caller, who keeps
 * owning it); path only names the file in messages and must outlive the
 * sink. With writeback set, writeback of the written data is started every
 * 32 MiB (sync_file_range) so that a final fsync has little left to do.
 * Without hash, the sink only gathers and writes (no worker, no digest). */
ck_status ck_hashsink_open(int fd, const char *path, int writeback, int hash, ck_hashsink **out,
                           ck_error *err);

/* Takes n bytes: copied into the current slot; a full slot goes to the
 * worker and is written. Blocks while every slot is still being hashed.
 * Fails with CK_E_IO if a write fails (the sink is then unusable but must
 * still be closed). */
ck_status ck_hashsink_put(ck_hashsink *sink, const void *p, size_t n, ck_error *err);

/* Writes the partly filled slot and waits until the worker has hashed
 * everything. */
ck_status ck_hashsink_flush(ck_hashsink *sink, ck_error *err);

/* Hashes n bytes without writing them (a prefix already in the file).
 * Call only when flushed. */
void ck_hashsink_absorb(ck_hashsink *sink, const void *p, size_t n);

/* Forgets everything hashed so far (after the file was truncated to zero),
 * dropping any bytes not yet flushed without writing them. */
ck_status ck_hashsink_reset(ck_hashsink *sink, ck_error *err);

/* Flushes and writes the digest as 64 lowercase hex digits and a NUL ("" for
 * a sink without hash). */
ck_status ck_hashsink_hex(ck_hashsink *sink, char hex[65], ck_error *err);

/* How many times the sink started writeback (sync_file_range); the C tests
 * check with it that writeback is compiled in. */
uint64_t ck_hashsink_writebacks(const ck_hashsink *sink);

/* Stops the worker and frees the sink (NULL is allowed). Bytes not flushed
 * are dropped. */
void ck_hashsink_close(ck_hashsink *sink);

#endif

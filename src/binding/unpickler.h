/* The pickle VM: protocols 0-5 as one opcode dispatch loop, with a value
 * stack, a separate mark stack and a memo whose dense part is bounded by
 * the pickle's length (a larger index goes to a sparse dict), so that no
 * allocation is ever sized by a number read from the file.
 *
 * Globals resolve through globals.h (the weights-only allowlist by
 * default); persistent ids and torch's tensor rebuild functions go through
 * tensors.h. Every failure names the file, the pickle, the byte offset and
 * the opcode.
 */
#ifndef CKPTIO_BINDING_UNPICKLER_H
#define CKPTIO_BINDING_UNPICKLER_H

#include "session.h"

/* Runs the pickle in data[0 .. len) up to its STOP opcode. `what` names the
 * pickle in messages (e.g. "data.pkl"). On success returns a new reference
 * and, when consumed is not NULL, stores the number of bytes read. */
PyObject *ck_unpickle(ck_session *s, const uint8_t *data, size_t len, const char *what,
                      size_t *consumed);

/* Walks the pickle to its STOP without calling or importing anything,
 * appending every persistent id it meets to the list pids (globals other
 * than storage types read as None). Used to lay out a legacy file's
 * storages before its objects are built. Returns 0 or -1. */
int ck_unpickle_scan(ck_session *s, const uint8_t *data, size_t len, const char *what,
                     size_t *consumed, PyObject *pids);

/* The protocol named by the PROTO opcode of the pickle last run (or
 * scanned) in this session, also when it failed after that opcode; -1 when
 * it had none (protocols 0 and 1 write none). */
int ck_unpickle_protocol(const ck_session *s);

#endif

/* A background thread that computes the CRC-32 of one buffer while the
 * caller writes that buffer out: a save then costs the write alone instead
 * of the write plus the CRC. One job at a time. */
#ifndef CKPTIO_CORE_CRC_WORKER_H
#define CKPTIO_CORE_CRC_WORKER_H

#include <stddef.h>
#include <stdint.h>

#include "status.h"

typedef struct ck_crc_worker ck_crc_worker;

/* Starts the thread. Returns CK_OK, CK_E_NOMEM, or CK_E_IO (no thread). */
ck_status ck_crc_worker_start(ck_crc_worker **out, ck_error *err);

/* Begins the CRC-32 of data[0..len); data must stay valid until
 * ck_crc_worker_wait returns. No job may be in progress. */
void ck_crc_worker_submit(ck_crc_worker *w, const void *data, size_t len);

/* Waits for the job submitted last and returns its CRC-32. */
uint32_t ck_crc_worker_wait(ck_crc_worker *w);

/* Ends the thread (waiting for a job in progress) and frees w. NULL is fine. */
void ck_crc_worker_stop(ck_crc_worker *w);

#endif

/* One status enum and one error record for the whole plain-C core.
 *
 * Every core function that can fail returns a ck_status and, on failure,
 * fills a caller-owned ck_error with a human-readable message (no file
 * name: the binding prefixes the name of the file being read). The binding
 * maps each status to one Python exception type in one place
 * (src/binding/errors.c).
 *
 * This header, like all of src/core, must not include Python.h.
 */
#ifndef CKPTIO_CORE_STATUS_H
#define CKPTIO_CORE_STATUS_H

#include <stddef.h>

typedef enum ck_status {
    CK_OK = 0,
    CK_E_IO,          /* an OS call failed; ck_error.os_errno holds errno */
    CK_E_NOMEM,       /* an allocation failed */
    CK_E_FORMAT,      /* the bytes are not the expected structure */
    CK_E_TRUNCATED,   /* the data ends before a structure it announces */
    CK_E_RANGE,       /* an offset or size lies outside its container, or overlaps */
    CK_E_UNSUPPORTED, /* well-formed, but a feature we do not implement */
    CK_E_CRC,         /* a checksum does not match */
    CK_E_LIMIT,       /* a safety limit was exceeded (sizes, ratios, depth) */
    CK_E_NOTFOUND,    /* a required record is missing */
    CK_E_HTTP,        /* a transfer failed (HTTP status or transport) */
    CK_E_INTERRUPTED, /* the caller asked to stop (signal, callback) */
    CK_STATUS_COUNT
} ck_status;

#define CK_ERROR_MSG_SIZE 512

typedef struct ck_error {
    ck_status status;
    int os_errno;                /* errno for CK_E_IO, else 0 */
    char msg[CK_ERROR_MSG_SIZE]; /* NUL-terminated, never empty after a failure */
} ck_error;

/* Clears err to CK_OK with an empty message. err may be NULL. */
void ck_error_clear(ck_error *err);

/* Records a failure in err (if err is not NULL) and returns status.
 * The message is formatted with printf rules and truncated to fit. */
ck_status ck_fail(ck_error *err, ck_status status, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Like ck_fail with CK_E_IO, appending ": strerror(errnum)" and storing
 * errnum in err->os_errno. */
ck_status ck_fail_errno(ck_error *err, int errnum, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* A short stable name for a status ("format", "truncated", ...). */
const char *ck_status_name(ck_status status);

#endif

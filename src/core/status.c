#include "status.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

void ck_error_clear(ck_error *err) {
    if (err == NULL)
        return;
    err->status = CK_OK;
    err->os_errno = 0;
    err->msg[0] = 0;
}

static ck_status vfail(ck_error *err, ck_status status, int errnum, const char *fmt, va_list ap) {
    if (err == NULL)
        return status;
    err->status = status;
    err->os_errno = errnum;
    int n = vsnprintf(err->msg, sizeof err->msg, fmt, ap);
    if (n < 0 || err->msg[0] == 0)
        snprintf(err->msg, sizeof err->msg, "%s error", ck_status_name(status));
    if (errnum != 0) {
        size_t len = strlen(err->msg);
        if (len < sizeof err->msg - 1)
            snprintf(err->msg + len, sizeof err->msg - len, ": %s", strerror(errnum));
    }
    return status;
}

ck_status ck_fail(ck_error *err, ck_status status, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vfail(err, status, 0, fmt, ap);
    va_end(ap);
    return status;
}

ck_status ck_fail_errno(ck_error *err, int errnum, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vfail(err, CK_E_IO, errnum, fmt, ap);
    va_end(ap);
    return CK_E_IO;
}

const char *ck_status_name(ck_status status) {
    static const char *const names[CK_STATUS_COUNT] = {
        [CK_OK] = "ok",
        [CK_E_IO] = "io",
        [CK_E_NOMEM] = "out of memory",
        [CK_E_FORMAT] = "format",
        [CK_E_TRUNCATED] = "truncated",
        [CK_E_RANGE] = "range",
        [CK_E_UNSUPPORTED] = "unsupported",
        [CK_E_CRC] = "crc",
        [CK_E_LIMIT] = "limit",
        [CK_E_NOTFOUND] = "not found",
        [CK_E_HTTP] = "http",
        [CK_E_INTERRUPTED] = "interrupted",
    };
    if ((unsigned)status >= CK_STATUS_COUNT)
        return "unknown";
    return names[status];
}

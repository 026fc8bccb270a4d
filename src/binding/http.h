/* ckptio._native.download: the Python face of src/core/http (libcurl), and
 * the DownloadError exception it raises. */
#ifndef CKPTIO_BINDING_HTTP_H
#define CKPTIO_BINDING_HTTP_H

#include "state.h"

/* Creates DownloadError (subclass of CheckpointError and OSError) in st and
 * adds it to module m; ck_errors_init must have run. Returns 0 or -1. */
int ck_http_init(PyObject *m, ck_state *st);

/* download(); one of the module's method_groups. */
extern PyMethodDef ck_http_methods[];

#endif

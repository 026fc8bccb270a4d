/* libraries(), sha256(): which run-time libraries the extension opened
 * (libcurl, libcrypto) and the SHA-256 backends, for logs and tests. */
#ifndef CKPTIO_BINDING_LIBS_H
#define CKPTIO_BINDING_LIBS_H

#include "state.h"

extern PyMethodDef ck_libs_methods[];

#endif

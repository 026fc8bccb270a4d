/* ckptio._native.pread_into, pread_file and mapping_span: file bytes read
 * with large pread()s, the GIL released, straight into memory that already
 * exists (a model's parameters: ckptio/_direct.py) or into one fresh heap
 * buffer (mmap=False loads), on one or two threads. */
#ifndef CKPTIO_BINDING_READINTO_H
#define CKPTIO_BINDING_READINTO_H

#include "state.h"

/* The unit's module functions: pread_into, pread_file, mapping_span. */
extern PyMethodDef ck_readinto_methods[];

#endif

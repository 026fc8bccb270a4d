/* ckptio._native.read_ahead and read_ahead_stop: the read-ahead thread of
 * core/ahead.c over byte ranges of a mapped checkpoint, for Python code that
 * then reads those bytes in file order through the mapping (the tensors
 * load_state_dict copies when they cannot be read straight into the model,
 * a conversion's export). */
#ifndef CKPTIO_BINDING_READAHEAD_H
#define CKPTIO_BINDING_READAHEAD_H

#include "state.h"

/* The unit's module functions: read_ahead, read_ahead_stop. */
extern PyMethodDef ck_readahead_methods[];

#endif

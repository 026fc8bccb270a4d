/* ckptio._native.save: pickles an object the way torch.save does (protocol
 * 2, CPython's C pickler, a persistent_id written in C) and writes torch's
 * zip layout, tensor bytes straight from tensor memory, to a temporary file
 * renamed over the target, or to a binary file object. Also crc32 for the
 * benchmark. */
#ifndef CKPTIO_BINDING_SAVE_H
#define CKPTIO_BINDING_SAVE_H

#include "state.h"

extern PyMethodDef ck_save_methods[];

#endif

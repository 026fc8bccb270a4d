/* ckptio._native.revise_keys: mmcv's loop of re.sub over state_dict keys,
 * done in C. */
#ifndef CKPTIO_BINDING_KEYS_H
#define CKPTIO_BINDING_KEYS_H

#include "state.h"

/* The unit's module functions: revise_keys. */
extern PyMethodDef ck_keys_methods[];

#endif

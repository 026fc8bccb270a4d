/* ckptio.verify's native half: integrity checks of one checkpoint without
 * building its objects (see verify.c). */
#ifndef CKPTIO_BINDING_VERIFY_H
#define CKPTIO_BINDING_VERIFY_H

#include "state.h"

/* The functions this unit adds to ckptio._native (module.c's method_groups). */
extern PyMethodDef ck_verify_methods[];

#endif

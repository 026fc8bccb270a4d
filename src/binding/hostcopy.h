/* ckptio._native.copy_to_host: one batch of device-to-host copies into a
 * pinned arena (src/core/devcopy), and HostArena, the object that owns the
 * arena and frees it when the last buffer exported from it is released. */
#ifndef CKPTIO_BINDING_HOSTCOPY_H
#define CKPTIO_BINDING_HOSTCOPY_H

#include "state.h"

/* The unit's functions, added to the module through method_groups[]. */
/* Makes the HostArena type (module state, and the module's HostArena). */
int ck_hostcopy_init(PyObject *m, ck_state *st);

extern PyMethodDef ck_hostcopy_methods[];

#endif

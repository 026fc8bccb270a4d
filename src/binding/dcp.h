/* ckptio._native's half of ckptio.dcp (torch.distributed.checkpoint's
 * file-system layout): decoding one TORCH_SAVE item of a .distcp file with
 * the loader, in place over the file's mapping; running a .metadata pickle
 * through the loader's VM under an allowlist; and AtomicFile, the
 * sequential writer (src/core/atomic.c + the zip writer's descriptor sink)
 * that the saver writes each .distcp file through. */
#ifndef CKPTIO_BINDING_DCP_H
#define CKPTIO_BINDING_DCP_H

#include "state.h"

/* The unit's functions, added to the module through method_groups[]. */
/* Makes the AtomicFile type (module state, and the module's AtomicFile). */
int ck_dcp_init(PyObject *m, ck_state *st);

extern PyMethodDef ck_dcp_methods[];

#endif

/* What a pickle's GLOBAL may name, and what may be called.
 *
 * weights_only=True (the default): a global resolves only through torch's
 * own default allowlist (torch._weights_only_unpickler._get_allowed_globals,
 * read from the installed torch) or the user's (ckptio.add_safe_globals and
 * torch.serialization.add_safe_globals); the modules sys, os, posix and nt
 * are refused even when allowlisted, as torch does. numpy.core.* and
 * numpy._core.* name the same objects (NumPy 1 and 2 spellings).
 * weights_only=False: any global is imported, as torch's unpickler does
 * (legacy storage names map to torch's StorageType, torch.tensor to
 * torch._tensor, Python 2 names through _compat_pickle).
 */
#ifndef CKPTIO_BINDING_GLOBALS_H
#define CKPTIO_BINDING_GLOBALS_H

#include "session.h"

/* The object a GLOBAL (module, name) names; new reference, or NULL with
 * ckptio.UnpicklingError (refused) or the import error set. proto is the
 * pickle's protocol (Python 2 renames apply below 3). */
PyObject *ck_resolve_global(ck_session *s, PyObject *module, PyObject *name, int proto);

/* 1 if obj may be called (REDUCE, NEWOBJ, INST, OBJ) or built (BUILD on an
 * instance of it) under weights_only: it is one of the allowlisted objects. */
int ck_is_allowed_object(ck_session *s, PyObject *obj);

/* A new set of the ids (PyLong_FromVoidPtr) of dict's values; NULL with an
 * exception set. */
PyObject *ck_ids_of_values(PyObject *dict);

/* Builds s->user_ids from s->user_globals. */
int ck_user_globals_prepare(ck_session *s);

#endif

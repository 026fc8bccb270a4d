/* The pickling half of ckptio._native.save: torch.save's persistent_id and
 * the common case of torch.Tensor.__reduce_ex__, in C, run by CPython's C
 * pickler at protocol 2.
 *
 * The pickler class (ckptio._native.SavePickler, a subclass of
 * _pickle.Pickler) is made once, when the module is imported, and holds
 * nothing. Each save makes one SaveState object, a heap object holding that
 * save's storages and ids, and hands its two bound methods to its pickler
 * instance as that instance's persistent_id and reducer_override: the state
 * lives exactly as long as someone references it, never as a pointer into a
 * C stack frame. The class reached later through
 * pickle.Pickler.__subclasses__() is a plain pickler; a SaveState reached
 * after its save has its tables cleared and refuses to run.
 *
 * torch's objects come from the module state (configure()).
 */
#ifndef CKPTIO_BINDING_SAVE_HOOKS_H
#define CKPTIO_BINDING_SAVE_HOOKS_H

#include "state.h"

typedef struct ck_save_state {
    PyObject_HEAD int fast; /* reducer_override may reduce plain tensors itself */
    PyObject *ids;          /* dict: storage._cdata -> key; NULL once the save ended */
    PyObject *storages;     /* list: storage per key, in key order */
    PyObject *dtypes;       /* dict: data_ptr -> dtype (one memory saved as two dtypes) */
} ck_save_state;

/* The type name of storage.device ("cpu", "cuda", "meta"...), new reference. */
PyObject *ck_device_type(ck_state *st, PyObject *storage);

/* Makes the SaveState type and the SavePickler class (module state). */
int ck_save_hooks_init(PyObject *m, ck_state *st);

/* Pickles obj at protocol 2 with torch's persistent ids into a new BytesIO
 * (returned) and sets *state to the save's state (new reference), whose
 * storages list names the storages to write in key order. fast: whether
 * plain tensors may be reduced in C (not under torch's skip_data or fake
 * tensor modes). Returns NULL with an exception set on failure. */
PyObject *ck_save_pickle(ck_state *st, PyObject *obj, int fast, ck_save_state **state);

/* Ends a save's state: its tables are dropped, and its hooks refuse to run
 * from then on. Releases the reference. */
void ck_save_state_end(ck_save_state *state);

#endif

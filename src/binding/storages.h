/* The storages of one load: their slots, the persistent ids that name them,
 * and where their bytes live.
 *
 * A persistent id ('storage', storage_type, key, location, numel) claims
 * the slot of its zip entry (or legacy record) and returns a StorageRef, a
 * small object naming the slot, never a torch storage. A RefTuple is a
 * tuple holding StorageRefs (or other RefTuples), built by ck_tuple_steal.
 *
 * Placement happens once per storage, on first use: the bytes are taken
 * where they lie in the file (or from the inflated entry), copied once more
 * only to byte-swap or align them, and map_location decides the device,
 * calling torch's restore_location where torch would. The answer is kept in
 * the slot (e->place, e->ustorage), so every tensor over one storage shares
 * one placement.
 *
 * The rebuilds (rebuild.c) and materialisation (materialize.c) are the only
 * users of the helpers below the line.
 */
#ifndef CKPTIO_BINDING_STORAGES_H
#define CKPTIO_BINDING_STORAGES_H

#include "session.h"

/* Creates the StorageRef and RefTuple types in st. */
int ck_tensors_init(PyObject *m, ck_state *st);

/* 1 if obj is a StorageRef. */
int ck_is_storage_ref(ck_state *st, PyObject *obj);

/* 1 if obj is a StorageRef or a RefTuple (a tuple holding either). */
int ck_holds_refs(ck_state *st, PyObject *obj);

/* A tuple of the n items (references stolen, also on failure): a RefTuple
 * when an item holds storage references, else a plain tuple. */
PyObject *ck_tuple_steal(ck_session *s, PyObject **items, Py_ssize_t n);

/* Allocates the session's storage slots (one per zip entry). */
int ck_storages_alloc(ck_session *s, size_t n);

/* Releases every reference the slots hold and frees them. */
void ck_storages_release(ck_session *s);

/* Resolves a persistent id ('storage', storage_type, key, location, numel)
 * to a new reference to the storage's StorageRef. */
PyObject *ck_persistent_load(ck_session *s, PyObject *pid);

/* ---- for rebuild.c and materialize.c -------------------------------- */

#include "npy.h"

typedef struct ck_storage_ref {
    PyObject_HEAD Py_ssize_t slot;
} ck_storage_ref;

/* The slot a StorageRef names, or -1 when obj is none. */
static inline Py_ssize_t ck_ref_slot(ck_state *st, PyObject *obj) {
    return ck_is_storage_ref(st, obj) ? ((ck_storage_ref *)obj)->slot : -1;
}

/* Places the storage in `slot` (its bytes, then its device through
 * map_location / restore), read as tensor_dtype where the bytes need a
 * swap. Sets e->place; 0, or -1 with an exception set. */
int ck_storage_place(ck_session *s, Py_ssize_t slot, ck_storage *e, int tensor_dtype);

/* The storage's UntypedStorage on the CPU over its placed bytes (cached in
 * e->ustorage; borrowed), or NULL with an exception set. */
PyObject *ck_storage_cpu_untyped(ck_session *s, ck_storage *e);

/* A writable NumPy array of `type` over ptr (a shared empty buffer when ptr
 * is NULL), kept alive by owner. New reference. */
PyObject *ck_array_over(PyObject *owner, uint8_t *ptr, int type, int nd, npy_intp *dims,
                        npy_intp *strides);

#endif

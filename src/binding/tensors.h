/* Storages and tensors of one load.
 *
 * A persistent id names a storage; ck_persistent_load returns a StorageRef
 * (a small object naming the storage's slot) instead of a torch storage,
 * so that the common case builds no storage object at all. The native
 * rebuild functions turn a StorageRef into a tensor:
 *   - a tensor that covers its whole storage from offset 0 (nearly every
 *     state-dict entry) is one torch.from_numpy call on a NumPy array over
 *     the mapped bytes, with the tensor's own shape and strides;
 *   - any other tensor (views, shared storages) is template.new().set_(
 *     untyped_storage, offset, size, stride), exactly as torch does, so it
 *     is not an autograd view and shares the storage with the others.
 * A StorageRef never reaches Python code, a result or a container other
 * than a tuple: a tuple built over one is a RefTuple (ck_tuple_steal), and
 * wherever the pickle machine hands an object on (to a call, into a list,
 * dict or set, as the result) it hands ck_clean(object): the TypedStorage
 * torch.load would have made, or the RefTuple's plain twin. So nothing is
 * ever walked to find references, and each argument costs O(1).
 */
#ifndef CKPTIO_BINDING_TENSORS_H
#define CKPTIO_BINDING_TENSORS_H

#include "session.h"

/* Creates the StorageRef type in st. */
int ck_tensors_init(PyObject *m, ck_state *st);

/* 1 if obj is a StorageRef. */
int ck_is_storage_ref(ck_state *st, PyObject *obj);

/* Allocates the session's storage slots (one per zip entry). */
int ck_storages_alloc(ck_session *s, size_t n);

/* Releases every reference the slots hold and frees them. */
void ck_storages_release(ck_session *s);

/* Resolves a persistent id ('storage', storage_type, key, location, numel)
 * to a new reference to the storage's StorageRef. */
PyObject *ck_persistent_load(ck_session *s, PyObject *pid);

/* If func (called with args) is one of torch's tensor rebuild functions
 * that ckptio builds natively, and args name a StorageRef, builds the
 * result and returns a new reference; *handled is set to 1. Otherwise
 * returns NULL with *handled 0 and no exception. */
PyObject *ck_native_call(ck_session *s, PyObject *func, PyObject *args, int *handled);

/* The TypedStorage torch.load gives for the storage behind ref (cached per
 * storage, so repeated references give the same object). */
PyObject *ck_storage_materialize(ck_session *s, PyObject *ref);

/* 1 if obj is a StorageRef or a RefTuple (a tuple holding either). */
int ck_holds_refs(ck_state *st, PyObject *obj);

/* A tuple of the n items (references stolen, also on failure): a RefTuple
 * when an item holds storage references, else a plain tuple. */
PyObject *ck_tuple_steal(ck_session *s, PyObject **items, Py_ssize_t n);

/* obj as Python code may see it (new reference): a StorageRef becomes its
 * TypedStorage, a RefTuple its twin (a plain tuple of clean items, made
 * once per RefTuple); anything else is itself. O(1) unless a twin is made,
 * and each RefTuple is copied at most once per load. */
PyObject *ck_clean(ck_session *s, PyObject *obj);

#endif

/* Storages handed to Python code: the only way a StorageRef or RefTuple
 * leaves the pickle machine.
 *
 * Wherever the machine hands an object on (to a call, into a list, dict or
 * set, as the result) it hands ck_clean(object): the TypedStorage
 * torch.load would have made for a StorageRef (one per storage, cached), or
 * a RefTuple's plain twin (made once per RefTuple). So nothing is ever
 * walked to find references, and each argument costs O(1).
 */
#ifndef CKPTIO_BINDING_MATERIALIZE_H
#define CKPTIO_BINDING_MATERIALIZE_H

#include "session.h"

/* The TypedStorage torch.load gives for the storage behind ref (cached per
 * storage, so repeated references give the same object). */
PyObject *ck_storage_materialize(ck_session *s, PyObject *ref);

/* obj as Python code may see it (new reference): a StorageRef becomes its
 * TypedStorage, a RefTuple its twin (a plain tuple of clean items, made
 * once per RefTuple); anything else is itself. O(1) unless a twin is made,
 * and each RefTuple is copied at most once per load. */
PyObject *ck_clean(ck_session *s, PyObject *obj);

#endif

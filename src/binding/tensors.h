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
 *
 * Three files, one concern each: storages.h (slots, persistent ids,
 * placement), rebuild.h (the native rebuild functions), materialize.h
 * (storages and twins handed to Python code). This header gathers them for
 * the session, the loaders and the pickle machine.
 */
#ifndef CKPTIO_BINDING_TENSORS_H
#define CKPTIO_BINDING_TENSORS_H

#include "materialize.h"
#include "rebuild.h"
#include "storages.h"

#endif

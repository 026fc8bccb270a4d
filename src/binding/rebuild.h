/* torch's tensor rebuild functions, done natively for the common cases.
 *
 * _rebuild_tensor, _rebuild_tensor_v2, _rebuild_tensor_v3,
 * _rebuild_parameter, _rebuild_parameter_with_state and
 * _rebuild_from_type_v2 over a plain Tensor, when their storage argument is
 * a StorageRef (storages.h):
 *   - a tensor that covers its whole storage from offset 0 (nearly every
 *     state-dict entry) is one torch.from_numpy call on a NumPy array over
 *     the mapped bytes, with the tensor's own shape and strides;
 *   - any other tensor (views, shared storages) is template.new().set_(
 *     untyped_storage, offset, size, stride), exactly as torch does, so it
 *     is not an autograd view and shares the storage with the others.
 * Every size, stride and offset is checked against the storage before a
 * byte is touched; requires_grad, hooks, metadata and Parameter state are
 * applied as torch applies them.
 */
#ifndef CKPTIO_BINDING_REBUILD_H
#define CKPTIO_BINDING_REBUILD_H

#include "session.h"

/* If func (called with args) is one of torch's tensor rebuild functions
 * that ckptio builds natively, and args name a StorageRef, builds the
 * result and returns a new reference; *handled is set to 1. Otherwise
 * returns NULL with *handled 0 and no exception. */
PyObject *ck_native_call(ck_session *s, PyObject *func, PyObject *args, int *handled);

#endif

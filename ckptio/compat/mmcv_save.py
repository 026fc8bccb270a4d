"""mmcv 1.7.2's save surface (mmcv/runner/checkpoint.py): weights_to_cpu,
_save_to_state_dict, get_state_dict and save_checkpoint, with the same
arguments, results and exception messages.

Two things differ from mmcv, neither visible in the results:
- weights_to_cpu copies every CUDA tensor in one batch through one pinned
  host arena (see _hostcopy) instead of one synchronous .cpu() per tensor;
- a local checkpoint is written by ckptio's own writer straight to its path
  instead of torch.save into memory followed by a second write.

mmcv is optional: its names (is_module_wrapper, FileClient, the version) are
looked up at call time, so code that patches mmcv patches this module too.
"""
import io
import os
import os.path as osp
import time
from collections import OrderedDict
from tempfile import TemporaryDirectory
from typing import Optional

import torch
from torch.optim import Optimizer

from .. import _hostcopy

__all__ = ["weights_to_cpu", "get_state_dict", "save_checkpoint"]


def _writer():
    """The function that writes a checkpoint: writer(obj, path_or_file).

    ckptio.save (atomic, written from the tensors' own memory), looked up at
    call time so that a test or a user can replace ckptio.saving.save.
    """
    from .. import saving

    return saving.save


def _mmcv():
    """mmcv, or None when it is not installed."""
    try:
        import mmcv
    except ImportError:
        return None
    return mmcv


def _is_module_wrapper(module) -> bool:
    """mmcv's is_module_wrapper (its registry of wrappers), else torch's
    DataParallel and DistributedDataParallel: the same test as the load
    side's (ckptio.compat.base.is_module_wrapper)."""
    from .base import is_module_wrapper

    return is_module_wrapper(module)


def weights_to_cpu(state_dict: OrderedDict) -> OrderedDict:
    """Copy a model state_dict to cpu.

    Same result as mmcv's weights_to_cpu (an OrderedDict of val.cpu() with
    the source's _metadata), but all CUDA tensors are copied in one batch,
    and tensors that shared one CUDA storage share one CPU storage.

    Args:
        state_dict (OrderedDict): Model weights on GPU.

    Returns:
        OrderedDict: Model weights on CPU.
    """
    items = list(state_dict.items())
    copied = _hostcopy.batch_to_cpu(val for _, val in items)
    state_dict_cpu = OrderedDict()
    for key, val in items:
        moved = copied.get(id(val))
        state_dict_cpu[key] = moved if moved is not None else val.cpu()
    # Keep metadata in state_dict
    state_dict_cpu._metadata = getattr(state_dict, "_metadata", OrderedDict())  # type: ignore
    return state_dict_cpu


def _save_to_state_dict(
    module: torch.nn.Module, destination: dict, prefix: str, keep_vars: bool
) -> None:
    """Saves module state to `destination` dictionary.

    As mmcv: unlike torch.nn.Module._save_to_state_dict, non-persistent
    buffers are saved too (mmcv keeps them to allow nn.BatchNorm2d).
    """
    for name, param in module._parameters.items():
        if param is not None:
            destination[prefix + name] = param if keep_vars else param.detach()
    for name, buf in module._buffers.items():
        if buf is not None:
            destination[prefix + name] = buf if keep_vars else buf.detach()


def get_state_dict(
    module: torch.nn.Module,
    destination: Optional[OrderedDict] = None,
    prefix: str = "",
    keep_vars: bool = False,
) -> OrderedDict:
    """Returns a dictionary containing a whole state of the module.

    As mmcv's get_state_dict: module wrappers are unwrapped at every level,
    each module's version is recorded in destination._metadata and its
    state-dict hooks run.
    """
    if _is_module_wrapper(module):
        module = module.module

    if destination is None:
        destination = OrderedDict()
        destination._metadata = OrderedDict()  # type: ignore
    destination._metadata[prefix[:-1]] = local_metadata = dict(  # type: ignore
        version=module._version
    )
    _save_to_state_dict(module, destination, prefix, keep_vars)
    for name, child in module._modules.items():
        if child is not None:
            get_state_dict(child, destination, prefix + name + ".", keep_vars=keep_vars)
    for hook in module._state_dict_hooks.values():
        hook_result = hook(module, destination, prefix, local_metadata)
        if hook_result is not None:
            destination = hook_result
    return destination  # type: ignore


def _save_to_pavi(checkpoint: dict, filename: str) -> None:
    """Uploads checkpoint to pavi's modelcloud at pavi://<dir>/<name>."""
    try:
        from pavi import exception, modelcloud
    except ImportError:
        raise ImportError("Please install pavi to load checkpoint from modelcloud.")
    model_path = filename[7:]
    root = modelcloud.Folder()
    model_dir, model_name = osp.split(model_path)
    try:
        model = modelcloud.get(model_dir)
    except exception.NodeNotFoundError:
        model = root.create_training_model(model_dir)
    with TemporaryDirectory() as tmp_dir:
        checkpoint_file = osp.join(tmp_dir, model_name)
        _writer()(checkpoint, checkpoint_file)
        model.create_file(checkpoint_file, name=model_name)


# ckptio.patch(async_save=True): local checkpoints of mmcv's and mmengine's
# save_checkpoint (so of their CheckpointHooks and runners) are written in the
# background by ckptio.async_save; failures are logged when they happen and
# raised by the next save_checkpoint.
_async = False
_async_failures = []


def set_async(enabled: bool) -> None:
    global _async
    _async = bool(enabled)


def _note_failure(filename, future):
    exc = future.exception()
    if exc is None:
        return
    import logging

    _async_failures.append((filename, exc))
    logging.getLogger("ckptio").error("asynchronous save of %s failed: %s: %s", filename,
                                      type(exc).__name__, exc)


def _save_async(checkpoint: dict, filename: str) -> None:
    from ..asyncsave import async_save
    from .._native import CheckpointError

    if _async_failures:
        failed, exc = _async_failures.pop(0)
        _async_failures.clear()
        raise CheckpointError(
            f"the asynchronous save of {failed} failed: {type(exc).__name__}: {exc}") from exc
    future = async_save(checkpoint, filename)
    future.add_done_callback(lambda fut: _note_failure(filename, fut))


def _save_local(checkpoint: dict, filename: str) -> None:
    """Writes checkpoint to a local path, creating its directory as mmcv's
    HardDiskBackend.put does."""
    dir_name = osp.dirname(filename)
    if dir_name:
        os.makedirs(osp.expanduser(dir_name), exist_ok=True)
    if _async:
        _save_async(checkpoint, filename)
        return
    try:
        _writer()(checkpoint, filename)
    except OSError as exc:
        # mmcv's (and mmengine's) backend put is open(filename, 'wb'): the
        # same OSError subclass, errno, text ("[Errno 21] Is a directory:
        # '<filename>'") and .filename for a directory target, a '~/' path
        # (open does not expand it) or a dangling symlink's missing directory
        if exc.errno is None or exc.filename != filename:
            raise
        raise OSError(exc.errno, os.strerror(exc.errno), exc.filename) from None


def _put_bytes(checkpoint: dict, filename: str, file_client) -> None:
    """Serialises checkpoint in memory and hands it to a storage backend."""
    with io.BytesIO() as f:
        _writer()(checkpoint, f)
        file_client.put(f.getvalue(), filename)


def save_checkpoint(
    model: torch.nn.Module,
    filename: str,
    optimizer: Optional[Optimizer] = None,
    meta: Optional[dict] = None,
    file_client_args: Optional[dict] = None,
) -> None:
    """Save checkpoint to file.

    The checkpoint will have 3 fields: ``meta``, ``state_dict`` and
    ``optimizer``. By default ``meta`` will contain version and time info.

    Args:
        model (Module): Module whose params are to be saved.
        filename (str): Checkpoint filename.
        optimizer (:obj:`Optimizer`, optional): Optimizer to be saved.
        meta (dict, optional): Metadata to be saved in checkpoint.
        file_client_args (dict, optional): Arguments to instantiate a
            FileClient (needs mmcv). Default: None.
    """
    mmcv = _mmcv()
    if meta is None:
        meta = {}
    elif not isinstance(meta, dict):
        raise TypeError(f"meta must be a dict or None, but got {type(meta)}")
    meta.update(mmcv_version=mmcv.__version__ if mmcv is not None else None, time=time.asctime())

    if _is_module_wrapper(model):
        model = model.module

    if hasattr(model, "CLASSES") and model.CLASSES is not None:
        # save class name to the meta
        meta.update(CLASSES=model.CLASSES)

    checkpoint = {"meta": meta, "state_dict": weights_to_cpu(get_state_dict(model))}
    if isinstance(optimizer, Optimizer):
        checkpoint["optimizer"] = optimizer.state_dict()
    elif isinstance(optimizer, dict):
        checkpoint["optimizer"] = {}
        for name, optim in optimizer.items():
            checkpoint["optimizer"][name] = optim.state_dict()

    if filename.startswith("pavi://"):
        if file_client_args is not None:
            raise ValueError(
                'file_client_args should be "None" if filename starts with'
                f'"pavi://", but got {file_client_args}'
            )
        _save_to_pavi(checkpoint, filename)
        return
    if mmcv is None:
        if file_client_args is not None or "://" in filename:
            raise ImportError(
                f"saving to {filename!r} with file_client_args={file_client_args!r} needs mmcv"
            )
        _save_local(checkpoint, filename)
        return
    from mmcv.fileio import FileClient
    from mmcv.fileio.file_client import HardDiskBackend

    file_client = FileClient.infer_client(file_client_args, filename)
    if isinstance(file_client.client, HardDiskBackend):
        _save_local(checkpoint, filename)
    else:
        _put_bytes(checkpoint, filename, file_client)

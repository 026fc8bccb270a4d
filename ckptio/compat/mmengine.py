"""mmengine 0.10.7's runner/checkpoint.py load surface, with files decoded by
ckptio.load and state-dict keys rewritten in C.

    from ckptio.mmengine import load_checkpoint   # instead of mmengine.runner's

This module is for mmengine users and imports mmengine: its logger
(print_log, 'current' by default), dist info, model-wrapper registry, file
backends and model-zoo tables (get_external_models and friends read
mmengine's own hub/*.json, looked up through ``mmengine.__path__`` at call
time) are mmengine's. What reads checkpoint bytes is ckptio's.

Deliberate differences from mmengine 0.10.7:
- Files are decoded by ckptio.load with weights_only and allow='openmmlab'
  (a replaced ``torch.load``, e.g. a test's mock, is called instead): a
  Runner's checkpoint (numpy arrays and scalars, HistoryBuffer in
  ``message_hub``) loads, decoded data-only, where torch 2.13's weights-only
  default refuses it (mmengine issue #1655).
- A scheme loader registered by the user may return a path, a bytes-like
  object or a binary file; ckptio decodes it with ckptio.load.
- http(s) downloads go through ckptio.hub.load_url (libcurl); save_checkpoint
  is ckptio.compat.mmengine_save's (weights_to_cpu and get_state_dict, which only
  walk memory, are mmengine's own).
"""

import io
import logging
import os
import os.path as osp
from collections import OrderedDict
from typing import Optional

import torch
from mmengine.dist import get_dist_info
from mmengine.fileio import get_file_backend
from mmengine.logging import print_log
from mmengine.model import BaseTTAModel, is_model_wrapper
from mmengine.runner.checkpoint import (
    DEFAULT_CACHE_DIR,
    ENV_MMENGINE_HOME,
    ENV_XDG_CACHE_HOME,
    _get_mmengine_home,
    _IncompatibleKeys,
    _process_mmcls_checkpoint,
    _save_to_state_dict,
    get_deprecated_model_names,
    get_external_models,
    get_mmcls_models,
    get_state_dict,
    get_torchvision_models,
    weights_to_cpu,
)

from . import mmcv as _mmcv_surface
from .. import _direct, patching
from .mmengine_save import save_checkpoint
from .._allow import OPENMMLAB
from ..hub import load_url  # torch.hub's 7 positional parameters; a module global, as tests patch it
from .base import (
    SHARED_NAMES,
    from_openmmlab,
    from_pavi,
    load_walk,
    with_prefix,
)
from .mmcv import _load_file, _revise


def _resolve(name):
    """The module-level function name, or what a test put in its place in
    mmengine.runner.checkpoint while ckptio is patched in."""
    return patching.override("mmengine.runner.checkpoint", name) or globals()[name]


def load_state_dict(module, state_dict, strict=False, logger=None):
    """Loads state_dict into module as mmengine does: each child sees only
    its own keys, load-state-dict post hooks run, mismatches are reported on
    rank 0 through print_log at WARNING (strict: RuntimeError)."""
    text = load_walk(
        module, state_dict, _unwrap, _resolve("get_dist_info"), strict, _IncompatibleKeys
    )
    if text is not None:
        _resolve("print_log")(text, logger=logger, level=logging.WARNING)


class CheckpointLoader(_mmcv_surface.CheckpointLoader):
    """mmengine's registry of loaders by scheme (its own, apart from the
    mmcv surface's); same rules, mmengine's log line."""

    _schemes: dict = {}
    _builtin: set = set()
    _theirs = ("mmengine.runner.checkpoint", "CheckpointLoader")

    @classmethod
    def load_checkpoint(cls, filename, map_location=None, logger="current"):
        return cls._load(filename, map_location, logger)

    @classmethod
    def _announce(cls, loader_name, filename, logger):
        _resolve("print_log")(
            f"Loads checkpoint by {loader_name} backend from path: {filename}", logger=logger
        )


_builtin_scheme = CheckpointLoader._builtin_scheme


@_builtin_scheme("")
def load_from_local(filename, map_location):
    """The checkpoint in a local file (~ expanded)."""
    filename = osp.expanduser(filename)
    if not osp.isfile(filename):
        raise FileNotFoundError(f"{filename} can not be found.")
    return _load_file(filename, map_location)


@_builtin_scheme(("http://", "https://"))
def load_from_http(filename, map_location=None, model_dir=None, progress=os.isatty(0)):
    """The checkpoint at an http(s) URL; in distributed runs rank 0
    downloads first, the others load after a barrier."""
    rank, world_size = _resolve("get_dist_info")()
    if rank == 0:
        checkpoint = _resolve("load_url")(
            filename, model_dir=model_dir, map_location=map_location, progress=progress
        )
    if world_size > 1:
        torch.distributed.barrier()
        if rank > 0:
            checkpoint = _resolve("load_url")(
                filename, model_dir=model_dir, map_location=map_location, progress=progress
            )
    return checkpoint


@_builtin_scheme("pavi://")
def load_from_pavi(filename, map_location=None):
    """The checkpoint at pavi://<model path> (needs the pavi client)."""
    return from_pavi(filename, map_location, _load_file)


@_builtin_scheme([r"(\S+\:)?s3://", r"(\S+\:)?petrel://"])
def load_from_ceph(filename, map_location=None, backend="petrel"):
    """The checkpoint at s3:// or petrel:// through mmengine's file backend."""
    file_backend = get_file_backend(filename, backend_args={"backend": backend})
    with io.BytesIO(file_backend.get(filename)) as buffer:
        checkpoint = _load_file(buffer, map_location)
    return checkpoint


@_builtin_scheme(("modelzoo://", "torchvision://"))
def load_from_torchvision(filename, map_location=None):
    """torchvision://<model>; modelzoo:// is the deprecated spelling."""
    model_urls = get_torchvision_models()
    if filename.startswith("modelzoo://"):
        _resolve("print_log")(
            'The URL scheme of "modelzoo://" is deprecated, please use "torchvision://" instead',
            logger="current",
            level=logging.WARNING,
        )
        model_name = filename[11:]
    else:
        model_name = filename[14:]
    return _resolve("load_from_http")(model_urls[model_name], map_location=map_location)


@_builtin_scheme(("open-mmlab://", "openmmlab://"))
def load_from_openmmlab(filename, map_location=None):
    """open-mmlab://<name>: a URL from mmengine's table (extended by
    $MMENGINE_HOME/open_mmlab.json), or a file relative to $MMENGINE_HOME."""
    tables = get_external_models(), get_deprecated_model_names()

    def warn(text):  # a deprecated name
        _resolve("print_log")(text, logger="current", level=logging.WARNING)

    return from_openmmlab(filename, map_location, *tables, warn, _get_mmengine_home,
                          _resolve("load_from_http"), _load_file)


@_builtin_scheme("mmcls://")
def load_from_mmcls(filename, map_location=None):
    """mmcls://<name>: the backbone of an mmcls model-zoo checkpoint."""
    model_urls = get_mmcls_models()
    model_name = filename[8:]
    checkpoint = _resolve("load_from_http")(model_urls[model_name], map_location=map_location)
    return _process_mmcls_checkpoint(checkpoint)


def _load_checkpoint(filename, map_location=None, logger=None):
    """The checkpoint at a local path, URL or registered scheme."""
    return CheckpointLoader.load_checkpoint(filename, map_location, logger)


def _load_checkpoint_with_prefix(prefix, filename, map_location=None):
    """The weights of the sub-module named prefix, with the prefix removed;
    AssertionError when there are none."""
    return with_prefix(_load_checkpoint(filename, map_location=map_location), prefix)


def _load_checkpoint_to_model(
    model, checkpoint, strict=False, logger=None, revise_keys=[(r"^module\.", "")]
):
    """Loads a checkpoint already in memory into model (revise_keys in C)."""
    state_dict = checkpoint["state_dict"] if "state_dict" in checkpoint else checkpoint
    state_dict = _revise(state_dict, revise_keys)
    with _direct.into(model, state_dict, _direct.pending(), _unwrap) as state_dict:
        load_state_dict(model, state_dict, strict, logger)
    return checkpoint


def load_checkpoint(
    model, filename, map_location=None, strict=False, logger=None, revise_keys=[(r"^module\.", "")]
):
    """Loads the checkpoint at filename into model and returns it."""
    with _direct.capture() as seen:  # the file ckptio.load maps, to read from directly
        checkpoint = _load_checkpoint(filename, map_location, logger)
    if not isinstance(checkpoint, dict):
        raise RuntimeError(f"No state_dict found in checkpoint file {filename}")
    with _direct.reading(seen):
        return _load_checkpoint_to_model(model, checkpoint, strict, logger, revise_keys)


def _unwrap(module):
    """What load_state_dict unwraps (.module) at each level."""
    return is_model_wrapper(module) or isinstance(module, BaseTTAModel)


def find_latest_checkpoint(path: str) -> Optional[str]:
    """The path written in <path>/last_checkpoint, or None (logged)."""
    save_file = osp.join(path, "last_checkpoint")
    if os.path.exists(save_file):
        with open(save_file) as f:
            return f.read().strip()
    _resolve("print_log")("Did not find last_checkpoint to be resumed.")
    return None


# the save side: save_checkpoint is ckptio's writer; the others only walk
# memory and are mmengine's own (nested weights_to_cpu, is_model_wrapper)
_SAVE_NAMES = ("weights_to_cpu", "_save_to_state_dict", "get_state_dict", "save_checkpoint")


__all__ = ["ENV_MMENGINE_HOME", *SHARED_NAMES, "find_latest_checkpoint"]

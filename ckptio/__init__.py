"""ckptio: fast, safe, zero-copy loading and saving of PyTorch checkpoints,
and a drop-in replacement for mmcv's checkpoint helpers."""
from ._native import CheckpointError, UnpicklingError
from ._safe_globals import add_safe_globals, clear_safe_globals, get_safe_globals, safe_globals
from ._save import save
from .serialization import load
from ._mmsave import get_state_dict, save_checkpoint, weights_to_cpu
from .patching import patch, unpatch
from .checkpoint import (CheckpointLoader, _load_checkpoint, _load_checkpoint_with_prefix,
                         load_checkpoint, load_state_dict)

__all__ = [
    "CheckpointLoader",
    "_load_checkpoint",
    "_load_checkpoint_with_prefix",
    "load_checkpoint",
    "load_state_dict",
    "CheckpointError",
    "UnpicklingError",
    "add_safe_globals",
    "clear_safe_globals",
    "get_state_dict",
    "get_safe_globals",
    "load",
    "patch",
    "unpatch",
    "safe_globals",
    "save",
    "save_checkpoint",
    "weights_to_cpu",
]

__version__ = "0.1.0"

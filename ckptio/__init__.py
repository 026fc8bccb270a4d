"""ckptio: fast, safe, zero-copy loading and saving of PyTorch checkpoints,
and a drop-in replacement for mmcv's checkpoint helpers."""
from ._native import CheckpointError, UnpicklingError
from ._safe_globals import add_safe_globals, clear_safe_globals, get_safe_globals, safe_globals
from .serialization import load
from ._save import save
from ._hub import DownloadError, download_url_to_file, load_url
from ._mmsave import get_state_dict, save_checkpoint, weights_to_cpu
from .checkpoint import (
    CheckpointLoader,
    _load_checkpoint,
    _load_checkpoint_with_prefix,
    load_checkpoint,
    load_state_dict,
)
from .patching import patch, unpatch
from ._verify import verify
from ._async import async_save, wait_async_saves

__all__ = [
    "CheckpointError",
    "CheckpointLoader",
    "DownloadError",
    "UnpicklingError",
    "_load_checkpoint",
    "_load_checkpoint_with_prefix",
    "add_safe_globals",
    "async_save",
    "clear_safe_globals",
    "download_url_to_file",
    "get_safe_globals",
    "get_state_dict",
    "load",
    "load_checkpoint",
    "load_state_dict",
    "load_url",
    "patch",
    "safe_globals",
    "save",
    "save_checkpoint",
    "unpatch",
    "verify",
    "wait_async_saves",
    "weights_to_cpu",
]

__version__ = "0.1.0"


def __getattr__(name):
    # ckptio.dcp imports torch.distributed.checkpoint: only when asked for
    if name == "dcp":
        import importlib

        return importlib.import_module(".dcp", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

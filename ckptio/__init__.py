"""ckptio: fast, safe, zero-copy loading and saving of PyTorch checkpoints,
and a drop-in replacement for mmcv's checkpoint helpers.

``import ckptio`` is light: it imports neither torch nor numpy nor the C
extension. Each name below is imported on first use (PEP 562), and torch
only by the functions that need it (``ckptio.verify`` does not).
"""
import importlib

from ._version import __version__

# name -> the module that defines it
_LAZY = {
    "CheckpointError": "._native",
    "UnpicklingError": "._native",
    "DownloadError": "._native",
    "add_safe_globals": ".allowlist",
    "clear_safe_globals": ".allowlist",
    "get_safe_globals": ".allowlist",
    "safe_globals": ".allowlist",
    "load": ".serialization",
    "save": ".saving",
    "download_url_to_file": ".hub",
    "load_url": ".hub",
    "get_state_dict": ".compat.mmcv_save",
    "save_checkpoint": ".compat.mmcv_save",
    "weights_to_cpu": ".compat.mmcv_save",
    "CheckpointLoader": ".checkpoint",
    "_load_checkpoint": ".checkpoint",
    "_load_checkpoint_with_prefix": ".checkpoint",
    "load_checkpoint": ".checkpoint",
    "load_state_dict": ".checkpoint",
    "patch": ".patching",
    "unpatch": ".patching",
    "verify": ".verification",
    "async_save": ".asyncsave",
    "wait_async_saves": ".asyncsave",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name == "dcp":  # imports torch.distributed.checkpoint: only when asked for
        return importlib.import_module(".dcp", __name__)
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ckptio' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))

"""ckptio: fast, safe, zero-copy loading and saving of PyTorch checkpoints,
and a drop-in replacement for mmcv's checkpoint helpers."""
from ._native import CheckpointError, UnpicklingError
from ._safe_globals import add_safe_globals, clear_safe_globals, get_safe_globals, safe_globals
from .serialization import load
from ._verify import verify

__all__ = [
    "CheckpointError",
    "UnpicklingError",
    "add_safe_globals",
    "clear_safe_globals",
    "get_safe_globals",
    "load",
    "safe_globals",
    "verify",
]

__version__ = "0.1.0"

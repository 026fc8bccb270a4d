"""ckptio: fast, safe, zero-copy loading and saving of PyTorch checkpoints,
and a drop-in replacement for mmcv's checkpoint helpers."""
from ._native import CheckpointError, UnpicklingError
from ._hub import DownloadError, download_url_to_file, load_url
from ._safe_globals import add_safe_globals, clear_safe_globals, get_safe_globals, safe_globals
from .serialization import load

__all__ = [
    "CheckpointError",
    "DownloadError",
    "UnpicklingError",
    "add_safe_globals",
    "clear_safe_globals",
    "download_url_to_file",
    "get_safe_globals",
    "load",
    "load_url",
    "safe_globals",
]

__version__ = "0.1.0"

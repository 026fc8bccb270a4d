"""torch, imported when a function first needs it (import ckptio does not)."""

TESTED = "1.13 to 2.14"


def require(what):
    """The torch module, or ModuleNotFoundError naming what needed it."""
    try:
        import torch
    except ImportError as exc:
        err = ModuleNotFoundError(
            f"{what} needs torch, which is not installed (ckptio is tested with torch "
            f"{TESTED}; PyPI's plain 'pip install torch' is a CUDA build on Linux, PyTorch's "
            "CPU index has the CPU builds). ckptio info and ckptio verify work without torch.",
            name="torch",
        )
        raise err from exc
    return torch


def available():
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True

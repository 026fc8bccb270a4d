"""ckptio.load: torch.load's meaning and result, decoded in C.

The bytes are held by one owner (a private file mapping, or one heap
buffer for bytes-like objects and streams); tensors are built over them
without copying and keep the owner alive.
"""
import io
import os
import warnings

from . import _direct, _native
from ._allow import allow_bits as _allow_bits
from ._config import ensure_configured
from .allowlist import user_allowed_globals
from ._torch import require as _require_torch

torch = None  # imported by the first load (import ckptio does not import torch)

# how map_location is applied (ck_map_kind in src/binding/session.h)
_MAP_NONE, _MAP_CPU, _MAP_DICT, _MAP_CALL = 0, 1, 2, 3

_TRUE_VALUES = ("1", "y", "yes", "true")


_protocol_warns = None  # does this torch's weights_only unpickler warn of protocols != 2?


def _torch_warns_protocol():
    """Whether torch.load(weights_only=True) warns "Detected pickle protocol
    N ..." of a pickle written with a protocol other than 2 (torch >= 2.3;
    torch 1.13 does not): asked once of the installed unpickler itself, with
    a 4-byte protocol-3 pickle of 0, so that ckptio warns exactly when torch
    does."""
    global _protocol_warns
    if _protocol_warns is None:
        wo = getattr(torch, "_weights_only_unpickler", None)
        seen = []
        if wo is not None:
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                try:
                    wo.load(io.BytesIO(b"\x80\x03K\x00."))
                except Exception:  # an unpickler that refuses it does not warn either
                    pass
        _protocol_warns = any("Detected pickle protocol 3" in str(w.message) for w in seen)
    return _protocol_warns


def _weights_only_default(weights_only):
    """torch.load's rules: True unless given, with the same two environment
    variables forcing it either way."""
    not_set = weights_only is None
    if not_set:
        weights_only = True
    force = os.getenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "0").lower() in _TRUE_VALUES
    force_no = os.getenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "0").lower() in _TRUE_VALUES
    if force and force_no:
        raise RuntimeError(
            "Only one of `TORCH_FORCE_WEIGHTS_ONLY_LOAD` or `TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD` "
            "should be set, but both were set."
        )
    if force:
        return True
    if force_no and not_set:
        warnings.warn(
            "Environment variable TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD detected, since the"
            "`weights_only` argument was not explicitly passed to `torch.load`, forcing "
            "weights_only=False.",
            UserWarning,
            stacklevel=3,
        )
        return False
    return bool(weights_only)


def _map_kind(map_location):
    """(kind, restore): how the C side applies map_location, and torch's own
    restore_location function where a storage needs it."""
    # bytes (which torch.load's restore_location rejects with TypeError once a
    # storage is placed) go to torch's own restore function, as there
    if isinstance(map_location, str):
        if map_location == "cpu":
            return _MAP_CPU, None
    elif isinstance(map_location, torch.device):
        if str(map_location) == "cpu":
            return _MAP_CPU, None
    restore = torch.serialization._get_restore_location(map_location)
    if map_location is None:
        return _MAP_NONE, restore
    if isinstance(map_location, dict):
        return _MAP_DICT, restore
    return _MAP_CALL, restore


def _read_stream(f):
    """The rest of a binary stream in one Mapping, read in place when its
    size is known (one copy), else in chunks."""
    try:
        start = f.tell()
        end = f.seek(0, io.SEEK_END)
        f.seek(start)
        size = end - start
    except (AttributeError, OSError, ValueError):
        size = None
    if size is not None and hasattr(f, "readinto"):
        mapping = _native.alloc(size)
        view = memoryview(mapping)
        got = 0
        while got < size:
            n = f.readinto(view[got:])
            if not n:
                break
            got += n
        view.release()
        if got == size and not f.read(1):
            return mapping
        f.seek(start)
    data = f.read()
    if not isinstance(data, (bytes, bytearray)):
        raise TypeError(f"expected a binary file object, read() returned {type(data).__name__}")
    return _native.copy_buffer(data)


def _source(f, mmap):
    """(mapping, name for messages, path or None) for the accepted kinds of f."""
    if isinstance(f, (str, os.PathLike)):
        path = os.fspath(f)
        name = os.fsdecode(path)
        before = _direct.stat_for_capture(path)
        mapping = _native.map_file(path) if mmap is not False else _native.pread_file(path)
        _direct.noted(path, before, mapping)
        return mapping, name, path
    if mmap:
        raise ValueError("f must be a file path in order to use the mmap argument")
    if isinstance(f, (bytes, bytearray, memoryview)):
        return _native.copy_buffer(f), f"<{type(f).__name__} of {len(f)} bytes>", None
    if hasattr(f, "read"):
        name = getattr(f, "name", None)
        name = os.fsdecode(name) if isinstance(name, (str, bytes)) else f"<{type(f).__name__}>"
        return _read_stream(f), name, None
    try:
        memoryview(f)
    except TypeError:
        raise TypeError(
            "ckptio.load takes a path, a bytes-like object or a binary file object, "
            f"not {type(f).__name__}"
        ) from None
    return _native.copy_buffer(f), f"<{type(f).__name__}>", None


def _load_safetensors(path, map_location):
    """torch.load hands *.safetensors paths to safetensors; so does ckptio."""
    device = "cpu"
    if map_location is not None:
        if isinstance(map_location, (str, bytes, torch.device)):
            device = str(map_location)
        elif isinstance(map_location, dict):
            raise RuntimeError(
                "Loading safetensors file with dict map_location is not supported. "
                "Use a device string or torch.device instead."
            )
        elif callable(map_location):
            raise RuntimeError(
                "Loading safetensors file with callable map_location is not supported. "
                "Use a device string or torch.device instead."
            )
    try:
        import safetensors.torch
    except ImportError as exc:
        raise RuntimeError(
            "Attempting to load a safetensors file but safetensors is not installed. "
            "Please install safetensors with: pip install safetensors"
        ) from exc
    return safetensors.torch.load_file(path, device=device)


def load(
    f, map_location=None, *, weights_only=None, mmap=None, encoding="utf-8", verify=False,
    allow=None,
):
    """Loads what torch.save wrote, with torch.load's meaning and result.

    f: a path (str or os.PathLike), a bytes-like object, or a binary file
    object (read from its current position). A directory path is a sharded
    checkpoint: a torch.distributed.checkpoint directory or mmengine
    FSDPStrategy's rank{i}.pth files, returned whole (ckptio._dirs). map_location: None, a device
    string, a torch.device, a dict remapping location tags, or a callable
    (storage, location) -> storage, as for torch.load.
    weights_only (default True, as torch >= 2.6): only allowlisted globals
    are resolved; see add_safe_globals. False resolves any global: only for
    trusted files.
    mmap (default: True for paths): tensors are views of a private mapping
    of the file (copy-on-write: writing a tensor never changes the file);
    False reads the file into one buffer. Either way no tensor is copied.
    encoding: how Python 2 byte strings are decoded ('bytes' keeps bytes).
    verify: first check the file's integrity (ckptio.verify, strict): CRCs of
    every record, the container, every storage against its record.
    allow (default None: torch's allowlist only): 'openmmlab' also decodes,
    data-only, what mmengine's and mmcv's runners write into checkpoints:
    numpy arrays, dtypes and scalars, mmengine's HistoryBuffer and
    getattr(HistoryBuffer, <statistics method>) (see the README's security
    section). It is the default of ckptio.checkpoint, ckptio.mmengine,
    ckptio.load_url and the command line. No effect when weights_only is
    False (then every global is allowed).
    """
    global torch
    if torch is None:
        torch = _require_torch("ckptio.load")
    ensure_configured()
    allow_bits = _allow_bits(allow)
    weights_only = _weights_only_default(weights_only)
    if isinstance(f, (str, os.PathLike)) and os.path.isdir(f):
        from ._dirs import load_directory  # DCP checkpoints, per-rank files

        return load_directory(f, map_location, weights_only=weights_only, mmap=mmap,
                              verify=verify)
    if isinstance(f, (str, os.PathLike)) and os.fspath(f).endswith(".safetensors"):
        return _load_safetensors(os.fspath(f), map_location)
    mapping, name, path = _source(f, mmap)
    if verify:
        from .verification import verify_mapping

        verify_mapping(mapping, name, strict=True, run_loader=False, encoding=encoding)
    kind, restore = _map_kind(map_location)
    user_globals = user_allowed_globals() if weights_only else None
    # torch >= 2.1 keeps map_location in a thread-local its restore functions read
    tls = getattr(torch.serialization, "_serialization_tls", None)
    previous = getattr(tls, "map_location", None)
    if tls is not None:
        tls.map_location = map_location
    try:
        result = _native.load(
            mapping,
            name,
            weights_only=weights_only,
            encoding=encoding,
            map_kind=kind,
            map_location=map_location,
            restore=restore,
            user_globals=user_globals,
            allow=allow_bits,
            warn_protocol=weights_only and _torch_warns_protocol(),
        )
    except BaseException as exc:
        # sparse tensors rebuilt before the failure wait in torch's module-level
        # list for validation: they must not fail the next load (of another file)
        torch._utils._sparse_tensors_to_validate.clear()
        if isinstance(map_location, bytes) and isinstance(exc.__cause__, TypeError):
            # torch.load's own error for a bytes map_location once a storage is placed
            raise exc.__cause__ from None
        raise
    finally:
        if tls is not None:
            tls.map_location = previous
    if result is _native.TORCHSCRIPT:
        if path is None:
            return torch.jit.load(io.BytesIO(memoryview(mapping)), map_location=map_location)
        return torch.jit.load(path, map_location=map_location)
    try:
        torch._utils._validate_loaded_sparse_tensors()
    except RuntimeError as exc:  # with torch.sparse.check_sparse_tensor_invariants on
        raise _native.CheckpointError(f"{name}: a sparse tensor is invalid: {exc}") from exc
    return result

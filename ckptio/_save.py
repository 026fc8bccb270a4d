"""ckptio.save: torch.save's zip format written by C, atomically.

The object is pickled by CPython's C pickler at protocol 2 with torch's
persistent ids (computed in C); records are laid out as torch 2.x's writer
lays them out (same names, order, alignment padding, CRCs and serialization
id), storage bytes written straight from tensor memory. A path target is
written to a temporary file in the same directory and renamed over the old
file only once everything is on disk.
"""
import collections
import os
import sys
import warnings

from . import _native
from ._torch import require as _require_torch

torch = None  # imported by the first save

_hooks = None


def _torch_hooks():
    """The torch objects the C pickling hooks use (looked up once), and
    whether the C tensor reduction may run (not under torch's skip_data or
    fake-tensor modes, whose rules only torch's own code knows)."""
    global _hooks
    if _hooks is None:
        ser = torch.serialization
        # torch 1.13 has neither the new dtypes nor tensor metadata
        new_dtypes = frozenset(getattr(torch.storage, "_new_dtypes", tuple)())
        legacy = {}  # dtype -> (storage class torch pickles, element size)
        with warnings.catch_warnings():  # TypedStorage and quantized dtypes warn
            warnings.simplefilter("ignore")
            _legacy_rows(legacy, new_dtypes)
        _hooks = (
            torch.storage.TypedStorage,
            torch.UntypedStorage,
            ser.normalize_storage_type,
            ser.location_tag,
            torch,
            torch.uint8,
            torch.Tensor,
            torch._utils._rebuild_tensor_v2,
            getattr(torch._utils, "_rebuild_tensor_v3", None),  # only for new dtypes (>= 2.1)
            collections.OrderedDict,
            legacy,
            new_dtypes,
            getattr(torch._C, "_get_tensor_metadata", _no_metadata),
            torch.strided,
        )
    tls = getattr(torch.serialization, "_serialization_tls", None)
    fast = not getattr(tls, "skip_data", False) and not getattr(
        tls, "materialize_fake_tensors", False
    )
    return _hooks + (fast,)


def _no_metadata(tensor):
    return {}


def _legacy_rows(legacy, new_dtypes):
    """Fills legacy with dtype -> (the storage class torch pickles for it,
    element size) for every dtype torch saves through a TypedStorage."""
    for dtype in set(d for d in vars(torch).values() if isinstance(d, torch.dtype)):
        if dtype in new_dtypes:
            continue
        try:
            typed = torch.empty(0, dtype=dtype)._typed_storage()
            legacy[dtype] = (getattr(torch, typed._pickle_storage_type()), typed.element_size())
        except (KeyError, AttributeError, RuntimeError, TypeError):
            continue


def _archive_folder(path):
    """The folder torch's writer puts records under for a file path: the
    base name up to its last '.', or "archive" for non-ASCII names (torch
    then writes through a Python stream)."""
    try:
        path.encode("ascii")
    except UnicodeEncodeError:
        return "archive"
    start = max(path.rfind("/"), path.rfind("\\")) + 1
    base = path[start:]
    dot = base.rfind(".")
    folder = base[:dot] if dot >= 0 else base
    if not folder:
        raise _native.CheckpointError(f"{path}: invalid file name for a checkpoint")
    return folder


def _options():
    """(alignment, compute_crc32) from torch's serialization config, so the
    file matches what torch.save would write under the same settings."""
    try:
        from torch.utils.serialization import config

        return int(config.save.storage_alignment), bool(config.save.compute_crc32)
    except (ImportError, AttributeError):
        return 64, True


def save(obj, f, *, fsync=True):
    """Saves obj as torch.save(obj, f) does, byte for byte.

    f: a path (str or os.PathLike), written atomically (temporary file in
    the same directory, fsync when fsync=True, rename over the target, fsync
    of the directory; a symbolic link is followed and the file it names
    replaced), or a binary file object, written sequentially from its
    current position and flushed (and fsynced when it has a file descriptor
    and fsync=True). Storages on other devices are copied to the CPU first.

    Unlike torch.save, a path's old file is replaced, not overwritten in
    place: other hard links to it keep the old content.
    CUDA storages are copied in one batch into one host arena
    (ckptio._hostcopy.storages_to_cpu), any other with storage.cpu().
    """
    save_with(obj, f, fsync=fsync)


def save_with(obj, f, *, fsync=True, zip64_threshold=0xFFFFFFFF, to_cpu=None):
    """ckptio.save with the knobs tests and the mmcv surface use:
    zip64_threshold (record size from which zip64 fields are written; torch's
    is 0xFFFFFFFF) and to_cpu (called once with the list of storages not on
    the CPU, returns their CPU copies in the same order)."""
    global torch
    if torch is None:
        torch = _require_torch("ckptio.save")
    from . import _hostcopy

    if getattr(getattr(torch.serialization, "_serialization_tls", None), "skip_data", False):
        # torch.serialization.skip_data(): records of reserved, unwritten
        # space, torch's own feature; torch.save is the writer for it
        torch.save(obj, f)
        return
    alignment, crc = _options()
    common = dict(
        byteorder=sys.byteorder,
        alignment=alignment,
        compute_crc32=crc,
        zip64_threshold=zip64_threshold,
        to_cpu=_hostcopy.storages_to_cpu if to_cpu is None else to_cpu,
    )
    if isinstance(f, (str, os.PathLike)):
        path = os.fspath(f)
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        folder = _archive_folder(path)  # from the name given, as torch takes it
        # torch.save writes through a symbolic link; replace the file it points to
        target = os.path.realpath(path) if os.path.islink(path) else path
        _native.save(obj, target, folder, _torch_hooks(), to_path=True, fsync=fsync, **common)
        return
    write = getattr(f, "write", None)
    if not callable(write):
        raise AttributeError(f"Buffer of {type(f).__name__} has no callable attribute 'write'")
    _native.save(obj, write, "archive", _torch_hooks(), to_path=False, fsync=False, **common)
    flush = getattr(f, "flush", None)  # torch.save flushes the buffer too
    if callable(flush):
        flush()
    if fsync:
        try:
            fd = f.fileno()
        except (AttributeError, OSError, ValueError):
            return
        os.fsync(fd)

"""ckptio.save: torch.save's zip format written by C, atomically.

The object is pickled by CPython's C pickler at protocol 2 with torch's
persistent ids (computed in C); records are laid out as torch 2.x's writer
lays them out (same names, order, alignment padding, CRCs and serialization
id), storage bytes written straight from tensor memory. A path target is
written to a temporary file in the same directory and renamed over the old
file only once everything is on disk.
"""
import os
import sys

from . import _native
from ._torch import require as _require_torch

torch = None  # imported by the first save


def _fast():
    """Whether the C tensor reduction may run: not under torch's skip_data or
    fake-tensor modes, whose rules only torch's own code knows. (torch's
    objects reach C once, through ckptio._config.)"""
    tls = getattr(torch.serialization, "_serialization_tls", None)
    return not getattr(tls, "skip_data", False) and not getattr(
        tls, "materialize_fake_tensors", False
    )


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
    of the directory; symbolic links are followed and the file they name
    replaced, the links kept; a loop fails with ELOOP as in torch), or a
    binary file object, written sequentially from its current position and
    flushed (and fsynced when it has a file descriptor and fsync=True). A
    path naming a FIFO or a device is written into, as torch.save does, with
    no temporary and no rename. Storages on other devices are copied to the
    CPU first.

    Unlike torch.save, a path's old file is replaced, not overwritten in
    place: other hard links to it keep the old content.
    CUDA storages are copied in one batch into one host arena
    (ckptio._hostcopy.storages_to_cpu), any other with storage.cpu().
    """
    save_with(obj, f, fsync=fsync)


def save_with(obj, f, *, fsync=True, zip64_threshold=0xFFFFFFFF, to_cpu=None, named_temp=False):
    """ckptio.save with the knobs tests and the mmcv surface use:
    zip64_threshold (record size from which zip64 fields are written; torch's
    is 0xFFFFFFFF), to_cpu (called once with the list of storages not on
    the CPU, returns their CPU copies in the same order) and named_temp
    (never an O_TMPFILE inode, always a named temporary: tests of the
    fallback for file systems without O_TMPFILE)."""
    global torch
    if torch is None:
        torch = _require_torch("ckptio.save")
    from . import _hostcopy
    from ._config import ensure_configured

    if getattr(getattr(torch.serialization, "_serialization_tls", None), "skip_data", False):
        # torch.serialization.skip_data(): records of reserved, unwritten
        # space, torch's own feature; torch.save is the writer for it
        torch.save(obj, f)
        return
    ensure_configured()
    alignment, crc = _options()
    common = dict(
        fast=_fast(),
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
        # symbolic links are followed in C (src/core/atomic.c), as torch's open() does
        _native.save(obj, path, folder, to_path=True, fsync=fsync, named_temp=named_temp,
                     **common)
        return
    write = getattr(f, "write", None)
    if not callable(write):
        raise AttributeError(f"Buffer of {type(f).__name__} has no callable attribute 'write'")
    _native.save(obj, write, "archive", to_path=False, fsync=False, **common)
    flush = getattr(f, "flush", None)  # torch.save flushes the buffer too
    if callable(flush):
        flush()
    if fsync:
        try:
            fd = f.fileno()
        except (AttributeError, OSError, ValueError):
            return
        os.fsync(fd)

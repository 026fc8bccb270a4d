"""ckptio.load of a directory: a sharded checkpoint returned whole.

Two layouts are recognised:
- a torch.distributed.checkpoint directory (a `.metadata` file and
  `*.distcp` data): ckptio.dcp.load_dir, the result torch's
  dcp_to_torch_save + torch.load gives;
- mmengine FSDPStrategy's sharded checkpoint, `rank0.pth` ... `rank{N-1}.pth`
  (one torch.save file per rank): every file is decoded, and each value that
  is sharded across the ranks (a DTensor, or FSDP's ShardedTensor) becomes
  one full tensor; every other value is rank 0's.

ShardedTensor (what FSDP1's LOCAL and SHARDED state dicts hold) unpickles
only inside a process group with the same ranks, through a pickle that
calls getattr; under weights_only (the default) ckptio decodes it instead
with inert stand-in classes that only record the pickled state (its local
shards and their offsets), so nothing from the file runs and no process
group is needed. DTensors need torch.distributed.tensor (imported here),
which allowlists its classes for weights-only loads, as for torch.load.
"""
import errno
import os
import re

from . import _native

_RANK_FILE = re.compile(r"^rank(\d+)\.pth$")


def _bad(name, text):
    return _native.CheckpointError(f"{name}: {text}")


def rank_files(path):
    """The rank{i}.pth files of a directory in rank order, [] when it has
    none; an error when the ranks are not 0..N-1."""
    found = {}
    for entry in os.listdir(path):
        m = _RANK_FILE.match(entry)
        if m and os.path.isfile(os.path.join(path, entry)):
            found[int(m.group(1))] = os.path.join(path, entry)
    if not found:
        return []
    n = len(found)
    if sorted(found) != list(range(n)):
        missing = sorted(set(range(max(found) + 1)) - set(found))
        raise _bad(path, f"sharded checkpoint with rank files {sorted(found)}: "
                         f"rank{missing[0]}.pth is missing")
    return [found[i] for i in range(n)]


def load_directory(path, map_location=None, *, weights_only=True, mmap=None, verify=False):
    """ckptio.load's answer for a directory (see the module docstring)."""
    name = os.fsdecode(os.fspath(path))
    if os.path.isfile(os.path.join(path, ".metadata")):
        from . import dcp

        if verify:
            dcp.verify_dir(path)
        return dcp.load_dir(path, map_location, weights_only=weights_only,
                            mmap=mmap is not False)
    files = rank_files(path)
    if not files:  # an OSError, as torch.load raises for a directory
        raise IsADirectoryError(errno.EISDIR, "a directory, but neither a torch.distributed."
                                "checkpoint checkpoint (no .metadata) nor a sharded checkpoint "
                                "(no rank0.pth)", name)
    return load_rank_files(files, name, map_location, weights_only=weights_only, mmap=mmap,
                           verify=verify)


# ------------------------------------------------------ ShardedTensor stand-ins


class _Record:
    """An inert stand-in for a pickled class: keeps the constructor
    arguments and the BUILD state, runs nothing."""

    _args = ()
    _state = None

    def __init__(self, *args):
        self._args = args
        self._state = None

    def __setstate__(self, state):
        self._state = state

    def field(self, key):
        state = self._state
        if isinstance(state, tuple) and len(state) == 2:  # (__dict__ state, slot state)
            merged = {}
            for part in state:
                if isinstance(part, dict):
                    merged.update(part)
            state = merged
        if isinstance(state, dict):
            return state.get(key)
        return None


def _record_class(qualname):
    return type(qualname.rsplit(".", 1)[-1], (_Record,), {"__module__": __name__})


def _stand_ins():
    """(obj, 'module.qualname') pairs: the globals a ShardedTensor pickle
    names, each mapped to an inert stand-in."""
    import torch

    class ShardedTensor(torch.Tensor):
        """Stand-in for torch.distributed._shard.sharded_tensor.api.ShardedTensor:
        a storage-less tensor that records the pickled state."""

        _ckptio_state = None

        def __setstate__(self, state):
            self._ckptio_state = state

        @classmethod
        def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
            raise RuntimeError("ckptio's ShardedTensor stand-in holds no data of its own")

    pg_state = _record_class("ProcessGroupState")

    def restricted_getattr(obj, attr, *default):
        if obj is ShardedTensor and attr == "ProcessGroupState":
            return pg_state
        raise _native.UnpicklingError(
            f"weights-only load refused getattr({obj!r}, {attr!r}) while decoding a ShardedTensor")

    def mem_format(value):
        return value

    pairs = [
        (ShardedTensor, "torch.distributed._shard.sharded_tensor.api.ShardedTensor"),
        (pg_state, "torch.distributed._shard.sharded_tensor.api.ShardedTensor.ProcessGroupState"),
        (restricted_getattr, "__builtin__.getattr"),
        (restricted_getattr, "builtins.getattr"),
        (mem_format, "torch.distributed._shard.sharded_tensor.metadata.MEM_FORMAT_ENCODING"),
    ]
    for qual in ("torch.distributed._shard.sharded_tensor.shard.Shard",
                 "torch.distributed._shard.metadata.ShardMetadata",
                 "torch.distributed.remote_device._remote_device",
                 "torch.distributed._shard.sharded_tensor.metadata.ShardedTensorMetadata",
                 "torch.distributed._shard.sharded_tensor.metadata.TensorProperties",
                 "torch.distributed._shard.sharding_spec.chunk_sharding_spec.ChunkShardingSpec",
                 "torch.distributed._shard.sharding_spec.api.EnumerableShardingSpec"):
        pairs.append((_record_class(qual), qual))
    return pairs, ShardedTensor


# ------------------------------------------------------------------ merging


def _dtensor_box(d, rank, name, where):
    """(offsets, sizes) of rank's local tensor of DTensor d in the global
    tensor, for Shard and Replicate placements (torch.chunk-style shards,
    DTensor's default)."""
    from torch.distributed.tensor import Replicate, Shard

    mesh = d.device_mesh.mesh
    hits = (mesh == rank).nonzero()
    if hits.shape[0] != 1:
        raise _bad(name, f"{where}: rank {rank} is not in the DTensor's device mesh")
    coord = hits[0].tolist()
    offsets = [0] * d.dim()
    sizes = list(d.shape)
    for i, p in enumerate(d.placements):
        if type(p) is Shard:
            dim = p.dim if p.dim >= 0 else p.dim + d.dim()
            n = mesh.shape[i]
            chunk = -(-sizes[dim] // n) if sizes[dim] else 0
            start = min(coord[i] * chunk, sizes[dim])
            sizes[dim] = max(0, min(chunk, sizes[dim] - start))
            offsets[dim] += start
        elif not isinstance(p, Replicate):
            raise _bad(name, f"{where}: DTensor placement {p} cannot be merged "
                             "(only Shard and Replicate)")
    return offsets, sizes


def _assemble(pieces, shape, dtype, name, where):
    """One tensor of shape from (offsets, sizes, tensor) pieces that must
    cover it (identical boxes, replicas, count once)."""
    import torch

    from .dcp import check_tiling

    boxes, unique = set(), []
    for offsets, sizes, t in pieces:
        if list(t.shape) != list(sizes):
            raise _bad(name, f"{where}: shard at {offsets} holds {list(t.shape)}, not {sizes}")
        box = (tuple(offsets), tuple(sizes))
        if box not in boxes:  # replicas hold the same box
            boxes.add(box)
            unique.append((box, t))
    check_tiling([b for b, _ in unique], tuple(shape), f"{name}: {where}")
    out = torch.empty(tuple(shape), dtype=dtype)
    for (offsets, sizes), t in unique:
        view = out
        for dim, (o, s) in enumerate(zip(offsets, sizes)):
            view = view.narrow(dim, o, s)
        view.copy_(t)
    return out


def _merge(values, name, where, sharded_cls):
    import collections

    import torch

    first = values[0]
    dtensor = _dtensor_type()
    if dtensor is not None and isinstance(first, dtensor):
        pieces = []
        for rank, v in enumerate(values):
            if not isinstance(v, dtensor) or tuple(v.shape) != tuple(first.shape):
                raise _bad(name, f"{where}: rank {rank} does not hold the same DTensor")
            offsets, sizes = _dtensor_box(v, rank, name, where)
            pieces.append((offsets, sizes, v.to_local()))
        return _assemble(pieces, list(first.shape), first.dtype, name, where)
    if sharded_cls is not None and isinstance(first, sharded_cls):
        return _merge_sharded(values, name, where, sharded_cls)
    if isinstance(first, dict) and all(isinstance(v, dict) and v.keys() == first.keys()
                                       for v in values):
        out = type(first)() if type(first) in (dict, collections.OrderedDict) else {}
        for k in first:
            out[k] = _merge([v[k] for v in values], name, f"{where}.{k}" if where else str(k),
                            sharded_cls)
        if hasattr(first, "_metadata"):
            out._metadata = first._metadata
        return out
    if isinstance(first, (list, tuple)) and all(
            type(v) is type(first) and len(v) == len(first) for v in values):
        items = [_merge([v[i] for v in values], name, f"{where}.{i}", sharded_cls)
                 for i in range(len(first))]
        if isinstance(first, list):
            return items
        return tuple(items) if type(first) is tuple else first
    if isinstance(first, torch.Tensor) and type(first).__name__ == "ShardedTensor":
        raise _bad(name, f"{where}: a ShardedTensor could not be merged")
    return first


def _merge_sharded(values, name, where, sharded_cls):
    pieces, shape, dtype = [], None, None
    for rank, v in enumerate(values):
        state = getattr(v, "_ckptio_state", None)
        if not isinstance(v, sharded_cls) or not isinstance(state, tuple) or len(state) < 2:
            raise _bad(name, f"{where}: rank {rank} holds no ShardedTensor state")
        local_shards, metadata = state[0], state[1]
        size = metadata.field("size") if isinstance(metadata, _Record) else None
        if size is None:
            raise _bad(name, f"{where}: ShardedTensor metadata without a size")
        if shape is None:
            shape, dtype = list(size), v.dtype
        elif list(size) != shape:
            raise _bad(name, f"{where}: ranks disagree on the ShardedTensor's size")
        for shard in local_shards or ():
            tensor = shard.field("tensor") if isinstance(shard, _Record) else None
            smd = shard.field("metadata") if isinstance(shard, _Record) else None
            if tensor is None or not isinstance(smd, _Record):
                raise _bad(name, f"{where}: malformed ShardedTensor shard on rank {rank}")
            offsets, sizes = smd.field("shard_offsets"), smd.field("shard_sizes")
            if not isinstance(offsets, (list, tuple)) or not isinstance(sizes, (list, tuple)):
                raise _bad(name, f"{where}: ShardedTensor shard without offsets")
            pieces.append((list(offsets), list(sizes), tensor))
    return _assemble(pieces, shape, dtype, name, where)


def _dtensor_type():
    try:
        import torch.distributed.tensor as dt  # allowlists DTensor for weights-only loads
    except (ImportError, RuntimeError):
        return None
    return dt.DTensor


def load_rank_files(files, name, map_location=None, *, weights_only=True, mmap=None,
                    verify=False):
    """The merged object of mmengine-style rank{i}.pth files."""
    from .allowlist import safe_globals
    from .serialization import load

    _dtensor_type()
    values, sharded_cls = [], None
    if weights_only:
        pairs, sharded_cls = _stand_ins()
        with safe_globals(pairs):
            for f in files:
                values.append(load(f, "cpu", weights_only=True, mmap=mmap, verify=verify))
    else:
        for f in files:
            values.append(load(f, "cpu", weights_only=False, mmap=mmap, verify=verify))
    merged = _merge(values, name, "", sharded_cls)
    if map_location is not None:
        from .dcp import _apply_map_location

        merged = _apply_map_location(merged, map_location)
    return merged

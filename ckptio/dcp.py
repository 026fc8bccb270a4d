"""ckptio.dcp: torch.distributed.checkpoint storage with ckptio's C reader
and writer.

StorageReader and StorageWriter are drop-in replacements for torch's
FileSystemReader and FileSystemWriter: the same directory layout (a
`.metadata` pickle and `__<rank>_<n>.distcp` files), the same metadata
objects, the same planner contracts, and both serialization formats torch
2.13 writes (SerializationFormat.TORCH_SAVE: every tensor item a complete
torch.save archive inside the .distcp file; SAFETENSORS: one safetensors
blob per file after the byte items), with or without stream transforms
(`_extensions` / `_extension_registry`). Either side reads the other's
checkpoints.

    import torch.distributed.checkpoint as dcp
    import ckptio.dcp

    dcp.save(state_dict, storage_writer=ckptio.dcp.StorageWriter("ckpt/step_100"))
    dcp.load(state_dict, storage_reader=ckptio.dcp.StorageReader("ckpt/step_100"))

What differs from torch's classes, on purpose:
- reading: each .distcp file is mapped once; a TORCH_SAVE item is decoded by
  ckptio's loader in C (zip directory, pickle, storage) as a tensor viewing
  the mapping, narrowed to the requested box and copied once into the
  planner's target tensor. torch's reader runs a torch.load of a BytesIO
  per item (a copy, a Python unpickler) and then copies again.
- `.metadata` is decoded by ckptio's weights-only VM with an allowlist of
  DCP's metadata classes (torch uses pickle.load, which runs any code the
  file names); StorageReader(path, weights_only=False) decodes any global,
  for trusted checkpoints with custom planner data.
- writing: each tensor item is ckptio.save's archive (byte-identical to the
  torch.save torch's writer runs), written through one atomic file per
  .distcp (src/core/atomic.c): a crash or an error never leaves a torn
  .distcp file, and `.metadata` is written last, also atomically, so a
  checkpoint directory never has a `.metadata` naming data that is not on
  disk (with sync_files=True, the default). Tensors on a GPU are copied to
  the host in batches (ckptio._hostcopy).
- SAFETENSORS-format checkpoints are readable (torch 2.13's FileSystemReader
  writes them but cannot read them back).

load_dir and save_dir convert between DCP directories and whole state
dicts (ckptio.load(dcp_dir) and `ckptio convert` use them).
"""
import dataclasses
import io
import json
import os
import pathlib
import threading
import uuid
import warnings
from pathlib import Path

import torch
from torch.distributed.checkpoint import metadata as _md
from torch.distributed.checkpoint.filesystem import (
    FileSystem,
    SerializationFormat,
    _StorageInfo,
    _StoragePrefix,
    _StorageReaderTransforms,
    _StorageWriterTransforms,
)
from torch.distributed.checkpoint.planner import LoadItemType, WriteItemType
from torch.distributed.checkpoint.staging import BlockingAsyncStager
from torch.distributed.checkpoint.storage import StorageReader as _StorageReaderBase
from torch.distributed.checkpoint.storage import StorageWriter as _StorageWriterBase
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from . import _hostcopy, _native
from ._config import ensure_configured
from .allowlist import user_allowed_globals

__all__ = ["StorageReader", "StorageWriter", "SerializationFormat", "load_dir", "save_dir",
           "read_metadata", "verify_dir"]

METADATA_NAME = ".metadata"
DEFAULT_SUFFIX = ".distcp"
CURRENT_DCP_VERSION = "1.0.0"

# Device tensors are copied to the host in batches of about this many bytes.
_HOST_BATCH_BYTES = 256 << 20
# A safetensors header longer than this is refused (safetensors' own limit).
_SAFETENSORS_HEADER_MAX = 100_000_000


def _generate_uuid():
    return str(uuid.uuid4())


# ------------------------------------------------------------------ metadata


def _metadata_globals():
    """'module.qualname' -> object for what a DCP .metadata pickle names
    beyond torch's own weights-only allowlist (dtypes, torch.Size and
    layouts are in that): DCP's metadata classes, the file-system storage
    info, and the pathlib classes of StorageMeta.checkpoint_id (their
    constructors only build a path object). The user's allowlist
    (ckptio.add_safe_globals, torch.serialization.add_safe_globals) is added
    on top, for custom planner data."""
    objs = [
        _md.Metadata,
        _md.TensorStorageMetadata,
        _md.BytesStorageMetadata,
        _md.ChunkStorageMetadata,
        _md.TensorProperties,
        _md._MEM_FORMAT_ENCODING,
        _md.MetadataIndex,
        _md.StorageMeta,
        _StorageInfo,
        pathlib.PurePath,
        pathlib.PurePosixPath,
        pathlib.PureWindowsPath,
        pathlib.Path,
        pathlib.WindowsPath if os.name == "nt" else pathlib.PosixPath,
    ]
    out = {}
    for obj in objs:
        out[f"{obj.__module__}.{obj.__qualname__}"] = obj
        if obj.__module__.startswith("pathlib"):  # pathlib._local on 3.13+
            out[f"pathlib.{obj.__qualname__}"] = obj
    out.update(user_allowed_globals())
    return out


def read_metadata(path, *, weights_only=True):
    """The Metadata object in a DCP `.metadata` file (or `__<rank>.metadata`),
    decoded by ckptio's VM: under weights_only (the default) only DCP's
    metadata classes and the allowlists resolve."""
    ensure_configured()
    name = os.fsdecode(os.fspath(path))
    mapping = _native.map_file(os.fspath(path))
    md = _native.unpickle(mapping, name, _metadata_globals(), weights_only=weights_only)
    if not isinstance(md, _md.Metadata):
        raise _native.CheckpointError(
            f"{name}: holds a {type(md).__name__}, not torch.distributed.checkpoint Metadata")
    if not isinstance(md.state_dict_metadata, dict):
        raise _native.CheckpointError(f"{name}: state_dict_metadata is not a dict")
    if md.storage_data is not None and not isinstance(md.storage_data, dict):
        raise _native.CheckpointError(f"{name}: storage_data is not a dict")
    return md


# ------------------------------------------------------------- item decoding


_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool, "C64": torch.complex64,
}
for _name, _attr in (("U64", "uint64"), ("U32", "uint32"), ("U16", "uint16"),
                     ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"),
                     ("F8_E4M3FNUZ", "float8_e4m3fnuz"), ("F8_E5M2FNUZ", "float8_e5m2fnuz"),
                     ("F8_E8M0", "float8_e8m0fnu")):
    if isinstance(getattr(torch, _attr, None), torch.dtype):
        _ST_DTYPES[_name] = getattr(torch, _attr)
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
# safetensors lays tensors out by its Dtype enum, largest first, then by name
_ST_RANK = {name: i for i, name in enumerate(
    ("BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0",
     "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "C64", "F64", "I64", "U64"))}


def _bad(name, text):
    return _native.CheckpointError(f"{name}: {text}")


class _SafetensorsBlob:
    """The tensors of one safetensors blob inside a .distcp file (torch's
    SAFETENSORS format), indexed by key, every offset checked against the
    file before any tensor is built."""

    def __init__(self, mapping, start, name):
        self.mapping, self.name = mapping, name
        view = memoryview(mapping)
        size = len(view)
        if start > size or size - start < 8:
            raise _bad(name, f"no safetensors header at offset {start} (truncated file?)")
        n = int.from_bytes(view[start:start + 8], "little")
        if n > size - start - 8 or n > _SAFETENSORS_HEADER_MAX:
            raise _bad(name, f"safetensors header at offset {start} claims {n} bytes, "
                             f"past the end of the file ({size} bytes)")
        try:
            header = json.loads(bytes(view[start + 8:start + 8 + n]))
        except (UnicodeDecodeError, ValueError) as exc:
            raise _bad(name, f"safetensors header at offset {start} is not JSON: {exc}") from None
        if not isinstance(header, dict):
            raise _bad(name, "safetensors header is not a JSON object")
        data_start = start + 8 + n
        self.entries = {}
        meta = header.pop("__metadata__", None) or {}
        self.saved_offsets = {}
        if isinstance(meta, dict) and isinstance(meta.get("DCP_SHARDING_INFO"), str):
            try:
                info = json.loads(meta["DCP_SHARDING_INFO"])
            except ValueError:
                info = {}
            if isinstance(info, dict):
                for key, val in info.items():
                    if isinstance(val, dict) and isinstance(val.get("saved_offsets"), list):
                        self.saved_offsets[key] = tuple(val["saved_offsets"])
        for key, ent in header.items():
            if not isinstance(ent, dict):
                raise _bad(name, f"safetensors entry {key!r} is not an object")
            dtype = _ST_DTYPES.get(ent.get("dtype"))
            shape, offs = ent.get("shape"), ent.get("data_offsets")
            if dtype is None:
                raise _bad(name, f"safetensors entry {key!r} has unknown dtype {ent.get('dtype')!r}")
            if (not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape)
                    or not isinstance(offs, list) or len(offs) != 2
                    or not all(type(o) is int and o >= 0 for o in offs)):
                raise _bad(name, f"safetensors entry {key!r} has a malformed shape or offsets")
            begin, end = offs
            numel = 1
            for d in shape:
                numel *= d
            nbytes = numel * torch.empty(0, dtype=dtype).element_size()
            if end < begin or end - begin != nbytes or data_start + end > size:
                raise _bad(name, f"safetensors entry {key!r}: data_offsets {offs} do not hold "
                                 f"{shape} {ent.get('dtype')} inside the file")
            self.entries[key] = (dtype, tuple(shape), data_start + begin, nbytes)

    def tensor(self, fqn, offsets, aligned=True):
        ent = self.entries.get(fqn)
        if ent is None:
            raise _bad(self.name, f"the safetensors blob has no tensor {fqn!r}")
        saved = self.saved_offsets.get(fqn)
        if saved is not None and offsets is not None and tuple(saved) != tuple(offsets):
            raise _bad(self.name, f"tensor {fqn!r} holds the chunk at {list(saved)}, "
                                  f"not the one at {list(offsets)}")
        dtype, shape, start, nbytes = ent
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        storage = torch.frombuffer(self.mapping, dtype=torch.uint8, count=nbytes,
                                   offset=start).untyped_storage()
        stride, step = [], 1
        for d in reversed(shape):
            stride.append(step)
            step *= max(d, 1)
        t = torch.empty(0, dtype=dtype).set_(storage, 0, shape, tuple(reversed(stride)))
        if aligned and t.data_ptr() % min(t.element_size(), 8):
            t = t.clone()  # as the loader does for misaligned storages
        return t


class _FileItems:
    """Decodes the items of one .distcp file, mapped once (or read into
    memory with mmap=False)."""

    def __init__(self, path, mmap=True):
        ensure_configured()
        self.name = os.fsdecode(os.fspath(path))
        self.mapping = (_native.map_file if mmap else _native.read_file)(os.fspath(path))
        self._blobs = {}

    def raw(self, sinfo):
        """The stored bytes of an item (a memoryview of the mapping)."""
        off, length = self._extent(sinfo)
        return memoryview(self.mapping)[off:off + length]

    def _extent(self, sinfo):
        off, length = sinfo.offset, sinfo.length
        if type(off) is not int or type(length) is not int or off < 0 or length < 0:
            raise _bad(self.name, f"invalid item extent {off!r}+{length!r} in the metadata")
        if off + length > self.mapping.size:
            raise _bad(self.name, f"the item at offset {off} with {length} bytes lies outside "
                                  f"the file ({self.mapping.size} bytes): truncated file?")
        return off, length

    def tensor(self, sinfo, index, transforms=None, read_item=None, aligned=True):
        """The tensor a TENSOR item holds, viewing the mapping (no copy).
        aligned=False: a tensor whose bytes are not aligned for its dtype
        (items torch's writer packs end to end) stays in place, for callers
        that only copy from it; else such bytes are copied once."""
        off, length = self._extent(sinfo)
        what = f"{self.name} [item {index.fqn!r} at {off}+{length}]"
        descriptors = getattr(sinfo, "transform_descriptors", None) or ()
        if descriptors:
            stream = transforms.transform_load_stream(
                read_item, descriptors, io.BytesIO(self.raw(sinfo)))
            mapping = _native.copy_buffer(stream.read())
            head = bytes(memoryview(mapping)[:4])
            if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
                return _checked_tensor(
                    _native.dcp_item(mapping, 0, mapping.size, what, aligned=aligned), what)
            return _SafetensorsBlob(mapping, 0, what).tensor(index.fqn, index.offset, aligned)
        head = bytes(memoryview(self.mapping)[off:off + 4])
        if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
            return _checked_tensor(
                _native.dcp_item(self.mapping, off, length, what, aligned=aligned), what)
        blob = self._blobs.get(off)
        if blob is None:
            blob = self._blobs[off] = _SafetensorsBlob(self.mapping, off, self.name)
        return blob.tensor(index.fqn, index.offset, aligned)


def _checked_tensor(obj, what):
    if not isinstance(obj, torch.Tensor):
        raise _native.CheckpointError(f"{what}: holds a {type(obj).__name__}, not a tensor")
    return obj


def _narrow(tensor, offsets, lengths):
    """tensor narrowed to the box at offsets with lengths (as torch's
    narrow_tensor_by_index)."""
    for dim, (o, n) in enumerate(zip(offsets, lengths)):
        if o != 0 or n != tensor.size(dim):
            tensor = tensor.narrow(dim, o, n)
    return tensor


def _byte_view(t):
    """A buffer over plain CPU tensor t's bytes (no copy), or None where a
    byte copy would not be what copy_ does (another layout, conj/neg bits,
    not contiguous, quantized, empty)."""
    if (t.device.type != "cpu" or t.layout != torch.strided or not t.is_contiguous()
            or t.is_quantized or t.is_conj() or t.is_neg() or t.numel() == 0):
        return None
    return t.reshape(-1).view(torch.uint8).numpy()


class _ByteCopies:
    """The tensor items of one read_data call whose copy is a plain byte
    copy (same dtype, both contiguous on the CPU): gathered, then copied in
    one native call on two threads with the GIL released
    (_native.copy_buffers), then committed to the planner in request order.
    At most _HOST_BATCH_BYTES wait at once (a planner may resolve each item
    to a temporary that its commit_tensor moves). Anything else is copied by
    torch, after the gathered copies."""

    def __init__(self):
        self.jobs, self.reqs, self.spans = [], [], []
        self.pending = 0

    def add(self, req, src, target):
        if src.dtype != target.dtype:
            return False
        a, b = _byte_view(src), _byte_view(target)
        if a is None or b is None:
            return False
        self.jobs.append((a, b))
        self.reqs.append((req, target))
        self.spans.append((target.data_ptr(), b.nbytes))
        self.pending += b.nbytes
        return True

    def full(self):
        return self.pending >= _HOST_BATCH_BYTES

    def flush(self, planner):
        if not self.jobs:
            return
        jobs, reqs, spans = self.jobs, self.reqs, self.spans
        self.jobs, self.reqs, self.spans = [], [], []
        self.pending = 0
        # targets that share bytes (tied entries) are written in request
        # order, as by copy_: one thread, in order
        spans.sort()
        threads = 2
        for (lo, n), (next_lo, _) in zip(spans, spans[1:]):
            if next_lo < lo + n:
                threads = 1
                break
        _native.copy_buffers(jobs, threads)
        del jobs
        for req, target in reqs:
            planner.commit_tensor(req, target)


# --------------------------------------------------------------------- reader


class _CheckpointDir:
    """What StorageReader and StorageWriter share: a checkpoint directory
    (self.path, on self.fs) as torch's FileSystemReader/Writer name it."""

    def _get_metadata_path(self, rank=None):
        name = METADATA_NAME if rank is None else f"__{rank}{METADATA_NAME}"
        return self.fs.concat_path(self.path, name)

    @property
    def checkpoint_id(self):
        return self.path

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id):
        return FileSystem.validate_checkpoint_id(checkpoint_id)


class StorageReader(_CheckpointDir, _StorageReaderBase):
    """torch.distributed.checkpoint StorageReader for FileSystemWriter's
    layout (and StorageWriter's), decoding items in C.

    path: the checkpoint directory. weights_only (default True): the
    `.metadata` pickle may name only DCP's metadata classes and allowlisted
    globals (False: any global, as torch's pickle.load; trusted files
    only). mmap (default True): .distcp files are mapped; False reads each
    into memory first. Byte items (non-tensor values) are handed to the
    planner's load_bytes as torch's reader hands them (DefaultLoadPlanner
    decodes them with torch.load(weights_only=False)).
    """

    def __init__(self, path, _extension_registry=None, *, weights_only=True, mmap=True):
        super().__init__()
        self.fs = FileSystem()
        self.path = self.fs.init_path(path)
        self.storage_data = {}
        self.load_id = _generate_uuid()
        self.transforms = _StorageReaderTransforms(_extension_registry)
        self.rank = None
        self.use_collectives = True
        self.weights_only = weights_only
        self.mmap = mmap

    def reset(self, checkpoint_id=None):
        self.storage_data = {}
        if checkpoint_id:
            self.path = self.fs.init_path(checkpoint_id)
        self.load_id = _generate_uuid()

    def read_metadata(self, *args, **kwargs):
        md = read_metadata(self._get_metadata_path(kwargs.get("rank")),
                           weights_only=self.weights_only)
        if getattr(md, "storage_meta", None) is None:
            md.storage_meta = _md.StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md

    def set_up_storage_reader(self, metadata, is_coordinator, *args, **kwargs):
        self.storage_data = metadata.storage_data
        self.rank = kwargs.get("rank")
        self.use_collectives = kwargs.get("use_collectives", True)
        if self.storage_data is None:
            raise AssertionError("storage_data must not be None in metadata")

    def prepare_local_plan(self, plan):
        return plan

    def prepare_global_plan(self, plans):
        return plans

    def read_data(self, plan, planner):
        copies = _ByteCopies()
        per_file = {}
        for req in plan.items:
            sinfo = self.storage_data[req.storage_index]
            per_file.setdefault(sinfo.relative_path, []).append(req)
        for rel, reqs in per_file.items():
            if not isinstance(rel, str) or os.path.isabs(rel) or ".." in Path(rel).parts:
                raise _native.CheckpointError(
                    f"{self.path}: metadata names a data file outside the checkpoint: {rel!r}")
            items = _FileItems(self.fs.concat_path(self.path, rel), self.mmap)
            for req in reqs:
                sinfo = self.storage_data[req.storage_index]
                if req.type == LoadItemType.BYTE_IO:
                    raw = items.raw(sinfo)
                    descriptors = getattr(sinfo, "transform_descriptors", None) or ()
                    if descriptors:
                        data = self.transforms.transform_load_stream(
                            req, descriptors, io.BytesIO(raw)).read(-1)
                    else:
                        data = bytes(raw)
                    planner.load_bytes(req, io.BytesIO(data))
                    continue
                src = items.tensor(sinfo, req.storage_index, self.transforms, req, aligned=False)
                src = _narrow(src, req.storage_offsets, req.lengths)
                target = planner.resolve_tensor(req).detach()
                if target.size() != src.size():
                    raise AssertionError(
                        f"req {req.storage_index} mismatch sizes {target.size()} vs {src.size()}")
                if not copies.add(req, src, target):
                    copies.flush(planner)
                    target.copy_(src)
                    planner.commit_tensor(req, target)
                elif copies.full():
                    copies.flush(planner)
            copies.flush(planner)
            del items
        fut = Future()
        fut.set_result(None)
        return fut


# --------------------------------------------------------------------- writer


def _item_nbytes(item):
    n = 1
    for s in item.tensor_data.size:
        n *= s
    return n * torch._utils._element_size(item.tensor_data.properties.dtype)


def _buckets(n, items):
    """items spread over n files as torch's writer spreads them: byte items
    round-robin, tensors largest first into the emptiest bucket."""
    if n <= 1:
        return [list(items)]
    byte_items = [wi for wi in items if wi.type == WriteItemType.BYTE_IO]
    tensor_items = sorted((wi for wi in items if wi.type != WriteItemType.BYTE_IO),
                          key=_item_nbytes, reverse=True)
    out = [[] for _ in range(n)]
    sizes = [0] * n
    for i, wi in enumerate(byte_items):
        out[i % n].append(wi)
    for wi in tensor_items:
        k = min(range(n), key=sizes.__getitem__)
        out[k].append(wi)
        sizes[k] += _item_nbytes(wi)
    return out


def _compact(t):
    """torch's writer saves a tensor whose storage holds exactly its bytes:
    a view of a larger storage is cloned first."""
    if t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.clone()
    return t


def _cpu_tensors(planner, items):
    """(tensor on the CPU, item) for each tensor item, resolved lazily;
    tensors on other devices are copied to the host in batches of about
    _HOST_BATCH_BYTES (one arena and one synchronisation per batch)."""
    pending, pending_bytes = [], 0

    def flush():
        copies = _hostcopy.batch_to_cpu([t for t, _ in pending])
        for t, wi in pending:
            cpu = copies.get(id(t))
            yield _compact(cpu if cpu is not None else t.cpu()), wi
        pending.clear()

    for wi in items:
        t = planner.resolve_data(wi).detach()
        if t.device.type == "cpu":
            yield _compact(t), wi
            continue
        pending.append((t, wi))
        pending_bytes += t.numel() * t.element_size()
        if pending_bytes >= _HOST_BATCH_BYTES:
            yield from flush()
            pending_bytes = 0
    if pending:
        yield from flush()


def _safetensors_blob_header(tensors, metadata):
    """The header of a safetensors blob holding tensors (key -> contiguous
    CPU tensor) in safetensors' order (by its dtype enum, largest first,
    then by key), padded with spaces to 8 bytes as safetensors pads it;
    returns (header bytes, [(key, tensor)] in data order). (safetensors
    itself writes the metadata keys in hash-map order, which varies from
    run to run; these are in the order given.)"""
    order = sorted(tensors.items(), key=lambda kv: (-_ST_RANK.get(_ST_NAMES.get(kv[1].dtype), 0),
                                                    kv[0]))
    entries = {"__metadata__": metadata}
    offset = 0
    for key, t in order:
        name = _ST_NAMES.get(t.dtype)
        if name is None:
            raise ValueError(f"safetensors cannot hold dtype {t.dtype} (tensor {key!r})")
        n = t.numel() * t.element_size()
        entries[key] = {"dtype": name, "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text, order


# Tensor items start at offsets that are multiples of this (the gap is
# zeros), so that their data, aligned inside each archive as torch aligns it,
# is aligned in the file too and can be used in place.
_ITEM_ALIGN = 64


def _align(out):
    pad = -out.tell() % _ITEM_ALIGN
    if pad:
        out.write(bytes(pad))


def _write_file(path, storage_key, items, planner, transforms, sync, fmt):
    """Writes one .distcp file atomically; returns its WriteResults."""
    from .saving import save

    results = []
    out = _native.atomic_file(os.fsdecode(os.fspath(path)), writeback=sync)
    with out:
        def record(wi, offset, length, descriptors):
            results.append(WriteResult(
                index=wi.index, size_in_bytes=length,
                storage_data=_StorageInfo(storage_key, offset, length,
                                          transform_descriptors=descriptors or None)))

        for wi in (w for w in items if w.type == WriteItemType.BYTE_IO):
            data = planner.resolve_data(wi)
            offset = out.tell()
            stream, descriptors = transforms.transform_save_stream(wi, out)
            stream.write(data.getbuffer())
            stream.close()
            record(wi, offset, out.tell() - offset, descriptors)

        st_tensors, st_offsets = {}, {}
        for t, wi in _cpu_tensors(planner, [w for w in items if w.type != WriteItemType.BYTE_IO]):
            if fmt == SerializationFormat.TORCH_SAVE:
                _align(out)
            elif not st_tensors:
                _align(out)  # the safetensors blob, whose offset every tensor item names
            offset = out.tell()
            stream, descriptors = transforms.transform_save_stream(wi, out)
            if fmt == SerializationFormat.TORCH_SAVE:
                save(t, stream, fsync=False)
            stream.close()
            if fmt == SerializationFormat.TORCH_SAVE:
                length = out.tell() - offset
            else:
                length = t.numel() * t.element_size()
                st_tensors[wi.index.fqn] = t.contiguous()
                st_offsets[wi.index.fqn] = {"saved_offsets": list(wi.tensor_data.chunk.offsets)}
            record(wi, offset, length, descriptors)

        if fmt == SerializationFormat.SAFETENSORS:
            header, order = _safetensors_blob_header(st_tensors, {
                "DCP_SHARDING_INFO": json.dumps(st_offsets),
                "DCP_VERSION": "1.0",
                "format": "pt",
            })
            out.write(header)
            for _, t in order:
                if t.numel():
                    out.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        out.commit(fsync=sync)
    return results


class StorageWriter(_CheckpointDir, _StorageWriterBase, BlockingAsyncStager):
    """torch.distributed.checkpoint StorageWriter for FileSystemReader's
    layout, encoding items with ckptio.save's C writer.

    Same arguments and defaults as torch's FileSystemWriter. Each .distcp
    file is written to a temporary file and renamed into place when
    complete (fsynced first when sync_files=True); `.metadata` last, the
    same way. On any error the files being written are removed and the
    exception propagates out of dcp.save.
    """

    def __init__(self, path, single_file_per_rank=True, sync_files=True, thread_count=1,
                 per_thread_copy_ahead=10_000_000, cache_staged_state_dict=False, overwrite=True,
                 _extensions=None, serialization_format=SerializationFormat.TORCH_SAVE):
        _StorageWriterBase.__init__(self)
        BlockingAsyncStager.__init__(self, cache_staged_state_dict=cache_staged_state_dict)
        self.fs = FileSystem()
        self.path = self.fs.init_path(path)
        self.single_file_per_rank = single_file_per_rank
        self.sync_files = sync_files
        self.thread_count = thread_count
        self.per_thread_copy_ahead = per_thread_copy_ahead
        self.save_id = _generate_uuid()
        self.overwrite = overwrite
        self.transforms = _StorageWriterTransforms(_extensions)
        self.serialization_format = SerializationFormat(serialization_format)
        self.rank = None
        self.use_collectives = True

    def reset(self, checkpoint_id=None):
        if checkpoint_id:
            self.path = self.fs.init_path(checkpoint_id)
        self.save_id = _generate_uuid()

    def set_up_storage_writer(self, is_coordinator, *args, **kwargs):
        self.rank = kwargs.get("rank")
        self.use_collectives = kwargs.get("use_collectives", True)

    def _metadata_exists(self):
        return self.fs.exists(self._get_metadata_path(None if self.use_collectives else 0))

    def prepare_local_plan(self, plan):
        self.fs.mkdir(self.path)
        if self._metadata_exists():
            if self.overwrite:
                warnings.warn(
                    f"Detected an existing checkpoint in {self.path}, overwriting since "
                    f"{self.overwrite=}. Past version 2.5 of PyTorch, `overwrite` will default "
                    "to False. Set this variable to True to maintain this functionality or False "
                    "to raise when an existing checkpoint is found.",
                    stacklevel=2,
                )
            else:
                raise RuntimeError(f"Checkpoint already exists and {self.overwrite=}.")
        if self.rank is not None and not self.use_collectives:
            plan = dataclasses.replace(plan, storage_data=_StoragePrefix(f"__{self.rank}_"))
        return plan

    def prepare_global_plan(self, plans):
        return [
            dataclasses.replace(plan, storage_data=_StoragePrefix(f"__{i}_"))
            if plan.storage_data is None else plan
            for i, plan in enumerate(plans)
        ]

    def write_data(self, plan, planner):
        prefix = plan.storage_data.prefix
        if self.single_file_per_rank:
            groups = _buckets(self.thread_count, plan.items)
        else:
            groups = [[item] for item in plan.items]
        jobs = []
        for i, group in enumerate(groups):
            name = f"{prefix}{i}{DEFAULT_SUFFIX}"
            jobs.append((self.fs.concat_path(self.path, name), name, group))
        results, errors = [], []
        lock = threading.Lock()

        def worker():
            while True:
                with lock:
                    if not jobs or errors:
                        return
                    job = jobs.pop(0)
                try:
                    res = _write_file(*job, planner, self.transforms, self.sync_files,
                                      self.serialization_format)
                except BaseException as exc:  # noqa: BLE001 - re-raised below
                    with lock:
                        errors.append(exc)
                    return
                with lock:
                    results.extend(res)

        threads = [threading.Thread(target=worker, daemon=True)
                   for _ in range(max(0, min(self.thread_count, len(jobs)) - 1))]
        for t in threads:
            t.start()
        worker()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        fut = Future()
        fut.set_result(results)
        return fut

    def finish(self, metadata, results):
        import pickle

        metadata.version = CURRENT_DCP_VERSION
        storage_md = {}
        for wr_list in results:
            storage_md.update({wr.index: wr.storage_data for wr in wr_list})
        metadata.storage_data = storage_md
        metadata.storage_meta = self.storage_meta()
        rank = None if self.use_collectives else self.rank
        target = self._get_metadata_path(rank)
        out = _native.atomic_file(os.fsdecode(os.fspath(target)), writeback=self.sync_files)
        with out:
            pickle.dump(metadata, out)
            out.commit(fsync=self.sync_files)

    def storage_meta(self):
        return _md.StorageMeta(checkpoint_id=self.checkpoint_id, save_id=self.save_id)

    def stage(self, state_dict):
        """AsyncStager.stage, as torch's FileSystemWriter (dcp.async_save)."""
        self.per_thread_copy_ahead = 0
        return super().stage(state_dict)


# ----------------------------------------------------- whole state dicts


def _set_path(root, path, value, limit, name):
    """Puts value at the object path (keys and list indices) in root, as
    torch's set_element does for dcp_to_torch_save; list indices are
    bounded by the number of entries (a hostile index never allocates)."""
    if not isinstance(path, (tuple, list)) or not path:
        raise _bad(name, f"planner_data holds an invalid object path {path!r}")
    for key in path:
        if type(key) is int and not 0 <= key < limit:
            raise _bad(name, f"object path {list(path)!r} has a list index out of range")
        if type(key) not in (int, str):
            raise _bad(name, f"object path {list(path)!r} holds a {type(key).__name__}")
    cur = root
    for prev, key in zip(path, path[1:]):
        default = {} if type(key) is str else []
        if isinstance(cur, dict):
            cur = cur.setdefault(prev, default)
        elif isinstance(cur, list) and type(prev) is int:
            cur.extend([None] * (prev + 1 - len(cur)))
            if cur[prev] is None:
                cur[prev] = default
            cur = cur[prev]
        else:
            raise _bad(name, f"object path {list(path)!r} crosses a {type(cur).__name__}")
    key = path[-1]
    if isinstance(cur, list) and type(key) is int:
        cur.extend([None] * (key + 1 - len(cur)))
    elif not isinstance(cur, dict):
        raise _bad(name, f"object path {list(path)!r} ends in a {type(cur).__name__}")
    cur[key] = value


def _boxes_overlap(a, b):
    return all(oa < ob + nb and ob < oa + na for oa, na, ob, nb in zip(a[0], a[1], b[0], b[1]))


# Up to this many boxes are compared pairwise; more are counted into a map
# of the tensor (one byte per element, no more than the chunks' own data).
_PAIRWISE_MAX = 64


def check_tiling(boxes, shape, what):
    """Raises CheckpointError unless the (offsets, sizes) boxes lie inside a
    tensor of shape, do not overlap and cover it: then a tensor assembled
    from them has every element written exactly once (no uninitialised
    memory shows through). Time and memory are bounded by the elements the
    boxes hold."""
    numel = 1
    for d in shape:
        numel *= d
    covered = 0
    for offsets, sizes in boxes:
        if len(offsets) != len(shape) or len(sizes) != len(shape) or any(
                type(o) is not int or type(n) is not int or o < 0 or n < 0 or o + n > d
                for o, n, d in zip(offsets, sizes, shape)):
            raise _native.CheckpointError(f"{what}: chunk at {list(offsets)} of {list(sizes)} "
                                          f"lies outside its size {list(shape)}")
        n = 1
        for d in sizes:
            n *= d
        covered += n
    if covered != numel:
        raise _native.CheckpointError(f"{what}: its chunks hold {covered} of its {numel} elements")
    if numel == 0:
        return
    boxes = [b for b in boxes if all(b[1])]  # empty boxes overlap nothing
    if len(boxes) <= _PAIRWISE_MAX:
        for i in range(len(boxes)):
            for j in range(i):
                if _boxes_overlap(boxes[i], boxes[j]):
                    raise _native.CheckpointError(
                        f"{what}: chunks at {list(boxes[i][0])} and {list(boxes[j][0])} overlap")
        return
    seen = torch.zeros(shape, dtype=torch.uint8)
    for offsets, sizes in boxes:
        _narrow(seen, offsets, sizes).add_(1)
    if int(seen.max()) != 1:
        raise _native.CheckpointError(f"{what}: its chunks overlap")


def _whole_tensor(key, tmd, chunks, files, name):
    """The full tensor of one key from its stored chunks: the stored tensor
    itself (viewing the file) when one contiguous chunk covers it, else a
    new tensor assembled from every chunk after checking that the chunks
    lie inside it, do not overlap and cover it."""
    size = tuple(tmd.size)
    dtype = tmd.properties.dtype
    parts, items = [], set()
    for chunk, sinfo, index in chunks:
        offsets, sizes = tuple(chunk.offsets), tuple(chunk.sizes)
        item = (sinfo.relative_path, sinfo.offset)
        if item in items:  # so that the elements checked below are all backed by data
            raise _bad(name, f"tensor {key!r}: two chunks name the same stored item")
        items.add(item)
        src = files(sinfo.relative_path).tensor(sinfo, index)
        if tuple(src.shape) != sizes:
            raise _bad(name, f"tensor {key!r}: the chunk at {list(offsets)} holds "
                             f"{list(src.shape)}, the metadata says {list(sizes)}")
        parts.append(((offsets, sizes), src))
    check_tiling([box for box, _ in parts], size, f"{name}: tensor {key!r}")
    if len(parts) == 1:
        src = parts[0][1]
        if src.dtype == dtype and src.is_contiguous() and not src.requires_grad:
            return src
    out = torch.empty(size, dtype=dtype)
    for (offsets, sizes), src in parts:
        _narrow(out, offsets, sizes).copy_(src)
    return out


def _apply_map_location(value, map_location):
    """Tensors of a whole state dict (all on the CPU) placed as torch.load's
    map_location would place the storages of a torch.save file."""
    if map_location is None:
        return value
    if isinstance(map_location, (str, bytes, torch.device)):
        where = map_location.decode() if isinstance(map_location, bytes) else str(map_location)
        if where == "cpu":
            return value
    restore = torch.serialization._get_restore_location(map_location)

    def move(t):
        storage = restore(t.untyped_storage(), "cpu")
        if isinstance(storage, torch.storage.TypedStorage):
            storage = storage._untyped_storage
        if storage.device.type == "cpu" and storage.data_ptr() == t.untyped_storage().data_ptr():
            return t
        out = torch.empty(0, dtype=t.dtype, device=storage.device)
        return out.set_(storage, t.storage_offset(), t.size(), t.stride())

    def walk(o):
        if isinstance(o, torch.Tensor):
            return move(o)
        if isinstance(o, dict):
            for k, v in o.items():
                o[k] = walk(v)
        elif isinstance(o, list):
            for i, v in enumerate(o):
                o[i] = walk(v)
        return o

    return walk(value)


def load_dir(path, map_location=None, *, weights_only=True, mmap=True):
    """The whole, unsharded state dict of a DCP checkpoint directory: what
    torch's dcp_to_torch_save followed by torch.load gives (the nested
    structure rebuilt from the planner data, one full tensor per key, the
    non-tensor values decoded), without the intermediate file.

    weights_only (default True): the `.metadata` pickle and every byte item
    are decoded under the weights-only allowlist (torch's conversion runs
    pickle.load and torch.load(weights_only=False) on them). mmap (default
    True): a tensor stored as one contiguous chunk views the mapped .distcp
    file (private, copy-on-write) instead of being copied.
    """
    from .serialization import load as _load

    root = Path(os.fspath(path))
    name = os.fsdecode(os.fspath(root / METADATA_NAME))
    md = read_metadata(root / METADATA_NAME, weights_only=weights_only)
    storage = md.storage_data or {}
    opened = {}

    def files(rel):
        if not isinstance(rel, str) or os.path.isabs(rel) or ".." in Path(rel).parts:
            raise _bad(name, f"metadata names a data file outside the checkpoint: {rel!r}")
        f = opened.get(rel)
        if f is None:
            f = opened[rel] = _FileItems(root / rel, mmap)
        return f

    planner_data = md.planner_data if isinstance(md.planner_data, dict) else {}
    limit = max(len(md.state_dict_metadata), 1)
    result = {}
    for key, smd in md.state_dict_metadata.items():
        if isinstance(smd, _md.TensorStorageMetadata):
            chunks = []
            for i, chunk in enumerate(smd.chunks):
                index = _md.MetadataIndex(key, chunk.offsets, i)
                sinfo = storage.get(index)
                if sinfo is None:
                    raise _bad(name, f"tensor {key!r}: no stored data for the chunk at "
                                     f"{list(chunk.offsets)}")
                chunks.append((chunk, sinfo, index))
            value = _whole_tensor(key, smd, chunks, files, name)
        elif isinstance(smd, _md.BytesStorageMetadata):
            index = _md.MetadataIndex(key)
            sinfo = storage.get(index)
            if sinfo is None:
                raise _bad(name, f"value {key!r} has no stored data")
            what = f"{files(sinfo.relative_path).name} [item {key!r}]"
            raw = files(sinfo.relative_path).raw(sinfo)
            if getattr(sinfo, "transform_descriptors", None):
                reader = _StorageReaderTransforms()
                raw = reader.transform_load_stream(None, sinfo.transform_descriptors,
                                                   io.BytesIO(raw)).read(-1)
            try:
                value = _load(raw, weights_only=weights_only)
            except _native.CheckpointError as exc:
                raise type(exc)(f"{what}: {exc}") from None
        else:
            raise _bad(name, f"entry {key!r} has unknown storage metadata "
                             f"{type(smd).__name__}")
        obj_path = planner_data.get(key, (key,))
        _set_path(result, obj_path, value, limit, name)
    return _apply_map_location(result, map_location)


def save_dir(obj, path, **writer_kwargs):
    """Writes a (nested) state dict as a DCP checkpoint directory in one
    process, as torch's torch_save_to_dcp does, with StorageWriter."""
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*existing checkpoint.*")
        dcp.save(obj, storage_writer=StorageWriter(path, **writer_kwargs), no_dist=True)


def verify_dir(path):
    """ckptio.verify (strict) of every torch.save item of a DCP checkpoint:
    the CRC-32 of every record, the container and the storages; raises
    CheckpointError naming the file and the item on the first problem."""
    from .verification import verify_mapping

    root = Path(os.fspath(path))
    md = read_metadata(root / METADATA_NAME)
    opened = {}
    for index, sinfo in (md.storage_data or {}).items():
        rel = sinfo.relative_path
        if not isinstance(rel, str) or os.path.isabs(rel) or ".." in Path(rel).parts:
            raise _bad(os.fsdecode(os.fspath(root)), f"metadata names a file outside: {rel!r}")
        f = opened.get(rel)
        if f is None:
            f = opened[rel] = _FileItems(root / rel)
        raw = f.raw(sinfo)
        if getattr(sinfo, "transform_descriptors", None) or bytes(raw[:4]) != b"PK\x03\x04":
            continue
        verify_mapping(_native.copy_buffer(raw), f"{f.name} [item {index.fqn!r}]",
                       strict=True, run_loader=False)

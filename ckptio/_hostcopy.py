"""Batched device-to-host copies of tensors: the Python half of
_native.copy_to_host (src/binding/hostcopy.c, src/core/devcopy.c).

batch_to_cpu groups the tensors by the device storage they view, copies for
each storage the one byte span its tensors cover into one host arena (one
cudaMemcpyAsync per span, one stream per device, one synchronisation), and
rebuilds each tensor over the arena with its dtype, shape, stride and
storage offset (counted from the span's start), so tensors of one dtype
that shared a device storage share one CPU storage. The arena is pinned
(cudaMallocHost) unless $CKPTIO_PINNED=0 or page-locked memory runs out,
and is freed when the last tensor over it dies.

Views of one storage under different dtypes get one span (and one CPU
storage) per dtype: torch.save refuses tensors that view the same data as
different types, and mmcv's per-tensor .cpu() never shares at all, so a
state dict that mmcv can save stays one that torch.save can write.
"""
import os

import torch

from . import _native

# Device types whose tensors are copied in one batch. The tests add "cpu"
# to drive the batch through a fake CUDA runtime (tests/fake_cudart.c).
BATCH_DEVICES = ("cuda",)

# Span starts inside a device storage are rounded down to this many bytes,
# a multiple of every element size, so a tensor of any dtype can be rebuilt
# at its own offset from the span's start.
_SPAN_ALIGN = 64


def _library():
    """The CUDA runtime to use: $CKPTIO_CUDART, else None (the one that
    torch loaded, found by the C side)."""
    return os.environ.get("CKPTIO_CUDART") or None


def _pinned():
    """Whether the arena is page-locked (the default) or, with
    $CKPTIO_PINNED=0, pageable heap memory: cheaper to allocate, slower to
    fill (the driver stages the copies)."""
    return os.environ.get("CKPTIO_PINNED", "1") != "0"


def _copy(segments):
    """_native.copy_to_host(segments) into a pinned arena, or a pageable one
    when page-locked memory runs out (it is scarcer than memory; .cpu()
    would use pageable memory too). None when no CUDA runtime is found."""
    library, pinned = _library(), _pinned()
    try:
        return _native.copy_to_host(segments, library, pinned=pinned)
    except MemoryError:
        if not pinned:
            raise
        return _native.copy_to_host(segments, library, pinned=False)


def _batchable(val) -> bool:
    """Whether val.cpu() is a plain dense copy that the batch reproduces
    exactly. Tensors that need autograd (requires_grad), subclasses other
    than Parameter, non-strided layouts, quantized tensors, lazily
    conjugated or negated views and empty tensors take val.cpu()."""
    return (
        type(val) in (torch.Tensor, torch.nn.Parameter)
        and val.device.type in BATCH_DEVICES
        and val.layout is torch.strided
        and not val.requires_grad
        and not val.is_quantized
        and not val.is_conj()
        and not val.is_neg()
        and val.numel() > 0
    )


def _byte_extent(t, size):
    """[start, end) of the bytes of t's storage that t can reach; size is
    t's element size."""
    start = t.storage_offset() * size
    if t.is_contiguous():
        return start, start + t.numel() * size
    last = sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    return start, start + (last + 1) * size


def batch_to_cpu(values) -> dict:
    """Copies the batchable tensors among values to the CPU in one batch.

    Returns {id(tensor): cpu tensor}; values not in it (non-tensors,
    tensors already on the CPU, tensors _batchable rejects) are left to the
    caller. Returns {} when there is nothing to batch or no CUDA runtime.
    """
    # (device index, storage address, dtype) -> [lo, hi, element size, [(tensor, start)]]
    spans = {}
    for val in values:
        if not isinstance(val, torch.Tensor) or not _batchable(val):
            continue
        size = val.element_size()
        start, end = _byte_extent(val, size)
        key = (max(val.get_device(), 0), val.untyped_storage().data_ptr(), val.dtype)
        span = spans.get(key)
        if span is None:
            spans[key] = [start, end, size, [(val, start)]]
        else:
            span[0] = min(span[0], start)
            span[1] = max(span[1], end)
            span[3].append((val, start))
    if not spans:
        return {}
    for span in spans.values():
        span[0] -= span[0] % _SPAN_ALIGN

    if "cuda" in BATCH_DEVICES and torch.cuda.is_available():
        # .cpu() orders after the current stream; so does the batch
        for device in {key[0] for key in spans}:
            torch.cuda.current_stream(device).synchronize()

    keys = list(spans)
    segments = [(key[1] + spans[key][0], spans[key][1] - spans[key][0], key[0]) for key in keys]
    copied = _copy(segments)
    if copied is None:
        return {}
    arena, offsets = copied

    out = {}
    for key, offset in zip(keys, offsets):
        lo, hi, size, tensors = spans[key]
        # one tensor of the span's dtype over its bytes (lo is 64-aligned and
        # hi ends an element, so the span holds whole elements); every tensor
        # of the span is a strided view of it, sharing its storage
        whole = torch.frombuffer(arena, dtype=torch.uint8, count=hi - lo, offset=offset)
        whole = whole.view(key[2])
        for t, start in tensors:
            out[id(t)] = whole.as_strided(t.shape, t.stride(), (start - lo) // size)
    return out


def storages_to_cpu(storages) -> list:
    """ckptio.save's device copier: CPU copies of storages that live on
    another device, in the same order, the CUDA ones in one batch (one
    arena, one synchronisation) and any other with storage.cpu(), as
    torch.save copies each. Without a CUDA runtime every storage takes
    storage.cpu()."""
    batch = [s for s in storages if s.device.type in BATCH_DEVICES and s.nbytes() > 0]
    copies = {}
    if batch:
        if "cuda" in BATCH_DEVICES and torch.cuda.is_available():
            for device in {max(s.device.index or 0, 0) for s in batch}:
                torch.cuda.current_stream(device).synchronize()
        segments = [(s.data_ptr(), s.nbytes(), max(s.device.index or 0, 0)) for s in batch]
        copied = _copy(segments)
        if copied is not None:
            arena, offsets = copied
            for s, offset in zip(batch, offsets):
                view = torch.frombuffer(arena, dtype=torch.uint8, count=s.nbytes(), offset=offset)
                copies[id(s)] = view.untyped_storage()
    return [copies[id(s)] if id(s) in copies else s.cpu() for s in storages]

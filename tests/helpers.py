"""Comparison of loaded objects against torch.load's, the oracle.

Equal means: the same type; for tensors the same dtype, shape, stride,
storage offset, storage size, requires_grad, bytes and (across the whole
result) the same pattern of storage sharing; for OrderedDicts the same
keys in the same order and the same _metadata; numpy values equal with the
same dtype; everything else ==.
"""
import collections
import math

import numpy as np
import torch


class _Sharing:
    """Maps each storage seen to the order of its first appearance, so that
    two results can be compared for the same sharing pattern."""

    def __init__(self):
        self.ids = {}

    def key(self, tensor):
        ptr = tensor.untyped_storage().data_ptr()
        nbytes = tensor.untyped_storage().nbytes()
        if nbytes == 0:
            return ("empty", len(self.ids))
        return self.ids.setdefault(ptr, len(self.ids))


def tensor_bytes(t):
    """The raw bytes of a tensor's elements, whatever its dtype and strides."""
    t = t.detach()
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    if t.numel() == 0:
        return b""
    flat = torch.empty(t.numel(), dtype=t.dtype).copy_(t.reshape(-1))
    return bytes(flat.view(torch.uint8).numpy())


def storage_bytes(t):
    s = t.untyped_storage()
    return bytes(torch.empty(0, dtype=torch.uint8).set_(s).numpy()) if s.nbytes() else b""


def assert_same(ours, theirs, path="result", sharing=None):
    if sharing is None:
        sharing = (_Sharing(), _Sharing())
    assert type(ours) is type(theirs), f"{path}: type {type(ours)} != {type(theirs)}"
    if isinstance(theirs, torch.Tensor):
        assert ours.dtype == theirs.dtype, f"{path}: dtype {ours.dtype} != {theirs.dtype}"
        assert ours.shape == theirs.shape, f"{path}: shape {ours.shape} != {theirs.shape}"
        assert ours.device == theirs.device, f"{path}: device"
        if theirs.layout == torch.strided and theirs.device.type != "meta":
            assert ours.stride() == theirs.stride(), f"{path}: stride"
            assert ours.storage_offset() == theirs.storage_offset(), f"{path}: storage offset"
            assert (
                ours.untyped_storage().nbytes() == theirs.untyped_storage().nbytes()
            ), f"{path}: storage size"
            assert tensor_bytes(ours) == tensor_bytes(theirs), f"{path}: bytes differ"
            assert storage_bytes(ours) == storage_bytes(theirs), f"{path}: storage bytes differ"
            assert sharing[0].key(ours) == sharing[1].key(theirs), f"{path}: storage sharing"
            assert (ours._base is None) == (theirs._base is None), f"{path}: autograd view"
        assert ours.requires_grad == theirs.requires_grad, f"{path}: requires_grad"
        assert ours.is_conj() == theirs.is_conj() and ours.is_neg() == theirs.is_neg()
        assert ours.__dict__.keys() == theirs.__dict__.keys(), f"{path}: attributes"
        for k in theirs.__dict__:
            assert_same(ours.__dict__[k], theirs.__dict__[k], f"{path}.{k}", sharing)
        return
    if isinstance(theirs, torch.storage.TypedStorage):
        assert ours.dtype == theirs.dtype and ours.size() == theirs.size(), path
        assert bytes(ours._untyped_storage) == bytes(theirs._untyped_storage), path
        return
    if isinstance(theirs, dict):
        assert list(ours.keys()) == list(theirs.keys()), f"{path}: keys or their order differ"
        for k in theirs:
            assert_same(ours[k], theirs[k], f"{path}[{k!r}]", sharing)
        if isinstance(theirs, collections.OrderedDict) or hasattr(theirs, "__dict__"):
            assert getattr(ours, "__dict__", {}).keys() == getattr(theirs, "__dict__", {}).keys()
            for k in getattr(theirs, "__dict__", {}):
                assert_same(getattr(ours, k), getattr(theirs, k), f"{path}.{k}", sharing)
        return
    if isinstance(theirs, (list, tuple)):
        assert len(ours) == len(theirs), f"{path}: length"
        for i, (a, b) in enumerate(zip(ours, theirs)):
            assert_same(a, b, f"{path}[{i}]", sharing)
        return
    if isinstance(theirs, np.ndarray):
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, path
        if theirs.dtype == object:  # elements, not their addresses
            for i, (a, b) in enumerate(zip(ours.ravel(), theirs.ravel())):
                assert_same(a, b, f"{path}.flat[{i}]", sharing)
            return
        assert ours.tobytes() == theirs.tobytes(), path
        return
    if (
        hasattr(theirs, "__dict__")
        and not isinstance(theirs, type)
        and type(theirs).__eq__ is object.__eq__
    ):
        # plain objects (mmengine's HistoryBuffer): the same attributes
        assert_same(vars(ours), vars(theirs), f"{path}.__dict__", sharing)
        return
    if isinstance(theirs, float) and math.isnan(theirs):
        assert math.isnan(ours), path
        return
    assert ours == theirs, f"{path}: {ours!r} != {theirs!r}"

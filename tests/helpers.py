"""Comparison of loaded objects against torch.load's, the oracle.

Equal means: the same type; for tensors the same dtype, shape, stride,
storage offset, storage size, requires_grad, bytes and (across the whole
result) the same pattern of storage sharing; for OrderedDicts the same
keys in the same order and the same _metadata; numpy values equal with the
same dtype; everything else ==.
"""
import collections
import contextlib
import io
import logging
import math
import os
import warnings

import numpy as np
import torch
import torch.nn as nn


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


# ---- what the mmcv and mmengine surface tests share (test_mmcv_checkpoint.py,
# test_mmengine_checkpoint.py): models, outcome capture, the scheme routes


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.norm = nn.BatchNorm2d(3)


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = Block()
        self.conv = nn.Conv2d(3, 3, 1)


class Other(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.fc = nn.Linear(2, 2)


class Opaque:
    """A class torch's weights-only unpickler refuses."""

    def __init__(self, x=1):
        self.x = x


def run(fn, *args, **kwargs):
    """(result or exception, stdout, warnings) of one call."""
    out = io.StringIO()
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(out):
        warnings.simplefilter("always")
        try:
            result = ("ok", fn(*args, **kwargs))
        except Exception as exc:
            result = ("raised", exc)
    seen = [(w.category, str(w.message)) for w in caught if w.category is not UserWarning]
    return result, out.getvalue(), seen


def same_exception(mine, theirs):
    assert type(mine) is type(theirs)
    if isinstance(theirs, OSError) and theirs.errno is not None:
        # an open that fails in a temporary directory: ckptio.load words it its own way
        assert mine.errno == theirs.errno
        assert os.path.basename(mine.filename) == os.path.basename(theirs.filename)
    else:
        assert str(mine) == str(theirs)


def same_outcome(mine, theirs):
    """Asserts that two run() results agree: printed text, warnings, and the
    value returned (same_values) or the exception raised (same_exception)."""
    assert mine[1] == theirs[1], "printed text differs"
    assert mine[2] == theirs[2], "warnings differ"
    assert mine[0][0] == theirs[0][0], (mine[0], theirs[0])
    if theirs[0][0] == "raised":
        same_exception(mine[0][1], theirs[0][1])
    else:
        assert same_values(theirs[0][1], mine[0][1])


def side_by_side(oracle, ours, name, *args, **kwargs):
    """Calls the oracle module's function `name` and ours; asserts the same
    outcome (same_outcome). Returns ours' result."""
    theirs = run(getattr(oracle, name), *args, **kwargs)
    mine = run(getattr(ours, name), *args, **kwargs)
    same_outcome(mine, theirs)
    return mine[0][1]


def load_both(oracle, ours, path, make, seed=0, **kwargs):
    """load_checkpoint (the oracle module's and ours) into two equal fresh
    models; asserts the same outcome and the same weights afterwards.
    Returns ours' run() result."""
    m1, m2 = fresh(make, seed), fresh(make, seed)
    theirs = run(oracle.load_checkpoint, m1, path, **kwargs)
    mine = run(ours.load_checkpoint, m2, path, **kwargs)
    same_outcome(mine, theirs)
    assert params_equal(m1, m2)
    return mine


@contextlib.contextmanager
def log_records(name):
    """Logger `name` at level INFO, and the list of (levelname, message) of
    each record it emits inside the block."""
    logger = logging.getLogger(name)
    logger.setLevel(logging.INFO)
    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append((record.levelname, record.getMessage()))
    logger.addHandler(handler)
    try:
        yield logger, records
    finally:
        logger.removeHandler(handler)


def fds_into(pid, directory):
    """(/proc/<pid>/fd/<n>, link text) of each descriptor of process pid that
    points into directory; [] once the process is gone."""
    fd_dir = f"/proc/{pid}/fd"
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return []
    found = []
    for fd in fds:
        fd_path = os.path.join(fd_dir, fd)
        try:
            link = os.readlink(fd_path)
        except OSError:
            continue
        if link.startswith(directory + "/"):
            found.append((fd_path, link))
    return found


def fresh(cls, seed):
    torch.manual_seed(seed)
    return cls()


def params_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


ROUTES = {
    "http://xx.xx/xx.pth": "load_from_http",
    "https://xx.xx/xx.pth": "load_from_http",
    "modelzoo://xx.xx/xx.pth": "load_from_torchvision",
    "torchvision://xx.xx/xx.pth": "load_from_torchvision",
    "open-mmlab://xx.xx/xx.pth": "load_from_openmmlab",
    "openmmlab://xx.xx/xx.pth": "load_from_openmmlab",
    "mmcls://xx.xx/xx.pth": "load_from_mmcls",
    "pavi://xx.xx/xx.pth": "load_from_pavi",
    "s3://xx.xx/xx.pth": "load_from_ceph",
    "ss3://xx.xx/xx.pth": "load_from_local",
    " s3://xx.xx/xx.pth": "load_from_local",
    "open-mmlab:s3://xx.xx/xx.pth": "load_from_ceph",
    "openmmlab:s3://xx.xx/xx.pth": "load_from_ceph",
    "openmmlabs3://xx.xx/xx.pth": "load_from_local",
    ":s3://xx.xx/xx.path": "load_from_local",
}


def same_values(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return type(a) is type(b) and list(a) == list(b) and all(same_values(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same_values, a, b))
    return a == b


def same_routes(theirs, ours, routes):
    """Each filename of routes goes to the loader named for it, in their
    CheckpointLoader and in ours (ours: the surface's own function), and the
    two registries list their schemes in the same order."""
    for filename, fn_name in routes.items():
        their_fn = theirs.CheckpointLoader._get_checkpoint_loader(filename)
        mine = ours.CheckpointLoader._get_checkpoint_loader(filename)
        assert their_fn.__name__ == mine.__name__ == fn_name
        assert mine is getattr(ours, fn_name)
    assert list(theirs.CheckpointLoader._schemes) == list(ours.CheckpointLoader._schemes)

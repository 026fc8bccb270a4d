"""ckptio against whichever torch is installed: the file CI runs under every
supported torch (Debian's 1.13 under /usr/bin/python3, 2.13 CPU, 2.14 CUDA
build), so it uses only what torch 1.13 already has. Oracles are that
torch's own torch.load/torch.save and mmcv 1.7.2 beside it."""
import collections
import io
import os

import pytest
import torch

import ckptio

DTYPES = [getattr(torch, n) for n in (
    "float64", "float32", "float16", "bfloat16", "complex64", "int64", "int32", "int16",
    "int8", "uint8", "bool") if hasattr(torch, n)]


def _sample(dtype, shape, seed):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g) * 100
    if dtype == torch.bool:
        return t > 0
    if dtype.is_complex:
        return torch.complex(t, -t).to(dtype)
    return t.to(dtype)


def _state():
    sd = collections.OrderedDict()
    for i, dtype in enumerate(DTYPES):
        sd[f"layer{i}.{str(dtype)[6:]}"] = _sample(dtype, (3, 5), i)
    base = torch.arange(24.0).view(4, 6)
    sd["shared.base"] = base
    sd["shared.row"] = base[1]          # a view: same storage, offset 6
    sd["shared.t"] = base.t()           # a strided view
    sd["scalar"] = torch.tensor(7)
    sd["empty"] = torch.zeros(0, 3)
    sd._metadata = collections.OrderedDict([("", {"version": 1}), ("layer0", {"version": 2})])
    return {"state_dict": sd, "meta": {"epoch": 3, "classes": ("a", "b")},
            "param": torch.nn.Parameter(torch.ones(2, 2)), "nested": [(torch.ones(1), None)]}


def _same(a, b):
    if isinstance(a, torch.Tensor):
        assert type(a) is type(b) and a.dtype == b.dtype and a.shape == b.shape
        assert a.stride() == b.stride() and a.storage_offset() == b.storage_offset()
        assert a.requires_grad == b.requires_grad
        assert torch.equal(a, b)
        return
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, dict):
        assert list(a) == list(b)
        assert getattr(a, "_metadata", None) == getattr(b, "_metadata", None)
        for k in a:
            _same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y)
    else:
        assert a == b


def _ptr(t):
    return t.storage().data_ptr()


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("mmap", [True, False], ids=["mmap", "read"])
def test_load_matches_this_torch(tmp_path, legacy, mmap):
    path = tmp_path / "x.pth"
    torch.save(_state(), path, _use_new_zipfile_serialization=not legacy)
    want = torch.load(path, weights_only=True)
    got = ckptio.load(path, mmap=mmap)
    _same(want, got)
    sd = got["state_dict"]
    assert _ptr(sd["shared.row"]) == _ptr(sd["shared.base"]) == _ptr(sd["shared.t"])


@pytest.mark.parametrize("map_location", ["cpu", torch.device("cpu"), {"cpu": "cpu"},
                                          lambda storage, loc: storage, None],
                         ids=["str", "device", "dict", "callable", "none"])
def test_map_locations(tmp_path, map_location):
    path = tmp_path / "x.pth"
    torch.save(_state(), path)
    _same(torch.load(path, map_location=map_location, weights_only=True),
          ckptio.load(path, map_location=map_location))


def test_bytes_and_streams(tmp_path):
    buf = io.BytesIO()
    torch.save(_state(), buf)
    want = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    _same(want, ckptio.load(buf.getvalue()))
    _same(want, ckptio.load(io.BytesIO(buf.getvalue())))


def test_save_is_read_by_this_torch(tmp_path):
    obj = _state()
    path = tmp_path / "c.pth"
    ckptio.save(obj, path)
    got = torch.load(path, weights_only=True)
    _same(obj, got)
    sd = got["state_dict"]
    assert _ptr(sd["shared.row"]) == _ptr(sd["shared.base"])
    buf = io.BytesIO()
    ckptio.save(obj, buf)
    _same(obj, torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    assert ckptio.verify(path).ok


def test_refused_global_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"f": os.getcwd}, path)
    with pytest.raises(ckptio.UnpicklingError, match="posix.getcwd|os.getcwd"):
        ckptio.load(path)
    assert ckptio.load(path, weights_only=False)["f"] is os.getcwd


def _mmcv_runner():
    pytest.importorskip("mmcv")
    from mmcv import runner

    return runner


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4)
        self.head = torch.nn.Linear(4, 2)


def test_mmcv_checkpoints_both_ways(tmp_path):
    runner = _mmcv_runner()
    torch.manual_seed(0)
    net = _Net()
    theirs = tmp_path / "mmcv.pth"
    runner.save_checkpoint(net, str(theirs), meta={"epoch": 2})
    fresh, ref = _Net(), _Net()
    got = ckptio.load_checkpoint(fresh, str(theirs), map_location="cpu")
    want = runner.load_checkpoint(ref, str(theirs), map_location="cpu")
    assert got["meta"] == want["meta"]
    _same(want["state_dict"], got["state_dict"])
    for a, b in zip(fresh.state_dict().values(), ref.state_dict().values()):
        assert torch.equal(a, b)
    ours = tmp_path / "ours.pth"
    ckptio.save_checkpoint(net, str(ours), meta={"epoch": 2})
    back = _Net()
    runner.load_checkpoint(back, str(ours))
    for a, b in zip(back.state_dict().values(), net.state_dict().values()):
        assert torch.equal(a, b)


def test_patch_swaps_mmcv(tmp_path):
    runner = _mmcv_runner()
    original = runner.load_checkpoint
    ckptio.patch()
    try:
        assert runner.load_checkpoint is ckptio.load_checkpoint
        net = _Net()
        path = tmp_path / "p.pth"
        runner.save_checkpoint(net, str(path))
        runner.load_checkpoint(_Net(), str(path))
    finally:
        ckptio.unpatch()
    assert runner.load_checkpoint is original

"""The direct path of load_checkpoint (ckptio/_direct.py), more cases: the
pread reader (pread_into on one and two threads, its range and read-only
errors, pread_file and mmap=False), map_location variants, identity of the
model's tensors, and the returned checkpoint untouched; each side by side
with mmcv 1.7.2's / mmengine 0.10.7's load_checkpoint on the same files.
tests/test_direct.py holds the module-structure cases."""
import contextlib
import io
import os
import time
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn

import ckptio
from ckptio import _direct, _native
import ckptio.checkpoint as ours
import ckptio.mmengine as ours_me
from ckptio.bench.cold import drop_pages, resident_fraction  # fsync + fadvise(DONTNEED); mincore

mmcv_ckpt = pytest.importorskip("mmcv.runner.checkpoint")
me_ckpt = pytest.importorskip("mmengine.runner.checkpoint")


class Net(nn.Module):
    def __init__(self, out=4):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, out)


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = self.a


class Scaled(nn.Linear):
    def _load_from_state_dict(self, sd, prefix, *args):
        key = prefix + "weight"
        if key in sd:
            sd[key] = sd[key] * 2
        super()._load_from_state_dict(sd, prefix, *args)


def _source(model_cls, seed=0):
    torch.manual_seed(seed)
    m = model_cls()
    for p in m.parameters():
        nn.init.normal_(p)
    for b in m.buffers():
        if b.is_floating_point():
            b.normal_()
    return m


def _run(fn, model, path, **kw):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            fn(model, path, **kw)
            res = None
        except Exception as exc:
            res = (type(exc), str(exc))
    return res, out.getvalue().replace(os.fspath(path), "")


def _compare(theirs_fn, ours_fn, make, path, **kw):
    torch.manual_seed(1)
    a = make()
    torch.manual_seed(1)
    b = make()
    before = dict(_direct.stats)
    path = os.fspath(path)
    r1, o1 = _run(theirs_fn, a, path, **kw)
    r2, o2 = _run(ours_fn, b, path, **kw)
    assert r1 == r2
    # mmcv/mmengine print their own "load checkpoint from" line only via the logger
    assert [l for l in o1.splitlines() if "oad" not in l] == [
        l for l in o2.splitlines() if "oad" not in l]
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    return _direct.stats["direct"] - before["direct"]


SURFACES = [(mmcv_ckpt.load_checkpoint, ours.load_checkpoint),
            (me_ckpt.load_checkpoint, ours_me.load_checkpoint)]


@pytest.mark.parametrize("theirs,mine", SURFACES)
@pytest.mark.parametrize("map_location", [None, "cpu", torch.device("cpu"), {"cpu": "cpu"},
                                          lambda s, loc: s])
def test_direct_equals_load_state_dict(tmp_path, theirs, mine, map_location):
    src = _source(Net)
    f = tmp_path / "a.pth"
    torch.save({"state_dict": OrderedDict(("module." + k, v) for k, v in
                                          src.state_dict().items()), "meta": {}}, f)
    n = _compare(theirs, mine, Net, f, map_location=map_location)
    if callable(map_location):  # restore() hands storages to Python: not views of the file
        assert n == 0
    else:
        assert n == len(src.state_dict())  # every entry read directly, BatchNorm's included


@pytest.mark.parametrize("theirs,mine", SURFACES)
@pytest.mark.parametrize("strict", [False, True])
def test_mismatches_messages_and_strict(tmp_path, theirs, mine, strict):
    sd = _source(Net).state_dict()
    sd["fc.weight"] = torch.randn(5, 8)              # shape mismatch
    sd["conv.weight"] = sd["conv.weight"].double()   # dtype cast: normal path
    del sd["bn.running_var"]                         # missing
    sd["extra.w"] = torch.ones(2)                    # unexpected
    f = tmp_path / "b.pth"
    torch.save(sd, f)
    n = _compare(theirs, mine, Net, f, strict=strict)
    assert n > 0


@pytest.mark.parametrize("theirs,mine", SURFACES)
def test_shared_custom_and_metadata(tmp_path, theirs, mine):
    f = tmp_path / "t.pth"
    sd = OrderedDict([("a.weight", torch.randn(4, 4)), ("a.bias", torch.randn(4)),
                      ("b.weight", torch.randn(4, 4)), ("b.bias", torch.randn(4))])
    torch.save(sd, f)
    assert _compare(theirs, mine, Tied, f) == 0   # one parameter, two keys: normal path
    g = tmp_path / "s.pth"
    torch.save(OrderedDict(weight=torch.randn(3, 2), bias=torch.randn(3)), g)
    assert _compare(theirs, mine, lambda: Scaled(2, 3), g) == 0
    # BatchNorm's _metadata version 1 without num_batches_tracked
    sd = _source(Net).state_dict()
    del sd["bn.num_batches_tracked"]
    sd._metadata = OrderedDict([("", {"version": 1}), ("bn", {"version": 1})])
    h = tmp_path / "m.pth"
    torch.save(sd, h)
    assert _compare(theirs, mine, Net, h) > 0


@pytest.mark.parametrize("theirs,mine", SURFACES)
def test_revise_keys_and_returned_checkpoint(tmp_path, theirs, mine):
    src = _source(Net)
    f = tmp_path / "r.pth"
    torch.save({"state_dict": OrderedDict(("backbone." + k, v) for k, v in
                                          src.state_dict().items())}, f)
    assert _compare(theirs, mine, Net, f, revise_keys=[(r"^backbone\.", "")]) > 0
    m = Net()
    ckpt = mine(m, str(f), revise_keys=[])
    own = {t.data_ptr() for t in m.state_dict().values()}
    assert not any(v.data_ptr() in own for v in ckpt["state_dict"].values())


def test_requires_grad_and_identity(tmp_path):
    src = _source(Net)
    f = tmp_path / "g.pth"
    torch.save(src.state_dict(), f)
    m = Net()
    params = {k: p for k, p in m.named_parameters()}
    ours.load_checkpoint(m, str(f))
    for k, p in m.named_parameters():
        assert p is params[k] and p.requires_grad
        assert torch.equal(p, src.state_dict()[k])


def test_pread_reader(tmp_path):
    data = torch.randint(0, 255, (80 << 20,), dtype=torch.uint8)  # > 64 MiB: two threads
    f = tmp_path / "raw"
    f.write_bytes(data.numpy().tobytes())
    dst = torch.empty_like(data)
    fd = os.open(f, os.O_RDONLY)
    try:
        for threads in (1, 2):
            dst.zero_()
            _native.pread_into(fd, [(0, dst[: 1 << 20].numpy()), (1 << 20, dst[1 << 20:].numpy())],
                               threads=threads)
            assert torch.equal(dst, data)
        with pytest.raises(ValueError):
            _native.pread_into(fd, [(10, dst.numpy())])
        with pytest.raises(BufferError):
            _native.pread_into(fd, [(0, b"abc")])
    finally:
        os.close(fd)
    m = _native.pread_file(os.fspath(f))
    assert bytes(memoryview(m)[:4096]) == data.numpy().tobytes()[:4096]
    assert m.size == data.numel()


def test_mmap_false_matches_torch(tmp_path):
    sd = _source(Net).state_dict()
    f = tmp_path / "n.pth"
    torch.save(sd, f)
    got = ckptio.load(f, mmap=False)
    for k in sd:
        assert torch.equal(got[k], sd[k])


def test_read_ahead_handle(tmp_path):
    """_native.read_ahead: a handle for a file mapping's ranges of 64 MiB or
    more, None for less or for a heap buffer; its ranges checked; stopping
    twice, or only dropping the handle, is fine; after a run on a cold file
    the pages are in the page cache."""
    f = tmp_path / "raw"
    f.write_bytes(os.urandom(1 << 20) * 70)
    drop_pages(f)
    m = _native.map_file(os.fspath(f))
    assert _native.read_ahead(m, [(0, 1 << 20)]) is None  # little to read
    assert _native.read_ahead(_native.pread_file(os.fspath(f)), [(0, 70 << 20)]) is None
    with pytest.raises(ValueError, match="outside the mapping"):
        _native.read_ahead(m, [(1, 70 << 20)])
    with pytest.raises(TypeError):
        _native.read_ahead(m, [(0,)])
    with pytest.raises(TypeError):
        _native.read_ahead(b"x" * 10, [])
    with pytest.raises(TypeError):
        _native.read_ahead_stop(object())
    assert drop_pages(f) < 0.5  # pread_file read it
    h = _native.read_ahead(m, [(0, 35 << 20), (35 << 20, 35 << 20)])
    assert h is not None
    for _ in range(300):  # the reads it started finish on their own
        if resident_fraction(f) > 0.99:
            break
        time.sleep(0.01)
    _native.read_ahead_stop(h)
    _native.read_ahead_stop(h)
    _native.read_ahead_stop(None)
    assert resident_fraction(f) > 0.99
    assert bytes(memoryview(m)[:16]) == f.read_bytes()[:16]
    h2 = _native.read_ahead(m, [(0, 70 << 20)])
    del h2, m  # the handle's end stops its thread and lets the mapping go


class Doubled(nn.Module):
    """A model no entry of which is read directly (its own loader)."""

    def __init__(self):
        super().__init__()
        self.big = nn.Linear(4096, 4224, bias=False)  # 69 MB of float32

    def _load_from_state_dict(self, sd, prefix, *args):
        super()._load_from_state_dict(sd, prefix, *args)


@pytest.mark.parametrize("theirs,mine", SURFACES)
def test_normal_path_reads_ahead_and_equals_load_state_dict(tmp_path, theirs, mine, monkeypatch):
    """When nothing can be read straight into the model, load_state_dict
    copies from the mapping with a read-ahead thread beside it (from a cold
    cache here): the same parameters and messages as mmcv/mmengine."""
    f = tmp_path / "big.pth"
    torch.save({"state_dict": _source(Doubled).state_dict()}, f)
    handles = []
    real = _native.read_ahead

    def counted(mapping, ranges):
        h = real(mapping, ranges)
        handles.append((sum(n for _, n in ranges), h))
        return h

    monkeypatch.setattr(_native, "read_ahead", counted)
    drop_pages(f)
    assert _compare(theirs, mine, Doubled, f) == 0
    assert len(handles) == 1 and handles[0][0] == 4096 * 4224 * 4 and handles[0][1] is not None

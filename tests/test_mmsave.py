"""ckptio's save surface side by side with mmcv 1.7.2 (weights_to_cpu,
_save_to_state_dict, get_state_dict, save_checkpoint) and mmengine 0.10.7
(save_checkpoint): same inputs give equal results, the same exceptions with
the same messages, and files that torch.load reads back equal to mmcv's
(except meta['time'])."""
import collections
import io
import os
import sys
import types

import pytest
import torch
import torch.nn as nn

import ckptio
from ckptio.compat import mmcv_save as _mmsave
from ckptio.compat import mmengine_save as _mmengine_save
from helpers import assert_same


def _stand_in_torchvision():
    """mmcv.runner imports torchvision, which does not import beside this
    torch; a stand-in module is enough for the checkpoint code."""
    if "torchvision" in sys.modules:
        return
    tv = types.ModuleType("torchvision")
    tv.__path__ = []
    tv.__version__ = "0.0.0"
    models = types.ModuleType("torchvision.models")
    tv.models = models
    sys.modules["torchvision"] = tv
    sys.modules["torchvision.models"] = models


_stand_in_torchvision()
mmcv_ckpt = pytest.importorskip("mmcv.runner.checkpoint")
mmengine_ckpt = pytest.importorskip("mmengine.runner.checkpoint")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.block = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2, bias=False))
        self.register_buffer("scratch", torch.arange(3.0), persistent=False)
        self.empty = None
        self.tied = nn.Linear(5, 2, bias=False)
        self.tied.weight = self.block[2].weight  # one parameter under two names


def fresh_net():
    net = Net()
    net.block[0]._version = 7
    return net


def outcome(fn, *args, **kwargs):
    """(result, None) or (None, (exception type, message))."""
    try:
        return fn(*args, **kwargs), None
    except Exception as exc:  # noqa: BLE001 - compared between the two sides
        return None, (type(exc), str(exc))


def assert_state_equal(ours, theirs):
    assert type(ours) is type(theirs)
    assert list(ours) == list(theirs)
    assert getattr(ours, "_metadata", None) == getattr(theirs, "_metadata", None)
    for k in theirs:
        a, b = ours[k], theirs[k]
        assert type(a) is type(b), k
        assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride(), k
        assert a.requires_grad == b.requires_grad, k
        assert torch.equal(a, b), k


# ---- weights_to_cpu ----------------------------------------------------------------


@pytest.mark.parametrize("with_metadata", [True, False])
def test_weights_to_cpu_as_mmcv(with_metadata):
    sd = collections.OrderedDict(
        a=torch.randn(3, 4), b=torch.arange(6).view(2, 3).t(), c=nn.Parameter(torch.ones(2))
    )
    if with_metadata:
        sd._metadata = collections.OrderedDict({"": {"version": 2}})
    ours, theirs = ckptio.weights_to_cpu(sd), mmcv_ckpt.weights_to_cpu(sd)
    assert_state_equal(ours, theirs)
    assert all(ours[k] is theirs[k] for k in sd)  # CPU tensors: .cpu() returns them


def test_weights_to_cpu_plain_dict_and_bad_values_as_mmcv():
    sd = {"a": torch.ones(1)}
    assert_state_equal(ckptio.weights_to_cpu(sd), mmcv_ckpt.weights_to_cpu(sd))
    bad = collections.OrderedDict(a=torch.ones(1), n=3)
    assert outcome(ckptio.weights_to_cpu, bad)[1] == outcome(mmcv_ckpt.weights_to_cpu, bad)[1]
    assert outcome(ckptio.weights_to_cpu, bad)[1][0] is AttributeError
    not_a_dict = [torch.ones(1)]
    assert outcome(ckptio.weights_to_cpu, not_a_dict)[1] == outcome(mmcv_ckpt.weights_to_cpu, not_a_dict)[1]


# ---- _save_to_state_dict and get_state_dict ---------------------------------------------


@pytest.mark.parametrize("keep_vars", [False, True])
def test_save_to_state_dict_as_mmcv(keep_vars):
    net = fresh_net()
    ours, theirs = collections.OrderedDict(), collections.OrderedDict()
    _mmsave._save_to_state_dict(net, ours, "p.", keep_vars)
    mmcv_ckpt._save_to_state_dict(net, theirs, "p.", keep_vars)
    assert_state_equal(ours, theirs)
    assert "p.scratch" in ours  # mmcv keeps non-persistent buffers
    for k in ours:
        assert (ours[k] is theirs[k]) == keep_vars


@pytest.mark.parametrize("keep_vars", [False, True])
@pytest.mark.parametrize(
    "wrap",
    [
        lambda m: m,
        lambda m: nn.DataParallel(m),
        lambda m: nn.Sequential(collections.OrderedDict(inner=nn.DataParallel(m))),
    ],
    ids=["plain", "DataParallel", "nested-wrapper"],
)
def test_get_state_dict_as_mmcv(wrap, keep_vars):
    model = wrap(fresh_net())
    ours = ckptio.get_state_dict(model, keep_vars=keep_vars)
    theirs = mmcv_ckpt.get_state_dict(model, keep_vars=keep_vars)
    assert_state_equal(ours, theirs)
    assert not any("module." in k for k in ours)


def test_get_state_dict_with_destination_prefix_and_hooks_as_mmcv():
    def renaming_hook(module, destination, prefix, local_metadata):
        local_metadata["hooked"] = True
        new = collections.OrderedDict((k.replace("weight", "w"), v) for k, v in destination.items())
        new._metadata = destination._metadata
        return new

    def side_effect_hook(module, destination, prefix, local_metadata):
        destination[prefix + "extra"] = torch.zeros(1)

    results = []
    for fn in (ckptio.get_state_dict, mmcv_ckpt.get_state_dict):
        net = fresh_net()
        net.block._register_state_dict_hook(renaming_hook)
        net.bn._register_state_dict_hook(side_effect_hook)
        dest = collections.OrderedDict(existing=torch.ones(1))
        dest._metadata = collections.OrderedDict()
        results.append(fn(net, dest, prefix="top.", keep_vars=False))
    assert_state_equal(*results)
    assert "top.bn.extra" in results[0]
    assert results[0]._metadata["top.block"]["hooked"] is True


def test_get_state_dict_uses_mmcv_wrapper_registry():
    from mmcv.parallel import MODULE_WRAPPERS

    @MODULE_WRAPPERS.register_module(force=True)
    class MyWrapper(nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    model = MyWrapper(fresh_net())
    assert_state_equal(ckptio.get_state_dict(model), mmcv_ckpt.get_state_dict(model))
    assert "conv.weight" in ckptio.get_state_dict(model)


# ---- save_checkpoint (mmcv) --------------------------------------------------------------


def make_training(optim_kind):
    net = fresh_net()
    if optim_kind is None:
        return net, None
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    loss = net.conv(torch.randn(2, 3, 5, 5)).sum()
    loss.backward()
    opt.step()
    if optim_kind == "single":
        return net, opt
    return net, {"sgd": opt, "adam": torch.optim.Adam(net.block.parameters(), lr=1e-3)}


def strip_time(ckpt):
    assert isinstance(ckpt["meta"].pop("time"), str)
    return ckpt


@pytest.mark.parametrize("optim_kind", [None, "single", "dict"])
@pytest.mark.parametrize("with_classes", [False, True])
def test_save_checkpoint_file_equals_mmcv(tmp_path, optim_kind, with_classes):
    net, opt = make_training(optim_kind)
    if with_classes:
        net.CLASSES = ("cat", "dog")
    meta_ours, meta_theirs = {"epoch": 3}, {"epoch": 3}
    ours, theirs = tmp_path / "ours" / "deep" / "a.pth", tmp_path / "theirs" / "deep" / "a.pth"
    ckptio.save_checkpoint(net, str(ours), optimizer=opt, meta=meta_ours)
    mmcv_ckpt.save_checkpoint(net, str(theirs), optimizer=opt, meta=meta_theirs)
    # the caller's meta is updated the same way
    assert meta_ours.keys() == meta_theirs.keys()
    assert meta_ours["mmcv_version"] == meta_theirs["mmcv_version"]
    a = strip_time(torch.load(str(ours), weights_only=False))
    b = strip_time(torch.load(str(theirs), weights_only=False))
    assert_same(a, b)
    assert ("CLASSES" in a["meta"]) == with_classes
    assert set(a) == {"meta", "state_dict"} | ({"optimizer"} if opt is not None else set())
    # and it loads with weights_only=True and with mmap=True as mmcv's does
    assert_same(strip_time(torch.load(str(ours), weights_only=True)), b)
    assert_same(strip_time(torch.load(str(ours), weights_only=True, mmap=True)), b)


def test_save_checkpoint_wrapped_model_and_no_meta(tmp_path):
    net = nn.DataParallel(fresh_net())
    net.module.CLASSES = None
    ckptio.save_checkpoint(net, str(tmp_path / "o.pth"))
    mmcv_ckpt.save_checkpoint(net, str(tmp_path / "t.pth"))
    a = strip_time(torch.load(str(tmp_path / "o.pth"), weights_only=False))
    b = strip_time(torch.load(str(tmp_path / "t.pth"), weights_only=False))
    assert_same(a, b)
    assert "CLASSES" not in a["meta"]
    assert all(not k.startswith("module.") for k in a["state_dict"])


def test_save_checkpoint_relative_path_in_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckptio.save_checkpoint(fresh_net(), "plain.pth")
    assert "conv.weight" in torch.load("plain.pth", weights_only=True)["state_dict"]


def test_save_checkpoint_disk_file_client_args(tmp_path):
    path = tmp_path / "x" / "d.pth"
    ckptio.save_checkpoint(fresh_net(), str(path), file_client_args={"backend": "disk"})
    assert torch.load(str(path), weights_only=True)["meta"]["mmcv_version"]


@pytest.mark.parametrize(
    "meta, filename, fca",
    [
        ([1], "x.pth", None),
        ("meta", "x.pth", None),
        (None, "pavi://a/b.pth", {"backend": "disk"}),
        (None, "pavi://a/b.pth", None),
        (None, "http://example.invalid/a.pth", None),
        (None, "x.pth", {"backend": "no-such-backend"}),
    ],
    ids=["meta-list", "meta-str", "pavi-args", "pavi-missing", "http", "bad-backend"],
)
def test_save_checkpoint_errors_as_mmcv(tmp_path, monkeypatch, meta, filename, fca):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "pavi", None)  # pavi is not installed
    ours = outcome(ckptio.save_checkpoint, fresh_net(), filename, meta=meta, file_client_args=fca)
    theirs = outcome(mmcv_ckpt.save_checkpoint, fresh_net(), filename, meta=meta,
                     file_client_args=fca)
    assert ours[1] is not None
    assert ours[1] == theirs[1]
    assert os.listdir(tmp_path) == []


def test_save_checkpoint_to_a_storage_backend(monkeypatch, tmp_path):
    """Non-local URLs go through mmcv's FileClient with the same bytes."""
    from mmcv.fileio.file_client import HTTPBackend

    stored = {}
    monkeypatch.setattr(HTTPBackend, "put", lambda self, obj, filepath: stored.setdefault(filepath, obj),
                        raising=False)
    ckptio.save_checkpoint(fresh_net(), "http://example.invalid/c.pth")
    ckpt = torch.load(io.BytesIO(stored["http://example.invalid/c.pth"]), weights_only=True)
    assert_same(ckpt["state_dict"], mmcv_ckpt.get_state_dict(fresh_net()))


def test_save_checkpoint_to_pavi(monkeypatch, tmp_path):
    """pavi://dir/name: created under modelcloud, the file uploaded once."""
    uploads = []

    class Node:
        def create_file(self, path, name):
            uploads.append((name, torch.load(path, weights_only=True)))

    class NodeNotFoundError(Exception):
        pass

    class Folder:
        def create_training_model(self, model_dir):
            uploads.append(("created", model_dir))
            return Node()

    def get(model_dir):
        raise NodeNotFoundError(model_dir)

    pavi = types.ModuleType("pavi")
    pavi.modelcloud = types.SimpleNamespace(Folder=Folder, get=get)
    pavi.exception = types.SimpleNamespace(NodeNotFoundError=NodeNotFoundError)
    monkeypatch.setitem(sys.modules, "pavi", pavi)
    ckptio.save_checkpoint(fresh_net(), "pavi://proj/run/e1.pth")
    assert uploads[0] == ("created", "proj/run")
    assert uploads[1][0] == "e1.pth" and "conv.weight" in uploads[1][1]["state_dict"]


# ---- save_checkpoint (mmengine) -------------------------------------------------------------


def a_checkpoint():
    net, opt = make_training("single")
    return {"meta": {"epoch": 1}, "state_dict": ckptio.weights_to_cpu(ckptio.get_state_dict(net)),
            "optimizer": opt.state_dict()}


@pytest.mark.parametrize(
    "fca, ba",
    [(None, None), ({"backend": "disk"}, None), (None, {"backend": "local"})],
    ids=["default", "file_client_args", "backend_args"],
)
def test_mmengine_save_file_equals_mmengine(tmp_path, fca, ba):
    ckpt = a_checkpoint()
    ours, theirs = tmp_path / "o" / "x.pth", tmp_path / "t" / "x.pth"
    _mmengine_save.save_checkpoint(ckpt, str(ours), file_client_args=fca, backend_args=ba)
    mmengine_ckpt.save_checkpoint(ckpt, str(theirs), file_client_args=fca, backend_args=ba)
    assert_same(torch.load(str(ours), weights_only=False), torch.load(str(theirs), weights_only=False))


@pytest.mark.parametrize(
    "filename, fca, ba",
    [
        ("x.pth", {"backend": "disk"}, {"backend": "local"}),
        ("pavi://a/b.pth", None, {"backend": "local"}),
        ("pavi://a/b.pth", {"backend": "disk"}, None),
        ("pavi://a/b.pth", None, None),
        ("http://example.invalid/a.pth", None, None),
        ("x.pth", None, {"backend": "no-such-backend"}),
    ],
    ids=["both-args", "pavi-backend-args", "pavi-fca", "pavi-missing", "http", "bad-backend"],
)
def test_mmengine_save_errors_as_mmengine(tmp_path, monkeypatch, filename, fca, ba):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "pavi", None)
    ckpt = {"state_dict": {"w": torch.ones(2)}}
    ours = outcome(_mmengine_save.save_checkpoint, ckpt, filename, fca, ba)
    theirs = outcome(mmengine_ckpt.save_checkpoint, ckpt, filename, fca, ba)
    assert ours[1] is not None
    assert ours[1] == theirs[1]
    assert os.listdir(tmp_path) == []



def test_save_checkpoint_to_petrel_as_mmcv_tests_do(monkeypatch):
    """mmcv's own test: petrel_client mocked, PetrelBackend.put patched."""
    from unittest.mock import MagicMock, patch

    from mmcv.fileio.file_client import PetrelBackend

    monkeypatch.setitem(sys.modules, "petrel_client", MagicMock())
    monkeypatch.setitem(sys.modules, "petrel_client.client", MagicMock())
    for fca in (None, {"backend": "petrel"}):
        with patch.object(PetrelBackend, "put") as put:
            ckptio.save_checkpoint(fresh_net(), "s3://bucket/dir/c.pth", file_client_args=fca)
        put.assert_called_once()
        data, filename = put.call_args[0]
        assert filename == "s3://bucket/dir/c.pth"
        ckpt = torch.load(io.BytesIO(data), weights_only=True)
        assert_same(ckpt["state_dict"], mmcv_ckpt.get_state_dict(fresh_net()))


def test_mmengine_save_to_petrel_as_mmengine_tests_do(monkeypatch):
    from unittest.mock import MagicMock, patch

    from mmengine.fileio.backends import PetrelBackend

    monkeypatch.setitem(sys.modules, "petrel_client", MagicMock())
    monkeypatch.setitem(sys.modules, "petrel_client.client", MagicMock())
    ckpt = {"state_dict": collections.OrderedDict(w=torch.arange(4.0))}
    for fca, ba in ((None, {"backend": "petrel"}), (None, None)):
        with patch.object(PetrelBackend, "put") as put:
            _mmengine_save.save_checkpoint(ckpt, "s3://bucket/e.pth", fca, ba)
        put.assert_called_once()
        data, filename = put.call_args[0]
        assert filename == "s3://bucket/e.pth"
        assert_same(torch.load(io.BytesIO(data), weights_only=True), ckpt)


def test_without_mmcv_and_mmengine(monkeypatch, tmp_path):
    """Local files need neither: torch's wrappers are unwrapped, the mmcv
    version is None; any URL or backend asks for the missing package."""
    expected_keys = list(mmcv_ckpt.get_state_dict(fresh_net()))
    for name in ("mmcv", "mmcv.parallel", "mmcv.fileio", "mmengine", "mmengine.logging",
                 "mmengine.fileio"):
        monkeypatch.setitem(sys.modules, name, None)
    model = nn.DataParallel(fresh_net())
    model.module.CLASSES = ("a",)
    path = tmp_path / "new" / "m.pth"
    ckptio.save_checkpoint(model, str(path))
    ckpt = torch.load(str(path), weights_only=True)
    assert ckpt["meta"]["mmcv_version"] is None and ckpt["meta"]["CLASSES"] == ("a",)
    assert list(ckpt["state_dict"]) == expected_keys
    with pytest.raises(ImportError, match="needs mmcv"):
        ckptio.save_checkpoint(fresh_net(), "s3://b/m.pth")
    with pytest.raises(ImportError, match="needs mmcv"):
        ckptio.save_checkpoint(fresh_net(), str(path), file_client_args={"backend": "disk"})
    _mmengine_save.save_checkpoint({"w": torch.ones(2)}, str(tmp_path / "e" / "c.pth"))
    assert torch.equal(torch.load(str(tmp_path / "e" / "c.pth"))["w"], torch.ones(2))
    with pytest.raises(ImportError, match="needs mmengine"):
        _mmengine_save.save_checkpoint({}, "s3://b/c.pth")
    with pytest.raises(ImportError, match="needs mmengine"):
        _mmengine_save.save_checkpoint({}, "c.pth", backend_args={"backend": "local"})

"""ckptio.checkpoint side by side with mmcv 1.7.2's runner/checkpoint.py,
the oracle: the same inputs give the same results, printed and logged text,
warnings and exceptions."""

import contextlib
import functools
import importlib
import io
import json
import os
import pickle
import sys
import warnings
from collections import OrderedDict
from unittest.mock import MagicMock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
import torch
import torch.nn as nn

import ckptio
import ckptio.checkpoint as ours

import helpers  # noqa: E402
# shared with test_mmengine_checkpoint.py
from helpers import ROUTES, Block, Model, Opaque, Other, fresh, log_records  # noqa: E402
from helpers import params_equal, run, same_exception, same_routes  # noqa: E402

mmcv_ckpt = pytest.importorskip("mmcv.runner.checkpoint")


side_by_side = functools.partial(helpers.side_by_side, mmcv_ckpt, ours)
load_both = functools.partial(helpers.load_both, mmcv_ckpt, ours)


@pytest.fixture
def schemes():
    """Restores both scheme registries after a test that registers some."""
    saved = (dict(mmcv_ckpt.CheckpointLoader._schemes), dict(ours.CheckpointLoader._schemes))
    yield
    mmcv_ckpt.CheckpointLoader._schemes = OrderedDict(saved[0])
    ours.CheckpointLoader._schemes = OrderedDict(saved[1])


# ---- local files and load_checkpoint --------------------------------------


def test_load_state_dict_file(tmp_path):
    src = fresh(Model, 1)
    path = str(tmp_path / "sd.pth")
    torch.save(src.state_dict(), path)
    load_both(path, Model)
    m = fresh(Model, 0)
    ours.load_checkpoint(m, path)
    assert params_equal(m, src)


def test_load_wrapped_dict_with_meta_and_module_prefix(tmp_path):
    src = nn.DataParallel(fresh(Model, 2))
    path = str(tmp_path / "dp.pth")
    torch.save({"meta": {"epoch": 3, "CLASSES": ("a", "b")}, "state_dict": src.state_dict()}, path)
    load_both(path, Model)
    load_both(path, Model, revise_keys=[])
    load_both(path, Model, revise_keys=[(r"^module\.", ""), (r"^block\.", "blk.")])


def test_mismatches_print_log_and_raise(tmp_path):
    path = str(tmp_path / "m.pth")
    torch.save(fresh(Model, 3).state_dict(), path)
    load_both(path, Other)
    load_both(path, Other, strict=True)
    load_both(path, Model, revise_keys=[(r"^", "backbone.")])
    with log_records("ckptio-test") as (logger, records):
        load_both(path, Other, logger=logger)
    assert len(records) == 4  # load line + warning, from each side
    assert records[:2] == records[2:]
    assert records[0][1] == f"load checkpoint from local path: {path}"
    assert records[1][0] == "WARNING" and "size mismatch for conv.weight" in records[1][1]


def test_not_a_dict_and_missing_file(tmp_path):
    path = str(tmp_path / "list.pth")
    torch.save([torch.ones(2)], path)
    load_both(path, Model)
    load_both(str(tmp_path / "absent.pth"), Model)
    side_by_side("load_from_local", "~/no/such/ckptio/file.pth")


def test_plain_dict_without_revise_keys_fails_as_mmcv(tmp_path):
    # a state dict saved as a plain dict: mmcv sets _metadata on it
    path = str(tmp_path / "plain.pth")
    torch.save(dict(fresh(Model, 4).state_dict()), path)
    load_both(path, Model)
    load_both(path, Model, revise_keys=[])  # AttributeError on both sides


def test_weights_only_refusal_matches(tmp_path):
    path = str(tmp_path / "opaque.pth")
    torch.save({"state_dict": fresh(Model, 5).state_dict(), "meta": Opaque()}, path)
    m1, m2 = fresh(Model, 0), fresh(Model, 0)
    with pytest.raises(pickle.UnpicklingError):
        mmcv_ckpt.load_checkpoint(m1, path)
    with pytest.raises(pickle.UnpicklingError) as info:
        ours.load_checkpoint(m2, path)
    assert isinstance(info.value, ckptio.UnpicklingError)
    assert "Opaque" in str(info.value)


def test_env_forces_weights_only_off(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    path = str(tmp_path / "opaque.pth")
    torch.save({"state_dict": fresh(Model, 5).state_dict(), "meta": Opaque(7)}, path)
    m = fresh(Model, 0)
    ckpt = ours.load_checkpoint(m, path)
    assert ckpt["meta"].x == 7
    assert params_equal(m, fresh(Model, 5))


def test_metadata_versions_reach_load_from_state_dict(tmp_path):
    class V2(nn.Module):
        _version = 2

        def __init__(self):
            super().__init__()
            self.conv0 = nn.Conv2d(3, 3, 1)
            self.seen = []

        def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args):
            self.seen.append(local_metadata.get("version"))
            super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)

    src = V2()
    path = str(tmp_path / "v2.pth")
    torch.save({"state_dict": src.state_dict()}, path)
    a, b = V2(), V2()
    mmcv_ckpt.load_checkpoint(a, path)
    ours.load_checkpoint(b, path)
    assert a.seen == b.seen == [2]
    assert params_equal(b, src)


def test_load_state_dict_wrappers_and_rank(monkeypatch):
    sd = fresh(Model, 6).state_dict()
    sd["extra"] = torch.zeros(1)
    wrapped = nn.DataParallel(fresh(Model, 0))
    side_by_side("load_state_dict", wrapped, sd)
    side_by_side("load_state_dict", fresh(Model, 0), sd, strict=True)
    assert params_equal(wrapped.module, fresh(Model, 6))
    # rank != 0 reports nothing and does not raise
    monkeypatch.setattr(mmcv_ckpt, "get_dist_info", lambda: (1, 2))
    monkeypatch.setattr(ours, "get_dist_info", lambda: (1, 2))
    side_by_side("load_state_dict", fresh(Model, 0), sd, strict=True)


def test_mmcv_registered_wrapper_is_unwrapped():
    from mmcv.parallel import MODULE_WRAPPERS

    class Wrapper:
        def __init__(self, module):
            self.module = module

    MODULE_WRAPPERS.register_module(name="CkptioTestWrapper", module=Wrapper)
    try:
        side_by_side("load_state_dict", Wrapper(fresh(Model, 0)), fresh(Model, 7).state_dict())
    finally:
        MODULE_WRAPPERS._module_dict.pop("CkptioTestWrapper")


def test_load_checkpoint_with_prefix(tmp_path):
    path = str(tmp_path / "p.pth")
    torch.save({"state_dict": fresh(Model, 8).state_dict()}, path)
    side_by_side("_load_checkpoint_with_prefix", "block", path)
    side_by_side("_load_checkpoint_with_prefix", "block.conv.", path)
    side_by_side("_load_checkpoint_with_prefix", "back", path)


def test_mocked_torch_load_is_honoured(tmp_path, monkeypatch):
    path = tmp_path / "x.pth"
    path.write_bytes(b"not a checkpoint")
    monkeypatch.setattr(torch, "load", lambda f, map_location=None: "local:" + f)
    assert side_by_side("_load_checkpoint", str(path)) == "local:" + str(path)


# ---- schemes ---------------------------------------------------------------


def test_routes_match_mmcv():
    same_routes(mmcv_ckpt, ours, ROUTES)


def test_register_scheme_rules(schemes):
    for mod in (mmcv_ckpt, ours):
        loader = mod.CheckpointLoader

        @loader.register_scheme(prefixes="ftp://")
        def load_from_ftp(filename, map_location):
            return dict(filename=filename)

        assert load_from_ftp.__name__ == "load_from_ftp"  # the decorator returns it

        def load_from_ftp1(filename, map_location):
            return dict(filename=filename, map_location=map_location)

        with pytest.raises(KeyError) as info:
            loader.register_scheme("ftp://", load_from_ftp1)
        assert "ftp:// is already registered as a loader backend" in str(info.value)
        assert loader.register_scheme(["ftp://", "sftp://"], load_from_ftp1, force=True) is None
        with pytest.raises(AssertionError):
            loader.register_scheme({"x://"}, load_from_ftp1)
        loader.register_scheme("a/b", lambda f, m: f)
        loader.register_scheme(("a/b/c",), load_from_ftp)
        assert loader._get_checkpoint_loader("a/b/c/d") is load_from_ftp
    assert list(mmcv_ckpt.CheckpointLoader._schemes) == list(ours.CheckpointLoader._schemes)
    for fn in ("load_checkpoint",):
        theirs = run(getattr(mmcv_ckpt.CheckpointLoader, fn), "ftp://xx/x.pth", "cpu")
        mine = run(getattr(ours.CheckpointLoader, fn), "ftp://xx/x.pth", "cpu")
        assert theirs[0][1] == mine[0][1] == {"filename": "ftp://xx/x.pth", "map_location": "cpu"}
        assert theirs[1] == mine[1] == "load checkpoint from ftp1 path: ftp://xx/x.pth\n"


def test_user_loader_may_return_path_bytes_or_file(schemes, tmp_path):
    src = fresh(Model, 9)
    path = tmp_path / "u.pth"
    torch.save({"state_dict": src.state_dict()}, str(path))
    data = path.read_bytes()
    answers = {
        "kpath://": lambda f, m: str(path),
        "kpathlike://": lambda f, m: path,
        "kbytes://": lambda f, m: data,
        "kview://": lambda f, m: memoryview(data),
        "kfile://": lambda f, m: io.BytesIO(data),
    }
    for prefix, fn in answers.items():
        ours.CheckpointLoader.register_scheme(prefix, fn)
        m = fresh(Model, 0)
        ours.load_checkpoint(m, prefix + "anything", map_location="cpu")
        assert params_equal(m, src), prefix


def test_pavi(monkeypatch):
    monkeypatch.setitem(sys.modules, "pavi", None)
    side_by_side("load_from_pavi", "pavi://x/checkpoint.pth")
    side_by_side("load_from_pavi", "MyPaviFolder/checkpoint.pth")
    pavi = MagicMock()
    model = MagicMock()
    model.name = "fakename"
    pavi.modelcloud.get = MagicMock(return_value=model)
    monkeypatch.setitem(sys.modules, "pavi", pavi)
    monkeypatch.setitem(sys.modules, "pavi.modelcloud", pavi.modelcloud)
    side_by_side("load_from_pavi", "pavi://checkpoint.pth")  # nothing downloaded


def test_ceph_without_clients(monkeypatch):
    monkeypatch.setitem(sys.modules, "petrel_client", None)
    monkeypatch.setitem(sys.modules, "petrel_client.client", None)
    monkeypatch.setitem(sys.modules, "ceph", None)
    side_by_side("load_from_ceph", "s3://bucket/x.pth")
    side_by_side("load_from_ceph", "s3://bucket/x.pth", backend="ceph")
    side_by_side("load_from_ceph", "s3://bucket/x.pth", backend="memcached")


def test_ceph_bytes_are_decoded(monkeypatch, tmp_path):
    from mmcv.fileio import FileClient

    src = fresh(Model, 10)
    path = tmp_path / "c.pth"
    torch.save(src.state_dict(), str(path))

    class FakeClient:
        def __init__(self, backend):
            self.backend = backend

        def get(self, filename):
            return path.read_bytes()

    monkeypatch.setattr(FileClient, "__new__", lambda cls, backend=None, **kw: FakeClient(backend))
    side_by_side("load_from_ceph", "s3://bucket/c.pth")


# ---- http and the model zoos ----------------------------------------------


def fake_load_url(calls):
    def load_url(url, model_dir=None, map_location=None):
        calls.append(("load_url", url, model_dir, map_location))
        return {"state_dict": OrderedDict([("backbone.w", url), ("head.b", 1)]), "url": url}

    return load_url


@pytest.fixture
def zoo(tmp_path, monkeypatch):
    """Fake downloads on both sides, both model-zoo folders at one copy of
    the tables, $MMCV_HOME in tmp_path."""
    calls = []
    for mod in (mmcv_ckpt, ours):
        monkeypatch.setattr(mod, "load_url", fake_load_url(calls))
    data = tmp_path / "pkg"
    (data / "model_zoo").mkdir(parents=True)
    for name in os.listdir(os.path.join(ckptio.__path__[0], "model_zoo")):
        with open(os.path.join(ckptio.__path__[0], "model_zoo", name), "rb") as f:
            (data / "model_zoo" / name).write_bytes(f.read())
    import mmcv

    monkeypatch.setattr(mmcv, "__path__", [str(data)])
    monkeypatch.setattr(ckptio, "__path__", [str(data)])
    home = tmp_path / "home"
    monkeypatch.setenv("MMCV_HOME", str(home))
    return data, home, calls


def test_model_zoo_tables_are_mmcv_s(zoo):
    for name in (
        "get_external_models",
        "get_mmcls_models",
        "get_deprecated_model_names",
        "get_torchvision_models",
        "_get_mmcv_home",
    ):
        side_by_side(name)


def test_mmcv_home_defaults(monkeypatch, tmp_path):
    monkeypatch.delenv("MMCV_HOME", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert side_by_side("_get_mmcv_home") == str(tmp_path / "xdg" / "mmcv")
    assert os.path.isdir(tmp_path / "xdg" / "mmcv")


def test_open_mmlab_urls_deprecations_and_local(zoo):
    data, home, calls = zoo
    side_by_side("_load_checkpoint", "open-mmlab://resnet50_caffe")
    side_by_side("_load_checkpoint", "openmmlab://resnet50_caffe")
    side_by_side("_load_checkpoint", "open-mmlab://resnet50_caffe_bgr")  # deprecated name
    side_by_side("_load_checkpoint", "openmmlab://no_such_model")
    # $MMCV_HOME/open_mmlab.json extends the table; relative entries are files there
    assert home.is_dir()  # made by _get_mmcv_home
    (home / "open_mmlab.json").write_text(json.dumps({"mine": "mine.pth", "gone": "gone.pth"}))
    torch.save({"state_dict": fresh(Model, 11).state_dict()}, str(home / "mine.pth"))
    side_by_side("_load_checkpoint", "open-mmlab://mine")
    side_by_side("_load_checkpoint", "open-mmlab://gone")
    assert len(calls) >= 4 and calls[0::2] == calls[1::2]


def test_torchvision_modelzoo_and_mmcls(zoo):
    _, _, calls = zoo
    for name in (
        "torchvision://resnet50",
        "modelzoo://resnet50",
        "torchvision://ResNet50_Weights.IMAGENET1K_V2",
        "torchvision://resnet18.default",
        "torchvision://nope",
        "mmcls://resnet50",
        "mmcls://nope",
    ):
        side_by_side("_load_checkpoint", name, "cpu")
    assert calls[0] == (
        "load_url",
        "https://download.pytorch.org/models/resnet50-0676ba61.pth",
        None,
        "cpu",
    )


def test_load_checkpoint_from_url_and_its_log(zoo):
    _, _, calls = zoo
    side_by_side("_load_checkpoint", "https://example.invalid/m.pth", None, "silent")
    side_by_side("load_from_http", "https://example.invalid/m.pth", "cpu", "/tmp/models")
    assert calls[-1] == ("load_url", "https://example.invalid/m.pth", "/tmp/models", "cpu")


def test_http_distributed_order(zoo, monkeypatch):
    _, _, calls = zoo
    barrier = MagicMock(side_effect=lambda: calls.append("barrier"))
    monkeypatch.setattr(torch.distributed, "barrier", barrier)
    for rank in (0, 1):
        for mod in (mmcv_ckpt, ours):
            monkeypatch.setattr(mod, "get_dist_info", lambda rank=rank: (rank, 2))
        del calls[:]
        side_by_side("load_from_http", "https://example.invalid/m.pth")
        url = ("load_url", "https://example.invalid/m.pth", None, None)
        assert calls == ([url, "barrier"] * 2 if rank == 0 else ["barrier", url] * 2)


def test_save_names_are_ckptio_s_saver():
    import ckptio.compat.mmcv_save

    for name in ours._SAVE_NAMES:
        assert getattr(ours, name) is getattr(ckptio.compat.mmcv_save, name)
    with pytest.raises(AttributeError):
        ours.no_such_name


def test_ceph_without_mmcv_uses_the_clients(monkeypatch, tmp_path):
    for name in ("petrel_client", "petrel_client.client", "ceph"):
        monkeypatch.setitem(sys.modules, name, None)
    theirs = run(mmcv_ckpt.load_from_ceph, "s3://bucket/x.pth")[0][1]
    monkeypatch.setitem(sys.modules, "mmcv.fileio", None)  # as if mmcv were absent
    mine = run(ours.load_from_ceph, "s3://bucket/x.pth")[0][1]
    same_exception(mine, theirs)

    src = fresh(Model, 13)
    path = tmp_path / "p.pth"
    torch.save(src.state_dict(), str(path))
    asked = []

    class Client:
        def Get(self, filepath):
            asked.append(filepath)
            return path.read_bytes()

    petrel = MagicMock()
    petrel.client.Client = Client
    monkeypatch.setitem(sys.modules, "petrel_client", petrel)
    monkeypatch.setitem(sys.modules, "petrel_client.client", petrel.client)
    m = fresh(Model, 0)
    ours.load_checkpoint(m, "s3://bucket/p.pth")
    assert asked == ["s3://bucket/p.pth"] and params_equal(m, src)


KEYS = list(Model().state_dict())


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    keep=st.lists(st.sampled_from(KEYS), unique=True),
    extra=st.lists(st.sampled_from(["head.w", "block.conv.extra", "module.x"]), unique=True),
    prefix=st.sampled_from(["", "module.", "backbone.", "module.module."]),
    revise=st.lists(
        st.sampled_from(
            [(r"^module\.", ""), (r"^backbone\.", ""), (r"^", "block."), (r"conv", "norm")]
        ),
        max_size=2,
    ),
    wrap=st.booleans(),
    strict=st.booleans(),
)
def test_random_state_dicts_load_as_mmcv(tmp_path, keep, extra, prefix, revise, wrap, strict):
    src = fresh(Model, 14).state_dict()
    sd = OrderedDict((prefix + k, src[k]) for k in keep)
    for k in extra:
        sd[prefix + k] = torch.zeros(2)
    path = str(tmp_path / "r.pth")
    torch.save({"state_dict": sd} if wrap else sd, path)
    load_both(path, Model, strict=strict, revise_keys=revise)


@pytest.mark.parametrize(
    "map_location",
    ["cpu", torch.device("cpu"), {"cpu": "cpu"}, lambda storage, loc: storage, None],
    ids=["str", "device", "dict", "callable", "none"],
)
def test_map_locations(tmp_path, map_location):
    path = str(tmp_path / "m.pth")
    torch.save({"state_dict": fresh(Model, 16).state_dict(), "meta": {"step": 1}}, path)
    load_both(path, Model, map_location=map_location)
    side_by_side("load_from_local", path, map_location)

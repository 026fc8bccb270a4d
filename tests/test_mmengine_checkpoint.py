"""ckptio.mmengine side by side with mmengine 0.10.7's runner/checkpoint.py,
the oracle: same results, printed text, warnings and exceptions."""

import functools
import logging
import sys
from collections import OrderedDict
from unittest.mock import MagicMock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
import torch
import torch.nn as nn

mm_ckpt = pytest.importorskip("mmengine.runner.checkpoint")
import ckptio.mmengine as ours  # noqa: E402
import helpers  # noqa: E402
from helpers import ROUTES, Model, Opaque, Other, fresh, log_records, params_equal, run  # noqa
from helpers import same_routes  # noqa: E402


side_by_side = functools.partial(helpers.side_by_side, mm_ckpt, ours)
load_both = functools.partial(helpers.load_both, mm_ckpt, ours)


def test_load_checkpoint_cases(tmp_path):
    path = str(tmp_path / "m.pth")
    src = nn.DataParallel(fresh(Model, 1))
    torch.save({"meta": {"epoch": 1}, "state_dict": src.state_dict()}, path)
    load_both(path, Model)
    load_both(path, Model, revise_keys=[])
    load_both(path, Model, revise_keys=[(r"^module\.", ""), (r"^", "x.")])
    load_both(path, Other)
    load_both(path, Other, strict=True)
    load_both(path, Model, logger="silent")
    bad = str(tmp_path / "list.pth")
    torch.save([1, 2], bad)
    load_both(bad, Model)
    load_both(str(tmp_path / "absent.pth"), Model)
    m = fresh(Model, 0)
    ours.load_checkpoint(m, path)
    assert params_equal(m, src.module)


def test_logged_lines_match(tmp_path):
    path = str(tmp_path / "m.pth")
    torch.save(fresh(Model, 2).state_dict(), path)
    with log_records("ckptio-mmengine-test") as (logger, records):
        load_both(path, Other, logger=logger)
    assert len(records) == 4 and records[:2] == records[2:]
    assert records[0] == ("INFO", f"Loads checkpoint by local backend from path: {path}")
    assert records[1][0] == "WARNING"


def test_weights_only_refusal(tmp_path):
    import pickle

    path = str(tmp_path / "o.pth")
    torch.save({"state_dict": {}, "meta": Opaque()}, path)
    with pytest.raises(pickle.UnpicklingError):
        mm_ckpt.load_checkpoint(fresh(Model, 0), path)
    with pytest.raises(pickle.UnpicklingError):
        ours.load_checkpoint(fresh(Model, 0), path)


def test_load_state_dict_post_hooks_and_children():
    sd = fresh(Model, 3).state_dict()
    sd["stray"] = torch.ones(1)
    for strict in (False, True):
        side_by_side("load_state_dict", fresh(Model, 0), sd, strict=strict)

    def hook(module, keys):
        keys.unexpected_keys.clear()

    a, b = fresh(Model, 0), fresh(Model, 0)
    a.register_load_state_dict_post_hook(hook)
    b.register_load_state_dict_post_hook(hook)
    theirs = run(mm_ckpt.load_state_dict, a, sd, True)
    mine = run(ours.load_state_dict, b, sd, True)
    assert theirs[0][0] == mine[0][0] == "ok"
    assert params_equal(a, b)


def test_routes_and_registry():
    routes = dict(
        ROUTES, **{"petrel://b/x.pth": "load_from_ceph", "a:petrel://b/x": "load_from_ceph"}
    )
    same_routes(mm_ckpt, ours, routes)
    # the mmcv surface's registry is a separate one
    import ckptio.checkpoint

    assert ckptio.checkpoint.CheckpointLoader._schemes[""] is ckptio.checkpoint.load_from_local


def test_prefix_and_to_model(tmp_path):
    path = str(tmp_path / "p.pth")
    torch.save({"state_dict": fresh(Model, 4).state_dict()}, path)
    side_by_side("_load_checkpoint_with_prefix", "block", path)
    side_by_side("_load_checkpoint_with_prefix", "nope", path)
    ckpt = {
        "state_dict": OrderedDict(
            ("module." + k, v) for k, v in fresh(Model, 5).state_dict().items()
        )
    }
    side_by_side("_load_checkpoint_to_model", fresh(Model, 0), ckpt)


def test_find_latest_checkpoint(tmp_path):
    side_by_side("find_latest_checkpoint", str(tmp_path))
    (tmp_path / "last_checkpoint").write_text(str(tmp_path / "epoch_3.pth") + "\n")
    assert side_by_side("find_latest_checkpoint", str(tmp_path)) == str(tmp_path / "epoch_3.pth")


def test_zoo_schemes_and_http(monkeypatch, tmp_path):
    calls = []

    def load_url(url, model_dir=None, map_location=None, progress=True):
        calls.append((url, model_dir, map_location))
        return {"state_dict": OrderedDict([("backbone.w", url)])}

    monkeypatch.setattr(mm_ckpt, "load_url", load_url)
    monkeypatch.setattr(ours, "load_url", load_url)
    monkeypatch.setenv("MMENGINE_HOME", str(tmp_path))
    logged = []  # the 'current' MMLogger writes to a stream fixed at its creation: record instead
    for mod in (mm_ckpt, ours):
        monkeypatch.setattr(
            mod,
            "print_log",
            lambda msg, logger=None, level=logging.INFO: logged.append((msg, logger, level)),
        )
    for name in (
        "open-mmlab://resnet50_caffe",
        "openmmlab://resnet50_caffe_bgr",
        "mmcls://resnet50",
        "torchvision://resnet50",
        "modelzoo://resnet50",
        "open-mmlab://none",
    ):
        before = len(logged)
        side_by_side("_load_checkpoint", name, "cpu", logger="silent")
        lines = logged[before:]
        assert lines[: len(lines) // 2] == lines[len(lines) // 2 :]
    assert calls and calls[0::2] == calls[1::2]
    assert (
        'The URL scheme of "modelzoo://" is deprecated, please use "torchvision://" instead',
        "current",
        logging.WARNING,
    ) in logged
    monkeypatch.setattr(mm_ckpt, "get_dist_info", lambda: (1, 2))
    monkeypatch.setattr(ours, "get_dist_info", lambda: (1, 2))
    monkeypatch.setattr(torch.distributed, "barrier", MagicMock())
    side_by_side("load_from_http", "https://example.invalid/m.pth")
    assert torch.distributed.barrier.call_count == 2


def test_pavi_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "pavi", None)
    side_by_side("load_from_pavi", "pavi://x/y.pth")


def test_save_names_are_offered():
    model = fresh(Model, 12)
    import ckptio.compat.mmengine_save

    assert ours.save_checkpoint is ckptio.compat.mmengine_save.save_checkpoint
    for name in ("weights_to_cpu", "_save_to_state_dict", "get_state_dict"):
        assert getattr(ours, name) is getattr(mm_ckpt, name)  # in memory only: mmengine's own
    cpu = ours.weights_to_cpu(OrderedDict(a={"b": torch.ones(2)}))  # nested, as mmengine takes
    assert torch.equal(cpu["a"]["b"], torch.ones(2))
    assert list(ours.get_state_dict(nn.DataParallel(model))) == list(model.state_dict())
    with pytest.raises(AttributeError):
        ours.no_such_name


KEYS = list(Model().state_dict())


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    keep=st.lists(st.sampled_from(KEYS), unique=True),
    prefix=st.sampled_from(["", "module.", "backbone."]),
    revise=st.lists(
        st.sampled_from([(r"^module\.", ""), (r"^backbone\.", ""), (r"^", "x.")]), max_size=2
    ),
    strict=st.booleans(),
)
def test_random_state_dicts_load_as_mmengine(tmp_path, keep, prefix, revise, strict):
    src = fresh(Model, 15).state_dict()
    path = str(tmp_path / "r.pth")
    torch.save({"state_dict": OrderedDict((prefix + k, src[k]) for k in keep)}, path)
    load_both(path, Model, strict=strict, revise_keys=revise)

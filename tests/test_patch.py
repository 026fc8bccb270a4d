"""ckptio.patch()/unpatch(): mmcv's runner trains, saves and resumes with
ckptio's functions in place, and everything is restored afterwards."""

import logging

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import ckptio
import ckptio.checkpoint as ours
from openmmlab_runs import MmcvNet, collate, mmengine_linear_net_class  # of the training runs

mmcv_runner = pytest.importorskip("mmcv.runner")
import mmcv.runner.base_runner as base_runner  # noqa: E402
import mmcv.runner.checkpoint as mmcv_ckpt  # noqa: E402
import mmcv.runner.epoch_based_runner as epoch_runner  # noqa: E402


def make_runner(work_dir, seed):
    torch.manual_seed(seed)
    model = MmcvNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    logger = logging.getLogger("ckptio-patch-test")
    runner = mmcv_runner.EpochBasedRunner(
        model, optimizer=optimizer, work_dir=str(work_dir), logger=logger, max_epochs=2
    )
    runner.register_training_hooks(
        lr_config=dict(policy="fixed"),
        optimizer_config=dict(grad_clip=None),
        checkpoint_config=dict(interval=1),
    )
    return runner


def record_calls(monkeypatch, module, name, real, arg):
    """module.name replaced by a wrapper of real that records the argument
    at position arg of each call; returns the list it records into."""
    calls = []

    def spy(*args, **kwargs):
        calls.append(args[arg])
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return calls


def data():
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(8, 4, generator=g), torch.randn(8, 2, generator=g))
    return DataLoader(ds, batch_size=4)


def test_patch_replaces_and_unpatch_restores():
    def names():
        return (
            mmcv_ckpt.load_checkpoint,
            mmcv_runner.load_checkpoint,
            base_runner.load_checkpoint,
            mmcv_runner.CheckpointLoader,
            mmcv_ckpt.load_state_dict,
            epoch_runner.save_checkpoint,
        )

    originals = names()
    ckptio.patch()
    try:
        ckptio.patch()  # idempotent
        assert mmcv_ckpt.load_checkpoint is ours.load_checkpoint
        assert mmcv_runner.load_checkpoint is ours.load_checkpoint
        assert base_runner.load_checkpoint is ours.load_checkpoint
        assert mmcv_runner.CheckpointLoader is ours.CheckpointLoader
        assert mmcv_ckpt._load_checkpoint is ours._load_checkpoint
        assert mmcv_ckpt.load_state_dict is ours.load_state_dict
        assert mmcv_ckpt.ENV_MMCV_HOME == "MMCV_HOME"
        assert epoch_runner.save_checkpoint is ckptio.compat.mmcv_save.save_checkpoint
        assert mmcv_runner.weights_to_cpu is ckptio.compat.mmcv_save.weights_to_cpu
    finally:
        ckptio.unpatch()
    ckptio.unpatch()
    assert names() == originals


def test_schemes_registered_with_mmcv_before_patch_are_kept():
    def load_from_ckptiotest(filename, map_location):
        return {"state_dict": {}, "name": filename}

    saved = (dict(mmcv_ckpt.CheckpointLoader._schemes), dict(ours.CheckpointLoader._schemes))
    mmcv_ckpt.CheckpointLoader.register_scheme("ckptiotest://", load_from_ckptiotest)
    mmcv_ckpt.CheckpointLoader.register_scheme("mmcls://", load_from_ckptiotest, force=True)
    try:
        ckptio.patch()
        try:
            got = mmcv_runner._load_checkpoint("ckptiotest://x")
            assert got == {"state_dict": {}, "name": "ckptiotest://x"}
            assert mmcv_runner._load_checkpoint("mmcls://y")["name"] == "mmcls://y"
            assert ours.CheckpointLoader._schemes["http://"] is ours.load_from_http
        finally:
            ckptio.unpatch()
    finally:
        mmcv_ckpt.CheckpointLoader._schemes = saved[0]
        ours.CheckpointLoader._schemes = saved[1]


def test_epoch_runner_saves_and_resumes(patched, tmp_path, monkeypatch):
    calls = record_calls(monkeypatch, base_runner, "load_checkpoint", ours.load_checkpoint, 1)
    runner = make_runner(tmp_path, seed=1)
    runner.run([data()], [("train", 1)])
    saved = tmp_path / "epoch_2.pth"
    assert saved.is_file() and (tmp_path / "epoch_1.pth").is_file()
    # the files load with torch.load, weights_only as torch's default
    ckpt = torch.load(str(saved))
    assert ckpt["meta"]["epoch"] == 2 and "optimizer" in ckpt
    trained = {k: v.clone() for k, v in runner.model.state_dict().items()}

    resumed = make_runner(tmp_path, seed=2)
    resumed.resume(str(saved))
    assert calls == [str(saved)]
    assert resumed.epoch == 2 and resumed.iter == runner.iter
    state = resumed.model.state_dict()
    assert all(torch.equal(state[k], trained[k]) for k in trained)
    want = runner.optimizer.state_dict()["state"]
    got = resumed.optimizer.state_dict()["state"]
    assert all(torch.equal(got[i]["momentum_buffer"], want[i]["momentum_buffer"]) for i in want)

    # and training continues from there
    resumed._max_epochs = 3
    resumed.run([data()], [("train", 1)])
    assert (tmp_path / "epoch_3.pth").is_file()
    assert torch.load(str(tmp_path / "epoch_3.pth"))["meta"]["epoch"] == 3


def test_mmengine_runner_saves_and_resumes(patched, tmp_path, monkeypatch):
    """mmengine's Runner after patch(): its checkpoint names are ckptio's,
    and a run saved by it resumes through them."""
    mm_runner = pytest.importorskip("mmengine.runner")
    import mmengine.runner.runner as runner_module

    import ckptio.mmengine as ours_mmengine

    assert runner_module._load_checkpoint is ours_mmengine._load_checkpoint
    assert runner_module._load_checkpoint_to_model is ours_mmengine._load_checkpoint_to_model
    assert mm_runner.load_checkpoint is ours_mmengine.load_checkpoint
    # mmengine stores HistoryBuffer objects and numpy arrays in its checkpoints,
    # which torch's weights-only default refuses; ckptio's mmengine surface
    # decodes them data-only (allow='openmmlab'), with no environment variable

    Net = mmengine_linear_net_class()

    calls = record_calls(monkeypatch, runner_module, "_load_checkpoint",
                         ours_mmengine._load_checkpoint, 0)

    def make(seed, **kw):
        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(0)
        ds = TensorDataset(torch.randn(8, 4, generator=g), torch.randn(8, 2, generator=g))
        return mm_runner.Runner(
            model=Net(),
            work_dir=str(tmp_path),
            train_dataloader=DataLoader(ds, batch_size=4, collate_fn=collate),
            optim_wrapper=dict(optimizer=dict(type="SGD", lr=0.1, momentum=0.9)),
            train_cfg=dict(by_epoch=True, max_epochs=2),
            default_hooks=dict(checkpoint=dict(type="CheckpointHook", interval=1)),
            default_scope="mmengine",
            experiment_name=f"ckptio-{seed}-{id(kw)}",
            **kw,
        )

    first = make(1)
    first.train()
    saved = tmp_path / "epoch_2.pth"
    assert saved.is_file()
    ckpt = torch.load(str(saved), weights_only=False)
    assert ckpt["meta"]["epoch"] == 2
    trained = {k: v.clone() for k, v in first.model.state_dict().items()}

    second = make(2, load_from=str(saved), resume=True)
    second.train()  # resumes at epoch 2 of 2: loads, then has nothing left to train
    assert calls == [str(saved)]
    assert second.epoch == 2
    state = second.model.state_dict()
    assert all(torch.equal(state[k], trained[k]) for k in trained)


def test_mocks_of_mmcv_names_reach_ckptio_while_patched(patched, tmp_path, monkeypatch):
    """What mmcv's own tests do with unittest.mock.patch after patch()."""
    import json
    import os

    import mmcv

    zoo = tmp_path / "model_zoo"
    zoo.mkdir()
    for name in ("deprecated.json", "mmcls.json", "torchvision_0.12.json"):
        src = os.path.join(os.path.dirname(ckptio.__file__), "model_zoo", name)
        (zoo / name).write_bytes(open(src, "rb").read())
    (zoo / "open_mmlab.json").write_text(json.dumps({"net": "https://example.invalid/net.pth"}))
    monkeypatch.setattr(mmcv, "__path__", [str(tmp_path)])
    monkeypatch.setenv("MMCV_HOME", str(tmp_path / "home"))
    assert ours.get_external_models() == {"net": "https://example.invalid/net.pth"}

    seen = []
    monkeypatch.setattr(mmcv_ckpt, "load_from_http", lambda url, map_location=None: "http:" + url)
    assert (
        mmcv_runner._load_checkpoint("open-mmlab://net") == "http:https://example.invalid/net.pth"
    )
    monkeypatch.setattr(
        mmcv_ckpt, "load_url", lambda url, model_dir=None, map_location=None: seen.append(url) or {}
    )
    monkeypatch.setattr(mmcv_ckpt, "get_dist_info", lambda: (0, 1))
    assert ours.load_from_http("https://example.invalid/x.pth") == {}
    assert seen == ["https://example.invalid/x.pth"]
    monkeypatch.undo()
    # mocks gone: ckptio's own names again (nothing is downloaded here)
    assert ours._resolve("load_from_http") is ours.load_from_http
    assert ours._resolve("load_url") is ours.load_url


def test_mmcv_names_are_ignored_when_not_patched(monkeypatch):
    monkeypatch.setattr(mmcv_ckpt, "load_url", lambda *a, **k: "mmcv's")
    assert not ckptio.patching.patched()
    assert ours._resolve("load_url") is ours.load_url


def test_patch_logs_what_it_replaced(caplog):
    import logging

    pytest.importorskip("mmcv.runner")
    import ckptio

    with caplog.at_level(logging.INFO, logger="ckptio"):
        ckptio.patch()
        ckptio.unpatch()
    (msg,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("patch():")]
    assert "load_checkpoint" in msg and "names replaced in" in msg

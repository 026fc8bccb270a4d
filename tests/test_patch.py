"""ckptio.patch()/unpatch(): mmcv's runner trains, saves and resumes with
ckptio's functions in place, and everything is restored afterwards."""
import logging

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import ckptio
import ckptio.checkpoint as ours

mmcv_runner = pytest.importorskip("mmcv.runner")
import mmcv.runner.base_runner as base_runner  # noqa: E402
import mmcv.runner.checkpoint as mmcv_ckpt  # noqa: E402


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)
        self.bn = nn.BatchNorm1d(2)

    def forward(self, x):
        return self.bn(self.fc(x))

    def train_step(self, data_batch, optimizer, **kwargs):
        x, y = data_batch
        loss = nn.functional.mse_loss(self(x), y)
        return dict(loss=loss, log_vars=dict(loss=loss.item()), num_samples=len(x))


@pytest.fixture
def patched():
    ckptio.patch()
    yield
    ckptio.unpatch()


def make_runner(work_dir, seed):
    torch.manual_seed(seed)
    model = Tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    logger = logging.getLogger("ckptio-patch-test")
    runner = mmcv_runner.EpochBasedRunner(
        model, optimizer=optimizer, work_dir=str(work_dir), logger=logger, max_epochs=2
    )
    runner.register_training_hooks(
        lr_config=dict(policy="fixed"), optimizer_config=dict(grad_clip=None),
        checkpoint_config=dict(interval=1)
    )
    return runner


def data():
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(8, 4, generator=g), torch.randn(8, 2, generator=g))
    return DataLoader(ds, batch_size=4)


def test_patch_replaces_and_unpatch_restores():
    originals = (mmcv_ckpt.load_checkpoint, mmcv_runner.load_checkpoint, base_runner.load_checkpoint,
                 mmcv_runner.CheckpointLoader, mmcv_ckpt.load_state_dict)
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
    finally:
        ckptio.unpatch()
    ckptio.unpatch()
    assert (mmcv_ckpt.load_checkpoint, mmcv_runner.load_checkpoint, base_runner.load_checkpoint,
            mmcv_runner.CheckpointLoader, mmcv_ckpt.load_state_dict) == originals


def test_schemes_registered_with_mmcv_before_patch_are_kept():
    def load_from_ckptiotest(filename, map_location):
        return {"state_dict": {}, "name": filename}

    mmcv_ckpt.CheckpointLoader.register_scheme("ckptiotest://", load_from_ckptiotest)
    try:
        ckptio.patch()
        try:
            got = mmcv_runner._load_checkpoint("ckptiotest://x")
            assert got == {"state_dict": {}, "name": "ckptiotest://x"}
        finally:
            ckptio.unpatch()
    finally:
        mmcv_ckpt.CheckpointLoader._schemes.pop("ckptiotest://")
        ours.CheckpointLoader._schemes.pop("ckptiotest://", None)


def test_epoch_runner_saves_and_resumes(patched, tmp_path, monkeypatch):
    calls = []
    real = ours.load_checkpoint

    def spy(*args, **kwargs):
        calls.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(base_runner, "load_checkpoint", spy)
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

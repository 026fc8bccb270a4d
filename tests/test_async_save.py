"""ckptio.async_save: the file is exactly ckptio.save's, the snapshot is
taken before the call returns, saves are ordered, bounded and waited for at
exit, errors reach future.result(), a kill -9 during the write leaves the
old file, and mmcv's and mmengine's CheckpointHooks save through it after
ckptio.patch(async_save=True)."""
import collections
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
import torch
import torch.nn as nn

import ckptio
from ckptio import asyncsave as _async

from helpers import assert_same, fds_into
from openmmlab_runs import collate, mmengine_linear_net_class

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sample():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(64, 32, generator=g)
    sd = collections.OrderedDict(
        w=base,
        view=base[3:9, ::2],                       # shares base's storage
        t=torch.randn(5, 7, generator=g).t(),
        p=nn.Parameter(torch.randn(4, generator=g)),
        frozen=nn.Parameter(torch.randn(3, generator=g), requires_grad=False),
        grad=torch.randn(2, generator=g).requires_grad_(),
        bf=torch.randn(6, generator=g).to(torch.bfloat16),
        empty=torch.zeros(0, 3),
        i=torch.arange(10),
    )
    sd._metadata = collections.OrderedDict({"": {"version": 1}})
    return {"state_dict": sd, "meta": {"epoch": 2, "np": np.float64(0.5), "arr": np.arange(3)},
            "pair": (torch.ones(2), [1, "x"])}


class Gate:
    """A binary file object whose first write blocks until released: a save
    into it holds the writer thread, so later saves queue behind it."""

    def __init__(self):
        self.event = threading.Event()
        self.data = bytearray()

    def write(self, b):
        self.event.wait(30)
        self.data += bytes(b)
        return len(memoryview(b))

    def flush(self):
        pass


@pytest.fixture(autouse=True)
def drained():
    yield
    assert ckptio.wait_async_saves(60)


def test_bytes_equal_ckptio_save(tmp_path):
    obj = sample()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    ckptio.save(obj, str(tmp_path / "a" / "x.pth"))
    fut = ckptio.async_save(obj, str(tmp_path / "b" / "x.pth"))
    assert fut.result(30) is None
    assert (tmp_path / "a" / "x.pth").read_bytes() == (tmp_path / "b" / "x.pth").read_bytes()
    want = torch.load(str(tmp_path / "a" / "x.pth"), weights_only=False)
    assert_same(torch.load(str(tmp_path / "b" / "x.pth"), weights_only=False), want)


def test_snapshot_is_taken_before_return(tmp_path):
    gate = Gate()
    blocker = ckptio.async_save({"x": torch.ones(1)}, gate)
    obj = sample()
    (tmp_path / "want").mkdir()
    (tmp_path / "got").mkdir()
    ckptio.save(obj, str(tmp_path / "want" / "x.pth"))
    want = (tmp_path / "want" / "x.pth").read_bytes()
    fut = ckptio.async_save(obj, str(tmp_path / "got" / "x.pth"))
    # the write has not started (the writer is held by the gate) ...
    assert not fut.done() and not (tmp_path / "got" / "x.pth").exists()
    # ... and everything the caller owns changes now
    obj["state_dict"]["w"].add_(1)
    obj["state_dict"]["p"].data.zero_()
    obj["state_dict"]["i"].resize_(100)
    obj["meta"]["epoch"] = 99
    obj["meta"]["arr"][0] = 42
    obj["pair"][1].append("late")
    del obj
    gate.event.set()
    blocker.result(30)
    fut.result(30)
    assert (tmp_path / "got" / "x.pth").read_bytes() == want


def test_saves_to_one_path_are_ordered(tmp_path):
    gate = Gate()
    blocker = ckptio.async_save({"x": torch.ones(1)}, gate)
    done = []
    futures = []
    threading.Timer(0.2, gate.event.set).start()
    for i in range(4):
        fut = ckptio.async_save({"i": torch.tensor(i)}, str(tmp_path / "x.pth"))
        fut.add_done_callback(lambda f, i=i: done.append(i))
        futures.append(fut)
    for fut in futures:
        fut.result(30)
    blocker.result(30)
    assert done == [0, 1, 2, 3]
    assert int(torch.load(str(tmp_path / "x.pth"))["i"]) == 3


def test_pending_saves_are_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(_async, "MAX_PENDING", 2)
    gate = Gate()
    first = ckptio.async_save({"x": torch.ones(1)}, gate)
    second = ckptio.async_save({"x": torch.ones(1)}, str(tmp_path / "2.pth"))
    returned = threading.Event()

    def third():
        ckptio.async_save({"x": torch.ones(1)}, str(tmp_path / "3.pth"))
        returned.set()

    t = threading.Thread(target=third)
    t.start()
    assert not returned.wait(0.5)  # waits for a slot: no third snapshot in memory yet
    gate.event.set()
    assert returned.wait(30)
    t.join()
    first.result(30)
    second.result(30)


def test_errors_reach_the_future(tmp_path):
    fut = ckptio.async_save({"x": torch.ones(1)}, str(tmp_path / "missing" / "x.pth"))
    with pytest.raises(FileNotFoundError):
        fut.result(30)
    fut = ckptio.async_save({"f": lambda: 1}, str(tmp_path / "x.pth"))
    with pytest.raises(Exception, match="pickle|lambda"):
        fut.result(30)
    assert not (tmp_path / "x.pth").exists()
    assert os.listdir(tmp_path) == []
    with pytest.raises(TypeError, match="unexpected"):
        ckptio.async_save({}, str(tmp_path / "x.pth"), pickle_protocol=4)
    # and saving goes on after failures
    ckptio.async_save({"x": torch.ones(1)}, str(tmp_path / "x.pth")).result(30)
    assert torch.equal(torch.load(str(tmp_path / "x.pth"))["x"], torch.ones(1))


def test_arena_is_reused(tmp_path, monkeypatch):
    monkeypatch.setattr(_async, "_free", [])
    obj = {"w": torch.randn(256, 256)}
    ckptio.async_save(obj, str(tmp_path / "a.pth")).result(30)
    assert ckptio.wait_async_saves(30)  # the arena goes back once the writer is done with it
    arenas = [id(a) for _, _, a in _async._free]
    ckptio.async_save(obj, str(tmp_path / "b.pth")).result(30)
    assert ckptio.wait_async_saves(30)
    assert len(arenas) == 1 and [id(a) for _, _, a in _async._free] == arenas


def child(code, *args):
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_interpreter_exit_waits_for_pending_saves(tmp_path):
    target = str(tmp_path / "x.pth")
    p = child("""
        import sys, torch, ckptio
        ckptio.async_save({"w": torch.full((4096, 4096), 3.0)}, sys.argv[1])
        print("returned", flush=True)
        """, target)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    assert "returned" in out
    assert torch.equal(torch.load(target)["w"], torch.full((4096, 4096), 3.0))


def temp_file_of(pid, directory):
    """The size of the temporary file the process is writing in directory
    (an O_TMPFILE inode or a .ckptio- named file), or None."""
    for fd_path, link in fds_into(pid, directory):
        if "(deleted)" in link or ".ckptio-" in link:
            try:
                return os.stat(fd_path).st_size
            except OSError:
                return None
    return None


def test_kill_9_during_an_async_write_leaves_the_old_file(tmp_path):
    target = str(tmp_path / "ckpt.pth")
    old = {"w": torch.arange(10.0)}
    ckptio.save(old, target)
    before = open(target, "rb").read()
    p = child("""
        import sys, time, torch, ckptio
        big = {f"w{i}": torch.full((1024, 1024), float(i)) for i in range(192)}  # 768 MiB
        ckptio.async_save(big, sys.argv[1])
        print("returned", flush=True)
        time.sleep(60)
        """, target)
    try:
        assert p.stdout.readline().strip() == "returned"
        seen = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            size = temp_file_of(p.pid, str(tmp_path))
            if size:
                seen = size
                break
            time.sleep(0.0005)
        os.kill(p.pid, signal.SIGKILL)
        p.wait(30)
    finally:
        if p.poll() is None:
            p.kill()
    assert seen, "the write was not caught in progress"
    assert seen < 768 << 20
    assert open(target, "rb").read() == before
    assert torch.equal(torch.load(target)["w"], old["w"])
    leftovers = [n for n in os.listdir(tmp_path) if n != "ckpt.pth"]
    ckptio.save(old, target)  # a later save removes a named temporary of a dead process
    assert [n for n in os.listdir(tmp_path) if n != "ckpt.pth"] == [], leftovers


# ------------------------------------------------------- mmcv / mmengine hooks


@pytest.fixture
def patched_async():
    ckptio.patch(async_save=True)
    yield
    ckptio.unpatch()
    ckptio.wait_async_saves(60)


def test_mmengine_checkpoint_hook_saves_asynchronously(patched_async, tmp_path, monkeypatch):
    mm_runner = pytest.importorskip("mmengine.runner")
    from mmengine.hooks import Hook
    from torch.utils.data import DataLoader, TensorDataset

    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    calls = []
    real = _async.async_save
    monkeypatch.setattr(_async, "async_save", lambda *a, **k: calls.append(a[1]) or real(*a, **k))

    Net = mmengine_linear_net_class()

    states = {}

    class Record(Hook):
        priority = "LOWEST"  # after CheckpointHook, before the next step changes the weights

        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            # CheckpointHook names this save iter_{runner.iter + 1}
            states[runner.iter + 1] = {k: v.clone() for k, v in runner.model.state_dict().items()}

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(16, 4, generator=g), torch.randn(16, 2, generator=g))
    runner = mm_runner.Runner(
        model=Net(), work_dir=str(tmp_path),
        train_dataloader=dict(dataset=ds, sampler=dict(type="DefaultSampler", shuffle=False),
                              batch_size=4, collate_fn=collate),
        optim_wrapper=dict(optimizer=dict(type="SGD", lr=0.1, momentum=0.9)),
        train_cfg=dict(by_epoch=False, max_iters=3, val_interval=100),
        default_hooks=dict(checkpoint=dict(type="CheckpointHook", interval=1, by_epoch=False)),
        custom_hooks=[Record()], default_scope="mmengine", experiment_name="ckptio-async",
    )
    runner.train()
    assert ckptio.wait_async_saves(60)
    assert [os.path.basename(c) for c in calls] == ["iter_1.pth", "iter_2.pth", "iter_3.pth"]
    for it in (1, 2, 3):
        ckpt = torch.load(str(tmp_path / f"iter_{it}.pth"), weights_only=False)
        assert ckpt["meta"]["iter"] == it
        for k, v in states[it].items():
            assert torch.equal(ckpt["state_dict"][k], v), (it, k)


def test_mmcv_checkpoint_hook_saves_asynchronously(patched_async, tmp_path):
    mmcv_runner = pytest.importorskip("mmcv.runner")
    from torch.utils.data import DataLoader, TensorDataset

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(x)

        def train_step(self, data_batch, optimizer, **kwargs):
            x, y = data_batch
            loss = nn.functional.mse_loss(self(x), y)
            return dict(loss=loss, log_vars=dict(loss=loss.item()), num_samples=len(x))

    states = {}

    class Record(mmcv_runner.Hook):
        def after_train_epoch(self, runner):
            states[runner.epoch + 1] = {k: v.clone() for k, v in runner.model.state_dict().items()}

    torch.manual_seed(0)
    model = Tiny()
    runner = mmcv_runner.EpochBasedRunner(
        model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        work_dir=str(tmp_path), logger=logging.getLogger("ckptio-async"), max_epochs=2)
    runner.register_training_hooks(lr_config=dict(policy="fixed"),
                                   optimizer_config=dict(grad_clip=None),
                                   checkpoint_config=dict(interval=1))
    runner.register_hook(Record(), priority="LOWEST")
    g = torch.Generator().manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(8, 4, generator=g), torch.randn(8, 2, generator=g)),
                      batch_size=4)
    runner.run([data], [("train", 1)])
    assert ckptio.wait_async_saves(60)
    for epoch in (1, 2):
        ckpt = torch.load(str(tmp_path / f"epoch_{epoch}.pth"))
        assert ckpt["meta"]["epoch"] == epoch
        for k, v in states[epoch].items():
            assert torch.equal(ckpt["state_dict"][k], v), (epoch, k)


def test_a_failed_hook_save_is_raised_by_the_next(patched_async, tmp_path, monkeypatch, caplog):
    from ckptio import saving as _save
    from ckptio.compat.mmengine_save import save_checkpoint

    real = _save.save_with
    fail = [True]

    def flaky(obj, f, **kw):
        if fail.pop(0) if fail else False:
            raise OSError(28, "No space left on device")
        return real(obj, f, **kw)

    monkeypatch.setattr(_save, "save_with", flaky)
    with caplog.at_level(logging.ERROR, logger="ckptio"):
        save_checkpoint({"x": torch.ones(1)}, str(tmp_path / "a.pth"))
        assert ckptio.wait_async_saves(60)
    assert "a.pth failed" in caplog.text
    with pytest.raises(ckptio.CheckpointError, match="a.pth failed.*No space"):
        save_checkpoint({"x": torch.ones(1)}, str(tmp_path / "b.pth"))
    save_checkpoint({"x": torch.ones(1)}, str(tmp_path / "b.pth"))
    assert ckptio.wait_async_saves(60)
    assert (tmp_path / "b.pth").is_file() and not (tmp_path / "a.pth").exists()

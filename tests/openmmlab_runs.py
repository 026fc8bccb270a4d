"""Checkpoints written by the real training loops ckptio's users run: mmengine
0.10.7's Runner and mmcv 1.7.2's EpochBasedRunner and IterBasedRunner, on
a tiny model, at test time (a few seconds in all). What their pickles name
is what allow='openmmlab' must decode (see GLOBALS_SEEN).

    runs = openmmlab_runs.generate(tmp_path_factory)   # cached per session
    runs["mmengine"]["sgd_epoch_ema_val"]  -> [paths of the .pth files]
"""
import logging
import os
import pickletools
import zipfile
from unittest import mock

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

# Every global the runs below produced with torch 2.13, numpy 2.x, mmengine
# 0.10.7 and mmcv 1.7.2 (numpy 1.x writes numpy.core.* for numpy._core.*):
GLOBALS_SEEN = {
    "mmengine": {
        "collections.OrderedDict",
        "torch._utils._rebuild_tensor_v2",
        "torch.FloatStorage",
        "torch.LongStorage",
        "mmengine.logging.history_buffer.HistoryBuffer",
        "numpy._core.multiarray._reconstruct",
        "numpy.ndarray",
        "numpy.dtype",
        "_codecs.encode",
        "__builtin__.getattr",
        "numpy._core.multiarray.scalar",
        "collections.Counter",
    },
    "mmcv": {
        "collections.OrderedDict",
        "torch._utils._rebuild_tensor_v2",
        "torch.FloatStorage",
        "torch.LongStorage",
        "numpy._core.multiarray.scalar",
        "numpy.dtype",
        "_codecs.encode",
    },
}

# (name, optimizer, by_epoch, EMAHook, val loop with a metric and save_best)
MMENGINE_RUNS = [
    ("sgd_epoch", dict(type="SGD", lr=0.1, momentum=0.9), True, False, False),
    ("adamw_iter", dict(type="AdamW", lr=0.01), False, False, False),
    ("sgd_epoch_ema_val", dict(type="SGD", lr=0.1, momentum=0.9), True, True, True),
    ("adamw_iter_ema_val", dict(type="AdamW", lr=0.01), False, True, True),
]
# (name, runner, optimizer); each with EvalHook(save_best='acc')
MMCV_RUNS = [("epoch_sgd", "epoch", "sgd"), ("iter_adamw", "iter", "adamw")]


def globals_of(path):
    """The (module.name) globals a torch zip checkpoint's pickle names."""
    with zipfile.ZipFile(path) as z:
        data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    out = set()
    for op, arg, _ in pickletools.genops(data):
        if op.name in ("GLOBAL", "INST"):
            out.add(arg.replace(" ", "."))
        assert op.name != "STACK_GLOBAL", "torch.save writes protocol 2"
    return out


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 4, generator=g), torch.randn(8, 2, generator=g)


# ---- mmengine ------------------------------------------------------------------


def collate(batch):
    """The collate_fn of the mmengine runs: (x, y) pairs as {"x": ..., "y": ...}."""
    x, y = zip(*batch)
    return {"x": torch.stack(x), "y": torch.stack(y)}


def mmengine_linear_net_class():
    """A new mmengine BaseModel class of one Linear(4, 2), whose loss is the
    mse of a batch from collate (mmengine is imported when called)."""
    from mmengine.model import BaseModel

    class Net(BaseModel):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x, y, mode="loss"):
            return {"loss": nn.functional.mse_loss(self.fc(x), y)}

    return Net


def mmengine_runner(work_dir, name, optimizer, by_epoch, ema, val, seed=0, **kw):
    """The Runner of one configuration (also used to resume from its files)."""
    from mmengine.evaluator import BaseMetric
    from mmengine.model import BaseModel
    from mmengine.runner import Runner

    class Net(BaseModel):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)
            self.bn = nn.BatchNorm1d(2)

        def forward(self, x, y, mode="loss"):
            out = self.bn(self.fc(x))
            if mode == "loss":
                return {"loss": nn.functional.mse_loss(out, y)}
            return [dict(pred=o, gt=t) for o, t in zip(out, y)]

    class Mse(BaseMetric):
        def process(self, data_batch, data_samples):
            for d in data_samples:
                self.results.append(float(((d["pred"] - d["gt"]) ** 2).mean()))

        def compute_metrics(self, results):
            mse = np.mean(results)
            return dict(mse=float(mse), acc=np.float64(1.0 / (1.0 + mse)))

    torch.manual_seed(seed)
    ds = TensorDataset(*_data())
    extra = {}
    if val:
        extra = dict(
            val_dataloader=DataLoader(ds, batch_size=4, collate_fn=collate),
            val_cfg=dict(),
            val_evaluator=[Mse()],
        )
    if by_epoch:
        train_cfg = dict(by_epoch=True, max_epochs=2, val_interval=1)
    else:
        train_cfg = dict(by_epoch=False, max_iters=4, val_interval=2)
    checkpoint = dict(type="CheckpointHook", interval=1 if by_epoch else 2, by_epoch=by_epoch)
    if val:
        checkpoint.update(save_best="acc", rule="greater")
    extra.update(kw)
    return Runner(
        model=Net(),
        work_dir=str(work_dir),
        train_dataloader=DataLoader(ds, batch_size=4, collate_fn=collate),
        optim_wrapper=dict(optimizer=optimizer),
        param_scheduler=[
            dict(type="LinearLR", start_factor=0.5, by_epoch=by_epoch, begin=0, end=2),
            dict(type="MultiStepLR", milestones=[1], by_epoch=by_epoch),
        ],
        train_cfg=train_cfg,
        default_hooks=dict(checkpoint=checkpoint),
        custom_hooks=[dict(type="EMAHook")] if ema else [],
        default_scope="mmengine",
        experiment_name=f"{name}-{seed}-{os.path.basename(str(work_dir))}",
        **extra,
    )


# ---- mmcv ------------------------------------------------------------------------


class _EvalSet(Dataset):
    def __init__(self):
        self.x, self.y = _data()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]

    def evaluate(self, results, logger=None, **kwargs):
        mse = np.asarray(results, dtype=np.float64).mean()
        return dict(mse=np.float32(mse), acc=np.float64(1.0 / (1.0 + mse)))


class MmcvNet(nn.Module):
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

    def val_step(self, data_batch, optimizer=None, **kwargs):
        return self.train_step(data_batch, optimizer)


def _mmcv_test(model, loader, show=False):
    model.eval()
    out = []
    with torch.no_grad():
        for x, y in loader:
            out.extend(((model(x) - y) ** 2).mean(1).tolist())
    model.train()
    return out


def mmcv_runner(work_dir, kind, optimizer, seed=0):
    """The runner of one configuration, with its hooks registered."""
    import mmcv.runner as mmcv_runner
    from mmcv.runner import EvalHook

    torch.manual_seed(seed)
    model = MmcvNet()
    if optimizer == "sgd":
        optim = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    else:
        optim = torch.optim.AdamW(model.parameters(), lr=0.01)
    logger = logging.getLogger("ckptio-openmmlab-runs")
    meta = dict(seed=seed, config="model = dict(type='MmcvNet')", exp_name="ckptio")
    if kind == "epoch":
        runner = mmcv_runner.EpochBasedRunner(
            model, optimizer=optim, work_dir=str(work_dir), logger=logger, max_epochs=2, meta=meta
        )
    else:
        runner = mmcv_runner.IterBasedRunner(
            model, optimizer=optim, work_dir=str(work_dir), logger=logger, max_iters=4, meta=meta
        )
    runner.register_training_hooks(
        lr_config=dict(policy="step", step=[1], warmup="linear", warmup_iters=2, warmup_ratio=0.1),
        optimizer_config=dict(grad_clip=None),
        checkpoint_config=dict(interval=1 if kind == "epoch" else 2),
        log_config=dict(interval=1, hooks=[dict(type="TextLoggerHook")]),
    )
    hook = EvalHook(
        DataLoader(_EvalSet(), batch_size=4),
        by_epoch=kind == "epoch",
        interval=1 if kind == "epoch" else 2,
        save_best="acc",
        rule="greater",
    )
    hook.test_fn = _mmcv_test
    runner.register_hook(hook, priority="LOW")
    return runner


def mmcv_loader():
    return DataLoader(_EvalSet(), batch_size=4)


def run_mmcv(runner):
    """runner.run on the training data, without the 2 s sleeps mmcv's runners
    take per epoch (against a deadlock in distributed data loading)."""
    with mock.patch("time.sleep"):
        runner.run([mmcv_loader()], [("train", 1)])


# ---- all runs, once per session ---------------------------------------------------

_cache = {}


def _pth_files(work_dir):
    return sorted(
        os.path.join(work_dir, f)
        for f in os.listdir(work_dir)
        if f.endswith(".pth") and not os.path.islink(os.path.join(work_dir, f))
    )


def generate(tmp_path_factory):
    """{'mmengine': {name: [paths]}, 'mmcv': {name: [paths]}}, written once."""
    if "runs" in _cache:
        return _cache["runs"]
    base = tmp_path_factory.mktemp("openmmlab-runs")
    runs = {"mmengine": {}, "mmcv": {}}
    for name, optimizer, by_epoch, ema, val in MMENGINE_RUNS:
        work = base / "mmengine" / name
        work.mkdir(parents=True)
        mmengine_runner(work, name, optimizer, by_epoch, ema, val).train()
        runs["mmengine"][name] = _pth_files(work)
    for name, kind, optimizer in MMCV_RUNS:
        work = base / "mmcv" / name
        work.mkdir(parents=True)
        run_mmcv(mmcv_runner(work, kind, optimizer))
        runs["mmcv"][name] = _pth_files(work)
    _cache["runs"] = runs
    return runs


def all_files(runs):
    """(generator, run name, path) for every file of every run."""
    return [
        (gen, name, path)
        for gen, by_name in runs.items()
        for name, paths in by_name.items()
        for path in paths
    ]


def history_buffers(obj, path="ckpt"):
    """(path, HistoryBuffer) for every HistoryBuffer inside obj."""
    from mmengine.logging import HistoryBuffer

    if isinstance(obj, HistoryBuffer):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from history_buffers(v, f"{path}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from history_buffers(v, f"{path}[{i}]")


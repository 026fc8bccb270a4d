"""Real OpenMMLab checkpoints load safely by default (allow='openmmlab').

The files are written at test time by mmengine 0.10.7's Runner (SGD and
AdamW, param schedulers, epoch- and iter-based loops, EMAHook, a val loop
with a metric and save_best) and mmcv 1.7.2's EpochBasedRunner and
IterBasedRunner (EvalHook(save_best=...)); see openmmlab_runs. The oracle is
torch.load(weights_only=False) on the same file: tensors bit-exact, numpy
values of the same types and dtypes, HistoryBuffers with the same attributes
and working methods. Runners resume from each file after ckptio.patch(),
with no environment variable anywhere.
"""
import collections
import io
import os
import subprocess
import textwrap

import numpy as np
import pytest
import torch

import ckptio
import ckptio.checkpoint as ck_mmcv
import ckptio.mmengine as ck_mmengine
import openmmlab_runs as omm
from ckptio import cli
from helpers import assert_same

pytest.importorskip("mmengine")
pytest.importorskip("mmcv.runner")

RUN_IDS = [("mmengine", r[0]) for r in omm.MMENGINE_RUNS] + [("mmcv", r[0]) for r in omm.MMCV_RUNS]
ENV_VARS = ("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_WEIGHTS_ONLY_LOAD")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return omm.generate(tmp_path_factory)


@pytest.fixture(autouse=True)
def no_weights_only_env():
    """Nothing here may lean on torch's escape hatches."""
    assert not any(os.environ.get(v) for v in ENV_VARS)


def _same_history_buffers(ours, theirs):
    pairs = list(zip(omm.history_buffers(ours), omm.history_buffers(theirs)))
    for (path, a), (_, b) in pairs:
        assert type(a) is type(b), path
        for method in ("min", "max", "mean", "current"):
            x, y = getattr(a, method)(), getattr(b, method)()
            assert type(x) is type(y) and x == y, f"{path}.{method}()"
            assert a.statistics(method) == y
        assert a.mean(window_size=2) == b.mean(window_size=2)
        assert a.data[0].dtype == b.data[0].dtype and a.data[1].dtype == b.data[1].dtype
    return len(pairs)


# ---- what real runs write -----------------------------------------------------------


def test_every_global_real_runs_write_is_listed(runs):
    """The documented list is exactly what the runs produced (a new mmengine
    or mmcv that writes something else fails here first)."""
    for gen in ("mmengine", "mmcv"):
        seen = set()
        for paths in runs[gen].values():
            for path in paths:
                seen |= omm.globals_of(path)
        assert seen == omm.GLOBALS_SEEN[gen], gen


@pytest.mark.parametrize("gen,name", RUN_IDS)
def test_default_entry_points_equal_torch_load(runs, gen, name):
    loaders = {
        "ckptio.checkpoint._load_checkpoint": lambda p: ck_mmcv._load_checkpoint(p),
        "ckptio.checkpoint.CheckpointLoader": lambda p: ck_mmcv.CheckpointLoader.load_checkpoint(p),
        "ckptio.mmengine._load_checkpoint": lambda p: ck_mmengine._load_checkpoint(p),
        "ckptio.mmengine.CheckpointLoader": (
            lambda p: ck_mmengine.CheckpointLoader.load_checkpoint(p)
        ),
        "ckptio.load(allow=openmmlab)": lambda p: ckptio.load(p, allow="openmmlab"),
        "ckptio.load(allow=openmmlab, mmap=False)": (
            lambda p: ckptio.load(p, allow="openmmlab", mmap=False)
        ),
        "ckptio.load(file object)": lambda p: ckptio.load(open(p, "rb"), allow="openmmlab"),
    }
    for path in runs[gen][name]:
        theirs = torch.load(path, weights_only=False)
        for what, load in loaders.items():
            ours = load(path)
            assert_same(ours, theirs, f"{what} {os.path.basename(path)}")
            if gen == "mmengine":
                assert _same_history_buffers(ours, theirs) >= 4, what


def test_numpy_values_keep_their_types(runs):
    path = runs["mmengine"]["adamw_iter_ema_val"][-1]
    ours = ck_mmengine._load_checkpoint(path)
    info = ours["message_hub"]["runtime_info"]
    assert type(info["best_score"]) is np.float64 and type(info["eta"]) is np.float64
    hb = ours["message_hub"]["log_scalars"]["train/loss"]
    assert type(hb._log_history) is np.ndarray and hb._log_history.dtype == np.float64
    assert hb._count_history.dtype == np.int64
    assert type(ours["param_schedulers"][1]["milestones"]) is collections.Counter
    path = runs["mmcv"]["epoch_sgd"][-1]
    best = ck_mmcv._load_checkpoint(path)["meta"]["hook_msgs"]["best_score"]
    assert type(best) is np.float64


def test_history_buffer_methods_work_and_class_state_is_untouched(runs):
    from mmengine.logging import HistoryBuffer

    before = dict(HistoryBuffer._statistics_methods)
    ours = ck_mmengine._load_checkpoint(runs["mmengine"]["sgd_epoch"][-1])
    hb = ours["message_hub"]["log_scalars"]["train/loss"]
    n = len(hb._log_history)
    hb.update(0.5)
    assert len(hb._log_history) == n + 1 and hb.current() == 0.5
    assert HistoryBuffer._statistics_methods == before
    for name in ("min", "max", "mean", "current"):
        assert HistoryBuffer._statistics_methods[name] is getattr(HistoryBuffer, name)


def test_empty_history_buffer(tmp_path):
    """A buffer never updated holds empty arrays, whose data protocol 2 writes
    as bytes() (builtins.bytes: in the set only as the empty bytes object)."""
    from mmengine.logging import HistoryBuffer, MessageHub

    hub = MessageHub("ckptio-empty")
    hub.update_scalar("loss", 0.5)
    state = hub.state_dict()
    state["log_scalars"]["empty"] = HistoryBuffer()
    path = tmp_path / "empty.pth"
    torch.save({"message_hub": state, "raw": b""}, path)
    assert "__builtin__.bytes" in omm.globals_of(path)
    theirs = torch.load(path, weights_only=False)
    ours = ck_mmengine._load_checkpoint(str(path))
    assert_same(ours, theirs)
    empty = ours["message_hub"]["log_scalars"]["empty"]
    assert empty._log_history.shape == (0,) and empty._log_history.dtype == np.float64


def test_plain_load_keeps_torch_meaning_and_names_the_option(runs):
    path = runs["mmengine"]["sgd_epoch"][-1]
    with pytest.raises(Exception):
        torch.load(path)  # torch 2.13's weights_only default refuses the file
    with pytest.raises(ckptio.UnpicklingError) as err:
        ckptio.load(path)
    msg = str(err.value)
    assert path in msg and "allow='openmmlab'" in msg
    assert "--allow openmmlab" in msg and "--unsafe" in msg
    assert_same(ckptio.load(path, weights_only=False), torch.load(path, weights_only=False))


def test_allow_names_checked():
    with pytest.raises(ValueError, match="unknown data set 'numpy'"):
        ckptio.load(b"", allow="numpy")
    with pytest.raises(ValueError, match="unknown data set"):
        ckptio.verify(b"", allow=["openmmlab", "x"])


# ---- the command line ------------------------------------------------------------------


def test_cli_info_verify_convert_by_default(runs, tmp_path, capsys):
    for gen in ("mmengine", "mmcv"):
        path = next(iter(runs[gen].values()))[-1]
        assert cli.main(["info", "-q", path]) == 0
        assert cli.main(["verify", "-q", path]) == 0
        out = tmp_path / f"{gen}.pth"
        assert cli.main(["convert", "-q", path, str(out)]) == 0
        assert_same(
            torch.load(out, weights_only=False)["state_dict"],
            torch.load(path, weights_only=False)["state_dict"],
        )
        assert_same(ckptio.load(out, allow="openmmlab"), torch.load(out, weights_only=False))
        capsys.readouterr()
        assert cli.main(["info", "-q", "--allow", "none", path]) == 1
        err = capsys.readouterr().err
        assert "allow='openmmlab'" in err and "--unsafe" in err


# ---- runners resume after patch() ---------------------------------------------------------


@pytest.mark.parametrize("run", omm.MMENGINE_RUNS, ids=[r[0] for r in omm.MMENGINE_RUNS])
def test_mmengine_runner_resumes_from_each_file(runs, run, patched, tmp_path, monkeypatch):
    import mmengine.runner.runner as runner_module

    name, optimizer, by_epoch, ema, val = run
    assert runner_module._load_checkpoint is ck_mmengine._load_checkpoint
    calls = []
    real = ck_mmengine._load_checkpoint

    def spy(filename, *args, **kwargs):
        calls.append(filename)
        return real(filename, *args, **kwargs)

    monkeypatch.setattr(runner_module, "_load_checkpoint", spy)
    for i, path in enumerate(runs["mmengine"][name]):
        saved = torch.load(path, weights_only=False)
        runner = omm.mmengine_runner(
            tmp_path / f"r{i}", name, optimizer, by_epoch, ema, val, seed=7,
            load_from=path, resume=True,
        )
        runner.train()
        assert calls[-1] == path
        if saved["meta"]["iter"] == 4:
            # the last file: nothing left to train, the runner holds the file's state
            # (EMAHook saves the averaged weights as state_dict and the model's
            # own as ema_state_dict, and swaps them back on resume)
            state = runner.model.state_dict()
            want = saved["state_dict"]
            if ema:
                want = {k[7:]: v for k, v in saved["ema_state_dict"].items() if k[:7] == "module."}
                hook = next(h for h in runner.hooks if type(h).__name__ == "EMAHook")
                averaged = hook.ema_model.module.state_dict()
                for k, v in saved["state_dict"].items():
                    assert torch.equal(averaged[k], v), k
            for k, v in want.items():
                assert torch.equal(state[k], v), k
            hub = runner.message_hub
            for key, hb in saved["message_hub"]["log_scalars"].items():
                got = hub.get_scalar(key)
                assert np.array_equal(got._log_history, hb._log_history), key
        assert runner.iter == 4


@pytest.mark.parametrize("run", omm.MMENGINE_RUNS[:1], ids=[omm.MMENGINE_RUNS[0][0]])
def test_mmengine_load_from_and_pretrained_init(runs, run, patched, tmp_path):
    from mmengine.model import BaseModule

    name, optimizer, by_epoch, ema, val = run
    path = runs["mmengine"][name][-1]
    saved = torch.load(path, weights_only=False)["state_dict"]
    runner = omm.mmengine_runner(tmp_path / "r", name, optimizer, by_epoch, ema, val, seed=3)
    runner.load_checkpoint(path)  # what load_from=path, resume=False does
    for k, v in runner.model.state_dict().items():
        assert torch.equal(v, saved[k]), k

    class Backbone(BaseModule):
        def __init__(self):
            super().__init__(init_cfg=dict(type="Pretrained", checkpoint=path))
            self.fc = torch.nn.Linear(4, 2)
            self.bn = torch.nn.BatchNorm1d(2)

    model = Backbone()
    model.init_weights()
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[k]), k


@pytest.mark.parametrize("run", omm.MMCV_RUNS, ids=[r[0] for r in omm.MMCV_RUNS])
def test_mmcv_runner_resumes_from_each_file(runs, run, patched, tmp_path):
    name, kind, optimizer = run
    for i, path in enumerate(runs["mmcv"][name]):
        saved = torch.load(path, weights_only=False)
        runner = omm.mmcv_runner(tmp_path / f"r{i}", kind, optimizer, seed=5)
        # IterBasedRunner's map_location='default' asks for a CUDA device
        runner.resume(path, **({} if kind == "epoch" else {"map_location": "cpu"}))
        assert runner.epoch == saved["meta"]["epoch"] and runner.iter == saved["meta"]["iter"]
        for k, v in runner.model.state_dict().items():
            assert torch.equal(v, saved["state_dict"][k]), k
        assert_same(runner.optimizer.state_dict(), saved["optimizer"])
        # (IterBasedRunner.resume leaves meta alone; EpochBasedRunner's takes hook_msgs)
        if kind == "epoch" and "best_score" in saved["meta"].get("hook_msgs", {}):
            best = runner.meta["hook_msgs"]["best_score"]
            assert type(best) is np.float64 and best == saved["meta"]["hook_msgs"]["best_score"]
        omm.run_mmcv(runner)  # and trains on (to the end) from there
        assert runner.iter == 4


def test_mmcv_init_weights_pretrained(runs, patched):
    import mmcv.runner
    from mmcv.runner import BaseModule

    path = runs["mmcv"]["epoch_sgd"][-1]
    saved = torch.load(path, weights_only=False)["state_dict"]

    class Backbone(BaseModule):
        def __init__(self, init_cfg=None):
            super().__init__(init_cfg=init_cfg)
            self.fc = torch.nn.Linear(4, 2)
            self.bn = torch.nn.BatchNorm1d(2)

        def init_weights_pretrained(self, pretrained=None):
            # mmseg 0.x / mmdet 2.x backbones: init_weights(pretrained=...)
            mmcv.runner.load_checkpoint(self, pretrained, strict=False)

    model = Backbone(init_cfg=dict(type="Pretrained", checkpoint=path))
    model.init_weights()
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[k]), k
    assert mmcv.runner.load_checkpoint is ck_mmcv.load_checkpoint
    model = Backbone()
    model.init_weights_pretrained(pretrained=path)
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[k]), k


# ---- numpy values, numpy 2.x and 1.x writers ------------------------------------------------


def _numpy_objects():
    rng = np.random.default_rng(0)
    arrays = {
        name: rng.integers(0, 100, size=(2, 3)).astype(name)
        for name in ("bool", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8",
                     "g", "c8", "c16", ">f8", ">i4", ">c8", "<u2", ">u8")
    }
    shared = np.arange(5.0)
    arrays.update(
        zero_d=np.array(3.5),
        empty=np.zeros((0, 3), dtype=np.float32),
        fortran=np.asfortranarray(np.arange(12, dtype=np.int32).reshape(3, 4)),
        strided=np.arange(20.0)[::3],
        text=np.array(["a", "bcd", "é"]),
        raw=np.array([b"x", b"yz"]),
        big_text=np.array(["xy"], dtype=">U2"),
        objects=np.array([1, "two", None, 3.5, np.float32(2.5), (1, 2)], dtype=object),
        objects_2d=np.array([[torch.ones(2), {"k": [1]}], [np.arange(2), b"b"]], dtype=object),
        shared_a=shared,
        shared_b=shared,
        large=np.arange(4000, dtype=np.float64),  # > 1000 bytes: numpy keeps the bytes
    )
    scalars = {
        "f8": np.float64(0.25), "f4": np.float32(-1.5), "f2": np.float16(2.0),
        "g": np.longdouble(1) / 3, "i8": np.int64(-7), "u1": np.uint8(200), "b": np.bool_(True),
        "c16": np.complex128(1 + 2j), "str": np.str_("héllo"), "bytes": np.bytes_(b"ab\x00"),
        "i4": np.int32(5), "u8": np.uint64(2**63 + 1),
    }
    return {"arrays": arrays, "scalars": scalars, "dtypes": [np.dtype("f8"), np.dtype(">i2")]}


def test_numpy_arrays_scalars_and_dtypes(tmp_path):
    path = tmp_path / "np.pth"
    torch.save({"state_dict": {"w": torch.ones(2)}, "meta": _numpy_objects()}, path)
    theirs = torch.load(path, weights_only=False)
    for mmap in (True, False):
        ours = ckptio.load(path, allow="openmmlab", mmap=mmap)
        assert_same(ours, theirs)
        arrays, ta = ours["meta"]["arrays"], theirs["meta"]["arrays"]
        for k in ta:
            assert arrays[k].dtype.str == ta[k].dtype.str, k
            assert arrays[k].flags.f_contiguous == ta[k].flags.f_contiguous, k
        # one object in the pickle stays one object
        assert arrays["shared_a"] is arrays["shared_b"]
        for k, v in theirs["meta"]["scalars"].items():
            got = ours["meta"]["scalars"][k]
            assert type(got) is type(v) and got.dtype.str == v.dtype.str and got == v, k
        assert [d.str for d in ours["meta"]["dtypes"]] == ["<f8", ">i2"]


def test_numpy_1x_files_from_debian_python(tmp_path):
    """numpy 1.24 (numpy.core.* spellings) and torch 1.13 as the writer, with
    an mmengine-shaped HistoryBuffer pickled by a stand-in class of the same
    module and qualified name."""
    old = "/usr/bin/python3"
    probe = subprocess.run([old, "-c", "import torch, numpy"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("Debian's python3-torch / python3-numpy not installed")
    stub = tmp_path / "stub" / "mmengine" / "logging"
    stub.mkdir(parents=True)
    (stub.parent / "__init__.py").write_text("")
    (stub / "__init__.py").write_text("")
    (stub / "history_buffer.py").write_text(textwrap.dedent("""
        import numpy as np

        class HistoryBuffer:
            _statistics_methods = dict()

            def __init__(self, log_history=(), count_history=(), max_length=1000000):
                self.max_length = max_length
                self._set_default_statistics()
                self._log_history = np.array(log_history)
                self._count_history = np.array(count_history)

            def _set_default_statistics(self):
                self._statistics_methods.setdefault('min', HistoryBuffer.min)
                self._statistics_methods.setdefault('max', HistoryBuffer.max)
                self._statistics_methods.setdefault('current', HistoryBuffer.current)
                self._statistics_methods.setdefault('mean', HistoryBuffer.mean)

            def min(self): return self._log_history.min()
            def max(self): return self._log_history.max()
            def current(self): return self._log_history[-1]
            def mean(self): return self._log_history.sum() / self._count_history.sum()

            def __getstate__(self):
                self.__dict__.update(statistics_methods=self._statistics_methods)
                return self.__dict__
    """))
    path = tmp_path / "np1.pth"
    script = textwrap.dedent(f"""
        import sys, collections
        sys.path.insert(0, {str(tmp_path / "stub")!r})
        import numpy as np, torch
        from mmengine.logging.history_buffer import HistoryBuffer
        assert np.__version__.startswith("1.")
        obj = {{
            "state_dict": collections.OrderedDict(w=torch.arange(4.0)),
            "message_hub": {{"log_scalars": collections.OrderedDict(
                loss=HistoryBuffer([0.5, 0.25, 0.125], [1, 1, 1]),
                lr=HistoryBuffer([0.1, 0.1], [1, 1]))}},
            "meta": {{"best": np.float64(0.75), "acc": np.float32(0.5), "n": np.int64(3),
                      "a": np.arange(6, dtype=np.float32).reshape(2, 3),
                      "be": np.arange(3, dtype=">i4"), "t": np.array(["x", "yz"]),
                      "o": np.array([1, "a", None], dtype=object), "flag": np.bool_(False)}},
        }}
        torch.save(obj, {str(path)!r})
    """)
    subprocess.run([old, "-c", script], check=True, timeout=300)
    names = omm.globals_of(path)
    assert "numpy.core.multiarray._reconstruct" in names and "numpy.core.multiarray.scalar" in names
    theirs = torch.load(path, weights_only=False)
    for mmap in (True, False):
        ours = ck_mmengine._load_checkpoint(str(path)) if mmap else ckptio.load(
            path, allow="openmmlab", mmap=False)
        assert_same(ours, theirs)
        assert _same_history_buffers(ours, theirs) == 2


# ---- legacy files written with pickle protocol 1 ------------------------------------------


def _legacy_objects():
    base = torch.arange(12.0)
    return {
        "state_dict": collections.OrderedDict(
            w=base.view(3, 4), b=torch.ones(2, dtype=torch.int64)
        ),
        "view": base[2:7],
        "meta": {"epoch": 3, "name": "x", "raw": b"\x00\xff", "big": 2**70, "f": 0.1},
    }


def test_legacy_protocol_1_files_load_as_with_torch(tmp_path):
    path = tmp_path / "p1.pth"
    torch.save(_legacy_objects(), path, pickle_protocol=1, _use_new_zipfile_serialization=False)
    assert path.read_bytes()[:1] == b"L"
    theirs = torch.load(path, weights_only=False)  # torch's weights_only refuses protocol 1
    for mmap in (True, False):
        assert_same(ckptio.load(path, mmap=mmap), theirs)
    assert ckptio.verify(path).ok
    assert cli.main(["info", "-q", str(path)]) == 0


def test_legacy_protocol_1_files_from_torch_1_13(tmp_path):
    old = "/usr/bin/python3"
    if subprocess.run([old, "-c", "import torch"], capture_output=True).returncode != 0:
        pytest.skip("Debian's python3-torch not installed")
    path = tmp_path / "p1.pth"
    script = (
        "import torch, collections\n"
        "base = torch.arange(12.0)\n"
        "obj = {'state_dict': collections.OrderedDict(w=base.view(3, 4), b=torch.ones(2).long()),"
        " 'view': base[2:7], 'meta': {'epoch': 3, 'raw': b'\\x00\\xff'}}\n"
        f"torch.save(obj, {str(path)!r}, pickle_protocol=1, _use_new_zipfile_serialization=False)\n"
    )
    subprocess.run([old, "-c", script], check=True, timeout=300)
    assert path.read_bytes()[:1] == b"L"
    assert_same(ckptio.load(path), torch.load(path, weights_only=False))


# ---- downloads are safe by default ---------------------------------------------------------


def test_load_url_is_safe_by_default(runs, tmp_path):
    import argparse

    from faultserver import FaultServer

    path = runs["mmengine"]["adamw_iter_ema_val"][-1]
    data = open(path, "rb").read()
    with FaultServer(data) as fs:
        got = ckptio.load_url(fs.url("run.pth"), model_dir=str(tmp_path / "a"), progress=False)
        assert_same(got, torch.load(path, weights_only=False))
        got = ck_mmcv.load_checkpoint(
            _Tiny(), fs.url("run2.pth"), map_location="cpu", strict=False
        )
    buf = io.BytesIO()
    torch.save({"cfg": argparse.Namespace(lr=0.1)}, buf)  # a global outside every set
    with FaultServer(buf.getvalue()) as fs:
        with pytest.raises(ckptio.UnpicklingError, match="argparse.Namespace"):
            ckptio.load_url(fs.url("ns.pth"), model_dir=str(tmp_path / "b"), progress=False)
        got = ckptio.load_url(
            fs.url("ns.pth"), model_dir=str(tmp_path / "b"), progress=False, weights_only=False
        )
        assert got["cfg"].lr == 0.1
    evil = os.path.join(os.path.dirname(__file__), "attacks", "global_os_system.pt")
    with FaultServer(open(evil, "rb").read()) as fs:
        cwd = os.getcwd()
        os.chdir(tmp_path)
        try:
            with pytest.raises(ckptio.UnpicklingError):
                ckptio.load_url(fs.url("evil.pth"), model_dir=str(tmp_path / "c"), progress=False)
            with pytest.raises(ckptio.UnpicklingError):
                ck_mmcv.load_checkpoint(_Tiny(), fs.url("evil2.pth"))
        finally:
            os.chdir(cwd)
        assert not (tmp_path / "CKPTIO_PWNED").exists()


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 2)
        self.bn = torch.nn.BatchNorm1d(2)



def test_protocol_4_opcodes_are_read_under_weights_only(tmp_path):
    """The README's claim: ckptio reads opcodes torch's weights-only unpickler
    refuses (FRAME, SHORT_BINUNICODE, MEMOIZE, ...); the allowlist still gates
    every global."""
    path = tmp_path / "p4.pth"
    obj = {"w": torch.arange(3.0), "meta": {"name": "x", "n": 2**70}}
    torch.save(obj, path, pickle_protocol=4)
    with pytest.raises(Exception, match="Unsupported operand"):
        torch.load(path, weights_only=True)
    assert_same(ckptio.load(path), torch.load(path, weights_only=False))
    evil = tmp_path / "p4_evil.pth"
    torch.save({"x": _Payload()}, evil, pickle_protocol=4)
    with pytest.raises(ckptio.UnpicklingError, match="posix.system|os.system"):
        ckptio.load(evil, allow="openmmlab")


class _Payload:
    def __reduce__(self):
        return os.system, ("touch CKPTIO_PWNED",)

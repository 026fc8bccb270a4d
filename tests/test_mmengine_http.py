"""http(s):// checkpoints through ckptio.mmengine side by side with mmengine
0.10.7 (torch.hub's download) against a local server."""
import os
import sys

import pytest
import torch

mm_ckpt = pytest.importorskip("mmengine.runner.checkpoint")
import ckptio.mmengine as ours  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from faultserver import FaultServer  # noqa: E402
from helpers import Model, fresh, params_equal, run, same_values  # noqa: E402


def test_http_checkpoint_loads_as_mmengine(tmp_path, monkeypatch):
    path = tmp_path / "served.pth"
    torch.save({"meta": {"epoch": 1}, "state_dict": fresh(Model, 22).state_dict()}, str(path))
    outcomes = []
    with FaultServer(path.read_bytes()) as fs:
        for side, mod in (("mmengine", mm_ckpt), ("ckptio", ours)):
            monkeypatch.setenv("TORCH_HOME", str(tmp_path / side))
            model = fresh(Model, 0)
            outcomes.append((run(mod.load_checkpoint, model, fs.url("m.pth"), "cpu"), model))
    (theirs, m1), (mine, m2) = outcomes
    assert theirs[0][0] == mine[0][0] == "ok"
    assert same_values(theirs[0][1], mine[0][1])
    assert params_equal(m1, m2) and params_equal(m2, fresh(Model, 22))
    assert mine[1].replace("ckptio", "mmengine") == theirs[1]

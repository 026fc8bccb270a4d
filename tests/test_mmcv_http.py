"""http(s):// and open-mmlab:// checkpoints end to end, side by side with
mmcv 1.7.2 (torch.hub's download) against a local server: the same printed
lines, the same checkpoint, the same weights, the same cache file."""

import json
import os
import sys

import pytest
import torch

import ckptio.checkpoint as ours

mmcv_ckpt = pytest.importorskip("mmcv.runner.checkpoint")
sys.path.insert(0, os.path.dirname(__file__))
from faultserver import FaultServer  # noqa: E402
from helpers import Model, fresh, params_equal, run, same_values  # noqa: E402


@pytest.fixture
def served(tmp_path):
    path = tmp_path / "served.pth"
    torch.save({"meta": {"epoch": 3}, "state_dict": fresh(Model, 21).state_dict()}, str(path))
    with FaultServer(path.read_bytes()) as fs:
        yield fs


def each_side(monkeypatch, tmp_path, fn, *args, **kwargs):
    """Runs mmcv's and ckptio's fn with a torch hub directory of their own;
    returns both outcomes and both hub directories."""
    out = []
    for side, mod in (("mmcv", mmcv_ckpt), ("ckptio", ours)):
        home = tmp_path / side
        monkeypatch.setenv("TORCH_HOME", str(home))
        monkeypatch.setenv("MMCV_HOME", str(home / "mmcv"))
        model = fresh(Model, 0)
        result = run(getattr(mod, fn), model, *args, **kwargs)
        out.append((result, model, home))
    return out


def test_http_checkpoint_downloads_caches_and_loads(served, tmp_path, monkeypatch):
    url = served.url("resnet-1234abcd.pth")
    (theirs, m1, h1), (mine, m2, h2) = each_side(
        monkeypatch, tmp_path, "load_checkpoint", url, map_location="cpu"
    )
    assert theirs[0][0] == mine[0][0] == "ok"
    assert same_values(theirs[0][1], mine[0][1])
    assert params_equal(m1, m2) and params_equal(m2, fresh(Model, 21))
    printed = [line.replace(str(h2), str(h1)) for line in mine[1].splitlines()]
    assert printed == theirs[1].splitlines()
    cached = ("hub", "checkpoints", "resnet-1234abcd.pth")
    assert (h1.joinpath(*cached)).read_bytes() == (h2.joinpath(*cached)).read_bytes()
    # a second load comes from the cache: nothing more is fetched
    requests = len(served.log)
    (theirs, _, _), (mine, _, _) = each_side(monkeypatch, tmp_path, "load_checkpoint", url)
    assert len(served.log) == requests
    assert "Downloading" not in mine[1] and "Downloading" not in theirs[1]


def test_open_mmlab_name_through_mmcv_home(served, tmp_path, monkeypatch):
    for side in ("mmcv", "ckptio"):
        (tmp_path / side / "mmcv").mkdir(parents=True)
        table = {"ckptio_net": served.url("net.pth")}
        (tmp_path / side / "mmcv" / "open_mmlab.json").write_text(json.dumps(table))
    (theirs, m1, _), (mine, m2, _) = each_side(
        monkeypatch, tmp_path, "load_checkpoint", "open-mmlab://ckptio_net", logger="silent"
    )
    assert theirs[0][0] == mine[0][0] == "ok"
    assert same_values(theirs[0][1], mine[0][1])
    assert params_equal(m1, m2) and params_equal(m2, fresh(Model, 21))


def test_http_error_fails_on_both_sides(served, tmp_path, monkeypatch):
    served.default = "404"
    (theirs, _, h1), (mine, _, h2) = each_side(
        monkeypatch, tmp_path, "load_checkpoint", served.url("gone.pth")
    )
    assert theirs[0][0] == mine[0][0] == "raised"
    assert isinstance(mine[0][1], OSError) and "404" in str(mine[0][1])
    assert not (h2 / "hub" / "checkpoints" / "gone.pth").exists()

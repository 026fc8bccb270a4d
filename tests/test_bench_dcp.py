"""The dcp and async benchmark sections run their children on a small
checkpoint and render every row they measured."""
import os

import torch

from ckptio.bench import asyncsave as bench_async
from ckptio.bench import dcp as bench_dcp


def small_checkpoint(tmp_path):
    path = tmp_path / "small.pth"
    obj = {"state_dict": {f"w{i}": torch.randn(128, 64) for i in range(6)},
           "optimizer": {"state": {0: {"momentum_buffer": torch.zeros(128, 64)}},
                         "param_groups": [{"lr": 0.1, "params": [0]}]},
           "meta": {"epoch": 1}}
    torch.save(obj, path)
    return str(path), 7 * 128 * 64 * 4


def test_dcp_section(tmp_path):
    path, data = small_checkpoint(tmp_path)
    rows = ["ckptio StorageWriter(sync_files=False)", "FileSystemReader", "ckptio StorageReader",
            "ckptio.load(dir)"]
    result = bench_dcp.measure(path, 1, rows=rows, sync=False)
    assert list(result["rows"]) == rows
    for name, r in result["rows"].items():
        assert r["time"] > 0 and r["data_bytes"] == data, name
    text = bench_dcp.render(result)
    for name in result["rows"]:
        assert name in text
    assert "ckptio's reader vs FileSystemReader" in text
    assert sorted(os.listdir(tmp_path)) == ["small.pth"]  # the directories are removed


def test_async_section(tmp_path):
    path, data = small_checkpoint(tmp_path)
    result = bench_async.measure(path, 1, rows=["memcpy", "async_save"], sync=False)
    assert list(result["rows"]) == ["memcpy", "async_save"]
    r = result["rows"]["async_save"]
    assert r["data_bytes"] == data and 0 < r["time"] <= r["written"] and r["first"] > 0
    text = bench_async.render(result)
    assert "async_save stall / one memcpy" in text
    assert sorted(os.listdir(tmp_path)) == ["small.pth"]

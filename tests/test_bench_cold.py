"""The bench's cold section (ckptio/bench/cold.py): its page dropping really
empties the page cache of the file (mincore), and one quick round on a tiny
checkpoint gives every row with bytes read. No timing is asserted."""

import os

import torch

from ckptio.bench import cold


def _checkpoint(directory):
    path = str(directory / "tiny.pth")
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 4))
    torch.save({"state_dict": model.state_dict(), "meta": {"epoch": 1}}, path)
    return path


def test_drop_and_warm_pages(tmp_path):
    path = _checkpoint(tmp_path)
    cold.warm_pages(path)
    assert cold.resident_fraction(path) == 1.0
    assert cold.drop_pages(path) == 0.0
    cold.warm_pages(path)
    assert cold.resident_fraction(path) == 1.0
    (tmp_path / "empty").write_bytes(b"")
    assert cold.resident_fraction(str(tmp_path / "empty")) == 0.0


def test_one_round_gives_every_row(tmp_path):
    path = _checkpoint(tmp_path)
    result = cold.measure(path, 1, ranks=(2,))
    assert list(result["cold"]) == [m for m in cold.COLD if m != "safetensors load_file"]
    assert list(result["warm"]) == list(cold.WARM)
    assert list(result["ranks"]) == [2]
    size = os.path.getsize(path)
    for row in result["cold"].values():
        assert row["resident"] == 0.0 and row["time"] > 0
    # a cold sequential read reads the file from storage (read_bytes counts it)
    seq = result["cold"]["sequential read (limit)"]
    assert seq["read_bytes"] is None or seq["read_bytes"] >= size // 2
    assert len(result["ranks"][2]["times"]) == 1 and result["ranks"][2]["time"] > 0
    for row in result["warm"].values():
        assert row["resident"] == 1.0
    text = cold.render(result)
    for name in list(cold.COLD[:3]) + ["2 ranks at once", "warm end to end", "cold end to end"]:
        assert name in text

"""Hostile input, second round (issue 9), load side: each case against
torch.load on the same bytes where torch reads them, and through every entry
point that decodes a file (ckptio.load, ckptio.verify, `ckptio info`)."""
import io
import os
import pathlib
import subprocess
import sys
import warnings

import pytest
import torch

import ckptio
from helpers import assert_same

ROOT = pathlib.Path(__file__).resolve().parent.parent
ATTACKS = ROOT / "tests" / "attacks"
QUANTIZED = ["QInt8Storage", "QUInt8Storage", "QInt32Storage", "QUInt4x2Storage",
             "QUInt2x4Storage"]


def _cli(*argv):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "ckptio", *map(str, argv)], env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("name", [f"quantized_{s}_{v}.pt" for s in QUANTIZED for v in ("v2", "v3")]
                         + ["quantized_dtype_over_float_v3.pt", "quantized_v1.pt"])
def test_plain_rebuild_over_quantized_storage(name):
    """Was a SIGSEGV (a NULL template tensor) in load, verify and info."""
    path = ATTACKS / name
    with pytest.raises(ckptio.CheckpointError, match=r"quantized dtype torch\.q") as exc:
        ckptio.load(path)
    assert str(path) in str(exc.value)
    # torch.load returns a quantized tensor without a quantizer: any use of it
    # fails with an internal assert; ckptio refuses the file instead
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "quantized ... deprecated", once per process
        broken = torch.load(path)["w"]
    with pytest.raises(RuntimeError, match="INTERNAL ASSERT|quantizer|Quantizer"):
        repr(broken)
    report = ckptio.verify(path)
    assert not report.ok and "quantized" in str(report.problems)


@pytest.mark.parametrize("command", ["info", "verify"])
def test_cli_over_quantized_storage(command):
    """`ckptio info` and `ckptio verify` report the file (exit 1), no crash."""
    path = ATTACKS / ("quantized_QInt8Storage_v2.pt" if command == "info"
                      else "quantized_QInt32Storage_v3.pt")
    proc = _cli(command, path)
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    assert "quantized" in proc.stdout + proc.stderr


def test_real_quantized_tensors_still_load(tmp_path):
    q = torch.quantize_per_tensor(torch.randn(6), 0.1, 3, torch.qint8)
    qc = torch.quantize_per_channel(torch.randn(2, 3), torch.tensor([0.1, 0.2]),
                                    torch.tensor([0, 1]), 0, torch.quint8)
    path = tmp_path / "q.pth"
    torch.save({"q": q, "qc": qc}, path)
    got, want = ckptio.load(path), torch.load(path)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k].int_repr(), want[k].int_repr())
        assert got[k].qscheme() == want[k].qscheme()


def test_storage_record_larger_than_its_storage():
    path = ATTACKS / "storage_record_larger.pt"
    with pytest.raises(RuntimeError, match="does not match expected size"):
        torch.load(path)  # torch.load refuses it (mmap=False, its default)
    for mmap in (True, False):
        with pytest.raises(ckptio.CheckpointError, match="claims 8 bytes but its record holds 16"):
            ckptio.load(path, mmap=mmap)
    assert not ckptio.verify(path).ok


def test_legacy_view_chain_matches_torch():
    """20,000 views, each of the previous one: was a C stack overflow."""
    path = ATTACKS / "legacy_view_chain.pt"
    got, want = ckptio.load(path), torch.load(path)
    assert_same(got["w"], want["w"])
    assert len(got["views"]) == len(want["views"]) == 19_999
    assert type(got["views"][0]) is type(want["views"][0]) is torch.storage.TypedStorage
    assert got["views"][-1].tolist() == want["views"][-1].tolist() == [1.0, 2.0, 3.0, 4.0]


def test_view_of_a_view_is_placed_inside_the_root(tmp_path):
    """A view at an offset inside a view at an offset: the offsets add up."""
    x = torch.arange(16, dtype=torch.float32)
    buf = io.BytesIO()
    torch.save({"a": x[2:14], "b": x[2:14][3:9]}, buf, _use_new_zipfile_serialization=False)
    got, want = ckptio.load(buf.getvalue()), torch.load(io.BytesIO(buf.getvalue()))
    for k in want:
        assert_same(got[k], want[k])


def test_zip_name_collisions_load():
    """100,000 names colliding in FNV-1a's low bits: 29 s before the sorted
    index; the watchdog of test_attacks bounds it, this checks the result."""
    path = ATTACKS / "zip_name_collisions.pt"
    got = ckptio.load(path)
    assert_same(got["w"], torch.load(path)["w"])

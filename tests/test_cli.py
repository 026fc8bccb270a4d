"""The ckptio command line: info, verify, convert (and bench dispatch), exit
codes 0 / 1 / 2, output fit for scripts."""
import collections
import json
import os
import subprocess
import sys
import zipfile

import pytest
import torch

import ckptio
from ckptio import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def ckpt(tmp_path):
    torch.manual_seed(0)
    sd = collections.OrderedDict(
        [
            ("module.conv.weight", torch.randn(4, 3, 3, 3)),
            ("module.conv.bias", torch.zeros(4)),
            ("module.bn.num_batches_tracked", torch.tensor(7)),
            ("module.head.weight", torch.randn(2, 4, dtype=torch.float16)),
        ]
    )
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": sd, "meta": {"epoch": 12, "CLASSES": ("cat", "dog")}}, path)
    return path, sd


def run(*argv):
    return cli.main([str(a) for a in argv])


def test_info_text_and_json(ckpt, capsys):
    path, sd = ckpt
    assert run("info", path) == 0
    out = capsys.readouterr().out
    assert f"{path}: zip format" in out
    assert "tensors: 4" in out and "float32: 2 tensors" in out and "float16: 1 tensors" in out
    assert "state_dict: OrderedDict of 4 items" in out and "epoch: 12" in out
    assert run("info", path, "--json") == 0
    result = json.loads(capsys.readouterr().out)
    assert result["format"] == "zip" and result["tensors"] == 4
    assert result["records"] == len(zipfile.ZipFile(path).namelist())
    assert result["dtypes"]["float32"] == {"tensors": 2, "bytes": (108 + 4) * 4}
    assert result["dtypes"]["int64"] == {"tensors": 1, "bytes": 8}
    assert result["storage_bytes"] == sum(t.numel() * t.element_size() for t in sd.values())
    assert result["meta"] == {"epoch": 12, "CLASSES": ["cat", "dog"]}
    assert set(result["top_level"]) == {"state_dict", "meta"}


def test_info_refuses_unsafe_files_unless_asked(tmp_path, capsys):
    path = tmp_path / "counter.pth"
    torch.save({"c": collections.Counter("aab")}, path)
    assert run("info", path, "-q") == 0  # Counter is allowlisted
    evil = os.path.join(ROOT, "tests", "attacks", "global_os_system.pt")
    assert run("info", evil) == 1
    assert "os.system" in capsys.readouterr().err


def test_verify_exit_codes(ckpt, tmp_path, capsys):
    path, _ = ckpt
    assert run("verify", path) == 0
    assert "ok" in capsys.readouterr().out
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("/data/0"))
    name_len, extra_len = int.from_bytes(data[info.header_offset + 26:][:2], "little"), \
        int.from_bytes(data[info.header_offset + 28:][:2], "little")
    data[info.header_offset + 30 + name_len + extra_len + 5] ^= 0xFF
    bad = tmp_path / "bad.pth"
    bad.write_bytes(bytes(data))
    assert run("verify", "-q", path, bad) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{path}: ok"
    assert lines[1].startswith(f"{bad}: PROBLEM: crc (record {info.filename}")
    assert run("verify", "--json", bad) == 1
    (report,) = json.loads(capsys.readouterr().out)
    assert report["ok"] is False and report["problems"][0]["kind"] == "crc"
    assert report["problems"][0]["record"] == info.filename


def test_convert_to_safetensors_with_revised_keys(ckpt, tmp_path):
    from safetensors.torch import load_file

    path, sd = ckpt
    out = tmp_path / "model.safetensors"
    assert run("convert", "-q", path, out, "--revise-keys", r"^module\.=") == 0
    got = load_file(str(out))
    assert sorted(got) == sorted(k[len("module."):] for k in sd)  # safetensors sorts keys
    for k, v in sd.items():
        assert torch.equal(got[k[len("module."):]], v)
    # and back to torch's zip format, renamed again
    back = tmp_path / "back.pth"
    assert run("convert", "-q", out, back, "--revise-keys", "^=backbone.") == 0
    loaded = torch.load(back)
    assert sorted(loaded) == sorted("backbone." + k[len("module."):] for k in sd)


def test_convert_legacy_to_zip_keeps_everything(tmp_path):
    obj = {"w": torch.arange(6.0).view(2, 3), "v": None, "meta": {"x": [1, 2]}}
    obj["view"] = obj["w"][1]
    src = tmp_path / "old.pth"
    torch.save(obj, src, _use_new_zipfile_serialization=False)
    dst = tmp_path / "new.pth"
    assert run("convert", "-q", src, dst) == 0
    assert zipfile.is_zipfile(dst)
    got = torch.load(dst)
    assert torch.equal(got["w"], obj["w"]) and got["meta"] == obj["meta"] and got["v"] is None
    assert got["view"].untyped_storage().data_ptr() == got["w"].untyped_storage().data_ptr()


def test_convert_revises_nested_state_dict_and_keeps_meta(ckpt, tmp_path):
    path, sd = ckpt
    dst = tmp_path / "renamed.pth"
    assert run("convert", "-q", path, dst, "--revise-keys", r"^module\.=",
               "--revise-keys", r"conv=c") == 0
    got = ckptio.load(dst)
    assert got["meta"]["epoch"] == 12
    assert list(got["state_dict"]) == ["c.weight", "c.bias", "bn.num_batches_tracked",
                                       "head.weight"]


def test_convert_problems_and_usage(ckpt, tmp_path, capsys):
    path, _ = ckpt
    assert run("convert", path, tmp_path / "x.pth", "--revise-keys", "nopattern") == 2
    assert "PATTERN=REPL" in capsys.readouterr().err
    assert run("convert", path, tmp_path / "x.pth", "--revise-keys", "(=x") == 2
    assert run("convert", path, tmp_path / "x.pth", "--revise-keys", r"^module\.(\w+)\..*=\1") == 1
    assert "two keys" in capsys.readouterr().err
    assert not (tmp_path / "x.pth").exists()
    # safetensors holds tensors only
    mixed = tmp_path / "mixed.pth"
    torch.save({"w": torch.ones(2), "epoch": 3}, mixed)
    assert run("convert", mixed, tmp_path / "m.safetensors") == 1
    assert "'epoch' is not a tensor" in capsys.readouterr().err
    assert not (tmp_path / "m.safetensors").exists()
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".ckptio-tmp")]
    assert run("convert", tmp_path / "missing.pth", tmp_path / "y.pth") == 1


def test_usage_errors():
    assert run() == 2
    assert run("frobnicate") == 2
    assert run("info") == 2
    assert run("verify") == 2
    assert run("--help") == 0


def test_bench_dispatch(monkeypatch):
    from ckptio import bench

    seen = []
    monkeypatch.setattr(bench, "main", lambda argv: seen.append(argv) or 0)
    assert run("bench", "--runs", "1") == 0
    assert seen == [["--runs", "1"]]


def test_python_dash_m(ckpt):
    path, _ = ckpt
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-m", "ckptio", "verify", "-q", str(path)],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.strip() == f"{path}: ok"
    proc = subprocess.run([sys.executable, "-m", "ckptio", "info"], capture_output=True,
                          text=True, env=env, cwd=ROOT)
    assert proc.returncode == 2 and "usage" in proc.stderr

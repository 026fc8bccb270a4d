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
# where the ckptio under test lives (the source tree, or site-packages when
# the suite runs against the installed wheel): what subprocesses import
PKG_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(ckptio.__file__)))


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
    assert f"{path}: zip format" in out and "KiB" in out
    n_params = sum(t.numel() for t in sd.values())
    assert f"parameters: {n_params} ({n_params:,}) in 4 tensors" in out
    assert "float32: 2 tensors, 112 parameters, 448 B" in out
    assert "float16: 1 tensors" in out
    assert "keys by prefix (depth 3):" in out
    assert "  state_dict: 121 parameters in 4 tensors" in out
    assert "      conv: 112 parameters in 2 tensors, 448 B" in out
    assert "state_dict: OrderedDict of 4 items" in out and "epoch: 12" in out
    assert run("info", path, "--json") == 0
    result = json.loads(capsys.readouterr().out)
    assert result["format"] == "zip" and result["tensors"] == 4
    assert result["parameters"] == n_params
    assert result["records"] == len(zipfile.ZipFile(path).namelist())
    assert result["dtypes"]["float32"] == {"tensors": 2, "parameters": 112, "bytes": 448}
    assert result["dtypes"]["int64"] == {"tensors": 1, "parameters": 1, "bytes": 8}
    assert result["storage_bytes"] == sum(t.numel() * t.element_size() for t in sd.values())
    assert result["meta"] == {"epoch": 12, "CLASSES": ["cat", "dog"]}
    assert result["top_level"]["state_dict"] == {"type": "OrderedDict", "items": 4}
    conv = result["tree"]["state_dict"]["children"]["module"]["children"]["conv"]
    assert conv["parameters"] == 112 and conv["tensors"] == 2 and conv["bytes"] == 448
    assert conv["children"] == {}  # depth 3
    assert run("info", path, "--json", "--depth", "4") == 0
    tree = json.loads(capsys.readouterr().out)["tree"]
    conv = tree["state_dict"]["children"]["module"]["children"]["conv"]
    assert conv["children"]["weight"] == {"tensors": 1, "parameters": 108, "bytes": 432,
                                          "children": {}}


def test_info_matches_torch_on_shared_views_and_params(tmp_path, capsys):
    w = torch.randn(6, 4)
    obj = {"w": torch.nn.Parameter(w), "view": w[2:], "h": torch.ones(3, dtype=torch.bfloat16),
           "n": [torch.zeros(2, 2), (torch.arange(5),)]}
    path = tmp_path / "v.pth"
    torch.save(obj, path)
    assert run("info", path, "--json") == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tensors"] == 5
    assert result["parameters"] == 24 + 16 + 3 + 4 + 5
    assert result["storages"] == 4  # w and its view share one
    assert result["top_level"]["w"] == {"type": "Parameter", "dtype": "float32", "shape": [6, 4]}
    assert result["top_level"]["view"]["shape"] == [4, 4]


def test_info_legacy_file(tmp_path, capsys):
    path = tmp_path / "old.pth"
    torch.save({"a": torch.ones(2, 3)}, path, _use_new_zipfile_serialization=False)
    assert run("info", path, "--json") == 0
    result = json.loads(capsys.readouterr().out)
    assert result["format"] == "legacy" and result["parameters"] == 6


def test_info_refuses_unsafe_files_unless_asked(tmp_path, capsys):
    path = tmp_path / "counter.pth"
    torch.save({"c": collections.Counter("aab")}, path)
    assert run("info", path, "-q") == 0  # Counter is allowlisted
    evil = os.path.join(ROOT, "tests", "attacks", "global_os_system.pt")
    assert run("info", evil) == 1
    assert "os.system" in capsys.readouterr().err
    # --unsafe describes it, still without running anything (info never calls)
    assert run("info", evil, "--unsafe") == 0
    assert "os.system" in capsys.readouterr().out


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
    env = dict(os.environ, PYTHONPATH=PKG_ROOT)
    proc = subprocess.run([sys.executable, "-m", "ckptio", "verify", "-q", str(path)],
                          capture_output=True, text=True, env=env, cwd=str(path.parent))
    assert proc.returncode == 0 and proc.stdout.strip() == f"{path}: ok"
    proc = subprocess.run([sys.executable, "-m", "ckptio", "info"], capture_output=True,
                          text=True, env=env, cwd=str(path.parent))
    assert proc.returncode == 2 and "usage" in proc.stderr


# ---- hostile names, pipes, several files, no torch -------------------------


ESCAPES = ["\x1b]0;pwned\x07", "\x1b[2J", "\x9b31m", "a\rb", "\u202eevil", "x\x00y", "\x08"]


def test_control_characters_from_a_file_never_reach_the_terminal(tmp_path):
    """Keys, meta and a file name chosen by an attacker: every control
    character (ESC, CSI, BEL, CR, NUL, bidi override) is printed escaped."""
    name = tmp_path / "evil\x1b[31m.pth"
    sd = collections.OrderedDict((f"layer{e}.weight", torch.ones(1)) for e in ESCAPES)
    torch.save({"state_dict": sd, "meta": {"note\x1b[5m": "\x1b]8;;http://x\x07link",
                                           "x": ESCAPES}}, name)
    for argv in (["info", name], ["info", name, "--depth", "1"], ["verify", name],
                 ["verify", "-q", name, tmp_path / "missing\x1b[0m.pth"]):
        proc = subprocess.run([sys.executable, "-m", "ckptio", *map(str, argv)],
                              capture_output=True, text=True, cwd=str(tmp_path),
                              env=dict(os.environ, PYTHONPATH=PKG_ROOT))
        for stream in (proc.stdout, proc.stderr):
            assert "\x1b" not in stream and "\x9b" not in stream and "\x07" not in stream
            assert "\r" not in stream and "\x00" not in stream and "\u202e" not in stream
            assert "\x08" not in stream
        assert "\\x1b" in proc.stdout + proc.stderr
    assert cli._clean("ok name") == "ok name"
    assert cli._clean("a\x1bb\u202e") == "a\\x1bb\\u202e"


def test_verify_reports_every_file_even_when_one_is_missing(ckpt, tmp_path, capsys):
    path, _ = ckpt
    missing = tmp_path / "missing.pth"
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint at all")
    assert run("verify", "-q", path, missing, junk, path) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{path}: ok" and lines[3] == f"{path}: ok"
    assert lines[1].startswith(f"{missing}: PROBLEM: io") and "No such file" in lines[1]
    assert lines[2].startswith(f"{junk}: PROBLEM")
    assert run("verify", "--json", path, missing, path) == 1
    reports = json.loads(capsys.readouterr().out)
    assert [r["ok"] for r in reports] == [True, False, True]
    assert reports[1]["problems"][0]["kind"] == "io"


def test_piping_into_head_prints_no_traceback(tmp_path):
    sd = collections.OrderedDict((f"block{i}.layer{j}.weight", torch.ones(1))
                                 for i in range(300) for j in range(4))
    path = tmp_path / "many.pth"
    torch.save(sd, path)
    for cmd in ("info", "verify"):
        proc = subprocess.run(
            f"{sys.executable} -m ckptio {cmd} {path} {'--depth 3 --max-keys 100000' if cmd == 'info' else path} | head -n 1",
            shell=True, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=PKG_ROOT))
        assert proc.stdout.count("\n") == 1
        assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr


NO_TORCH = "import sys; sys.modules['torch'] = None; sys.argv[0] = 'ckptio'; "


def run_without_torch(*argv):
    code = NO_TORCH + "from ckptio.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *map(str, argv)], capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=PKG_ROOT))


def test_info_and_verify_without_torch(ckpt, tmp_path):
    path, _ = ckpt
    proc = run_without_torch("info", path, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["parameters"] == 121
    proc = run_without_torch("verify", path)
    assert proc.returncode == 0 and "ok" in proc.stdout
    assert "shapes and strides were not" in proc.stdout
    # damage is still found without torch
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        rec = next(i for i in z.infolist() if i.filename.endswith("/data/0"))
    start = data.index(b"PK\x03\x04", rec.header_offset)
    name_len = int.from_bytes(data[start + 26:start + 28], "little")
    extra_len = int.from_bytes(data[start + 28:start + 30], "little")
    data[start + 30 + name_len + extra_len + 3] ^= 0xFF
    bad = tmp_path / "bad.pth"
    bad.write_bytes(bytes(data))
    assert run_without_torch("verify", "-q", bad).returncode == 1
    # what needs torch says so
    proc = run_without_torch("convert", path, tmp_path / "out.pth")
    assert proc.returncode == 1 and "needs torch, which is not installed" in proc.stderr


def test_help_and_version_import_neither_torch_nor_numpy():
    code = ("import sys; sys.argv[0] = 'ckptio'; from ckptio.cli import main\n"
            "for a in (['--help'], ['--version'], ['info', '--help']):\n"
            "    try:\n        main(a)\n    except SystemExit:\n        pass\n"
            "bad = [m for m in ('torch', 'numpy', 'ckptio._native') if m in sys.modules]\n"
            "print('LOADED', bad)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=PKG_ROOT))
    assert "LOADED []" in proc.stdout, proc.stdout + proc.stderr
    assert ckptio.__version__ in proc.stdout


def test_import_ckptio_is_light():
    code = ("import sys, ckptio; assert 'torch' not in sys.modules; "
            "ckptio.verify; ckptio.load; ckptio.save; assert 'torch' not in sys.modules; "
            "print(sorted(ckptio.__all__) == sorted(n for n in dir(ckptio) if n in ckptio.__all__))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=PKG_ROOT))
    assert proc.stdout.strip() == "True", proc.stderr

"""The load benchmark runs every method in its child process and renders the
table; the section runner dispatches to each section's module."""
import os
import pytest
import torch

from ckptio.bench import harness as bench
from ckptio.bench import load as bench_load


def small_checkpoint(tmp_path, n):
    """A checkpoint of n small tensors (for the per-tensor rows)."""
    path = tmp_path / "small.pth"
    torch.save(bench.make_checkpoint(bench.small_spec(n), with_meta=False), path)
    return str(path)


def test_load_section_measures_and_renders_every_row(tmp_path):
    spec = [("backbone.w", (64, 32)), ("backbone.b", (64,)), ("head.w", (10, 64))]
    big = tmp_path / "big.pth"
    torch.save(bench.make_checkpoint(spec), big)
    result = bench_load.measure(str(big), 1, small_path=small_checkpoint(tmp_path, 40))
    assert list(result["rows"]) == bench_load.LOAD_ROWS
    for name, r in result["rows"].items():
        assert r["time"] > 0 and r["first"] > 0, name
        assert r["peak_extra"] >= 0 and r["anon_extra"] >= 0, name
    assert set(result["small"]["rows"]) == {"torch.load", "torch.load(mmap)", "ckptio.load"}
    text = bench_load.render(result)
    for name in bench_load.LOAD_ROWS:
        assert name in text
    assert "ckptio.load vs torch.load" in text and "us/tensor" in text


def test_unknown_section_is_a_usage_error(capsys, tmp_path):
    """argparse's usage error (exit 2, the section named), before any file
    is generated or measured."""
    with pytest.raises(SystemExit) as exc:
        bench.main(["--only", "load,nope", "--dir", str(tmp_path / "data")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "unknown section(s) nope" in err and "choose from load, save" in err
    assert not (tmp_path / "data").exists()


def test_load_section_on_a_plain_state_dict(tmp_path):
    """ckptio bench FILE where FILE is torch.save(model.state_dict()), no
    "state_dict" key and no meta (the end-to-end rows build the model from
    its keys)."""
    spec = bench.small_spec(12)
    plain = tmp_path / "plain.pth"
    ckpt = bench.make_checkpoint(spec, with_meta=False)
    torch.save(dict(ckpt["state_dict"]), plain)
    result = bench_load.measure(str(plain), 1, small_path=small_checkpoint(tmp_path, 20))
    assert list(result["rows"]) == bench_load.LOAD_ROWS
    assert all(r["time"] > 0 for r in result["rows"].values())


def test_http_section_finds_the_fault_server():
    # the section starts tests/faultserver.py from the source tree; a moved
    # module once pointed at ckptio/tests/ and `make demo` stopped there
    from ckptio.bench import http as bench_http

    assert os.path.isfile(bench_http._FAULTSERVER), bench_http._FAULTSERVER

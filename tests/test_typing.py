"""py.typed and the stubs: mypy sees the real signatures of the public API
(the package resolves its names lazily, so without stubs it would see Any)."""
import os
import subprocess
import sys
import textwrap

import pytest

import ckptio

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.dirname(ckptio.__file__)


def test_stub_and_marker_ship_with_the_package():
    assert os.path.exists(os.path.join(PKG, "py.typed"))
    assert os.path.exists(os.path.join(PKG, "__init__.pyi"))


def test_stub_names_what_the_package_exports():
    with open(os.path.join(PKG, "__init__.pyi")) as f:
        stub = f.read()
    for name in ckptio.__all__:
        assert f"def {name}(" in stub or f"class {name}" in stub, name


def test_mypy_sees_real_signatures(tmp_path):
    pytest.importorskip("mypy")
    src = tmp_path / "use.py"
    src.write_text(textwrap.dedent("""\
        import ckptio
        reveal_type(ckptio.load)
        sd = ckptio.load("x.pth", map_location="cpu", weights_only=True)
        ckptio.load("x.pth", bogus=1)
        ckptio.save({}, "x.pth", _zip64_threshold=1)
        reveal_type(ckptio.verify("x.pth").ok)
        """))
    env = dict(os.environ)
    if os.path.commonpath([PKG, ROOT]) == ROOT:  # the in-place build: not installed
        env["MYPYPATH"] = ROOT
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "cache"),
         "--no-error-summary", "--python-executable", sys.executable, str(src)],
        capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=600)
    out = proc.stdout
    assert 'Revealed type is "def (f: ' in out and "weights_only: bool | None" in out, out
    assert 'Unexpected keyword argument "bogus" for "load"' in out
    assert 'Unexpected keyword argument "_zip64_threshold" for "save"' in out
    assert 'Revealed type is "bool"' in out
    assert out.count("error:") == 2, out

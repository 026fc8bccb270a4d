"""Hostile checkpoints (tests/attacks/, written by tests/attacks/make_attacks.py):
each ends in the exception MANIFEST.json names (ckptio.CheckpointError or its
subclass ckptio.UnpicklingError) or, for the few valid-but-extreme pickles,
loads; never a crash, never code run (the payloads would create
CKPTIO_PWNED in the current directory), never an allocation beyond a small
multiple of the file. Allocations are measured with tracemalloc, which
also sees the loader's C buffers (Mappings report them to it)."""
import faulthandler
import json
import pathlib
import re
import tracemalloc

import pytest

import ckptio
from ckptio._config import ensure_configured

# torch is imported by the first load (import ckptio does not import it):
# import it here, so that no test's measurement counts torch's own import
ensure_configured()

try:  # imported once here, so that its import is not counted against a file
    import mmengine.logging.history_buffer  # noqa: F401
except ImportError:
    pass

import torch

HERE = pathlib.Path(__file__).parent / "attacks"
MANIFEST = json.loads((HERE / "MANIFEST.json").read_text())
SENTINEL = "CKPTIO_PWNED"

# Python objects cost some tens of bytes per pickle byte (a one-byte EMPTY_LIST
# opcode makes a 56-byte list and a stack slot); nothing may cost more.
RATIO = 64
FLOOR = 4 << 20


# Under torch 1.x (Debian's 1.13, CI's packaging run) the allowlist and torch's
# namespace are 1.x's: a file naming a torch-2 global (bytearray,
# _rebuild_tensor_v3, _rebuild_qtensor, ...) or mmengine (not installed there)
# is refused at that GLOBAL, before the check its case is about. That is
# still a clean refusal that runs nothing and stays within the memory bound
# (both asserted first); only the expected message differs.
OLD_TORCH = int(torch.__version__.split(".")[0]) < 2
_OLD_REFUSAL = re.compile(r"refused GLOBAL \S+: it is not an allowed global|cannot be imported")


def _refused_first_by_old_torch(error):
    if not OLD_TORCH or error is None:
        return False
    if isinstance(error, ckptio.CheckpointError):
        return bool(_OLD_REFUSAL.search(str(error)))
    # weights_only=False: the global is looked up as pickle does (torch 1.13's
    # own torch.load raises the same AttributeError)
    return isinstance(error, AttributeError) and "module 'torch" in str(error)


def _load_measured(path, **kwargs):
    tracemalloc.start()
    faulthandler.dump_traceback_later(120, exit=True)  # a hang is a failure, not a stuck run
    try:
        try:
            result, error = ckptio.load(path, **kwargs), None
        except Exception as exc:  # noqa: BLE001 - checked by the caller
            result, error = None, exc
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        faulthandler.cancel_dump_traceback_later()
        tracemalloc.stop()
    return result, error, peak


def test_manifest_matches_files():
    files = {p.name for p in HERE.glob("*.pt")}
    assert files == set(MANIFEST)
    assert len(files) >= 100


@pytest.mark.parametrize("name", sorted(MANIFEST))
@pytest.mark.parametrize("mmap", [True, False], ids=["mmap", "read"])
def test_attack(name, mmap, tmp_path, monkeypatch):
    meta = MANIFEST[name]
    path = HERE / name
    monkeypatch.chdir(tmp_path)
    result, error, peak = _load_measured(path, mmap=mmap, allow=meta.get("allow"))
    assert not (tmp_path / SENTINEL).exists(), "the payload ran"
    size = path.stat().st_size
    assert peak <= RATIO * size + FLOOR, f"{name}: {peak} bytes allocated for a {size}-byte file"
    want = meta["error"]
    if _refused_first_by_old_torch(error):
        return
    if want == "ok":
        assert error is None, f"{name} should load: {error!r}"
        return
    assert error is not None, f"{name} loaded: {type(result).__name__}"
    cls = ckptio.UnpicklingError if want == "UnpicklingError" else ckptio.CheckpointError
    assert isinstance(error, cls), f"{name}: {type(error).__name__}: {error}"
    msg = str(error)
    assert str(path) in msg, f"{name}: the message does not name the file: {msg}"
    if meta["match"]:
        assert re.search(meta["match"], msg), f"{name}: {msg!r} lacks {meta['match']!r}"


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_attack_with_and_without_the_openmmlab_set(name, tmp_path, monkeypatch):
    """The data set only adds data decoding: every hostile file ends the same
    way with allow='openmmlab' as without it (and the set's own cases are
    refused without it too, at their GLOBAL), never running its payload."""
    meta = MANIFEST[name]
    path = HERE / name
    monkeypatch.chdir(tmp_path)
    other = None if meta.get("allow") else "openmmlab"
    result, error, peak = _load_measured(path, allow=other)
    assert not (tmp_path / SENTINEL).exists(), "the payload ran"
    size = path.stat().st_size
    assert peak <= RATIO * size + FLOOR, f"{name}: {peak} bytes allocated for a {size}-byte file"
    if _refused_first_by_old_torch(error):
        return
    if meta["error"] == "ok" and other == "openmmlab":
        assert error is None, f"{name} should load with the set too: {error!r}"
        return
    if meta["error"] == "ok":
        assert isinstance(error, ckptio.UnpicklingError), f"{name}: {error!r}"
        return
    assert error is not None, f"{name} loaded with allow={other!r}"
    cls = ckptio.UnpicklingError if meta["error"] == "UnpicklingError" else ckptio.CheckpointError
    assert isinstance(error, cls), f"{name}: {type(error).__name__}: {error}"


TRUSTED_TOO = sorted(n for n, m in MANIFEST.items() if m["trusted_too"])


@pytest.mark.parametrize("name", TRUSTED_TOO)
def test_structural_attack_refused_when_trusted(name, tmp_path, monkeypatch):
    """The container, storage and pickle-machine checks do not depend on the
    allowlist: weights_only=False refuses these files the same way."""
    meta = MANIFEST[name]
    path = HERE / name
    monkeypatch.chdir(tmp_path)
    result, error, peak = _load_measured(path, weights_only=False)
    assert not (tmp_path / SENTINEL).exists()
    size = path.stat().st_size
    assert peak <= RATIO * size + (64 << 20) + FLOOR, f"{name}: {peak} bytes"
    if _refused_first_by_old_torch(error):
        return
    if meta["error"] == "ok":
        assert error is None, f"{name}: {error!r}"
        return
    assert isinstance(error, ckptio.CheckpointError), f"{name}: {type(error).__name__}: {error}"
    if meta["match"]:
        assert re.search(meta["match"], str(error)), f"{name}: {error}"


def test_trusted_selection_is_broad():
    assert len(TRUSTED_TOO) >= 60


def test_tar_format_named():
    with pytest.raises(ckptio.CheckpointError, match="tar format"):
        ckptio.load(HERE / "tar_format.pt")


def test_inflation_budget_is_tighter_for_untrusted_files():
    # within the 64 MiB a trusted (weights_only=False) load may inflate, over
    # the 16x-the-file (at least 1 MiB) of a weights_only load
    path = HERE / "zip_deflate_small_bomb.pt"
    assert path.stat().st_size < (64 << 10)
    with pytest.raises(ckptio.CheckpointError, match="inflate"):
        ckptio.load(path)
    got = ckptio.load(path, weights_only=False)
    assert got["w"].numel() == 2 << 20 and not got["w"].any()

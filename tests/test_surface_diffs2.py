"""Side by side with mmcv 1.7.2, mmengine 0.10.7 and torch (issue 11, the
surface differences left after tests/test_registry.py and friends): torch's
"Detected pickle protocol N" warning, and save_checkpoint's OSError for a
directory target, a '~/' path and a dangling symlink."""

import io
import os
import warnings

import pytest
import torch

import ckptio
import ckptio.checkpoint as ours
import ckptio.serialization as ser

mmcv_ckpt = pytest.importorskip("mmcv.runner.checkpoint")
mm_ckpt = pytest.importorskip("mmengine.runner.checkpoint")
import ckptio.mmengine as ours_mm  # noqa: E402

PROTO = "Detected pickle protocol"


def _protocol_warnings(fn):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        result = fn()
    return result, [(w.category, str(w.message)) for w in seen if PROTO in str(w.message)]


def _saved(proto, zip_=True):
    b = io.BytesIO()
    torch.save({"w": torch.arange(6.0).reshape(2, 3), "n": 3}, b, pickle_protocol=proto,
               _use_new_zipfile_serialization=zip_)
    return b.getvalue()


def _torch_load_warnings(data, **kw):
    """torch.load's protocol warnings, also when it then refuses the file
    (torch 2.13's weights_only unpickler refuses protocol 0/1 text opcodes
    and protocol 4's FRAME, which ckptio decodes: a deliberate superset)."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        try:
            result = torch.load(io.BytesIO(data), **kw)
        except Exception:
            result = None
    return result, [(w.category, str(w.message)) for w in seen if PROTO in str(w.message)]


@pytest.mark.parametrize("proto", [1, 2, 3, 4, 5])
def test_protocol_warning_zip_as_torch(proto):
    data = _saved(proto)
    want, w_torch = _torch_load_warnings(data)
    got, w_ours = _protocol_warnings(lambda: ckptio.load(data))
    assert w_ours == w_torch
    assert torch.equal(got["w"], torch.arange(6.0).reshape(2, 3))
    if want is not None:
        assert torch.equal(got["w"], want["w"])
    if proto in (3, 4, 5):  # this torch (2.13) warns; the text names the protocol
        assert len(w_torch) == 1 and w_torch[0][0] is UserWarning
        assert w_torch[0][1].startswith(f"{PROTO} {proto} in the checkpoint")
    else:
        assert w_torch == []


@pytest.mark.parametrize("proto", [2, 3])
def test_protocol_warning_legacy_once_per_pickle_as_torch(proto):
    data = _saved(proto, zip_=False)
    _, w_torch = _torch_load_warnings(data)
    _, w_ours = _protocol_warnings(lambda: ckptio.load(data))
    assert w_ours == w_torch
    assert len(w_torch) == (5 if proto == 3 else 0)


def test_no_protocol_warning_without_weights_only():
    data = _saved(4)
    _, w_torch = _torch_load_warnings(data, weights_only=False)
    _, w_ours = _protocol_warnings(lambda: ckptio.load(data, weights_only=False))
    assert w_torch == w_ours == []


def test_protocol_warning_only_where_torch_warns(monkeypatch):
    data = _saved(4)
    monkeypatch.setattr(ser, "_protocol_warns", False)  # as under torch 1.13
    _, w_ours = _protocol_warnings(lambda: ckptio.load(data))
    assert w_ours == []


def test_protocol_warning_kept_when_the_pickle_then_fails():
    data = _saved(3)  # a zip; cut data.pkl's STOP: torch warns, then fails
    import zipfile

    src = zipfile.ZipFile(io.BytesIO(data))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            body = src.read(info)
            if info.filename.endswith("/data.pkl"):
                body = body[:-1]
            dst.writestr(info, body)
    bad = out.getvalue()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(Exception):
            torch.load(io.BytesIO(bad))
    with warnings.catch_warnings(record=True) as seen2:
        warnings.simplefilter("always")
        with pytest.raises(ckptio.CheckpointError):
            ckptio.load(bad)
    assert [str(w.message) for w in seen if PROTO in str(w.message)] == [
        str(w.message) for w in seen2 if PROTO in str(w.message)]
    # an "error" filter turns the warning into the error, as in torch
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserWarning, match=PROTO):
            ckptio.load(_saved(4))


def test_protocol_warning_through_the_mmcv_and_mmengine_surfaces(tmp_path):
    path = str(tmp_path / "p4.pth")
    with open(path, "wb") as f:
        f.write(_saved(3))
    for theirs, mine in ((mmcv_ckpt, ours), (mm_ckpt, ours_mm)):
        _, w_theirs = _protocol_warnings(lambda: theirs._load_checkpoint(path))
        _, w_mine = _protocol_warnings(lambda: mine._load_checkpoint(path))
        assert w_mine == w_theirs and len(w_theirs) == 1


def _error(fn, *args):
    try:
        fn(*args)
    except OSError as exc:
        return type(exc), exc.errno, str(exc), exc.filename
    return None


def _targets(tmp_path):
    (tmp_path / "dir").mkdir()
    os.symlink(tmp_path / "nowhere" / "x.pth", tmp_path / "dangle")
    return {
        "directory": str(tmp_path / "dir"),
        "tilde": "~/ckptio-surface-no-such/x.pth",
        "dangling": str(tmp_path / "dangle"),
    }


@pytest.mark.parametrize("which", ["directory", "tilde", "dangling"])
def test_save_checkpoint_errors_as_mmcv_and_mmengine(tmp_path, monkeypatch, which):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))  # mmcv's mkdir_or_exist expands '~'; open does not
    target = _targets(tmp_path)[which]
    model = torch.nn.Linear(2, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = _error(mmcv_ckpt.save_checkpoint, model, target)
        got = _error(ours.save_checkpoint, model, target)
        want_mm = _error(mm_ckpt.save_checkpoint, model.state_dict(), target)
        got_mm = _error(ours_mm.save_checkpoint, model.state_dict(), target)
    assert want is not None and got == want
    assert want_mm is not None and got_mm == want_mm
    assert want[0] is (IsADirectoryError if which == "directory" else FileNotFoundError)
    assert want[3] == target
    assert os.listdir(tmp_path / "dir") == []  # nothing left over

"""The save's pickler: one class made at import, per-save state in a heap
object. Regression for a stack-use-after-return: the per-save Pickler
subclass of earlier versions, reachable through pickle.Pickler.__subclasses__()
after the save, called hooks holding a pointer into the returned save's C
stack frame (make asan runs with detect_stack_use_after_return=1)."""
import gc
import io
import pickle

import pytest
import torch

import ckptio
from ckptio import _native


def ckptio_picklers():
    return [c for c in pickle.Pickler.__subclasses__() if c.__module__.startswith("ckptio")]


def deep_call(n, fn):
    """Calls fn n frames deeper, over the C stack the save's frame had."""
    return deep_call(n - 1, fn) if n else fn()


def test_one_pickler_class_for_every_save(tmp_path):
    for i in range(3):
        ckptio.save({"w": torch.ones(3), "i": i}, tmp_path / "x.pth")
        ckptio.save({"w": torch.ones(3)}, io.BytesIO())
    gc.collect()
    assert ckptio_picklers() == [_native.SavePickler]


def test_pickler_class_reached_after_a_save_is_a_plain_pickler(tmp_path):
    ckptio.save({"w": torch.arange(6), "s": torch.ones(2).untyped_storage()}, tmp_path / "x.pth")
    classes = ckptio_picklers()
    assert classes
    obj = {"w": torch.arange(6), "s": torch.ones(2).untyped_storage(), "t": (1, "a")}

    def dump(kind):
        buf = io.BytesIO()
        kind(buf, 2).dump(obj)
        return buf.getvalue()

    for cls in classes:  # every one reachable (one since the fix), each used over a deeper stack
        assert deep_call(40, lambda: dump(cls)) == dump(pickle.Pickler)


def save_states():
    return [o for o in gc.get_objects() if type(o) is _native.SaveState]


def test_save_state_does_not_outlive_its_save(tmp_path):
    ckptio.save({"w": torch.ones(3)}, tmp_path / "x.pth")
    with pytest.raises((pickle.PicklingError, AttributeError)):
        ckptio.save({"f": lambda: 0, "w": torch.ones(2)}, tmp_path / "y.pth")
    assert save_states() == []
    with pytest.raises(TypeError):
        _native.SaveState()


class GrabsState:
    """Stashes the running save's SaveState while it is pickled."""
    grabbed = []

    def __reduce__(self):
        GrabsState.grabbed.extend(save_states())
        return (int, (7,))


def test_save_state_kept_past_its_save_refuses_to_run(tmp_path):
    GrabsState.grabbed = []
    ckptio.save({"w": torch.ones(3), "g": GrabsState()}, tmp_path / "x.pth")
    (state,) = GrabsState.grabbed
    GrabsState.grabbed = []
    storage = torch.ones(2).untyped_storage()
    for hook in (state.persistent_id, state.reducer_override):
        with pytest.raises(RuntimeError, match="after its save ended"):
            deep_call(40, lambda: hook(storage))
    assert torch.load(tmp_path / "x.pth", weights_only=False)["g"] == 7


SAVE = [None]


class SavesAnother:
    """Runs a second save while the first one pickles it."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        SAVE[0]({"inner": torch.arange(4), "s": torch.ones(3).untyped_storage()}, self.path)
        return (str, ("nested",))


def test_a_save_inside_a_save_keeps_both_apart(tmp_path):
    """Each save has its own state: a save run from a __reduce__ of another
    one gives both files torch.save's bytes."""
    outer = {"w": torch.ones(5), "nested": None, "v": torch.zeros(2)}
    files = {}
    for name, fn in (("torch", torch.save), ("ckptio", ckptio.save)):
        d = tmp_path / name
        d.mkdir()
        SAVE[0] = fn
        outer["nested"] = SavesAnother(d / "inner.pth")
        fn(outer, d / "outer.pth")
        files[name] = ((d / "outer.pth").read_bytes(), (d / "inner.pth").read_bytes())
    assert files["ckptio"] == files["torch"]


def test_native_save_refuses_a_scan_only_configuration(tmp_path):
    """Without torch, ckptio.verify configures the extension with stand-ins
    (None for torch's objects); _native.save called then must refuse, not
    take None for torch's TypedStorage class."""
    import os
    import subprocess
    import sys

    torch.save({"w": torch.ones(2)}, tmp_path / "x.pth")
    code = f"""
import sys
sys.modules["torch"] = None
import ckptio
from ckptio import _native
assert ckptio.verify({str(tmp_path / "x.pth")!r}).ok
for obj in ({{"a": 1}}, [object()]):
    try:
        _native.save(obj, {str(tmp_path / "y.pth")!r}, "y", to_path=True, byteorder="little")
    except RuntimeError as e:
        print("refused:", e)
"""
    root = os.path.dirname(os.path.dirname(os.path.abspath(ckptio.__file__)))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=root), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("refused: ckptio._native.save needs torch") == 2, proc.stdout
    assert not (tmp_path / "y.pth").exists()

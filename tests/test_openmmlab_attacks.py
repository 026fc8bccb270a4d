"""Classic payloads injected anywhere inside real Runner checkpoints are
refused by the default entry points (allow='openmmlab'), and run nothing.

One file of each generator (openmmlab_runs) is loaded with torch.load
(weights_only=False); then, at every place in it (each dict value, list or
tuple item, HistoryBuffer attribute), each payload below replaces what is
there, the object is saved again with torch.save, and ckptio's mmcv or
mmengine _load_checkpoint must raise ckptio.UnpicklingError without the
payload having run (it would create CKPTIO_PWNED in the current directory).
"""
import _codecs
import builtins
import os

import numpy as np
import pytest
import torch

import ckptio
import ckptio.checkpoint as ck_mmcv
import ckptio.mmengine as ck_mmengine
import openmmlab_runs as omm

pytest.importorskip("mmengine")
pytest.importorskip("mmcv.runner")

SENTINEL = "CKPTIO_PWNED"


class OsSystem:
    def __reduce__(self):
        return os.system, (f"touch {SENTINEL}",)


class Exec:
    def __reduce__(self):
        return builtins.exec, (f"open({SENTINEL!r}, 'w').close()",)


class GetattrChain:
    """getattr(HistoryBuffer.__init__, '__globals__'): out of an allowed class."""

    def __reduce__(self):
        from mmengine.logging import HistoryBuffer

        return getattr, (HistoryBuffer.__init__, "__globals__")


class GetattrDunder:
    def __reduce__(self):
        from mmengine.logging import HistoryBuffer

        return getattr, (HistoryBuffer, "__subclasses__")


class Codecs:
    def __reduce__(self):
        return _codecs.encode, ("x", "rot13")


class ReconstructTensor:
    def __reduce__(self):
        return np.ndarray.__reduce__(np.zeros(1))[0], (torch.Tensor, (0,), b"b")


def foreign_statistics():
    """A HistoryBuffer whose statistics_methods holds an allowed but foreign
    callable (torch's own rebuild function)."""
    from mmengine.logging import HistoryBuffer

    hb = HistoryBuffer([0.5], [1])
    state = {
        "max_length": 10,
        "_log_history": np.zeros(1),
        "_count_history": np.ones(1, dtype=np.int64),
        "statistics_methods": {"mean": torch._utils._rebuild_tensor_v2},
    }
    hb.__getstate__ = lambda: state  # pickle asks the instance for its state
    return hb


def object_array():
    return np.array([1, OsSystem()], dtype=object)


PAYLOADS = {
    "os_system": OsSystem,
    "exec": Exec,
    "getattr_chain": GetattrChain,
    "getattr_dunder": GetattrDunder,
    "codecs_rot13": Codecs,
    "reconstruct_tensor": ReconstructTensor,
    "foreign_statistics": foreign_statistics,
    "object_array": object_array,
}


def places(obj, path="ckpt"):
    """(path, get, put) for every place a value sits inside obj."""
    from mmengine.logging import HistoryBuffer

    if isinstance(obj, (dict, list)):
        for k in list(obj) if isinstance(obj, dict) else range(len(obj)):
            where = f"{path}[{k!r}]"
            yield where, (lambda o=obj, k=k: o[k]), (lambda v, o=obj, k=k: o.__setitem__(k, v))
            yield from places(obj[k], where)
    elif isinstance(obj, HistoryBuffer):
        for k in list(vars(obj)):
            yield f"{path}.{k}", (lambda o=obj, k=k: getattr(o, k)), (
                lambda v, o=obj, k=k: setattr(o, k, v))


def _tuple_places(obj, path="ckpt"):
    """Tuples are rebuilt at their parent: (path, get, put) of each item."""
    for where, get, put in list(places(obj, path)):
        value = get()
        if isinstance(value, tuple) and value:
            for i in range(len(value)):
                def put_item(v, get=get, put=put, i=i):
                    t = list(get())
                    t[i] = v
                    put(tuple(t))
                yield f"{where}[{i}]", get, put_item


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return omm.generate(tmp_path_factory)


@pytest.mark.parametrize("gen", ["mmengine", "mmcv"])
@pytest.mark.parametrize("payload", sorted(PAYLOADS))
def test_payload_anywhere_in_a_real_checkpoint(runs, gen, payload, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    source = list(runs[gen].values())[-1][-1]
    obj = torch.load(source, weights_only=False)
    load = ck_mmengine._load_checkpoint if gen == "mmengine" else ck_mmcv._load_checkpoint
    target = tmp_path / "evil.pth"
    spots = list(places(obj)) + list(_tuple_places(obj))
    assert len(spots) > (60 if gen == "mmengine" else 25)
    for where, get, put in spots:
        if payload == "foreign_statistics" and gen == "mmcv" and "state_dict" in where:
            continue  # (keeps the mmcv run short; the type is the same everywhere)
        kept = get()
        put(PAYLOADS[payload]())
        try:
            torch.save(obj, target)
        finally:
            put(kept)
        with pytest.raises(ckptio.UnpicklingError) as err:
            load(str(target))
        assert str(target) in str(err.value), where
        assert not (tmp_path / SENTINEL).exists(), f"{payload} at {where} ran"
    # the untouched object still loads, equal to torch.load
    torch.save(obj, target)
    load(str(target))

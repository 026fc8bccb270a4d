"""map_location=b'cpu' and the TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD warning, side
by side with mmcv's/mmengine's loaders (torch.load underneath)."""

import io
import warnings

import pytest
import torch

import ckptio
import ckptio.checkpoint as ours

mmcv_ckpt = pytest.importorskip("mmcv.runner.checkpoint")


@pytest.fixture
def path(tmp_path):
    p = tmp_path / "x.pth"
    torch.save({"state_dict": {"w": torch.ones(2)}}, p)
    return str(p)


def test_bytes_map_location_is_type_error(path):
    with pytest.raises(TypeError) as theirs:
        mmcv_ckpt._load_checkpoint(path, map_location=b"cpu")
    with pytest.raises(TypeError) as mine:
        ours._load_checkpoint(path, map_location=b"cpu")
    assert str(mine.value) == str(theirs.value)
    # no storage to place: both load
    b = io.BytesIO()
    torch.save({"a": 1}, b)
    assert ckptio.load(b.getvalue(), map_location=b"cpu") == torch.load(
        io.BytesIO(b.getvalue()), map_location=b"cpu") == {"a": 1}


def test_force_no_weights_only_warning_text(path, monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    texts = []
    for load in (torch.load, ckptio.load):
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            load(path)
        texts.append([str(x.message) for x in w if "TORCH_FORCE_NO" in str(x.message)])
    assert texts[0] == texts[1] and len(texts[0]) == 1

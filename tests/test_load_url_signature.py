"""load_url of both surfaces takes torch.hub.load_state_dict_from_url's seven
positional parameters, as mmcv's and mmengine's load_url (torch's) do."""

import inspect

import pytest
import torch

import ckptio.checkpoint as ours

mmcv_utils = pytest.importorskip("mmcv.utils")
mm_dl = pytest.importorskip("mmengine.utils.dl_utils")
import ckptio.mmengine as ours_mm  # noqa: E402


def positional(fn):
    return [
        p.name
        for p in inspect.signature(fn).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]


@pytest.mark.parametrize("theirs, mine", [(mmcv_utils.load_url, ours.load_url),
                                          (mm_dl.load_url, ours_mm.load_url)])
def test_seven_positional_parameters(tmp_path, theirs, mine):
    assert positional(mine) == positional(theirs)
    assert len(positional(mine)) == 7
    model_dir = tmp_path / "hub"
    model_dir.mkdir()
    state = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2, dtype=torch.int64)}
    torch.save(state, model_dir / "cached.pth")
    # cached under file_name: no download; all seven passed by position
    args = ("http://127.0.0.1:9/unused.pth", str(model_dir), "cpu", False, False, "cached.pth", True)
    expected = theirs(*args)
    got = mine(*args)
    assert list(got) == list(expected)
    for k in expected:
        assert torch.equal(got[k], expected[k]) and got[k].dtype == expected[k].dtype
    with pytest.raises(TypeError):
        mine(*args, "extra")
    with pytest.raises(TypeError):
        theirs(*args, "extra")

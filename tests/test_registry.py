"""One registry of URL schemes: what users register with mmcv's or
mmengine's CheckpointLoader (by any reference, patched or not) is what
ckptio's loaders see, and what they register while patched stays with
mmcv's/mmengine's after unpatch(), as with mmcv alone."""

from collections import OrderedDict

import pytest

import ckptio
import ckptio.checkpoint as ours

mmcv_ckpt = pytest.importorskip("mmcv.runner.checkpoint")
import mmcv.runner as mmcv_runner  # noqa: E402

mm_ckpt = pytest.importorskip("mmengine.runner.checkpoint")
import ckptio.mmengine as ours_mm  # noqa: E402


def load_from_regtest(filename, map_location):
    return {"state_dict": {}, "name": filename}


@pytest.fixture
def restore():
    classes = (mmcv_ckpt.CheckpointLoader, mm_ckpt.CheckpointLoader, ours.CheckpointLoader,
               ours_mm.CheckpointLoader)
    saved = [OrderedDict(c._schemes) for c in classes]
    yield
    ckptio.unpatch()
    for c, s in zip(classes, saved):
        c._schemes = s


@pytest.mark.parametrize("theirs, mine", [(mmcv_ckpt, ours), (mm_ckpt, ours_mm)])
def test_registered_with_theirs_unpatched(restore, theirs, mine):
    theirs.CheckpointLoader.register_scheme("regtest://", load_from_regtest)
    expected = theirs._load_checkpoint("regtest://a")
    assert mine._load_checkpoint("regtest://a") == expected
    assert mine.CheckpointLoader.load_checkpoint("regtest://a") == expected
    # a user's loader over a built-in prefix wins in both
    theirs.CheckpointLoader.register_scheme("http://", load_from_regtest, force=True)
    assert mine._load_checkpoint("http://h/x.pth") == theirs._load_checkpoint("http://h/x.pth")


@pytest.mark.parametrize("theirs, mine", [(mmcv_ckpt, ours), (mm_ckpt, ours_mm)])
def test_reference_taken_before_patch(restore, theirs, mine):
    held = theirs.CheckpointLoader  # e.g. ``from mmcv.runner import CheckpointLoader``
    ckptio.patch()
    held.register_scheme("regtest://", load_from_regtest)
    assert theirs._load_checkpoint("regtest://b") == {"state_dict": {}, "name": "regtest://b"}
    assert mine._load_checkpoint("regtest://b") == {"state_dict": {}, "name": "regtest://b"}


@pytest.mark.parametrize("theirs, mine", [(mmcv_ckpt, ours), (mm_ckpt, ours_mm)])
def test_registered_while_patched_survives_unpatch(restore, theirs, mine):
    ckptio.patch()
    assert theirs.CheckpointLoader is mine.CheckpointLoader
    theirs.CheckpointLoader.register_scheme("regtest://", load_from_regtest)
    ckptio.unpatch()
    assert theirs.CheckpointLoader is not mine.CheckpointLoader
    assert theirs._load_checkpoint("regtest://c") == {"state_dict": {}, "name": "regtest://c"}
    assert mine._load_checkpoint("regtest://c") == {"state_dict": {}, "name": "regtest://c"}
    # as with mmcv alone: the prefix is taken
    with pytest.raises(KeyError):
        theirs.CheckpointLoader.register_scheme("regtest://", load_from_regtest)


def test_mmcv_runner_name_too(restore):
    ckptio.patch()
    mmcv_runner.CheckpointLoader.register_scheme("regtest://", load_from_regtest)
    ckptio.unpatch()
    assert mmcv_runner._load_checkpoint("regtest://d")["name"] == "regtest://d"

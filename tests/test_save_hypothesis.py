"""Generated checkpoints (the load suite's strategy: many dtypes and shapes,
views sharing storages, nested containers, scalars): ckptio.save writes the
bytes torch.save writes, to a file object and to a path."""
import io
import os

import torch
from hypothesis import HealthCheck, given, settings

import ckptio
from test_load_hypothesis import checkpoints

EXAMPLES = int(os.environ.get("CKPTIO_HYPOTHESIS_EXAMPLES", 120))


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ckpt=checkpoints())
def test_generated_checkpoints_same_bytes(ckpt):
    theirs, ours = io.BytesIO(), io.BytesIO()
    torch.save(ckpt, theirs)
    ckptio.save(ckpt, ours)
    assert ours.getvalue() == theirs.getvalue()


@settings(max_examples=max(EXAMPLES // 4, 10), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(ckpt=checkpoints())
def test_generated_checkpoints_same_file(tmp_path, ckpt):
    theirs, ours = tmp_path / "t" / "ckpt.pth", tmp_path / "o" / "ckpt.pth"
    theirs.parent.mkdir(exist_ok=True)
    ours.parent.mkdir(exist_ok=True)
    torch.save(ckpt, theirs)
    ckptio.save(ckpt, ours, fsync=False)
    assert ours.read_bytes() == theirs.read_bytes()

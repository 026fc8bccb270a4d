"""StorageReader's gathered byte copies (ckptio/dcp.py _ByteCopies,
_native.copy_buffers): the same tensors as torch's FileSystemReader for
every kind of target, the byte path taken where it applies, and the native
primitives' checks."""

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp

import ckptio.dcp as cd
from ckptio import _native

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def state():
    g = torch.Generator().manual_seed(1)
    return {
        "a": torch.randn(64, 33, generator=g),
        "b": torch.randn(17, generator=g).to(torch.bfloat16),
        "c": torch.arange(90, dtype=torch.int16).reshape(9, 10),
        "d": torch.randn(8, 6, generator=g),
        "e": torch.randn(5, 5, generator=g).double(),
        "f": torch.randn(11, generator=g),
        "g": torch.randn(11, generator=g),
    }


def targets():
    """Zeroed targets of every kind: plain, bf16, transposed (not
    contiguous), another dtype (copy_ converts), tied (two keys, one tensor)."""
    tied = torch.zeros(11)
    return {
        "a": torch.zeros(64, 33),
        "b": torch.zeros(17, dtype=torch.bfloat16),
        "c": torch.zeros(9, 10, dtype=torch.int16),
        "d": torch.zeros(6, 8).t(),
        "e": torch.zeros(5, 5, dtype=torch.float32),
        "f": tied,
        "g": tied,
    }


@pytest.mark.parametrize("writer", [dcp.FileSystemWriter, cd.StorageWriter])
@pytest.mark.parametrize("batch", [None, 1])
def test_byte_copies_equal_torch_reader(tmp_path, monkeypatch, writer, batch):
    dcp.save(state(), storage_writer=writer(str(tmp_path)))
    want = targets()
    dcp.load(want, storage_reader=dcp.FileSystemReader(str(tmp_path)))
    calls = []
    real = _native.copy_buffers

    def counting(jobs, threads=2):
        calls.append((len(jobs), threads))
        return real(jobs, threads)

    monkeypatch.setattr(_native, "copy_buffers", counting)
    if batch is not None:
        monkeypatch.setattr(cd, "_HOST_BATCH_BYTES", batch)  # a flush after every item
    got = targets()
    dcp.load(got, storage_reader=cd.StorageReader(str(tmp_path)))
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].stride() == want[k].stride(), k
        assert torch.equal(got[k], want[k]), k
    assert got["f"] is got["g"]
    # a, b, c, f and g go through the byte path (d is transposed, e converts)
    assert sum(n for n, _ in calls) == 5
    if batch is None:
        # d's torch copy splits the batch; the batch holding the tied pair (one
        # storage written twice) runs in request order on one thread
        assert (2, 1) in calls
    else:
        assert len(calls) >= 5


def test_byte_copies_two_threads_when_targets_are_distinct(tmp_path, monkeypatch):
    sd = {k: v for k, v in state().items() if k != "g"}
    dcp.save(sd, storage_writer=cd.StorageWriter(str(tmp_path)))
    calls = []
    real = _native.copy_buffers
    monkeypatch.setattr(_native, "copy_buffers",
                        lambda jobs, threads=2: (calls.append(threads), real(jobs, threads))[1])
    got = {k: torch.zeros_like(v) for k, v in sd.items()}
    dcp.load(got, storage_reader=cd.StorageReader(str(tmp_path)))
    assert calls == [2]
    for k in sd:
        assert torch.equal(got[k], sd[k]), k


def test_copy_buffers_copies_and_checks():
    src = np.arange(100, dtype=np.uint8)
    dst = np.zeros(100, dtype=np.uint8)
    other = bytearray(7)
    _native.copy_buffers([(src, dst), (b"abcdefg", other)])
    assert (dst == src).all() and bytes(other) == b"abcdefg"
    _native.copy_buffers([], 2)
    with pytest.raises(ValueError, match="job 0 copies 3 bytes into a buffer of 4"):
        _native.copy_buffers([(b"abc", bytearray(4))])
    with pytest.raises(BufferError):
        _native.copy_buffers([(b"abc", b"xyz")])  # a read-only destination
    with pytest.raises(TypeError, match="each job is"):
        _native.copy_buffers([[b"abc", bytearray(3)]])
    with pytest.raises(ValueError, match="not C-contiguous"):
        _native.copy_buffers([(np.arange(10)[::2], bytearray(40))])  # not contiguous
    assert bytes(other) == b"abcdefg"

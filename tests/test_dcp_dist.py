"""ckptio.dcp with real torch.distributed: gloo on 127.0.0.1, 2 and then 4
processes (tests/dcp_dist_worker.py). Each world saves DTensor state dicts
(Shard(0), Shard(1), uneven shards, replicated values, non-tensor values)
with both ckptio's and torch's writer and reads every checkpoint back with
both readers in its own layout and in a resharded one; the 4-process world
also reads the 2-process checkpoints (N ranks save, M ranks load); FSDP2 on
the CPU saves a model and its optimizer through dcp.state_dict with one
implementation and loads them with the other; mmengine-style rank{i}.pth
directories (DTensor and ShardedTensor) are written for the whole-checkpoint
tests below. Then this process, without a process group, reads everything
(M = 1)."""
import os
import socket
import subprocess
import sys
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

import ckptio
import ckptio.dcp as cd

from helpers import assert_same

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from dcp_dist_worker import full_tensors  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_world(world, root):
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "dcp_dist_worker.py"), str(r),
                               str(world), port, str(root)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    outs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        outs.append((p.returncode, out))
    return outs


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    root = tmp_path_factory.mktemp("dcp_dist")
    results = {w: run_world(w, root) for w in (2, 4)}
    return root, results


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_save_and_load_dtensors_and_fsdp2(worlds, world):
    _, results = worlds
    for rank, (code, out) in enumerate(results[world]):
        assert code == 0, f"rank {rank} of {world}:\n{out[-4000:]}"


def zeros():
    full = full_tensors()
    sd = {k: torch.zeros_like(v) for k, v in full.items()}
    sd["step"] = torch.tensor(0)
    sd["meta"] = {"epoch": 0, "name": ""}
    return sd


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("writer", ["ckptio", "torch"])
@pytest.mark.parametrize("reader", ["ckptio", "torch"])
def test_one_process_reads_what_n_ranks_wrote(worlds, world, writer, reader):
    root, results = worlds
    assert all(code == 0 for code, _ in results[world])
    sd = zeros()
    dcp.load(sd, storage_reader={"ckptio": cd.StorageReader, "torch": dcp.FileSystemReader}[
        reader](str(root / f"w{world}" / writer)))
    for k, v in full_tensors().items():
        assert sd[k].dtype == v.dtype and torch.equal(sd[k], v), k
    assert int(sd["step"]) == 7 and sd["meta"] == {"epoch": 3, "name": "dcp-test"}


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("writer", ["ckptio", "torch"])
def test_whole_state_dict_of_a_sharded_checkpoint(worlds, world, writer, tmp_path):
    """ckptio.load(dir) = dcp_to_torch_save + torch.load, for checkpoints
    written by several ranks (chunks assembled), DTensor state and FSDP2."""
    root, results = worlds
    assert all(code == 0 for code, _ in results[world])
    for name in (writer, f"fsdp_{writer}"):
        src = str(root / f"w{world}" / name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp_to_torch_save(src, str(tmp_path / f"{name}.pth"))
        want = torch.load(str(tmp_path / f"{name}.pth"), weights_only=False)
        assert_same(ckptio.load(src, weights_only=False), want)


@pytest.mark.parametrize("world", [2, 4])
def test_rank_file_directories(worlds, world, tmp_path):
    """mmengine FSDPStrategy's rank{i}.pth directories load whole, under
    weights_only: DTensor shards and ShardedTensor shards are assembled."""
    root, results = worlds
    assert all(code == 0 for code, _ in results[world])
    full = full_tensors()
    got = ckptio.load(str(root / f"w{world}" / "ranks_dtensor"))
    assert set(got["state_dict"]) == set(full) and got["meta"] == {"seed": 1}
    for k, v in full.items():
        assert torch.equal(got["state_dict"][k], v), k
    got = ckptio.load(str(root / f"w{world}" / "ranks_sharded"))
    assert torch.equal(got["state_dict"]["a"], full["a"])
    assert torch.equal(got["state_dict"]["_flat_param"], full["r"])
    assert torch.equal(got["state_dict"]["b"], full["b"])
    # and convert to one torch.save file
    out = tmp_path / "whole.pth"
    r = subprocess.run([sys.executable, "-m", "ckptio", "convert",
                        str(root / f"w{world}" / "ranks_sharded"), str(out), "-q"],
                       capture_output=True, text=True, cwd=os.path.dirname(HERE))
    assert r.returncode == 0, r.stderr
    assert torch.equal(torch.load(str(out))["state_dict"]["a"], full["a"])


def test_rank_files_refuse_code(worlds, tmp_path):
    """A rank file naming a global outside the allowlist is refused, as for
    any checkpoint (the ShardedTensor stand-ins allow nothing else)."""
    root, _ = worlds

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    torch.save({"x": Evil()}, str(tmp_path / "rank0.pth"))
    with pytest.raises(ckptio.UnpicklingError, match="system"):
        ckptio.load(str(tmp_path))

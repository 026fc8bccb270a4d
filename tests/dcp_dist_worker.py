"""One rank of the multi-process DCP tests (test_dcp_dist.py starts WORLD of
these): gloo on 127.0.0.1, real torch.distributed.

    python dcp_dist_worker.py RANK WORLD PORT ROOT

Writes under ROOT/w{WORLD}/, reads what an earlier, smaller world wrote
under ROOT/w2/ (resharding), and exits non-zero with the traceback on the
first mismatch.
"""
import os
import sys
import traceback
import warnings

warnings.simplefilter("ignore")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.tensor import Replicate, Shard, distribute_tensor  # noqa: E402

try:  # the build under test (make asan puts its own on PYTHONPATH), else this checkout's
    import ckptio.dcp as cd
except ImportError:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import ckptio.dcp as cd

WRITERS = {"torch": dcp.FileSystemWriter, "ckptio": cd.StorageWriter}
READERS = {"torch": dcp.FileSystemReader, "ckptio": cd.StorageReader}


def full_tensors():
    """The unsharded values every world saves (the same on every rank)."""
    g = torch.Generator().manual_seed(1234)
    return {
        "a": torch.randn(8, 6, generator=g),                      # Shard(0)
        "b": torch.randn(6, 10, generator=g).to(torch.bfloat16),  # Shard(1)
        "c": torch.arange(15, dtype=torch.int64).reshape(5, 3),   # Shard(0), uneven
        "r": torch.randn(4, generator=g),                          # Replicate
    }


PLACEMENTS = {"a": [Shard(0)], "b": [Shard(1)], "c": [Shard(0)], "r": [Replicate()]}
# the layout a checkpoint is read back into: every sharded dim changes
RESHARD = {"a": [Shard(1)], "b": [Shard(0)], "c": [Shard(1)], "r": [Shard(0)]}


def sharded(mesh, layout):
    full = full_tensors()
    sd = {k: distribute_tensor(v, mesh, layout[k]) for k, v in full.items()}
    sd["step"] = torch.tensor(7)
    sd["meta"] = {"epoch": 3, "name": "dcp-test"}
    return sd


def empty_like_sharded(mesh, layout):
    sd = {}
    for k, v in full_tensors().items():
        sd[k] = distribute_tensor(torch.zeros_like(v), mesh, layout[k])
    sd["step"] = torch.tensor(0)
    sd["meta"] = {"epoch": 0, "name": ""}
    return sd


def check(sd, where):
    full = full_tensors()
    for k, v in full.items():
        got = sd[k].full_tensor()
        assert got.dtype == v.dtype and torch.equal(got, v), f"{where}: {k} differs"
    assert int(sd["step"]) == 7, f"{where}: step"
    assert sd["meta"] == {"epoch": 3, "name": "dcp-test"}, f"{where}: meta {sd['meta']}"


def dtensor_phase(rank, world, root, mesh):
    base = os.path.join(root, f"w{world}")
    for writer in WRITERS:
        dcp.save(sharded(mesh, PLACEMENTS), storage_writer=WRITERS[writer](f"{base}/{writer}"))
    dist.barrier()
    sources = [f"{base}/{w}" for w in WRITERS]
    if world > 2:  # N ranks saved, M ranks load
        sources += [os.path.join(root, "w2", w) for w in WRITERS]
    for src in sources:
        for reader in READERS:
            for layout in (PLACEMENTS, RESHARD):
                sd = empty_like_sharded(mesh, layout)
                dcp.load(sd, storage_reader=READERS[reader](src))
                check(sd, f"{reader} reading {src}")


def fsdp_phase(rank, world, root, mesh):
    """FSDP2 on the CPU: model and optimizer through dcp.state_dict, saved by
    one implementation and loaded by the other."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.fsdp import fully_shard

    def build(seed):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(),
                                    torch.nn.Linear(16, 5))
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = torch.optim.AdamW(model.parameters(), lr=0.01)
        return model, opt

    model, opt = build(0)
    g = torch.Generator().manual_seed(rank)
    for _ in range(2):
        model(torch.randn(4, 12, generator=g)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    msd, osd = get_state_dict(model, opt)
    want_m = {k: v.full_tensor().clone() for k, v in msd.items()}
    want_o = {k: {n: (t.full_tensor().clone() if hasattr(t, "full_tensor") else t.clone())
                  for n, t in s.items()} for k, s in osd["state"].items()}
    base = os.path.join(root, f"w{world}", "fsdp")
    for writer in WRITERS:
        dcp.save({"model": msd, "optim": osd}, storage_writer=WRITERS[writer](f"{base}_{writer}"))
    dist.barrier()
    for writer, reader in (("ckptio", "torch"), ("torch", "ckptio")):
        model2, opt2 = build(1)
        m2, o2 = get_state_dict(model2, opt2)
        state = {"model": m2, "optim": o2}
        dcp.load(state, storage_reader=READERS[reader](f"{base}_{writer}"))
        set_state_dict(model2, opt2, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])
        m3, o3 = get_state_dict(model2, opt2)
        for k, v in want_m.items():
            assert torch.equal(m3[k].full_tensor(), v), f"fsdp {writer}->{reader}: {k}"
        for k, st in want_o.items():
            for n, t in st.items():
                got = o3["state"][k][n]
                got = got.full_tensor() if hasattr(got, "full_tensor") else got
                assert torch.equal(got, t), f"fsdp {writer}->{reader}: optim {k}.{n}"
    dist.barrier()


def rank_files_phase(rank, world, root, mesh):
    """mmengine FSDPStrategy's sharded layout: one rank{i}.pth per rank,
    written by mmengine's save_checkpoint, holding DTensors (FSDP2, or FSDP1
    with a device mesh) or ShardedTensors (FSDP1's LOCAL/SHARDED state)."""
    from mmengine.runner.checkpoint import save_checkpoint
    from torch.distributed._shard.metadata import ShardMetadata
    from torch.distributed._shard.sharded_tensor import Shard as STShard
    from torch.distributed._shard.sharded_tensor import init_from_local_shards

    full = full_tensors()
    sd = {k: distribute_tensor(v, mesh, PLACEMENTS[k]) for k, v in full.items()}
    out = os.path.join(root, f"w{world}", "ranks_dtensor")
    os.makedirs(out, exist_ok=True)
    save_checkpoint({"state_dict": sd, "meta": {"seed": 1}}, f"{out}/rank{rank}.pth")

    a = full["a"]
    rows = [len(t) for t in torch.chunk(a, world)] + [0] * world
    start = sum(rows[:rank])
    local = a[start:start + rows[rank]].clone()
    shards = [STShard(local, ShardMetadata([start, 0], [rows[rank], a.shape[1]],
                                           f"rank:{rank}/cpu"))] if rows[rank] else []
    st = init_from_local_shards(shards, list(a.shape))
    flat = full["r"]  # FSDP1's LOCAL_STATE_DICT: one flat 1-D parameter per rank
    n = -(-flat.numel() // world)
    lo, hi = min(rank * n, flat.numel()), min((rank + 1) * n, flat.numel())
    fshards = [STShard(flat[lo:hi].clone(), ShardMetadata([lo], [hi - lo], f"rank:{rank}/cpu"))] \
        if hi > lo else []
    fst = init_from_local_shards(fshards, [flat.numel()])
    out = os.path.join(root, f"w{world}", "ranks_sharded")
    os.makedirs(out, exist_ok=True)
    save_checkpoint({"state_dict": {"a": st, "_flat_param": fst, "b": full["b"]},
                     "meta": {"seed": 1}}, f"{out}/rank{rank}.pth")
    dist.barrier()


def main():
    rank, world, port, root = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        dtensor_phase(rank, world, root, mesh)
        fsdp_phase(rank, world, root, mesh)
        rank_files_phase(rank, world, root, mesh)
        dist.barrier()
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""GPU check, run on a machine with CUDA (see tests/gpu/run_device.sh).

ckptio.async_save of CUDA tensors (snapshot by cudaMemcpyAsync into a reused
pinned arena) must write the bytes ckptio.save writes for the same objects
(locations 'cuda:0' kept), even when the tensors change right after the
call; ckptio.dcp's writer must store CUDA tensors as torch's writer does and
its reader must fill CUDA targets. Prints the stall of async_save against
one device-to-host copy of the bytes. Exits 1 on any mismatch.
"""
import os
import sys
import tempfile
import time
import warnings

import torch
import torch.distributed.checkpoint as dcp

import ckptio
import ckptio.dcp as cd

warnings.filterwarnings("ignore")
FAILURES = []


def expect(cond, text):
    print(("ok   " if cond else "FAIL ") + text)
    if not cond:
        FAILURES.append(text)


def objects():
    g = torch.Generator(device="cuda").manual_seed(0)
    base = torch.randn(1024, 1024, device="cuda", generator=g)
    return {"state_dict": {"w": base, "view": base[10:20, ::3], "h": base.half(),
                           "p": torch.nn.Parameter(torch.randn(300, device="cuda", generator=g)),
                           "cpu": torch.arange(10.0)},
            "optimizer": {"state": {0: {"exp_avg": torch.zeros(4096, 256, device="cuda")}}}}


def main():
    tmp = tempfile.mkdtemp()
    os.makedirs(f"{tmp}/a")
    os.makedirs(f"{tmp}/b")
    obj = objects()
    ckptio.save(obj, f"{tmp}/a/x.pth")
    fut = ckptio.async_save(obj, f"{tmp}/b/x.pth")
    obj["state_dict"]["w"].add_(1)  # after the snapshot
    fut.result()
    same = open(f"{tmp}/a/x.pth", "rb").read() == open(f"{tmp}/b/x.pth", "rb").read()
    expect(same, "async_save of CUDA tensors writes ckptio.save's bytes")
    loaded = torch.load(f"{tmp}/b/x.pth")
    expect(loaded["state_dict"]["w"].device.type == "cuda", "locations stay cuda")

    big = {f"w{i}": torch.randn(4096, 4096, device="cuda") for i in range(16)}  # 1 GiB
    nbytes = sum(t.numel() * 4 for t in big.values())
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    off = 0
    for t in big.values():
        n = t.numel() * 4
        host[off:off + n].copy_(t.view(-1).view(torch.uint8), non_blocking=True)
        off += n
    torch.cuda.synchronize()
    d2h = time.perf_counter() - t0
    stalls = []
    for _ in range(3):
        t0 = time.perf_counter()
        f = ckptio.async_save(big, f"{tmp}/big.pth", fsync=False)
        stalls.append(time.perf_counter() - t0)
        f.result()
        ckptio.wait_async_saves()
    print(f"     1 GiB: one pinned D2H copy {d2h * 1e3:.1f} ms, async_save stall first "
          f"{stalls[0] * 1e3:.1f} ms, reused {min(stalls[1:]) * 1e3:.1f} ms "
          f"({min(stalls[1:]) / d2h:.2f}x)")

    sd = objects()
    for name, writer in (("torch", dcp.FileSystemWriter), ("ckptio", cd.StorageWriter)):
        dcp.save(sd, storage_writer=writer(f"{tmp}/{name}"), no_dist=True)
    for src in ("torch", "ckptio"):
        for reader in (dcp.FileSystemReader, cd.StorageReader):
            target = objects()
            for v in target["state_dict"].values():
                v.data.zero_()
            dcp.load(target, storage_reader=reader(f"{tmp}/{src}"), no_dist=True)
            ok = all(torch.equal(target["state_dict"][k], sd["state_dict"][k])
                     for k in sd["state_dict"])
            expect(ok, f"{reader.__name__} fills CUDA targets from {src}'s files")
    whole = ckptio.load(f"{tmp}/ckptio", map_location="cuda")
    expect(whole["state_dict"]["w"].device.type == "cuda"
           and torch.equal(whole["state_dict"]["w"], sd["state_dict"]["w"]),
           "ckptio.load(dcp_dir, map_location='cuda')")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())

"""GPU check, run on a machine with CUDA (see tests/gpu/run_device.sh).

Saves checkpoints whose tensors live on the GPU, with torch.save (zip and
legacy formats), and loads them with ckptio.load and torch.load under each
kind of map_location, comparing device, dtype, shape, strides, storage
offsets, bytes and the pattern of storage sharing. Prints one line per case
and a timing of a ~1 GB load onto the GPU. Exits 1 on any mismatch.
"""
import collections
import os
import sys
import tempfile
import time

import torch

import ckptio

FAILURES = []


def flat(obj, prefix="r"):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from flat(v, f"{prefix}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from flat(v, f"{prefix}[{i}]")
    else:
        yield prefix, obj


def raw(t):
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def sharing(tensors):
    ids = {}
    return [ids.setdefault(t.untyped_storage().data_ptr(), len(ids)) for t in tensors]


def compare(case, ours, theirs):
    a, b = list(flat(ours)), list(flat(theirs))
    if [k for k, _ in a] != [k for k, _ in b]:
        FAILURES.append(f"{case}: keys differ")
        return
    ta, tb = [], []
    for (k, x), (_, y) in zip(a, b):
        if type(x) is not type(y):
            FAILURES.append(f"{case}: {k}: type {type(x)} != {type(y)}")
            continue
        if isinstance(y, torch.Tensor):
            same = (
                x.device == y.device
                and x.dtype == y.dtype
                and x.shape == y.shape
                and x.stride() == y.stride()
                and x.storage_offset() == y.storage_offset()
                and x.requires_grad == y.requires_grad
                and torch.equal(raw(x), raw(y))
            )
            if not same:
                FAILURES.append(f"{case}: {k}: {x.device}/{x.dtype}/{tuple(x.shape)} vs "
                                f"{y.device}/{y.dtype}/{tuple(y.shape)}")
            ta.append(x)
            tb.append(y)
        elif x != y:
            FAILURES.append(f"{case}: {k}: {x!r} != {y!r}")
    if sharing(ta) != sharing(tb):
        FAILURES.append(f"{case}: storage sharing differs")


def make_state():
    dev = torch.device("cuda:0")
    base = torch.randn(64, 32, device=dev)
    sd = collections.OrderedDict()
    sd["w"] = base
    sd["w_t"] = base.t()  # a view sharing the storage
    sd["w_slice"] = base[3:9, ::2]
    sd["h"] = torch.randn(7, 5, device=dev).half()
    sd["bf"] = torch.randn(11, device=dev).bfloat16()
    sd["i64"] = torch.arange(10, device=dev)
    sd["u8"] = torch.arange(256, device=dev).to(torch.uint8)
    sd["b"] = torch.rand(9, device=dev) > 0.5
    sd["c"] = torch.randn(4, device=dev, dtype=torch.complex64)
    sd["d"] = torch.randn(3, 3, device=dev, dtype=torch.float64)
    sd["scalar"] = torch.tensor(3.5, device=dev)
    sd["empty"] = torch.empty(0, 4, device=dev)
    sd["p"] = torch.nn.Parameter(torch.randn(6, device=dev))
    sd["cpu"] = torch.randn(5)  # mixed devices in one file
    sd._metadata = collections.OrderedDict({"": {"version": 2}})
    return {"state_dict": sd, "meta": {"epoch": 3, "CLASSES": ("a", "b")}}


def main():
    assert torch.cuda.is_available(), "no CUDA device"
    obj = make_state()
    d = tempfile.mkdtemp()
    files = {}
    for fmt, zipped in (("zip", True), ("legacy", False)):
        path = os.path.join(d, f"{fmt}.pth")
        torch.save(obj, path, _use_new_zipfile_serialization=zipped)
        files[fmt] = path
    locations = {
        "None": None,
        "'cpu'": "cpu",
        "'cuda:0'": "cuda:0",
        "device('cuda')": torch.device("cuda"),
        "{'cuda:0': 'cpu'}": {"cuda:0": "cpu"},
        "callable->cpu": lambda s, loc: s,
        "callable->cuda": lambda s, loc: s.cuda(),
    }
    for fmt, path in files.items():
        for name, loc in locations.items():
            for mmap in (True, False):
                if fmt == "legacy" and mmap:
                    continue  # torch.load refuses mmap on legacy files
                case = f"{fmt} map_location={name} mmap={mmap}"
                theirs = torch.load(path, map_location=loc, weights_only=True, mmap=mmap)
                ours = ckptio.load(path, map_location=loc, weights_only=True, mmap=mmap)
                before = len(FAILURES)
                compare(case, ours, theirs)
                print(("ok   " if len(FAILURES) == before else "FAIL ") + case)

    # ckptio.save of GPU tensors (storages copied in one batch) writes
    # torch.save's bytes, and both read back alike
    ours_path = os.path.join(d, "ours.pth")
    ckptio.save(obj, ours_path)
    same_bytes = open(ours_path, "rb").read() == open(files["zip"], "rb").read()
    print(("ok   " if same_bytes else "FAIL ") + "ckptio.save of CUDA tensors == torch.save bytes")
    if not same_bytes:
        FAILURES.append("ckptio.save bytes differ from torch.save's")
    compare("ckptio.save -> torch.load", torch.load(ours_path, weights_only=True),
            torch.load(files["zip"], weights_only=True))

    # A ~1 GB checkpoint onto the GPU: torch.load vs ckptio.load, warm cache.
    big = collections.OrderedDict(
        (f"layer{i}.weight", torch.randn(1024, 1024, device="cuda")) for i in range(256)
    )
    path = os.path.join(d, "big.pth")
    torch.save(big, path)
    del big
    for name, fn in (
        ("torch.load(map_location='cuda')", lambda: torch.load(path, map_location="cuda", weights_only=True)),
        ("torch.load(mmap, 'cuda')", lambda: torch.load(path, map_location="cuda", weights_only=True, mmap=True)),
        ("ckptio.load(map_location='cuda')", lambda: ckptio.load(path, map_location="cuda")),
    ):
        best = float("inf")
        for _ in range(3):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            r = fn()
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
            del r
        print(f"{name:<36}{best * 1e3:8.1f} ms {os.path.getsize(path) / best / 1e9:6.2f} GB/s")
    if FAILURES:
        print("\n".join(FAILURES))
        return 1
    print("all GPU load checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())

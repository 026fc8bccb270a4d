"""GPU check of ckptio.weights_to_cpu's batched device-to-host copies.

Run on a machine with a CUDA GPU, after building the extension in place
(`python setup.py -q build_ext --inplace` in the repository root):

    python tests/gpu/check_devcopy.py [--gib 1.0]

Installs nothing; imports ckptio from this repository. It builds a state
dict of about --gib GiB of CUDA tensors (mixed dtypes, views, storages
shared between entries, many small tensors), runs ckptio.weights_to_cpu,
checks every value bit for bit against per-tensor .cpu(), checks the
storage sharing and that the pinned arena is released, and prints the
throughput of ckptio, of per-tensor .cpu() and of one copy of the same
number of bytes into already pinned memory (the ceiling). Exits non-zero
on any mismatch. Takes well under a minute on an H100/H200.
"""
import argparse
import collections
import gc
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

import torch  # noqa: E402

import ckptio  # noqa: E402
from ckptio import _hostcopy  # noqa: E402

FAILURES = []


def check(cond, what):
    if not cond:
        FAILURES.append(what)
        print("FAIL:", what, flush=True)


def make_state(total_bytes, device):
    """About total_bytes of CUDA tensors in the shapes a real model has."""
    g = torch.Generator(device=device).manual_seed(0)
    sd = collections.OrderedDict()
    big_dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float32]
    per_big = 32 << 20
    n_big = max(1, int(total_bytes * 0.9) // per_big)
    for i in range(n_big):
        dt = big_dtypes[i % len(big_dtypes)]
        numel = per_big // torch.empty(0, dtype=dt).element_size()
        sd[f"layer{i}.weight"] = torch.randn(numel // 4096, 4096, generator=g, device=device).to(dt)
    # many small tensors, as norms and biases in a real network
    for i in range(1500):
        sd[f"small{i}.bias"] = torch.randn(256 + i % 7, generator=g, device=device)
    # other dtypes
    sd["ints"] = torch.randint(-(2**40), 2**40, (100003,), generator=g, device=device)
    sd["int8"] = torch.randint(-128, 127, (4099,), dtype=torch.int8, generator=g, device=device)
    sd["mask"] = torch.rand(5000, generator=g, device=device) > 0.5
    sd["bytes"] = torch.randint(0, 255, (777,), dtype=torch.uint8, generator=g, device=device)
    sd["cplx"] = torch.randn(1001, dtype=torch.complex64, generator=g, device=device)
    sd["f64"] = torch.randn(333, dtype=torch.float64, generator=g, device=device)
    if hasattr(torch, "float8_e4m3fn"):
        sd["fp8"] = torch.randn(4096, generator=g, device=device).to(torch.float8_e4m3fn)
    sd["nan"] = torch.tensor([float("nan"), -0.0, float("inf")], device=device)
    sd["scalar"] = torch.tensor(2.5, device=device)
    sd["empty"] = torch.empty(0, 7, device=device)
    # views and sharing
    base = torch.randn(1024, 1024, generator=g, device=device)
    sd["base"] = base
    sd["base.t"] = base.t()
    sd["base.row"] = base[17]
    sd["base.col"] = base[:, 5]
    sd["base.block"] = base[100:200, 300:400]
    sd["base.as_int"] = base.view(torch.int32)[3:99]
    sd["expand"] = torch.arange(16.0, device=device).expand(8, 16)
    huge = torch.randn(64 << 20, generator=g, device=device)  # 256 MiB storage
    sd["huge.tail_view"] = huge[-1000:]  # only ~4 KB of it should be copied
    shared = torch.nn.Parameter(torch.randn(64, 64, generator=g, device=device), requires_grad=False)
    sd["tied.a"] = shared
    sd["tied.b"] = shared
    sd["grad"] = torch.nn.Parameter(torch.randn(10, device=device))  # requires grad: .cpu()
    sd["cpu"] = torch.ones(3)
    sd._metadata = collections.OrderedDict({"": {"version": 1}})
    return sd


def raw_bytes(t):
    t = t.detach()
    if t.is_conj():
        t = t.resolve_conj()
    return t.contiguous().reshape(-1).view(torch.uint8).cpu()


def nbytes_of(sd):
    return sum(v.numel() * v.element_size() for v in sd.values())


def rss_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def cudart_in_use():
    with open("/proc/self/maps") as f:
        libs = {line.split()[-1] for line in f if "libcudart" in line}
    return ", ".join(sorted(libs)) or "(none mapped)"


def timed(fn, repeat):
    times = []
    for _ in range(repeat):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        del out
        gc.collect()
    return times


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 2
    t_start = time.perf_counter()
    device = torch.device("cuda", torch.cuda.current_device())
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(device)}")
    sd = make_state(int(args.gib * (1 << 30)), device)
    total = nbytes_of(sd)
    print(f"state dict: {len(sd)} entries, {total / 2**30:.3f} GiB of tensor bytes")

    # ---- correctness ----
    expected = collections.OrderedDict((k, v.cpu()) for k, v in sd.items())
    got = ckptio.weights_to_cpu(sd)
    print(f"CUDA runtime used by ckptio: {cudart_in_use()}")
    check(type(got) is collections.OrderedDict, "result is an OrderedDict")
    check(list(got) == list(sd), "same keys in the same order")
    check(got._metadata is sd._metadata, "_metadata kept")
    for k, v in sd.items():
        r, e = got[k], expected[k]
        check(r.device.type == "cpu", f"{k}: on the CPU")
        check(type(r) is type(e), f"{k}: type {type(r).__name__} == {type(e).__name__}")
        check(r.dtype == e.dtype and r.shape == e.shape, f"{k}: dtype and shape")
        check(r.requires_grad == e.requires_grad, f"{k}: requires_grad")
        check(torch.equal(raw_bytes(r), raw_bytes(e)), f"{k}: bytes equal to .cpu()")
        if _hostcopy._batchable(v):
            check(r.stride() == v.stride(), f"{k}: stride of the device tensor kept")
    # sharing: same device storage and dtype <=> same CPU storage (batched entries)
    batched = [k for k, v in sd.items() if _hostcopy._batchable(v)]
    by_src = collections.defaultdict(set)
    for k in batched:
        by_src[(sd[k].untyped_storage().data_ptr(), sd[k].dtype)].add(got[k].untyped_storage().data_ptr())
    check(all(len(s) == 1 for s in by_src.values()), "one CPU storage per shared device storage")
    dst = [next(iter(s)) for s in by_src.values()]
    check(len(set(dst)) == len(dst), "distinct device storages get distinct CPU storages")
    check(got["tied.a"] is got["tied.b"], "one tensor under two names stays one tensor")
    check(got["huge.tail_view"].untyped_storage().nbytes() < 8192, "only the span in use is copied")
    check(got["grad"].requires_grad and got["grad"].grad_fn is not None, "autograd tensor via .cpu()")
    # saving the result works as it does for mmcv's
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), "ckptio_check_devcopy.pth")
    torch.save({"state_dict": got}, path)
    back = torch.load(path, weights_only=True)["state_dict"]
    check(all(torch.equal(raw_bytes(back[k]), raw_bytes(expected[k])) for k in sd), "torch.save round trip")
    os.unlink(path)
    got["base.row"][0] = 42.0
    check(got["base"][17, 0].item() == 42.0, "views share memory on the CPU as on the device")

    # ---- the arena is released with the last tensor ----
    del got, back
    gc.collect()
    rss0 = rss_bytes()
    held = ckptio.weights_to_cpu(sd)
    rss1 = rss_bytes()
    keep = held["base.col"]
    del held
    gc.collect()
    rss2 = rss_bytes()
    del keep
    gc.collect()
    rss3 = rss_bytes()
    print(f"RSS: before {rss0 / 2**20:.0f} MiB, with result {rss1 / 2**20:.0f} MiB, "
          f"one view kept {rss2 / 2**20:.0f} MiB, all dropped {rss3 / 2**20:.0f} MiB")
    if rss1 - rss0 > total // 2:
        check(rss2 - rss0 > total // 2, "one surviving view keeps the arena")
        check(rss2 - rss3 > total // 2, "the arena is freed when the last view dies")
    else:
        print("note: this driver's pinned memory does not show in VmRSS; the release of the "
              "arena is checked by tests/test_devcopy.py with the fake runtime only")

    # ---- throughput ----
    dense = [v for v in sd.values() if isinstance(v, torch.Tensor) and v.is_cuda]
    total_dev = sum(v.numel() * v.element_size() for v in dense)
    t_ours = timed(lambda: ckptio.weights_to_cpu(sd), args.repeat)
    os.environ["CKPTIO_PINNED"] = "0"
    pageable = ckptio.weights_to_cpu(sd)
    check(all(torch.equal(raw_bytes(pageable[k]), raw_bytes(expected[k])) for k in sd),
          "pageable arena: bytes equal to .cpu()")
    del pageable
    t_pageable = timed(lambda: ckptio.weights_to_cpu(sd), args.repeat)
    del os.environ["CKPTIO_PINNED"]
    t_cpu = timed(lambda: collections.OrderedDict((k, v.cpu()) for k, v in sd.items()), args.repeat)
    flat = torch.empty(total_dev, dtype=torch.uint8, device=device)
    pinned = torch.empty(total_dev, dtype=torch.uint8, pin_memory=True)
    t_pin = timed(lambda: pinned.copy_(flat, non_blocking=True), args.repeat)
    t0 = time.perf_counter()
    fresh = torch.empty(total_dev, dtype=torch.uint8, pin_memory=True)
    t_alloc = time.perf_counter() - t0
    del fresh

    def rate(ts):
        return total_dev / statistics.median(ts) / 1e9

    print(f"throughput in GB/s of tensor bytes ({total_dev / 1e9:.3f} GB), median of {args.repeat}:")
    print(f"{'method':<44}{'median s':>10}{'GB/s':>8}")
    print(f"{'ckptio.weights_to_cpu (one batch)':<44}{statistics.median(t_ours):>10.4f}{rate(t_ours):>8.2f}")
    print(f"{'ckptio, pageable arena (CKPTIO_PINNED=0)':<44}{statistics.median(t_pageable):>10.4f}{rate(t_pageable):>8.2f}")
    print(f"{'per-tensor .cpu() (mmcv)':<44}{statistics.median(t_cpu):>10.4f}{rate(t_cpu):>8.2f}")
    print(f"{'one copy into pinned memory (ceiling)':<44}{statistics.median(t_pin):>10.4f}{rate(t_pin):>8.2f}")
    print(f"pinned allocation of {total_dev / 2**30:.2f} GiB (torch, uncached): {t_alloc:.4f} s")
    print(f"runs: ckptio {[round(t, 4) for t in t_ours]}, pageable {[round(t, 4) for t in t_pageable]}, "
          f".cpu() {[round(t, 4) for t in t_cpu]}")
    print(f"total time {time.perf_counter() - t_start:.1f} s")
    if FAILURES:
        print(f"{len(FAILURES)} check(s) failed")
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())

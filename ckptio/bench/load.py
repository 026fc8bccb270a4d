"""The `load` section of `python -m ckptio bench`: ckptio.load against
torch.load (with and without mmap), safetensors and the machine's limits
(one read of the file, one memcpy of its bytes), and end to end into a
model; with a checkpoint of many small tensors, the per-tensor cost.

Every method runs in its own child process (so peak memory is its own): the
file is read once to warm the page cache, the peak-RSS counter is reset, one
run measures the extra peak RSS (and the private, anonymous part of it)
and is timed as the "first" call (the allocator starts cold: a program that
loads one checkpoint sees this time), then the best of N runs gives the time
(later calls can reuse memory the allocator kept from the earlier ones). Loads are timed to the object in
hand (ckptio and torch.load(mmap=True) map the file lazily); the end-to-end
rows copy every tensor into a model, touching every byte.

    python -m ckptio.bench.load FILE [--small FILE] [--runs N] [--json]
"""
import json
import os
import sys

from .harness import (SpecModel, child_or_main, per_tensor_lines, per_tensor_rows, run_child,
                      safetensors_twin, state_dict_of, time_in_child, timing_table)


def _methods(path, st_path):
    import numpy as np
    import torch

    import ckptio

    size = os.path.getsize(path)
    src = np.empty(size, dtype=np.uint8)
    dst = np.empty(size, dtype=np.uint8)
    src[:] = 1
    dst[:] = 1
    rbuf = bytearray(size)

    def read_file():
        with open(path, "rb", buffering=0) as f:
            view = memoryview(rbuf)
            got = 0
            while got < size:
                got += f.readinto(view[got:])
        return rbuf

    state = {}

    def model():
        if "model" not in state:
            sd = state_dict_of(torch.load(path, weights_only=False, mmap=True))
            state["model"] = SpecModel.build([(k, tuple(v.shape)) for k, v in sd.items()])
            del sd
        return state["model"]

    def e2e(loader):
        def run():
            m = model()
            sd = state_dict_of(loader())
            m.load_state_dict(sd)
            return m

        return run

    return {
        "_prepare_e2e": model,
        "read": read_file,
        "memcpy": lambda: np.copyto(dst, src),
        "torch.load": lambda: torch.load(path, weights_only=False),
        "torch.load(mmap)": lambda: torch.load(path, weights_only=False, mmap=True),
        "safetensors": (lambda: __import__("safetensors.torch").torch.load_file(st_path))
        if st_path
        else None,
        "ckptio.load": lambda: ckptio.load(path, weights_only=False),
        "ckptio.load(mmap=False)": lambda: ckptio.load(path, weights_only=False, mmap=False),
        "e2e torch.load": e2e(lambda: torch.load(path, weights_only=False)),
        "e2e ckptio.load": e2e(lambda: ckptio.load(path, weights_only=False)),
    }


def child(method, path, st_path, runs):
    fns = _methods(path, st_path)
    if method.startswith("e2e"):
        fns["_prepare_e2e"]()  # the model exists before anything is measured
    warm = [path, st_path] if st_path else [path]
    print(json.dumps(time_in_child(fns[method], runs, warm)))


LOAD_ROWS = [
    "read",
    "memcpy",
    "torch.load",
    "torch.load(mmap)",
    "safetensors",
    "ckptio.load",
    "ckptio.load(mmap=False)",
    "e2e torch.load",
    "e2e ckptio.load",
]


def measure(big_path, runs, small_path=None):
    """Times every load row (best of runs) on big_path; with small_path (a
    checkpoint of many small tensors), also the per-tensor cost of
    torch.load and ckptio.load. Returns a dict for render()."""
    size = os.path.getsize(big_path)
    st_path = safetensors_twin(big_path)
    results = {"file": big_path, "bytes": size, "rows": {}}
    for method in LOAD_ROWS:
        st = st_path if method == "safetensors" else None
        r = run_child("ckptio.bench.load", method, big_path, st, runs)
        results["rows"][method] = r
        print(f"  measured {method}: {r['time'] * 1e3:.1f} ms", file=sys.stderr)
    if small_path:
        import torch

        n = len(state_dict_of(torch.load(small_path, weights_only=False, mmap=True)))
        results["small"] = per_tensor_rows("ckptio.bench.load",
                                           ("torch.load", "torch.load(mmap)", "ckptio.load"),
                                           small_path, n, max(runs, 10), None)
    return results


def render(results):
    size = results["bytes"]
    rows = results["rows"]
    torch_t = rows["torch.load"]["time"]
    lines = timing_table(f"checkpoint: {results['file']}", rows, size,
                         f"{'GB/s':>8}{'vs torch.load':>15}",
                         lambda t: f"{size / t / 1e9:>8.2f}{torch_t / t:>14.1f}x")
    c = rows["ckptio.load"]["time"]
    lines += [
        "",
        "ratios:",
        f"  ckptio.load vs torch.load:          {torch_t / c:8.1f}x faster",
        f"  ckptio.load vs torch.load(mmap):    {rows['torch.load(mmap)']['time'] / c:8.1f}x faster",
    ]
    if "safetensors" in rows:
        lines.append(f"  ckptio.load vs safetensors:         {rows['safetensors']['time'] / c:8.1f}x faster")
    lines += [
        f"  e2e ckptio / one memcpy:            {rows['e2e ckptio.load']['time'] / rows['memcpy']['time']:8.2f}x",
        f"  e2e torch / e2e ckptio:             {rows['e2e torch.load']['time'] / rows['e2e ckptio.load']['time']:8.2f}x",
    ]
    small = results.get("small")
    if small:
        lines += per_tensor_lines(small, 22)
    return "\n".join(lines)


def main(argv=None):
    from .harness import section_main

    return section_main(sys.modules[__name__], argv, "checkpoint to measure", runs=5,
                        small_help="a checkpoint of many small tensors (per-tensor cost)")


if __name__ == "__main__":
    sys.exit(child_or_main(child, main))

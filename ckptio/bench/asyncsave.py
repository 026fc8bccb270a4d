"""The `async` section of `python -m ckptio bench`: how long ckptio.async_save
keeps the caller (a training loop) waiting, against one memcpy of the same
tensor bytes (its floor: the snapshot is one copy), torch.save and
ckptio.save of the same objects (the stall of a synchronous save).

Every method runs in its own child process on the objects of the benchmark
checkpoint. "stall" is the time async_save takes to return: "first" with a
new host arena (its pages are faulted in during the copy), "reused" the
best of N later calls, each made once the previous write is done (a
training loop checkpoints far less often than a write takes), reusing the
arena as a training run does. "until written" is the call plus
future.result(). Each written file is deleted and synced untimed.
"""
import gc
import json
import os
import sys
import time

from .harness import child_or_main, run_child, tensors_in, timed_runs

ROWS = ["memcpy", "torch.save", "ckptio.save", "async_save"]


def child(method, path, out_path, runs, sync=True):
    import numpy as np
    import torch

    import ckptio

    obj = torch.load(path, weights_only=False)
    seen, nbytes = set(), 0
    for t in tensors_in(obj):
        s = t.untyped_storage()
        if s._cdata not in seen:
            seen.add(s._cdata)
            nbytes += s.nbytes()

    def fresh():
        if os.path.exists(out_path):
            os.unlink(out_path)
        if sync:
            os.sync()

    result = {"data_bytes": nbytes}
    if method == "memcpy":
        src = np.ones(nbytes, dtype=np.uint8)
        dst = np.ones(nbytes, dtype=np.uint8)
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            np.copyto(dst, src)
            times.append(time.perf_counter() - t0)
        result.update(time=min(times), times=times)
    elif method in ("torch.save", "ckptio.save"):
        save = torch.save if method == "torch.save" else ckptio.save
        times = timed_runs(lambda: save(obj, out_path), runs, fresh)
        fresh()
        result.update(time=min(times), times=times)
    else:
        stalls, totals = [], []
        for _ in range(runs + 1):
            fresh()
            gc.collect()
            t0 = time.perf_counter()
            fut = ckptio.async_save(obj, out_path)
            t1 = time.perf_counter()
            fut.result()
            t2 = time.perf_counter()
            ckptio.wait_async_saves()
            stalls.append(t1 - t0)
            totals.append(t2 - t0)
        fresh()
        result.update(time=min(stalls[1:]), first=stalls[0], times=stalls,
                      written=min(totals[1:]), written_times=totals)
    print(json.dumps(result))


def measure(big_path, runs, rows=None, sync=True):
    out_path = os.path.join(os.path.dirname(os.path.abspath(big_path)), "bench_async_out.pth")
    results = {"file": big_path, "rows": {}}
    for method in rows or ROWS:
        r = run_child("ckptio.bench.asyncsave", method, big_path, out_path,
                      max(runs, 2) if method == "async_save" else runs, sync)
        results["rows"][method] = r
        print(f"  measured {method}: {r['time'] * 1e3:.1f} ms", file=sys.stderr)
    return results


def render(results):
    rows = results["rows"]
    data = next(iter(rows.values()))["data_bytes"] if rows else 0
    lines = [f"async: objects of {results['file']} ({data / 1e9:.2f} GB of tensor bytes)", "",
             f"{'method':<34}{'time ms':>10}{'GB/s':>8}"]
    for name, r in rows.items():
        if name == "async_save":
            for label, t in (("async_save stall, first (new arena)", r["first"]),
                             ("async_save stall, reused arena", r["time"]),
                             ("async_save until written", r["written"])):
                lines.append(f"{label:<34}{t * 1e3:>10.1f}{data / t / 1e9:>8.2f}")
        else:
            label = {"memcpy": "one memcpy of the bytes (floor)",
                     "torch.save": "torch.save (stalls for all of it)",
                     "ckptio.save": "ckptio.save (stalls for all of it)"}[name]
            lines.append(f"{label:<34}{r['time'] * 1e3:>10.1f}{data / r['time'] / 1e9:>8.2f}")
    if "async_save" in rows:
        stall = rows["async_save"]["time"]
        lines += ["", "ratios (lower is better):"]
        for ref, text in (("memcpy", "async_save stall / one memcpy"),
                          ("torch.save", "async_save stall / torch.save"),
                          ("ckptio.save", "async_save stall / ckptio.save")):
            if ref in rows:
                lines.append(f"  {text:<44}{stall / rows[ref]['time']:8.2f}x")
    return "\n".join(lines)


def main(argv=None):
    from .harness import section_main

    return section_main(sys.modules[__name__], argv, 'checkpoint whose objects are saved')


if __name__ == "__main__":
    sys.exit(child_or_main(child, main))

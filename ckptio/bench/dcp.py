"""The `dcp` section of `python -m ckptio bench`: torch.distributed.checkpoint
with ckptio's StorageReader/StorageWriter against torch's FileSystemReader/
FileSystemWriter, in one process (no process group), on the objects of the
benchmark checkpoint (state dict, optimizer state, meta).

Every method runs in its own child process. Saves write a fresh directory
each run (the previous one is deleted and synced untimed). Loads read into a
state dict allocated (and touched) before timing, as dcp.load into a model
does, from a directory written once by torch's writer (so both readers read
the same files, torch's layout: items packed end to end) and once by
ckptio's; the data files are read into the page cache right before each
timed run (warm). `ckptio.load(dir)` returns the whole state dict (the
result of torch's dcp_to_torch_save followed by torch.load, timed in the
last row, which writes and reads an intermediate file).
"""
import gc
import json
import os
import shutil
import sys

from .harness import _warm, child_or_main, run_child, tensors_in, timed_runs

SAVE_ROWS = [
    "FileSystemWriter",
    "ckptio StorageWriter",
    "FileSystemWriter(sync_files=False)",
    "ckptio StorageWriter(sync_files=False)",
]
LOAD_ROWS = [
    "memcpy",
    "FileSystemReader",
    "ckptio StorageReader",
    "ckptio StorageReader (ckptio's files)",
    "ckptio.load(dir)",
    "dcp_to_torch_save + torch.load",
]


def _objects(path):
    import torch

    obj = torch.load(path, weights_only=False)
    return obj


def _dirs(path):
    base = os.path.join(os.path.dirname(os.path.abspath(path)), "bench_dcp")
    return {"torch": base + "_torch", "ckptio": base + "_ckptio", "out": base + "_out",
            "pth": base + "_whole.pth"}


def _quiet():
    import warnings

    warnings.filterwarnings("ignore")


def _target(obj):
    """A state dict of the same structure with fresh, touched tensors (what
    dcp.load fills in place)."""
    import torch

    def walk(o):
        if isinstance(o, torch.Tensor):
            return torch.ones_like(o)
        if isinstance(o, dict):
            return type(o)((k, walk(v)) for k, v in o.items())
        if isinstance(o, list):
            return [walk(v) for v in o]
        return o

    return walk(obj)


def _data_files(directory):
    return [os.path.join(directory, n) for n in sorted(os.listdir(directory))
            if n.endswith(".distcp")]


def prepare(path):
    """Writes the two directories the load rows read (untimed)."""
    import torch.distributed.checkpoint as dcp

    from ..dcp import StorageWriter

    _quiet()
    obj = _objects(path)
    d = _dirs(path)
    for key, writer in (("torch", dcp.FileSystemWriter), ("ckptio", StorageWriter)):
        shutil.rmtree(d[key], ignore_errors=True)
        dcp.save(obj, storage_writer=writer(d[key]), no_dist=True)


def _save_fn(method, obj, out):
    import torch.distributed.checkpoint as dcp

    from ..dcp import StorageWriter

    writer = StorageWriter if method.startswith("ckptio") else dcp.FileSystemWriter
    sync = "sync_files=False" not in method
    return lambda: dcp.save(obj, storage_writer=writer(out, sync_files=sync), no_dist=True)


def child(method, path, runs, sync=True):
    import numpy as np
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    import ckptio
    from ckptio.dcp import StorageReader

    _quiet()
    d = _dirs(path)
    obj = _objects(path)
    nbytes = sum(t.numel() * t.element_size() for t in tensors_in(obj))
    before = None  # untimed, ahead of each run
    if method in SAVE_ROWS:
        fn = _save_fn(method, obj, d["out"])

        def before():
            shutil.rmtree(d["out"], ignore_errors=True)
            if sync:  # no writeback of an earlier run competes with this one
                os.sync()
    elif method == "memcpy":
        src = np.ones(nbytes, dtype=np.uint8)
        dst = np.ones(nbytes, dtype=np.uint8)
        fn = lambda: np.copyto(dst, src)  # noqa: E731
    else:
        source = d["ckptio"] if "ckptio's files" in method or method == "ckptio.load(dir)" \
            else d["torch"]
        data_files = _data_files(source)

        def before():
            for f in data_files:
                _warm(f)

        if method == "ckptio.load(dir)":
            fn = lambda: ckptio.load(source, weights_only=False)  # noqa: E731
        elif method.startswith("dcp_to_torch_save"):
            def fn():
                dcp_to_torch_save(source, d["pth"])
                return torch.load(d["pth"], weights_only=False)
        else:
            target = _target(obj)
            reader = StorageReader if method.startswith("ckptio") else dcp.FileSystemReader
            fn = lambda: dcp.load(target, storage_reader=reader(source))  # noqa: E731
    del obj
    gc.collect()
    # the first run: a cold allocator, as in a program that loads once
    times = timed_runs(fn, runs + 1, before)
    if method.startswith("dcp_to_torch_save") and os.path.exists(d["pth"]):
        os.unlink(d["pth"])
    print(json.dumps({"time": min(times[1:]), "first": times[0], "times": times,
                      "data_bytes": nbytes}))


def measure(big_path, runs, rows=None, sync=True):
    """Times the save and load rows (best of runs) on the objects of
    big_path. Returns a dict for render(). sync=False skips the os.sync
    between save runs (tests on small files)."""
    prepare(big_path)
    results = {"file": big_path, "rows": {}}
    try:
        for method in rows or SAVE_ROWS + LOAD_ROWS:
            n = 1 if method.startswith("dcp_to_torch_save") else runs
            r = run_child("ckptio.bench.dcp", method, big_path, n, sync)
            results["rows"][method] = r
            print(f"  measured {method}: {r['time'] * 1e3:.1f} ms", file=sys.stderr)
    finally:
        for key, p in _dirs(big_path).items():
            if key == "pth":
                if os.path.exists(p):
                    os.unlink(p)
            else:
                shutil.rmtree(p, ignore_errors=True)
    return results


def render(results):
    rows = results["rows"]
    lines = [f"dcp: objects of {results['file']}, one process, warm page cache", "",
             f"{'method':<40}{'best ms':>10}{'first ms':>10}{'GB/s':>8}{'vs torch':>10}"
             f"{'first vs torch':>16}"]

    def ref_of(name):
        if name == "memcpy":
            return None
        if name in SAVE_ROWS:
            return rows.get("FileSystemWriter(sync_files=False)" if "sync_files=False" in name
                            else "FileSystemWriter")
        return rows.get("FileSystemReader")

    for name, r in rows.items():
        t, first = r["time"], r.get("first", r["time"])
        ref = ref_of(name)
        ratio = f"{ref['time'] / t:>9.2f}x" if ref else f"{'':>10}"
        ratio_first = f"{ref.get('first', ref['time']) / first:>15.2f}x" if ref else ""
        lines.append(f"{name:<40}{t * 1e3:>10.1f}{first * 1e3:>10.1f}"
                     f"{r['data_bytes'] / t / 1e9:>8.2f}{ratio}{ratio_first}")

    def ratio(a, b, text, key="time"):
        if a in rows and b in rows:
            lines.append(f"  {text:<58}{rows[b].get(key, rows[b]['time']) / rows[a].get(key, rows[a]['time']):8.2f}x")

    lines += ["", "ratios (higher is better for ckptio; 'first': one call per process, "
                  "as a training job loads):"]
    ratio("ckptio StorageReader", "FileSystemReader",
          "dcp.load first call, ckptio's reader vs FileSystemReader", "first")
    ratio("ckptio StorageReader", "FileSystemReader", "dcp.load, ckptio's reader vs FileSystemReader")
    ratio("ckptio StorageReader (ckptio's files)", "FileSystemReader",
          "dcp.load, ckptio's reader (own files) vs FileSystemReader")
    ratio("ckptio StorageWriter", "FileSystemWriter", "dcp.save, ckptio's writer vs FileSystemWriter")
    ratio("ckptio StorageWriter(sync_files=False)", "FileSystemWriter(sync_files=False)",
          "dcp.save without fsync, ckptio vs torch")
    ratio("ckptio.load(dir)", "dcp_to_torch_save + torch.load",
          "whole state dict: ckptio.load(dir) vs dcp_to_torch_save+load")
    if "memcpy" in rows and "ckptio StorageReader" in rows:
        lines.append(f"  {'ckptio StorageReader / one memcpy of the bytes':<52}"
                     f"{rows['ckptio StorageReader']['time'] / rows['memcpy']['time']:8.2f}x")
    return "\n".join(lines)


def main(argv=None):
    from .harness import section_main

    return section_main(sys.modules[__name__], argv, 'checkpoint whose objects are saved and loaded')


if __name__ == "__main__":
    sys.exit(child_or_main(child, main))

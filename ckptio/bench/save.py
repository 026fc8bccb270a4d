"""The save half of `python -m ckptio bench`: ckptio.save against torch.save,
safetensors and a raw sequential write of the same bytes, plus CRC-32 speed.

Each method runs in its own child process: the checkpoint's objects are
loaded once (torch.load), the peak-RSS counter is reset, one save measures
the extra peak RSS (total and private), then the best of N saves gives the
time. Every save writes a fresh file (the previous one is deleted untimed)
in the directory of the given checkpoint, so all methods write to the same
file system. torch.save and the *-nofsync rows leave data in the page cache
as torch.save does; the fsync rows include the flush to disk.
"""
import json
import os
import sys
import zlib

from .harness import (child_or_main, flat_tensors, measured_call, per_tensor_lines, per_tensor_rows,
                      run_child, section_main, timed_runs)

SAVE_ROWS = [
    "raw write",
    "raw write+fsync",
    "torch.save",
    "ckptio.save(fsync=False)",
    "ckptio.save",
    "safetensors",
]
CRC_ROWS = ["crc32 zlib", "crc32 libdeflate"]


def _storages(obj):
    """The distinct CPU storages of obj's tensors, in first-seen order."""
    import torch

    seen, out = set(), []

    def walk(o):
        if isinstance(o, torch.Tensor):
            s = o.untyped_storage()
            if s._cdata not in seen:
                seen.add(s._cdata)
                out.append(s)
        elif isinstance(o, dict):
            for v in o.values():
                walk(v)
        elif isinstance(o, (list, tuple)):
            for v in o:
                walk(v)

    walk(obj)
    return out


def _byte_views(obj):
    """A memoryview over each distinct storage's bytes (no copy)."""
    import torch

    views = []
    for s in _storages(obj):
        if s.nbytes():
            views.append(memoryview(torch.empty(0, dtype=torch.uint8).set_(s).numpy()))
    return views


def _methods(obj, out_path):
    import torch

    import ckptio
    from ckptio import _native

    views = _byte_views(obj)

    def raw(do_fsync):
        def run():
            with open(out_path, "wb", buffering=0) as f:
                for v in views:
                    done = 0
                    while done < len(v):
                        done += f.write(v[done:])
                if do_fsync:
                    os.fsync(f.fileno())

        return run

    def crc(impl):
        # zlib's crc32 through Python's zlib module (it releases the GIL and
        # calls zlib's C function over the whole buffer), libdeflate's
        # through ckptio's
        fn = zlib.crc32 if impl == "zlib" else _native.crc32

        def run():
            c = 0
            for v in views:
                c = fn(v, c)
            return c

        return run

    def safetensors():
        from safetensors.torch import save_file

        flat = flat_tensors(obj)  # contiguous copies made here, untimed
        return lambda: save_file(flat, out_path)

    return {
        "raw write": raw(False),
        "raw write+fsync": raw(True),
        "torch.save": lambda: torch.save(obj, out_path),
        "ckptio.save(fsync=False)": lambda: ckptio.save(obj, out_path, fsync=False),
        "ckptio.save": lambda: ckptio.save(obj, out_path),
        "safetensors": safetensors,
        "crc32 zlib": crc("zlib"),
        "crc32 libdeflate": crc("libdeflate"),
    }


def child(method, path, out_path, runs):
    import torch

    obj = torch.load(path, weights_only=False)
    fn = _methods(obj, out_path)[method]
    if method == "safetensors":
        fn = fn()  # the flattening is preparation, not part of the save
    nbytes = sum(len(v) for v in _byte_views(obj))

    def fresh():
        # every run starts from the same state: no old output, and no
        # writeback of an earlier run competing for the disk
        if os.path.exists(out_path):
            os.unlink(out_path)
        os.sync()

    fresh()
    mem = measured_call(fn)[2]  # the first save: memory only
    times = timed_runs(fn, runs, fresh)
    written = os.path.getsize(out_path) if os.path.exists(out_path) else 0
    fresh()
    print(json.dumps({"time": min(times), "times": times, "bytes": written, "data_bytes": nbytes,
                      **mem}))


def measure(big_path, runs, rows=None, small_path=None):
    """Times every save method (best of runs) on the objects of big_path,
    writing beside it; with small_path (a checkpoint of many small tensors),
    also the per-tensor cost of torch.save and ckptio.save. Returns a dict
    for render()."""
    out_path = os.path.join(os.path.dirname(os.path.abspath(big_path)), "bench_save_out.pth")
    results = {"file": big_path, "bytes": os.path.getsize(big_path), "rows": {}}
    for method in rows or SAVE_ROWS + CRC_ROWS:
        r = run_child("ckptio.bench.save", method, big_path, out_path, runs)
        results["rows"][method] = r
        print(f"  measured {method}: {r['time'] * 1e3:.1f} ms", file=sys.stderr)
    if small_path:
        import torch

        n = len(_storages(torch.load(small_path, weights_only=False)))
        results["small"] = per_tensor_rows("ckptio.bench.save",
                                           ("torch.save", "ckptio.save(fsync=False)"),
                                           small_path, n, max(runs, 5), out_path)
    return results


def render(results):
    rows = results["rows"]
    size = results["bytes"]
    lines = [
        f"save: objects of {results['file']} ({size / 1e9:.2f} GB as torch.save writes them)",
        "",
        f"{'method':<26}{'time ms':>10}{'GB/s':>8}{'vs torch.save':>15}{'peak extra RSS':>19}"
        f"{'private peak':>17}",
    ]
    torch_t = rows.get("torch.save", {}).get("time")
    for name, r in rows.items():
        t = r["time"]
        data = r["data_bytes"]
        ratio = f"{torch_t / t:>14.2f}x" if torch_t else f"{'':>15}"
        mem = ""
        if not name.startswith("crc32"):
            mem = (f"{r['peak_extra'] / 1e6:>9.1f} MB {100 * r['peak_extra'] / size:>5.1f}%"
                   f"{r['anon_extra'] / 1e6:>7.1f} MB {100 * r['anon_extra'] / size:>5.1f}%")
        lines.append(f"{name:<26}{t * 1e3:>10.1f}{data / t / 1e9:>8.2f}{ratio}{mem}")

    def ratio(a, b, text):
        if a in rows and b in rows:
            lines.append(f"  {text:<44}{rows[b]['time'] / rows[a]['time']:8.2f}x")

    lines += ["", "ratios (higher is better for the first):"]
    ratio("ckptio.save(fsync=False)", "torch.save", "ckptio.save(fsync=False) vs torch.save")
    ratio("ckptio.save", "torch.save", "ckptio.save (with fsync) vs torch.save")
    ratio("ckptio.save(fsync=False)", "safetensors", "ckptio.save(fsync=False) vs safetensors")
    if "raw write" in rows and "ckptio.save(fsync=False)" in rows:
        share = rows["raw write"]["time"] / rows["ckptio.save(fsync=False)"]["time"]
        lines.append(f"  {'ckptio.save(fsync=False) / raw write speed':<44}{100 * share:7.0f}%")
    if "raw write+fsync" in rows and "ckptio.save" in rows:
        share = rows["raw write+fsync"]["time"] / rows["ckptio.save"]["time"]
        lines.append(f"  {'ckptio.save / raw write+fsync speed':<44}{100 * share:7.0f}%")
    ratio("crc32 libdeflate", "crc32 zlib", "crc32 libdeflate vs zlib")
    small = results.get("small")
    if small:
        lines += per_tensor_lines(small, 26)
    return "\n".join(lines)


def main(argv=None):
    return section_main(sys.modules[__name__], argv, "checkpoint whose objects are saved",
                        small_help="a checkpoint of many small tensors (per-tensor cost)")


if __name__ == "__main__":
    sys.exit(child_or_main(child, main))

"""Cold page cache: loading a file none of whose pages are in memory (as
after a reboot, a fresh download, or a file written on another node), side
by side with a sequential read of it, torch.load, torch.load(mmap=True),
safetensors and ckptio.load (mapped, and mmap=False: the whole file read by
the two-thread pread reader); end to end into a model, alone and as N ranks
at once; and the warm end-to-end rows against one memcpy of the bytes.

Each measurement is a fresh child process that imports everything and
builds its model first, then says "ready" and waits. The parent then drops
the file's pages (fsync, then posix_fadvise(POSIX_FADV_DONTNEED), which
needs no root), checks with mincore that none is resident, and says "go";
the child times the method alone and reports the bytes the process read
from storage (/proc/self/io read_bytes). For the warm rows the parent reads
the whole file just before "go" instead (these machines page out idle page
cache after about a minute). For N ranks, N children wait together and the
wall time runs from "go" to the last one's end. Medians of the rounds.

    python -m ckptio.bench.cold FILE [--runs N] [--json]
"""

import ctypes
import ctypes.util
import json
import mmap
import os
import statistics
import subprocess
import sys
import time

from .harness import _warm as warm_pages  # reads the whole file into the page cache
from .harness import child_command, child_or_main, child_result

COLD = (
    "sequential read (limit)",
    "torch.load",
    "torch.load(mmap=True)",
    "safetensors load_file",
    "ckptio.load",
    "ckptio.load(mmap=False)",
    "end to end: torch.load + load_state_dict",
    "end to end: torch.load(mmap=True) + load_state_dict",
    "end to end: ckptio load_checkpoint",
)
WARM = (
    "one memcpy of the bytes (limit)",
    "end to end: torch.load(mmap=True) + load_state_dict",
    "end to end: ckptio load_checkpoint",
)
RANKS = (2, 4)
RANK_METHOD = "end to end: ckptio load_checkpoint"

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                       ctypes.c_long)
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p)


def resident_fraction(path):
    """The fraction of path's pages in the page cache (mincore over a
    shared read-only mapping; nothing is faulted in)."""
    size = os.path.getsize(path)
    if size == 0:
        return 0.0
    page = mmap.PAGESIZE
    pages = (size + page - 1) // page
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"mmap of {path} failed")
        try:
            vec = ctypes.create_string_buffer(pages)
            if _libc.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), f"mincore of {path} failed")
            return sum(b & 1 for b in vec.raw) / pages
        finally:
            _libc.munmap(addr, size)
    finally:
        os.close(fd)


def drop_pages(path):
    """Writes back, then drops path's pages from the page cache; returns
    the fraction still resident (mincore)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return resident_fraction(path)


def _read_bytes():
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _prepare(method, path, st_path):
    """Everything the method needs but the file's pages: returns run()."""
    import logging

    import numpy as np
    import torch

    def state_dict_of(obj):
        return obj.get("state_dict", obj) if isinstance(obj, dict) else obj

    if method == "sequential read (limit)":
        buf = bytearray(16 << 20)

        def run():
            with open(path, "rb", buffering=0) as f:
                while f.readinto(buf):
                    pass

        return run
    if method == "one memcpy of the bytes (limit)":
        size = os.path.getsize(path)
        src = np.ones(size, np.uint8)
        dst = np.ones(size, np.uint8)  # touched: the limit is the copy, not page faults
        return lambda: np.copyto(dst, src)
    if method == "torch.load":
        return lambda: torch.load(path, weights_only=False, map_location="cpu")
    if method == "torch.load(mmap=True)":
        return lambda: torch.load(path, weights_only=False, map_location="cpu", mmap=True)
    if method == "safetensors load_file":
        import safetensors.torch

        return lambda: safetensors.torch.load_file(st_path)
    if method in ("ckptio.load", "ckptio.load(mmap=False)"):
        import ckptio
        from ckptio._config import ensure_configured

        ensure_configured()  # what torch's side has done by importing torch
        mapped = method == "ckptio.load"  # else the whole file read into memory (preads.c)
        return lambda: ckptio.load(path, mmap=mapped)
    from .mmcv import _model_for

    model = _model_for(path)
    if method == "end to end: ckptio load_checkpoint":
        from ckptio._config import ensure_configured
        from ckptio.checkpoint import load_checkpoint

        ensure_configured()
        logger = logging.getLogger("ckptio.bench.cold")  # the load line goes nowhere
        return lambda: load_checkpoint(model, path, map_location="cpu", logger=logger)
    mmap_flag = "mmap=True" in method

    def run():
        sd = torch.load(path, weights_only=False, map_location="cpu", mmap=mmap_flag)
        model.load_state_dict(state_dict_of(sd), strict=False)

    return run


def child(method, path, st_path):
    run = _prepare(method, path, st_path)
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return 1
    before = _read_bytes()
    t = time.perf_counter()
    run()
    elapsed = time.perf_counter() - t
    end = time.monotonic()  # CLOCK_MONOTONIC: one clock for every process
    after = _read_bytes()
    read = after - before if before is not None and after is not None else None
    print(json.dumps({"time": elapsed, "end": end, "read_bytes": read}), flush=True)
    return 0


def _start(method, path, st_path):
    env = dict(os.environ, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1", PYTHONWARNINGS="ignore")
    proc = subprocess.Popen(child_command("ckptio.bench.cold", method, path, st_path),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    line = proc.stdout.readline()
    if line.strip() != "ready":
        err = proc.communicate()[1]
        raise RuntimeError(f"benchmark child {method!r} failed:\n{err[-3000:]}")
    return proc


def _finish(proc, method):
    out, err = proc.communicate()
    return child_result(method, proc.returncode, out, err)


def measure_once(method, path, st_path, n=1, cold=True):
    """One round: n children of method started, then the files dropped (or
    warmed), then go. Returns {time (wall from go to the end of the last
    one's method, not of its exit), times,
    read_bytes (sum), resident (fraction before go)}."""
    procs = [_start(method, path, st_path) for _ in range(n)]
    files = [p for p in (path, st_path) if p]
    if cold:
        resident = max(drop_pages(p) for p in files)
    else:
        for p in files:
            warm_pages(p)
        resident = min(resident_fraction(p) for p in files)
    go = time.monotonic()
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    results = [_finish(p, method) for p in procs]
    wall = max(r["end"] for r in results) - go
    reads = [r["read_bytes"] for r in results]
    return {
        "time": wall if n > 1 else results[0]["time"],
        "times": [r["time"] for r in results],
        "read_bytes": sum(reads) if None not in reads else None,
        "resident": resident,
    }


def _median_of(rounds):
    return {
        "time": statistics.median(r["time"] for r in rounds),
        "times": [r["time"] for r in rounds],
        "read_bytes": statistics.median(r["read_bytes"] for r in rounds)
        if all(r["read_bytes"] is not None for r in rounds) else None,
        "resident": max(r["resident"] for r in rounds),
    }


def measure(big_path, runs, st_path=None, ranks=RANKS):
    """{'file', 'bytes', 'cold': {method: row}, 'ranks': {n: row}, 'warm':
    {method: row}}; each row the median of `runs` rounds (5 in `make demo`:
    with 3, one slow spell of the disk in two rounds decided a row)."""
    if st_path is None:
        twin = big_path + ".safetensors"
        st_path = twin if os.path.exists(twin) else None
    rounds = max(1, runs)
    result = {"file": big_path, "bytes": os.path.getsize(big_path), "rounds": rounds,
              "cold": {}, "ranks": {}, "warm": {}}
    # (table, key, method, safetensors path, ranks, cold); each round runs
    # every measurement once, so that the storage's slow spells (a virtual
    # disk's read speed here varies 4x from one minute to the next) fall on
    # all of them alike
    plan = [("cold", m, m, st_path if m == "safetensors load_file" else None, 1, True)
            for m in COLD if m != "safetensors load_file" or st_path is not None]
    plan += [("ranks", n, RANK_METHOD, None, n, True) for n in ranks]
    plan += [("warm", m, m, None, 1, False) for m in WARM]
    got = {}
    for _ in range(rounds):
        for table, key, method, sp, n, is_cold in plan:
            got.setdefault((table, key), []).append(
                measure_once(method, big_path, sp, n=n, cold=is_cold))
    for table, key, *_ in plan:
        result[table][key] = _median_of(got[(table, key)])
    return result


def render(result):
    size = result["bytes"]
    cold, warm = result["cold"], result["warm"]
    seq = cold["sequential read (limit)"]["time"]

    def mb(r):
        return "" if r["read_bytes"] is None else f"{r['read_bytes'] / 1e6:>12.1f}"

    lines = [
        f"cold page cache: {result['file']} ({size / 1e9:.2f} GB); pages dropped with "
        "posix_fadvise(DONTNEED) before each run (mincore: at most "
        f"{max([r['resident'] for r in cold.values()] + [0]) * 100:.1f}% resident); "
        f"median of {result['rounds']}",
        "",
        f"{'method':<54}{'time ms':>10}{'vs read':>9}{'MB read':>12}",
    ]
    for name, r in cold.items():
        lines.append(f"{name:<54}{r['time'] * 1e3:>10.1f}{r['time'] / seq:>8.2f}x{mb(r)}")
    for n, r in result["ranks"].items():
        lines.append(f"{f'{n} ranks at once: ckptio load_checkpoint (wall)':<54}"
                     f"{r['time'] * 1e3:>10.1f}{r['time'] / seq:>8.2f}x{mb(r)}")
    lines += _summary("cold", cold, seq, "a sequential read")
    lines += ["", f"warm page cache (the file read just before each run); median of "
              f"{result['rounds']}", "", f"{'method':<54}{'time ms':>10}{'vs memcpy':>11}"]
    cp = warm["one memcpy of the bytes (limit)"]["time"]
    for name, r in warm.items():
        lines.append(f"{name:<54}{r['time'] * 1e3:>10.1f}{r['time'] / cp:>10.2f}x")
    lines += _summary("warm", warm, cp, "one memcpy")
    return "\n".join(lines)


def _summary(label, table, limit, limit_name):
    """The end-to-end line of a table: ckptio against its limit and against
    torch.load(mmap=True) + load_state_dict (nothing when a row is missing)."""
    e2e = table.get("end to end: ckptio load_checkpoint")
    mm = table.get("end to end: torch.load(mmap=True) + load_state_dict")
    if not (e2e and mm):
        return []
    return [f"{label} end to end: ckptio {e2e['time'] / limit:.2f}x {limit_name}, "
            f"{mm['time'] / e2e['time']:.2f}x faster than torch.load(mmap=True) + load_state_dict"]


def main(argv=None):
    from .harness import section_main

    return section_main(sys.modules[__name__], argv, "checkpoint to load (a dict with "
                        "'state_dict', or a state dict)", runs=5)


if __name__ == "__main__":
    sys.exit(child_or_main(child, main))

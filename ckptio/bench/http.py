"""HTTP download benchmark: ckptio against torch.hub, in one run.

The big checkpoint is served over loopback by tests/faultserver.py (no
faults, os.sendfile) in a child process, so the server never shares a GIL
with the client. Each method downloads the whole file into a directory
beside it, with the SHA-256 prefix checked (torch.hub: hashlib in its Python
read loop; ckptio: OpenSSL in C as the bytes arrive); the best of N runs
counts. ckptio is timed with its default fsync before the rename and without
it (torch.hub does not fsync). Two rows time both without a hash (what
load_url does unless check_hash: torch.hub then hashes nothing, nor does
ckptio). When the curl command is installed, a last row times the transfer
alone (curl -o /dev/null), the machine's limit.

    python -m ckptio.bench.http FILE [--runs N]
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

NOHASH_ROWS = ("no hash: ckptio, fsync=False", "no hash: torch.hub")
LIMIT_ROW = "limit: curl -o /dev/null (no write/hash)"
# the source tree's tests/faultserver.py (this file is ckptio/bench/http.py)
_FAULTSERVER = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                            "tests", "faultserver.py")


def _start_server(path):
    if not os.path.exists(_FAULTSERVER):
        raise FileNotFoundError(f"{_FAULTSERVER}: the benchmark needs the source tree's tests/")
    proc = subprocess.Popen(
        [sys.executable, _FAULTSERVER, path],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()
    if not line.strip().isdigit():
        proc.kill()
        raise RuntimeError(f"fault server did not start: {line!r}")
    return proc, int(line)


def _stop_server(proc):
    proc.stdin.close()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def measure(big_path, runs=3):
    """Downloads big_path from a loopback server runs times per method.
    Returns {"size", "runs", "sha256", "methods": {name: [wall seconds, ...]},
    "cpu": {name: [client CPU seconds (user + system, all threads), ...]}}.
    The CPU time tells the methods apart even on a loaded machine."""
    from .. import hub

    size = os.path.getsize(big_path)
    proc, port = _start_server(big_path)
    url = f"http://127.0.0.1:{port}/{os.path.basename(big_path)}"
    workdir = tempfile.mkdtemp(prefix="bench-http-", dir=os.path.dirname(os.path.abspath(big_path)))
    dst = os.path.join(workdir, "download.pth")
    try:
        # warm-up: the page cache of the source, and the digest to check against
        first = hub.download_url_to_file(url, dst, progress=False, fsync=False, sha256=True)
        prefix = first["sha256"][:16]
        os.remove(dst)

        def ckptio_fsync():
            hub.download_url_to_file(url, dst, prefix, progress=False)

        def ckptio_nofsync():
            hub.download_url_to_file(url, dst, prefix, progress=False, fsync=False)

        def torch_hub():
            import torch.hub

            torch.hub.download_url_to_file(url, dst, prefix, progress=False)

        def curl_devnull():
            out = subprocess.run(
                [curl, "-sSf", "-o", os.devnull, "-w", "%{size_download}", url],
                check=True, capture_output=True, text=True,
            )
            if int(float(out.stdout)) != size:
                raise RuntimeError(f"curl: downloaded {out.stdout} of {size} bytes")

        def ckptio_nohash():
            hub.download_url_to_file(url, dst, None, progress=False, fsync=False)

        def torch_hub_nohash():
            import torch.hub

            torch.hub.download_url_to_file(url, dst, None, progress=False)

        methods = {
            "ckptio.download_url_to_file": ckptio_fsync,
            "ckptio, fsync=False": ckptio_nofsync,
            "torch.hub.download_url_to_file": torch_hub,
            NOHASH_ROWS[0]: ckptio_nohash,
            NOHASH_ROWS[1]: torch_hub_nohash,
        }
        curl = shutil.which("curl")
        if curl is not None:
            # the loopback transfer alone: what the machine allows
            methods[LIMIT_ROW] = curl_devnull
        times = {name: [] for name in methods}
        cpu = {name: [] for name in methods}
        for _ in range(runs):
            for name, fn in methods.items():
                c0, t0 = os.times(), time.perf_counter()
                fn()
                t1, c1 = time.perf_counter(), os.times()
                times[name].append(t1 - t0)
                cpu[name].append(
                    c1.user - c0.user + c1.system - c0.system
                    + c1.children_user - c0.children_user
                    + c1.children_system - c0.children_system
                )
                if name != LIMIT_ROW:
                    got = os.path.getsize(dst)
                    if got != size:
                        raise RuntimeError(f"{name}: downloaded {got} of {size} bytes")
                    os.remove(dst)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        _stop_server(proc)
    return {"size": size, "runs": runs, "sha256": first["sha256"], "methods": times, "cpu": cpu}


def render(result):
    """The result of measure() as a text table, with ratios to torch.hub."""
    size = result["size"]
    best = {name: min(ts) for name, ts in result["methods"].items()}
    base = best.get("torch.hub.download_url_to_file")
    lines = [
        f"HTTP download over loopback: {size / 1e9:.2f} GB, SHA-256 checked during the "
        f"transfer (except 'no hash' rows), best of {result['runs']}",
        f"{'method':<40}{'time (s)':>10}{'GB/s':>8}{'vs torch.hub':>14}{'CPU s/GB':>10}",
    ]
    for name, t in best.items():
        ratio = f"{base / t:.2f}x" if base else "-"
        cpu = min(result.get("cpu", {}).get(name, [float("nan")])) / (size / 1e9)
        lines.append(f"{name:<40}{t:>10.3f}{size / t / 1e9:>8.2f}{ratio:>14}{cpu:>10.2f}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description="ckptio vs torch.hub HTTP download speed")
    parser.add_argument("file", help="the file to serve (a big checkpoint)")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    print(render(measure(args.file, args.runs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

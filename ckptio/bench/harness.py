"""python -m ckptio bench: ckptio against torch, safetensors and the machine's
limits, in one run, as ratios.

What the sections share: the generated checkpoints, the child side of a
timed method (time_in_child: the page cache warmed, the peak-RSS counter
reset, one run for the extra peak RSS and its private part, timed as the
"first" call, then the best of N runs), the memory columns, and the runner:
main() runs the sections named in --only, section_main() one section on
its own.
"""
import argparse
import importlib
import collections
import gc
import json
import os
import subprocess
import sys
import time

DEFAULT_DIR = "bench-data"

# ---------------------------------------------------------------- checkpoint


def vit_l_spec():
    """(name, shape) of an mmseg ViT-L/16 (UperNet-style heads, ADE20K),
    ~310M parameters in ~300 tensors."""
    d, hidden, layers = 1024, 4096, 24
    spec = [
        ("backbone.cls_token", (1, 1, d)),
        ("backbone.pos_embed", (1, 1025, d)),
        ("backbone.patch_embed.projection.weight", (d, 3, 16, 16)),
        ("backbone.patch_embed.projection.bias", (d,)),
    ]
    for i in range(layers):
        p = f"backbone.layers.{i}."
        spec += [
            (p + "ln1.weight", (d,)),
            (p + "ln1.bias", (d,)),
            (p + "attn.attn.in_proj_weight", (3 * d, d)),
            (p + "attn.attn.in_proj_bias", (3 * d,)),
            (p + "attn.attn.out_proj.weight", (d, d)),
            (p + "attn.attn.out_proj.bias", (d,)),
            (p + "ln2.weight", (d,)),
            (p + "ln2.bias", (d,)),
            (p + "ffn.layers.0.0.weight", (hidden, d)),
            (p + "ffn.layers.0.0.bias", (hidden,)),
            (p + "ffn.layers.1.weight", (d, hidden)),
            (p + "ffn.layers.1.bias", (d,)),
        ]
    spec += [("backbone.ln1.weight", (d,)), ("backbone.ln1.bias", (d,))]
    for name, c in (("decode_head", 256), ("auxiliary_head", 128)):
        spec += [
            (f"{name}.conv_seg.weight", (150, c, 1, 1)),
            (f"{name}.conv_seg.bias", (150,)),
            (f"{name}.bottleneck.conv.weight", (c, d, 3, 3)),
            (f"{name}.bottleneck.bn.weight", (c,)),
            (f"{name}.bottleneck.bn.bias", (c,)),
            (f"{name}.bottleneck.bn.running_mean", (c,)),
            (f"{name}.bottleneck.bn.running_var", (c,)),
            (f"{name}.bottleneck.bn.num_batches_tracked", ()),
        ]
    return spec


def small_spec(n=4000):
    """n small tensors (biases and norms of a deep network)."""
    return [(f"blocks.{i // 4}.unit{i % 4}.weight", (64,)) for i in range(n)]



def state_dict_of(obj):
    """The tensors of a checkpoint's state dict: obj["state_dict"] for an
    mmcv/mmengine checkpoint, obj itself for a plain state dict (what
    torch.save(model.state_dict()) writes); non-tensor entries are left out."""
    import torch

    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ValueError(f"the checkpoint holds a {type(obj).__name__}, not a state dict")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}

class SpecModel:
    """Builds an nn.Module whose state_dict has exactly the given keys."""

    @staticmethod
    def build(spec):
        import torch

        root = torch.nn.Module()
        for name, shape in spec:
            *path, leaf = name.split(".")
            mod = root
            for part in path:
                if not hasattr(mod, part):
                    mod.add_module(part, torch.nn.Module())
                mod = getattr(mod, part)
            dtype = torch.long if leaf == "num_batches_tracked" else torch.float32
            # written, as a built model's initialised parameters are (torch.zeros
            # of a large tensor is calloc: untouched pages, whose first-write
            # faults would be timed as part of the load)
            tensor = torch.ones(shape, dtype=dtype)
            if leaf.startswith(("running_", "num_batches")):
                mod.register_buffer(leaf, tensor)
            else:
                mod.register_parameter(leaf, torch.nn.Parameter(tensor, requires_grad=False))
        return root


def ade_meta():
    import numpy as np

    classes = tuple(f"class_{i}" for i in range(150))
    return {
        "mmseg_version": "1.2.2",
        "config": "model = dict(type='EncoderDecoder', backbone=dict(type='VisionTransformer'))\n" * 120,
        "CLASSES": classes,
        "PALETTE": [[i % 256, (7 * i) % 256, (13 * i) % 256] for i in range(150)],
        "epoch": 40,
        "iter": 160000,
        "seed": np.int64(1234),
        "hook_msgs": {"best_score": np.float64(0.4851), "best_ckpt": "work_dirs/best_mIoU_iter_160000.pth"},
        "message_hub": {
            "log_scalars": {"train/loss": np.array([0.52, 0.48, 0.41], dtype=np.float32)},
            "runtime_info": {"epoch": 40, "iter": 160000, "lr": np.float64(6e-6)},
        },
    }


def make_checkpoint(spec, with_meta=True, seed=0):
    import torch

    gen = torch.Generator().manual_seed(seed)
    sd = collections.OrderedDict()
    for name, shape in spec:
        if name.endswith("num_batches_tracked"):
            sd[name] = torch.tensor(160000)
        else:
            sd[name] = torch.randn(shape, generator=gen) * 0.02
    sd._metadata = collections.OrderedDict({"": {"version": 1}})
    if not with_meta:
        return {"state_dict": sd}
    head = [i for i, (n, _) in enumerate(spec) if "head" in n and "num_batches" not in n]
    names = [n for n, _ in spec]
    optimizer = {
        "state": {i: {"momentum_buffer": torch.zeros_like(sd[names[i]])} for i in head},
        "param_groups": [
            {"lr": 6e-6, "momentum": 0.9, "dampening": 0, "weight_decay": 0.01, "nesterov": False,
             "maximize": False, "foreach": None, "differentiable": False,
             "params": list(range(len(spec)))}
        ],
    }
    return {"meta": ade_meta(), "state_dict": sd, "optimizer": optimizer}


def ensure_files(directory):
    """The big and the small checkpoint (and a safetensors file of the same
    tensors), written with torch.save once and kept."""
    import torch

    os.makedirs(directory, exist_ok=True)
    files = {
        "big": os.path.join(directory, "vit_l_ade20k.pth"),
        "small": os.path.join(directory, "small_4000.pth"),
    }
    if not os.path.exists(files["big"]):
        print(f"writing {files['big']} (ViT-L-sized, ~1.3 GB) ...", file=sys.stderr)
        ckpt = make_checkpoint(vit_l_spec())
        torch.save(ckpt, files["big"] + ".part")
        os.replace(files["big"] + ".part", files["big"])
        del ckpt
    if not os.path.exists(files["small"]):
        torch.save(make_checkpoint(small_spec(), with_meta=False), files["small"] + ".part")
        os.replace(files["small"] + ".part", files["small"])
    return files


def flat_tensors(obj):
    """The tensors of obj's nested dicts under dotted keys, contiguous, as
    safetensors takes them."""
    import torch

    flat = {}

    def walk(prefix, o):
        if isinstance(o, torch.Tensor):
            flat[prefix] = o.contiguous()
        elif isinstance(o, dict):
            for k, v in o.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)

    walk("", obj)
    return flat


def tensors_in(obj):
    """Every tensor in obj's nested dicts, lists and tuples, each object once."""
    import torch

    out, stack, seen = [], [obj], set()
    while stack:
        o = stack.pop()
        if isinstance(o, torch.Tensor):
            if id(o) not in seen:
                seen.add(id(o))
                out.append(o)
        elif isinstance(o, dict):
            stack.extend(o.values())
        elif isinstance(o, (list, tuple)):
            stack.extend(o)
    return out


def safetensors_twin(path):
    """The tensors of a checkpoint as a .safetensors file (flattened keys)."""
    import torch
    from safetensors.torch import save_file

    out = path + ".safetensors"
    if os.path.exists(out):
        return out
    save_file(flat_tensors(torch.load(path, weights_only=False)), out + ".part")
    os.replace(out + ".part", out)
    return out


# --------------------------------------------------------------- child side


def _status():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(rest.split()[0]) * 1024
    return out


class _AnonSampler:
    """Peak private (anonymous) RSS while a run lasts, sampled every ms.

    The kernel keeps a high-water mark only for the total RSS, which also
    counts file pages mapped from the page cache (what a mapped checkpoint
    touches); the anonymous part is what a load really allocates."""

    def __init__(self):
        import threading

        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _status()["RssAnon"])
            self._stop.wait(0.001)

    def __enter__(self):
        self.peak = _status()["RssAnon"]
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _status()["RssAnon"])


def _reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _warm(path):
    with open(path, "rb", buffering=0) as f:
        while f.read(64 << 20):
            pass


def measured_call(fn):
    """Calls fn once, timed, with the peak-RSS counter reset and the private
    RSS sampled while it runs. Returns (its result, seconds, {peak_extra,
    anon_extra}: the peak total and private RSS above those before it)."""
    gc.collect()
    base = _status()
    reset = _reset_peak()
    with _AnonSampler() as anon:
        t0 = time.perf_counter()
        result = fn()
        elapsed = time.perf_counter() - t0
    after = _status()
    peak = after["VmHWM"] if reset else max(after["VmRSS"], base["VmRSS"])
    mem = {
        "peak_extra": max(0, peak - base["VmRSS"]),
        "anon_extra": max(0, anon.peak - base["RssAnon"]),
    }
    return result, elapsed, mem


def timed_runs(fn, runs, before=None):
    """The times of `runs` calls of fn, each after before() (untimed, when
    given) and a gc.collect(); each result is dropped before the next run."""
    times = []
    for _ in range(runs):
        if before:
            before()
        gc.collect()
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
        del result
    return times


def time_in_child(fn, runs, warm=()):
    """In a benchmark child: warms the page cache with the files in warm,
    runs fn once for its extra peak RSS (total, and private) and its first
    (cold-allocator) time, then runs it `runs` more times. Returns the dict
    the parent reads: time (best), first, times, peak_extra, anon_extra."""
    for path in warm:
        _warm(path)
    result, first, mem = measured_call(fn)
    del result
    times = timed_runs(fn, runs)
    return {"time": min(times), "first": first, "times": times, **mem}


def child_command(module, *args):
    """The command line of a section's child: ``python -m <module> --child
    JSON``, args as one JSON list (child_or_main gives them back)."""
    return [sys.executable, "-m", module, "--child", json.dumps(args)]


def child_result(method, returncode, out, err):
    """The JSON object of the last line a child printed; a child that failed
    raises RuntimeError with the end of its stderr."""
    if returncode != 0:
        raise RuntimeError(f"benchmark child {method!r} failed:\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1])


def run_child(module, method, *args, env=None):
    """Runs the child of a section module for method (child_command) to its
    end; returns child_result."""
    out = subprocess.run(child_command(module, method, *args), capture_output=True, text=True,
                         env=env)
    return child_result(method, out.returncode, out.stdout, out.stderr)


def child_or_main(child, main):
    """A section module's ``__main__``: ``--child JSON`` (child_command's)
    calls child with those arguments, anything else main(); what it returns
    is the exit status."""
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return child(*json.loads(sys.argv[2]))
    return main()


def timing_table(title, rows, size, heads, cells):
    """The lines of a table of time_in_child results on a file of size
    bytes: title ("... (N GB)"), a header, then a line a row: method, best
    and first ms, the section's own columns (heads, and cells(t) for a row
    whose best time is t), the peak extra RSS and private peak, in MB and as
    a share of size."""
    lines = [f"{title} ({size / 1e9:.2f} GB)", "",
             f"{'method':<26}{'time ms':>10}{'first ms':>10}{heads}{'peak extra RSS':>16}"
             f"{'private peak':>14}"]
    for name, r in rows.items():
        t = r["time"]
        lines.append(
            f"{name:<26}{t * 1e3:>10.1f}{r.get('first', t) * 1e3:>10.1f}{cells(t)}"
            f"{r['peak_extra'] / 1e6:>11.0f} MB {100 * r['peak_extra'] / size:>3.0f}%"
            f"{r['anon_extra'] / 1e6:>9.0f} MB {100 * r['anon_extra'] / size:>3.0f}%"
        )
    return lines


def per_tensor_rows(module, methods, small_path, tensors, runs, arg):
    """The per-tensor cost on small_path, a checkpoint of `tensors` small
    tensors: each method's child (run_child(module, method, small_path, arg,
    runs)) with its best time per tensor, per_tensor_us. Returns {file,
    tensors, rows}, as per_tensor_lines takes it."""
    small = {"file": small_path, "tensors": tensors, "rows": {}}
    for method in methods:
        r = run_child(module, method, small_path, arg, runs)
        r["per_tensor_us"] = r["time"] / max(tensors, 1) * 1e6
        small["rows"][method] = r
    return small


def per_tensor_lines(small, width):
    """per_tensor_rows' result as lines of text (method names in width)."""
    lines = ["", f"per-tensor cost ({small['tensors']} small tensors):"]
    for name, r in small["rows"].items():
        lines.append(f"  {name:<{width}}{r['time'] * 1e3:8.2f} ms  "
                     f"{r['per_tensor_us']:6.2f} us/tensor")
    return lines


def section_main(module, argv, file_help, runs=3, small_help=None):
    """``python -m ckptio.bench.<section> FILE [--runs N] [--json]``: one
    section on its own, measured and rendered (or printed as JSON) by the
    section module's measure(path, runs) and render(result). With
    small_help, a --small FILE option too, passed on as measure's
    small_path (a checkpoint of many small tensors)."""
    parser = argparse.ArgumentParser(prog=getattr(module.__spec__, "name", module.__name__),
                                     description=module.__doc__.splitlines()[0])
    parser.add_argument("file", help=file_help)
    if small_help:
        parser.add_argument("--small", help=small_help)
    parser.add_argument("--runs", type=int, default=runs, help="runs per method (best is kept)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    extra = {"small_path": args.small} if small_help else {}
    result = module.measure(args.file, args.runs, **extra)
    print(json.dumps(result, indent=2) if args.json else module.render(result))
    return 0


# One run measures every section, each in its own module with the same
# measure(path, runs) -> dict and render(dict) -> str (load and save also take
# small_path, the checkpoint of many small tensors).
SECTIONS = {
    "load": ".load",
    "save": ".save",
    "mmcv": ".mmcv",
    "http": ".http",
    "dcp": ".dcp",
    "async": ".asyncsave",
    "cold": ".cold",
}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="ckptio bench", description=__doc__.splitlines()[0])
    parser.add_argument("file", nargs="?", help="checkpoint to measure (default: generated)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--runs", type=int, default=5, help="runs per method (best is kept)")
    parser.add_argument("--dir", default=DEFAULT_DIR, help="where generated files are kept")
    parser.add_argument(
        "--only",
        default=",".join(SECTIONS),
        help="comma-separated sections to run (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    only = [s for s in args.only.split(",") if s]
    unknown = sorted(set(only) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    files = ensure_files(args.dir)
    if args.file:
        files["big"] = args.file
    results, texts = {}, []
    for name in only:
        print(f"section {name}:", file=sys.stderr)
        mod = importlib.import_module(SECTIONS[name], __package__)
        extra = {"small_path": files["small"]} if name in ("load", "save") else {}
        r = mod.measure(files["big"], args.runs, **extra)
        results[name] = r
        texts.append(f"== {name}\n{mod.render(r)}")
    print(json.dumps(results, indent=2) if args.json else "\n\n".join(texts))
    return 0


if __name__ == "__main__":
    sys.exit(main())

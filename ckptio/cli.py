"""The ckptio command line (console script `ckptio`, or `python -m ckptio`).

    ckptio info FILE [--json] [--unsafe] [--allow openmmlab|none] [--depth N] [--max-keys N]
    ckptio verify FILE... [--quiet] [--json] [--unsafe] [--allow openmmlab|none]
    ckptio convert IN OUT [--to torch|safetensors|dcp] [--revise-keys PATTERN=REPL]...
                          [--unsafe] [--allow ...] [--quiet]

Files are decoded with weights_only and allow='openmmlab' (numpy values and
mmengine's HistoryBuffer, built data-only) unless --allow none or --unsafe.
    ckptio bench [...]

Exit status: 0 all is well, 1 a problem was found (damage, a file that
cannot be read or written, a refused global), 2 usage errors, 141 when the
reader of stdout went away (| head). Messages go to stderr as "ckptio: ...";
results to stdout (--json for scripts). Everything printed that comes from
a file (names, keys, meta, messages) has its control characters escaped, so
a hostile file cannot send escape sequences to the terminal.

info reads the pickle without torch and without running anything
(ckptio._inspect); verify needs no torch either (see ckptio.verify).
"""
import argparse
import collections
import json
import os
import re
import sys
import time

OK, PROBLEM, USAGE = 0, 1, 2


class _Usage(Exception):
    """A usage error found after parsing (exit status 2)."""


def _say(args, text):
    """Progress to stderr (not with --quiet)."""
    if not getattr(args, "quiet", False):
        _print(f"ckptio: {text}", file=sys.stderr)
        sys.stderr.flush()


def _clean(text):
    """text with every character that is not printable (control characters,
    escape sequences, bidirectional overrides, line separators) written as a
    Python escape, so that nothing a file names can drive the terminal."""
    text = str(text)
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if ch.isprintable():
            out.append(ch)
        else:
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else
                       f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
    return "".join(out)


def _print(*lines, file=None):
    """Prints lines of results, each cleaned of control characters."""
    out = sys.stdout if file is None else file
    for line in lines:
        out.write("\n".join(_clean(part) for part in str(line).split("\n")) + "\n")


def _format_of(path):
    """The container format by its first bytes (as the loader decides); for
    a directory, the sharded layout it holds."""
    if os.path.isdir(path):
        return "dcp" if os.path.isfile(os.path.join(path, ".metadata")) else "rank files"
    from ._inspect import _format

    with open(path, "rb") as f:
        head = f.read(262)
        size = os.fstat(f.fileno()).st_size
    return _format(head, size)


def _load(path, unsafe, allow):
    """(object, format) of a torch checkpoint or a safetensors file."""
    import ckptio

    fmt = _format_of(path)
    if fmt == "safetensors":
        import safetensors.torch

        return safetensors.torch.load_file(path), fmt
    return ckptio.load(path, map_location="cpu", weights_only=not unsafe, allow=allow), fmt


def _tensors(obj, prefix="", seen=None):
    """(dotted path, tensor) for every tensor inside dicts, lists and tuples."""
    import torch

    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        yield prefix or "<root>", obj
        return
    if id(obj) in seen:
        return
    if isinstance(obj, dict):
        seen.add(id(obj))
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}.{k}" if prefix else str(k), seen)
    elif isinstance(obj, (list, tuple)):
        seen.add(id(obj))
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}.{i}" if prefix else str(i), seen)


def _short(value, limit=80):
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def human(n):
    """1536 -> '1.5 KiB'; bytes in binary units as torch.hub and du -h."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _count(n):
    """4321000 -> '4.32M' (parameter counts as model summaries give them)."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _describe(value):
    """A JSON-able description of one top-level value."""
    from ._inspect import Opaque, Tensor

    if isinstance(value, Tensor):
        return {"type": "Parameter" if value.parameter else "Tensor", "dtype": value.dtype,
                "shape": list(value.shape)}
    if isinstance(value, (dict, list, tuple, set, frozenset)):
        return {"type": type(value).__name__, "items": len(value)}
    if isinstance(value, Opaque):
        return {"type": value.global_name}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"type": type(value).__name__, "value": value}
    return {"type": type(value).__name__, "repr": _short(value)}


def _describe_text(d):
    if "dtype" in d:
        return f"{d['type']} {d['dtype']} {d['shape']}"
    if "items" in d:
        return f"{d['type']} of {d['items']} items"
    if "value" in d:
        return _short(d["value"])
    return d.get("repr", f"<{d['type']}>")


def _jsonable(value, depth=0):
    """meta as JSON values: containers kept, anything else by its repr."""
    from ._inspect import Tensor

    if depth > 20:
        return "..."
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Tensor):
        return f"<Tensor {value.dtype} {list(value.shape)}>"
    if isinstance(value, dict):
        return {str(k): _jsonable(v, depth + 1) for k, v in list(value.items())[:1000]}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v, depth + 1) for v in list(value)[:1000]]
    return _short(value, 200)


def _tree(tensors, depth):
    """Nested {name: {"tensors", "parameters", "bytes", "children"}} of the
    dotted key paths, down to depth levels."""
    root = {"tensors": 0, "parameters": 0, "bytes": 0, "children": {}}
    for path, t in tensors:
        node = root
        parts = path.split(".")
        for part in [None] + parts[:depth]:
            if part is not None:
                node = node["children"].setdefault(
                    part, {"tensors": 0, "parameters": 0, "bytes": 0, "children": {}})
            node["tensors"] += 1
            node["parameters"] += t.numel
            node["bytes"] += t.nbytes
    return root


def _tree_lines(node, indent, max_keys):
    lines = []
    children = list(node["children"].items())
    for name, child in children[:max_keys]:
        lines.append(f"{'  ' * indent}{name}: {_count(child['parameters'])} parameters in "
                     f"{child['tensors']} tensors, {human(child['bytes'])}")
        lines += _tree_lines(child, indent + 1, max_keys)
    if len(children) > max_keys:
        lines.append(f"{'  ' * indent}... {len(children) - max_keys} more")
    return lines


def info(args):
    """Reads the pickle without torch and without running it (_inspect)."""
    from ._allow import allowed_by
    from ._inspect import InspectError, inspect, is_weights_only_safe, walk

    path = args.file
    start = time.perf_counter()
    if os.path.isdir(path):
        raise ValueError(f"{path}: a directory ({_format_of(path)}): ckptio info reads one file "
                         "(ckptio convert makes one file of a sharded checkpoint)")
    try:
        found = inspect(path)
    except InspectError as exc:
        raise ValueError(f"{path}: {exc}") from None
    obj, fmt = found["object"], found["format"]
    data_sets = _allow(args)
    refused = sorted(g for g in found["globals"]
                     if not is_weights_only_safe(g) and not allowed_by(g, data_sets))
    if refused and not args.unsafe:
        in_set = [g for g in refused if allowed_by(g, "openmmlab")]
        hint = (f"; allow='openmmlab' decodes {', '.join(in_set)} as data (the default, "
                "without --allow none)") if in_set else ""
        raise ValueError(
            f"{path}: the pickle names globals outside the weights-only allowlist: "
            f"{', '.join(refused)} (ckptio.load refuses the file unless they are allowed{hint}; "
            "ckptio info --unsafe describes it anyway: info never runs them)")
    tensors = list(walk(obj))
    by_dtype = collections.OrderedDict()
    storages = {}
    for _, t in tensors:
        n, p, b = by_dtype.get(t.dtype, (0, 0, 0))
        by_dtype[t.dtype] = (n + 1, p + t.numel, b + t.nbytes)
        if t.storage is not None:
            st = t.storage
            storages[st.key] = max(storages.get(st.key, 0),
                                   st.numel * _element_size(st.dtype))
    result = {
        "file": path,
        "format": fmt,
        "bytes": found["bytes"],
        "records": found["records"],
        "tensors": len(tensors),
        "parameters": sum(t.numel for _, t in tensors),
        "tensor_bytes": sum(t.nbytes for _, t in tensors),
        "storages": len(storages),
        "storage_bytes": sum(storages.values()),
        "dtypes": {k: {"tensors": n, "parameters": p, "bytes": b}
                   for k, (n, p, b) in by_dtype.items()},
        "tree": _tree(tensors, args.depth)["children"],
        "top_level": None,
        "meta": None,
        "globals": refused,
    }
    if isinstance(obj, dict):
        result["top_level"] = {str(k): _describe(v) for k, v in obj.items()}
        meta = obj.get("meta")
        if meta is not None:
            result["meta"] = _jsonable(meta)
    else:
        result["top_level"] = _describe(obj)
    elapsed = time.perf_counter() - start
    if args.json:
        print(json.dumps(result, indent=1))
        return OK
    _print(f"{path}: {fmt} format, {human(result['bytes'])} ({result['bytes']} bytes)"
           + (f", {result['records']} records" if result["records"] is not None else ""))
    _print(f"parameters: {_count(result['parameters'])} ({result['parameters']:,}) in "
           f"{len(tensors)} tensors, {human(result['tensor_bytes'])}; "
           f"{len(storages)} storages, {human(result['storage_bytes'])}")
    for k, (n, p, b) in by_dtype.items():
        _print(f"  {k:>10}: {n} tensors, {_count(p)} parameters, {human(b)}")
    if result["tree"]:
        _print(f"keys by prefix (depth {args.depth}):")
        _print(*_tree_lines({"children": result["tree"]}, 1, args.max_keys))
    if isinstance(obj, dict):
        _print(f"top-level keys ({len(result['top_level'])}):")
        for k, d in list(result["top_level"].items())[: args.max_keys]:
            _print(f"  {k}: {_describe_text(d)}")
        if len(result["top_level"]) > args.max_keys:
            _print(f"  ... {len(result['top_level']) - args.max_keys} more")
    else:
        _print(f"top level: {_describe_text(result['top_level'])}")
    if result["meta"] is not None:
        _print("meta:")
        meta = result["meta"]
        for k, v in (meta.items() if isinstance(meta, dict) else [("", meta)]):
            _print(f"  {k}: {_short(v, 100)}")
    if refused:
        _print(f"globals outside the weights-only allowlist: {', '.join(refused)}")
    _say(args, f"read in {elapsed:.2f} s")
    return OK


def _element_size(dtype):
    from ._inspect import _ELEMENT_SIZES

    return _ELEMENT_SIZES.get(dtype, 1)


def _report_dict(r):
    return {"file": r.name, "format": r.format, "ok": r.ok, "counts": r.counts,
            "problems": [{"kind": p.kind, "record": p.record, "offset": p.offset,
                          "message": p.message} for p in r.problems],
            "notes": list(getattr(r, "notes", []))}


def verify(args):
    """Every file is reported, also after one that is missing or unreadable;
    with --json the list holds every report."""
    from .verification import Problem, VerifyReport

    import ckptio

    status = OK
    reports = []
    for path in args.files:
        _say(args, f"verifying {path}")
        try:
            report = ckptio.verify(path, weights_only=not args.unsafe, allow=_allow(args))
        except OSError as exc:
            report = VerifyReport(path, "unreadable", [
                Problem("io", None, None, exc.strerror or str(exc))], {})
        except (ckptio.CheckpointError, ValueError) as exc:
            report = VerifyReport(path, "unknown", [Problem("format", None, None, str(exc))], {})
        reports.append(report)
        if not report.ok:
            status = PROBLEM
        if not args.json:
            _print(report.summary() if not args.quiet else
                   f"{path}: {'ok' if report.ok else 'PROBLEM: ' + str(report.problems[0])}")
    if args.json:
        print(json.dumps([_report_dict(r) for r in reports], indent=1))
    return status


def _revise(state, rules):
    out = collections.OrderedDict()
    for k, v in state.items():
        new = k
        for pattern, repl in rules:
            new = pattern.sub(repl, new)
        if new in out:
            raise ValueError(f"--revise-keys maps two keys to {new!r}")
        out[new] = v
    if isinstance(state, collections.OrderedDict) and hasattr(state, "_metadata"):
        out._metadata = state._metadata
    return out


def _save_torch(obj, path):
    """Writes the torch zip format, atomically (ckptio.save)."""
    from .saving import save

    save(obj, path)


def _save_safetensors(obj, path):
    import torch
    from safetensors.torch import save_file

    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        bad = next((k for k, v in obj.items() if not isinstance(v, torch.Tensor)), None) \
            if isinstance(obj, dict) else None
        raise ValueError(
            "safetensors holds only a flat dict of tensors"
            + (f"; key {bad!r} is not a tensor" if bad is not None else ""))
    seen = set()
    tensors = {}
    for k, v in obj.items():
        st = v.untyped_storage() if hasattr(v, "untyped_storage") else v.storage()  # torch 1.13
        ident = (st.data_ptr(), v.device.type)
        if ident in seen or not v.is_contiguous():
            v = v.contiguous().clone()  # safetensors refuses shared or strided memory
        seen.add(ident)
        tensors[str(k)] = v
    save_file(tensors, path)


def convert(args):
    rules = []
    for rule in args.revise_keys:
        if "=" not in rule:
            raise _Usage(f"--revise-keys takes PATTERN=REPL, got {rule!r}")
        pattern, repl = rule.split("=", 1)
        try:
            rules.append((re.compile(pattern), repl))
        except re.error as exc:
            raise _Usage(f"--revise-keys: bad pattern {pattern!r}: {exc}") from None
    out_fmt = args.to or (
        "safetensors" if args.output.endswith(".safetensors")
        else "dcp" if args.output.endswith(("/", os.sep)) or os.path.isdir(args.output)
        else "torch")
    start = time.perf_counter()
    _say(args, f"loading {args.input}")
    from . import _direct

    with _direct.capture() as seen:  # the file's mapping, for read-ahead while it is written out
        obj, fmt = _load(args.input, args.unsafe, _allow(args))
    n = sum(1 for _ in _tensors(obj))
    _say(args, f"loaded {fmt} format, {n} tensors ({time.perf_counter() - start:.2f} s)")
    if rules or out_fmt == "safetensors":
        holder = None
        state = obj
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            holder, state = obj, obj["state_dict"]
        if not isinstance(state, dict):
            raise ValueError(f"{args.input} holds a {type(state).__name__}, not a state dict")
        if rules:
            state = _revise(state, rules)
        if out_fmt == "safetensors":
            obj = state  # safetensors has no room for the rest (meta, optimizer)
            if holder is not None and len(holder) > 1:
                _say(args, "safetensors keeps only the state_dict: "
                     + ", ".join(str(k) for k in holder if k != "state_dict") + " dropped")
        elif holder is not None:
            obj = dict(holder)
            obj["state_dict"] = state
        else:
            obj = state
    _say(args, f"writing {args.output} ({out_fmt})")
    with _direct.read_ahead(seen, (t for _, t in _tensors(obj))):  # read in about file order
        _write(obj, args.output, out_fmt)
    _say(args, f"done in {time.perf_counter() - start:.2f} s")
    return OK


def _write(obj, output, out_fmt):
    if out_fmt == "dcp":
        from .dcp import save_dir

        save_dir(obj, output)  # each file atomic, .metadata last
        return
    tmp = output + ".ckptio-tmp"
    try:
        if out_fmt == "safetensors":
            _save_safetensors(obj, tmp)
        else:
            _save_torch(obj, tmp)
        os.replace(tmp, output)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


ALLOW_HELP = ("data decoded beyond torch's allowlist: 'openmmlab' (default: numpy values and "
              "mmengine's HistoryBuffer, built data-only) or 'none' (torch's allowlist only)")


def _allow(args):
    return None if args.allow == "none" else args.allow


def _parser():
    from ._version import __version__

    parser = argparse.ArgumentParser(prog="ckptio", description="PyTorch checkpoint tools")
    parser.add_argument("--version", action="version", version=f"ckptio {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("info", help="format, records, tensors by dtype, keys, meta")
    p.add_argument("file")
    p.add_argument("--json", action="store_true", help="print a JSON object")
    p.add_argument("--unsafe", action="store_true",
                   help="describe a file whose pickle names globals outside the weights-only "
                        "allowlist (info never runs them)")
    p.add_argument("--allow", choices=["openmmlab", "none"], default="openmmlab",
                   help=ALLOW_HELP)
    p.add_argument("--max-keys", type=int, default=50,
                   help="keys shown per level (default 50)")
    p.add_argument("--depth", type=int, default=3,
                   help="levels of the key tree by prefix (default 3)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(run=info)
    p = sub.add_parser("verify", help="check CRCs, container, storages and pickle")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--json", action="store_true", help="print a JSON list of reports")
    p.add_argument("-q", "--quiet", action="store_true", help="one line per file, no progress")
    p.add_argument("--unsafe", action="store_true",
                   help="weights_only=False: run any global the file names (trusted files only)")
    p.add_argument("--allow", choices=["openmmlab", "none"], default="openmmlab",
                   help=ALLOW_HELP)
    p.set_defaults(run=verify)
    p = sub.add_parser("convert", help="torch zip <-> safetensors <-> DCP directory, legacy -> "
                                       "zip, sharded -> whole, key renames")
    p.add_argument("input", metavar="IN",
                   help="a checkpoint file, a torch.distributed.checkpoint directory or a "
                        "directory of rank{i}.pth files")
    p.add_argument("output", metavar="OUT",
                   help="*.safetensors writes safetensors; an existing directory or a name "
                        "ending in / a DCP checkpoint; anything else torch's zip format")
    p.add_argument("--to", choices=["torch", "safetensors", "dcp"],
                   help="output format (default: OUT's)")
    p.add_argument("--revise-keys", action="append", default=[], metavar="PATTERN=REPL",
                   help="rename state-dict keys with re.sub (repeatable), e.g. '^module\\.='")
    p.add_argument("--unsafe", action="store_true",
                   help="weights_only=False: run any global the file names (trusted files only)")
    p.add_argument("--allow", choices=["openmmlab", "none"], default="openmmlab",
                   help=ALLOW_HELP)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(run=convert)
    sub.add_parser("bench", help="measure loading and saving (ckptio bench --help)",
                   add_help=False)
    return parser


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _main(argv)
    except BrokenPipeError:
        # the reader went away (ckptio info x | head): stop quietly, and keep
        # the interpreter's final flush from printing a traceback
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):
            pass
        return 128 + 13  # as a process ended by SIGPIPE


def _main(argv):
    if argv and argv[0] == "bench":
        from . import bench

        return bench.main(argv[1:])
    parser = _parser()
    if not argv:
        parser.print_help(sys.stderr)
        return USAGE
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else USAGE
    if args.command is None:
        parser.print_help(sys.stderr)
        return USAGE
    from ._native import CheckpointError

    try:
        status = args.run(args)
        sys.stdout.flush()
        return status
    except BrokenPipeError:
        raise
    except _Usage as exc:
        _print(f"ckptio {args.command}: error: {exc}", file=sys.stderr)
        return USAGE
    except (CheckpointError, OSError, ValueError) as exc:
        _print(f"ckptio {args.command}: {exc}", file=sys.stderr)
        return PROBLEM
    except ImportError as exc:  # torch (or safetensors) absent for what was asked
        _print(f"ckptio {args.command}: {exc}", file=sys.stderr)
        return PROBLEM
    except Exception as exc:  # noqa: BLE001 - torch and safetensors raise their own kinds
        _print(f"ckptio {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return PROBLEM


if __name__ == "__main__":
    sys.exit(main())

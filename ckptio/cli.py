"""The ckptio command line (console script `ckptio`, or `python -m ckptio`).

    ckptio info FILE [--json] [--unsafe] [--allow openmmlab|none]
    ckptio verify FILE... [--quiet] [--json] [--unsafe] [--allow openmmlab|none]
    ckptio convert IN OUT [--revise-keys PATTERN=REPL]... [--unsafe] [--allow ...] [--quiet]

Files are decoded with weights_only and allow='openmmlab' (numpy values and
mmengine's HistoryBuffer, built data-only) unless --allow none or --unsafe.
    ckptio bench [...]

Exit status: 0 all is well, 1 a problem was found (damage, a file that
cannot be read or written, a refused global), 2 usage errors. Messages go
to stderr as "ckptio: ..."; results to stdout (--json for scripts).
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
        print(f"ckptio: {text}", file=sys.stderr, flush=True)


def _format_of(path):
    """The container format by its first bytes (as the loader decides)."""
    with open(path, "rb") as f:
        head = f.read(262)
        size = os.fstat(f.fileno()).st_size
    # safetensors: an 8-byte header length, then the JSON header (checked
    # first: the length's first byte may be 0x80, a pickle's first byte)
    if len(head) > 8 and head[8:9] == b"{" and 8 + int.from_bytes(head[:8], "little") <= size:
        return "safetensors"
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head.startswith(b"PYTORCH1"):
        return "pytorch1"
    if head[257:262] == b"ustar":
        return "tar"
    if head[:1] in (b"\x80", b"L"):  # PROTO, or LONG (pickle protocols 0 and 1)
        return "legacy"
    return "unknown"


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


def _describe(value):
    import torch

    if isinstance(value, torch.Tensor):
        return f"Tensor {str(value.dtype).replace('torch.', '')} {list(value.shape)}"
    if isinstance(value, dict):
        return f"{type(value).__name__} of {len(value)} items"
    if isinstance(value, (list, tuple)):
        return f"{type(value).__name__} of {len(value)} items"
    return _short(value)


def info(args):
    import torch

    path = args.file
    start = time.perf_counter()
    obj, fmt = _load(path, args.unsafe, _allow(args))
    records = None
    if fmt == "zip":
        import zipfile

        with zipfile.ZipFile(path) as z:
            records = len(z.infolist())
    by_dtype = collections.OrderedDict()
    storages = set()
    storage_bytes = 0
    count = 0
    for _, t in _tensors(obj):
        count += 1
        key = str(t.dtype).replace("torch.", "")
        n, b = by_dtype.get(key, (0, 0))
        by_dtype[key] = (n + 1, b + t.numel() * t.element_size())
        st = t.untyped_storage()
        ident = (st.data_ptr(), st.nbytes(), t.device.type)
        if ident not in storages:
            storages.add(ident)
            storage_bytes += st.nbytes()
    result = {
        "file": path,
        "format": fmt,
        "bytes": os.path.getsize(path),
        "records": records,
        "tensors": count,
        "storage_bytes": storage_bytes,
        "dtypes": {k: {"tensors": n, "bytes": b} for k, (n, b) in by_dtype.items()},
        "top_level": None,
        "meta": None,
    }
    if isinstance(obj, dict):
        result["top_level"] = {str(k): _describe(v) for k, v in obj.items()}
        meta = obj.get("meta")
        if meta is not None:
            result["meta"] = json.loads(json.dumps(meta, default=_short))
    else:
        result["top_level"] = _describe(obj)
    elapsed = time.perf_counter() - start
    if args.json:
        print(json.dumps(result, indent=1))
        return OK
    print(f"{path}: {fmt} format, {result['bytes']} bytes"
          + (f", {records} records" if records is not None else ""))
    print(f"tensors: {count}, {storage_bytes} bytes in {len(storages)} storages")
    for k, (n, b) in by_dtype.items():
        print(f"  {k:>10}: {n} tensors, {b} bytes")
    if isinstance(result["top_level"], dict):
        print(f"top-level keys ({len(result['top_level'])}):")
        for k, d in list(result["top_level"].items())[: args.max_keys]:
            print(f"  {k}: {d}")
        if len(result["top_level"]) > args.max_keys:
            print(f"  ... {len(result['top_level']) - args.max_keys} more")
    else:
        print(f"top level: {result['top_level']}")
    if result["meta"] is not None:
        print("meta:")
        meta = result["meta"]
        for k, v in (meta.items() if isinstance(meta, dict) else [("", meta)]):
            print(f"  {k}: {_short(v, 100)}")
    _say(args, f"read in {elapsed:.2f} s")
    del torch
    return OK


def verify(args):
    import ckptio

    status = OK
    reports = []
    for path in args.files:
        _say(args, f"verifying {path}")
        report = ckptio.verify(path, weights_only=not args.unsafe, allow=_allow(args))
        reports.append(report)
        if not report.ok:
            status = PROBLEM
        if not args.json:
            print(report.summary() if not args.quiet else
                  f"{path}: {'ok' if report.ok else 'PROBLEM: ' + str(report.problems[0])}")
    if args.json:
        print(json.dumps([
            {"file": r.name, "format": r.format, "ok": r.ok, "counts": r.counts,
             "problems": [{"kind": p.kind, "record": p.record, "offset": p.offset,
                           "message": p.message} for p in r.problems]}
            for r in reports], indent=1))
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
    from ._save import save

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
        st = v.untyped_storage()
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
    out_fmt = args.to or ("safetensors" if args.output.endswith(".safetensors") else "torch")
    start = time.perf_counter()
    _say(args, f"loading {args.input}")
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
    tmp = args.output + ".ckptio-tmp"
    try:
        if out_fmt == "safetensors":
            _save_safetensors(obj, tmp)
        else:
            _save_torch(obj, tmp)
        os.replace(tmp, args.output)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _say(args, f"done in {time.perf_counter() - start:.2f} s")
    return OK


ALLOW_HELP = ("data decoded beyond torch's allowlist: 'openmmlab' (default: numpy values and "
              "mmengine's HistoryBuffer, built data-only) or 'none' (torch's allowlist only)")


def _allow(args):
    return None if args.allow == "none" else args.allow


def _parser():
    parser = argparse.ArgumentParser(prog="ckptio", description="PyTorch checkpoint tools")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("info", help="format, records, tensors by dtype, keys, meta")
    p.add_argument("file")
    p.add_argument("--json", action="store_true", help="print a JSON object")
    p.add_argument("--unsafe", action="store_true",
                   help="weights_only=False: run any global the file names (trusted files only)")
    p.add_argument("--allow", choices=["openmmlab", "none"], default="openmmlab",
                   help=ALLOW_HELP)
    p.add_argument("--max-keys", type=int, default=50, help="top-level keys shown (default 50)")
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
    p = sub.add_parser("convert", help="torch zip <-> safetensors, legacy -> zip, key renames")
    p.add_argument("input", metavar="IN")
    p.add_argument("output", metavar="OUT",
                   help="*.safetensors writes safetensors, anything else torch's zip format")
    p.add_argument("--to", choices=["torch", "safetensors"], help="output format (default: OUT's)")
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
    import ckptio

    try:
        return args.run(args)
    except _Usage as exc:
        print(f"ckptio {args.command}: error: {exc}", file=sys.stderr)
        return USAGE
    except (ckptio.CheckpointError, OSError, ValueError) as exc:
        print(f"ckptio {args.command}: {exc}", file=sys.stderr)
        return PROBLEM
    except Exception as exc:  # noqa: BLE001 - torch and safetensors raise their own kinds
        print(f"ckptio {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return PROBLEM


if __name__ == "__main__":
    sys.exit(main())

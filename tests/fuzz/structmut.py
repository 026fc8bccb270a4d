"""The structure-aware mutator of fuzz_legacy (LLVMFuzzerCustomMutator):
mutations of real torch files that keep them well-formed where byte-level
mutation would stop at the first CRC or zip check, so that they reach the
pickle machine, the storage table and the tensor builders.

mutate(data, seed, max_size, byte_mutate) -> bytes, where byte_mutate(b, n)
is libFuzzer's own mutator (LLVMFuzzerMutate) on b, up to n bytes. For a zip
archive one of:
  - data.pkl mutated by libFuzzer, the archive rewritten (CRCs, sizes and
    offsets right);
  - token swaps in data.pkl: a storage type, dtype or rebuild function for
    another of torch's allowlist (from tests/torchspace.py), a storage key
    for another (shared storages, missing records), an element count or
    size changed;
  - record operations: a storage record dropped, cut, doubled, duplicated
    under another key, thousands of empty records added, records deflated;
  - a tensor entry repeated many times (many records, many tensors);
for a legacy stream: token swaps in its pickles, or a long view chain
(torchspace.legacy_view_chain); otherwise, or one time in four, libFuzzer's
mutation of the whole file.
"""
import io
import random
import re
import zipfile

import torchspace

_TOKENS = None


def _tokens():
    global _TOKENS
    if _TOKENS is None:
        stypes = [f"c{m}\n{n}\n".encode() for m, n, _ in torchspace.storage_types()]
        dtypes = [torchspace.dtype_global(d) for d in torchspace.dtypes()]
        fns = [f"ctorch._utils\n{f}\n".encode() for f in torchspace.rebuild_functions()
               if f != "_rebuild_from_type_v2"]
        _TOKENS = (stypes, dtypes, fns)
    return _TOKENS


_STORAGE_RE = re.compile(rb"ctorch(?:\.cuda|\.storage)?\n\w+Storage\n")
_DTYPE_RE = re.compile(rb"ctorch\n(?:u?int\d+|float\w*|bfloat16|complex\w*|bool|q\w+|bits\w+)\n")
_FN_RE = re.compile(rb"ctorch\._utils\n_rebuild_\w+\n")
_KEY_RE = re.compile(rb"X\x01\x00\x00\x00(\d)|X\x02\x00\x00\x00(\d\d)")


def _swap(rng, pkl):
    stypes, dtypes, fns = _tokens()
    choice = rng.randrange(5)
    if choice == 0:
        regex, pool = _STORAGE_RE, stypes
    elif choice == 1:
        regex, pool = _DTYPE_RE, dtypes
    elif choice == 2:
        regex, pool = _FN_RE, fns
    elif choice == 3:  # a storage key for another: sharing, or a missing record
        hits = list(_KEY_RE.finditer(pkl))
        if not hits:
            return pkl
        m = rng.choice(hits)
        key = str(rng.randrange(12)).encode()
        new = b"X" + len(key).to_bytes(4, "little") + key
        return pkl[: m.start()] + new + pkl[m.end():]
    else:  # a small int (element count, size, stride, offset) changed
        hits = [m.start() for m in re.finditer(rb"K.", pkl, re.S)]
        if not hits:
            return pkl
        at = rng.choice(hits)
        value = rng.choice([0, 1, 2, 3, 4, 7, 8, 255, 2**31 - 1, 2**32, 2**62])
        enc = torchspace.num(value)
        return pkl[:at] + enc + pkl[at + 2:]
    hits = list(regex.finditer(pkl))
    if not hits:
        return pkl
    m = rng.choice(hits)
    return pkl[: m.start()] + rng.choice(pool) + pkl[m.end():]


def _read_zip(data):
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return [(i.filename, z.read(i)) for i in z.infolist()]


def _write_zip(records, deflate=()):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, body in records:
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED if name in deflate else zipfile.ZIP_STORED
            z.writestr(info, body)
    return buf.getvalue()


def _mutate_zip(rng, data, max_size, byte_mutate):
    records = _read_zip(data)
    names = [n for n, _ in records]
    pkl_at = next((i for i, n in enumerate(names) if n.endswith("/data.pkl")), None)
    if pkl_at is None or not names:
        return byte_mutate(data, max_size)
    prefix = names[pkl_at][: -len("data.pkl")]
    op = rng.randrange(10)
    deflate = ()
    if op <= 3:  # the pickle, by libFuzzer
        name, pkl = records[pkl_at]
        records[pkl_at] = (name, byte_mutate(pkl, max(len(pkl) * 2, 64)))
    elif op <= 6:  # tokens of the pickle
        name, pkl = records[pkl_at]
        for _ in range(rng.randrange(1, 4)):
            pkl = _swap(rng, pkl)
        records[pkl_at] = (name, pkl)
    elif op == 7:  # a storage record dropped, cut, doubled or copied to another key
        data_recs = [i for i, n in enumerate(names) if n.startswith(prefix + "data/")]
        if data_recs:
            i = rng.choice(data_recs)
            name, body = records[i]
            how = rng.randrange(4)
            if how == 0:
                del records[i]
            elif how == 1:
                records[i] = (name, body[: rng.randrange(len(body) + 1)])
            elif how == 2:
                records[i] = (name, body * 2)
            else:
                key = f"{prefix}data/{rng.randrange(12)}"
                if key not in names:
                    records.insert(i, (key, body))
    elif op == 8:  # many extra records
        n = rng.choice([16, 256, 2048])
        at = rng.randrange(len(records) + 1)
        records[at:at] = [(f"{prefix}x/{k}", b"") for k in range(n)]
    else:  # records deflated
        deflate = {n for n in names if rng.random() < 0.5}
    out = _write_zip(records, deflate)
    return out if len(out) <= max_size else byte_mutate(data, max_size)


def mutate(data, seed, max_size, byte_mutate):
    rng = random.Random(seed)
    if rng.randrange(4) == 0 or len(data) < 4:
        return byte_mutate(data, max_size)
    if data[:4] == b"PK\x03\x04":
        try:
            return _mutate_zip(rng, data, max_size, byte_mutate)
        except Exception:  # noqa: BLE001 - any archive Python's zipfile cannot rewrite
            return byte_mutate(data, max_size)
    if data[:1] == b"\x80":
        if rng.randrange(8) == 0:
            out = torchspace.legacy_view_chain(rng.choice([2, 16, 500, 5000]))
            return out if len(out) <= max_size else byte_mutate(data, max_size)
        out = data
        for _ in range(rng.randrange(1, 4)):
            out = _swap(rng, out)
        return out[:max_size]
    return byte_mutate(data, max_size)

"""The space of tensor rebuilds torch's weights-only loader allows, read from
the installed torch: every allowlisted storage type, every allowlisted dtype
and every allowlisted rebuild function, and a writer of archives that
rebuild a tensor through any combination of them.

Used by tests/test_rebuild_table.py (every combination, compared with
torch.load) and by the structure-aware fuzzer tests/fuzz/fuzz_struct.c
(combinations, geometry, sharing, views, memo use and whole-file layout
chosen by the fuzzer's bytes; see from_bytes). A new torch brings its own
cases: nothing here names a dtype, storage type or rebuild function except
to give the arguments of the rebuild functions torch has today; a rebuild
function without a template here is called with a plain tensor.
"""
import io
import struct
import zipfile

import torch
from pickleops import binunicode as text
from pickleops import int_tuple as ints
from pickleops import pickle_int as num

ELSIZE_MAX = 16
RECORD = 64  # bytes of every storage record (a multiple of every element size)


# ---- the space, from torch ---------------------------------------------------

def _allowed():
    return torch._weights_only_unpickler._get_allowed_globals()


def storage_types():
    """(module, name, dtype or None) of every storage type the allowlist
    names, plus UntypedStorage and TypedStorage (dtype None: bytes)."""
    out = []
    for full, obj in sorted(_allowed().items()):
        if isinstance(obj, torch.serialization.StorageType):
            module, _, name = full.rpartition(".")
            out.append((module, name, obj.dtype))
    out.append(("torch.storage", "UntypedStorage", None))
    out.append(("torch.storage", "TypedStorage", None))
    return out


def dtypes():
    """Every torch.dtype the allowlist names, in a stable order."""
    return [obj for _, obj in sorted(_allowed().items()) if isinstance(obj, torch.dtype)]


def rebuild_functions():
    """The names of the allowlisted rebuild functions (torch._utils) and
    torch._tensor._rebuild_from_type_v2."""
    names = sorted(f.__name__ for f in torch._weights_only_unpickler._tensor_rebuild_functions())
    return names + ["_rebuild_from_type_v2"]


def element_size(dtype):
    if dtype is None:
        return 1
    try:
        return torch._utils._element_size(dtype)
    except (TypeError, RuntimeError):
        return torch.empty(0, dtype=dtype).element_size()


# ---- pickle pieces (protocol 2, only opcodes torch's weights-only reader takes)

def g(module, name):
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def dtype_global(dtype):
    module, _, name = str(dtype).rpartition(".")
    return g(module, name)


OD = g("collections", "OrderedDict") + b")R"
FALSE, TRUE = b"\x89", b"\x88"


def pid(stype, key, numel, location="cpu"):
    module, name, _ = stype
    return (b"(" + text("storage") + g(module, name) + text(key) + text(location) + num(numel)
            + b"tQ")


def call(module, name, *args):
    return g(module, name) + b"(" + b"".join(args) + b"tR"


class Archive:
    """Records of one archive being written: storages by key."""

    def __init__(self):
        self.records = {}

    def storage(self, stype, key="0", nbytes=RECORD, fill=None):
        """A persistent id of storage `key` of type stype with nbytes bytes."""
        esize = element_size(stype[2])
        nbytes -= nbytes % esize
        if key not in self.records:
            self.records[key] = bytes(fill(i) if fill else (i * 37 + 11) & 0xFF
                                      for i in range(nbytes))
        return pid(stype, key, len(self.records[key]) // esize)

    def zip(self, pkl, prefix="archive"):
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
            items = [("data.pkl", pkl), ("byteorder", b"little")]
            items += [(f"data/{k}", v) for k, v in self.records.items()]
            items.append(("version", b"3\n"))
            for name, data in items:
                info = zipfile.ZipInfo(f"{prefix}/{name}", date_time=(1980, 1, 1, 0, 0, 0))
                z.writestr(info, data)
        return buf.getvalue()


LONG = ("torch", "LongStorage", torch.int64)


def _v2(ar, stype, key="0", offset=0, size=None, stride=None, requires_grad=FALSE, nbytes=RECORD):
    n = nbytes // element_size(stype[2])
    size = (n,) if size is None else size
    stride = (1,) if stride is None else stride
    return call("torch._utils", "_rebuild_tensor_v2", ar.storage(stype, key, nbytes), num(offset),
                ints(size), ints(stride), requires_grad, OD)


def _long_tensor(ar, key, values, shape):
    ar.records[key] = struct.pack(f"<{len(values)}q", *values)
    strides, acc = [], 1
    for d in reversed(shape):
        strides.insert(0, acc)
        acc *= d
    return call("torch._utils", "_rebuild_tensor_v2", pid(LONG, key, len(values)), num(0),
                ints(shape), ints(strides), FALSE, OD)


def rebuild(ar, fn, stype, dtype):
    """The pickle of one value: a tensor rebuilt by `fn` over a storage of
    type stype (when fn takes one) with dtype (when fn takes one)."""
    dt = dtype if dtype is not None else torch.float32
    n_dt = RECORD // element_size(dt)
    if fn == "_rebuild_tensor":
        n = RECORD // element_size(stype[2])
        return call("torch._utils", fn, ar.storage(stype), num(0), ints((n,)), ints((1,)))
    if fn == "_rebuild_tensor_v2":
        return _v2(ar, stype)
    if fn == "_rebuild_tensor_v3":
        return call("torch._utils", fn, ar.storage(stype), num(0), ints((n_dt,)), ints((1,)),
                    FALSE, OD, dtype_global(dt))
    if fn == "_rebuild_parameter":
        return call("torch._utils", fn, _v2(ar, stype), TRUE, OD)
    if fn == "_rebuild_parameter_with_state":
        return call("torch._utils", fn, _v2(ar, stype), FALSE, OD,
                    b"}(" + text("note") + text("x") + b"u")
    if fn == "_rebuild_from_type_v2":
        inner = _v2(ar, stype)
        args = inner[len(g("torch._utils", "_rebuild_tensor_v2")):-1]  # the argument tuple
        return call("torch._tensor", fn, g("torch._utils", "_rebuild_tensor_v2"),
                    g("torch", "Tensor"), args, b"}(" + text("note") + text("x") + b"u")
    if fn in ("_rebuild_device_tensor_from_cpu_tensor", "_rebuild_device_tensor_from_numpy"):
        return call("torch._utils", fn, _v2(ar, stype), dtype_global(dt), text("cpu"), FALSE)
    if fn == "_rebuild_meta_tensor_no_storage":
        return call("torch._utils", fn, dtype_global(dt), ints((4, 2)), ints((2, 1)), FALSE)
    if fn == "_rebuild_wrapper_subclass":
        return call("torch._utils", fn, g("torch", "Tensor"), dtype_global(dt), ints((4,)),
                    ints((1,)), num(0), call("torch.serialization", "_get_layout",
                                             text("torch.strided")),
                    call("torch", "device", text("cpu")), FALSE)
    if fn == "_rebuild_qtensor":
        n = RECORD // element_size(stype[2])
        qparams = b"(" + g("torch", "per_tensor_affine") + b"G?\xb9\x99\x99\x99\x99\x99\x9a" \
                  + num(3) + b"t"
        return call("torch._utils", fn, ar.storage(stype), num(0), ints((n,)), ints((1,)),
                    qparams, FALSE, OD)
    if fn == "_rebuild_sparse_tensor":
        n = RECORD // element_size(stype[2])
        indices = _long_tensor(ar, "i", list(range(min(n, 8))) + [0] * (n - min(n, 8)), (1, n))
        layout = call("torch.serialization", "_get_layout", text("torch.sparse_coo"))
        return call("torch._utils", fn, layout,
                    b"(" + indices + _v2(ar, stype) + ints((max(8, n),)) + b"t")
    if fn == "_rebuild_nested_tensor":
        n = RECORD // element_size(stype[2])
        return call("torch._utils", fn, _v2(ar, stype), _long_tensor(ar, "s", [n], (1, 1)),
                    _long_tensor(ar, "t", [1], (1, 1)), _long_tensor(ar, "o", [0], (1,)))
    # a rebuild function this file does not know yet (a newer torch): a tensor
    return call("torch._utils", fn, _v2(ar, stype))


def case(fn, stype, dtype):
    """One archive: {'t': <the rebuild>}."""
    ar = Archive()
    value = rebuild(ar, fn, stype, dtype)
    return ar.zip(b"\x80\x02}(" + text("t") + value + b"u.")


def takes_dtype(fn):
    return fn in ("_rebuild_tensor_v3", "_rebuild_device_tensor_from_cpu_tensor",
                  "_rebuild_device_tensor_from_numpy", "_rebuild_meta_tensor_no_storage",
                  "_rebuild_wrapper_subclass")


def takes_storage(fn):
    return fn not in ("_rebuild_meta_tensor_no_storage", "_rebuild_wrapper_subclass")


# ---- fuzzing: a file described by bytes ---------------------------------------

class _Bytes:
    def __init__(self, data):
        self.data, self.pos = data, 0

    def u8(self):
        if self.pos >= len(self.data):
            return 0
        self.pos += 1
        return self.data[self.pos - 1]

    def pick(self, seq):
        return seq[self.u8() % len(seq)]

    def small(self, lo, hi):
        return lo + self.u8() % (hi - lo + 1)

    def geometry_number(self):
        """Mostly small, sometimes at the edges."""
        k = self.u8()
        edges = (0, 1, 2, 3, 4, 7, 8, 15, 16, 63, 64, 255, 2**31 - 1, 2**32, 2**62, 2**63 - 1)
        return edges[k % len(edges)] if k & 0x80 else k % 17


_SPACE = None


def _space():
    global _SPACE
    if _SPACE is None:
        _SPACE = (storage_types(), dtypes(), rebuild_functions())
    return _SPACE


def from_bytes(data):
    """An archive (or a legacy stream) built from the fuzzer's bytes: up to 8
    tensors, each through a chosen rebuild function, storage type and dtype,
    over a storage chosen among 4 keys (so storages are shared), with chosen
    geometry (offsets, sizes, strides near the edges), sometimes a
    memoized argument tuple reused, a long view chain (legacy), many extra
    records, or bytes of the fuzzer's own appended to the pickle."""
    stypes, dts, fns = _space()
    b = _Bytes(data)
    ar = Archive()
    layout = b.u8()
    items = []
    memo = []
    for i in range(b.small(1, 8)):
        fn, stype, dt = b.pick(fns), b.pick(stypes), b.pick(dts)
        key = str(b.u8() % 4)
        shape = b.u8() % 4
        if shape == 0:
            value = rebuild(ar, fn, stype, dt)
        else:
            nd = b.small(0, 3)
            size = tuple(b.geometry_number() for _ in range(nd))
            stride = tuple(b.geometry_number() for _ in range(nd))
            nbytes = (b.u8() % 9) * 8
            value = (call("torch._utils", "_rebuild_tensor_v3" if shape == 3 else
                          "_rebuild_tensor_v2", ar.storage(stype, key, nbytes),
                          num(b.geometry_number()), ints(size), ints(stride),
                          TRUE if b.u8() & 1 else FALSE, OD,
                          *((dtype_global(dt),) if shape == 3 else ())))
        if b.u8() & 3 == 0 and memo:
            value = b"h" + bytes([b.pick(memo)])  # the same object again
        elif len(memo) < 250:
            value += b"q" + bytes([len(memo)])
            memo.append(len(memo))
        items.append(text(f"t{i}") + value)
    pkl = b"\x80\x02}(" + b"".join(items) + b"u."
    tail = data[b.pos:]
    if layout & 3 == 1:  # the fuzzer's own bytes after the pickle's head
        pkl = pkl[:-2] + tail[:4096] + b"u."
    if layout & 12 == 4:  # many extra records
        for k in range(b.small(1, 64) * 16):
            ar.records[f"x{k}"] = b""
    if layout & 48 == 16:  # a chain of legacy views over storage 0, now and then 16000 long
        n = 16_000 if layout == 0xD0 else b.small(1, 64) * 8
        return legacy_view_chain(n, b.pick(stypes[:-2]))
    return ar.zip(pkl)


def legacy_view_chain(n, stype=None):
    """A legacy stream whose storage 'v<n>' is a view of 'v<n-1>' ... of '0'."""
    import pickle

    stype = stype or ("torch", "FloatStorage", torch.float32)
    esize = element_size(stype[2])
    numel = RECORD // esize
    chain, prev = [], "0"
    for i in range(1, n + 1):
        chain.append(b"(" + text("storage") + g(stype[0], stype[1]) + text(prev) + text("cpu")
                     + num(numel) + b"(" + text(f"v{i}") + num(0) + num(numel) + b"ttQ")
        prev = f"v{i}"
    obj = (b"\x80\x02}(" + text("views") + b"](" + b"".join(chain[:-1]) + b"e" + text("w")
           + g("torch._utils", "_rebuild_tensor_v2") + b"(" + chain[-1] + num(0) + ints((numel,))
           + ints((1,)) + FALSE + OD + b"tRu.")
    head = (pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + pickle.dumps(1001, protocol=2)
            + pickle.dumps({"protocol_version": 1001, "little_endian": True,
                            "type_sizes": {"short": 2, "int": 4, "long": 4}}, protocol=2))
    keys = pickle.dumps(["0"], protocol=2)
    data = struct.pack("<q", numel) + bytes((i * 37 + 11) & 0xFF for i in range(numel * esize))
    return head + obj + keys + data

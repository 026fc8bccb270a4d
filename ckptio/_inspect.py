"""What a checkpoint holds, read without torch and without running it.

``ckptio info`` uses this: the pickle (data.pkl of a zip checkpoint, or the
main pickle of a legacy one) is decoded by Python's C unpickler with a
``find_class`` that never imports anything: torch's tensor rebuild
functions, storage classes and dtypes become small records (dtype, shape,
storage key), a known set of containers is rebuilt as itself, and every
other global becomes an inert ``Opaque`` stand-in that records its name.
Nothing in the file is called. The sizes a hostile file can choose are
bounded: data.pkl may inflate to at most 16x the file (as verify); every
pickle is first walked by the extension's scan (``_native.scan_pickle``:
nothing called, the loader's nesting limit and memory bound), since
Python's unpickler has neither (a tuple nested 10^6 deep crashes CPython's
tuple hash, 1 MiB of EMPTY_SET makes 270 MB); the walk over the result is
iterative and visits each object once.
"""
import collections
import io
import os
import pickle
import struct
import zipfile

# what torch 2.13's weights-only unpickler accepts by default for tensors
# and their containers (ckptio.load refuses anything else unless allowed)
_SAFE_BUILTINS = {
    "collections.OrderedDict", "collections.Counter", "builtins.set", "builtins.frozenset",
    "builtins.bytearray", "builtins.complex", "builtins.slice", "builtins.range",
    "_codecs.encode", "torch.Size", "torch.device", "torch.nn.parameter.Parameter",
    "torch._tensor._rebuild_from_type_v2", "torch.serialization._get_layout",
    "torch._utils._rebuild_sparse_tensor", "torch._utils._rebuild_qtensor",
    "torch._utils._rebuild_wrapper_subclass", "torch._utils._rebuild_nested_tensor",
    "torch._utils._rebuild_device_tensor_from_numpy", "torch._utils._rebuild_meta_tensor_no_storage",
}
_LAYOUTS = {"strided", "sparse_coo", "sparse_csr", "sparse_csc", "sparse_bsr", "sparse_bsc",
            "_mkldnn", "jagged"}
_MEMORY_FORMATS = {"contiguous_format", "channels_last", "channels_last_3d", "preserve_format"}

# storage class -> dtype name (torch.storage._dtype_to_storage_type_map, inverted)
_STORAGE_DTYPES = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16",
    "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16",
    "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
    "BFloat16Storage": "bfloat16", "ComplexDoubleStorage": "complex128",
    "ComplexFloatStorage": "complex64", "QInt8Storage": "qint8", "QInt32Storage": "qint32",
    "QUInt8Storage": "quint8", "QUInt4x2Storage": "quint4x2", "QUInt2x4Storage": "quint2x4",
    "UntypedStorage": "uint8",
}
_ELEMENT_SIZES = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "complex128": 16, "complex64": 8,
    "complex32": 4, "int64": 8, "int32": 4, "int16": 2, "uint16": 2, "uint32": 4, "uint64": 8,
    "qint32": 4, "bits16": 2,
}  # every other dtype ckptio knows has 1-byte elements
_DTYPE_NAMES = set(_ELEMENT_SIZES) | {
    "int8", "uint8", "bool", "float8_e5m2", "float8_e4m3fn", "float8_e5m2fnuz",
    "float8_e4m3fnuz", "float8_e8m0fnu", "float4_e2m1fn_x2", "qint8", "quint8", "quint4x2",
    "quint2x4", "bits1x8", "bits2x4", "bits4x2", "bits8",
} | {f"uint{i}" for i in range(1, 8)} | {f"int{i}" for i in range(1, 8)}
INFLATE_RATIO = 16
INFLATE_FLOOR = 1 << 20


class InspectError(ValueError):
    """The file cannot be inspected (not a checkpoint, or damaged)."""


class Storage(tuple):
    """A storage named by a persistent id: (key, dtype name, numel, location)."""

    __slots__ = ()
    key = property(lambda self: self[0])
    dtype = property(lambda self: self[1])
    numel = property(lambda self: self[2])
    location = property(lambda self: self[3])


class Dtype(str):
    """torch.<name> for a dtype (a _rebuild_tensor_v3 argument)."""


class Tensor:
    """A tensor the pickle builds: dtype, shape, and the storage it views."""

    __slots__ = ("dtype", "shape", "storage", "parameter")

    def __init__(self, storage, shape, dtype=None):
        self.storage = storage if isinstance(storage, Storage) else None
        self.dtype = dtype or (self.storage.dtype if self.storage else "unknown")
        self.shape = tuple(int(d) for d in shape) if _is_shape(shape) else ()
        self.parameter = False

    def __setstate__(self, state):  # BUILD on a tensor subclass: state ignored
        pass

    @property
    def numel(self):
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self):
        return self.numel * _ELEMENT_SIZES.get(self.dtype, 1)


def _is_shape(shape):
    return isinstance(shape, (tuple, list)) and all(
        isinstance(d, int) and 0 <= d < 1 << 62 for d in shape) and len(shape) <= 64


class Opaque:
    """Stands for an object of a global outside the safe set: records the
    name, accepts any arguments and state, does nothing."""

    global_name = "?"

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __repr__(self):
        return f"<{self.global_name}>"

    # the unpickler's APPEND(S) and SETITEM(S) on an instance
    def append(self, value):
        pass

    def extend(self, values):
        pass

    def __setitem__(self, key, value):
        pass


def _rebuild_tensor(storage, offset, size, stride, *rest):
    return Tensor(storage, size)


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype, *rest):
    return Tensor(storage, size, str(dtype) if isinstance(dtype, Dtype) else None)


def _rebuild_parameter(data, *rest):
    if isinstance(data, Tensor):
        data.parameter = True
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    return func(*args) if callable(func) and isinstance(args, tuple) else Opaque()


class _Unpickler(pickle.Unpickler):
    def __init__(self, data, globals_seen):
        super().__init__(io.BytesIO(data), encoding="utf-8")
        self._seen = globals_seen
        self._opaque = {}

    def find_class(self, module, name):
        full = f"{module}.{name}"
        self._seen[full] = self._seen.get(full, 0) + 1
        if module == "torch._utils":
            if name in ("_rebuild_tensor", "_rebuild_tensor_v2"):
                return _rebuild_tensor
            if name == "_rebuild_tensor_v3":
                return _rebuild_tensor_v3
            if name in ("_rebuild_parameter", "_rebuild_parameter_with_state"):
                return _rebuild_parameter
        if full == "torch._tensor._rebuild_from_type_v2":
            return _rebuild_from_type_v2
        if full == "collections.OrderedDict":
            return collections.OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return Dtype("storage:" + _STORAGE_DTYPES[name])
        if full in ("torch.storage.UntypedStorage",):
            return Dtype("storage:uint8")
        if module == "torch" and name in _DTYPE_NAMES:
            return Dtype(name)
        cls = self._opaque.get(full)
        if cls is None:
            cls = self._opaque[full] = type("Opaque", (Opaque,), {"global_name": full})
        return cls

    def persistent_load(self, pid):
        if isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage":
            stype = pid[1]
            dtype = stype[len("storage:"):] if isinstance(stype, Dtype) and \
                stype.startswith("storage:") else "unknown"
            numel = pid[4] if isinstance(pid[4], int) else 0
            return Storage((str(pid[2]), dtype, numel, str(pid[3])))
        return None


def is_weights_only_safe(name):
    """True when torch 2.13's default weights-only load accepts the global."""
    module, _, attr = name.rpartition(".")
    if name in _SAFE_BUILTINS or module == "torch._utils" and attr.startswith("_rebuild_tensor"):
        return True
    if module == "torch._utils" and attr in ("_rebuild_parameter",
                                             "_rebuild_parameter_with_state"):
        return True
    if module == "torch" and (attr in _STORAGE_DTYPES or attr in _DTYPE_NAMES
                              or attr in _LAYOUTS or attr in _MEMORY_FORMATS):
        return True
    return name == "torch.storage.UntypedStorage"


def _format(head, size):
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


def _zip_pickle(path, size):
    limit = max(size * INFLATE_RATIO, INFLATE_FLOOR)
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
            pkl = [i for i in infos if i.filename.endswith("/data.pkl")
                   and i.filename.count("/") == 1]
            if not pkl:
                raise InspectError("the archive has no data.pkl record (not a torch.save file)")
            if pkl[0].file_size > limit:
                raise InspectError(f"data.pkl announces {pkl[0].file_size} bytes, over the "
                                   f"limit {limit}")
            with z.open(pkl[0]) as f:
                data = f.read(limit + 1)
            if len(data) > limit:
                raise InspectError("data.pkl inflates past its limit")
            return data, len(infos)
    except (zipfile.BadZipFile, NotImplementedError, EOFError) as exc:
        raise InspectError(f"cannot read the zip archive: {exc}") from None


def _scan(data, path, size):
    """Walks the pickle at the start of data with the extension's scan (see
    the module docstring); InspectError for what a load would refuse. Skipped
    where the extension cannot be imported (a source tree without a build)."""
    try:
        from . import _native
        from ._config import ensure_scan_tables
    except ImportError:
        return
    ensure_scan_tables()
    from . import CheckpointError

    try:
        _native.scan_pickle(data, str(path), size)
    except CheckpointError as exc:
        msg = str(exc)
        prefix = f"{path}: "
        raise InspectError(msg[len(prefix):] if msg.startswith(prefix) else msg) from None


def _legacy_pickle(path, size):
    """The main pickle of a legacy (pre-1.6) file: magic, protocol and
    system-info pickles come first."""
    with open(path, "rb") as f:
        data = f.read()
    stream = io.BytesIO(data)
    try:
        for _ in range(3):
            _scan(data[stream.tell():], path, size)
            pickle.Unpickler(stream, encoding="utf-8").load()  # plain values only
    except InspectError:
        raise
    except Exception as exc:  # noqa: BLE001 - a damaged header is just a bad file
        raise InspectError(f"not a legacy torch.save file: {exc}") from None
    return data[stream.tell():]


def inspect(path):
    """A summary dict of the checkpoint at path (see ckptio info)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(262)
    fmt = _format(head, size)
    records = None
    if fmt == "safetensors":
        return _inspect_safetensors(path, size)
    if fmt == "zip":
        data, records = _zip_pickle(path, size)
    elif fmt == "legacy":
        data = _legacy_pickle(path, size)
    else:
        raise InspectError(f"{fmt} format: not a checkpoint ckptio info reads")
    _scan(data, path, size)
    seen = {}
    try:
        obj = _Unpickler(data, seen).load()
    except RecursionError:
        raise InspectError("the pickle nests too deeply") from None
    except Exception as exc:  # noqa: BLE001 - anything a hostile pickle provokes
        raise InspectError(f"cannot decode the pickle: {type(exc).__name__}: {exc}") from None
    return {"format": fmt, "bytes": size, "records": records, "object": obj, "globals": seen}


def _inspect_safetensors(path, size):
    import json

    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        if n > min(size, 100 << 20):
            raise InspectError("safetensors header larger than the file")
        header = json.loads(f.read(n))
    sd = collections.OrderedDict()
    meta = header.pop("__metadata__", None)
    names = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
             "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
             "BOOL": "bool", "U16": "uint16", "U32": "uint32", "U64": "uint64",
             "F8_E5M2": "float8_e5m2", "F8_E4M3": "float8_e4m3fn"}
    for k, v in header.items():
        st = Storage((k, names.get(v.get("dtype"), str(v.get("dtype"))), 0, "cpu"))
        t = Tensor(st, v.get("shape", []))
        sd[k] = t
    obj = sd if meta is None else {"state_dict": sd, "meta": meta}
    return {"format": "safetensors", "bytes": size, "records": None, "object": obj,
            "globals": {}}


def walk(obj, limit=1_000_000):
    """(dotted path, Tensor) for every tensor inside dicts, lists and tuples,
    each container visited once, iteratively (deep or shared structures
    cost their size, not their paths)."""
    seen = set()
    stack = [("", obj)]
    visited = 0
    while stack:
        prefix, value = stack.pop()
        if isinstance(value, Tensor):
            yield prefix or "<root>", value
            continue
        if isinstance(value, (dict, list, tuple)):
            if id(value) in seen:
                continue
            seen.add(id(value))
            visited += 1
            if visited > limit:
                return
            items = value.items() if isinstance(value, dict) else enumerate(value)
            children = [(f"{prefix}.{k}" if prefix else str(k), v) for k, v in items]
            stack.extend(reversed(children))

"""Hands torch's objects and tables to the C extension, once.

The C side never looks torch up by name: everything it compares against or
calls (rebuild functions, storage types, dtypes, the weights-only allowlist)
is read here from the installed torch and cached in the module state.
"""
import _compat_pickle
import collections
import copyreg
import warnings

from . import _native
from ._inspect import _ELEMENT_SIZES, _STORAGE_DTYPES
from ._torch import require as _require_torch

torch = None  # imported by ensure_configured
_configured = False


_QUANTIZED = ("qint8", "quint8", "qint32", "quint4x2", "quint2x4")


def _element_size(dtype):
    try:
        return torch._utils._element_size(dtype)
    except (TypeError, RuntimeError):  # dtypes torch._utils does not size (float4, ...)
        return torch.empty(0, dtype=dtype).element_size()


def _dtype_rows():
    """(dtype, element size, empty CPU tensor of it) per name of
    _native.DTYPE_NAMES; quantized dtypes get no template (never built
    natively)."""
    rows = []
    for name in _native.DTYPE_NAMES:
        dtype = getattr(torch, name, None)
        if not isinstance(dtype, torch.dtype):
            rows.append((None, 0, None))
            continue
        template = None
        if name not in _QUANTIZED:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # complex32 is "experimental"
                template = torch.empty(0, dtype=dtype)
        rows.append((dtype, _element_size(dtype), template))
    return rows


class _Absent:
    """Stands for a torch function this torch does not have (torch 1.13 has
    no _rebuild_tensor_v3, ...): never identical to what a pickle names, so
    the C side never takes its path."""

    __slots__ = ("name",)

    def __init__(self, name):
        self.name = name

    def __call__(self, *args):
        raise _native.CheckpointError(
            f"this checkpoint needs torch's {self.name}, which torch {torch.__version__} lacks")

    def __repr__(self):
        return f"<absent {self.name}>"


def _set_obj_state(obj, state):
    """torch._utils._set_obj_state (torch >= 2.0), as torch 1.13's
    _rebuild_from_type_v2 does it inline: a (dict, slots) pair or a dict of
    attributes."""
    if isinstance(state, tuple):
        if len(state) != 2:
            raise RuntimeError(f"Invalid serialized state: {state}")
        dict_state, slots_state = state
    else:
        dict_state, slots_state = state, None
    if dict_state:
        for k, v in dict_state.items():
            setattr(obj, k, v)
    if slots_state:
        for k, v in slots_state.items():
            setattr(obj, k, v)
    return obj


def _torch_attr(owner, name, fallback=None):
    """owner.name, or a stand-in where this torch lacks it (torch 1.13)."""
    value = getattr(owner, name, None)
    if value is not None:
        return value
    return fallback if fallback is not None else _Absent(name)


def _save_legacy_rows(new_dtypes):
    """dtype -> (the storage class torch pickles for it, element size) for
    every dtype torch.save writes through a TypedStorage (what
    TypedStorage._pickle_storage_type names)."""
    return {
        dtype: (getattr(torch, name), _element_size(dtype))
        for dtype, name in torch.storage._dtype_to_storage_type_map().items()
        if dtype not in new_dtypes
    }


def _tables():
    wo = torch._weights_only_unpickler
    allowed = dict(wo._get_allowed_globals())
    rows = _dtype_rows()
    code = {row[0]: i for i, row in enumerate(rows) if row[0] is not None}
    StorageType = torch.serialization.StorageType

    storage_dtype = {torch.UntypedStorage: code[torch.uint8]}
    typed = torch.storage.TypedStorage
    for obj in allowed.values():
        if isinstance(obj, StorageType) and obj.dtype in code:
            storage_dtype[obj] = code[obj.dtype]
        elif isinstance(obj, type) and issubclass(obj, typed) and obj is not typed:
            # torch 1.13 allowlists the legacy classes themselves (torch.FloatStorage)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                dtype = getattr(obj, "dtype", None)
            if dtype in code:
                storage_dtype[obj] = code[dtype]
    storage_by_name = {}
    for dtype, name in torch.storage._dtype_to_storage_type_map().items():
        if dtype in code:
            obj = StorageType(name)
            storage_by_name[name] = obj
            storage_dtype[obj] = code[dtype]

    utils = torch._utils
    # torch 1.13 has no storage of the new dtypes, nor tensor metadata
    new_dtypes = frozenset(getattr(torch.storage, "_new_dtypes", tuple)())
    return {
        "from_numpy": torch.from_numpy,
        "empty": torch.empty,
        "Tensor": torch.Tensor,
        "Parameter": torch.nn.Parameter,
        "make_subclass": torch.Tensor._make_subclass,
        "tensor_setstate": torch.Tensor.__setstate__,
        "set_tensor_metadata": _torch_attr(torch._C, "_set_tensor_metadata"),
        "set_obj_state": _torch_attr(utils, "_set_obj_state", _set_obj_state),
        "rebuild_tensor": utils._rebuild_tensor,
        "rebuild_tensor_v2": utils._rebuild_tensor_v2,
        "rebuild_tensor_v3": _torch_attr(utils, "_rebuild_tensor_v3"),
        "rebuild_parameter": utils._rebuild_parameter,
        "rebuild_parameter_with_state": _torch_attr(utils, "_rebuild_parameter_with_state"),
        "rebuild_from_type_v2": torch._tensor._rebuild_from_type_v2,
        "TypedStorage": torch.storage.TypedStorage,
        "UntypedStorage": torch.UntypedStorage,
        "OrderedDict": collections.OrderedDict,
        "Counter": collections.Counter,
        "storage_dtype": storage_dtype,
        "storage_by_name": storage_by_name,
        "allowed": allowed,
        "wo_name_mapping": dict(getattr(utils, "NAME_MAPPING", {})),  # torch >= 2.1
        "wo_import_mapping": dict(getattr(utils, "IMPORT_MAPPING", {})),
        "compat_name_mapping": dict(_compat_pickle.NAME_MAPPING),
        "compat_import_mapping": dict(_compat_pickle.IMPORT_MAPPING),
        "extension_registry": copyreg._inverted_registry,
        "dtypes": rows,
        # save (src/binding/save_hooks.c): torch.serialization._save's helpers
        "normalize_storage_type": torch.serialization.normalize_storage_type,
        "location_tag": torch.serialization.location_tag,
        "torch": torch,
        "get_tensor_metadata": getattr(torch._C, "_get_tensor_metadata", _no_metadata),
        "strided": torch.strided,
        "save_new_dtypes": new_dtypes,
        "save_legacy": _save_legacy_rows(new_dtypes),
    }


def _no_metadata(tensor):
    """torch._C._get_tensor_metadata where torch (1.13) has none."""
    return {}


def ensure_configured():
    global _configured, torch
    if _configured is not True:
        torch = _require_torch("decoding a checkpoint")
        _native.configure(_tables())
        _configured = True


# ---- without torch: the tables the scan (ckptio.verify's pickle walk) needs

# dtype name -> storage class (torch.storage._dtype_to_storage_type_map(), the
# same in torch 1.13 to 2.14): _inspect's table, inverted
_STORAGE_NAMES = {dtype: name for name, dtype in _STORAGE_DTYPES.items()
                  if name != "UntypedStorage"}


class _StandIn:
    """Names a torch object (a dtype, a storage class) for the scan, which
    compares and counts but never calls or builds anything."""

    __slots__ = ("name",)

    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return f"<torch.{self.name} (torch is not installed)>"


def _scan_tables():
    rows = []
    storage_by_name = {}
    storage_dtype = {}
    for code, name in enumerate(_native.DTYPE_NAMES):
        rows.append((_StandIn(name), _ELEMENT_SIZES.get(name, 1), None))
        if name in _STORAGE_NAMES:
            stype = _StandIn(_STORAGE_NAMES[name])
            storage_by_name[stype.name] = stype
            storage_dtype[stype] = code
    untyped = _StandIn("UntypedStorage")
    storage_dtype[untyped] = _native.DTYPE_NAMES.index("uint8")
    tables = {key: None for key in (
        "from_numpy", "empty", "Tensor", "Parameter", "make_subclass", "tensor_setstate",
        "set_tensor_metadata", "set_obj_state", "rebuild_tensor", "rebuild_tensor_v2",
        "rebuild_tensor_v3", "rebuild_parameter", "rebuild_parameter_with_state",
        "rebuild_from_type_v2", "TypedStorage")}
    tables.update({
        "UntypedStorage": untyped,
        "OrderedDict": collections.OrderedDict,
        "Counter": collections.Counter,
        "storage_dtype": storage_dtype,
        "storage_by_name": storage_by_name,
        "allowed": {},
        "wo_name_mapping": {},
        "wo_import_mapping": {},
        "compat_name_mapping": dict(_compat_pickle.NAME_MAPPING),
        "compat_import_mapping": dict(_compat_pickle.IMPORT_MAPPING),
        "extension_registry": copyreg._inverted_registry,
        "dtypes": rows,
        "save_new_dtypes": frozenset(),
        "save_legacy": {},
    })
    tables.update({key: None for key in (
        "normalize_storage_type", "location_tag", "torch", "get_tensor_metadata", "strided")})
    return tables


def ensure_scan_tables():
    """Configures the extension at least for the scan alone (ckptio info's
    pre-pass), without importing torch: torch's tables where they are
    configured already, else the stand-ins (a later ensure_configured
    replaces them)."""
    global _configured
    if _configured is True or _configured == "scan":
        return
    _native.configure(_scan_tables())
    _configured = "scan"


def ensure_scan_configured():
    """Configures the extension for ckptio.verify's checks: with torch's
    tables when torch is installed, else with stand-ins that only the scan
    uses (the loader is then never called: see verification). Returns True when
    torch is there."""
    global _configured
    if _configured is True:
        return True
    from ._torch import available

    if available():
        ensure_configured()
        return True
    if _configured is not False:
        return False
    _native.configure(_scan_tables())
    _configured = "scan"
    return False

"""Hands torch's objects and tables to the C extension, once.

The C side never looks torch up by name: everything it compares against or
calls (rebuild functions, storage types, dtypes, the weights-only allowlist)
is read here from the installed torch and cached in the module state.
"""
import _compat_pickle
import collections
import copyreg
import warnings

import torch

from . import _native

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
    for obj in allowed.values():
        if isinstance(obj, StorageType) and obj.dtype in code:
            storage_dtype[obj] = code[obj.dtype]
    storage_by_name = {}
    for dtype, name in torch.storage._dtype_to_storage_type_map().items():
        if dtype in code:
            obj = StorageType(name)
            storage_by_name[name] = obj
            storage_dtype[obj] = code[dtype]

    utils = torch._utils
    new_dtypes = frozenset(torch.storage._new_dtypes())
    return {
        "from_numpy": torch.from_numpy,
        "empty": torch.empty,
        "Tensor": torch.Tensor,
        "Parameter": torch.nn.Parameter,
        "make_subclass": torch.Tensor._make_subclass,
        "tensor_setstate": torch.Tensor.__setstate__,
        "set_tensor_metadata": torch._C._set_tensor_metadata,
        "set_obj_state": utils._set_obj_state,
        "rebuild_tensor": utils._rebuild_tensor,
        "rebuild_tensor_v2": utils._rebuild_tensor_v2,
        "rebuild_tensor_v3": utils._rebuild_tensor_v3,
        "rebuild_parameter": utils._rebuild_parameter,
        "rebuild_parameter_with_state": utils._rebuild_parameter_with_state,
        "rebuild_from_type_v2": torch._tensor._rebuild_from_type_v2,
        "TypedStorage": torch.storage.TypedStorage,
        "UntypedStorage": torch.UntypedStorage,
        "OrderedDict": collections.OrderedDict,
        "Counter": collections.Counter,
        "storage_dtype": storage_dtype,
        "storage_by_name": storage_by_name,
        "allowed": allowed,
        "wo_name_mapping": dict(utils.NAME_MAPPING),
        "wo_import_mapping": dict(utils.IMPORT_MAPPING),
        "compat_name_mapping": dict(_compat_pickle.NAME_MAPPING),
        "compat_import_mapping": dict(_compat_pickle.IMPORT_MAPPING),
        "extension_registry": copyreg._inverted_registry,
        "dtypes": rows,
        # save (src/binding/save_hooks.c): torch.serialization._save's helpers
        "normalize_storage_type": torch.serialization.normalize_storage_type,
        "location_tag": torch.serialization.location_tag,
        "torch": torch,
        "get_tensor_metadata": torch._C._get_tensor_metadata,
        "strided": torch.strided,
        "save_new_dtypes": new_dtypes,
        "save_legacy": _save_legacy_rows(new_dtypes),
    }


def ensure_configured():
    global _configured
    if not _configured:
        _native.configure(_tables())
        _configured = True

/* Module state of ckptio._native: every Python object the binding caches
 * lives here (no static PyObject *), found through PyModule_GetState.
 *
 * torch is imported on the first load, not at module import, so that the
 * extension imports (and its C-level tools run) without torch; the torch
 * half of this state is filled by ck_torch_ready.
 */
#ifndef CKPTIO_BINDING_STATE_H
#define CKPTIO_BINDING_STATE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>

#include "compat.h"

/* getattr that tells "absent" (0, no exception) from "failed" (-1). */
#if PY_VERSION_HEX >= 0x030D0000
#define ck_lookup_attr PyObject_GetOptionalAttr
#else
#define ck_lookup_attr _PyObject_LookupAttr
#endif

/* One row per torch dtype ckptio knows by name; the codes index
 * ck_state.dtypes. Rows for dtypes the installed torch lacks stay empty. */
typedef enum ck_dtype_code {
    CK_DT_FLOAT64,
    CK_DT_FLOAT32,
    CK_DT_FLOAT16,
    CK_DT_BFLOAT16,
    CK_DT_COMPLEX128,
    CK_DT_COMPLEX64,
    CK_DT_COMPLEX32,
    CK_DT_INT64,
    CK_DT_INT32,
    CK_DT_INT16,
    CK_DT_INT8,
    CK_DT_UINT8,
    CK_DT_BOOL,
    CK_DT_UINT16,
    CK_DT_UINT32,
    CK_DT_UINT64,
    CK_DT_FLOAT8_E5M2,
    CK_DT_FLOAT8_E4M3FN,
    CK_DT_FLOAT8_E5M2FNUZ,
    CK_DT_FLOAT8_E4M3FNUZ,
    CK_DT_FLOAT8_E8M0FNU,
    CK_DT_FLOAT4_E2M1FN_X2,
    CK_DT_QINT8,
    CK_DT_QUINT8,
    CK_DT_QINT32,
    CK_DT_QUINT4X2,
    CK_DT_QUINT2X4,
    CK_DT_BITS1X8,
    CK_DT_BITS2X4,
    CK_DT_BITS4X2,
    CK_DT_BITS8,
    CK_DT_BITS16,
    CK_DT_UINT1,
    CK_DT_UINT2,
    CK_DT_UINT3,
    CK_DT_UINT4,
    CK_DT_UINT5,
    CK_DT_UINT6,
    CK_DT_UINT7,
    CK_DT_INT1,
    CK_DT_INT2,
    CK_DT_INT3,
    CK_DT_INT4,
    CK_DT_INT5,
    CK_DT_INT6,
    CK_DT_INT7,
    CK_DT_COUNT
} ck_dtype_code;

typedef struct ck_dtype_info {
    PyObject *dtype;        /* torch.dtype, or NULL when this torch lacks it */
    PyObject *cpu_template; /* torch.empty(0, dtype=dtype): .new() gives an empty tensor */
    int elsize;             /* bytes per element, as torch._utils._element_size */
    int npy_type;           /* NumPy type with the same bytes, or -1 (no native path) */
    int needs_view;         /* 1: NumPy type differs, tensor needs .view(dtype) */
} ck_dtype_info;

typedef struct ck_state {
    /* exceptions */
    PyObject *CheckpointError;
    PyObject *UnpicklingError;
    /* heap types */
    PyTypeObject *MappingType;
    PyTypeObject *StorageRefType;
    PyTypeObject *RefTupleType; /* tuples holding StorageRefs (storages.c) */
    /* result marker for TorchScript archives under weights_only=False */
    PyObject *torchscript_marker;

    /* ---- filled by ck_torch_ready ---- */
    int torch_ready;
    PyObject *from_numpy;
    PyObject *torch_empty;
    PyObject *Tensor;
    PyObject *Parameter;
    PyObject *make_subclass;
    PyObject *tensor_setstate;
    PyObject *set_tensor_metadata;
    PyObject *set_obj_state;
    PyObject *rebuild_tensor;
    PyObject *rebuild_tensor_v2;
    PyObject *rebuild_tensor_v3;
    PyObject *rebuild_parameter;
    PyObject *rebuild_parameter_with_state;
    PyObject *rebuild_from_type_v2;
    PyObject *TypedStorage;
    PyObject *UntypedStorage;
    PyObject *OrderedDict;
    PyObject *Counter;
    PyObject *storage_dtype;   /* dict: storage type object -> dtype code */
    PyObject *storage_by_name; /* dict: "FloatStorage" -> StorageType instance */
    PyObject *dtype_code;      /* dict: torch.dtype -> dtype code */
    PyObject *allowed;         /* dict: "module.name" -> object (torch's default allowlist) */
    PyObject *allowed_ids;     /* set: id() of every allowed object */
    PyObject *wo_name_mapping; /* torch._utils.NAME_MAPPING */
    PyObject *wo_import_mapping;
    PyObject *compat_name_mapping; /* _compat_pickle.NAME_MAPPING (fix_imports) */
    PyObject *compat_import_mapping;
    PyObject *extension_registry; /* copyreg._inverted_registry */
    PyObject *builder_policy;     /* dict: id(builder) -> how it allocates (budget.c) */
    ck_dtype_info dtypes[CK_DT_COUNT];

    /* interned attribute names */
    PyObject *s_new;
    PyObject *s_set_;
    PyObject *s_view;
    PyObject *s_detach;
    PyObject *s_requires_grad_;
    PyObject *s_untyped_storage;
    PyObject *s_setstate;
    PyObject *s_dict;
    PyObject *s_dunder_new;
    PyObject *s_extend;
    PyObject *s_append;
    PyObject *s_add;
    PyObject *s_device;
    PyObject *s_dtype;
    PyObject *s_as_subclass;
    PyObject *s_untyped_attr; /* _untyped_storage */
    PyObject *s_wrap_storage;
    PyObject *s_internal;
    PyObject *s_cpu;
    PyObject *s_get;
    PyObject *s_add_note;
    PyObject *s_storage_word;        /* "Storage" */
    PyObject *s_torch_tensor_module; /* "torch._tensor" */

    /* http.c */
    PyObject *DownloadError;

    /* save_hooks.c: made at import */
    PyTypeObject *SaveStateType;
    PyObject *SavePickler; /* the _pickle.Pickler subclass every save uses */
    PyObject *s_storage;   /* "storage" */
    PyObject *s_meta;      /* "meta" */
    PyObject *s_cuda;      /* "cuda" */
    PyObject *s_fake_device;
    /* save_hooks.c: torch's objects, from configure */
    PyObject *normalize_storage_type; /* torch.serialization.normalize_storage_type */
    PyObject *location_tag;           /* torch.serialization.location_tag */
    PyObject *torch_module;           /* torch (storage classes by name) */
    PyObject *get_tensor_metadata;    /* torch._C._get_tensor_metadata */
    PyObject *strided;                /* torch.strided */
    PyObject *save_legacy;     /* dict: dtype -> (storage class torch pickles, element size) */
    PyObject *save_new_dtypes; /* frozenset: dtypes torch saves through _rebuild_tensor_v3 */
    /* the data sets beyond torch's allowlist (dataset.c, npdata.c, histbuf.c) */
    PyObject *np_reconstruct;    /* numpy's multiarray._reconstruct */
    PyObject *np_scalar;         /* numpy's multiarray.scalar */
    PyObject *np_array_setstate; /* ndarray.__setstate__, from the type */
    PyObject *builtin_getattr;
    PyObject *codecs_encode;   /* _codecs.encode */
    PyObject *dataset_globals; /* dict: "module.name" -> object (HistoryBuffer aside) */
    PyObject *HistoryBuffer;   /* mmengine's class, once a pickle named it */
} ck_state;

/* The state of the module object m. */
ck_state *ck_get_state(PyObject *module);

/* Imports torch and fills the torch half of st once. Returns 0, or -1
 * with an exception set. */
int ck_torch_ready(ck_state *st);

#endif

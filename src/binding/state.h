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

/* The module state's fields, each listed once: these lists generate the
 * struct, module_traverse and module_clear (module.c), and the interning of
 * the names at import. Add a field to one list and it is owned, visited and
 * cleared. */

/* Python objects: exceptions, torch's objects from configure (ck_torch_ready), the data
 * sets' builders. */
#define CK_STATE_OBJECTS(X)                                                                        \
    /* exceptions */                                                                               \
    X(CheckpointError)                                                                             \
    X(UnpicklingError)                                                                             \
    /* result marker for TorchScript archives under weights_only=False */                          \
    X(torchscript_marker)                                                                          \
    /* ---- filled by ck_torch_ready ---- */                                                       \
    X(from_numpy)                                                                                  \
    X(torch_empty)                                                                                 \
    X(Tensor)                                                                                      \
    X(Parameter)                                                                                   \
    X(make_subclass)                                                                               \
    X(tensor_setstate)                                                                             \
    X(set_tensor_metadata)                                                                         \
    X(set_obj_state)                                                                               \
    X(rebuild_tensor)                                                                              \
    X(rebuild_tensor_v2)                                                                           \
    X(rebuild_tensor_v3)                                                                           \
    X(rebuild_parameter)                                                                           \
    X(rebuild_parameter_with_state)                                                                \
    X(rebuild_from_type_v2)                                                                        \
    X(TypedStorage)                                                                                \
    X(UntypedStorage)                                                                              \
    X(OrderedDict)                                                                                 \
    X(Counter)                                                                                     \
    X(storage_dtype)   /* dict: storage type object -> dtype code */                               \
    X(storage_by_name) /* dict: "FloatStorage" -> StorageType instance */                          \
    X(dtype_code)      /* dict: torch.dtype -> dtype code */                                       \
    X(allowed)         /* dict: "module.name" -> object (torch's default allowlist) */             \
    X(allowed_ids)     /* set: id() of every allowed object */                                     \
    X(wo_name_mapping) /* torch._utils.NAME_MAPPING */                                             \
    X(wo_import_mapping)                                                                           \
    X(compat_name_mapping) /* _compat_pickle.NAME_MAPPING (fix_imports) */                         \
    X(compat_import_mapping)                                                                       \
    X(extension_registry) /* copyreg._inverted_registry */                                         \
    X(builder_policy)     /* dict: id(builder) -> how it allocates (budget.c) */                   \
    /* http.c */                                                                                   \
    X(DownloadError)                                                                               \
    /* save_hooks.c: made at import */                                                             \
    X(SavePickler) /* the _pickle.Pickler subclass every save uses */                              \
    /* save_hooks.c: torch's objects, from configure */                                            \
    X(normalize_storage_type) /* torch.serialization.normalize_storage_type */                     \
    X(location_tag)           /* torch.serialization.location_tag */                               \
    X(torch_module)           /* torch (storage classes by name) */                                \
    X(get_tensor_metadata)    /* torch._C._get_tensor_metadata */                                  \
    X(strided)                /* torch.strided */                                                  \
    X(save_legacy)            /* dict: dtype -> (storage class torch pickles, element size) */     \
    X(save_new_dtypes)        /* frozenset: dtypes torch saves through _rebuild_tensor_v3 */       \
    /* the data sets beyond torch's allowlist (dataset.c, npdata.c, histbuf.c) */                  \
    X(np_reconstruct)    /* numpy's multiarray._reconstruct */                                     \
    X(np_scalar)         /* numpy's multiarray.scalar */                                           \
    X(np_array_setstate) /* ndarray.__setstate__, from the type */                                 \
    X(builtin_getattr)                                                                             \
    X(codecs_encode)   /* _codecs.encode */                                                        \
    X(dataset_globals) /* dict: "module.name" -> object (HistoryBuffer aside) */                   \
    X(HistoryBuffer)   /* mmengine's class, once a pickle named it */

/* Heap types made at import. */
#define CK_STATE_TYPES(X)                                                                          \
    X(MappingType)                                                                                 \
    X(StorageRefType)                                                                              \
    X(RefTupleType) /* tuples holding StorageRefs (storages.c) */                                  \
    X(SaveStateType)                                                                               \
    X(HostArenaType)  /* hostcopy.c */                                                             \
    X(AtomicFileType) /* dcp.c */

/* Interned attribute names: X(field, text), made at import. */
#define CK_STATE_NAMES(X)                                                                          \
    X(s_new, "new")                                                                                \
    X(s_set_, "set_")                                                                              \
    X(s_view, "view")                                                                              \
    X(s_detach, "detach")                                                                          \
    X(s_requires_grad_, "requires_grad_")                                                          \
    X(s_untyped_storage, "untyped_storage")                                                        \
    X(s_setstate, "__setstate__")                                                                  \
    X(s_dict, "__dict__")                                                                          \
    X(s_dunder_new, "__new__")                                                                     \
    X(s_extend, "extend")                                                                          \
    X(s_append, "append")                                                                          \
    X(s_add, "add")                                                                                \
    X(s_device, "device")                                                                          \
    X(s_as_subclass, "as_subclass")                                                                \
    X(s_untyped_attr, "_untyped_storage")                                                          \
    X(s_cpu, "cpu")                                                                                \
    X(s_add_note, "add_note")                                                                      \
    X(s_storage_word, "Storage")                                                                   \
    X(s_torch_tensor_module, "torch._tensor")                                                      \
    X(s_storage, "storage")                                                                        \
    X(s_meta, "meta")                                                                              \
    X(s_cuda, "cuda")                                                                              \
    X(s_fake_device, "_fake_device")                                                               \
    /* the save path, per tensor and storage (save_hooks.c, save.c) */                             \
    X(s_nbytes, "nbytes")                                                                          \
    X(s_storage_priv, "_storage")                                                                  \
    X(s_data_ptr, "data_ptr")                                                                      \
    X(s_cdata, "_cdata")                                                                           \
    X(s_backward_hooks, "_backward_hooks")                                                         \
    X(s_layout, "layout")                                                                          \
    X(s_type, "type")                                                                              \
    X(s_is_quantized, "is_quantized")                                                              \
    X(s_is_nested, "is_nested")                                                                    \
    X(s_dtype, "dtype")                                                                            \
    X(s_storage_offset, "storage_offset")                                                          \
    X(s_size, "size")                                                                              \
    X(s_stride, "stride")                                                                          \
    X(s_requires_grad, "requires_grad")                                                            \
    X(s_pickle_storage_type, "_pickle_storage_type")                                               \
    X(s_pickle_storage_type_old, "pickle_storage_type")                                            \
    X(s_size_priv, "_size")

typedef struct ck_state {
#define CK_STATE_OBJECT_FIELD(f) PyObject *f;
#define CK_STATE_TYPE_FIELD(f) PyTypeObject *f;
#define CK_STATE_NAME_FIELD(f, text) PyObject *f;
    CK_STATE_OBJECTS(CK_STATE_OBJECT_FIELD)
    CK_STATE_TYPES(CK_STATE_TYPE_FIELD)
    CK_STATE_NAMES(CK_STATE_NAME_FIELD)
#undef CK_STATE_OBJECT_FIELD
#undef CK_STATE_TYPE_FIELD
#undef CK_STATE_NAME_FIELD
    int torch_ready; /* the torch half is filled (ck_torch_ready) */
    ck_dtype_info dtypes[CK_DT_COUNT];
} ck_state;

/* The state of the module object m. */
ck_state *ck_get_state(PyObject *module);

/* Imports torch and fills the torch half of st once. Returns 0, or -1
 * with an exception set. */
int ck_torch_ready(ck_state *st);

#endif

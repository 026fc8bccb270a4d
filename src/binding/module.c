/* ckptio._native: module definition (multi-phase init, per-module state),
 * configuration with torch's tables, and the load entry point. */
#define CKPTIO_IMPORT_ARRAY
#include "state.h"

#include "budget.h"
#include "dataset.h"
#include "dcp.h"
#include "errors.h"
#include "globals.h"
#include "hostcopy.h"
#include "keys.h"
#include "readahead.h"
#include "readinto.h"
#include "libs.h"
#include "http.h"
#include "load.h"
#include "mapping.h"
#include "npy.h"
#include "save.h"
#include "save_hooks.h"
#include "tensors.h"
#include "verify.h"

ck_state *ck_get_state(PyObject *module) {
    return (ck_state *)PyModule_GetState(module);
}

/* Names of the dtype codes, in ck_dtype_code order, and the NumPy type with
 * the same bytes where one exists (-1: no NumPy equivalent, the tensor is
 * made over an integer array of the element size and viewed as the dtype;
 * -2: quantized, never built natively). */
static const struct {
    const char *name;
    int npy;
} dtype_table[CK_DT_COUNT] = {
    [CK_DT_FLOAT64] = {"float64", NPY_FLOAT64},
    [CK_DT_FLOAT32] = {"float32", NPY_FLOAT32},
    [CK_DT_FLOAT16] = {"float16", NPY_FLOAT16},
    [CK_DT_BFLOAT16] = {"bfloat16", -1},
    [CK_DT_COMPLEX128] = {"complex128", NPY_COMPLEX128},
    [CK_DT_COMPLEX64] = {"complex64", NPY_COMPLEX64},
    [CK_DT_COMPLEX32] = {"complex32", -1},
    [CK_DT_INT64] = {"int64", NPY_INT64},
    [CK_DT_INT32] = {"int32", NPY_INT32},
    [CK_DT_INT16] = {"int16", NPY_INT16},
    [CK_DT_INT8] = {"int8", NPY_INT8},
    [CK_DT_UINT8] = {"uint8", NPY_UINT8},
    [CK_DT_BOOL] = {"bool", NPY_BOOL},
    [CK_DT_UINT16] = {"uint16", NPY_UINT16},
    [CK_DT_UINT32] = {"uint32", NPY_UINT32},
    [CK_DT_UINT64] = {"uint64", NPY_UINT64},
    [CK_DT_FLOAT8_E5M2] = {"float8_e5m2", -1},
    [CK_DT_FLOAT8_E4M3FN] = {"float8_e4m3fn", -1},
    [CK_DT_FLOAT8_E5M2FNUZ] = {"float8_e5m2fnuz", -1},
    [CK_DT_FLOAT8_E4M3FNUZ] = {"float8_e4m3fnuz", -1},
    [CK_DT_FLOAT8_E8M0FNU] = {"float8_e8m0fnu", -1},
    [CK_DT_FLOAT4_E2M1FN_X2] = {"float4_e2m1fn_x2", -1},
    [CK_DT_QINT8] = {"qint8", -2},
    [CK_DT_QUINT8] = {"quint8", -2},
    [CK_DT_QINT32] = {"qint32", -2},
    [CK_DT_QUINT4X2] = {"quint4x2", -2},
    [CK_DT_QUINT2X4] = {"quint2x4", -2},
    [CK_DT_BITS1X8] = {"bits1x8", -1},
    [CK_DT_BITS2X4] = {"bits2x4", -1},
    [CK_DT_BITS4X2] = {"bits4x2", -1},
    [CK_DT_BITS8] = {"bits8", -1},
    [CK_DT_BITS16] = {"bits16", -1},
    [CK_DT_UINT1] = {"uint1", -1},
    [CK_DT_UINT2] = {"uint2", -1},
    [CK_DT_UINT3] = {"uint3", -1},
    [CK_DT_UINT4] = {"uint4", -1},
    [CK_DT_UINT5] = {"uint5", -1},
    [CK_DT_UINT6] = {"uint6", -1},
    [CK_DT_UINT7] = {"uint7", -1},
    [CK_DT_INT1] = {"int1", -1},
    [CK_DT_INT2] = {"int2", -1},
    [CK_DT_INT3] = {"int3", -1},
    [CK_DT_INT4] = {"int4", -1},
    [CK_DT_INT5] = {"int5", -1},
    [CK_DT_INT6] = {"int6", -1},
    [CK_DT_INT7] = {"int7", -1},
};

/* The numpy type whose array torch.from_numpy wraps before the view to a
 * dtype numpy lacks (bfloat16, float8...): signed integers, which every
 * torch reads (torch < 2.3 refuses numpy's uint16/32/64). */
static int view_type_for(int elsize) {
    switch (elsize) {
    case 1:
        return NPY_UINT8;
    case 2:
        return NPY_INT16;
    case 4:
        return NPY_INT32;
    case 8:
        return NPY_INT64;
    default:
        return -1;
    }
}

/* ---- configure ------------------------------------------------------------ */

static int take(PyObject *config, const char *key, PyObject **slot) {
    PyObject *v = PyDict_GetItemString(config, key);
    if (v == NULL) {
        PyErr_Format(PyExc_KeyError, "configure: missing %s", key);
        return -1;
    }
    Py_XSETREF(*slot, Py_NewRef(v));
    return 0;
}

static int take_dict(PyObject *config, const char *key, PyObject **slot) {
    if (take(config, key, slot) < 0)
        return -1;
    if (!PyDict_Check(*slot)) {
        PyErr_Format(PyExc_TypeError, "configure: %s must be a dict", key);
        return -1;
    }
    return 0;
}

static PyObject *py_configure(PyObject *module, PyObject *config) {
    ck_state *st = ck_get_state(module);
    if (!PyDict_Check(config)) {
        PyErr_SetString(PyExc_TypeError, "configure takes a dict");
        return NULL;
    }
    st->torch_ready = 0;
    /* the state's slots by their keys: O any object, D a dict */
    static const struct {
        const char *key;
        size_t offset;
        int is_dict;
    } slots[] = {
#define O(k, f) {k, offsetof(ck_state, f), 0}
#define D(k, f)                                                                                    \
    { k, offsetof(ck_state, f), 1 }
        O("from_numpy", from_numpy),
        O("empty", torch_empty),
        O("Tensor", Tensor),
        O("Parameter", Parameter),
        O("make_subclass", make_subclass),
        O("tensor_setstate", tensor_setstate),
        O("set_tensor_metadata", set_tensor_metadata),
        O("set_obj_state", set_obj_state),
        O("rebuild_tensor", rebuild_tensor),
        O("rebuild_tensor_v2", rebuild_tensor_v2),
        O("rebuild_tensor_v3", rebuild_tensor_v3),
        O("rebuild_parameter", rebuild_parameter),
        O("rebuild_parameter_with_state", rebuild_parameter_with_state),
        O("rebuild_from_type_v2", rebuild_from_type_v2),
        O("TypedStorage", TypedStorage),
        O("UntypedStorage", UntypedStorage),
        O("OrderedDict", OrderedDict),
        O("Counter", Counter),
        O("normalize_storage_type", normalize_storage_type),
        O("location_tag", location_tag),
        O("torch", torch_module),
        O("get_tensor_metadata", get_tensor_metadata),
        O("strided", strided),
        O("save_new_dtypes", save_new_dtypes),
        D("storage_dtype", storage_dtype),
        D("storage_by_name", storage_by_name),
        D("allowed", allowed),
        D("wo_name_mapping", wo_name_mapping),
        D("wo_import_mapping", wo_import_mapping),
        D("compat_name_mapping", compat_name_mapping),
        D("compat_import_mapping", compat_import_mapping),
        D("extension_registry", extension_registry),
        D("save_legacy", save_legacy),
#undef O
#undef D
    };
    for (size_t i = 0; i < sizeof slots / sizeof slots[0]; i++) {
        PyObject **slot = (PyObject **)((char *)st + slots[i].offset);
        if ((slots[i].is_dict ? take_dict : take)(config, slots[i].key, slot) < 0)
            return NULL;
    }
    if (!PyAnySet_Check(st->save_new_dtypes)) {
        PyErr_SetString(PyExc_TypeError, "configure: save_new_dtypes must be a set");
        return NULL;
    }

    /* dtypes: a list aligned with DTYPE_NAMES of (dtype or None, elsize,
     * cpu template or None) */
    PyObject *dtypes = PyDict_GetItemString(config, "dtypes");
    if (dtypes == NULL || !PyList_Check(dtypes) || PyList_GET_SIZE(dtypes) != CK_DT_COUNT) {
        PyErr_SetString(PyExc_TypeError,
                        "configure: dtypes must be a list aligned with DTYPE_NAMES");
        return NULL;
    }
    Py_XSETREF(st->dtype_code, PyDict_New());
    if (st->dtype_code == NULL)
        return NULL;
    for (int i = 0; i < CK_DT_COUNT; i++) {
        ck_dtype_info *di = &st->dtypes[i];
        Py_CLEAR(di->dtype);
        Py_CLEAR(di->cpu_template);
        PyObject *row = PyList_GET_ITEM(dtypes, i);
        PyObject *dtype, *tmpl;
        int elsize;
        if (!PyArg_ParseTuple(row, "OiO", &dtype, &elsize, &tmpl))
            return NULL;
        if (dtype == Py_None)
            continue;
        di->dtype = Py_NewRef(dtype);
        di->cpu_template = tmpl == Py_None ? NULL : Py_NewRef(tmpl);
        di->elsize = elsize;
        int npy = dtype_table[i].npy;
        di->needs_view = npy == -1;
        di->npy_type = npy >= 0 ? npy : (npy == -1 ? view_type_for(elsize) : -1);
        if (di->cpu_template == NULL)
            di->npy_type = -1;
        PyObject *code = PyLong_FromLong(i);
        if (code == NULL || PyDict_SetItem(st->dtype_code, dtype, code) < 0) {
            Py_XDECREF(code);
            return NULL;
        }
        Py_DECREF(code);
    }
    Py_XSETREF(st->allowed_ids, ck_ids_of_values(st->allowed));
    if (st->allowed_ids == NULL)
        return NULL;
    if (ck_budget_configure(st) < 0)
        return NULL;
    st->torch_ready = 1;
    Py_RETURN_NONE;
}

int ck_torch_ready(ck_state *st) {
    if (st->torch_ready)
        return 0;
    PyErr_SetString(PyExc_RuntimeError,
                    "ckptio._native is not configured: import ckptio, not ckptio._native");
    return -1;
}

/* ---- module ---------------------------------------------------------------- */

static PyMethodDef module_methods[] = {
    {"configure", py_configure, METH_O,
     "configure(tables): torch's objects and tables, given once by ckptio."},
    {"map_file", ck_py_map_file, METH_O,
     "map_file(path) -> Mapping: the file mapped privately (copy-on-write)."},
    {"read_file", ck_py_read_file, METH_O,
     "read_file(path) -> Mapping: the file read into one heap buffer."},
    {"copy_buffer", ck_py_copy_buffer, METH_O,
     "copy_buffer(obj) -> Mapping: a bytes-like object copied into one heap buffer."},
    {"alloc", ck_py_alloc, METH_O,
     "alloc(n) -> Mapping: an uninitialised writable heap buffer of n bytes."},
    {"load", (PyCFunction)(void (*)(void))ck_py_load, METH_VARARGS | METH_KEYWORDS, ck_load_doc},
    {NULL, NULL, 0, NULL},
};

/* Each binding unit that adds Python functions exports one table; the
 * module adds them all at exec time (one line per unit, kept by hand). */
/* clang-format off */
static PyMethodDef *const method_groups[] = {
    ck_save_methods,
    ck_hostcopy_methods,
    ck_keys_methods,
    ck_http_methods,
    ck_verify_methods,
    ck_libs_methods,
    ck_dcp_methods,
    ck_readinto_methods,
    ck_readahead_methods,
    NULL, /* sentinel: units add their tables before it */
};
/* clang-format on */

static int intern(PyObject **slot, const char *s) {
    *slot = PyUnicode_InternFromString(s);
    return *slot == NULL ? -1 : 0;
}

static int module_exec(PyObject *m) {
    ck_state *st = ck_get_state(m);
    import_array1(-1);
    for (size_t i = 0; method_groups[i] != NULL; i++)
        if (PyModule_AddFunctions(m, method_groups[i]) < 0)
            return -1;
    if (ck_errors_init(m, st) < 0 || ck_mapping_init(m, st) < 0 || ck_tensors_init(m, st) < 0)
        return -1;
    if (ck_http_init(m, st) < 0 || ck_save_hooks_init(m, st) < 0 || ck_dataset_init(st) < 0)
        return -1;
    if (ck_hostcopy_init(m, st) < 0 || ck_dcp_init(m, st) < 0)
        return -1;
    st->torchscript_marker = PyUnicode_InternFromString("<ckptio torchscript archive>");
    if (st->torchscript_marker == NULL ||
        PyModule_AddObjectRef(m, "TORCHSCRIPT", st->torchscript_marker) < 0)
        return -1;
#define INTERN(f, text)                                                                            \
    if (intern(&st->f, text) < 0)                                                                  \
        return -1;
    CK_STATE_NAMES(INTERN)
#undef INTERN
    PyObject *names = PyTuple_New(CK_DT_COUNT);
    if (names == NULL)
        return -1;
    for (int i = 0; i < CK_DT_COUNT; i++) {
        PyObject *n = PyUnicode_FromString(dtype_table[i].name);
        if (n == NULL) {
            Py_DECREF(names);
            return -1;
        }
        PyTuple_SET_ITEM(names, i, n);
    }
    int rc = PyModule_AddObjectRef(m, "DTYPE_NAMES", names);
    Py_DECREF(names);
    return rc;
}

/* Every reference the state `st` holds, each as REF(its slot): traverse and
 * clear each define REF (Py_VISIT, Py_CLEAR) around it. */
#define STATE_REF(f) REF(st->f);
#define STATE_NAME_REF(f, text) REF(st->f);
#define FOR_STATE_REFS                                                                             \
    CK_STATE_OBJECTS(STATE_REF)                                                                    \
    CK_STATE_TYPES(STATE_REF)                                                                      \
    CK_STATE_NAMES(STATE_NAME_REF)                                                                 \
    for (int i = 0; i < CK_DT_COUNT; i++) {                                                        \
        REF(st->dtypes[i].dtype);                                                                  \
        REF(st->dtypes[i].cpu_template);                                                           \
    }

static int module_traverse(PyObject *m, visitproc visit, void *arg) {
    ck_state *st = ck_get_state(m);
    if (st == NULL)
        return 0;
#define REF Py_VISIT
    FOR_STATE_REFS
#undef REF
    return 0;
}

static int module_clear(PyObject *m) {
    ck_state *st = ck_get_state(m);
    if (st == NULL)
        return 0;
#define REF Py_CLEAR
    FOR_STATE_REFS
#undef REF
    st->torch_ready = 0;
    return 0;
}

static void module_free(void *m) {
    module_clear((PyObject *)m);
}

static PyModuleDef_Slot module_slots[] = {
    {Py_mod_exec, module_exec},
    {0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "ckptio._native",
    .m_doc = "The C core of ckptio: zero-copy readers and writers of torch checkpoints.",
    .m_size = sizeof(ck_state),
    .m_methods = module_methods,
    .m_slots = module_slots,
    .m_traverse = module_traverse,
    .m_clear = module_clear,
    .m_free = module_free,
};

PyMODINIT_FUNC PyInit__native(void) {
    return PyModuleDef_Init(&module_def);
}

#include "globals.h"

#include "dataset.h"
#include "errors.h"

static const char *const blocked_modules[] = {"sys", "os", "posix", "nt"};

/* The NumPy 1 / NumPy 2 spelling of the same module ("numpy.core.x" <->
 * "numpy._core.x"), or NULL (no exception) when module is neither. */
static PyObject *numpy_alias(PyObject *module) {
    Py_ssize_t n = PyUnicode_GET_LENGTH(module);
    static const struct {
        const char *from;
        const char *to;
    } pairs[] = {{"numpy.core", "numpy._core"}, {"numpy._core", "numpy.core"}};
    for (size_t i = 0; i < sizeof pairs / sizeof pairs[0]; i++) {
        PyObject *from = PyUnicode_FromString(pairs[i].from);
        if (from == NULL)
            return NULL;
        Py_ssize_t flen = PyUnicode_GET_LENGTH(from);
        int match = PyUnicode_Tailmatch(module, from, 0, flen, -1) == 1 &&
                    (n == flen || PyUnicode_READ_CHAR(module, flen) == '.');
        Py_DECREF(from);
        if (match) {
            PyObject *rest = PyUnicode_Substring(module, flen, n);
            if (rest == NULL)
                return NULL;
            PyObject *alias = PyUnicode_FromFormat("%s%U", pairs[i].to, rest);
            Py_DECREF(rest);
            return alias;
        }
    }
    return NULL;
}

/* Applies a (module, name) -> (module, name) and a module -> module table. */
static int apply_mapping(PyObject *name_map, PyObject *import_map, PyObject **module,
                         PyObject **name) {
    PyObject *key = PyTuple_Pack(2, *module, *name);
    if (key == NULL)
        return -1;
    PyObject *hit = name_map ? PyDict_GetItemWithError(name_map, key) : NULL;
    Py_DECREF(key);
    if (hit == NULL && PyErr_Occurred())
        return -1;
    if (hit != NULL && PyTuple_Check(hit) && PyTuple_GET_SIZE(hit) == 2) {
        Py_SETREF(*module, Py_NewRef(PyTuple_GET_ITEM(hit, 0)));
        Py_SETREF(*name, Py_NewRef(PyTuple_GET_ITEM(hit, 1)));
        return 0;
    }
    hit = import_map ? PyDict_GetItemWithError(import_map, *module) : NULL;
    if (hit == NULL && PyErr_Occurred())
        return -1;
    if (hit != NULL)
        Py_SETREF(*module, Py_NewRef(hit));
    return 0;
}

static PyObject *lookup_allowed(ck_session *s, PyObject *full) {
    PyObject *obj = PyDict_GetItemWithError(s->st->allowed, full);
    if (obj == NULL && !PyErr_Occurred() && s->user_globals != NULL)
        obj = PyDict_GetItemWithError(s->user_globals, full);
    return obj; /* borrowed */
}

static int in_list(PyObject *full, const char *const *names, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (PyUnicode_CompareWithASCIIString(full, names[i]) == 0)
            return 1;
    return 0;
}

static PyObject *resolve_weights_only(ck_session *s, PyObject *module, PyObject *name) {
    ck_state *st = s->st;
    for (size_t i = 0; i < sizeof blocked_modules / sizeof blocked_modules[0]; i++) {
        if (PyUnicode_CompareWithASCIIString(module, blocked_modules[i]) == 0)
            return ck_raise(st->UnpicklingError, s->filename,
                            "weights-only load refused GLOBAL %U.%U: its module %U is blocked "
                            "(never allowed, even when allowlisted)",
                            module, name, module);
    }
    PyObject *full = PyUnicode_FromFormat("%U.%U", module, name);
    if (full == NULL)
        return NULL;
    PyObject *data = ck_dataset_global(s, full);
    if (data != NULL || PyErr_Occurred()) {
        Py_DECREF(full);
        return data;
    }
    PyObject *obj = lookup_allowed(s, full);
    if (obj == NULL && !PyErr_Occurred()) {
        PyObject *alias = numpy_alias(module);
        if (alias != NULL) {
            PyObject *alt = PyUnicode_FromFormat("%U.%U", alias, name);
            Py_DECREF(alias);
            if (alt == NULL) {
                Py_DECREF(full);
                return NULL;
            }
            obj = lookup_allowed(s, alt);
            Py_DECREF(alt);
        }
    }
    if (obj != NULL) {
        Py_DECREF(full);
        return Py_NewRef(obj);
    }
    if (PyErr_Occurred()) {
        Py_DECREF(full);
        return NULL;
    }
    static const char *const njt[] = {"torch.nested._internal.nested_tensor.NestedTensor",
                                      "torch.nested._internal.nested_tensor._rebuild_njt",
                                      "torch._dynamo.decorators._DimRange"};
    static const char *const dtensor[] = {"torch.distributed.device_mesh.DeviceMesh",
                                          "torch.distributed.tensor._dtensor_spec.DTensorSpec",
                                          "torch.distributed.tensor._dtensor_spec.TensorMeta",
                                          "torch.distributed.tensor.DTensor",
                                          "torch.distributed.tensor.placement_types.Partial",
                                          "torch.distributed.tensor.placement_types.Replicate",
                                          "torch.distributed.tensor.placement_types.Shard"};
    if (in_list(full, njt, sizeof njt / sizeof njt[0]))
        ck_raise(st->UnpicklingError, s->filename,
                 "GLOBAL %U: import torch.nested and torch._dynamo before loading nested "
                 "jagged tensors (NJTs) with weights_only=True",
                 full);
    else if (in_list(full, dtensor, sizeof dtensor / sizeof dtensor[0]))
        ck_raise(st->UnpicklingError, s->filename,
                 "GLOBAL %U: import torch.distributed.tensor before loading DTensors with "
                 "weights_only=True",
                 full);
    else if (ck_dataset_names(st, full))
        ck_raise(st->UnpicklingError, s->filename,
                 "weights-only load refused GLOBAL %U: it is outside torch's default "
                 "allowlist. ckptio decodes it, with numpy values and mmengine's "
                 "HistoryBuffer, data-only (nothing the file names is called) with "
                 "ckptio.load(f, allow='openmmlab'), the default of ckptio.checkpoint, "
                 "ckptio.mmengine, ckptio.load_url and the ckptio command line (--allow "
                 "openmmlab); or allow it as torch does, with ckptio.add_safe_globals([%U]) "
                 "(its own code then runs), or load with weights_only=False (command line: "
                 "--unsafe) if you trust the file's source",
                 full, full);
    else
        ck_raise(st->UnpicklingError, s->filename,
                 "weights-only load refused GLOBAL %U: it is not an allowed global. If you "
                 "trust it, allow it with ckptio.add_safe_globals([%U]) (or "
                 "torch.serialization.add_safe_globals), or load with weights_only=False "
                 "(command line: ckptio info/verify/convert --unsafe) if you trust the file's "
                 "source",
                 full, full);
    Py_DECREF(full);
    return NULL;
}

/* getattr through a dotted name, refusing "<locals>" as pickle does. */
static PyObject *get_dotted(PyObject *obj, PyObject *name, int dotted) {
    if (!dotted)
        return PyObject_GetAttr(obj, name);
    PyObject *dot = PyUnicode_FromString(".");
    if (dot == NULL)
        return NULL;
    PyObject *parts = PyUnicode_Split(name, dot, -1);
    Py_DECREF(dot);
    if (parts == NULL)
        return NULL;
    PyObject *cur = Py_NewRef(obj);
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(parts); i++) {
        PyObject *part = PyList_GET_ITEM(parts, i);
        if (PyUnicode_CompareWithASCIIString(part, "<locals>") == 0) {
            PyErr_Format(PyExc_AttributeError, "Can't get local attribute %R on %R", name, obj);
            Py_SETREF(cur, NULL);
            break;
        }
        Py_SETREF(cur, PyObject_GetAttr(cur, part));
        if (cur == NULL)
            break;
    }
    Py_DECREF(parts);
    return cur;
}

static PyObject *resolve_import(ck_session *s, PyObject *module, PyObject *name, int proto) {
    ck_state *st = s->st;
    PyObject *hit = PyUnicode_Check(name) && PyUnicode_Find(name, st->s_storage_word, 0,
                                                            PyUnicode_GET_LENGTH(name), 1) >= 0
                        ? PyDict_GetItemWithError(st->storage_by_name, name)
                        : NULL;
    if (hit != NULL)
        return Py_NewRef(hit);
    if (PyErr_Occurred())
        return NULL;
    if (PyUnicode_CompareWithASCIIString(module, "torch.tensor") == 0)
        module = st->s_torch_tensor_module;
    PyObject *mod = PyImport_Import(module);
    if (mod == NULL && PyErr_ExceptionMatches(PyExc_ImportError)) {
        PyObject *alias = numpy_alias(module);
        if (alias != NULL) {
            PyErr_Clear();
            mod = PyImport_Import(alias);
            Py_DECREF(alias);
        }
    }
    if (mod == NULL)
        return NULL;
    PyObject *obj = get_dotted(mod, name, proto >= 4);
    Py_DECREF(mod);
    return obj;
}

PyObject *ck_resolve_global(ck_session *s, PyObject *module, PyObject *name, int proto) {
    ck_state *st = s->st;
    PyObject *obj = NULL;
    Py_INCREF(module);
    Py_INCREF(name);
    int rc = s->weights_only
                 ? apply_mapping(st->wo_name_mapping, st->wo_import_mapping, &module, &name)
                 : (proto < 3 ? apply_mapping(st->compat_name_mapping, st->compat_import_mapping,
                                              &module, &name)
                              : 0);
    if (rc == 0) {
        if (!PyUnicode_Check(module) || !PyUnicode_Check(name))
            ck_raise(st->UnpicklingError, s->filename, "GLOBAL names must be strings");
        else
            obj = s->weights_only ? resolve_weights_only(s, module, name)
                                  : resolve_import(s, module, name, proto);
    }
    Py_DECREF(module);
    Py_DECREF(name);
    return obj;
}

static int id_in(PyObject *set, PyObject *obj) {
    if (set == NULL)
        return 0;
    PyObject *id = PyLong_FromVoidPtr(obj);
    if (id == NULL)
        return -1;
    int r = PySet_Contains(set, id);
    Py_DECREF(id);
    return r;
}

int ck_is_allowed_object(ck_session *s, PyObject *obj) {
    int r = id_in(s->st->allowed_ids, obj);
    if (r != 0)
        return r;
    return id_in(s->user_ids, obj);
}

PyObject *ck_ids_of_values(PyObject *dict) {
    PyObject *ids = PySet_New(NULL);
    if (ids == NULL)
        return NULL;
    Py_ssize_t pos = 0;
    PyObject *key, *value;
    while (PyDict_Next(dict, &pos, &key, &value)) {
        PyObject *id = PyLong_FromVoidPtr(value);
        if (id == NULL || PySet_Add(ids, id) < 0) {
            Py_XDECREF(id);
            Py_DECREF(ids);
            return NULL;
        }
        Py_DECREF(id);
    }
    return ids;
}

int ck_user_globals_prepare(ck_session *s) {
    if (s->user_globals == NULL || PyDict_GET_SIZE(s->user_globals) == 0)
        return 0;
    s->user_ids = ck_ids_of_values(s->user_globals);
    return s->user_ids == NULL ? -1 : 0;
}

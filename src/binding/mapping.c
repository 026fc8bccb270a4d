#include "mapping.h"

#include <string.h>

#include "errors.h"
#include "heaptype.h"

/* Heap buffers owned by Mappings are reported to tracemalloc under this
 * domain ('ckpt'), so that tests (and users) measuring a load with
 * tracemalloc see the C-level buffers too: inflated records, copies, whole
 * files read into memory. Free when tracemalloc is not tracing. */
#define CK_TRACE_DOMAIN 0x636b7074u

static void mapping_dealloc(ck_mapping *self) {
    PyTypeObject *tp = Py_TYPE(self);
    if (self->region.kind == CK_REGION_HEAP && self->region.data != NULL)
        PyTraceMalloc_Untrack(CK_TRACE_DOMAIN, (uintptr_t)self->region.data);
    ck_region_release(&self->region);
    tp->tp_free(self);
    Py_DECREF(tp);
}

static int mapping_getbuffer(ck_mapping *self, Py_buffer *view, int flags) {
    static char empty[1];
    void *data = self->region.data != NULL ? (void *)self->region.data : (void *)empty;
    if (PyBuffer_FillInfo(view, (PyObject *)self, data, (Py_ssize_t)self->region.len, 0, flags) < 0)
        return -1;
    self->exports++;
    return 0;
}

static void mapping_releasebuffer(ck_mapping *self, Py_buffer *view) {
    (void)view;
    self->exports--;
}

static PyObject *mapping_get_size(ck_mapping *self, void *closure) {
    (void)closure;
    return PyLong_FromSize_t(self->region.len);
}

static PyObject *mapping_get_kind(ck_mapping *self, void *closure) {
    (void)closure;
    switch (self->region.kind) {
    case CK_REGION_MMAP:
        return PyUnicode_FromString("mmap");
    case CK_REGION_HEAP:
        return PyUnicode_FromString("heap");
    default:
        return PyUnicode_FromString("empty");
    }
}

static PyObject *mapping_repr(ck_mapping *self) {
    PyObject *kind = mapping_get_kind(self, NULL);
    if (kind == NULL)
        return NULL;
    PyObject *r = PyUnicode_FromFormat("<ckptio Mapping %U of %zu bytes>", kind, self->region.len);
    Py_DECREF(kind);
    return r;
}

static PyGetSetDef mapping_getset[] = {
    {"size", (getter)mapping_get_size, NULL, "Number of bytes.", NULL},
    {"kind", (getter)mapping_get_kind, NULL, "'mmap' or 'heap'.", NULL},
    {NULL},
};

static PyType_Slot mapping_slots[] = {
    {Py_tp_dealloc, mapping_dealloc},
    {Py_tp_repr, mapping_repr},
    {Py_tp_getset, mapping_getset},
    {Py_bf_getbuffer, mapping_getbuffer},
    {Py_bf_releasebuffer, mapping_releasebuffer},
    {Py_tp_doc, "The bytes of one checkpoint (a private file mapping or a heap buffer). "
                "Tensors loaded from it keep it alive."},
    {0, NULL},
};

static PyType_Spec mapping_spec =
    CK_TYPE_SPEC("Mapping", sizeof(ck_mapping), Py_TPFLAGS_IMMUTABLETYPE, mapping_slots);

int ck_mapping_init(PyObject *m, ck_state *st) {
    return ck_new_module_type(m, &mapping_spec, &st->MappingType);
}

PyObject *ck_mapping_new(ck_state *st, ck_region *region) {
    ck_mapping *self = PyObject_New(ck_mapping, st->MappingType);
    if (self == NULL) {
        ck_region_release(region);
        return NULL;
    }
    self->region = *region;
    self->exports = 0;
    memset(region, 0, sizeof *region);
    if (self->region.kind == CK_REGION_HEAP && self->region.data != NULL)
        (void)PyTraceMalloc_Track(CK_TRACE_DOMAIN, (uintptr_t)self->region.data, self->region.len);
    return (PyObject *)self;
}

int ck_mapping_check(ck_state *st, PyObject *obj) {
    return Py_IS_TYPE(obj, st->MappingType);
}

const uint8_t *ck_mapping_file_pages(ck_state *st, PyObject *obj) {
    if (obj == NULL || !ck_mapping_check(st, obj))
        return NULL;
    const ck_region *r = &((ck_mapping *)obj)->region;
    return r->kind == CK_REGION_MMAP && r->len > 0 ? r->data : NULL;
}

int ck_mapping_arg(ck_state *st, PyObject *obj, const char *fn) {
    if (ck_mapping_check(st, obj))
        return 0;
    PyErr_Format(PyExc_TypeError, "%s: mapping must be a ckptio._native.Mapping", fn);
    return -1;
}

typedef ck_status (*region_opener)(const char *, ck_region *, ck_error *);

static PyObject *open_region(PyObject *module, PyObject *path, region_opener open_fn) {
    ck_state *st = ck_get_state(module);
    PyObject *bytes_path = NULL;
    if (!PyUnicode_FSConverter(path, &bytes_path))
        return NULL;
    PyObject *name = PyOS_FSPath(path);
    if (name == NULL) {
        Py_DECREF(bytes_path);
        return NULL;
    }
    ck_region region = {0};
    ck_error err;
    ck_error_clear(&err);
    ck_status rc;
    Py_BEGIN_ALLOW_THREADS
        rc = open_fn(PyBytes_AS_STRING(bytes_path), &region, &err);
    Py_END_ALLOW_THREADS
    Py_DECREF(bytes_path);
    if (rc != CK_OK) {
        ck_raise_core(st, name, &err);
        Py_DECREF(name);
        return NULL;
    }
    Py_DECREF(name);
    return ck_mapping_new(st, &region);
}

PyObject *ck_py_map_file(PyObject *module, PyObject *path) {
    return open_region(module, path, ck_region_map_file);
}

PyObject *ck_py_read_file(PyObject *module, PyObject *path) {
    return open_region(module, path, ck_region_read_file);
}

PyObject *ck_py_copy_buffer(PyObject *module, PyObject *obj) {
    ck_state *st = ck_get_state(module);
    Py_buffer view;
    if (PyObject_GetBuffer(obj, &view, PyBUF_C_CONTIGUOUS) < 0)
        return NULL;
    ck_region region = {0};
    ck_error err;
    ck_error_clear(&err);
    if (ck_region_alloc((size_t)view.len, &region, &err) != CK_OK) {
        PyBuffer_Release(&view);
        return ck_raise_core(st, NULL, &err);
    }
    if (view.len > 0) {
        Py_BEGIN_ALLOW_THREADS
            memcpy(region.data, view.buf, (size_t)view.len);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&view);
    return ck_mapping_new(st, &region);
}

PyObject *ck_py_alloc(PyObject *module, PyObject *size_obj) {
    ck_state *st = ck_get_state(module);
    Py_ssize_t size = PyNumber_AsSsize_t(size_obj, PyExc_OverflowError);
    if (size == -1 && PyErr_Occurred())
        return NULL;
    if (size < 0) {
        PyErr_SetString(PyExc_ValueError, "alloc: negative size");
        return NULL;
    }
    ck_region region = {0};
    ck_error err;
    ck_error_clear(&err);
    if (ck_region_alloc((size_t)size, &region, &err) != CK_OK)
        return ck_raise_core(st, NULL, &err);
    return ck_mapping_new(st, &region);
}

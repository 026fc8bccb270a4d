/* ckptio._native.Mapping: the one owner of a checkpoint's bytes (a
 * MAP_PRIVATE mapping or a heap buffer). Every NumPy array built over the
 * bytes holds a reference to it, so the memory is released when the last
 * tensor built on it is freed. It exports a writable buffer. */
#ifndef CKPTIO_BINDING_MAPPING_H
#define CKPTIO_BINDING_MAPPING_H

#include "state.h"
#include "core/region.h"

typedef struct ck_mapping {
    PyObject_HEAD ck_region region;
    Py_ssize_t exports;
} ck_mapping;

/* Creates the type and adds it to module m as "Mapping". */
int ck_mapping_init(PyObject *m, ck_state *st);

/* A new Mapping that takes ownership of *region (which is reset to empty,
 * also on failure, when it is released). */
PyObject *ck_mapping_new(ck_state *st, ck_region *region);

/* 1 if obj is a Mapping. */
int ck_mapping_check(ck_state *st, PyObject *obj);

/* The check of a function's mapping argument: 0 if obj is a Mapping, else
 * -1 with TypeError "<fn>: mapping must be a ckptio._native.Mapping". */
int ck_mapping_arg(ck_state *st, PyObject *obj, const char *fn);

/* The start of the file mapping (page aligned) that Mapping obj holds, or
 * NULL when it holds a heap buffer or nothing: for read-ahead (core/ahead.h). */
const uint8_t *ck_mapping_file_pages(ck_state *st, PyObject *obj);

/* Module functions: map_file(path), read_file(path), copy_buffer(obj). */
PyObject *ck_py_map_file(PyObject *module, PyObject *path);
PyObject *ck_py_read_file(PyObject *module, PyObject *path);
PyObject *ck_py_copy_buffer(PyObject *module, PyObject *obj);
/* alloc(n): an uninitialised writable Mapping of n bytes, to read into. */
PyObject *ck_py_alloc(PyObject *module, PyObject *size);

#endif

/* numpy values inside a checkpoint, decoded data-only (the openmmlab set,
 * dataset.h).
 *
 * numpy pickles an array as _reconstruct(ndarray, (0,), b'b') followed by
 * BUILD (1, shape, dtype, is_fortran, rawdata), a dtype as
 * dtype(typestr, False, True) followed by BUILD (3, endian, None, None,
 * None, elsize, alignment, flags), and a scalar as scalar(dtype, rawbytes).
 * These builders accept exactly those shapes:
 *   - dtypes of bool, signed/unsigned integers, floats, complex numbers,
 *     fixed-width bytes (S) and str (U), in either byte order, and object
 *     (O) for arrays only; no structured, sub-array, datetime or
 *     user-defined dtypes, no metadata;
 *   - an array's bytes must be exactly shape x itemsize (overflow-checked)
 *     before anything is allocated, so memory stays bounded by the file;
 *   - an object array's elements are a list of exactly its size, each an
 *     object the VM itself decoded under the same rules (anything the rules
 *     refuse, e.g. a REDUCE of os.system inside the list, never gets there).
 * The dtype is built with the numpy C API (PyArray_DescrConverter on a
 * typestring ckptio formed itself, then a fresh copy, then its byte order);
 * a scalar with PyArray_Scalar. An array is filled in place, because the
 * pickle may have memoized the object before its BUILD: the fill is
 * ndarray.__setstate__ taken from the ndarray type itself (C code in numpy's
 * methods.c, array_setstate), given only arguments ckptio assembled and
 * checked: an exact int version, a tuple of exact non-negative ints, a dtype
 * that passed the checks above, a bool, and exact bytes of exactly the
 * array's size (or the checked list). For those arguments that function
 * parses, allocates the checked size and copies (or keeps a reference to)
 * the bytes; it calls no Python code.
 */
#ifndef CKPTIO_BINDING_NPDATA_H
#define CKPTIO_BINDING_NPDATA_H

#include "dataset.h"

/* Caches numpy's _reconstruct and scalar functions and ndarray's
 * __setstate__ in st. Returns 0 or -1. */
int ck_np_init(ck_state *st);

/* REDUCE of numpy.dtype, _reconstruct or scalar (func is one of them). */
int ck_np_reduce(ck_session *s, PyObject *func, PyObject *args, PyObject **out, ck_why *why);

/* BUILD on a numpy dtype or an exact ndarray; CK_DATA_NO for anything else. */
int ck_np_build(ck_session *s, PyObject *inst, PyObject *state, ck_why *why);

/* 1 if func is one of the numpy callables ck_np_reduce decodes. */
int ck_np_is_callable(ck_state *st, PyObject *func);

#endif

/* NumPy's C API, imported once in module.c (import_array) and shared by
 * the binding's other files through one unique symbol. */
#ifndef CKPTIO_BINDING_NPY_H
#define CKPTIO_BINDING_NPY_H

#define PY_ARRAY_UNIQUE_SYMBOL ckptio_ARRAY_API
#ifndef CKPTIO_IMPORT_ARRAY
#define NO_IMPORT_ARRAY
#endif
#include <numpy/arrayobject.h>

#endif

/* libFuzzer harness for ckptio.load and ckptio.verify on whole files, seeded
 * with the legacy format (torch.save(..., _use_new_zipfile_serialization=
 * False)): the header pickles, the storage scan, the key list, the raw
 * storage data and the object pickle with views; run on the zip corpus too,
 * it reaches verify's record, CRC and storage checks. The embedded
 * interpreter imports the ckptio._native that the Makefile built with
 * coverage and AddressSanitizer (see pyembed.h); built with -DCK_FUZZ_REPLAY,
 * main() replays files.
 *
 * Mutations are structure-aware (LLVMFuzzerCustomMutator, in
 * tests/fuzz/structmut.py): a zip archive is rewritten after its data.pkl
 * is mutated by libFuzzer or has tokens swapped (storage types, dtypes,
 * rebuild functions, storage keys, element counts), or after records are
 * dropped, cut, doubled, multiplied or deflated, so that mutations get past
 * the CRC and container checks; legacy streams get token swaps and long
 * view chains; one mutation in four is libFuzzer's own on the whole file. */
#define CK_FUZZ_VERIFY 1
#define CK_FUZZ_PLAIN_INIT 1
#include "pyembed.h"
#include "replay.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    ck_fuzz_python_load(data, size);
    return 0;
}

#ifndef CK_FUZZ_REPLAY
size_t LLVMFuzzerMutate(uint8_t *data, size_t size, size_t max_size);

/* byte_mutate(data, max_size) -> bytes: libFuzzer's mutation of data. */
static PyObject *byte_mutate(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer in;
    Py_ssize_t max_size;
    if (!PyArg_ParseTuple(args, "y*n", &in, &max_size))
        return NULL;
    size_t cap = (size_t)(max_size > in.len ? max_size : in.len);
    uint8_t *buf = malloc(cap ? cap : 1);
    if (buf == NULL) {
        PyBuffer_Release(&in);
        return PyErr_NoMemory();
    }
    memcpy(buf, in.buf, (size_t)in.len);
    size_t n = LLVMFuzzerMutate(buf, (size_t)in.len, cap);
    PyBuffer_Release(&in);
    PyObject *out = PyBytes_FromStringAndSize((const char *)buf, (Py_ssize_t)n);
    free(buf);
    return out;
}

static PyMethodDef byte_mutate_def = {"byte_mutate", byte_mutate, METH_VARARGS, NULL};
static PyObject *mutator, *byte_mutate_fn;

size_t LLVMFuzzerCustomMutator(uint8_t *data, size_t size, size_t max_size, unsigned int seed) {
    if (mutator == NULL) {
        PyObject *r = PyRun_String("sys.path.insert(0, os.path.join(TESTS, 'fuzz'))\n"
                                   "import structmut\n",
                                   Py_file_input, ck_fuzz_globals, ck_fuzz_globals);
        PyObject *mod = r != NULL ? PyDict_GetItemString(ck_fuzz_globals, "structmut") : NULL;
        mutator = mod != NULL ? PyObject_GetAttrString(mod, "mutate") : NULL;
        byte_mutate_fn = PyCFunction_New(&byte_mutate_def, NULL);
        Py_XDECREF(r);
        if (mutator == NULL || byte_mutate_fn == NULL) {
            PyErr_Print();
            abort();
        }
    }
    PyObject *in = PyBytes_FromStringAndSize((const char *)data, (Py_ssize_t)size);
    PyObject *out = in != NULL ? PyObject_CallFunction(mutator, "OInO", in, seed,
                                                       (Py_ssize_t)max_size, byte_mutate_fn)
                               : NULL;
    Py_XDECREF(in);
    if (out == NULL || !PyBytes_Check(out)) {
        PyErr_Print();
        fprintf(stderr, "fuzz: the structure-aware mutator failed\n");
        abort();
    }
    size_t n = (size_t)PyBytes_GET_SIZE(out);
    if (n > max_size)
        n = max_size;
    memcpy(data, PyBytes_AS_STRING(out), n);
    Py_DECREF(out);
    return n;
}
#endif

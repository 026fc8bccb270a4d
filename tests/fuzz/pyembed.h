/* The embedded interpreter shared by the harnesses that build Python
 * objects (fuzz_legacy, fuzz_unpickle): Python is started once, with the
 * project's root (where the ckptio package and its _native extension are)
 * and the venv's site-packages (torch, numpy) at the front of sys.path;
 * then every input goes to ckptio.load as bytes, with torch's allowlist and
 * again with allow='openmmlab' (numpy values and mmengine's HistoryBuffer).
 *
 * A load may fail only with ckptio.CheckpointError (UnpicklingError is a
 * subclass), and ckptio.verify (with CK_FUZZ_VERIFY) must report, never
 * raise: any other exception is a finding, printed and then abort()ed, as
 * are the crashes and memory errors the sanitizers catch.
 *
 * With CK_FUZZ_TRANSFORM (a Python expression naming a function of the
 * repository's tests/ folder, e.g. "torchspace.from_bytes"), each input is
 * first turned into the file to load by that function (generator-driven
 * fuzzing: the input's bytes choose what is built).
 *
 * CK_FUZZ_ROOT, CK_FUZZ_SITE and CK_FUZZ_TESTS are set by the Makefile; the
 * environment variables of the same names override them. */
#ifndef CKPTIO_FUZZ_PYEMBED_H
#define CKPTIO_FUZZ_PYEMBED_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdio.h>
#include <stdlib.h>

#ifndef CK_FUZZ_ROOT
#define CK_FUZZ_ROOT "."
#endif
/* 1: every input also goes through ckptio.verify, which must hand back a
 * report (never raise) */
#ifndef CK_FUZZ_VERIFY
#define CK_FUZZ_VERIFY 0
#endif
#ifndef CK_FUZZ_SITE
#define CK_FUZZ_SITE ""
#endif
#ifndef CK_FUZZ_TESTS
#define CK_FUZZ_TESTS ""
#endif
#ifndef CK_FUZZ_TRANSFORM
#define CK_FUZZ_TRANSFORM "None"
#endif

static PyObject *ck_fuzz_one; /* strong: the Python function run per input */

static const char ck_fuzz_code[] = "import os, sys\n"
                                   "sys.path[:0] = [p for p in (ROOT, SITE, TESTS) if p]\n"
                                   "import ckptio\n"
                                   "import torch\n"
                                   "torch.set_num_threads(1)\n"
                                   "if TRANSFORM != 'None':\n"
                                   "    import importlib\n"
                                   "    _m, _f = TRANSFORM.rsplit('.', 1)\n"
                                   "    transform = getattr(importlib.import_module(_m), _f)\n"
                                   "else:\n"
                                   "    transform = None\n"
                                   "def one(data):\n"
                                   "    if transform is not None:\n"
                                   "        data = transform(data)\n"
                                   "    try:\n"
                                   "        ckptio.load(data)\n"
                                   "    except ckptio.CheckpointError:\n"
                                   "        pass\n"
                                   "    try:\n"
                                   "        ckptio.load(data, allow='openmmlab')\n"
                                   "    except ckptio.CheckpointError:\n"
                                   "        pass\n"
                                   "    if VERIFY:\n"
                                   "        report = ckptio.verify(data)\n"
                                   "        assert report.ok or report.problems\n";

/* The globals of the embedded code, for harnesses that add functions. */
static PyObject *ck_fuzz_globals;

static void ck_fuzz_python_init(void) {
    if (ck_fuzz_one != NULL)
        return;
    const char *root = getenv("CK_FUZZ_ROOT");
    const char *site = getenv("CK_FUZZ_SITE");
    const char *tests = getenv("CK_FUZZ_TESTS");
    Py_InitializeEx(0);
    PyObject *globals = PyDict_New(); /* strong, kept for the process */
    PyObject *r1 = PyUnicode_FromString(root ? root : CK_FUZZ_ROOT);
    PyObject *r2 = PyUnicode_FromString(site ? site : CK_FUZZ_SITE);
    PyObject *r3 = PyUnicode_FromString(tests ? tests : CK_FUZZ_TESTS);
    PyObject *r4 = PyUnicode_FromString(CK_FUZZ_TRANSFORM);
    if (globals == NULL || r1 == NULL || r2 == NULL || r3 == NULL || r4 == NULL ||
        PyDict_SetItemString(globals, "TESTS", r3) < 0 ||
        PyDict_SetItemString(globals, "TRANSFORM", r4) < 0 ||
        PyDict_SetItemString(globals, "__builtins__", PyEval_GetBuiltins()) < 0 ||
        PyDict_SetItemString(globals, "ROOT", r1) < 0 ||
        PyDict_SetItemString(globals, "SITE", r2) < 0 ||
        PyDict_SetItemString(globals, "VERIFY", CK_FUZZ_VERIFY ? Py_True : Py_False) < 0) {
        PyErr_Print();
        abort();
    }
    Py_DECREF(r1);
    Py_DECREF(r2);
    Py_DECREF(r3);
    Py_DECREF(r4);
    PyObject *res = PyRun_String(ck_fuzz_code, Py_file_input, globals, globals);
    if (res == NULL) {
        PyErr_Print();
        fprintf(stderr, "fuzz: cannot import ckptio (set CK_FUZZ_ROOT and CK_FUZZ_SITE)\n");
        abort();
    }
    Py_DECREF(res);
    ck_fuzz_one = PyDict_GetItemString(globals, "one"); /* borrowed from globals */
    if (ck_fuzz_one == NULL)
        abort();
    Py_INCREF(ck_fuzz_one);
    ck_fuzz_globals = globals;
}

/* Loads data with ckptio.load; aborts on any outcome but a result or a
 * CheckpointError. */
static void ck_fuzz_python_load(const uint8_t *data, size_t size) {
    PyObject *bytes = PyBytes_FromStringAndSize((const char *)data, (Py_ssize_t)size);
    if (bytes == NULL) {
        PyErr_Print();
        abort();
    }
    PyObject *r = PyObject_CallOneArg(ck_fuzz_one, bytes);
    Py_DECREF(bytes);
    if (r == NULL) {
        PyErr_Print();
        fprintf(stderr, "fuzz: ckptio.load raised something other than CheckpointError\n");
        abort();
    }
    Py_DECREF(r);
}

/* With CK_FUZZ_PLAIN_INIT, the harness's LLVMFuzzerInitialize is this:
 * start Python, nothing else (fuzz_legacy, fuzz_struct). */
#ifdef CK_FUZZ_PLAIN_INIT
int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc;
    (void)argv;
    ck_fuzz_python_init();
    return 0;
}
#endif

#endif

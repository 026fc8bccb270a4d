#include "libs.h"

#include "core/curlshim.h"
#include "core/sha256.h"

static PyObject *py_libraries(PyObject *module, PyObject *noargs) {
    (void)module, (void)noargs;
    const char *why = NULL;
    int curl_ok = ck_curl_load(&why) == 0;
    const char *curl = curl_ok ? ck_curl_describe() : NULL;
    const char *ca = curl_ok ? ck_curl_ca_bundle() : NULL;
    return Py_BuildValue("{s:z,s:z,s:z,s:s}", "libcurl", curl, "libcurl_error",
                         curl_ok ? NULL : why, "ca_bundle", ca, "sha256", ck_sha256_backend());
}

static PyObject *py_sha256(PyObject *module, PyObject *args, PyObject *kwargs) {
    (void)module;
    static char *kwlist[] = {"data", "builtin", NULL};
    Py_buffer buf;
    int builtin = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "y*|$p", kwlist, &buf, &builtin))
        return NULL;
    unsigned char md[32];
    int rc = -1;
    Py_BEGIN_ALLOW_THREADS
        ck_sha256 *c = ck_sha256_new(builtin);
        if (c != NULL) {
            ck_sha256_update(c, buf.buf, (size_t)buf.len);
            rc = ck_sha256_final(c, md);
            ck_sha256_free(c);
        }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&buf);
    if (rc != 0)
        return PyErr_NoMemory();
    return PyBytes_FromStringAndSize((const char *)md, 32);
}

static PyObject *py_pick_ca(PyObject *module, PyObject *args) {
    (void)module;
    const char *root, *cainfo, *capath;
    if (!PyArg_ParseTuple(args, "szz", &root, &cainfo, &capath))
        return NULL;
    const char *got = ck_curl_pick_ca(root, cainfo, capath);
    return Py_BuildValue("z", got);
}

PyMethodDef ck_libs_methods[] = {
    {"libraries", py_libraries, METH_NOARGS,
     "libraries() -> dict: libcurl (file, version, TLS library; None when it could not be\n"
     "opened), libcurl_error (why), ca_bundle (the CA file set when libcurl's own default is\n"
     "missing, else None), sha256 (the libcrypto opened, or 'builtin')."},
    {"sha256", (PyCFunction)(void (*)(void))py_sha256, METH_VARARGS | METH_KEYWORDS,
     "sha256(data, *, builtin=False) -> bytes: the digest by the download's backend\n"
     "(builtin=True: the portable implementation)."},
    {"pick_ca", py_pick_ca, METH_VARARGS,
     "pick_ca(root, cainfo, capath) -> str or None: the CA bundle chosen under root for a\n"
     "libcurl whose built-in defaults are cainfo and capath (tests)."},
    {NULL, NULL, 0, NULL},
};

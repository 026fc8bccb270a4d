#include "load.h"

#include <stdio.h>
#include <string.h>

#include "budget.h"
#include "errors.h"
#include "globals.h"
#include "load_internal.h"
#include "mapping.h"
#include "session.h"
#include "unpickler.h"

/* Compressed records may inflate to at most this many times the file's size
 * (and at least CK_INFLATE_FLOOR bytes) in all: torch never compresses, and
 * the cap keeps a small hostile file from asking for gigabytes. */
#define CK_INFLATE_RATIO 16
#define CK_INFLATE_FLOOR ((uint64_t)64 << 20)
/* Under weights_only (files not trusted) the floor is small, so that no
 * file makes the loader allocate more than a small multiple of its size. */
#define CK_INFLATE_FLOOR_SAFE ((uint64_t)1 << 20)

const char ck_load_doc[] =
    "load(mapping, filename, *, weights_only=True, encoding='utf-8', errors='strict',\n"
    "     map_kind=0, map_location=None, restore=None, user_globals=None, allow=0,\n"
    "     warn_protocol=False)\n"
    "Decodes the checkpoint held by mapping (see ckptio.load for the public API).\n"
    "warn_protocol: under weights_only, warn as torch >= 2.3's weights_only unpickler\n"
    "does of a pickle whose PROTO opcode names a protocol other than 2.";

int ck_warn_protocol(ck_session *s, int ok) {
    int proto = ck_unpickle_protocol(s);
    if (!s->warn_protocol || proto < 0 || proto == 2)
        return ok;
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    if (PyErr_WarnFormat(PyExc_UserWarning, 1,
                         "Detected pickle protocol %d in the checkpoint, which was not the default "
                         "pickle protocol used by `torch.load` (2). The weights_only Unpickler "
                         "might not support all instructions implemented by this protocol, please "
                         "file an issue for adding support if you encounter this.",
                         proto) < 0) {
        Py_XDECREF(type);
        Py_XDECREF(value);
        Py_XDECREF(tb);
        return -1;
    }
    PyErr_Restore(type, value, tb);
    return ok;
}

PyObject *ck_load_any(ck_session *s) {
    ck_state *st = s->st;
    const uint8_t *b = s->buf;
    size_t n = s->len;
    if (n == 0)
        return ck_raise(st->CheckpointError, s->filename, "the file is empty");
    if (n >= 4 && memcmp(b, "PK\x03\x04", 4) == 0)
        return ck_load_zip(s);
    if (n >= 8 && memcmp(b, "PYTORCH1", 8) == 0)
        return ck_raise(st->CheckpointError, s->filename,
                        "preview-release archive (PYTORCH1): torch cannot load it either");
    if (n >= 262 && memcmp(b + 257, "ustar", 5) == 0)
        return ck_raise(st->CheckpointError, s->filename,
                        "tar format of torch 0.1.x: not supported (re-save it with torch.save)");
    /* a legacy stream starts with its magic number's pickle: PROTO (protocol 2
     * and up) or, written with pickle_protocol 0 or 1, the text LONG opcode */
    if (b[0] == 0x80 || b[0] == 'L') {
        s->byteswap = !ck_host_is_little(); /* legacy data is always little-endian */
        return ck_load_legacy(s);
    }
    char first[8];
    snprintf(first, sizeof first, "0x%02x", b[0]);
    return ck_raise(st->CheckpointError, s->filename,
                    "not a PyTorch checkpoint: unknown format (first byte %s)", first);
}

int ck_user_globals_arg(PyObject *user_globals, const char *fn) {
    if (user_globals == Py_None || PyDict_Check(user_globals))
        return 0;
    PyErr_Format(PyExc_TypeError, "%s: user_globals must be a dict", fn);
    return -1;
}

PyObject *ck_py_load(PyObject *module, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"mapping",      "filename", "weights_only",  "encoding",
                             "errors",       "map_kind", "map_location",  "restore",
                             "user_globals", "allow",    "warn_protocol", NULL};
    ck_state *st = ck_get_state(module);
    PyObject *mapping, *filename, *map_location = Py_None, *restore = Py_None,
                                  *user_globals = Py_None;
    int weights_only = 1, map_kind = CK_MAP_NONE, allow = 0, warn_proto = 0;
    const char *encoding = "utf-8", *errors = "strict";
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OU|$pssiOOOip", kwlist, &mapping, &filename,
                                     &weights_only, &encoding, &errors, &map_kind, &map_location,
                                     &restore, &user_globals, &allow, &warn_proto))
        return NULL;
    if (ck_torch_ready(st) < 0 || ck_mapping_arg(st, mapping, "load") < 0)
        return NULL;
    if (map_kind < CK_MAP_NONE || map_kind > CK_MAP_CALL) {
        PyErr_SetString(PyExc_ValueError, "load: invalid map_kind");
        return NULL;
    }
    if ((map_kind == CK_MAP_DICT && !PyDict_Check(map_location)) ||
        (map_kind != CK_MAP_CPU && !PyCallable_Check(restore))) {
        PyErr_SetString(PyExc_TypeError, "load: map_location and restore do not match map_kind");
        return NULL;
    }
    if (ck_user_globals_arg(user_globals, "load") < 0)
        return NULL;

    ck_session s;
    ck_session_begin(&s, st, filename, mapping);
    s.weights_only = weights_only;
    s.allow = allow;
    s.warn_protocol = weights_only && warn_proto;
    s.map_kind = (ck_map_kind)map_kind;
    s.map_location = map_location;
    s.restore = restore;
    s.user_globals = user_globals == Py_None ? NULL : user_globals;
    uint64_t budget = (uint64_t)s.len * CK_INFLATE_RATIO;
    uint64_t floor = weights_only ? CK_INFLATE_FLOOR_SAFE : CK_INFLATE_FLOOR;
    s.inflate_budget = budget > floor ? budget : floor;
    ck_budget_begin(&s);
    if (strcmp(encoding, "bytes") != 0) {
        s.encoding = PyUnicode_FromString(encoding);
        if (s.encoding == NULL)
            return NULL;
    }
    s.errors = PyUnicode_FromString(errors);

    PyObject *result = NULL;
    if (s.errors != NULL && ck_user_globals_prepare(&s) == 0)
        result = ck_load_any(&s);

    ck_session_end(&s);
    /* the headers have been read: the mapping needs its file no longer */
    ck_region_close_fd(&((ck_mapping *)mapping)->region);
    return result;
}

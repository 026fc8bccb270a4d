/* revise_keys(state_dict, revise_keys) -> OrderedDict
 *
 * The same result as mmcv's
 *
 *     for p, r in revise_keys:
 *         state_dict = OrderedDict({re.sub(p, r, k): v for k, v in state_dict.items()})
 *
 * for any pattern and replacement, with the state dict's _metadata kept.
 * A pattern "^literal" (a str whose characters after the anchor are plain
 * or escaped punctuation) with a str replacement free of backslashes is a
 * prefix compare and one concatenation here; anything else goes through
 * the compiled pattern's sub, called from C. Patterns are compiled on
 * first use, so that an invalid pattern fails where mmcv's loop fails (not
 * at all for an empty state dict). Renamed keys that collide behave as in
 * the dict comprehension: the first position, the last value.
 */
#include "keys.h"

/* One (pattern, replacement) pair. */
typedef struct rule {
    PyObject *pattern; /* borrowed from the pairs list */
    PyObject *repl;    /* borrowed from the pairs list */
    PyObject *literal; /* owned: the prefix for the fast path, or NULL */
    PyObject *sub;     /* owned: compiled pattern's bound sub, made on first use */
} rule;

static int is_special(Py_UCS4 c) {
    switch (c) {
    case '.':
    case '^':
    case '$':
    case '*':
    case '+':
    case '?':
    case '{':
    case '}':
    case '[':
    case ']':
    case '|':
    case '(':
    case ')':
        return 1;
    default:
        return 0;
    }
}

static int is_ascii_alnum(Py_UCS4 c) {
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
}

/* The unescaped literal of a "^literal" pattern, or NULL without an
 * exception when the pattern is anything else. -1 on failure. */
static int fast_literal(PyObject *pattern, PyObject *repl, PyObject **out) {
    *out = NULL;
    if (!PyUnicode_CheckExact(pattern) || !PyUnicode_CheckExact(repl))
        return 0;
    Py_ssize_t n = PyUnicode_GET_LENGTH(pattern);
    if (n < 1 || PyUnicode_READ_CHAR(pattern, 0) != '^')
        return 0;
    if (PyUnicode_FindChar(repl, '\\', 0, PyUnicode_GET_LENGTH(repl), 1) != -1)
        return 0;
    int kind = PyUnicode_KIND(pattern);
    const void *data = PyUnicode_DATA(pattern);
    Py_UCS4 *buf = PyMem_New(Py_UCS4, (size_t)n);
    if (buf == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    Py_ssize_t len = 0;
    for (Py_ssize_t i = 1; i < n; i++) {
        Py_UCS4 c = PyUnicode_READ(kind, data, i);
        if (c == '\\') {
            /* "\x" is the literal x unless x is an ASCII letter or digit
             * (classes, anchors, references) or absent (an error) */
            if (i + 1 >= n || is_ascii_alnum(PyUnicode_READ(kind, data, i + 1)))
                goto not_fast;
            c = PyUnicode_READ(kind, data, ++i);
        } else if (is_special(c)) {
            goto not_fast;
        }
        buf[len++] = c;
    }
    *out = PyUnicode_FromKindAndData(PyUnicode_4BYTE_KIND, buf, len);
    PyMem_Free(buf);
    return *out == NULL ? -1 : 0;
not_fast:
    PyMem_Free(buf);
    return 0;
}

/* re.sub(pattern, repl, key) through the compiled pattern. New reference. */
static PyObject *slow_sub(rule *r, PyObject *key) {
    if (r->sub == NULL) {
        PyObject *re = PyImport_ImportModule("re");
        if (re == NULL)
            return NULL;
        PyObject *compiled = PyObject_CallMethod(re, "compile", "O", r->pattern);
        Py_DECREF(re);
        if (compiled == NULL)
            return NULL;
        r->sub = PyObject_GetAttrString(compiled, "sub");
        Py_DECREF(compiled);
        if (r->sub == NULL)
            return NULL;
    }
    PyObject *args[2] = {r->repl, key};
    return PyObject_Vectorcall(r->sub, args, 2, NULL);
}

/* The revised key. New reference. */
static PyObject *revise(rule *r, PyObject *key) {
    if (r->literal == NULL || !PyUnicode_CheckExact(key))
        return slow_sub(r, key);
    Py_ssize_t lit = PyUnicode_GET_LENGTH(r->literal);
    Py_ssize_t match = PyUnicode_Tailmatch(key, r->literal, 0, PY_SSIZE_T_MAX, -1);
    if (match < 0)
        return NULL;
    if (match == 0)
        return Py_NewRef(key);
    PyObject *rest = PyUnicode_Substring(key, lit, PyUnicode_GET_LENGTH(key));
    if (rest == NULL)
        return NULL;
    PyObject *out = PyUnicode_Concat(r->repl, rest);
    Py_DECREF(rest);
    return out;
}

static int put(rule *r, PyObject *out, PyObject *key, PyObject *value) {
    PyObject *nk = revise(r, key);
    if (nk == NULL)
        return -1;
    int rc = PyDict_SetItem(out, nk, value);
    Py_DECREF(nk);
    return rc;
}

/* A new dict of src's items with revised keys, in src.items() order. */
static PyObject *apply_rule(rule *r, PyObject *src) {
    PyObject *out = PyDict_New();
    if (out == NULL)
        return NULL;
    /* A plain dict walked in place when no Python code can run meanwhile
     * (a callable replacement could change it: items() then raises as
     * mmcv's loop does) */
    if (PyDict_CheckExact(src) && r->literal != NULL) {
        Py_ssize_t pos = 0;
        PyObject *k, *v; /* borrowed from src */
        while (PyDict_Next(src, &pos, &k, &v)) {
            /* src's references, held while put() runs in case anything
             * it calls reaches src */
            Py_INCREF(k);
            Py_INCREF(v);
            int rc = put(r, out, k, v);
            Py_DECREF(k);
            Py_DECREF(v);
            if (rc < 0)
                goto fail;
        }
        return out;
    }
    /* OrderedDict and other mappings: their own items() order */
    PyObject *items = PyObject_CallMethod(src, "items", NULL);
    if (items == NULL)
        goto fail;
    PyObject *it = PyObject_GetIter(items);
    Py_DECREF(items);
    if (it == NULL)
        goto fail;
    PyObject *item;
    while ((item = PyIter_Next(it)) != NULL) {
        PyObject *k, *v; /* borrowed from item */
        int ok = PyTuple_Check(item) && PyTuple_GET_SIZE(item) == 2;
        if (!ok) {
            PyErr_SetString(PyExc_TypeError, "revise_keys: items() must give (key, value) pairs");
            Py_DECREF(item);
            Py_DECREF(it);
            goto fail;
        }
        k = PyTuple_GET_ITEM(item, 0);
        v = PyTuple_GET_ITEM(item, 1);
        int rc = put(r, out, k, v);
        Py_DECREF(item);
        if (rc < 0) {
            Py_DECREF(it);
            goto fail;
        }
    }
    Py_DECREF(it);
    if (PyErr_Occurred())
        goto fail;
    return out;
fail:
    Py_DECREF(out);
    return NULL;
}

static PyObject *py_revise_keys(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "revise_keys(state_dict, revise_keys) takes 2 arguments");
        return NULL;
    }
    PyObject *state_dict = args[0];
    PyObject *pairs = PySequence_List(args[1]);
    if (pairs == NULL)
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(pairs);
    PyObject *result = NULL, *cur = NULL, *collections = NULL;
    rule *rules = PyMem_New(rule, (size_t)(n > 0 ? n : 1));
    if (rules == NULL) {
        Py_DECREF(pairs);
        return PyErr_NoMemory();
    }
    Py_ssize_t ready = 0;
    for (; ready < n; ready++) {
        PyObject *pair = PyList_GET_ITEM(pairs, ready); /* borrowed from pairs */
        rule *r = &rules[ready];
        r->literal = r->sub = NULL;
        if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2) {
            PyErr_SetString(PyExc_TypeError, "revise_keys: each item must be a (pattern, "
                                             "replacement) tuple");
            goto done;
        }
        r->pattern = PyTuple_GET_ITEM(pair, 0);
        r->repl = PyTuple_GET_ITEM(pair, 1);
        if (fast_literal(r->pattern, r->repl, &r->literal) < 0)
            goto done;
    }
    cur = Py_NewRef(state_dict);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *next = apply_rule(&rules[i], cur);
        if (next == NULL)
            goto done;
        Py_SETREF(cur, next);
    }
    collections = PyImport_ImportModule("collections");
    if (collections == NULL)
        goto done;
    result = PyObject_CallMethod(collections, "OrderedDict", "O", cur);
    if (result == NULL)
        goto done;
    PyObject *name = PyUnicode_InternFromString("_metadata");
    if (name == NULL)
        goto fail;
    PyObject *metadata; /* owned */
    int found = ck_lookup_attr(state_dict, name, &metadata);
    Py_DECREF(name);
    if (found < 0)
        goto fail;
    if (metadata != NULL) {
        int rc = PyObject_SetAttrString(result, "_metadata", metadata);
        Py_DECREF(metadata);
        if (rc < 0)
            goto fail;
    }
    goto done;
fail:
    Py_CLEAR(result);
done:
    for (Py_ssize_t i = 0; i < ready; i++) {
        Py_XDECREF(rules[i].literal);
        Py_XDECREF(rules[i].sub);
    }
    PyMem_Free(rules);
    Py_XDECREF(collections);
    Py_XDECREF(cur);
    Py_DECREF(pairs);
    return result;
}

PyMethodDef ck_keys_methods[] = {
    {"revise_keys", (PyCFunction)(void (*)(void))py_revise_keys, METH_FASTCALL,
     "revise_keys(state_dict, revise_keys) -> OrderedDict: the keys rewritten by each "
     "(pattern, replacement) in turn, as mmcv's re.sub loop; _metadata kept."},
    {NULL, NULL, 0, NULL},
};

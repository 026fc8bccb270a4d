#include "session.h"

#include <string.h>

#include "mapping.h"
#include "tensors.h"

void ck_session_begin(ck_session *s, ck_state *st, PyObject *filename, PyObject *mapping) {
    ck_mapping *mp = (ck_mapping *)mapping;
    memset(s, 0, sizeof *s);
    s->st = st;
    s->filename = filename;
    s->owner = mapping;
    s->buf = mp->region.data;
    s->len = mp->region.len;
    s->fd = mp->region.has_fd ? mp->region.fd : -1;
}

void ck_session_end(ck_session *s) {
    ck_storages_release(s);
    if (s->is_zip)
        ck_zip_close(&s->zip);
    Py_CLEAR(s->user_ids);
    Py_CLEAR(s->legacy_slots);
    Py_CLEAR(s->twins);
    Py_CLEAR(s->encoding);
    Py_CLEAR(s->errors);
}

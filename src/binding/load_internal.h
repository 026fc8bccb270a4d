/* What the loader's files share: the entry point (load.c) dispatches to the
 * zip archive (load_zip.c) or the legacy stream (load_legacy.c); both warn
 * of pickle protocols the same way. Not for other callers: they use load.h. */
#ifndef CKPTIO_BINDING_LOAD_INTERNAL_H
#define CKPTIO_BINDING_LOAD_INTERNAL_H

#include "session.h"

static inline int ck_host_is_little(void) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    return 0;
#else
    return 1;
#endif
}

/* torch.load's weights_only unpickler (torch >= 2.3; s->warn_protocol) warns at a PROTO opcode
 * other than 2, as soon as it reads it: the same warning (UserWarning, same
 * text), once per pickle that carried one, also when that pickle then fails
 * (the pending error is kept; an error raised by the warning itself, under
 * an "error" filter, replaces it, as in torch). torch.load(weights_only=False)
 * uses pickle's own unpickler, which does not warn. Returns ok, or -1. */
int ck_warn_protocol(ck_session *s, int ok);

/* Decodes s->buf as a torch.save zip archive (s->buf starts with a local
 * file header) or as a legacy stream (it starts with its magic number's
 * pickle). New reference, or NULL with an exception set. */
PyObject *ck_load_zip(ck_session *s);
PyObject *ck_load_legacy(ck_session *s);

#endif

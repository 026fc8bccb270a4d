/* The data sets a weights-only load may decode beyond torch's allowlist,
 * and the pickle VM's hooks into them.
 *
 * One set exists: CK_ALLOW_OPENMMLAB (ckptio.load(f, allow='openmmlab'), on
 * by default in the mmcv/mmengine surfaces, load_url and the CLI). It holds
 * what checkpoints written by mmengine's Runner and mmcv's runners contain:
 *   numpy.core.multiarray._reconstruct / numpy._core.multiarray._reconstruct,
 *   numpy.ndarray, numpy.dtype (npdata.h: arrays, dtypes and scalars built
 *     from the pickle's bytes),
 *   numpy.core.multiarray.scalar / numpy._core.multiarray.scalar,
 *   builtins.bytes / __builtin__.bytes, only as bytes() (how protocol 2
 *     writes b'', the data of an empty array),
 *   mmengine.logging.history_buffer.HistoryBuffer and
 *   __builtin__.getattr / builtins.getattr, the latter only as
 *     getattr(HistoryBuffer, 'min'|'max'|'current'|'mean') (histbuf.h).
 * Each of these globals resolves to the real object, but nothing calls it:
 * REDUCE, NEWOBJ and BUILD on them go to the builders below, which accept
 * exactly the argument shapes numpy and mmengine write and refuse the rest.
 *
 * Independent of any set, every weights-only load decodes _codecs.encode
 * (in torch's allowlist; how protocol 2 stores bytes) natively and only as
 * _codecs.encode(str, 'latin1'); other codecs and arguments are refused.
 */
#ifndef CKPTIO_BINDING_DATASET_H
#define CKPTIO_BINDING_DATASET_H

#include "session.h"

/* Bits of ck_session.allow. */
#define CK_ALLOW_OPENMMLAB 1

/* What a hook did with an opcode. */
enum {
    CK_DATA_NO = 0,       /* not one of ours: the VM goes on as before */
    CK_DATA_DONE = 1,     /* built (the result, if any, is in *out) */
    CK_DATA_FAILED = -1,  /* a Python error is pending (e.g. MemoryError) */
    CK_DATA_REFUSED = -2, /* refused: why->text says why */
};

/* The reason for a refusal, filled by the hooks; the VM adds the file,
 * the pickle, the byte offset and the opcode. */
typedef struct ck_why {
    char text[480];
} ck_why;

/* Sets why->text from a PyUnicode_FromFormat format (the bare format if
 * formatting fails) and returns CK_DATA_REFUSED. */
int ck_why_set(ck_why *why, const char *fmt, ...);

/* Caches numpy's and Python's objects the set names. Called once from
 * the module's exec slot (numpy is imported by then). Returns 0 or -1. */
int ck_dataset_init(ck_state *st);

/* GLOBAL "module.name" (full) under weights_only, with the session's sets:
 * a new reference to the object, or NULL with an exception set, or NULL
 * without one when the name is not in any enabled set. */
PyObject *ck_dataset_global(ck_session *s, PyObject *full);

/* 1 if full is in the openmmlab set (enabled or not), for the refusal
 * message of a load that has it off; 0 otherwise. */
int ck_dataset_names(ck_state *st, PyObject *full);

/* REDUCE func(*args), NEWOBJ cls.__new__(cls, *args, **kwargs) and BUILD
 * inst with state, under weights_only. Each returns a CK_DATA_* code; on
 * CK_DATA_DONE, *out is a new reference (REDUCE, NEWOBJ). */
int ck_dataset_reduce(ck_session *s, PyObject *func, PyObject *args, PyObject **out, ck_why *why);
int ck_dataset_newobj(ck_session *s, PyObject *cls, PyObject *args, PyObject *kwargs,
                      PyObject **out, ck_why *why);
int ck_dataset_build(ck_session *s, PyObject *inst, PyObject *state, ck_why *why);

#endif

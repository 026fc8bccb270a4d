/* mmengine's HistoryBuffer (the log scalars of a Runner's message_hub),
 * decoded data-only (the openmmlab set, dataset.h).
 *
 * mmengine pickles it as HistoryBuffer.__new__(HistoryBuffer) then BUILD
 * {'max_length': int, '_log_history': ndarray, '_count_history': ndarray,
 *  'statistics_methods': {'min': getattr(HistoryBuffer, 'min'), ...}}.
 * Accepted:
 *   - GLOBAL mmengine.logging.history_buffer.HistoryBuffer: the class of
 *     that module (imported by that fixed name if need be), a plain class
 *     defined there;
 *   - getattr(HistoryBuffer, name) for name in min, max, current, mean: the
 *     function in the class's own __dict__ (no attribute protocol runs);
 *     getattr on any other object, any other name, or a third argument is
 *     refused, so no chain of getattr can start;
 *   - NEWOBJ of the class with no arguments: object.__new__;
 *   - BUILD with an exact dict of exactly those keys (statistics_methods
 *     optional): max_length an int, the histories 1-d numeric ndarrays,
 *     statistics_methods an exact dict mapping each of those four names to
 *     the class's own function of the same name. __class__, __dict__ or any
 *     other key, a (state, slotstate) pair, or a foreign callable is refused.
 *     The checked state is then handed to the class's own __setstate__
 *     (mmengine's code, chosen by ckptio, not by the file), which gives the
 *     same object torch.load(weights_only=False) gives.
 */
#ifndef CKPTIO_BINDING_HISTBUF_H
#define CKPTIO_BINDING_HISTBUF_H

#include "dataset.h"

/* The HistoryBuffer class (new reference), importing mmengine's module if
 * need be; NULL with UnpicklingError when mmengine is missing or the class
 * is not what it should be. Remembered in st for the hooks below. */
PyObject *ck_hb_class(ck_session *s);

/* getattr(obj, name) REDUCE (func is builtins.getattr). */
int ck_hb_getattr(ck_session *s, PyObject *args, PyObject **out, ck_why *why);

/* NEWOBJ / BUILD of a HistoryBuffer; CK_DATA_NO for any other class. */
int ck_hb_newobj(ck_session *s, PyObject *cls, PyObject *args, PyObject *kwargs, PyObject **out,
                 ck_why *why);
int ck_hb_build(ck_session *s, PyObject *inst, PyObject *state, ck_why *why);

#endif

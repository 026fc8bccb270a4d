/* The memory bound of one load.
 *
 * Everything a file makes the loader allocate is charged, before or as it is
 * allocated, against one budget per load: 64 x the file's size + 2 MiB under
 * weights_only (+ 64 MiB for trusted loads), the bound the README promises.
 * Compressed records are charged as they are inflated (and inflate within
 * their own limit of 16 x the file, load.c).
 *
 * What is charged (estimates of CPython's own sizes, from above):
 *   - every object the pickle machine creates (ck_object_cost), the growth of
 *     its stacks and memo, and every item put into a list, dict or set;
 *   - every call of an allowlisted builder, before the call, by what the call
 *     will allocate from its arguments (ck_charge_call): bytearray(n) n bytes,
 *     set(x)/Counter(x)/OrderedDict(x)/torch.Size(x) by the length of x, a
 *     legacy tensor or storage constructor by its element count,
 *     _rebuild_device_tensor_from_cpu_tensor by the elements of its tensor
 *     (a stride-0 view of one element may stand for 2**40), _rebuild_qtensor
 *     by its size, sparse and nested rebuilds by their tensors' elements;
 *   - tensors and storages built natively, and copies of tensor bytes.
 * Charges are never refunded, so the budget bounds the work of a load too:
 * no sequence of opcodes does more than O(budget) work. Under weights_only,
 * builders that iterate their argument (set, Counter, OrderedDict,
 * torch.Size, bytearray) take only data the pickle made (str, bytes, tuples,
 * lists, dicts, sets), never a tensor, which they would iterate element by
 * element. The scan pass of a legacy file or of verify runs on a budget of
 * its own (its objects are gone before the real pass). */
#ifndef CKPTIO_BINDING_BUDGET_H
#define CKPTIO_BINDING_BUDGET_H

#include "session.h"

#define CK_BUDGET_RATIO 64
#define CK_BUDGET_FLOOR ((uint64_t)2 << 20)
#define CK_BUDGET_FLOOR_TRUSTED ((uint64_t)64 << 20)

/* Finds torch's builders in st->allowed (after configure). 0 or -1. */
int ck_budget_configure(ck_state *st);

/* Sets the session's budget from its size and weights_only. */
void ck_budget_begin(ck_session *s);

/* Takes bytes from the budget: 0, or -1 (no exception set) when they are
 * not left; the budget is then spent. */
int ck_charge(ck_session *s, uint64_t bytes);

/* Raises the CheckpointError for a spent budget, with `where` (e.g.
 * "data.pkl at byte 12 (EMPTY_SET)") in front. Returns NULL. */
PyObject *ck_raise_over_budget(ck_session *s, const char *where);

/* The bytes a new object o takes, as CPython allocates them (from above):
 * 0 for the shared singletons (None, bools, small ints, the empty tuple). */
uint64_t ck_object_cost(ck_state *st, PyObject *o);

/* The bytes one more item takes in the container target (list slot, dict
 * entry, set slot, with their growth). */
uint64_t ck_item_cost(PyObject *target);

/* Dict keys and set items whose hashes a file can choose to collide (tuples,
 * frozensets, complex numbers, ints beyond 61 bits: CPython hashes them
 * without a key, so n of them with one hash make n insertions cost n**2/2
 * comparisons): under weights_only at most this many per load. str and
 * bytes hashes are keyed per process; smaller ints and floats hash
 * distinct values apart. */
#define CK_MAX_COLLIDABLE_KEYS 4096

/* Counts the collidable keys among items[0], items[step], ... (n items in
 * all) against the limit: 0, or -1 with a CheckpointError. */
int ck_count_keys(ck_session *s, PyObject *const *items, Py_ssize_t n, Py_ssize_t step);

/* The same for the keys of a dict or the items of a set, list or tuple
 * (pairs: the first item of each). */
int ck_count_keys_of(ck_session *s, PyObject *container, int pairs);

/* Charges what calling func(*args, **kwargs) (or, with newobj,
 * func.__new__(func, *args, **kwargs)) will allocate, before the call.
 * Returns 0, or -1 with a CheckpointError naming the call. */
int ck_charge_call(ck_session *s, PyObject *func, PyObject *args, PyObject *kwargs, int newobj);

#endif

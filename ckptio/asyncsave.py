"""ckptio.async_save (this module is ckptio.asyncsave): a checkpoint save that costs the caller one copy of the
tensor bytes, not the write.

    future = ckptio.async_save({"state_dict": model.state_dict(), ...}, "epoch_3.pth")
    ...                      # training goes on; the file is written behind it
    future.result()          # None, or the write's exception

Before async_save returns, every tensor's bytes are copied into a host arena
(one batch: host memory by memcpy split over two threads, CUDA memory with
cudaMemcpyAsync into pinned memory, one synchronisation; src/core/memcopy.c
and src/core/devcopy.c), and the containers around them are copied, so the
caller may change or free the tensors and the dicts at once. A background
thread then writes the snapshot with ckptio.save: the same bytes, the same
atomic replacement of a path (temporary file, fsync, rename), the same
errors, which future.result() raises. The arenas are kept and reused by
later saves, so the steady-state cost is one memcpy into memory that is
already mapped.

Saves run one at a time, in call order, so saves to one path land in the
order they were asked for. At most MAX_PENDING saves wait or run at once: a
further call waits for the oldest to finish before taking its snapshot, so
snapshots cannot pile up in memory when the disk is slower than the
checkpoint interval. The interpreter does not exit before pending saves are
written (the writer is an ordinary, non-daemon thread that ends when it has
nothing left to do); wait_async_saves() waits explicitly. A process killed
during a write leaves the old file as it was, as ckptio.save does.

What the snapshot copies: tensors (torch.Tensor and nn.Parameter, strided,
on the CPU or a CUDA device) inside dicts, lists, tuples and sets become
tensors over the arena with the same dtype, shape, strides, storage offset,
storage sharing, requires_grad and attributes; a CUDA tensor keeps its
device in the file (torch.save records 'cuda:N', as ckptio.save does); every
other object is copied with copy.deepcopy (tensors inside such objects are
cloned by their own __deepcopy__).
"""
import collections
import copy
import os
import threading

__all__ = ["async_save", "wait_async_saves", "MAX_PENDING"]

MAX_PENDING = 2

# Arena offsets are multiples of this: a cache line, and a multiple of every
# element size, so a tensor of any dtype can start at any storage.
_ALIGN = 64
# Free arenas kept for reuse (the largest ones).
_KEEP_FREE = 2

_cond = threading.Condition()
_queue = collections.deque()
_worker = None
_pending = 0
_free = []  # [(nbytes, pinned, arena tensor)], reusable


def _reset_after_fork():
    """A forked child has none of the parent's threads: its copy of the
    queue would never be written (the parent writes it)."""
    global _cond, _worker, _pending
    _cond = threading.Condition()
    _queue.clear()
    _worker = None
    _pending = 0
    _free.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def _copyable(t):
    """Whether t's bytes can be copied as they are into the arena and a
    tensor rebuilt over them that torch.save pickles as it pickles t."""
    import torch

    return (
        type(t) in (torch.Tensor, torch.nn.Parameter)
        and t.layout is torch.strided
        and t.device.type in ("cpu", "cuda")
        and not t.is_quantized
        and not t.is_conj()
        and not t.is_neg()
    )


def _collect(obj):
    """The copyable tensors inside the containers of obj, by id."""
    import torch

    found, seen = {}, set()
    stack = [obj]
    while stack:
        o = stack.pop()
        if isinstance(o, torch.Tensor):
            if _copyable(o):
                found[id(o)] = o
            continue
        if id(o) in seen:
            continue
        if isinstance(o, dict):
            seen.add(id(o))
            stack.extend(o.values())
        elif isinstance(o, (list, tuple, set, frozenset)):
            seen.add(id(o))
            stack.extend(o)
    return found


def _arena(total, pinned):
    """A free arena of at least total bytes, or a new one."""
    import torch

    with _cond:
        best = None
        for i, (size, pin, _) in enumerate(_free):
            if pin == pinned and size >= total and (best is None or size < _free[best][0]):
                best = i
        if best is not None:
            return _free.pop(best)[2]
    return torch.empty(max(total, 1), dtype=torch.uint8, pin_memory=pinned)


def _give_back(arena):
    if arena is None:
        return
    with _cond:
        _free.append((arena.numel(), arena.is_pinned(), arena))
        _free.sort(key=lambda e: e[0], reverse=True)
        del _free[_KEEP_FREE:]


def _snapshot(obj):
    """(copy of obj over the arena, arena, to_cpu for ckptio.save)."""
    import torch

    tensors = _collect(obj)
    storages = {}  # storage key -> [storage, nbytes, device index or -1, offset]
    order = []
    for t in tensors.values():
        s = t.untyped_storage()
        key = (s.device.type, s._cdata)
        if key not in storages:
            storages[key] = [s, s.nbytes(), -1 if s.device.type == "cpu" else
                             (s.device.index or 0), 0]
            order.append(key)
    total = 0
    for key in order:
        rec = storages[key]
        total = -(-total // _ALIGN) * _ALIGN
        rec[3] = total
        total += rec[1]
    devices = {rec[2] for rec in storages.values() if rec[2] >= 0}
    pinned = bool(devices) and torch.cuda.is_available() and \
        os.environ.get("CKPTIO_PINNED", "1") != "0"
    arena = _arena(total, pinned) if storages else None
    if devices:
        for d in devices:  # .cpu() would order after the current stream; so does the copy
            torch.cuda.current_stream(d).synchronize()
    if storages:
        from . import _hostcopy, _native

        buf = arena.numpy()
        segments = [(rec[0].data_ptr(), rec[1], rec[2], rec[3])
                    for rec in (storages[k] for k in order)]
        _native.copy_into(buf, segments, _hostcopy._library() if devices else None)
    copies = {}  # storage key -> CPU UntypedStorage over the arena
    for key in order:
        s, nbytes, _, offset = storages[key]
        if nbytes:
            copies[key] = torch.frombuffer(buf, dtype=torch.uint8, count=nbytes,
                                           offset=offset).untyped_storage()
        else:
            copies[key] = torch.UntypedStorage(0)

    memo = {}
    with_dict = []
    for t in tensors.values():
        s = t.untyped_storage()
        key = (s.device.type, s._cdata)
        if s.device.type == "cpu":
            base = torch.empty(0, dtype=t.dtype).set_(copies[key], t.storage_offset(), t.size(),
                                                      t.stride())
        else:
            # the device storage names the location torch.save records; its bytes
            # at this moment are in the arena, handed over by to_cpu below
            base = torch.empty(0, dtype=t.dtype, device=s.device).set_(
                s, t.storage_offset(), t.size(), t.stride())
        if type(t) is torch.nn.Parameter:
            snap = torch.nn.Parameter(base, requires_grad=t.requires_grad)
        else:
            snap = base.requires_grad_(t.requires_grad) if t.requires_grad else base
        memo[id(t)] = snap
        if getattr(t, "__dict__", None):
            with_dict.append((t, snap))
    for t, snap in with_dict:
        snap.__dict__.update(copy.deepcopy(t.__dict__, memo))
    snapshot = copy.deepcopy(obj, memo)

    by_id = {k[1]: v for k, v in copies.items() if k[0] != "cpu"}

    def to_cpu(device_storages):
        from ._hostcopy import storages_to_cpu

        out = [by_id.get(s._cdata) for s in device_storages]
        missing = [s for s, c in zip(device_storages, out) if c is None]
        if missing:  # storages of tensors copied by deepcopy (clones), not in the arena
            extra = iter(storages_to_cpu(missing))
            out = [c if c is not None else next(extra) for c in out]
        return out

    return snapshot, arena, to_cpu


def _run():
    global _worker, _pending
    from . import saving

    while True:
        with _cond:
            if not _queue:
                _worker = None
                return
            job = _queue.popleft()
        fut, snapshot, f, kwargs, arena, to_cpu = job
        job = None
        failed = False
        if fut.set_running_or_notify_cancel():
            try:
                saving.save_with(snapshot, f, to_cpu=to_cpu, **kwargs)
            except BaseException as exc:  # noqa: BLE001 - handed to the future
                # the traceback may keep views of the arena: it is not reused
                failed = True
                fut.set_exception(exc)
                exc = None
            else:
                fut.set_result(None)
        snapshot = to_cpu = None  # the last views of the arena
        if not failed:
            _give_back(arena)
        arena = None
        with _cond:
            _pending -= 1
            _cond.notify_all()


def async_save(obj, f, **kwargs):
    """Saves obj to f as ckptio.save(obj, f, **kwargs) does, in the
    background; returns a concurrent.futures.Future whose result() is None
    once the file is written, or raises what the write raised.

    When it returns, obj's tensor bytes and containers have been copied:
    the caller may change them. f: a path (replaced atomically), or a
    binary file object that the caller leaves alone until the future is
    done. kwargs: ckptio.save's (fsync=True).
    """
    import concurrent.futures

    global _worker, _pending
    unknown = set(kwargs) - {"fsync"}
    if unknown:
        raise TypeError(f"async_save() got unexpected keyword arguments {sorted(unknown)}")
    if not isinstance(f, (str, os.PathLike)) and not callable(getattr(f, "write", None)):
        raise AttributeError(f"Buffer of {type(f).__name__} has no callable attribute 'write'")
    with _cond:
        while _pending >= MAX_PENDING:
            _cond.wait()
        _pending += 1
    try:
        snapshot, arena, to_cpu = _snapshot(obj)
    except BaseException:
        with _cond:
            _pending -= 1
            _cond.notify_all()
        raise
    fut = concurrent.futures.Future()
    with _cond:
        _queue.append((fut, snapshot, f, kwargs, arena, to_cpu))
        if _worker is None:
            _worker = threading.Thread(target=_run, name="ckptio-async-save", daemon=False)
            _worker.start()
    return fut


def wait_async_saves(timeout=None):
    """Waits until every save asked for so far is written (or failed).
    Returns True, or False when timeout (seconds) passed first."""
    import time

    deadline = None if timeout is None else time.monotonic() + timeout
    with _cond:
        while _pending:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            _cond.wait(left)
    return True

"""load_checkpoint straight into the model (issue 12, point 3).

The checkpoint is loaded as before: ckptio.load maps the file and decodes the
pickle; its tensors are views of the mapping whose pages nobody has touched
yet. For every entry that a plain copy would put into a parameter or buffer
unchanged (same name after revise_keys, same dtype and shape, both plain
contiguous CPU tensors, the module's _load_from_state_dict torch's own, no
pre-hooks), the surface's load_state_dict is handed the model's own tensor
instead, and the entry's bytes are read from the file with large pread()s,
the GIL released (_native.pread_into, src/binding/readinto.c), directly into
that parameter's memory: one copy, no page faults on the mapping.
load_state_dict runs unchanged over the same keys (every message, strict
error, hook and _metadata version is computed as before); its
``param.copy_(param)`` is torch's early return for a self-copy (torch 1.13
and 2.x). Everything else goes through that normal path.

When no code of the model's can look at the bytes during load_state_dict
(every module loads with torch's own _load_from_state_dict and none has a
post hook), the preads run in a helper thread while load_state_dict walks
the model, and are joined before it returns or raises: the walk's Python
time is hidden behind the copy. Otherwise they finish before it starts.
A failed read is repaired by copying its entries from the mapping.
When nothing can be read directly, load_state_dict copies every entry from
the mapping while a read-ahead thread asks for their pages (read_ahead).

The mapping is seen through capture(): while it is active, the paths that
ckptio.load maps in this thread are noted (serialization._source calls
noted()), with the file's identity taken before mapping; the file is then
reopened and read only if it is still the same file (device, inode, size,
mtime).
"""

import os
import threading
from contextlib import contextmanager

from . import _native

_tls = threading.local()

# what the direct path did, for tests and the curious: calls that read
# directly, entries and bytes read directly, calls that fell back entirely,
# calls whose reads ran beside load_state_dict
stats = {"calls": 0, "direct": 0, "bytes": 0, "normal": 0, "overlapped": 0}


@contextmanager
def capture():
    """Notes the files ckptio.load maps in this thread until exit; yields
    the list of (path, stat before mapping, Mapping)."""
    seen = []
    outer = getattr(_tls, "seen", None)
    _tls.seen = seen
    try:
        yield seen
    finally:
        _tls.seen = outer


@contextmanager
def reading(seen):
    """Makes seen what pending() gives in this thread until exit (for
    mmengine's _load_checkpoint_to_model, called by its load_checkpoint)."""
    outer = getattr(_tls, "pending", ())
    _tls.pending = seen
    try:
        yield
    finally:
        _tls.pending = outer


def pending():
    """The mapped files of the load_checkpoint running in this thread, or ()."""
    return getattr(_tls, "pending", ())


def stat_for_capture(path):
    """os.stat(path) when a capture is active (taken before mapping), else None."""
    if getattr(_tls, "seen", None) is None:
        return None
    try:
        return os.stat(path)
    except OSError:
        return None


def noted(path, before, mapping):
    """Called by ckptio.load after mapping path (before: stat_for_capture)."""
    seen = getattr(_tls, "seen", None)
    if seen is not None and before is not None:
        seen.append((path, before, mapping))


def _same_file(a, b):
    return (a.st_dev, a.st_ino, a.st_size, a.st_mtime_ns) == (b.st_dev, b.st_ino, b.st_size,
                                                              b.st_mtime_ns)


def _storage_address(t):
    """Where t's storage starts (torch 2: untyped_storage; torch 1.13 has
    only the typed storage(), whose data_ptr is the same address)."""
    get = getattr(t, "untyped_storage", None)
    return (get() if get is not None else t.storage()).data_ptr()


def _plain(t, torch):
    """A dense, contiguous, CPU tensor of a plain type, with no conj/neg bit."""
    return (
        type(t) in (torch.Tensor, torch.nn.Parameter)
        and t.layout == torch.strided
        and t.device.type == "cpu"
        and not t.is_quantized
        and t.is_contiguous()
        and not t.is_conj()
        and not (hasattr(t, "is_neg") and t.is_neg())
    )


def _walk(module, unwrap, torch, prefix="", parents_plain=True):
    """(prefix, module, plain) in the order the surfaces' load_state_dict
    visits, unwrapping once per level as they do; plain when the module and
    every module above it load with torch's own _load_from_state_dict and no
    pre-hooks (a parent's may rename, drop or change its children's entries
    before they are copied)."""
    if unwrap(module):
        module = module.module
    plain = parents_plain and _torch_own_loader(module, torch)
    yield prefix, module, plain
    for name, child in module._modules.items():
        if child is not None:
            yield from _walk(child, unwrap, torch, prefix + name + ".", plain)


def _torch_own_loader(module, torch):
    """True when module's _load_from_state_dict is nn.Module's, or batch
    norm's (which only adds num_batches_tracked when the key is missing, for
    _metadata versions < 2: never an entry read directly), and it has no
    load_state_dict pre-hooks (they may rename or change entries)."""
    method = getattr(module, "_load_from_state_dict", None)
    own = (torch.nn.Module._load_from_state_dict,
           torch.nn.modules.batchnorm._NormBase._load_from_state_dict)
    return getattr(method, "__func__", None) in own and not getattr(
        module, "_load_state_dict_pre_hooks", None
    )


def _swap_on():
    import torch

    future = getattr(torch, "__future__", None)
    get = getattr(future, "get_swap_module_params_on_conversion", None)
    return bool(get()) if get is not None else False


def _plan(model, state_dict, unwrap, span, torch):
    """([(key, target tensor, file offset)] for the entries that can be read
    directly, the rest being left to load_state_dict; and whether the reads
    may run beside load_state_dict: nothing it runs can look at a
    parameter's bytes, as every module loads with torch's own
    _load_from_state_dict (which only compares shapes and copies; a directly
    read entry is a self-copy) and none has load-state-dict post hooks
    (mmengine runs them; one may read what was loaded))."""
    addr, size, _ = span
    metadata = getattr(state_dict, "_metadata", None) or {}
    candidates = []
    targets = {}  # storage address -> how many keys write into it
    beside = True
    for prefix, module, plain in _walk(model, unwrap, torch):
        if not plain or getattr(module, "_load_state_dict_post_hooks", None):
            beside = False
        persistent = [
            (n, b) for n, b in module._buffers.items() if n not in module._non_persistent_buffers_set
        ]
        entries = list(module._parameters.items()) + persistent
        eligible = plain and not (
            metadata.get(prefix[:-1], {}) or {}
        ).get("assign_to_params_buffers", False)
        for name, param in entries:
            key = prefix + name
            if param is None or key not in state_dict:
                continue
            storage = _storage_address(param) if param.device.type == "cpu" else id(param)
            targets[storage] = targets.get(storage, 0) + 1
            if eligible:
                candidates.append((key, param, storage))
    plan = []
    for key, param, storage in candidates:
        value = state_dict[key]
        if targets[storage] != 1 or not isinstance(value, torch.Tensor):
            continue
        if not (_plain(param, torch) and _plain(value, torch)):
            continue
        if value.dtype != param.dtype or value.shape != param.shape or param.numel() == 0:
            continue
        if value._version != 0:  # changed in place since it was loaded: not the file's bytes
            continue
        nbytes = value.numel() * value.element_size()
        start = value.data_ptr()
        if not (addr <= start and start + nbytes <= addr + size):
            continue  # a copy (misaligned, byte-swapped, inflated, moved by map_location)
        plan.append((key, param, start - addr))
    return plan, beside


def _storage_nbytes(t):
    get = getattr(t, "untyped_storage", None)
    return get().nbytes() if get is not None else t.storage().nbytes()


def _mapped_ranges(tensors, span, torch):
    """(offset, length) in file order of the storages of the tensors that
    lie in the mapping span, each once."""
    addr, size, _ = span
    ranges = {}
    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.device.type != "cpu" or t.layout != torch.strided:
            continue
        start, n = _storage_address(t), _storage_nbytes(t)
        if n and addr <= start and start + n <= addr + size:
            ranges[start - addr] = n
    return sorted(ranges.items())


@contextmanager
def read_ahead(seen, tensors):
    """While the body reads the tensors that are views of the file capture()
    saw mapped (seen; nothing unless exactly one was), in about file order,
    a thread asks the kernel for their pages ahead of it (_native.read_ahead:
    madvise WILLNEED in 2 MiB steps, skipping cached ones, ending at once on
    a warm file; nothing for a heap buffer or under 64 MiB). Stopped and
    joined on exit."""
    handle = None
    mapping = seen[0][2] if len(seen) == 1 else None
    span = _native.mapping_span(mapping) if mapping is not None else None
    if span is not None and span[2] == "mmap":
        import torch

        handle = _native.read_ahead(mapping, _mapped_ranges(tensors, span, torch))
    try:
        yield
    finally:
        _native.read_ahead_stop(handle)


def _bytes_of(t):
    """A writable buffer over tensor t's memory (its bytes, no copy)."""
    return t.detach().reshape(-1).view(__import__("torch").uint8).numpy()


class _Reads:
    """The preads of one plan, run in a helper thread (GIL released in C)
    or in the caller's; error: what they raised, or None."""

    def __init__(self, fd, jobs):
        self.fd, self.jobs, self.error, self.thread = fd, jobs, None, None

    def run(self):
        try:
            _native.pread_into(self.fd, self.jobs)
        except (OSError, EOFError, ValueError) as e:
            self.error = e

    def start(self):
        self.thread = threading.Thread(target=self.run, name="ckptio-direct-read", daemon=True)
        self.thread.start()

    def join(self):
        if self.thread is not None:
            self.thread.join()


def _open_same(path, before):
    """An fd for path when it is still the file that was mapped, else None."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        if _same_file(os.fstat(fd), before):
            return fd
    except OSError:
        pass
    os.close(fd)
    return None


@contextmanager
def into(model, state_dict, seen, unwrap):
    """Yields the state dict to hand to load_state_dict: state_dict itself,
    or a copy (same class and _metadata) whose directly read entries are the
    model's own tensors. Their bytes are read from the file before the body
    runs, or while it runs when _plan says they may (joined on exit, before
    any exception leaves). Should a read fail, those entries are copied from
    the mapping instead, as load_state_dict would have copied them."""
    import torch

    stats["calls"] += 1
    plan, beside = [], False
    if len(seen) == 1 and not _swap_on() and isinstance(model, torch.nn.Module):
        path, before, mapping = seen[0]
        span = _native.mapping_span(mapping)
        if span[2] == "mmap" and span[1] == before.st_size:
            plan, beside = _plan(model, state_dict, unwrap, span, torch)
    fd = _open_same(path, before) if plan else None
    if fd is None:
        stats["normal"] += 1
        with read_ahead(seen, state_dict.values()):  # load_state_dict copies from the mapping
            yield state_dict
        return
    try:
        plan.sort(key=lambda p: p[2])
        reads = _Reads(fd, [(offset, _bytes_of(param)) for _, param, offset in plan])
        if beside:
            reads.start()
            stats["overlapped"] += 1
        else:
            reads.run()
            if reads.error is not None:  # the normal path copies every entry again
                stats["normal"] += 1
                yield state_dict
                return
        out = state_dict.copy()
        if hasattr(state_dict, "_metadata"):
            out._metadata = state_dict._metadata
        for key, param, _ in plan:
            out[key] = param
        try:
            yield out
        finally:
            reads.join()
            if reads.error is not None:
                with torch.no_grad():
                    for key, param, _ in plan:
                        param.copy_(state_dict[key])
                stats["normal"] += 1
            else:
                stats["direct"] += len(plan)
                stats["bytes"] += sum(j[1].nbytes for j in reads.jobs)
    finally:
        os.close(fd)

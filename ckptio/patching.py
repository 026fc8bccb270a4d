"""ckptio.patch() / ckptio.unpatch(): ckptio's checkpoint functions in place
of mmcv's and mmengine's, for code that imports them from there.

patch() sets ckptio's function (or class) on mmcv.runner.checkpoint,
mmcv.runner, mmengine.runner.checkpoint and mmengine.runner (whichever
import), and on every other imported module holding mmcv's or mmengine's
object under any name (mmcv.runner.base_runner's ``load_checkpoint``,
mmengine.runner.runner's ``_load_checkpoint``, a user's ``from mmcv.runner
import load_checkpoint``): the replacement goes by identity, so nothing else
is touched. Schemes registered with mmcv's or mmengine's CheckpointLoader
before patch() are registered with ckptio's too, and ckptio's classes see
those registered with mmcv's or mmengine's at any time (patched or not,
through a reference taken before patch()); unpatch() registers with mmcv's
and mmengine's classes the schemes registered while patched, and puts every
original back. Both are idempotent.

While patched, the names mmcv's and mmengine's own tests replace with
unittest.mock.patch (``mmcv.__path__``; ``load_from_http``, ``load_url`` and
``get_dist_info`` of both checkpoint modules; mmengine's ``print_log``) are
watched: a value put there after patch() is what ckptio's functions use (see
override), so those tests run unchanged against ckptio.
"""

import logging
import sys
from importlib import import_module

_log = logging.getLogger("ckptio")

# (module whose surface is replaced, ckptio module with the replacements)
_TARGETS = (
    ("mmcv.runner.checkpoint", "ckptio.checkpoint"),
    ("mmcv.runner", "ckptio.checkpoint"),
    ("mmengine.runner.checkpoint", "ckptio.mmengine"),
    ("mmengine.runner", "ckptio.mmengine"),
)

# (module, attribute name, original object): what patch() replaced
_replaced = []

_WATCHED = {
    "mmcv": ("__path__",),
    "mmcv.runner.checkpoint": ("load_from_http", "load_url", "get_dist_info"),
    "mmengine.runner.checkpoint": ("load_from_http", "load_url", "get_dist_info", "print_log"),
}
# (module name, attribute) -> its value right after patch()
_snapshot = {}


def override(module_name, attr):
    """What was set at module_name.attr since patch() (a test's mock), or
    None when nothing was or ckptio is not patched in."""
    key = (module_name, attr)
    if key not in _snapshot:
        return None
    value = getattr(sys.modules.get(module_name), attr, None)
    return None if value is _snapshot[key] else value


def original(module_name, name):
    """mmcv's or mmengine's own object module_name.name (also while ckptio's
    is in its place), or None when that module is not imported."""
    module = sys.modules.get(module_name)
    if module is None:
        return None
    for replaced_module, replaced_name, value in _replaced:
        if replaced_module is module and replaced_name == name:
            return value
    return module.__dict__.get(name)


def _hand_back_schemes():
    """Registers with mmcv's and mmengine's own CheckpointLoader the loaders
    users registered with ckptio's (through either name) while patched, so
    that unpatch() loses none."""
    for ours_name in ("ckptio.checkpoint", "ckptio.mmengine"):
        ours = sys.modules.get(ours_name)
        if ours is None:
            continue
        mine = ours.CheckpointLoader
        theirs = original(*mine._theirs)
        if theirs is None or theirs is mine:
            continue
        for prefix, loader in list(mine._schemes.items()):
            if loader in mine._builtin or theirs._schemes.get(prefix) is loader:
                continue
            theirs.register_scheme(prefix, loader, force=True)


def _surface(ours):
    """Names ckptio offers for the module ours mirrors: its public names
    and the private ones mmcv's and mmengine's runners import."""
    private = (
        "_load_checkpoint",
        "_load_checkpoint_with_prefix",
        "_load_checkpoint_to_model",
        "_process_mmcls_checkpoint",
        "_save_to_state_dict",
        "_get_mmcv_home",
    )
    return list(ours.__all__) + [n for n in private if hasattr(ours, n)]


def _import(name):
    try:
        return import_module(name)
    except Exception:  # absent, or present but unusable here (e.g. torchvision broken)
        return None


def _set(module, name, value):
    _replaced.append((module, name, module.__dict__[name]))
    setattr(module, name, value)


def _adopt_schemes(theirs, ours):
    """Registers with ours the loaders users registered with theirs (also
    those registered with force=True over a built-in prefix)."""
    originals = {id(v) for v in vars(sys.modules[theirs.__module__]).values()}
    for prefix, loader in list(theirs._schemes.items()):
        if id(loader) not in originals:  # the user's, also where it overrides a built-in
            ours.register_scheme(prefix, loader, force=True)


def patch(*, async_save=False):
    """Puts ckptio's checkpoint functions into mmcv and mmengine.

    async_save=True: local checkpoints written through them (CheckpointHook,
    runner.save_checkpoint, save_checkpoint) are snapshotted and written in
    the background by ckptio.async_save, so training goes on during the
    write; a failed write is logged at once and raised by the next save.
    Calling patch() again changes only this setting.
    """
    from . import _mmsave

    _mmsave.set_async(async_save)
    if _replaced:
        return
    swaps = {}  # id(original) -> (original, ours)
    for target_name, ours_name in _TARGETS:
        target = _import(target_name)
        if target is None:
            continue
        ours = _import(ours_name)
        if ours is None:
            continue
        for name in _surface(ours):
            original = target.__dict__.get(name)
            if not callable(original):
                continue
            mine = getattr(ours, name)
            if original is mine:
                continue
            if name == "CheckpointLoader":
                _adopt_schemes(original, mine)
            swaps[id(original)] = (original, mine)
    for module in list(sys.modules.values()):
        namespace = getattr(module, "__dict__", None)
        if not isinstance(namespace, dict) or str(getattr(module, "__name__", "")).startswith(
            "ckptio"
        ):
            continue
        for name, value in list(namespace.items()):
            swap = swaps.get(id(value))
            if swap is not None and swap[0] is value:
                _set(module, name, swap[1])
    _log.info("patch(): %d names replaced in %d modules (%s)", len(_replaced),
              len({id(m) for m, _, _ in _replaced}),
              ", ".join(sorted({n for _, n, _ in _replaced})) or "mmcv and mmengine not imported")
    for module_name, attrs in _WATCHED.items():
        module = sys.modules.get(module_name)
        for attr in attrs:
            if module is not None and hasattr(module, attr):
                _snapshot[(module_name, attr)] = getattr(module, attr)


def unpatch():
    """Puts back everything patch() replaced (saves already started by
    async_save=True still complete)."""
    from . import _mmsave

    _mmsave.set_async(False)
    _snapshot.clear()
    if _replaced:
        _hand_back_schemes()
    while _replaced:
        module, name, original = _replaced.pop()
        setattr(module, name, original)


def patched():
    """True between patch() and unpatch()."""
    return bool(_replaced)

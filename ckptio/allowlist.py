"""The user's allowlist for weights-only loads, with torch's API.

ckptio honours both its own list (ckptio.add_safe_globals) and torch's
(torch.serialization.add_safe_globals), so code that already allowlists its
classes for torch.load needs no change.
"""
import sys

_marked: set = set()


def add_safe_globals(safe_globals):
    """Marks globals (objects, or (object, "module.qualname") tuples) as safe
    for weights_only loads, as torch.serialization.add_safe_globals."""
    global _marked
    _marked = _marked.union(set(safe_globals))


def get_safe_globals():
    """The globals added with add_safe_globals, as a list."""
    return list(_marked)


def clear_safe_globals():
    """Forgets every global added with add_safe_globals."""
    global _marked
    _marked = set()


class safe_globals:
    """Context manager that allowlists globals for its duration."""

    def __init__(self, safe_globals):
        self.safe_globals = safe_globals

    def __enter__(self):
        add_safe_globals(self.safe_globals)

    def __exit__(self, *exc):
        global _marked
        _marked = _marked - set(self.safe_globals)


def _as_dict(entries):
    out = {}
    for entry in entries:
        if isinstance(entry, tuple):
            if len(entry) != 2:
                raise ValueError(
                    "Expected tuple of length 2 (global, str of callable full path), "
                    f"but got tuple of length: {len(entry)}"
                )
            obj, name = entry
            if type(name) is not str:
                raise TypeError(
                    "Expected second item in tuple to be str of callable full path, "
                    f"but got: {type(name)}"
                )
            out[name] = obj
        else:
            out[f"{entry.__module__}.{entry.__qualname__}"] = entry
    return out


def user_allowed_globals():
    """'module.qualname' -> object for every user-allowlisted global (torch's
    list first, ckptio's over it)."""
    torch = sys.modules.get("torch")
    wo = getattr(torch, "_weights_only_unpickler", None) if torch is not None else None
    user = getattr(wo, "_get_user_allowed_globals", None)  # torch >= 2.4
    out = dict(user()) if user is not None else {}
    out.update(_as_dict(_marked))
    return out

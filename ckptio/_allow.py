"""The data sets a weights-only load may decode beyond torch's allowlist
(``ckptio.load(f, allow='openmmlab')``); the C side's CK_ALLOW_* bits
(src/binding/dataset.h).

'openmmlab': what mmengine's Runner and mmcv's runners write into their
checkpoints besides tensors: numpy arrays, dtypes and scalars (numpy 1.x and
2.x spellings), mmengine's HistoryBuffer and getattr(HistoryBuffer, one of
its statistics methods). Each is built from the pickle's bytes by checked
builders in C; nothing the file names is called.
"""

OPENMMLAB = "openmmlab"
SETS = {OPENMMLAB: 1}


def allow_bits(allow):
    """The CK_ALLOW_* bits for allow: None, a set's name, or several names."""
    if allow is None:
        return 0
    names = [allow] if isinstance(allow, str) else list(allow)
    bits = 0
    for name in names:
        if name not in SETS:
            known = ", ".join(repr(n) for n in SETS)
            raise ValueError(f"allow: unknown data set {name!r} (known: {known})")
        bits |= SETS[name]
    return bits


# the globals each set decodes (src/binding/dataset.c's table; getattr only
# as getattr(HistoryBuffer, one of its statistics methods), checked in C)
GLOBALS = {OPENMMLAB: frozenset({
    "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct",
    "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar",
    "numpy.ndarray", "numpy.dtype", "builtins.getattr", "__builtin__.getattr",
    "builtins.bytes", "__builtin__.bytes", "mmengine.logging.history_buffer.HistoryBuffer",
    "_codecs.encode",
})}


def allowed_by(name, allow):
    """True when one of the data sets in allow (as for allow_bits) decodes the
    global name (ckptio info's check of what a load would refuse)."""
    if allow is None:
        return False
    names = [allow] if isinstance(allow, str) else list(allow)
    return any(name in GLOBALS.get(n, ()) for n in names)

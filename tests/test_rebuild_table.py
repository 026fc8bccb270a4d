"""Every allowlisted rebuild function x every allowlisted storage type x
every allowlisted dtype (where the function takes one), enumerated from the
installed torch (tests/torchspace.py), each written as an archive and loaded
by torch.load and ckptio.load: the results are equal, or both refuse (ckptio
with a CheckpointError naming the file). A newer torch brings its own
storage types, dtypes and rebuild functions into the table.

Deliberate differences, each checked rather than skipped:
- a plain rebuild over a quantized dtype: torch returns a tensor without a
  quantizer that fails on any use; ckptio refuses the file."""
import io
import warnings

import pytest
import torch

import ckptio
import torchspace

STYPES = torchspace.storage_types()
DTYPES = torchspace.dtypes()
FUNCTIONS = torchspace.rebuild_functions()
QUANTIZED = {torch.qint8, torch.quint8, torch.qint32, torch.quint4x2, torch.quint2x4}


def _cases():
    for fn in FUNCTIONS:
        if not torchspace.takes_storage(fn):
            yield pytest.param(fn, None, id=fn)
            continue
        for st in STYPES:
            if st[0] == "torch.cuda" and fn != "_rebuild_tensor_v2":
                continue  # the same dtypes as torch.<Name>: once is enough
            yield pytest.param(fn, st, id=f"{fn}-{st[0]}.{st[1]}")


def _same(ours, theirs, where):
    assert type(ours) is type(theirs), where
    if isinstance(theirs, dict):
        assert list(ours) == list(theirs), where
        for k in theirs:
            _same(ours[k], theirs[k], f"{where}[{k!r}]")
        return
    if not isinstance(theirs, torch.Tensor):
        assert ours == theirs, where
        return
    assert (ours.dtype, ours.device, ours.layout, ours.requires_grad, ours.is_nested) == (
        theirs.dtype, theirs.device, theirs.layout, theirs.requires_grad, theirs.is_nested), where
    if not theirs.is_nested:
        assert ours.shape == theirs.shape, where
    assert ours.__dict__.keys() == theirs.__dict__.keys(), where
    if theirs.is_meta:
        assert ours.stride() == theirs.stride(), where
    elif theirs.is_quantized:
        assert torch.equal(ours.int_repr(), theirs.int_repr()), where
        assert ours.qscheme() == theirs.qscheme(), where
    elif theirs.layout == torch.sparse_coo:
        _same(ours._indices(), theirs._indices(), where + ".indices")
        _same(ours._values(), theirs._values(), where + ".values")
    elif theirs.is_nested:
        for a, b in zip(ours.unbind(), theirs.unbind()):
            _same(a, b, where + ".unbind")
    else:
        assert (ours.stride(), ours.storage_offset()) == (theirs.stride(),
                                                          theirs.storage_offset()), where
        a, b = ours.untyped_storage(), theirs.untyped_storage()
        assert bytes(a) == bytes(b), where  # bit-exact, any dtype (sub-byte ones too)


def _usable(result):
    """torch.load's result, or None when it holds a quantized tensor without a
    quantizer (any use of it fails with an internal assert)."""
    for v in result.values():
        if isinstance(v, torch.Tensor) and v.dtype in QUANTIZED:
            try:
                v.qscheme()
            except RuntimeError:
                return None
    return result


def _outcome(load, data):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return "ok", load(data)
        except Exception as exc:  # noqa: BLE001 - compared below
            return "error", exc


@pytest.mark.parametrize("fn,stype", list(_cases()))
def test_rebuild(fn, stype, tmp_path):
    mismatches = []
    for dtype in DTYPES if torchspace.takes_dtype(fn) else [None]:
        data = torchspace.case(fn, stype, dtype)
        where = f"{fn} {stype} {dtype}"
        theirs = _outcome(lambda d: torch.load(io.BytesIO(d)), data)
        ours = _outcome(ckptio.load, data)
        if theirs[0] == "ok" and _usable(theirs[1]) is None:
            theirs = ("error", "unusable result")
        if ours[0] == "error":
            exc = ours[1]
            if not isinstance(exc, ckptio.CheckpointError) or f"<bytes of {len(data)} bytes>" not in str(exc):
                mismatches.append(f"{where}: not a clean refusal: {type(exc).__name__}: {exc}")
            elif theirs[0] == "ok":
                mismatches.append(f"{where}: torch loads it, ckptio refuses: {exc}")
            continue
        if theirs[0] == "error":
            mismatches.append(f"{where}: torch refuses ({theirs[1]!r:.200}), ckptio loads")
            continue
        try:
            _same(ours[1], theirs[1], where)
        except AssertionError as exc:
            mismatches.append(f"{where}: results differ: {exc}")
    assert not mismatches, "\n".join(mismatches[:20]) + f"\n({len(mismatches)} in all)"


def test_the_table_covers_torch():
    """The enumeration sees what this torch allows (a regression in
    torchspace would silently shrink the table)."""
    names = {st[1] for st in STYPES}
    assert {"FloatStorage", "QInt8Storage", "BFloat16Storage", "UntypedStorage"} <= names
    assert {torch.float8_e4m3fn, torch.uint4, torch.qint8, torch.bool} <= set(DTYPES)
    assert {"_rebuild_tensor_v2", "_rebuild_qtensor", "_rebuild_sparse_tensor",
            "_rebuild_nested_tensor", "_rebuild_from_type_v2"} <= set(FUNCTIONS)
    assert len(list(_cases())) >= 150

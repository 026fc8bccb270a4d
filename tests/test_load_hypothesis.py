"""Generated checkpoints: whatever torch.save writes, ckptio.load reads as
torch.load does (tensors of many dtypes, shapes, views sharing storages,
nested containers, scalars)."""
import collections
import io

import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import ckptio
from helpers import assert_same

DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.complex64,
    torch.uint16,
    torch.float8_e4m3fn,
]


@st.composite
def tensors(draw, bases):
    """A new tensor, or a view (slice, transpose, narrow) of one drawn before."""
    if bases and draw(st.booleans()):
        base = draw(st.sampled_from(bases))
        view = base
        if view.dim() >= 2 and draw(st.booleans()):
            view = view.transpose(0, view.dim() - 1)
        if view.dim() >= 1 and view.shape[0] > 1:
            start = draw(st.integers(0, view.shape[0] - 1))
            step = draw(st.integers(1, 3))
            view = view[start::step]
        return view
    dtype = draw(st.sampled_from(DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, 5), min_size=0, max_size=3)))
    n = 1
    for s in shape:
        n *= s
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    size = torch.empty(0, dtype=dtype).element_size()
    raw = torch.randint(0, 256, (n * size,), dtype=torch.uint8, generator=gen)
    t = (raw % 2).bool() if dtype == torch.bool else raw.view(dtype)
    t = t.reshape(shape)
    bases.append(t)
    return t


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False),
    st.text(max_size=20),
)


@st.composite
def checkpoints(draw):
    bases = []
    leaves = st.one_of(scalars, tensors(bases))

    def extend(children):
        return st.one_of(
            st.lists(children, max_size=4),
            st.tuples(children, children),
            st.dictionaries(st.text(max_size=8), children, max_size=4),
        )

    body = draw(st.recursive(leaves, extend, max_leaves=12))
    sd = collections.OrderedDict()
    for i in range(draw(st.integers(0, 6))):
        sd[f"layer{i}.weight"] = draw(tensors(bases))
    return {"state_dict": sd, "body": body}


@settings(max_examples=int(__import__("os").environ.get("CKPTIO_HYPOTHESIS_EXAMPLES", 120)), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ckpt=checkpoints(), mmap=st.booleans(), weights_only=st.booleans())
def test_generated_checkpoints(tmp_path_factory, ckpt, mmap, weights_only):
    path = tmp_path_factory.mktemp("h") / "ckpt.pth"
    torch.save(ckpt, path)
    theirs = torch.load(path, weights_only=weights_only)
    assert_same(ckptio.load(path, mmap=mmap, weights_only=weights_only), theirs)


@settings(max_examples=40, deadline=None)
@given(ckpt=checkpoints())
def test_generated_checkpoints_legacy_format(ckpt):
    buf = io.BytesIO()
    torch.save(ckpt, buf, _use_new_zipfile_serialization=False)
    data = buf.getvalue()
    try:
        theirs = torch.load(io.BytesIO(data))
    except AttributeError:
        # torch's legacy reader cannot read back the dtypes it saves as
        # UntypedStorage (uint16, float8, ...): see test_legacy_new_dtypes
        assume(False)
    assert_same(ckptio.load(data), theirs)


def test_legacy_new_dtypes():
    """Legacy-format files holding dtypes that torch saves as bytes load in
    ckptio (torch's own legacy reader fails on them)."""
    obj = {
        "u16": torch.arange(7, dtype=torch.int32).to(torch.uint16),
        "f8": torch.randn(5).to(torch.float8_e4m3fn),
        "f32": torch.randn(3),
    }
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=False)
    got = ckptio.load(buf.getvalue())
    for k, v in obj.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k].view(torch.uint8), v.view(torch.uint8))

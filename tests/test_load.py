"""ckptio.load against torch.load on files torch.save wrote (the oracle)."""
import collections
import io
import os
import pickle

import numpy as np
import pytest
import torch

import ckptio
from helpers import assert_same

ALL_DTYPES = [
    torch.float64,
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.complex128,
    torch.complex64,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.uint16,
    torch.uint32,
    torch.uint64,
    torch.float8_e5m2,
    torch.float8_e4m3fn,
    torch.float8_e5m2fnuz,
    torch.float8_e4m3fnuz,
    torch.complex32,
]
if hasattr(torch, "float8_e8m0fnu"):
    ALL_DTYPES.append(torch.float8_e8m0fnu)


def random_tensor(shape, dtype, gen):
    n = 1
    for s in shape:
        n *= s
    raw = torch.randint(0, 256, (n * torch.empty(0, dtype=dtype).element_size(),), generator=gen,
                        dtype=torch.uint8)
    if dtype == torch.bool:
        return (raw % 2).bool().reshape(shape)
    return raw.view(dtype).reshape(shape)


def roundtrip(tmp_path, obj, name="ckpt.pth", **load_kwargs):
    path = tmp_path / name
    torch.save(obj, path)
    theirs = torch.load(path, **load_kwargs)
    ours = ckptio.load(path, **load_kwargs)
    assert_same(ours, theirs)
    return ours, theirs, path


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(), (0,), (3, 0), (7,), (2, 3, 4)], ids=str)
def test_every_dtype_and_shape(tmp_path, dtype, shape):
    gen = torch.Generator().manual_seed(hash((str(dtype), shape)) % 2**31)
    t = random_tensor(shape, dtype, gen)
    roundtrip(tmp_path, {"t": t, "list": [t], "other": t.clone()})


@pytest.mark.parametrize("mmap", [True, False])
def test_views_offsets_strides_and_sharing(tmp_path, mmap):
    base = torch.arange(120, dtype=torch.float32).reshape(4, 5, 6)
    obj = {
        "base": base,
        "transposed": base.transpose(0, 2),
        "slice": base[1:3, ::2, 1:],
        "row": base[2],
        "flat_tail": base.view(-1)[17:],
        "expanded": torch.ones(3, 1).expand(3, 4),
        "alone_slice": torch.arange(10.0)[3:7],
        "separate": torch.zeros(2, 2),
    }
    ours, theirs, _ = roundtrip(tmp_path, obj, mmap=mmap)
    assert ours["base"].untyped_storage().data_ptr() == ours["slice"].untyped_storage().data_ptr()
    assert ours["base"].untyped_storage().data_ptr() != ours["separate"].untyped_storage().data_ptr()


def test_tensor_shared_between_entries_and_first_not_spanning(tmp_path):
    big = torch.randn(100)
    obj = collections.OrderedDict(
        [("a_part", big[10:20]), ("whole", big), ("b_part", big[50:])]
    )
    roundtrip(tmp_path, obj)


def test_module_state_dict_with_metadata(tmp_path):
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.Linear(8, 2)
    )
    sd = model.state_dict()
    ours, theirs, _ = roundtrip(tmp_path, sd)
    assert ours._metadata == theirs._metadata
    fresh = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.Linear(8, 2)
    )
    fresh.load_state_dict(ours)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, sd[k])


def test_parameters_and_requires_grad(tmp_path):
    p = torch.nn.Parameter(torch.randn(3, 3))
    q = torch.nn.Parameter(torch.randn(2), requires_grad=False)
    leaf = torch.randn(4, requires_grad=True)
    obj = {"p": p, "q": q, "leaf": leaf, "list": [p, q]}
    ours, _, _ = roundtrip(tmp_path, obj, weights_only=True)
    assert isinstance(ours["p"], torch.nn.Parameter) and ours["p"].requires_grad
    assert ours["list"][0] is ours["p"]


def test_parameter_with_attributes_and_tensor_subclass_state(tmp_path):
    p = torch.nn.Parameter(torch.randn(2, 2))
    p.my_tag = "hello"
    t = torch.randn(3)
    t.note = 5
    roundtrip(tmp_path, {"p": p, "t": t}, weights_only=True)


def test_conj_and_neg_bits(tmp_path):
    c = torch.randn(4, dtype=torch.complex64).conj()
    roundtrip(tmp_path, {"c": c})


def test_containers_and_scalars(tmp_path):
    obj = {
        "none": None,
        "bools": [True, False],
        "ints": (0, 1, -1, 255, 256, 65535, 65536, -(2**31), 2**31, 2**63, -(2**70), 10**30),
        "floats": [0.0, -1.5, 1e300, float("inf")],
        "complex": complex(1, -2),
        "str": "héllo ✓",
        "bytes": bytearray(b"\x00\x01raw"),
        "set": {1, 2, 3},
        "nested": {"a": [{"b": (1, [2, {"c": torch.ones(2)}])}]},
        "od": collections.OrderedDict([("z", 1), ("a", 2)]),
        "counter": collections.Counter("hello"),
        "size": torch.Size([2, 3]),
        "dtype": torch.float16,
        "device": torch.device("cpu"),
    }
    roundtrip(tmp_path, obj)


def test_numpy_values_weights_only_false(tmp_path):
    obj = {
        "meta": {
            "arr": np.arange(6, dtype=np.float32).reshape(2, 3),
            "scalar": np.float64(3.5),
            "int": np.int64(7),
            "dtype": np.dtype("int16"),
            "hist": [np.array([1, 2, 3])],
        }
    }
    roundtrip(tmp_path, obj, weights_only=False)


def test_numpy_values_need_allowlisting(tmp_path):
    path = tmp_path / "np.pth"
    torch.save({"x": np.array([1.0, 2.0])}, path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path)
    with pytest.raises(ckptio.UnpicklingError) as info:
        ckptio.load(path)
    msg = str(info.value)
    assert str(path) in msg and "_reconstruct" in msg and "add_safe_globals" in msg
    allowed = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.float64))]
    with torch.serialization.safe_globals(allowed):
        theirs = torch.load(path)
    with ckptio.safe_globals(allowed):
        ours = ckptio.load(path)
    assert_same(ours, theirs)
    # torch's own allowlist is honoured too
    with torch.serialization.safe_globals(allowed):
        assert_same(ckptio.load(path), theirs)
    assert ckptio.get_safe_globals() == []


def test_numpy_1_spelling_is_the_same_global(tmp_path):
    """A pickle naming numpy.core.multiarray (NumPy 1) loads once the NumPy 2
    object is allowlisted."""
    path = tmp_path / "np1.pth"
    torch.save({"x": np.array([1.0, 2.0])}, path)
    import zipfile

    with zipfile.ZipFile(path) as z:
        records = {n: z.read(n) for n in z.namelist()}
    pkl_name = [n for n in records if n.endswith("data.pkl")][0]
    pkl = records[pkl_name]
    assert b"numpy._core.multiarray" in pkl
    records[pkl_name] = pkl.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    path2 = tmp_path / "np1b.pth"
    with zipfile.ZipFile(path2, "w", zipfile.ZIP_STORED) as z:
        for n, data in records.items():
            z.writestr(n, data)
    allowed = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.float64))]
    with ckptio.safe_globals(allowed):
        ours = ckptio.load(path2)
    np.testing.assert_array_equal(ours["x"], np.array([1.0, 2.0]))


class Unsafe:
    def __init__(self, payload):
        self.payload = payload

    def __reduce__(self):
        return (os.system, (self.payload,))


@pytest.mark.parametrize(
    "target",
    [
        (os.system, "posix.system"),
        (eval, "builtins.eval"),
        (getattr, "builtins.getattr"),
        (torch.load, "torch.serialization.load"),
    ],
)
def test_refused_globals(tmp_path, target):
    func, name = target

    class Evil:
        def __reduce__(self):
            return (func, ("1",))

    path = tmp_path / "evil.pth"
    torch.save({"x": Evil()}, path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path)
    with pytest.raises(ckptio.UnpicklingError) as info:
        ckptio.load(path)
    assert isinstance(info.value, ckptio.CheckpointError)
    assert isinstance(info.value, RuntimeError)
    assert str(path) in str(info.value)
    assert name.split(".")[-1] in str(info.value)


def test_weights_only_false_runs_globals_as_torch(tmp_path):
    path = tmp_path / "counter.pth"
    torch.save({"od": collections.OrderedDict(a=1), "f": complex}, path)
    assert_same(
        ckptio.load(path, weights_only=False), torch.load(path, weights_only=False)
    )


def test_blocked_module_even_when_allowlisted(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"x": Unsafe("true")}, path)
    with ckptio.safe_globals([os.system]):
        with pytest.raises(ckptio.UnpicklingError, match="blocked"):
            ckptio.load(path)


@pytest.mark.parametrize(
    "map_location",
    [None, "cpu", torch.device("cpu"), {"cpu": "cpu"}, lambda s, loc: s, lambda s, loc: None, "meta"],
    ids=["none", "str", "device", "dict", "identity", "none-callable", "meta"],
)
def test_map_location(tmp_path, map_location):
    obj = {"a": torch.randn(3, 4), "b": torch.arange(5)[1:], "c": torch.ones(2, dtype=torch.bfloat16)}
    roundtrip(tmp_path, obj, map_location=map_location)


def test_map_location_callable_sees_storages(tmp_path):
    path = tmp_path / "m.pth"
    torch.save({"a": torch.randn(3), "b": torch.randn(2)}, path)
    seen_theirs, seen_ours = [], []
    torch.load(path, map_location=lambda s, loc: seen_theirs.append((type(s), loc, s.nbytes())))
    ckptio.load(path, map_location=lambda s, loc: seen_ours.append((type(s), loc, s.nbytes())))
    assert seen_ours == seen_theirs


def _save_as_cuda(obj, path):
    """torch.save as if the tensors lived on cuda:0 (no GPU needed)."""
    original = torch.serialization.location_tag
    torch.serialization.location_tag = lambda storage: "cuda:0"
    try:
        torch.save(obj, path)
    finally:
        torch.serialization.location_tag = original


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cuda_file_without_cuda(tmp_path):
    path = tmp_path / "cuda.pth"
    _save_as_cuda({"w": torch.randn(2, 2)}, path)
    with pytest.raises(RuntimeError) as theirs:
        torch.load(path)
    with pytest.raises(RuntimeError) as ours:
        ckptio.load(path)
    # torch's own message, with the file and the place in front
    assert str(theirs.value) in str(ours.value) and str(path) in str(ours.value)
    assert_same(ckptio.load(path, map_location="cpu"), torch.load(path, map_location="cpu"))
    assert_same(
        ckptio.load(path, map_location={"cuda:0": "cpu"}),
        torch.load(path, map_location={"cuda:0": "cpu"}),
    )
    assert_same(
        ckptio.load(path, map_location=lambda s, loc: s), torch.load(path, map_location=lambda s, loc: s)
    )


def test_inputs_bytes_bytesio_file_and_pathlike(tmp_path):
    obj = {"w": torch.randn(5, 5), "k": "v"}
    path = tmp_path / "x.pth"
    torch.save(obj, path)
    theirs = torch.load(path)
    data = path.read_bytes()
    assert_same(ckptio.load(data), theirs)
    assert_same(ckptio.load(bytearray(data)), theirs)
    assert_same(ckptio.load(memoryview(data)), theirs)
    assert_same(ckptio.load(io.BytesIO(data)), theirs)
    with open(path, "rb") as f:
        assert_same(ckptio.load(f), theirs)
    assert_same(ckptio.load(str(path)), theirs)
    assert_same(ckptio.load(path, mmap=False), theirs)
    # a stream positioned after a header
    buf = io.BytesIO(b"HEADER" + data)
    buf.seek(6)
    assert_same(ckptio.load(buf), theirs)
    with pytest.raises(ValueError):
        ckptio.load(io.BytesIO(data), mmap=True)


def test_loaded_tensors_are_writable_and_private(tmp_path):
    path = tmp_path / "w.pth"
    torch.save({"w": torch.zeros(1000)}, path)
    before = path.read_bytes()
    sd = ckptio.load(path)
    sd["w"] += 1
    assert torch.all(sd["w"] == 1)
    assert path.read_bytes() == before
    assert torch.all(ckptio.load(path)["w"] == 0)


def test_tensors_outlive_everything_else(tmp_path):
    import gc

    path = tmp_path / "life.pth"
    torch.save({"a": torch.arange(1000.0), "b": torch.arange(10.0)}, path)
    a = ckptio.load(path)["a"]
    gc.collect()
    assert float(a.sum()) == sum(range(1000))
    path.unlink()
    gc.collect()
    assert float(a[999]) == 999.0


def test_storage_objects_in_result(tmp_path):
    t = torch.arange(6, dtype=torch.int16)
    u = torch.arange(4, dtype=torch.uint8)
    obj = {"t": t, "typed": t.storage(), "untyped": u.untyped_storage(), "u": u}
    path = tmp_path / "s.pth"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save(obj, path)
        theirs = torch.load(path)
        ours = ckptio.load(path)
    assert_same(ours, theirs)


def test_old_pickle_protocols_weights_only_false(tmp_path):
    obj = {"a": torch.randn(3), "s": "x", "l": [1, 2.5, None], "t": (1,)}
    # protocol 0 writes persistent ids as text, which torch cannot read back
    for proto in (1, 2, 3, 4, 5):
        path = tmp_path / f"p{proto}.pth"
        torch.save(obj, path, pickle_protocol=proto)
        assert_same(ckptio.load(path, weights_only=False), torch.load(path, weights_only=False))


def test_protocol_4_weights_only(tmp_path):
    """torch's weights-only unpickler refuses protocol-4 opcodes; ckptio reads
    them (they build data only) and applies the same allowlist."""
    obj = {"a": torch.randn(3), "s": "x" * 300, "l": [1, 2.5, None]}
    path = tmp_path / "p4.pth"
    torch.save(obj, path, pickle_protocol=4)
    assert_same(ckptio.load(path), torch.load(path, weights_only=False))


def test_torchscript_archive(tmp_path):
    path = tmp_path / "ts.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), path)
    with pytest.raises(ckptio.CheckpointError, match="TorchScript"):
        ckptio.load(path)
    m = ckptio.load(path, weights_only=False)
    assert isinstance(m, torch.jit.ScriptModule)


def test_safetensors_path(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    path = str(tmp_path / "x.safetensors")
    safetensors.save_file({"a": torch.randn(3)}, path)
    assert_same(ckptio.load(path), torch.load(path))


def test_file_renamed_prefix_differs(tmp_path):
    path = tmp_path / "original_name.pth"
    torch.save({"a": torch.randn(3)}, path)
    moved = tmp_path / "renamed.bin"
    path.rename(moved)
    assert_same(ckptio.load(moved), torch.load(moved))


def test_sparse_and_quantized_go_through_torch(tmp_path):
    i = torch.tensor([[0, 1, 1], [2, 0, 2]])
    v = torch.tensor([3.0, 4.0, 5.0])
    sparse = torch.sparse_coo_tensor(i, v, (2, 3))
    q = torch.quantize_per_tensor(torch.randn(4), 0.1, 10, torch.quint8)
    path = tmp_path / "sq.pth"
    torch.save({"sparse": sparse, "q": q}, path)
    theirs = torch.load(path)
    ours = ckptio.load(path)
    assert torch.equal(ours["sparse"].to_dense(), theirs["sparse"].to_dense())
    assert torch.equal(ours["q"].int_repr(), theirs["q"].int_repr())
    assert ours["q"].q_scale() == theirs["q"].q_scale()


OLD_TORCH = "/usr/bin/python3"


def _old_torch_available():
    import subprocess

    try:
        out = subprocess.run(
            [OLD_TORCH, "-c", "import torch; print(torch.__version__)"],
            capture_output=True, text=True, timeout=120,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0


@pytest.mark.skipif(not _old_torch_available(), reason="Debian's python3-torch (1.13) not installed")
@pytest.mark.parametrize("zipfile_format", [True, False], ids=["zip", "legacy"])
def test_files_written_by_torch_1_13(tmp_path, zipfile_format):
    """An independent old writer: Debian's torch 1.13 (pointer-valued storage
    keys, keys sorted as strings, no byteorder record in legacy files)."""
    import subprocess

    path = tmp_path / "old.pth"
    script = f"""
import torch, collections
torch.manual_seed(0)
m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Linear(8, 4))
base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
obj = {{
    "state_dict": m.state_dict(),
    "view": base[1:4, 2:7], "base": base, "t": base.t(),
    "half": torch.randn(5).half(), "bf16": torch.randn(5).bfloat16(),
    "c64": torch.randn(3, dtype=torch.complex64), "i8": torch.arange(-4, 4, dtype=torch.int8),
    "bool": torch.tensor([True, False, True]), "p": torch.nn.Parameter(torch.randn(2, 2)),
    "meta": {{"epoch": 3, "CLASSES": ("a", "b"), "lr": 0.1}},
}}
for i in range(12):
    obj["k%d" % i] = torch.randn(i + 1)
torch.save(obj, {str(path)!r}, _use_new_zipfile_serialization={zipfile_format})
"""
    subprocess.run([OLD_TORCH, "-c", script], check=True, timeout=300)
    theirs = torch.load(path)
    for mmap in (True, False):
        assert_same(ckptio.load(path, mmap=mmap), theirs)

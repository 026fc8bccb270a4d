"""ckptio.save against torch.save (the oracle): the same bytes, files that
torch.load (weights_only, mmap) and ckptio.load read back as the object
saved, and a target that is never left torn."""
import io
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
import zipfile

import numpy as np
import pytest
import torch

import ckptio
from ckptio import _native
from ckptio.saving import save_with
from helpers import assert_same, tensor_bytes

ALL_DTYPES = [
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.complex128,
    torch.complex64, torch.complex32, torch.int64, torch.int32, torch.int16, torch.int8,
    torch.uint8, torch.bool, torch.uint16, torch.uint32, torch.uint64, torch.float8_e5m2,
    torch.float8_e4m3fn, torch.float8_e5m2fnuz, torch.float8_e4m3fnuz,
]
if hasattr(torch, "float8_e8m0fnu"):
    ALL_DTYPES.append(torch.float8_e8m0fnu)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def random_tensor(shape, dtype, gen):
    n = 1
    for s in shape:
        n *= s
    size = n * torch.empty(0, dtype=dtype).element_size()
    raw = torch.randint(0, 256, (size,), generator=gen, dtype=torch.uint8)
    if dtype == torch.bool:
        return (raw % 2).bool().reshape(shape)
    return raw.view(dtype).reshape(shape)


def same_bytes_as_torch(tmp_path, obj, name="ckpt.pth"):
    """Saves obj with both writers under the same file name (the archive
    folder comes from it) and asserts identical files; returns our path."""
    (tmp_path / "torch").mkdir(exist_ok=True)
    (tmp_path / "ours").mkdir(exist_ok=True)
    theirs, ours = tmp_path / "torch" / name, tmp_path / "ours" / name
    torch.save(obj, theirs)
    ckptio.save(obj, ours)
    a, b = theirs.read_bytes(), ours.read_bytes()
    if a != b:
        at = next(i for i in range(min(len(a), len(b))) if a[i] != b[i]) if a[: len(b)] != b[
            : len(a)] else min(len(a), len(b))
        pytest.fail(f"files differ at byte {at} (sizes {len(a)} and {len(b)})")
    return ours


def assert_equal_values(back, obj, path="obj"):
    """back (read from a file) holds what obj held: types, dtypes, shapes,
    requires_grad, element bytes, key order and _metadata. (Storage sharing
    and strides are compared against torch's own file by assert_same.)"""
    assert type(back) is type(obj), f"{path}: {type(back)} != {type(obj)}"
    if isinstance(obj, torch.Tensor):
        assert back.dtype == obj.dtype and back.shape == obj.shape, path
        assert back.requires_grad == obj.requires_grad, path
        assert tensor_bytes(back) == tensor_bytes(obj), f"{path}: bytes differ"
    elif isinstance(obj, dict):
        assert list(back) == list(obj), f"{path}: keys"
        assert getattr(back, "_metadata", None) == getattr(obj, "_metadata", None), path
        for k in obj:
            assert_equal_values(back[k], obj[k], f"{path}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        assert len(back) == len(obj), path
        for i, (b, o) in enumerate(zip(back, obj)):
            assert_equal_values(b, o, f"{path}[{i}]")
    elif isinstance(obj, np.ndarray):
        assert back.dtype == obj.dtype and np.array_equal(back, obj), path
    else:
        assert back == obj, path


def check_reads_back(path, obj, weights_only=(True, False), oracle=None):
    """torch.load (weights_only, mmap) and ckptio.load give obj back, with
    the same sharing and strides as torch.load of torch's own file (found
    beside ours when same_bytes_as_torch wrote both)."""
    if oracle is None and path.parent.name == "ours":
        oracle = path.parent.parent / "torch" / path.name
    for wo in weights_only:
        for mmap in (False, True):
            back = torch.load(path, weights_only=wo, mmap=mmap)
            assert_equal_values(back, obj)
            if oracle is not None:
                assert_same(back, torch.load(oracle, weights_only=wo))
        assert_equal_values(ckptio.load(path, weights_only=wo), obj)


def state_dict_with_metadata():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                            torch.nn.Flatten(), torch.nn.Linear(8, 4))
    sd = m.state_dict()
    assert hasattr(sd, "_metadata")
    return m, sd


# ---- byte identity and read-back -------------------------------------------------------

@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(), (0,), (5,), (3, 4), (2, 0, 3)], ids=str)
def test_every_dtype_and_shape(tmp_path, dtype, shape):
    gen = torch.Generator().manual_seed(1)
    obj = {"t": random_tensor(shape, dtype, gen), "again": random_tensor(shape, dtype, gen)}
    path = same_bytes_as_torch(tmp_path, obj)
    check_reads_back(path, obj)


def test_views_sharing_and_non_contiguous(tmp_path):
    base = torch.arange(120, dtype=torch.float32).reshape(10, 12)
    obj = {
        "base": base, "rows": base[2:5], "cols": base[:, 3:7], "t": base.t(),
        "strided": base[::3, ::2], "flat_view": base.view(-1)[7:20], "again": base,
        "other": torch.ones(3), "expand": torch.ones(1, 4).expand(5, 4),
        "list": [base[0], base[9]], "tuple": (base[1, 1], torch.zeros(2, 3).t()),
    }
    path = same_bytes_as_torch(tmp_path, obj)
    check_reads_back(path, obj)
    with zipfile.ZipFile(path) as z:
        data = [n for n in z.namelist() if "/data/" in n]
    assert data == ["ckpt/data/0", "ckpt/data/1", "ckpt/data/2", "ckpt/data/3"]


def test_module_state_dict_metadata_parameters_and_optimizer(tmp_path):
    m, sd = state_dict_with_metadata()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    m(torch.randn(2, 3, 3, 3)).sum().backward()
    opt.step()
    adam = torch.optim.AdamW(m.parameters(), lr=1e-3)
    adam.step()
    obj = {
        "state_dict": sd,
        "params": list(m.parameters()),
        "frozen": torch.nn.Parameter(torch.randn(3), requires_grad=False),
        "optimizer": opt.state_dict(),
        "adam": adam.state_dict(),
    }
    path = same_bytes_as_torch(tmp_path, obj)
    check_reads_back(path, obj)
    loaded = torch.load(path)
    assert loaded["state_dict"]._metadata == sd._metadata
    assert all(isinstance(p, torch.nn.Parameter) and p.requires_grad for p in loaded["params"])
    assert not loaded["frozen"].requires_grad


def mmcv_style_checkpoint():
    _, sd = state_dict_with_metadata()
    meta = {
        "mmcv_version": "1.7.2", "time": "Mon Nov 30 11:00:00 2026", "epoch": 12, "iter": 4800,
        "CLASSES": ("person", "car", "bicycle"), "PALETTE": [[220, 20, 60], [0, 0, 142]],
        "config": "model = dict(type='RetinaNet')\noptimizer = dict(lr=0.01)\n",
        "env_info": "sys.platform: linux\nPython: 3.11", "seed": 42, "exp_name": "retina.py",
        "hook_msgs": {"best_score": np.float64(0.371), "best_ckpt": "epoch_12.pth",
                      "last_ckpt": "epoch_12.pth"},
        "np_scalar": np.float32(1.5), "np_int": np.int64(7),
        "np_array": np.arange(6, dtype=np.float32).reshape(2, 3), "bytes": b"\x00\x01xyz",
        "set": {1, 2, 3}, "none": None, "flags": (True, False), "big": 2**70, "neg": -3,
        "float": 0.25, "complex": 1 + 2j, "unicode": "ünïcödé ✓",
    }
    return {"meta": meta, "state_dict": sd}


def test_mmcv_style_meta_with_numpy(tmp_path):
    obj = mmcv_style_checkpoint()
    path = same_bytes_as_torch(tmp_path, obj, "epoch_12.pth")
    back = torch.load(path, weights_only=False)
    assert_equal_values(back, obj)
    assert_equal_values(ckptio.load(path, weights_only=False), obj)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path)  # numpy needs allowlisting, as for torch.save's own file


@pytest.mark.parametrize("name", ["a.b.c.pth", "noext", "ünï.pth", "x.pt", ".pth.tar"])
def test_archive_folder_from_file_name(tmp_path, name):
    path = same_bytes_as_torch(tmp_path, {"w": torch.arange(3)}, name)
    assert_same(torch.load(path), {"w": torch.arange(3)})


def test_file_objects(tmp_path):
    obj = {"w": torch.randn(4, 4), "b": torch.zeros(4, dtype=torch.int64)}
    theirs, ours = io.BytesIO(), io.BytesIO()
    theirs.write(b"prefix")
    ours.write(b"prefix")
    torch.save(obj, theirs)
    ckptio.save(obj, ours)
    assert ours.getvalue() == theirs.getvalue()
    path = tmp_path / "f.pth"
    with open(path, "wb") as f:
        ckptio.save(obj, f)
    assert path.read_bytes() == theirs.getvalue()[6:]
    assert_same(torch.load(path), obj)

    class ShortWrites:
        """A raw stream that takes at most 7 bytes per call."""

        def __init__(self):
            self.buf = bytearray()

        def write(self, b):
            b = bytes(b[:7])
            self.buf += b
            return len(b)

    short = ShortWrites()
    ckptio.save(obj, short)
    assert bytes(short.buf) == theirs.getvalue()[6:]


def test_pathlike_and_many_storages(tmp_path):
    obj = [torch.full((i % 7,), float(i)) for i in range(1500)]
    path = same_bytes_as_torch(tmp_path, obj, "many.pth")
    assert_same(torch.load(path), obj)


def _with_attribute(p):
    p.note = "kept"
    return p


def _with_hook():
    t = torch.ones(3, requires_grad=True)
    t.register_hook(lambda g: g)
    return t


def _tensor_with_attribute():
    t = torch.arange(3.0)
    t.tag = "x"
    return t


def _loaded(obj):
    """obj after a torch.save/torch.load round trip (tensors then carry an
    empty _backward_hooks OrderedDict)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf)


ODD_OBJECTS = {
    "loaded_tensors": lambda: _loaded({"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2)}),
    "requires_grad_tensor": lambda: {"t": torch.ones(3, requires_grad=True) * 2},
    "backward_hook": lambda: {"t": _with_hook()},
    "tensor_attribute": lambda: {"t": _tensor_with_attribute()},
    "v3_dtypes": lambda: {"u16": torch.arange(5, dtype=torch.int32).to(torch.uint16),
                          "f8": torch.zeros(3, dtype=torch.float8_e5m2)},
    "meta": lambda: {"m": torch.empty(3, 4, device="meta")},
    "sparse_coo": lambda: {"s": torch.eye(3).to_sparse()},
    "sparse_csr": lambda: {"s": torch.eye(3).to_sparse_csr()},
    "quantized": lambda: {"q": torch.quantize_per_tensor(torch.arange(4.0), 0.1, 2, torch.quint8)},
    "conj_neg": lambda: {"c": torch.ones(3, dtype=torch.complex64).conj(),
                         "n": torch.ones(3, dtype=torch.complex64).conj().imag},
    "torch_objects": lambda: {"size": torch.Size([2, 3]), "dev": torch.device("cpu"),
                              "dt": torch.float16},
    "storages": lambda: {"u": torch.arange(4).untyped_storage(), "t": torch.arange(4.0).storage(),
                         "legacy": torch.FloatStorage(3)},
    "nested": lambda: {"n": torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])},
    "parameter_attribute": lambda: {"p": _with_attribute(torch.nn.Parameter(torch.ones(2)))},
    "empty_storages": lambda: {"a": torch.empty(0), "b": torch.empty(0), "c": torch.ones(0, 3)},
}


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("kind", sorted(ODD_OBJECTS))
def test_odd_objects_same_bytes(kind):
    obj = ODD_OBJECTS[kind]()
    theirs, ours = io.BytesIO(), io.BytesIO()
    torch.save(obj, theirs)
    ckptio.save(obj, ours)
    assert ours.getvalue() == theirs.getvalue()


def test_skip_data_mode_writes_what_torch_writes(tmp_path):
    obj = {"w": torch.randn(100), "i": torch.arange(10)}
    with torch.serialization.skip_data():
        torch.save(obj, tmp_path / "t.pth")
        ckptio.save(obj, tmp_path / "o.pth")
    with zipfile.ZipFile(tmp_path / "t.pth") as t, zipfile.ZipFile(tmp_path / "o.pth") as o:
        assert [i.filename for i in t.infolist()] == [
            i.filename.replace("o/", "t/", 1) for i in o.infolist()]
        assert o.read("o/data.pkl") == t.read("t/data.pkl")


def test_plain_tensors_are_reduced_in_c(monkeypatch):
    """Plain tensors (fresh, views, loaded from a file) skip torch's Python
    reduction; others (Python attributes here) still take it."""
    calls = []
    original = torch.Tensor._reduce_ex_internal

    def counting(self, proto):
        calls.append(proto)
        return original(self, proto)

    base = torch.arange(12.0).reshape(3, 4)
    obj = {"fresh": base, "view": base.t(), "loaded": _loaded({"x": torch.ones(3)})["x"],
           "grad": torch.ones(2, requires_grad=True) * 3,
           "u16": torch.arange(3, dtype=torch.int32).to(torch.uint16)}
    monkeypatch.setattr(torch.Tensor, "_reduce_ex_internal", counting)
    ckptio.save(obj, io.BytesIO())
    assert calls == []
    ckptio.save({"t": _tensor_with_attribute()}, io.BytesIO())
    assert calls == [2]


def test_data_starting_with_descriptor_signature(tmp_path):
    """torch's writer mistakes such data for a data descriptor when it
    computes the serialization id; the id must still match."""
    raw = torch.tensor(list(b"PK\x07\x08") + [1, 2, 3, 4, 5, 6], dtype=torch.uint8)
    same_bytes_as_torch(tmp_path, {"sig": raw, "other": torch.ones(2)})


def test_torch_save_ckptio_load_ckptio_save_torch_load(tmp_path):
    _, sd = state_dict_with_metadata()
    base = torch.arange(30.0).reshape(5, 6)
    obj = {"state_dict": sd, "view": base[1:3], "base": base, "bf16": torch.randn(3).bfloat16(),
           "f8": torch.randn(4).to(torch.float8_e4m3fn), "meta": {"epoch": 3}}
    first = tmp_path / "first.pth"
    torch.save(obj, first)
    loaded = ckptio.load(first)
    second = tmp_path / "first" / "first.pth"
    second.parent.mkdir()
    ckptio.save(loaded, second)
    assert second.read_bytes() == first.read_bytes()
    assert_same(torch.load(second), torch.load(first))
    assert_equal_values(torch.load(second), obj)


def test_crc_fields_and_zip_validity(tmp_path):
    obj = {"w": torch.randn(1000), "e": torch.empty(0), "i": torch.arange(5)}
    path = tmp_path / "c.pth"
    ckptio.save(obj, path)
    with zipfile.ZipFile(path) as z:
        assert z.testzip() is None
        for info in z.infolist():
            assert info.compress_type == zipfile.ZIP_STORED
            assert (info.header_offset + 30 + len(info.filename)) <= info.header_offset + 30 + 65535


def test_zip64_records_with_a_lowered_threshold(tmp_path):
    """The zip64 paths (extra fields, 24-byte descriptors, 0xFFFFFFFF
    markers) without writing 4 GiB: every size and offset from 1000 bytes
    on is treated as past 32 bits."""
    gen = torch.Generator().manual_seed(3)
    obj = {"small": torch.arange(10), "big": random_tensor((3000,), torch.float32, gen),
           "later": random_tensor((50,), torch.float64, gen), "empty": torch.empty(0)}
    path = tmp_path / "z64.pth"
    save_with(obj, path, zip64_threshold=1000)
    with zipfile.ZipFile(path) as z:
        assert z.testzip() is None
        infos = {i.filename: i for i in z.infolist()}
        assert infos["z64/data/1"].file_size == 12000
        assert infos["z64/data/2"].header_offset > 1000
        raw = path.read_bytes()
        for name in ("z64/data/1", "z64/data/2"):
            h = infos[name].header_offset
            extra_len = int.from_bytes(raw[h + 28:h + 30], "little")
            extra = raw[h + 30 + len(name):h + 30 + len(name) + extra_len]
            assert extra[:2] == b"\x01\x00"  # zip64 block first, then FB padding
            assert extra[4 + int.from_bytes(extra[2:4], "little"):][:2] == b"FB"
        # a 24-byte descriptor follows the big record
        d1 = infos["z64/data/1"]
        start = d1.header_offset + 30 + len(d1.filename) + int.from_bytes(
            raw[d1.header_offset + 28:d1.header_offset + 30], "little")
        assert start % 64 == 0
        desc = raw[start + 12000:start + 12000 + 24]
        assert desc[:4] == b"PK\x07\x08"
        assert int.from_bytes(desc[8:16], "little") == 12000 == int.from_bytes(desc[16:], "little")
    check_reads_back(path, obj)


class CrcSink:
    """A file object that keeps only the length and CRC-32 of what it is
    given: two writers' outputs compared without storing them."""

    def __init__(self):
        self.size = 0
        self.crc = 0

    def write(self, b):
        m = memoryview(b)
        self.crc = _native.crc32(m, self.crc)
        self.size += m.nbytes
        return m.nbytes

    def flush(self):
        pass


def test_past_4_gib_same_bytes_as_torch_without_disk_or_memory():
    """A 4 GiB + 16 byte storage (fresh, never-touched memory: the kernel's
    zero page, so no RAM is used) followed by a small one: real zip64 sizes,
    offsets and end records. Both writers stream to a sink that keeps only a
    CRC of everything, so no disk is used either."""
    try:
        big = torch.empty(2**32 + 16, dtype=torch.uint8)
    except RuntimeError:
        pytest.skip("cannot reserve 4 GiB of address space")
    obj = {"big": big, "small": torch.arange(5)}
    theirs, ours = CrcSink(), CrcSink()
    torch.save(obj, theirs)
    ckptio.save(obj, ours)
    assert ours.size == theirs.size > 2**32
    assert ours.crc == theirs.crc


def test_storage_alignment_records(tmp_path):
    path = same_bytes_as_torch(tmp_path, {"a": torch.ones(3)})
    raw = path.read_bytes()
    with zipfile.ZipFile(path) as z:
        assert z.read("ckpt/.format_version") == b"1"
        assert z.read("ckpt/.storage_alignment") == b"64"
        assert z.read("ckpt/byteorder") == sys.byteorder.encode()
        assert z.read("ckpt/version") == b"3\n"
        for info in z.infolist():
            h = info.header_offset
            start = h + 30 + int.from_bytes(raw[h + 26:h + 28], "little") + int.from_bytes(
                raw[h + 28:h + 30], "little")
            assert start % 64 == 0, info.filename


def test_torch_computes_the_same_storage_offsets(tmp_path):
    """torch's calculate_storage_offsets (mmap loads that compute each
    storage's offset from the previous one, as miniz lays them out) finds
    every storage in our files."""
    from torch.utils.serialization import config

    gen = torch.Generator().manual_seed(5)
    obj = {f"t{i}": random_tensor((i * 37 % 300,), torch.float32, gen) for i in range(40)}
    obj["empty"] = torch.empty(0)
    obj["after"] = torch.arange(7)
    path = tmp_path / "offsets.pth"
    ckptio.save(obj, path)
    old = config.load.calculate_storage_offsets
    config.load.calculate_storage_offsets = True
    try:
        back = torch.load(path, mmap=True)
    finally:
        config.load.calculate_storage_offsets = old
    assert_equal_values(back, obj)


@pytest.mark.parametrize("setting", [("storage_alignment", 4096), ("storage_alignment", 1),
                                     ("compute_crc32", False)], ids=str)
def test_torch_save_config_is_followed(tmp_path, setting):
    from torch.utils.serialization import config

    name, value = setting
    old = getattr(config.save, name)
    setattr(config.save, name, value)
    try:
        path = same_bytes_as_torch(tmp_path, {"w": torch.randn(100), "e": torch.empty(0),
                                              "i": torch.arange(3)})
    finally:
        setattr(config.save, name, old)
    assert_equal_values(torch.load(path, mmap=True)["i"], torch.arange(3))


def test_crc32_implementations():
    import zlib

    data = os.urandom(100_000)
    assert _native.crc32(data) == zlib.crc32(data)
    assert _native.crc32(data[500:], _native.crc32(data[:500])) == zlib.crc32(data)


# ---- errors and atomicity -----------------------------------------------------------------

def test_same_memory_as_two_dtypes_is_refused_like_torch(tmp_path):
    t = torch.zeros(4)
    obj = {"f": t, "i": t.view(torch.int32)}
    with pytest.raises(RuntimeError, match="view the same data as different types") as theirs:
        torch.save(obj, tmp_path / "t.pth")
    with pytest.raises(RuntimeError, match="view the same data as different types"):
        ckptio.save(obj, tmp_path / "o.pth")
    assert str(theirs.value)
    assert not (tmp_path / "o.pth").exists()


def leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if ".ckptio-" in p.name)


def test_unpicklable_object_leaves_no_file(tmp_path):
    target = tmp_path / "x.pth"
    with pytest.raises((pickle.PicklingError, AttributeError), match="lambda"):
        ckptio.save({"f": lambda: 0, "w": torch.ones(2)}, target)
    assert not target.exists()
    ckptio.save({"w": torch.ones(2)}, target)
    before = target.read_bytes()
    with pytest.raises((pickle.PicklingError, AttributeError)):
        ckptio.save({"f": lambda: 0}, target)
    assert target.read_bytes() == before
    assert leftovers(tmp_path) == []


class Interrupts:
    def __reduce__(self):
        raise KeyboardInterrupt


def test_keyboard_interrupt_while_pickling_keeps_old_file(tmp_path):
    target = tmp_path / "x.pth"
    ckptio.save({"w": torch.ones(2)}, target)
    before = target.read_bytes()
    with pytest.raises(KeyboardInterrupt):
        ckptio.save({"w": torch.zeros(10), "bad": Interrupts()}, target)
    assert target.read_bytes() == before
    assert leftovers(tmp_path) == []


def test_interrupt_while_writing_to_a_file_object():
    class Interrupting:
        def __init__(self):
            self.calls = 0

        def write(self, b):
            self.calls += 1
            if self.calls == 3:
                raise KeyboardInterrupt
            return len(b)

    sink = Interrupting()
    with pytest.raises(KeyboardInterrupt):
        ckptio.save({f"t{i}": torch.randn(300_000) for i in range(8)}, sink)
    assert sink.calls == 3


def test_missing_directory_and_directory_target(tmp_path):
    with pytest.raises(FileNotFoundError):
        ckptio.save({"w": torch.ones(2)}, tmp_path / "nope" / "x.pth")
    with pytest.raises(ckptio.CheckpointError):
        ckptio.save({"w": torch.ones(2)}, str(tmp_path) + "/")
    with pytest.raises(AttributeError):
        ckptio.save({"w": torch.ones(2)}, 42)


def test_undecodable_file_name(tmp_path):
    name = os.fsdecode(b"ckpt-\xff.pth")
    target = os.path.join(os.fsencode(str(tmp_path)), b"ckpt-\xff.pth")
    ckptio.save({"w": torch.arange(3)}, os.path.join(str(tmp_path), name))
    back = torch.load(target.decode("utf-8", "surrogateescape"))
    assert_equal_values(back, {"w": torch.arange(3)})
    assert os.path.exists(target)


def test_tensor_bytes_are_not_copied(tmp_path):
    """Peak memory of a save (in a child process, after resetting its
    high-water mark) stays far below the size of the tensors written."""
    target = tmp_path / "big.pth"
    child = run_child(f"""
        import torch, ckptio
        t = torch.ones(32 << 20)  # 128 MiB, touched
        def status():
            with open("/proc/self/status") as f:
                return {{l.split(":")[0]: int(l.split()[1]) * 1024
                        for l in f if l.startswith("Vm")}}
        base = status()["VmRSS"]
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        ckptio.save({{"t": t}}, {str(target)!r}, fsync=False)
        print(status()["VmHWM"] - base)
    """, stdout=subprocess.PIPE, text=True)
    out, _ = child.communicate(timeout=120)
    assert child.returncode == 0
    extra = int(out.split()[-1])
    assert extra < (16 << 20), f"{extra} extra bytes for a 128 MiB tensor"
    assert target.stat().st_size > 128 << 20


def test_symbolic_link_target_is_followed(tmp_path):
    real = tmp_path / "real" / "epoch_3.pth"
    real.parent.mkdir()
    real.write_bytes(b"old")
    link = tmp_path / "latest.pth"
    link.symlink_to(real)
    obj = {"w": torch.arange(4)}
    ckptio.save(obj, link)
    assert link.is_symlink()
    theirs = tmp_path / "theirs" / "latest.pth"
    theirs.parent.mkdir()
    torch.save(obj, theirs)
    assert real.read_bytes() == theirs.read_bytes()  # folder "latest", as torch names it


def test_permissions_of_an_existing_target_are_kept(tmp_path):
    target = tmp_path / "x.pth"
    target.write_bytes(b"old")
    os.chmod(target, 0o640)
    ckptio.save({"w": torch.ones(2)}, target)
    assert (os.stat(target).st_mode & 0o777) == 0o640
    fresh = tmp_path / "y.pth"
    ckptio.save({"w": torch.ones(2)}, fresh)
    umask = os.umask(0)
    os.umask(umask)
    assert (os.stat(fresh).st_mode & 0o777) == 0o666 & ~umask


def run_child(code, **kwargs):
    # the ckptio under test (the source tree, or the installed wheel)
    pkg_root = os.path.dirname(os.path.dirname(ckptio.__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([pkg_root, HERE]))
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env, **kwargs)


def test_file_size_limit_gives_a_clear_error_and_keeps_the_old_file(tmp_path):
    target = tmp_path / "x.pth"
    ckptio.save({"old": torch.arange(10)}, target)
    before = target.read_bytes()
    child = run_child(f"""
        import errno, resource, torch, ckptio
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
        try:
            ckptio.save({{"new": torch.zeros(1_000_000)}}, {str(target)!r})
        except OSError as e:
            assert e.errno == errno.EFBIG, e
            print("EFBIG", e)
        else:
            print("no error")
    """, stdout=subprocess.PIPE, text=True)
    out, _ = child.communicate(timeout=120)
    assert child.returncode == 0
    assert out.startswith("EFBIG") and "File too large" in out, out
    assert target.read_bytes() == before
    assert leftovers(tmp_path) == []


def test_sigkill_during_saves_never_tears_the_target(tmp_path):
    """A forked child saves alternately two different checkpoints over one
    target in a loop; killed at random moments, the target is always one of
    the two complete files, and the next save clears any temporary file a
    killed save left."""
    target = tmp_path / "ckpt.pth"
    versions = []
    for v in range(2):
        gen = torch.Generator().manual_seed(v)
        versions.append({"v": v, "w": random_tensor((1_000_000,), torch.float32, gen)})
    ckptio.save(versions[0], target)
    rng = np.random.default_rng(0)
    for attempt in range(20):
        pid = os.fork()
        if pid == 0:  # child: save until killed
            try:
                i = 0
                while True:
                    ckptio.save(versions[i % 2], target, fsync=False)
                    i += 1
            finally:
                os._exit(1)
        time.sleep(float(rng.uniform(0.0, 0.1)))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status)
        back = torch.load(target)
        assert back["v"] in (0, 1)
        assert_equal_values(back, versions[back["v"]])
    ckptio.save(versions[1], target, fsync=False)
    assert leftovers(tmp_path) == []
    assert_equal_values(torch.load(target), versions[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_same_bytes_as_torch(tmp_path):
    gen = torch.Generator().manual_seed(2)
    cpu = {"w": random_tensor((1000, 100), torch.float32, gen),
           "h": random_tensor((64,), torch.float16, gen)}
    obj = {k: v.cuda() for k, v in cpu.items()}
    obj["view"] = obj["w"][10:20]
    obj["cpu"] = cpu["h"]
    path = same_bytes_as_torch(tmp_path, obj)
    back = torch.load(path, map_location="cpu")
    assert_equal_values(back["w"], cpu["w"])
    assert torch.load(path)["w"].device.type == "cuda"


def test_to_cpu_hook_is_not_called_for_cpu_storages(tmp_path):
    calls = []
    save_with({"w": torch.ones(3)}, tmp_path / "x.pth", to_cpu=lambda s: calls.append(s) or s)
    assert calls == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_to_cpu_hook_batches_device_storages(tmp_path):
    obj = {"a": torch.ones(3, device="cuda"), "b": torch.zeros(2, device="cuda"),
           "c": torch.arange(3)}
    calls = []

    def to_cpu(storages):
        calls.append(len(storages))
        return [s.cpu() for s in storages]

    path = same_bytes_as_torch(tmp_path, obj)
    save_with(obj, path, to_cpu=to_cpu)
    assert calls == [2]
    assert path.read_bytes() == (tmp_path / "torch" / "ckpt.pth").read_bytes()
    with pytest.raises(ValueError):
        save_with(obj, path, to_cpu=lambda s: s[:1])


# ---- an independent old reader ----------------------------------------------------------

OLD_TORCH = "/usr/bin/python3"


def _old_torch_available():
    try:
        out = subprocess.run([OLD_TORCH, "-c", "import torch"], capture_output=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0


@pytest.mark.skipif(not _old_torch_available(),
                    reason="Debian's python3-torch (1.13) not installed")
def test_torch_1_13_reads_our_files(tmp_path):
    _, sd = state_dict_with_metadata()
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    obj = {"state_dict": sd, "view": base[1:4, 2:7], "base": base, "half": torch.randn(5).half(),
           "bf16": torch.randn(5).bfloat16(), "bool": torch.tensor([True, False]),
           "p": torch.nn.Parameter(torch.randn(2, 2)), "meta": {"epoch": 3, "CLASSES": ("a", "b")}}
    path = tmp_path / "ours.pth"
    ckptio.save(obj, path)
    check = f"""
import torch
obj = torch.load({str(path)!r})
sd = obj["state_dict"]
assert list(sd.keys()) == {list(sd.keys())!r}, list(sd.keys())
assert sd._metadata is not None
assert obj["view"].tolist() == {obj["view"].tolist()!r}
assert obj["view"].storage().data_ptr() == obj["base"].storage().data_ptr()
assert obj["half"].dtype == torch.float16 and obj["bf16"].dtype == torch.bfloat16
assert isinstance(obj["p"], torch.nn.Parameter) and obj["p"].requires_grad
assert obj["meta"] == {{"epoch": 3, "CLASSES": ("a", "b")}}
for k, v in sd.items():
    assert v.sum().item() == v.sum().item()
print("ok", sum(float(v.double().sum()) for v in sd.values()))
"""
    out = subprocess.run([OLD_TORCH, "-c", check], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    expected = sum(float(v.double().sum()) for v in sd.values())
    assert abs(float(out.stdout.split()[1]) - expected) < 1e-6


def test_concurrent_saves_from_threads(tmp_path):
    """Saves on several threads (the GIL is released while writing) each
    produce torch's bytes, and SIGXFSZ is left as it was found."""
    import threading

    before = signal.getsignal(signal.SIGXFSZ)
    objs = [{"w": torch.full((200_000,), float(i)), "i": i} for i in range(6)]
    errors = []

    def work(i):
        try:
            for _ in range(3):
                ckptio.save(objs[i], tmp_path / f"t{i}.pth", fsync=False)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for i in range(6):
        buf = tmp_path / "torch" / f"t{i}.pth"
        buf.parent.mkdir(exist_ok=True)
        torch.save(objs[i], buf)
        assert (tmp_path / f"t{i}.pth").read_bytes() == buf.read_bytes()
    assert signal.getsignal(signal.SIGXFSZ) == before

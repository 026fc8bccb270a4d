"""Hostile input, second round (issue 9), load side: each case against
torch.load on the same bytes where torch reads them, and through every entry
point that decodes a file (ckptio.load, ckptio.verify, `ckptio info`)."""
import io
import struct
import os
import pathlib
import subprocess
import sys
import warnings

import pytest
import torch

import ckptio
from helpers import assert_same

ROOT = pathlib.Path(__file__).resolve().parent.parent
ATTACKS = ROOT / "tests" / "attacks"
QUANTIZED = ["QInt8Storage", "QUInt8Storage", "QInt32Storage", "QUInt4x2Storage",
             "QUInt2x4Storage"]


def _cli(*argv):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "ckptio", *map(str, argv)], env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("name", [f"quantized_{s}_{v}.pt" for s in QUANTIZED for v in ("v2", "v3")]
                         + ["quantized_dtype_over_float_v3.pt", "quantized_v1.pt"])
def test_plain_rebuild_over_quantized_storage(name):
    """Was a SIGSEGV (a NULL template tensor) in load, verify and info."""
    path = ATTACKS / name
    with pytest.raises(ckptio.CheckpointError, match=r"quantized dtype torch\.q") as exc:
        ckptio.load(path)
    assert str(path) in str(exc.value)
    # torch.load returns a quantized tensor without a quantizer: any use of it
    # fails with an internal assert; ckptio refuses the file instead
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "quantized ... deprecated", once per process
        broken = torch.load(path)["w"]
    with pytest.raises(RuntimeError, match="INTERNAL ASSERT|quantizer|Quantizer"):
        repr(broken)
    report = ckptio.verify(path)
    assert not report.ok and "quantized" in str(report.problems)


@pytest.mark.parametrize("name", ["quantized_QInt8Storage_v2.pt", "quantized_QInt32Storage_v3.pt"])
def test_cli_over_quantized_storage(name):
    """`ckptio verify` reports the file (exit 1); `ckptio info` (a scan that
    builds no tensor) describes it; neither crashes."""
    proc = _cli("verify", ATTACKS / name)
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    assert "quantized" in proc.stdout + proc.stderr
    proc = _cli("info", ATTACKS / name)
    assert proc.returncode in (0, 1), (proc.returncode, proc.stderr[-2000:])
    assert "Tensor q" in proc.stdout


def test_real_quantized_tensors_still_load(tmp_path):
    q = torch.quantize_per_tensor(torch.randn(6), 0.1, 3, torch.qint8)
    qc = torch.quantize_per_channel(torch.randn(2, 3), torch.tensor([0.1, 0.2]),
                                    torch.tensor([0, 1]), 0, torch.quint8)
    path = tmp_path / "q.pth"
    torch.save({"q": q, "qc": qc}, path)
    got, want = ckptio.load(path), torch.load(path)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k].int_repr(), want[k].int_repr())
        assert got[k].qscheme() == want[k].qscheme()


def test_storage_record_larger_than_its_storage():
    path = ATTACKS / "storage_record_larger.pt"
    with pytest.raises(RuntimeError, match="does not match expected size"):
        torch.load(path)  # torch.load refuses it (mmap=False, its default)
    for mmap in (True, False):
        with pytest.raises(ckptio.CheckpointError, match="claims 8 bytes but its record holds 16"):
            ckptio.load(path, mmap=mmap)
    assert not ckptio.verify(path).ok


def test_legacy_view_chain_matches_torch():
    """20,000 views, each of the previous one: was a C stack overflow."""
    path = ATTACKS / "legacy_view_chain.pt"
    got, want = ckptio.load(path), torch.load(path)
    assert_same(got["w"], want["w"])
    assert len(got["views"]) == len(want["views"]) == 19_999
    assert type(got["views"][0]) is type(want["views"][0]) is torch.storage.TypedStorage
    assert got["views"][-1].tolist() == want["views"][-1].tolist() == [1.0, 2.0, 3.0, 4.0]


def test_view_of_a_view_is_placed_inside_the_root(tmp_path):
    """A view at an offset inside a view at an offset: the offsets add up."""
    x = torch.arange(16, dtype=torch.float32)
    buf = io.BytesIO()
    torch.save({"a": x[2:14], "b": x[2:14][3:9]}, buf, _use_new_zipfile_serialization=False)
    got, want = ckptio.load(buf.getvalue()), torch.load(io.BytesIO(buf.getvalue()))
    for k in want:
        assert_same(got[k], want[k])


def test_zip_name_collisions_load():
    """100,000 names colliding in FNV-1a's low bits: 29 s before the sorted
    index; the watchdog of test_attacks bounds it, this checks the result."""
    path = ATTACKS / "zip_name_collisions.pt"
    got = ckptio.load(path)
    assert_same(got["w"], torch.load(path)["w"])


# ---- storages reach Python code and results as torch's TypedStorages -------

def _u(s):
    b = s.encode()
    return b"X" + len(b).to_bytes(4, "little") + b


_PID = (b"(" + _u("storage") + b"ctorch\nFloatStorage\n" + _u("0") + _u("cpu") + b"K\x04tQ")
_OD = b"ccollections\nOrderedDict\n)R"


def _archive(pkl):
    buf = io.BytesIO()
    import zipfile

    with zipfile.ZipFile(buf, "w") as z:
        for name, data in (("data.pkl", pkl), ("byteorder", b"little"),
                           ("data/0", struct.pack("<4f", 1, 2, 3, 4)), ("version", b"3\n")):
            z.writestr(f"archive/{name}", data)
    return buf.getvalue()


def _v2(hooks=_OD, requires_grad=b"\x89"):
    return (b"ctorch._utils\n_rebuild_tensor_v2\n(" + _PID + b"K\x00(K\x04t(K\x01t" + requires_grad
            + hooks + b"tR")


def _both(pkl):
    data = _archive(pkl)
    return ckptio.load(data), torch.load(io.BytesIO(data))


def _is_storage(x):
    return type(x) is torch.storage.TypedStorage and x.tolist() == [1.0, 2.0, 3.0, 4.0]


def test_memoized_argument_tuple_in_the_result():
    """torch.save memoizes a tensor's argument tuple; a GET of it gives a
    tuple holding the TypedStorage, not ckptio's StorageRef."""
    pkl = (b"\x80\x02}(" + _u("w") + b"ctorch._utils\n_rebuild_tensor_v2\n(" + _PID
           + b"K\x00(K\x04t(K\x01t\x89" + _OD + b"tq\x07R" + _u("args") + b"h\x07u.")
    got, want = _both(pkl)
    assert_same(got["w"], want["w"])
    assert type(got["args"]) is tuple and _is_storage(got["args"][0]) and _is_storage(want["args"][0])
    assert got["args"][0] is got["args"][0] and got["args"][2:] == want["args"][2:]


def test_storage_in_backward_hooks():
    hooks = b"ccollections\nOrderedDict\n)R}K\x00" + _PID + b"sb"  # OrderedDict({0: storage})
    got, want = _both(b"\x80\x02}(" + _u("w") + _v2(hooks=_OD[:-2] + b")R" + b"K\x00" + _PID + b"s")
                      + b"u.")
    assert _is_storage(want["w"]._backward_hooks[0])
    assert _is_storage(got["w"]._backward_hooks[0])
    del hooks
    got, want = _both(b"\x80\x02}(" + _u("w") + _v2(hooks=_PID) + b"u.")  # the hooks are a storage
    assert _is_storage(want["w"]._backward_hooks) and _is_storage(got["w"]._backward_hooks)


def test_storage_in_parameter_state():
    state = b"}(" + _u("extra") + _PID + b"u"
    pkl = (b"\x80\x02}(" + _u("p") + b"ctorch._utils\n_rebuild_parameter_with_state\n(" + _v2()
           + b"\x88" + _OD + state + b"tRu.")
    got, want = _both(pkl)
    assert type(got["p"]) is type(want["p"]) is torch.nn.Parameter
    assert _is_storage(want["p"].extra) and _is_storage(got["p"].extra)


def test_storage_in_rebuild_from_type_v2_state():
    state = b"}(" + _u("extra") + _PID + b"u"
    inner = (b"ctorch._utils\n_rebuild_tensor_v2\n(" + _PID + b"K\x00(K\x04t(K\x01t\x89" + _OD + b"t")
    pkl = (b"\x80\x02}(" + _u("t") + b"ctorch._tensor\n_rebuild_from_type_v2\n(ctorch._utils\n"
           b"_rebuild_tensor_v2\nctorch\nTensor\n" + inner[len(b"ctorch._utils\n_rebuild_tensor_v2\n"):]
           + state + b"tRu.")
    got, want = _both(pkl)
    assert_same(got["t"], want["t"])
    assert _is_storage(want["t"].extra) and _is_storage(got["t"].extra)


@pytest.mark.parametrize("value", [b"K\x01", b"N", _u("yes"), b"\x88"])
def test_requires_grad_must_be_a_bool(value):
    if value == b"\x88":  # True
        got, want = _both(b"\x80\x02}(" + _u("w") + _v2(requires_grad=value) + b"u.")
        assert got["w"].requires_grad and want["w"].requires_grad
        return
    data = _archive(b"\x80\x02}(" + _u("w") + _v2(requires_grad=value) + b"u.")
    with pytest.raises(RuntimeError, match="requires_grad must be a bool"):
        torch.load(io.BytesIO(data))
    with pytest.raises(ckptio.CheckpointError, match="requires_grad must be a bool"):
        ckptio.load(data)
    param = (b"\x80\x02}(" + _u("p") + b"ctorch._utils\n_rebuild_parameter\n(" + _v2() + value
             + _OD + b"tRu.")
    with pytest.raises(TypeError, match="must be bool"):
        torch.load(io.BytesIO(_archive(param)))
    with pytest.raises(ckptio.CheckpointError, match="requires_grad must be a bool"):
        ckptio.load(_archive(param))


def test_storage_reference_never_in_the_result():
    """Wherever a storage goes (lists, dicts, sets, nested tuples, the memo,
    the result itself), torch's TypedStorage arrives, one object per storage."""
    pkl = (b"\x80\x02" + _PID + b"q\x00" + b"}(" + _u("list") + b"]h\x00a" + _u("deep")
           + b"h\x00\x85\x85\x85" + _u("key") + b"}h\x00\x85K\x01s" + _u("top") + b"h\x00u.")
    got, want = _both(pkl)
    assert _is_storage(got["list"][0]) and _is_storage(got["deep"][0][0][0])
    assert _is_storage(next(iter(got["key"]))[0]) and _is_storage(got["top"])
    assert got["list"][0] is got["deep"][0][0][0] is got["top"]
    assert type(want["list"][0]) is type(got["list"][0])


# ---- memory: the bound holds for builders too, and real files fit in it ----

BUILDER_ATTACKS = ["bytearray_huge.pt", "device_tensor_stride0.pt", "legacy_tensor_ctor_huge.pt",
                   "tensor_newobj_huge.pt", "untyped_storage_huge.pt", "qtensor_size_huge.pt",
                   "from_type_v2_bytearray.pt", "sparse_stride0_values.pt",
                   "iterate_tensor_set.pt", "iterate_tensor_counter.pt", "iterate_tensor_size.pt",
                   "iterate_tensor_bytearray.pt"]


def test_builders_refused_before_they_allocate():
    """torch.load allocates 1 GiB to 16 GiB (or iterates 2**27 tensors) for
    each of these few-hundred-byte files; ckptio refuses each before the
    call. Measured as the high-water RSS of a child process (torch's
    allocator is outside tracemalloc's view; VmHWM, because ru_maxrss carries
    the parent's peak across exec and would hide a child's)."""
    code = (
        "import sys, ckptio\n"
        "def hwm():\n"
        "    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM'))\n"
        "base = hwm()\n"
        "for name in sys.argv[1:]:\n"
        "    try:\n"
        "        ckptio.load(name)\n"
        "        print('loaded', name); sys.exit(3)\n"
        "    except ckptio.CheckpointError as exc:\n"
        "        assert name in str(exc) and ('allocate' in str(exc) or 'element by element' in str(exc)), exc\n"
        "print((hwm() - base) // 1024)\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", code, *[str(ATTACKS / n) for n in BUILDER_ATTACKS]],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]



def test_newobj_of_empty_builders_is_free():
    """NEWOBJ calls __new__, which for bytearray, set, Counter, OrderedDict
    makes an empty object whatever the arguments (as in torch)."""
    got = ckptio.load(ATTACKS / "bytearray_newobj.pt")
    assert got == bytearray() == torch.load(ATTACKS / "bytearray_newobj.pt")


@pytest.mark.parametrize("kind", ["ints", "floats", "str_keys", "small_dicts", "tuples", "lists",
                                  "empty_dicts", "sets", "optimizer", "deflated"])
def test_pickle_heavy_files_fit_the_bound(kind, tmp_path):
    """Real files whose bytes are nearly all pickle load (well inside 64x),
    with torch.load's result."""
    import collections
    import zipfile

    n = 50_000
    obj = {
        "ints": lambda: list(range(n)),
        "floats": lambda: [i / 3 for i in range(n)],
        "str_keys": lambda: {f"key{i}": float(i) for i in range(n)},
        "small_dicts": lambda: [{"a": i, "b": 2.0} for i in range(n)],
        "tuples": lambda: [(i, i + 1) for i in range(n)],
        "lists": lambda: [[] for _ in range(n)],
        "empty_dicts": lambda: [{} for _ in range(n)],
        "sets": lambda: [{i} for i in range(n // 5)],
        "optimizer": lambda: {"state": {i: {"step": torch.tensor(1.0), "m": torch.zeros(3)}
                                        for i in range(2000)},
                              "param_groups": [{"lr": 0.1, "params": list(range(2000))}]},
        "deflated": lambda: collections.OrderedDict((f"k{i}", [i, str(i)]) for i in range(n)),
    }[kind]()
    path = tmp_path / "x.pth"
    torch.save(obj, path)
    if kind == "deflated":  # re-zipped: the file is smaller than its pickle
        data = io.BytesIO()
        with zipfile.ZipFile(path) as src, zipfile.ZipFile(data, "w", zipfile.ZIP_DEFLATED) as z:
            for info in src.infolist():
                z.writestr(info.filename, src.read(info))
        path.write_bytes(data.getvalue())
    got, want = ckptio.load(path), torch.load(path)
    if kind == "optimizer":
        assert_same(got, want)
    else:
        assert got == want and type(got) is type(want)


# ---- verify ------------------------------------------------------------------

def test_verify_checks_storages_of_a_large_deflated_pickle():
    """A deflated archive whose data.pkl holds a 600 KB blob and whose tensor
    record is cut in half: data.pkl was inflated twice and the second time
    did not fit the limit, so the storage checks were skipped. Now it is
    inflated once, and the short record is a 'storage' problem of the C
    checks themselves (before the loader runs)."""
    path = ATTACKS / "verify_deflated_half_record.pt"
    report = ckptio.verify(path)
    # 'storage' from the C checks; the loader's run would say 'load'
    assert [p.kind for p in report.problems] == ["storage"], report.problems
    assert "claims 4096 bytes but its record holds 2048" in report.problems[0].message
    with pytest.raises(ckptio.CheckpointError, match="claims 4096 bytes"):
        ckptio.load(path, verify=True)


def test_verify_reports_a_pickle_it_cannot_inflate():
    """Never clean when the storages could not be checked."""
    path = ATTACKS / "zip_deflate_pickle_bomb.pt"
    report = ckptio.verify(path)
    assert not report.ok
    assert any(p.kind == "limit" and "storages cannot be checked" in p.message
               for p in report.problems)


def _latin1_legacy_file(tmp_path):
    """A legacy (pre-1.6 layout) file whose pickle holds a Python 2 byte
    string that is not UTF-8, as Python 2 torch wrote them."""
    buf = io.BytesIO()
    torch.save({"w": torch.arange(3.0), "name": "PLACEHOLDER"}, buf,
               _use_new_zipfile_serialization=False, pickle_protocol=2)
    data = buf.getvalue()
    placeholder = b"X" + struct.pack("<I", 11) + b"PLACEHOLDER"
    assert data.count(placeholder) == 1
    data = data.replace(placeholder, b"U\x04caf\xe9")  # SHORT_BINSTRING b'caf\xe9'
    path = tmp_path / "py2.pt"
    path.write_bytes(data)
    return path


def test_verify_honours_the_encoding(tmp_path):
    path = _latin1_legacy_file(tmp_path)
    want = torch.load(path, encoding="latin1")
    assert want["name"] == "caf\xe9"
    got = ckptio.load(path, encoding="latin1")
    assert got["name"] == "caf\xe9" and torch.equal(got["w"], want["w"])
    with pytest.raises(ckptio.CheckpointError, match="utf-8|decode"):
        ckptio.load(path)  # torch too: 'utf-8' codec can't decode
    assert not ckptio.verify(path).ok
    report = ckptio.verify(path, encoding="latin1")
    assert report.ok, report.problems
    assert ckptio.load(path, encoding="latin1", verify=True)["name"] == "caf\xe9"
    assert ckptio.verify(path, encoding="bytes").ok
    # the same string in a zip archive: the C checks decode it as asked too
    zpath = tmp_path / "z.pt"
    buf = io.BytesIO()
    torch.save({"w": torch.arange(3.0), "name": "PLACEHOLDER"}, buf)
    import zipfile

    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as src, zipfile.ZipFile(zpath, "w") as z:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("data.pkl"):
                data = data.replace(b"X" + struct.pack("<I", 11) + b"PLACEHOLDER", b"U\x04caf\xe9")
            z.writestr(info, data)
    assert torch.load(zpath, encoding="latin1")["name"] == "caf\xe9"
    assert not ckptio.verify(zpath).ok
    assert ckptio.verify(zpath, encoding="latin1").ok


def test_failed_load_leaves_no_sparse_tensor_to_validate():
    """With torch's sparse invariant checks on, a sparse tensor rebuilt by a
    load that then failed was validated by the next load, of another file
    (a bare RuntimeError there); an invalid one in the file itself is a
    CheckpointError naming it."""
    import torchspace as ts

    ar = ts.Archive()
    indices = ts._long_tensor(ar, "i", [100] * 16, (1, 16))  # out of range for size (4,)
    layout = ts.call("torch.serialization", "_get_layout", ts.text("torch.sparse_coo"))
    value = ts.call("torch._utils", "_rebuild_sparse_tensor", layout,
                    b"(" + indices + ts._v2(ar, ("torch", "FloatStorage", torch.float32))
                    + ts.ints((4,)) + b"t")
    failing = ar.zip(b"\x80\x02}(" + ts.text("s") + value + b"\xff")
    invalid = ar.zip(b"\x80\x02}(" + ts.text("s") + value + b"u.")
    good = io.BytesIO()
    torch.save({"x": torch.zeros(2)}, good)
    with torch.sparse.check_sparse_tensor_invariants():
        with pytest.raises(ckptio.UnpicklingError, match="opcode"):
            ckptio.load(failing)
        assert torch.equal(ckptio.load(good.getvalue())["x"], torch.zeros(2))
        with pytest.raises(ckptio.CheckpointError, match=r"<bytes of \d+ bytes>: a sparse tensor"):
            ckptio.load(invalid)
        with pytest.raises(RuntimeError, match="size is inconsistent with indices"):
            torch.load(io.BytesIO(invalid))


def test_nested_encode_stays_inside_the_bound(tmp_path):
    """_codecs.encode(..., 'hex') nested 30 deep over a 1 MiB string: each
    call doubles its input (torch.load is killed for memory). Each call is
    charged before it runs, so the peak stays inside 64x the file + 4 MiB;
    the result is refused either by the budget or, once _codecs.encode
    takes only (str, 'latin1'), by the allowlist."""
    import tracemalloc

    body = b"c_codecs\nencode\n(" + _u("a" * (1 << 20)) + _u("latin1") + b"tR"
    for _ in range(30):
        body = b"c_codecs\nencode\n(" + body + _u("hex") + b"tR"
    path = tmp_path / "hex.pt"
    path.write_bytes(_archive(b"\x80\x02" + body + b"."))
    ckptio.load(_archive(b"\x80\x02" + b"N."))  # configured before measuring
    tracemalloc.start()
    try:
        with pytest.raises(ckptio.CheckpointError) as info:
            ckptio.load(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(path) in str(info.value)
    size = path.stat().st_size
    assert peak <= 64 * size + (4 << 20), (peak, size)


@pytest.mark.parametrize("keys", ["ints", "tuples", "frozensets", "set_items", "set_call"])
def test_keys_whose_hashes_a_file_chooses_are_capped(keys):
    """Tuples, frozensets, complex numbers and ints beyond 61 bits hash
    without a key: a file can make thousands of them collide. At most 4096
    of them per load (weights_only); a dict of 4000 tuple keys loads."""
    def key(i):
        return {"ints": lambda: (b"\x8a\x0a" + (i * ((1 << 61) - 1) + 7).to_bytes(10, "little")),
                "tuples": lambda: b"K\x01J" + struct.pack("<i", i) + b"\x86",
                "frozensets": lambda: b"(J" + struct.pack("<i", i) + b"\x91",
                "set_items": lambda: b"K\x01J" + struct.pack("<i", i) + b"\x86",
                "set_call": lambda: b"K\x01J" + struct.pack("<i", i) + b"\x86"}[keys]()

    def pickle_of(n):
        if keys == "set_items":
            return b"\x80\x04\x8f(" + b"".join(key(i) for i in range(n)) + b"\x90."
        if keys == "set_call":
            return (b"\x80\x02cbuiltins\nset\n](" + b"".join(key(i) for i in range(n))
                    + b"e\x85R.")
        return b"\x80\x04}(" + b"".join(key(i) + b"N" for i in range(n)) + b"u."

    small = _archive(pickle_of(4000))
    assert len(ckptio.load(small)) == 4000
    if keys not in ("frozensets", "set_items"):  # opcodes torch's weights-only reader lacks
        assert len(torch.load(io.BytesIO(small))) == 4000
    with pytest.raises(ckptio.CheckpointError, match="more than 4096 dict keys or set items"):
        ckptio.load(_archive(pickle_of(5000)))
    assert len(ckptio.load(_archive(pickle_of(5000)), weights_only=False)) == 5000  # trusted




def test_large_version_record_is_not_copied(tmp_path):
    """The small records (version, byteorder) are copied by pread so that a
    cold open does not fault the mapping around them; a file-sized one stays
    in the mapping (only its first page is read), so it costs no file-sized
    copy. Measured as the high-water RSS of a child process (VmHWM: its own
    address space, where ru_maxrss would carry the parent's peak across
    exec), after a first load has imported what loading needs."""
    import zipfile

    pkl = b"\x80\x02}q\x00X\x01\x00\x00\x00aK\x01s."
    for name, pad in (("small.pth", 0), ("big-version.pth", 256 << 20)):
        with zipfile.ZipFile(tmp_path / name, "w") as z:
            for rec, data in (("data.pkl", pkl), ("byteorder", b"little"),
                              ("version", b"3\n" + b" " * pad)):
                z.writestr(f"archive/{rec}", data)
    code = (
        "import sys, ckptio\n"
        "def hwm():\n"
        "    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM'))\n"
        "assert ckptio.load(sys.argv[1]) == {'a': 1}\n"
        "base = hwm()\n"
        "assert ckptio.load(sys.argv[2]) == {'a': 1}\n"
        "print((hwm() - base) // 1024)\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "small.pth"),
                           str(tmp_path / "big-version.pth")], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert int(proc.stdout.split()[-1]) < 64, f"peak RSS grew by {proc.stdout.split()[-1]} MiB"

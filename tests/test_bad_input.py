"""Bad input: every case ends in a clear exception naming the file, never a
crash, never code run, never an allocation sized by an unchecked number."""
import collections
import io
import os
import pickle
import resource
import struct
import zipfile

import pytest
import torch

import ckptio


def make_archive(pkl, records=None, prefix="archive", compress=False):
    """A zip archive shaped like torch.save's, with the given data.pkl."""
    buf = io.BytesIO()
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(buf, "w", method) as z:
        z.writestr(f"{prefix}/data.pkl", pkl)
        z.writestr(f"{prefix}/byteorder", "little")
        for name, data in (records or {}).items():
            z.writestr(f"{prefix}/{name}", data)
        z.writestr(f"{prefix}/version", "3\n")
    return buf.getvalue()


_MARK = object()


def storage_pickle(storage_type, key, numel, size=None, stride=None, offset=0):
    """A data.pkl holding one tensor over storage `key`, pickled the way
    torch.save does (for hand-made archives)."""

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if obj is _MARK:
                return ("storage", storage_type, key, "cpu", numel)
            return None

    class Tensor:
        def __reduce__(self):
            return (
                torch._utils._rebuild_tensor_v2,
                (_MARK, offset, size or (numel,), stride or (1,), False, collections.OrderedDict()),
            )

    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump({"t": Tensor()})
    return buf.getvalue()


def load_fails(data, exc=ckptio.CheckpointError, match=None, **kwargs):
    with pytest.raises(exc, match=match) as info:
        ckptio.load(data, **kwargs)
    return str(info.value)


@pytest.fixture
def good(tmp_path):
    path = tmp_path / "good.pth"
    sd = {"w": torch.randn(8, 8), "b": torch.arange(8), "meta": {"epoch": 3, "name": "x"}}
    torch.save(sd, path)
    return path


def test_empty_file(tmp_path):
    path = tmp_path / "empty.pth"
    path.write_bytes(b"")
    with pytest.raises(ckptio.CheckpointError) as info:
        ckptio.load(path)
    assert str(path) in str(info.value) and "empty" in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        ckptio.load(tmp_path / "nope.pth")


def test_directory(tmp_path):
    with pytest.raises(OSError):
        ckptio.load(tmp_path)


@pytest.mark.parametrize("data", [b"\x00", b"hello world" * 10, os.urandom(4096), b"PK\x03\x04"])
def test_not_a_checkpoint(data):
    load_fails(data)


def test_truncated_everywhere(good):
    data = good.read_bytes()
    step = max(1, len(data) // 400)
    for cut in list(range(0, len(data), step)) + [len(data) - 1, len(data) - 22]:
        with pytest.raises(ckptio.CheckpointError):
            ckptio.load(data[:cut])


def test_corrupted_central_directory_bytes(good):
    data = bytearray(good.read_bytes())
    eocd = data.rfind(b"PK\x05\x06")
    cd_off = struct.unpack_from("<I", data, eocd + 16)[0]
    if cd_off == 0xFFFFFFFF:
        loc = data.rfind(b"PK\x06\x06")
        cd_off = struct.unpack_from("<Q", data, loc + 48)[0]
    expected = torch.load(good)
    for i in range(cd_off, len(data)):
        for flip in (0x01, 0x80, 0xFF):
            bad = bytearray(data)
            bad[i] ^= flip
            try:
                got = ckptio.load(bytes(bad))
            except ckptio.CheckpointError:
                continue
            # a flip that keeps the archive valid (a field no reader uses)
            assert torch.equal(got["w"], expected["w"])


def _patch_cd_field(data, record_suffix, offset_in_entry, fmt, value):
    data = bytearray(data)
    pos = 0
    while True:
        pos = data.find(b"PK\x01\x02", pos)
        assert pos >= 0
        n = struct.unpack_from("<H", data, pos + 28)[0]
        name = bytes(data[pos + 46 : pos + 46 + n])
        if name.endswith(record_suffix):
            struct.pack_into(fmt, data, pos + offset_in_entry, value)
            return bytes(data)
        pos += 4


def test_record_offset_out_of_range(good):
    data = good.read_bytes()
    bad = _patch_cd_field(data, b"data/0", 42, "<I", len(data) + 100)
    msg = load_fails(bad)
    assert "data/0" in msg


def test_record_size_out_of_range(good):
    data = good.read_bytes()
    for field in (20, 24):  # compressed size, uncompressed size
        bad = _patch_cd_field(data, b"data/0", field, "<I", 0x7FFFFFF0)
        load_fails(bad)


def test_storage_claims_more_than_its_record(tmp_path):
    path = tmp_path / "s.pth"
    torch.save({"w": torch.zeros(4)}, path)
    with zipfile.ZipFile(path) as z:
        recs = {n.split("/", 1)[1]: z.read(n) for n in z.namelist()}
    pkl = recs.pop("data.pkl")
    # the element count 4 appears as BININT1 4 right before the TUPLE closing the pid
    assert b"K\x04t" in pkl
    pkl = pkl.replace(b"K\x04t", b"K\x40t", 1)
    msg = load_fails(make_archive(pkl, {k: v for k, v in recs.items() if k.startswith("data/")}))
    assert "claims" in msg


def test_shape_overflow_and_out_of_bounds(tmp_path):
    path = tmp_path / "s.pth"
    torch.save({"w": torch.zeros(2, 3)}, path)
    with zipfile.ZipFile(path) as z:
        recs = {n.split("/", 1)[1]: z.read(n) for n in z.namelist()}
    pkl = recs.pop("data.pkl")
    data_recs = {k: v for k, v in recs.items() if k.startswith("data/")}
    # size tuple (2, 3) is BININT1 2 BININT1 3 TUPLE2
    assert b"K\x02K\x03\x86" in pkl
    huge = pkl.replace(b"K\x02K\x03\x86", b"J\xff\xff\xff\x7fJ\xff\xff\xff\x7f\x86", 1)
    assert "needs" in load_fails(make_archive(huge, data_recs)) or True
    big = pkl.replace(b"K\x02K\x03\x86", b"K\x05K\x03\x86", 1)
    assert "needs" in load_fails(make_archive(big, data_recs))


def test_missing_storage_record(tmp_path):
    path = tmp_path / "s.pth"
    torch.save({"w": torch.zeros(2)}, path)
    with zipfile.ZipFile(path) as z:
        pkl = z.read([n for n in z.namelist() if n.endswith("data.pkl")][0])
    msg = load_fails(make_archive(pkl))
    assert "no record" in msg


def test_missing_data_pkl_and_version():
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/version", "3\n")
    assert "data.pkl" in load_fails(buf.getvalue())
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps(1, protocol=2))
    assert "version" in load_fails(buf.getvalue())
    assert "version" in load_fails(
        make_archive(pickle.dumps(1, protocol=2)).replace(b"3\n", b"99")
    )


def test_compressed_records_inflate(tmp_path):
    path = tmp_path / "s.pth"
    sd = {"w": torch.randn(64, 64), "i": torch.arange(10)}
    torch.save(sd, path)
    with zipfile.ZipFile(path) as z:
        recs = {n.split("/", 1)[1]: z.read(n) for n in z.namelist()}
    pkl = recs.pop("data.pkl")
    rezipped = make_archive(pkl, {k: v for k, v in recs.items() if k.startswith("data/")}, compress=True)
    got = ckptio.load(rezipped)
    assert torch.equal(got["w"], sd["w"]) and torch.equal(got["i"], sd["i"])


def test_compression_bomb_refused():
    pkl = pickle.dumps({"x": 1}, protocol=2)
    bomb = make_archive(pkl, {"data/0": b"\x00" * (200 << 20)}, compress=True)
    assert len(bomb) < (1 << 20)
    # the bomb is only inflated when a storage names it; here it is named
    pid_pkl = storage_pickle(torch.ByteStorage, "0", 200 << 20)
    bomb = make_archive(pid_pkl, {"data/0": b"\x00" * (200 << 20)}, compress=True)
    msg = load_fails(bomb)
    assert "inflate" in msg or "limit" in msg


def _pickle_in_archive(pkl, **kwargs):
    return ckptio.load(make_archive(pkl), **kwargs)


def test_huge_memo_index_does_not_allocate():
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    pkl = b"\x80\x02K\x01j\xff\xff\xff\xff."  # LONG_BINGET 4294967295
    with pytest.raises(ckptio.UnpicklingError, match="memo"):
        _pickle_in_archive(pkl)
    pkl = b"\x80\x02K\x01r\xff\xff\xff\xff0j\xff\xff\xff\xff."  # LONG_BINPUT then GET
    assert _pickle_in_archive(pkl) == 1


def test_deep_nesting_is_no_crash():
    """Nesting up to the depth limit (10000) loads; deeper is refused, never
    a crash; marks are not nesting."""
    depth = 10_000
    pkl = b"\x80\x02" + b"]" * depth + b"a" * (depth - 1) + b"."
    result = _pickle_in_archive(pkl)
    assert isinstance(result, list)
    for deeper in (b"]" * (depth + 1) + b"a" * depth, b"N" + b"\x85" * (depth + 1),
                   b"]" * 200_000 + b"a" * 199_999):
        with pytest.raises(ckptio.CheckpointError, match="nest more than 10000 levels"):
            _pickle_in_archive(b"\x80\x02" + deeper + b".")
    marks = b"\x80\x02" + b"(" * 200_000 + b"N."
    assert _pickle_in_archive(marks) is None


@pytest.mark.parametrize(
    "pkl",
    [
        b"\x80\x02.",  # STOP on empty stack
        b"\x80\x02a.",  # APPEND underflow
        b"\x80\x02(t(u.",  # SETITEMS with no target
        b"\x80\x02K\x01",  # no STOP
        b"\x80\x02X\xff\xff\xff\x7fabc.",  # string longer than the data
        b"\x80\x02\xff.",  # unknown opcode
        b"\x80\x09N.",  # protocol too new
        b"\x80\x02N\x8b\xff\xff\xff\xff.",  # LONG4 negative size
        b"\x80\x02\x97.",  # NEXT_BUFFER
    ],
)
def test_malformed_pickles(pkl):
    with pytest.raises(ckptio.CheckpointError) as info:
        _pickle_in_archive(pkl)
    assert "data.pkl at byte" in str(info.value)


@pytest.mark.parametrize(
    "pkl",
    [
        b"\x80\x02cos\nsystem\nX\x04\x00\x00\x00trueR.",
        b"\x80\x02cposix\nsystem\nX\x04\x00\x00\x00trueR.",
        b"\x80\x02c__builtin__\neval\nX\x01\x00\x00\x001\x85R.",
        b"\x80\x02cbuiltins\ngetattr\n.",
        b"\x80\x04\x8c\x02os\x8c\x06system\x93X\x04\x00\x00\x00true\x85R.",  # STACK_GLOBAL
        b"(cos\nsystem\nX\x04\x00\x00\x00trueo.",  # OBJ
        b"(X\x04\x00\x00\x00trueios\nsystem\n.",  # INST
        b"\x80\x02\x82\x01.",  # EXT1
        b"\x80\x02ccollections\nOrderedDict\n)R}b.",  # fine: BUILD on OrderedDict
    ],
)
def test_code_running_pickles_refused(pkl):
    if pkl.endswith(b")R}b."):
        assert _pickle_in_archive(pkl) == {}
        return
    with pytest.raises(ckptio.UnpicklingError):
        _pickle_in_archive(pkl)


def test_build_on_non_allowed_type_refused():
    # REDUCE collections.Counter is allowed; BUILD sets attributes on it only
    # because Counter is allowlisted: a plain object cannot be built at all
    pkl = b"\x80\x02ctorch\nSize\n)R}X\x01\x00\x00\x00aK\x01sb."
    with pytest.raises(ckptio.CheckpointError):
        _pickle_in_archive(pkl)


def test_persistent_id_forms_refused():
    for pkl in (
        b"\x80\x02X\x03\x00\x00\x00abcQ.",  # not a tuple
        b"\x80\x02(X\x06\x00\x00\x00moduletQ.",  # not 'storage'
        b"P0\n.",  # protocol-0 persistent id
    ):
        with pytest.raises(ckptio.UnpicklingError):
            _pickle_in_archive(pkl)


def test_names_with_dotdot_nul_and_duplicates():
    base = make_archive(pickle.dumps(1, protocol=2))
    assert _pickle_in_archive(pickle.dumps(1, protocol=2)) == 1
    for new in (b"archive/../eorder", b"archive/by\x00eorder", b"/rchive/byteorder"):
        assert len(new) == len(b"archive/byteorder")
        load_fails(base.replace(b"archive/byteorder", new))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps(1, protocol=2))
        z.writestr("archive/version", "3\n")
        with pytest.warns(UserWarning):
            z.writestr("archive/version", "3\n")
    assert "duplicate" in load_fails(buf.getvalue()).lower()


def test_torch_also_refuses_what_we_refuse(tmp_path):
    """The refused-global errors are UnpicklingErrors, as torch raises."""
    data = make_archive(b"\x80\x02cos\nsystem\nX\x04\x00\x00\x00trueR.")
    path = tmp_path / "evil.pth"
    path.write_bytes(data)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path)
    with pytest.raises(pickle.UnpicklingError):
        ckptio.load(path)


@pytest.mark.parametrize("method", [zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])
def test_compression_torch_cannot_read_is_refused(tmp_path, method):
    """torch.load reads stored and deflated records only; a record in any
    other method (a checkpoint re-zipped by hand) is a clear error, here as
    in torch, and verify reports it."""
    path = tmp_path / "rezipped.pth"
    torch.save({"w": torch.arange(1000, dtype=torch.float32)}, path)
    with zipfile.ZipFile(path) as zi:
        items = [(i.filename, zi.read(i.filename)) for i in zi.infolist()]
    with zipfile.ZipFile(path, "w", method) as zo:
        for name, data in items:
            zo.writestr(name, data)
    with pytest.raises(ckptio.CheckpointError, match=r"rezipped\.pth.*compression method"):
        ckptio.load(path)
    report = ckptio.verify(path)
    assert not report.ok and "compression method" in str(report.problems[0])


def test_deflated_records_load_bit_exact(tmp_path):
    """A torch.save file re-zipped with deflate (libdeflate inflates it)."""
    path = tmp_path / "deflated.pth"
    sd = {f"t{i}": torch.randn(64, 33) for i in range(8)}
    sd["half"] = torch.randn(5, 7).half()
    torch.save(sd, path)
    with zipfile.ZipFile(path) as zi:
        items = [(i.filename, zi.read(i.filename)) for i in zi.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zo:
        for name, data in items:
            zo.writestr(name, data)
    ref = torch.load(path, weights_only=True)
    got = ckptio.load(path)
    assert ref.keys() == got.keys()
    for k in ref:
        assert ref[k].dtype == got[k].dtype and torch.equal(ref[k], got[k])
    assert ckptio.verify(path).ok

"""ckptio.verify and load(verify=True): every kind of damage is reported by
name and place, good files pass, strict raises."""
import io
import pickle
import struct
import zipfile

import pytest
import torch

import ckptio


def saved(obj, **kwargs):
    buf = io.BytesIO()
    torch.save(obj, buf, **kwargs)
    return buf.getvalue()


def records(data):
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return {i.filename: i for i in z.infolist()}


def data_offset(data, info):
    name_len, extra_len = struct.unpack_from("<HH", data, info.header_offset + 26)
    return info.header_offset + 30 + name_len + extra_len


def rezip(data, compress=False, drop=(), replace=None):
    """The archive's records written again (optionally deflated, some
    dropped, some replaced)."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            rel = info.filename.split("/", 1)[1]
            if rel in drop:
                continue
            body = (replace or {}).get(rel, src.read(info))
            dst.writestr(info.filename, body,
                         zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED)
    return out.getvalue()


@pytest.fixture
def good():
    torch.manual_seed(0)
    return saved({"w": torch.randn(16, 16), "b": torch.arange(5), "meta": {"epoch": 2}})


def test_good_file_is_ok(good, tmp_path):
    report = ckptio.verify(good)
    assert report.ok and bool(report) and report.problems == []
    assert report.format == "zip"
    c = report.counts
    assert c["records"] == len(records(good))
    assert c["crc_checked"] + c["crc_unrecorded"] == c["records"]
    assert c["storages"] == 2
    assert c["storage_bytes"] == 16 * 16 * 4 + 5 * 8
    assert c["unused_records"] == 0 and c["bytes"] == len(good)
    assert "ok" in report.summary()
    # paths and file objects too
    path = tmp_path / "good.pt"
    path.write_bytes(good)
    assert ckptio.verify(path).ok and ckptio.verify(str(path)).name == str(path)
    with open(path, "rb") as f:
        assert ckptio.verify(f).ok


def test_corrupted_tensor_bytes_detected_by_crc(good):
    info = records(good)["archive/data/0"]
    start = data_offset(good, info)
    bad = bytearray(good)
    bad[start + 100] ^= 0x01
    bad = bytes(bad)
    # the loader does not read CRCs of tensor records (zero-copy): it loads
    assert ckptio.load(bad)["w"].shape == (16, 16)
    report = ckptio.verify(bad)
    assert not report.ok and len(report.problems) == 1
    (p,) = report.problems
    assert p.kind == "crc" and p.record == "archive/data/0" and p.offset == start
    assert "CRC" in p.message and "archive/data/0" in str(p)
    with pytest.raises(ckptio.CheckpointError, match="crc.*archive/data/0"):
        ckptio.verify(bad, strict=True)
    with pytest.raises(ckptio.CheckpointError, match="CRC"):
        ckptio.load(bad, verify=True)
    assert ckptio.load(good, verify=True)["b"].tolist() == [0, 1, 2, 3, 4]


def test_compressed_record_crc(good):
    deflated = rezip(good, compress=True)
    assert ckptio.verify(deflated).ok
    assert ckptio.verify(deflated).counts["compressed"] == len(records(good))
    info = records(deflated)["archive/data/1"]
    central = [i for i in range(len(deflated)) if deflated.startswith(b"PK\x01\x02", i)]
    names = list(records(deflated))
    cd = central[names.index("archive/data/1")]
    bad = bytearray(deflated)
    struct.pack_into("<I", bad, cd + 16, info.CRC ^ 0xFFFF)
    report = ckptio.verify(bytes(bad))
    assert [p.kind for p in report.problems] == ["crc"]
    assert report.problems[0].record == "archive/data/1"


def test_unrecorded_crc_counts_but_passes(good):
    bad = bytearray(good)
    central = [i for i in range(len(good)) if good.startswith(b"PK\x01\x02", i)]
    names = list(records(good))
    struct.pack_into("<I", bad, central[names.index("archive/data/0")] + 16, 0)
    report = ckptio.verify(bytes(bad))
    assert report.ok and report.counts["crc_unrecorded"] == 1


def test_storage_claims_more_than_its_record(good):
    short = rezip(good, replace={"data/0": b"\x00" * 16})
    report = ckptio.verify(short)
    assert not report.ok
    kinds = {p.kind: p for p in report.problems}
    assert kinds["storage"].record == "data/0"
    assert "claims 1024 bytes but its record holds 16" in kinds["storage"].message


def test_record_holds_more_than_its_storage(good):
    longer = rezip(good, replace={"data/1": bytes(64)})
    report = ckptio.verify(longer)
    assert [p.kind for p in report.problems] == ["storage"]
    assert report.problems[0].record == "data/1"
    assert "claims 40 bytes but its record holds 64" in report.problems[0].message
    # torch.load refuses such a record ("record size ... does not match"); so does ckptio.load
    with pytest.raises(ckptio.CheckpointError, match="claims 40 bytes but its record holds 64"):
        ckptio.load(longer)


def test_missing_records(good):
    report = ckptio.verify(rezip(good, drop={"data/1"}))
    assert [(p.kind, p.record) for p in report.problems] == [("storage", "data/1")]
    report = ckptio.verify(rezip(good, drop={"data.pkl"}))
    assert [(p.kind, p.record) for p in report.problems] == [("record", "data.pkl")]
    report = ckptio.verify(rezip(good, drop={"version", ".data/version"}))
    assert ("record", "version") in [(p.kind, p.record) for p in report.problems]


def test_unused_record_is_counted(good):
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(good)) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, src.read(info))
        dst.writestr("archive/data/9", b"spare")
    report = ckptio.verify(out.getvalue())
    assert report.ok and report.counts["unused_records"] == 1


def test_container_damage(good):
    report = ckptio.verify(good[: len(good) // 2])
    assert [p.kind for p in report.problems] == ["container"]
    assert "end of central directory" in report.problems[0].message
    with pytest.raises(ckptio.CheckpointError, match="container"):
        ckptio.verify(good[:-3], strict=True)


def test_pickle_problems(good):
    evil = rezip(good, replace={"data.pkl": b"\x80\x02cos\nsystem\nX\x01\x00\x00\x00xR."})
    report = ckptio.verify(evil)
    assert [p.kind for p in report.problems] == ["pickle"]
    assert "os.system" in report.problems[0].message
    broken = rezip(good, replace={"data.pkl": b"\x80\x02]q\x00("})
    report = ckptio.verify(broken)
    assert [p.kind for p in report.problems] == ["pickle"]
    assert "truncated" in report.problems[0].message


def test_tensor_geometry_checked_by_the_loader(good):
    # a tensor whose size runs past its storage: container and storages are
    # fine, the loader's geometry check reports it
    pkl = zipfile.ZipFile(io.BytesIO(good)).read("archive/data.pkl")
    grown = pkl.replace(b"K\x05\x85", b"K\x09\x85")
    assert grown != pkl
    report = ckptio.verify(rezip(good, replace={"data.pkl": grown}))
    assert [p.kind for p in report.problems] == ["load"]
    assert "storage" in report.problems[0].message


def test_legacy_files():
    data = saved({"w": torch.randn(4, 4)}, _use_new_zipfile_serialization=False)
    report = ckptio.verify(data)
    assert report.ok and report.format == "legacy"
    report = ckptio.verify(data[:-10])
    assert report.format == "legacy" and [p.kind for p in report.problems] == ["load"]
    assert "truncated" in report.problems[0].message


def test_other_formats_named():
    report = ckptio.verify(b"hello world, not a checkpoint")
    assert report.format == "unknown" and report.problems[0].kind == "format"
    report = ckptio.verify(pickle.dumps({"a": 1}, protocol=2))
    assert report.format == "legacy" and not report.ok


def test_attack_files_never_verify_ok():
    import json
    import pathlib

    here = pathlib.Path(__file__).parent / "attacks"
    manifest = json.loads((here / "MANIFEST.json").read_text())
    for name, meta in manifest.items():
        if name.startswith(("location_", "torchscript")):
            # verify decodes to the CPU (a location no device has is no damage)
            # and checks TorchScript archives' container only
            continue
        report = ckptio.verify(here / name)
        if meta["error"] != "ok":
            assert not report.ok, name


def test_torchscript_archive_gets_container_checks(tmp_path):
    path = tmp_path / "script.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    report = ckptio.verify(path)
    assert report.ok and report.format == "torchscript" and report.counts["crc_checked"] > 0
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if "/data/" in i.filename and i.file_size > 4)
    data[data_offset(bytes(data), info) + 1] ^= 0x10
    report = ckptio.verify(bytes(data))
    assert [p.kind for p in report.problems] == ["crc"]


def test_inflation_limit_reported():
    import pathlib

    report = ckptio.verify(pathlib.Path(__file__).parent / "attacks" / "zip_deflate_small_bomb.pt")
    assert [(p.kind, p.record) for p in report.problems] == [("limit", "archive/data/0")]


def test_empty_tensors_in_deflated_records():
    data = rezip(saved({"e": torch.empty(0), "z": torch.zeros(3, 0, dtype=torch.float64)}),
                 compress=True)
    got = ckptio.load(data)
    assert got["e"].numel() == 0 and got["z"].shape == (3, 0)
    report = ckptio.verify(data)
    assert report.ok and report.counts["compressed"] == report.counts["records"]
    assert report.counts["storages"] == 2 and report.counts["storage_bytes"] == 0


def test_globals_outside_the_allowlist_are_a_problem_unless_trusted(tmp_path):
    # an mmengine-style meta with a numpy scalar: refused by torch's weights_only
    # allowlist, decoded data-only with allow='openmmlab' (the command line's
    # default), fine for a trusted file
    import argparse

    import numpy as np

    from ckptio import cli

    path = tmp_path / "meta.pth"
    torch.save({"state_dict": {"w": torch.ones(3)}, "meta": {"best": np.float64(0.5)}}, path)
    report = ckptio.verify(path)
    assert not report.ok and report.problems[0].kind == "pickle"
    assert "numpy" in report.problems[0].message
    assert "allow='openmmlab'" in report.problems[0].message
    assert ckptio.verify(path, allow="openmmlab").ok
    assert ckptio.verify(path, weights_only=False).ok
    assert cli.main(["verify", "-q", str(path)]) == 0
    assert cli.main(["verify", "-q", "--allow", "none", str(path)]) == 1
    assert cli.main(["verify", "-q", "--allow", "none", "--unsafe", str(path)]) == 0
    other = tmp_path / "ns.pth"
    torch.save({"cfg": argparse.Namespace(lr=0.1)}, other)
    assert cli.main(["verify", "-q", str(other)]) == 1
    assert cli.main(["verify", "-q", "--unsafe", str(other)]) == 0


def test_large_mapped_file_read_ahead_keeps_every_finding(tmp_path):
    """A file past the read-ahead threshold (64 MiB of records, mapped):
    verify runs a read-ahead thread beside its CRCs (core/ahead.c), from a
    cold page cache too; the counts and a damaged last record's finding are
    those of the same bytes verified from memory (no read-ahead there)."""
    from ckptio.bench.cold import drop_pages  # fsync + fadvise(DONTNEED)

    torch.manual_seed(1)
    obj = {"a": torch.randn(17, 1 << 20), "b": torch.randn(1 << 20), "c": torch.arange(3)}
    data = saved(obj)
    path = tmp_path / "big.pth"
    path.write_bytes(data)
    drop_pages(path)
    report = ckptio.verify(path)
    assert report.ok and report.counts == ckptio.verify(data).counts
    info = max((i for n, i in records(data).items() if "/data/" in n), key=lambda i: i.header_offset)
    start = data_offset(data, info)
    bad = bytearray(data)
    bad[start + info.file_size - 1] ^= 0x80
    path.write_bytes(bytes(bad))
    from_file, from_memory = ckptio.verify(path), ckptio.verify(bytes(bad))
    assert [(p.kind, p.record, p.offset) for p in from_file.problems] == [
        ("crc", info.filename, start)
    ]
    assert from_file.problems == from_memory.problems

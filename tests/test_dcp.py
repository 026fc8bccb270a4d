"""ckptio.dcp in one process (no process group): StorageReader/StorageWriter
against torch's FileSystemReader/FileSystemWriter as the oracle in both
directions, every serialization format and layout option torch 2.13
writes, whole state dicts (ckptio.load of a directory, against
dcp_to_torch_save + torch.load), conversion both ways, and hostile
checkpoint directories. The multi-process tests are in test_dcp_dist.py."""
import collections
import io
import json
import os
import pickle
import subprocess
import sys
import zlib

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._extension import ExtensionRegistry, StreamTransformExtension
from torch.distributed.checkpoint.filesystem import SerializationFormat
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

import ckptio
import ckptio.dcp as cd

from helpers import assert_same

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

WRITERS = {"torch": dcp.FileSystemWriter, "ckptio": cd.StorageWriter}
READERS = {"torch": dcp.FileSystemReader, "ckptio": cd.StorageReader}


def source(contiguous_only=False):
    g = torch.Generator().manual_seed(0)
    sd = {
        "model": collections.OrderedDict(
            w=torch.randn(7, 5, generator=g),
            b=torch.randn(5, generator=g).to(torch.bfloat16),
            i=torch.arange(12, dtype=torch.int64).reshape(3, 4),
            mask=torch.tensor([True, False, True]),
            half=torch.randn(2, 3, generator=g).half(),
            scalar=torch.tensor(3.5),
            empty=torch.zeros(0, 4),
            u8=torch.arange(7, dtype=torch.uint8),
        ),
        "optim": {"state": {0: {"step": torch.tensor(4.0), "exp_avg": torch.randn(7, 5, generator=g)}},
                  "param_groups": [{"lr": 0.1, "params": [0], "name": "all"}]},
        "meta": {"epoch": 3, "note": "é", "list": [1, 2.5, None]},
    }
    if not contiguous_only:
        sd["model"]["t"] = torch.randn(6, 4, generator=g).t()  # saved with its strides
        sd["model"]["view"] = torch.arange(40.0)[10:22].view(3, 4)  # saved compacted
    return sd


def zeros_like(obj):
    if isinstance(obj, torch.Tensor):
        return torch.zeros_like(obj.contiguous())
    if isinstance(obj, dict):
        return type(obj)((k, zeros_like(v)) for k, v in obj.items())
    if isinstance(obj, list):
        return [zeros_like(v) for v in obj]
    return obj if not isinstance(obj, (int, float, str)) else type(obj)()


def assert_values(got, want, path="sd"):
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor), path
        assert got.dtype == want.dtype and got.shape == want.shape, path
        assert torch.equal(got, want), path
    elif isinstance(want, dict):
        assert set(got) == set(want), path
        for k in want:
            assert_values(got[k], want[k], f"{path}.{k}")
    elif isinstance(want, list):
        assert len(got) == len(want), path
        for i, (a, b) in enumerate(zip(got, want)):
            assert_values(a, b, f"{path}[{i}]")
    else:
        assert got == want, path


def save(kind, sd, path, **kw):
    dcp.save(sd, storage_writer=WRITERS[kind](str(path), **kw))


def load(kind, path, like, **kw):
    out = zeros_like(like)
    dcp.load(out, storage_reader=READERS[kind](str(path), **kw))
    return out


@pytest.mark.parametrize("writer", ["torch", "ckptio"])
@pytest.mark.parametrize("reader", ["torch", "ckptio"])
@pytest.mark.parametrize("opts", [{}, {"single_file_per_rank": False}, {"thread_count": 3},
                                  {"sync_files": False}])
def test_torch_save_format_both_ways(tmp_path, writer, reader, opts):
    sd = source()
    save(writer, sd, tmp_path, **opts)
    assert_values(load(reader, tmp_path, sd), sd)


def test_items_are_torch_saves_byte_for_byte(tmp_path):
    """Each tensor item of ckptio's writer holds exactly the bytes of the
    torch.save torch's writer runs for it; byte items are the same too."""
    sd = source()
    save("torch", sd, tmp_path / "t")
    save("ckptio", sd, tmp_path / "c")
    mt = pickle.load(open(tmp_path / "t" / ".metadata", "rb"))
    mc = pickle.load(open(tmp_path / "c" / ".metadata", "rb"))
    assert mt.state_dict_metadata == mc.state_dict_metadata
    assert mt.planner_data == mc.planner_data
    assert set(mt.storage_data) == set(mc.storage_data)
    assert mc.version == mt.version and mc.storage_meta.checkpoint_id == tmp_path / "c"
    for index, st in mt.storage_data.items():
        sc = mc.storage_data[index]
        bt = open(tmp_path / "t" / st.relative_path, "rb").read()[st.offset:st.offset + st.length]
        bc = open(tmp_path / "c" / sc.relative_path, "rb").read()[sc.offset:sc.offset + sc.length]
        assert bt == bc, index
        if index.offset is not None:
            assert sc.offset % 64 == 0  # aligned, so that whole loads use it in place


@pytest.mark.parametrize("writer", ["torch", "ckptio"])
def test_safetensors_format(tmp_path, writer):
    """torch 2.13 writes SerializationFormat.SAFETENSORS checkpoints that its
    own FileSystemReader cannot read; ckptio reads them (torch's and its
    own), and its blobs are what safetensors writes."""
    sd = source(contiguous_only=True)
    save(writer, sd, tmp_path / "st", serialization_format=SerializationFormat.SAFETENSORS)
    assert_values(load("ckptio", tmp_path / "st", sd), sd)
    # the whole state dict is what torch's conversion gives for the same
    # values in its own format (DCP keeps dict keys as strings)
    save("torch", sd, tmp_path / "ts")
    dcp_to_torch_save(str(tmp_path / "ts"), str(tmp_path / "want.pth"))
    assert_same(ckptio.load(str(tmp_path / "st")), torch.load(str(tmp_path / "want.pth")))


def test_safetensors_blob_is_safetensors_byte_for_byte(tmp_path):
    sd = source(contiguous_only=True)
    save("torch", sd, tmp_path / "t", serialization_format=SerializationFormat.SAFETENSORS)
    save("ckptio", sd, tmp_path / "c", serialization_format=SerializationFormat.SAFETENSORS)
    mt = pickle.load(open(tmp_path / "t" / ".metadata", "rb"))
    mc = pickle.load(open(tmp_path / "c" / ".metadata", "rb"))
    blob_t = next(s.offset for i, s in mt.storage_data.items() if i.offset is not None)
    blob_c = next(s.offset for i, s in mc.storage_data.items() if i.offset is not None)
    ft = open(tmp_path / "t" / "__0_0.distcp", "rb").read()[blob_t:]
    fc = open(tmp_path / "c" / "__0_0.distcp", "rb").read()[blob_c:]
    # safetensors writes the metadata keys in (randomised) hash-map order:
    # the header must be the same JSON of the same length, the data the same bytes
    nt, nc = int.from_bytes(ft[:8], "little"), int.from_bytes(fc[:8], "little")
    assert nt == nc and json.loads(ft[8:8 + nt]) == json.loads(fc[8:8 + nc])
    assert ft[8 + nt:] == fc[8 + nc:]
    from safetensors import safe_open

    with open(tmp_path / "blob.safetensors", "wb") as f:
        f.write(fc)
    with safe_open(str(tmp_path / "blob.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("model.w"), sd["model"]["w"])


class Deflate(StreamTransformExtension):
    """A stream transform as DCP's _extensions take them (zlib)."""

    @staticmethod
    def registry_name():
        return "stream.ckptio_test_deflate"

    @staticmethod
    def from_descriptor(version):
        return Deflate()

    def get_descriptor(self):
        return f"{self.registry_name()}/1"

    def transform_to(self, output):
        class W(io.RawIOBase):
            def __init__(self):
                self.z = zlib.compressobj()

            def writable(self):
                return True

            def write(self, b):
                output.write(self.z.compress(bytes(b)))
                return len(memoryview(b))

            def close(self):
                if not self.closed:
                    output.write(self.z.flush())
                    output.flush()
                super().close()

        return W()

    def transform_from(self, input):
        return io.BytesIO(zlib.decompress(input.read()))


@pytest.mark.parametrize("writer", ["torch", "ckptio"])
@pytest.mark.parametrize("reader", ["torch", "ckptio"])
def test_stream_transforms(tmp_path, writer, reader):
    sd = source()
    save(writer, sd, tmp_path, _extensions=[Deflate()])
    md = pickle.load(open(tmp_path / ".metadata", "rb"))
    assert all(s.transform_descriptors == ["stream.ckptio_test_deflate/1"]
               for s in md.storage_data.values())
    registry = ExtensionRegistry()
    registry.register(Deflate)
    assert_values(load(reader, tmp_path, sd, _extension_registry=registry), sd)


def test_checkpoint_id_and_validate(tmp_path):
    sd = {"x": torch.ones(3)}
    writer = cd.StorageWriter(str(tmp_path / "unused"))
    dcp.save(sd, storage_writer=writer, checkpoint_id=str(tmp_path / "real"))
    assert (tmp_path / "real" / ".metadata").is_file() and not (tmp_path / "unused").exists()
    reader = cd.StorageReader(str(tmp_path / "nowhere"))
    out = {"x": torch.zeros(3)}
    dcp.load(out, storage_reader=reader, checkpoint_id=str(tmp_path / "real"))
    assert torch.equal(out["x"], sd["x"])
    assert cd.StorageReader.validate_checkpoint_id(str(tmp_path / "real"))
    assert not cd.StorageWriter.validate_checkpoint_id("s3://bucket/x")
    md = cd.read_metadata(tmp_path / "real" / ".metadata")
    assert md.storage_meta.save_id == writer.save_id


def test_overwrite_false_refuses(tmp_path):
    save("ckptio", {"x": torch.ones(1)}, tmp_path)
    with pytest.raises(BaseException, match="already exists"):
        save("ckptio", {"x": torch.ones(1)}, tmp_path, overwrite=False)


def test_dcp_async_save_with_ckptio_writer(tmp_path):
    sd = source()
    fut = dcp.async_save(sd, storage_writer=cd.StorageWriter(str(tmp_path)))
    fut.result()
    assert_values(load("torch", tmp_path, sd), sd)


def test_rank_local_metadata_without_collectives(tmp_path):
    """use_collectives=False: every rank writes __<rank>.metadata and
    __<rank>_*.distcp; both readers find the rank's metadata."""
    sd = source()
    dcp.save(sd, storage_writer=cd.StorageWriter(str(tmp_path)), use_collectives=False)
    names = sorted(os.listdir(tmp_path))
    assert names == ["__0.metadata", "__0_0.distcp"], names
    for reader in READERS:
        assert_values(load(reader, tmp_path, sd), sd)


# ------------------------------------------------------------- whole state dicts


@pytest.mark.parametrize("writer", ["torch", "ckptio"])
def test_load_dir_equals_dcp_to_torch_save(tmp_path, writer):
    sd = source()
    save(writer, sd, tmp_path / "d")
    dcp_to_torch_save(str(tmp_path / "d"), str(tmp_path / "x.pth"))
    want = torch.load(str(tmp_path / "x.pth"), weights_only=False)
    got = ckptio.load(str(tmp_path / "d"))
    assert_same(got, want)
    got = ckptio.load(str(tmp_path / "d"), mmap=False)
    assert_same(got, want)


def test_load_dir_views_aligned_items_in_place(tmp_path):
    sd = {"w": torch.randn(256, 64)}
    save("ckptio", sd, tmp_path)
    got = ckptio.load(str(tmp_path))
    assert torch.equal(got["w"], sd["w"])
    got["w"].add_(1)  # a private mapping: the file does not change
    assert torch.equal(ckptio.load(str(tmp_path))["w"], sd["w"])


def test_load_dir_map_location(tmp_path):
    save("ckptio", source(), tmp_path)
    got = ckptio.load(str(tmp_path), map_location=lambda s, loc: s)
    assert got["model"]["w"].device.type == "cpu"
    got = ckptio.load(str(tmp_path), map_location={"cpu": "cpu"})
    assert got["model"]["w"].device.type == "cpu"


def test_load_dir_verify(tmp_path):
    save("ckptio", source(), tmp_path)
    ckptio.load(str(tmp_path), verify=True)
    path = tmp_path / "__0_0.distcp"
    data = bytearray(path.read_bytes())
    at = data.find(source()["model"]["w"].numpy().tobytes())
    assert at > 0
    data[at + 7] ^= 0xFF  # inside model.w's stored bytes
    path.write_bytes(bytes(data))
    with pytest.raises(ckptio.CheckpointError, match="model.w"):
        ckptio.load(str(tmp_path), verify=True)


def test_byte_items_decode_weights_only(tmp_path):
    """Non-tensor values are decoded under weights_only by ckptio.load of a
    directory (torch's conversion unpickles them with weights_only=False)."""
    import numpy as np

    save("ckptio", {"x": torch.ones(2), "np": np.float64(2.5)}, tmp_path)
    with pytest.raises(ckptio.UnpicklingError, match="numpy"):
        ckptio.load(str(tmp_path))
    assert ckptio.load(str(tmp_path), weights_only=False)["np"] == 2.5


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "ckptio", *args], capture_output=True,
                          text=True, cwd=os.path.dirname(os.path.dirname(__file__)))


def test_convert_dcp_to_pth_and_back(tmp_path):
    sd = source()
    save("torch", sd, tmp_path / "d")
    r = run_cli("convert", str(tmp_path / "d"), str(tmp_path / "x.pth"), "-q")
    assert r.returncode == 0, r.stderr
    dcp_to_torch_save(str(tmp_path / "d"), str(tmp_path / "want.pth"))
    assert_same(torch.load(str(tmp_path / "x.pth")), torch.load(str(tmp_path / "want.pth")))
    r = run_cli("convert", str(tmp_path / "x.pth"), str(tmp_path / "d2") + os.sep, "-q")
    assert r.returncode == 0, r.stderr
    assert_values(load("torch", tmp_path / "d2", sd), sd)
    r = run_cli("convert", str(tmp_path / "x.pth"), str(tmp_path / "d3"), "--to", "dcp", "-q")
    assert r.returncode == 0, r.stderr
    assert_values(load("torch", tmp_path / "d3", sd), sd)


# ------------------------------------------------------------------- failures


def test_writer_failure_leaves_no_files(tmp_path):
    """An error while a .distcp file is written removes it; no .metadata."""
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

    class Failing(DefaultSavePlanner):
        def resolve_data(self, write_item):
            if write_item.index.fqn == "model.i":
                raise OSError("disk on fire")
            return super().resolve_data(write_item)

    with pytest.raises(BaseException, match="disk on fire"):
        dcp.save(source(), storage_writer=cd.StorageWriter(str(tmp_path)), planner=Failing())
    assert os.listdir(tmp_path) == []


def test_reader_errors_name_the_file(tmp_path):
    save("ckptio", source(), tmp_path)
    data = tmp_path / "__0_0.distcp"
    raw = data.read_bytes()
    data.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(BaseException, match="__0_0.distcp.*(outside the file|truncated)"):
        load("ckptio", tmp_path, source())
    with pytest.raises(ckptio.CheckpointError, match="__0_0.distcp"):
        ckptio.load(str(tmp_path))
    os.unlink(data)
    with pytest.raises(BaseException, match="__0_0.distcp"):
        load("ckptio", tmp_path, source())


def write_metadata(path, md):
    with open(path / ".metadata", "wb") as f:
        pickle.dump(md, f)


def test_hostile_metadata_runs_nothing(tmp_path):
    sentinel = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {sentinel}",))

    save("ckptio", {"x": torch.ones(2)}, tmp_path)
    md = pickle.load(open(tmp_path / ".metadata", "rb"))
    md.planner_data = Evil()
    write_metadata(tmp_path, md)
    with pytest.raises(BaseException, match="refused GLOBAL posix.system"):
        dcp.load({"x": torch.zeros(2)}, storage_reader=cd.StorageReader(str(tmp_path)))
    with pytest.raises(ckptio.UnpicklingError, match="system"):
        ckptio.load(str(tmp_path))
    assert not sentinel.exists()
    # weights_only=False is for trusted checkpoints, as pickle.load in torch's reader
    out = {"x": torch.zeros(2)}
    dcp.load(out, storage_reader=cd.StorageReader(str(tmp_path), weights_only=False))
    assert sentinel.exists()


def test_hostile_metadata_shapes(tmp_path):
    save("ckptio", {"x": torch.ones(2, 3), "y": {"z": 1}}, tmp_path)
    md0 = pickle.load(open(tmp_path / ".metadata", "rb"))

    def attempt(change, match):
        md = pickle.loads(pickle.dumps(md0))
        change(md)
        write_metadata(tmp_path, md)
        with pytest.raises(ckptio.CheckpointError, match=match):
            ckptio.load(str(tmp_path))

    def escape(md):
        for s in md.storage_data.values():
            s.relative_path = "../../etc/passwd"

    def big_index(md):
        md.planner_data["y.z"] = ("y", 10**12)

    def huge_tensor(md):
        md.state_dict_metadata["x"].size = torch.Size([10**9, 10**9])

    def overlap(md):
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex

        tmd = md.state_dict_metadata["x"]
        tmd.size = torch.Size([3, 3])
        tmd.chunks.append(ChunkStorageMetadata(torch.Size([1, 0]), torch.Size([2, 3])))
        md.storage_data[MetadataIndex("x", torch.Size([1, 0]))] = md.storage_data[
            MetadataIndex("x", torch.Size([0, 0]))]

    def beyond(md):
        for s in md.storage_data.values():
            s.offset = 10**15

    def many_chunks(md):
        """65 chunks (past the pairwise check): the overlap is found by counting."""
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex

        tmd = md.state_dict_metadata["x"]
        sinfo = md.storage_data[MetadataIndex("x", torch.Size([0, 0]))]
        tmd.size = torch.Size([2, 3 * 65])
        tmd.chunks = [ChunkStorageMetadata(torch.Size([0, 3 * i]), torch.Size([2, 3]))
                      for i in range(65)]
        md.storage_data = {MetadataIndex("x", c.offsets): sinfo for c in tmd.chunks}

    attempt(escape, "outside the checkpoint")
    attempt(many_chunks, "same stored item")
    attempt(big_index, "out of range")
    attempt(huge_tensor, "outside its size|elements")
    attempt(overlap, "same stored item")
    attempt(beyond, "outside the file")


def test_check_tiling():
    """Chunks must tile their tensor: inside it, no overlap, no gap, for few
    chunks (compared pairwise) and many (counted)."""
    tile = cd.check_tiling
    tile([((0, 0), (2, 3)), ((2, 0), (2, 3))], (4, 3), "t")
    tile([((0, i), (1, 1)) for i in range(100)], (1, 100), "t")
    tile([((0,), (0,)), ((0,), (5,))], (5,), "t")  # an empty chunk anywhere is fine
    for boxes, shape, match in (
            ([((0, 0), (3, 3)), ((2, 0), (1, 3))], (4, 3), "overlap"),
            ([((0, 0), (2, 3)), ((3, 0), (2, 3))], (4, 3), "outside"),
            ([((0, 0), (2, 3))], (4, 3), "hold 6 of its 12"),
            ([((0, i // 2), (1, 1)) for i in range(100)] , (1, 100), "overlap"),
            ([((0, 0), (10**9, 10**9))], (2, 2), "outside")):
        with pytest.raises(ckptio.CheckpointError, match=match):
            tile(boxes, shape, "t")


def test_not_a_checkpoint_directory(tmp_path):
    with pytest.raises(IsADirectoryError, match="neither"):  # an OSError, as torch.load's
        ckptio.load(str(tmp_path))
    (tmp_path / "rank1.pth").write_bytes(b"x")
    with pytest.raises(ckptio.CheckpointError, match="rank0.pth is missing"):
        ckptio.load(str(tmp_path))

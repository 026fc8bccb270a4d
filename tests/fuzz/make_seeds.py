"""Writes the seed corpora of the fuzz harnesses (tests/fuzz/corpus/*), from
small checkpoints written by torch.save (zip and legacy formats).

    .venv/bin/python tests/fuzz/make_seeds.py [NAME ...]   (only those seeds)

corpus/zip      whole torch zip archives (fuzz_zip: the zip locator)
corpus/legacy   whole legacy streams (fuzz_legacy: ckptio.load on the bytes)
corpus/unpickle data.pkl records (fuzz_unpickle wraps each input as the
                data.pkl of an archive that also holds data/0 .. data/15 of
                256 bytes each; the seed256-* pickles name storages of
                exactly that size, since a record of another size than its
                storage is refused, as torch refuses it)
corpus/struct   descriptions for fuzz_struct (tests/torchspace.from_bytes):
                byte strings that choose the files built
corpus/legacy_walk  legacy storage sections for fuzz_legacy_walk, each after
                the harness's description (storages, element sizes, counts)
Regression inputs found by fuzzing are added by hand beside the seeds
(names starting with "crash-" or "regress-").
"""
import collections
import io
import os
import zipfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def objects():
    torch.manual_seed(0)
    base = torch.arange(8, dtype=torch.float32)
    yield "tensor", torch.arange(4, dtype=torch.float32)
    yield "dtypes", {d: torch.ones(2, dtype=d) for d in (
        torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.uint8, torch.int16,
        torch.int32, torch.int64, torch.bool, torch.complex64)}
    yield "views", {"base": base, "view": base[2:6], "t": base.view(2, 4).t()}
    yield "state_dict", collections.OrderedDict(
        [("conv.weight", torch.randn(2, 1, 3, 3)), ("conv.bias", torch.zeros(2)),
         ("bn.num_batches_tracked", torch.tensor(3))])
    yield "meta", {"epoch": 3, "lr": 0.1, "name": "x", "steps": [1, 2, 3], "flag": True,
                   "pair": (1, None), "nested": {"a": {"b": 1.5}}, "big": 2**70, "b": b"\x00\x01"}
    yield "param", {"p": torch.nn.Parameter(torch.ones(3))}
    yield "empty", {"e": torch.empty(0), "s": torch.tensor(1.5)}
    yield "storage", {"st": torch.UntypedStorage(4)}


def objects_256():
    """Objects whose every storage holds 256 bytes (the records of
    fuzz_unpickle's archives)."""
    base = torch.arange(64, dtype=torch.float32)
    yield "tensor", torch.arange(64, dtype=torch.float32)
    yield "dtypes", {str(d): torch.ones(256 // torch.empty(0, dtype=d).element_size(), dtype=d)
                     for d in (torch.float16, torch.bfloat16, torch.float64, torch.int8,
                               torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool,
                               torch.complex64)}
    yield "views", {"base": base, "view": base[2:6], "t": base.view(8, 8).t()}
    yield "state_dict", collections.OrderedDict(
        [("conv.weight", torch.randn(4, 1, 4, 4)), ("conv.bias", torch.zeros(64)),
         ("bn.num_batches_tracked", torch.arange(32))])
    yield "param", {"p": torch.nn.Parameter(torch.ones(64))}
    yield "storage", {"st": torch.UntypedStorage(256)}
    yield "qtensor", {"q": torch.quantize_per_tensor(torch.ones(256), 0.5, 0, torch.quint8)}


def struct_seeds(folder):
    """Descriptions that pick each layout of torchspace.from_bytes once, and
    a few tensors through every rebuild function."""
    import random

    os.makedirs(folder, exist_ok=True)
    rng = random.Random(9)
    for layout in (0, 1, 4, 16):
        for k in range(4):
            data = bytes([layout, 2 + k]) + bytes(rng.randrange(256) for _ in range(64))
            with open(os.path.join(folder, f"seed-layout{layout}-{k}"), "wb") as f:
                f.write(data)


def legacy_walk_seeds(folder):
    """Storage sections as torch writes them (an 8-byte count, then the
    bytes, per storage), after fuzz_legacy_walk's description: byte 0 the
    number of storages (+ 0x10: the counts are expected), byte 1 where the
    walk starts, an element size per storage, the expected counts."""
    import struct

    os.makedirs(folder, exist_ok=True)

    def seed(name, storages, expected=True, start=0, tail=b"", cut=0, counts=None, section=None):
        """storages: (element size code, count) each; counts: the expected
        ones, when not those; cut: bytes cut off the section's end; section:
        the section's bytes, when not those of the storages."""
        head = bytes([len(storages) | (0x10 if expected else 0), start])
        head += bytes(e for e, _ in storages)
        if expected:
            head += b"".join(struct.pack("<Q", c) for c in counts or [c for _, c in storages])
        written = b"\xee" * start
        for e, c in storages:
            nbytes = (e if e < 0x80 else 1 << (e & 63)) * c
            data = bytes(range(256)) * (nbytes // 256) + bytes(nbytes % 256)
            written += struct.pack("<Q", c) + data
        section = written if section is None else section
        with open(os.path.join(folder, f"seed-{name}"), "wb") as f:
            f.write(head + (section + tail)[:len(section + tail) - cut])

    seed("none", [])
    seed("one-float", [(4, 4)])
    seed("state-dict", [(4, 18), (4, 2), (8, 1), (2, 6)])
    seed("empty-storage", [(4, 0), (1, 3)], tail=b"trailing bytes")
    seed("unexpected", [(8, 2), (1, 5)], expected=False)
    seed("offset", [(2, 3)], start=7)
    seed("elsize-large", [(0x84, 1), (0x80, 2)], expected=False)
    # one seed per fault
    seed("cut-count", [(4, 2), (1, 1)], cut=5)
    seed("cut-data", [(4, 2), (2, 4)], cut=3)
    seed("count-mismatch", [(4, 4), (4, 1)], counts=[4, 2])
    seed("count-overflow", [(0x84, 0)], expected=False, section=struct.pack("<Q", 2**61))
    seed("start-past-end", [(4, 1)], start=3, section=b"\0\0")


def openmmlab_objects():
    """What mmengine's Runner and mmcv's runners write besides tensors (the
    openmmlab data set): numpy arrays, dtypes and scalars, HistoryBuffers."""
    import numpy as np
    from mmengine.logging import HistoryBuffer, MessageHub

    hub = MessageHub("ckptio-seeds")
    for i in range(3):
        hub.update_scalar("train/loss", 1.0 / (i + 1))
        hub.update_scalar("train/lr", 0.01)
    hub.update_info("best_score", np.float64(0.75))
    hub_state = hub.state_dict()
    hub_state["log_scalars"]["empty"] = HistoryBuffer()
    yield "mmengine_message_hub", {
        "state_dict": {"w": torch.ones(2)}, "message_hub": hub_state,
        "meta": {"epoch": 2, "iter": 8, "seed": 0}}
    yield "numpy", {
        "f4": np.arange(6, dtype=np.float32).reshape(2, 3), "be": np.arange(3, dtype=">i8"),
        "b": np.array([True, False]), "u": np.array(["ab", "c"]), "s": np.array([b"x"]),
        "o": np.array([1, "a", None], dtype=object), "f": np.asfortranarray(np.eye(2)),
        "e": np.zeros((0, 2)), "z": np.array(1.5), "c": np.array([1 + 2j], dtype=np.complex64),
        "scalars": [np.float64(0.5), np.float32(1.5), np.int64(3), np.bool_(True),
                    np.str_("x"), np.float16(2.0), np.uint8(7)]}
    yield "mmcv_meta", {
        "state_dict": {"w": torch.ones(2)},
        "meta": {"hook_msgs": {"best_score": np.float64(0.5), "best_ckpt": "best.pth"},
                 "epoch": 2, "iter": 4, "mmcv_version": "1.7.2"}}


def main(only=()):
    if not only:
        struct_seeds(os.path.join(HERE, "corpus", "struct"))
        legacy_walk_seeds(os.path.join(HERE, "corpus", "legacy_walk"))
    dirs = {k: os.path.join(HERE, "corpus", k) for k in ("zip", "legacy", "unpickle")}
    for d in dirs.values():
        os.makedirs(d, exist_ok=True)
    for name, obj in list(objects()) + list(openmmlab_objects()):
        if only and name not in only:
            continue
        buf = io.BytesIO()
        torch.save(obj, buf)
        data = buf.getvalue()
        with open(os.path.join(dirs["zip"], f"seed-{name}.pt"), "wb") as f:
            f.write(data)
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            pkl = next(n for n in z.namelist() if n.endswith("/data.pkl"))
            with open(os.path.join(dirs["unpickle"], f"seed-{name}.pkl"), "wb") as f:
                f.write(z.read(pkl))
        buf = io.BytesIO()
        torch.save(obj, buf, _use_new_zipfile_serialization=False)
        with open(os.path.join(dirs["legacy"], f"seed-{name}.pt"), "wb") as f:
            f.write(buf.getvalue())
    for name, obj in objects_256():
        buf = io.BytesIO()
        torch.save(obj, buf)
        with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as z:
            pkl = next(n for n in z.namelist() if n.endswith("/data.pkl"))
            assert all(i.file_size == 256 for i in z.infolist() if "/data/" in i.filename)
            with open(os.path.join(dirs["unpickle"], f"seed256-{name}.pkl"), "wb") as f:
                f.write(z.read(pkl))
    print("seeds written under", os.path.join(HERE, "corpus"))


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])

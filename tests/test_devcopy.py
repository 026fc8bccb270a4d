"""Batched device-to-host copies (src/core/devcopy.c, src/binding/hostcopy.c,
ckptio/_hostcopy.py) against a fake CUDA runtime, tests/fake_cudart.c,
built here into a shared object: its "device pointers" are host addresses
and it counts every call, so the batch plan, the storage sharing, the error
paths and the freeing of the pinned arena are all checked without a GPU.
"""
import collections
import ctypes
import ctypes.util
import gc
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ckptio
from ckptio import _hostcopy, _native
from ckptio.compat import mmcv_save as _mmsave
from helpers import tensor_bytes

HERE = os.path.dirname(os.path.abspath(__file__))
CALLS = [
    "malloc_host",
    "free_host",
    "memcpy_async",
    "stream_create",
    "stream_synchronize",
    "stream_destroy",
    "get_last_error",
    "set_device",
    "get_device",
]


class Fake:
    """The fake runtime's counters and failure switches, through ctypes."""

    def __init__(self, path):
        self.path = path
        # ctypes keeps its own reference: the library (and its counters)
        # stays loaded when ckptio drops the last arena's reference
        self.lib = ctypes.CDLL(path)
        self._calls = (ctypes.c_long * len(CALLS)).in_dll(self.lib, "fake_calls")

    def calls(self):
        return dict(zip(CALLS, self._calls))

    def var(self, name, ctype=ctypes.c_long):
        return ctype.in_dll(self.lib, name)

    def live_bytes(self):
        return self.var("fake_live_host_bytes").value


@pytest.fixture(scope="module")
def fake_path(tmp_path_factory):
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        pytest.skip("no C compiler for the fake CUDA runtime")
    out = str(tmp_path_factory.mktemp("fake") / "libfake_cudart.so")
    subprocess.run(
        [cc, "-shared", "-fPIC", "-O1", "-Wall", "-Wextra", "-Werror",
         os.path.join(HERE, "fake_cudart.c"), "-o", out],
        check=True,
    )
    return out


@pytest.fixture
def fake(fake_path, monkeypatch):
    """The fake runtime in use for ckptio, CPU tensors treated as device
    tensors, failure switches reset."""
    monkeypatch.setenv("CKPTIO_CUDART", fake_path)
    monkeypatch.setattr(_hostcopy, "BATCH_DEVICES", ("cuda", "cpu"))
    f = Fake(fake_path)
    for name in ("fake_fail_memcpy_async", "fake_fail_malloc_host",
                 "fake_fail_stream_synchronize"):
        f.var(name).value = 0
    f.var("fake_current_device", ctypes.c_int).value = 0
    gc.collect()
    assert f.live_bytes() == 0
    yield f
    gc.collect()


def delta(before, after):
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


def buffers(*sizes):
    """Host buffers standing in for device memory: (array, segment) pairs."""
    out = []
    for i, n in enumerate(sizes):
        a = (np.arange(n, dtype=np.uint32) * 2654435761 + i).astype(np.uint8)
        out.append((a, (a.ctypes.data, n, 0)))
    return out


# ---- copy_to_host: the plan and the copy ----------------------------------------


def test_plan_offsets_are_aligned_in_order_and_bytes_arrive(fake):
    bufs = buffers(1, 63, 64, 65, 1000, 7)
    before = fake.calls()
    arena, offsets = _native.copy_to_host([seg for _, seg in bufs], fake.path)
    assert arena.pinned and "pinned" in repr(arena)
    assert len(offsets) == len(bufs)
    end = 0
    for (a, (_, n, _)), off in zip(bufs, offsets):
        assert off % 64 == 0 and off >= end and off - end < 64
        end = off + n
    assert arena.size == end
    view = memoryview(arena)
    for (a, (_, n, _)), off in zip(bufs, offsets):
        assert bytes(view[off:off + n]) == a.tobytes()
    d = delta(before, fake.calls())
    assert d == {"malloc_host": 1, "memcpy_async": 6, "stream_create": 1,
                 "stream_synchronize": 1, "stream_destroy": 1, "set_device": 4,
                 "get_device": 1}
    assert fake.live_bytes() == end
    del view, arena
    gc.collect()
    assert fake.live_bytes() == 0
    assert fake.calls()["free_host"] == before["free_host"] + 1


def test_one_stream_per_device_and_current_device_restored(fake):
    bufs = buffers(10, 20, 30, 40)
    segs = [(p, n, dev) for (_, (p, n, _)), dev in zip(bufs, [2, 0, 2, 5])]
    fake.var("fake_current_device", ctypes.c_int).value = 3
    bad_before = fake.var("fake_bad_stream_use").value
    before = fake.calls()
    arena, offsets = _native.copy_to_host(segs, fake.path)
    d = delta(before, fake.calls())
    assert d["stream_create"] == 3 and d["stream_destroy"] == 3
    assert d["stream_synchronize"] == 3 and d["memcpy_async"] == 4
    assert fake.var("fake_bad_stream_use").value == bad_before
    assert fake.var("fake_current_device", ctypes.c_int).value == 3
    view = memoryview(arena)
    for (a, (_, n, _)), off in zip(bufs, offsets):
        assert bytes(view[off:off + n]) == a.tobytes()


def test_many_segments_of_random_sizes_on_several_devices(fake):
    rng = np.random.default_rng(7)
    sizes = rng.integers(0, 5000, size=300)
    arrays = [rng.integers(0, 256, size=int(n), dtype=np.uint8) for n in sizes]
    devices = rng.integers(0, 4, size=300)
    segs = [(a.ctypes.data if a.size else 0, a.size, int(d)) for a, d in zip(arrays, devices)]
    before = fake.calls()
    arena, offsets = _native.copy_to_host(segs, fake.path)
    view = memoryview(arena)
    end = 0
    for a, off in zip(arrays, offsets):
        assert off % 64 == 0 and off >= end
        assert bytes(view[off:off + a.size]) == a.tobytes()
        end = off + a.size
    assert arena.size == end
    d = delta(before, fake.calls())
    assert d["memcpy_async"] == sum(1 for a in arrays if a.size)
    assert d["stream_create"] == d["stream_destroy"] == len(set(devices.tolist()))


def test_invalid_device_fails_cleanly(fake):
    bufs = buffers(10, 10)
    segs = [bufs[0][1], (bufs[1][1][0], 10, 9)]  # the fake has devices 0..7
    before = fake.calls()
    with pytest.raises(ckptio.CheckpointError,
                       match=r"cudaSetDevice failed: invalid device ordinal \(CUDA error 101\)"):
        _native.copy_to_host(segs, fake.path)
    d = delta(before, fake.calls())
    assert d["malloc_host"] == d["free_host"] == 1
    assert d["stream_create"] == d["stream_destroy"] == 1
    assert "memcpy_async" not in d
    assert fake.live_bytes() == 0
    assert fake.var("fake_current_device", ctypes.c_int).value == 0


def test_pageable_arena_needs_no_pinned_allocation(fake):
    bufs = buffers(5, 500, 50)
    before = fake.calls()
    arena, offsets = _native.copy_to_host([seg for _, seg in bufs], fake.path, pinned=False)
    assert not arena.pinned and "pageable" in repr(arena)
    view = memoryview(arena)
    for (a, (_, n, _)), off in zip(bufs, offsets):
        assert off % 64 == 0 and bytes(view[off:off + n]) == a.tobytes()
    del view, arena
    gc.collect()
    d = delta(before, fake.calls())
    assert "malloc_host" not in d and "free_host" not in d
    assert d["memcpy_async"] == 3 and d["stream_synchronize"] == 1
    assert fake.live_bytes() == 0


def test_pageable_arena_failing_copy(fake):
    bufs = buffers(100, 200)
    fake.var("fake_fail_memcpy_async").value = fake.calls()["memcpy_async"] + 2
    with pytest.raises(ckptio.CheckpointError, match="cudaMemcpyAsync failed"):
        _native.copy_to_host([seg for _, seg in bufs], fake.path, pinned=False)


def test_weights_to_cpu_with_pageable_arena(fake, monkeypatch):
    monkeypatch.setenv("CKPTIO_PINNED", "0")
    sd = mixed_state()
    before = fake.calls()
    got = ckptio.weights_to_cpu(sd)
    for k in sd:
        assert tensor_bytes(got[k]) == tensor_bytes(sd[k]), k
    assert "malloc_host" not in delta(before, fake.calls())


def test_empty_batch_and_empty_segments_allocate_nothing(fake):
    before = fake.calls()
    arena, offsets = _native.copy_to_host([], fake.path)
    assert arena.size == 0 and offsets == ()
    arena, offsets = _native.copy_to_host([(0, 0, 0), (0, 0, 1)], fake.path)
    assert arena.size == 0 and offsets == (0, 0)
    assert fake.calls()["malloc_host"] == before["malloc_host"]


@pytest.mark.parametrize(
    "segments, exc, text",
    [
        ([(1, 2)], TypeError, "segment 0 must be a (data_ptr, nbytes, device) tuple"),
        ([[1, 2, 0]], TypeError, "segment 0 must be"),
        ([(1, 2, -1)], ValueError, "segment 0: bad device index"),
        ([(1, 2, 1 << 40)], ValueError, "segment 0: bad device index"),
        ([(0, 8, 0)], ValueError, "segment 0: null data pointer"),
        ([(1, -8, 0)], OverflowError, ""),
        ([(-1, 8, 0)], OverflowError, ""),
        ([(1, 2, 0), (1, 2**64 - 1, 0)], ValueError, "the arena size overflows"),
        (5, TypeError, "segments must be a sequence"),
    ],
)
def test_bad_segments(fake, segments, exc, text):
    before = fake.calls()
    with pytest.raises(exc) as info:
        _native.copy_to_host(segments, fake.path)
    assert text in str(info.value)
    assert fake.calls()["malloc_host"] == before["malloc_host"]


@pytest.mark.parametrize("which", [1, 2, 5])
def test_failing_copy_raises_and_frees_the_arena(fake, which):
    bufs = buffers(100, 200, 300, 400, 500)
    before = fake.calls()
    fake.var("fake_fail_memcpy_async").value = before["memcpy_async"] + which
    with pytest.raises(ckptio.CheckpointError) as info:
        _native.copy_to_host([seg for _, seg in bufs], fake.path)
    assert "cudaMemcpyAsync failed: invalid argument (CUDA error 1)" in str(info.value)
    d = delta(before, fake.calls())
    assert d["malloc_host"] == 1 and d["free_host"] == 1
    assert d["memcpy_async"] == which
    assert d["stream_create"] == d["stream_destroy"] == d["stream_synchronize"] == 1
    assert d["get_last_error"] >= 1
    assert fake.live_bytes() == 0
    assert fake.var("fake_last_error", ctypes.c_int).value == 0


def test_failing_synchronisation_raises_and_frees_the_arena(fake):
    bufs = buffers(100, 200)
    before = fake.calls()
    fake.var("fake_fail_stream_synchronize").value = before["stream_synchronize"] + 1
    with pytest.raises(ckptio.CheckpointError, match="cudaStreamSynchronize failed"):
        _native.copy_to_host([seg for _, seg in bufs], fake.path)
    assert fake.live_bytes() == 0
    d = delta(before, fake.calls())
    assert d["free_host"] == 1 and d["stream_destroy"] == 1


def test_failing_pinned_allocation_is_memory_error(fake):
    bufs = buffers(100)
    before = fake.calls()
    fake.var("fake_fail_malloc_host").value = before["malloc_host"] + 1
    with pytest.raises(MemoryError, match="cudaMallocHost failed: out of memory"):
        _native.copy_to_host([seg for _, seg in bufs], fake.path)
    d = delta(before, fake.calls())
    assert "memcpy_async" not in d and "stream_create" not in d and "free_host" not in d
    assert fake.live_bytes() == 0


def test_library_that_cannot_be_opened(tmp_path):
    with pytest.raises(ckptio.CheckpointError, match="cannot open the CUDA runtime"):
        _native.copy_to_host([], str(tmp_path / "missing.so"))


def test_library_without_the_runtime_functions():
    libm = ctypes.util.find_library("m")
    if libm is None:
        pytest.skip("no libm to stand in for a library without cudart's functions")
    with pytest.raises(ckptio.CheckpointError, match="has no cudaMallocHost"):
        _native.copy_to_host([], libm)


# ---- batch_to_cpu: tensors over the arena --------------------------------------

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.complex64,
          torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
          torch.float8_e4m3fn]


def mixed_state():
    """Tensors of many dtypes, views at odd offsets and strides, and storages
    shared between several entries (also under different dtypes)."""
    g = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 256, (4099,), dtype=torch.uint8, generator=g)
    sd = collections.OrderedDict()
    for i, dt in enumerate(DTYPES):
        n = 17 + i
        sd[f"t{i}"] = raw[: n * torch.empty(0, dtype=dt).element_size()].clone().view(dt)
    big = torch.randn(40, 30, generator=g)
    sd["big"] = big
    sd["big.t"] = big.t()
    sd["big.row"] = big[7]
    sd["big.col"] = big[:, 3]
    sd["big.tail"] = big.view(-1)[1001:1003]
    sd["big.as_int"] = big.view(torch.int32)[5:9]
    sd["big.as_half"] = big.view(torch.float16)[3:11]
    sd["expand"] = torch.arange(5.0).expand(4, 5)
    sd["scalar"] = torch.tensor(3.5)
    sd["far"] = torch.arange(10000, dtype=torch.int64)[9000:9004]
    sd["param"] = torch.nn.Parameter(torch.ones(3), requires_grad=False)
    return sd


def test_batch_matches_per_tensor_cpu_and_shares_storages(fake):
    sd = mixed_state()
    before = fake.calls()
    out = _hostcopy.batch_to_cpu(sd.values())
    assert set(out) == {id(v) for v in sd.values()}
    got = collections.OrderedDict((k, out[id(v)]) for k, v in sd.items())
    for k, v in sd.items():
        r = got[k]
        assert type(r) is torch.Tensor and r.device.type == "cpu"
        assert r.dtype == v.dtype and r.shape == v.shape and r.stride() == v.stride()
        assert tensor_bytes(r) == tensor_bytes(v), k
        assert r.untyped_storage().data_ptr() != v.untyped_storage().data_ptr()
    # one copy per distinct (source storage, dtype), in one allocation
    storages = {(v.untyped_storage().data_ptr(), v.dtype) for v in sd.values()}
    d = delta(before, fake.calls())
    assert d["malloc_host"] == 1 and d["memcpy_async"] == len(storages)
    # sharing: same source storage and dtype <=> same destination storage
    for a in sd:
        for b in sd:
            same_src = (
                sd[a].untyped_storage().data_ptr() == sd[b].untyped_storage().data_ptr()
                and sd[a].dtype == sd[b].dtype
            )
            same_dst = got[a].untyped_storage().data_ptr() == got[b].untyped_storage().data_ptr()
            assert same_src == same_dst, (a, b)
    # writes through one view are seen by the others, as on the device
    got["big.row"][0] = 123.0
    assert got["big"][7, 0] == 123.0 and got["big.t"][0, 7] == 123.0


def test_only_the_span_in_use_is_copied(fake):
    whole = torch.arange(100000, dtype=torch.float32)
    part = whole[50000:50010]
    before = fake.live_bytes()
    out = _hostcopy.batch_to_cpu([part])
    r = out[id(part)]
    assert torch.equal(r, part)
    # the span starts at a 64-byte boundary at or below the tensor's bytes
    assert fake.live_bytes() - before < 40 + 64
    assert r.untyped_storage().nbytes() < 40 + 64


def test_arena_lives_until_the_last_tensor_dies(fake):
    sd = mixed_state()
    before = fake.calls()
    got = ckptio.weights_to_cpu(sd)
    assert fake.live_bytes() > 0
    keep = got["big.col"]
    del got
    gc.collect()
    assert fake.live_bytes() > 0 and fake.calls()["free_host"] == before["free_host"]
    assert torch.equal(keep, sd["big.col"])
    del keep
    gc.collect()
    assert fake.live_bytes() == 0
    assert fake.calls()["free_host"] == before["free_host"] + 1


def test_weights_to_cpu_batched_equals_mmcv_semantics(fake):
    sd = mixed_state()
    sd["grad"] = torch.nn.Parameter(torch.ones(2))  # needs autograd: .cpu()
    sd["empty"] = torch.empty(0, 3)
    sd._metadata = collections.OrderedDict({"": {"version": 1}})
    expected = collections.OrderedDict((k, v.cpu()) for k, v in sd.items())
    got = ckptio.weights_to_cpu(sd)
    assert type(got) is collections.OrderedDict and list(got) == list(sd)
    assert got._metadata is sd._metadata
    for k in sd:
        # a device-to-host copy of a Parameter is a plain Tensor, as any
        # other copy across devices (here: to "meta") shows
        copied_type = type(sd[k].to("meta")) if k not in ("grad", "empty") else type(sd[k])
        assert type(got[k]) is copied_type, k
        assert tensor_bytes(got[k]) == tensor_bytes(expected[k]), k
        assert got[k].stride() == expected[k].stride(), k
    assert got["grad"] is sd["grad"]
    assert got["empty"] is sd["empty"]


def test_weights_to_cpu_falls_back_to_pageable_when_pinning_fails(fake):
    sd = mixed_state()
    before = fake.calls()
    fake.var("fake_fail_malloc_host").value = before["malloc_host"] + 1
    got = ckptio.weights_to_cpu(sd)
    for k in sd:
        assert tensor_bytes(got[k]) == tensor_bytes(sd[k]), k
    d = delta(before, fake.calls())
    assert d["malloc_host"] == 1 and "free_host" not in d
    assert d["memcpy_async"] >= len({(v.untyped_storage().data_ptr(), v.dtype) for v in sd.values()})
    assert fake.live_bytes() == 0


def test_failing_copy_in_weights_to_cpu_leaves_nothing(fake):
    sd = mixed_state()
    fake.var("fake_fail_memcpy_async").value = fake.calls()["memcpy_async"] + 3
    with pytest.raises(ckptio.CheckpointError, match="cudaMemcpyAsync failed"):
        ckptio.weights_to_cpu(sd)
    gc.collect()
    assert fake.live_bytes() == 0


def test_saved_batched_state_loads_back(fake, tmp_path):
    sd = mixed_state()
    got = ckptio.weights_to_cpu(sd)
    path = tmp_path / "w.pth"
    _mmsave._writer()(got, str(path))
    back = torch.load(str(path), weights_only=True)
    for k in sd:
        assert tensor_bytes(back[k]) == tensor_bytes(sd[k]), k


# ---- without a runtime or without device tensors ---------------------------


def test_cpu_only_state_is_mmcv_result_and_touches_no_runtime(monkeypatch, tmp_path):
    monkeypatch.setenv("CKPTIO_CUDART", str(tmp_path / "never-opened.so"))
    sd = mixed_state()
    got = ckptio.weights_to_cpu(sd)
    for k, v in sd.items():
        assert got[k] is v  # .cpu() of a CPU tensor is the tensor itself
    assert got._metadata == collections.OrderedDict()


def cuda_runtime_installed():
    return ctypes.util.find_library("cudart") is not None or any(
        "libcudart" in line for line in open("/proc/self/maps")
    )


def test_no_runtime_found_returns_none():
    if cuda_runtime_installed():
        pytest.skip("a CUDA runtime is present on this machine")
    a = np.arange(8, dtype=np.uint8)
    assert _native.copy_to_host([(a.ctypes.data, 8, 0)]) is None


def test_no_runtime_weights_to_cpu_falls_back(monkeypatch):
    if cuda_runtime_installed():
        pytest.skip("a CUDA runtime is present on this machine")
    monkeypatch.delenv("CKPTIO_CUDART", raising=False)
    monkeypatch.setattr(_hostcopy, "BATCH_DEVICES", ("cuda", "cpu"))
    sd = mixed_state()
    got = ckptio.weights_to_cpu(sd)
    for k, v in sd.items():
        assert got[k] is v


def test_real_runtime_without_a_gpu_fails_cleanly():
    """A real libcudart on a machine with no usable GPU (this one, when the
    CUDA toolkit is installed): a clean CheckpointError, nothing allocated."""
    lib = ctypes.util.find_library("cudart")
    if lib is None:
        pytest.skip("no CUDA runtime installed")
    if os.path.exists("/dev/nvidiactl"):
        pytest.skip("a GPU driver is present: tests/gpu/check_devcopy.py covers this machine")
    a = np.arange(8, dtype=np.uint8)
    with pytest.raises(ckptio.CheckpointError, match=r"copy_to_host: device-to-host copy: cuda\w+ failed: .*\(CUDA error \d+\)"):
        _native.copy_to_host([(a.ctypes.data, 8, 0)], lib)


def test_save_checkpoint_through_the_batch_equals_mmcv_file(fake, tmp_path):
    """The whole save path with every tensor going through the fake
    runtime: the file reads back equal to one written from plain tensors."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Linear(4, 4))
    net[2].weight = torch.nn.Parameter(net[2].weight.detach().t())  # a non-contiguous parameter
    before = fake.calls()
    ckptio.save_checkpoint(net, str(tmp_path / "batched.pth"), meta={"e": 1})
    d = delta(before, fake.calls())
    assert d["malloc_host"] == 1 and d["memcpy_async"] == len(net.state_dict())  # one per storage
    back = torch.load(str(tmp_path / "batched.pth"), weights_only=True)
    expected = _mmsave.get_state_dict(net)
    assert list(back["state_dict"]) == list(expected)
    for k, v in expected.items():
        assert tensor_bytes(back["state_dict"][k]) == tensor_bytes(v), k
        assert back["state_dict"][k].stride() == v.stride(), k
    assert back["meta"]["e"] == 1


@st.composite
def views_of_storages(draw):
    """A few storages, each with a few in-bounds strided views of one or two
    dtypes (equal element sizes), as a model's tensors might be."""
    out = []
    for s in range(draw(st.integers(1, 3))):
        dtypes = draw(st.sampled_from([
            (torch.float32, torch.int32), (torch.float16, torch.bfloat16),
            (torch.int64, torch.float64), (torch.uint8, torch.bool), (torch.float32,),
        ]))
        numel = draw(st.integers(1, 3000))
        base = torch.randint(0, 2, (numel,), dtype=torch.uint8) if dtypes[0] is torch.uint8 \
            else torch.arange(numel, dtype=torch.float64).to(dtypes[0])
        for _ in range(draw(st.integers(1, 4))):
            dt = draw(st.sampled_from(dtypes))
            src = base.view(dt)
            ndim = draw(st.integers(0, 3))
            shape = [draw(st.integers(1, 6)) for _ in range(ndim)]
            stride = [draw(st.integers(0, 40)) for _ in range(ndim)]
            reach = sum((n - 1) * s for n, s in zip(shape, stride)) + 1
            if reach > numel:
                continue
            offset = draw(st.integers(0, numel - reach))
            out.append(src.as_strided(shape, stride, offset))
    return out


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(views=views_of_storages())
def test_random_views_copy_exactly_and_share_as_their_sources(fake, views):
    out = _hostcopy.batch_to_cpu(views)
    for v in views:
        r = out[id(v)]
        assert r.dtype == v.dtype and r.shape == v.shape and r.stride() == v.stride()
        assert tensor_bytes(r) == tensor_bytes(v)
    for a in views:
        for b in views:
            same_src = (a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
                        and a.dtype == b.dtype)
            same_dst = (out[id(a)].untyped_storage().data_ptr()
                        == out[id(b)].untyped_storage().data_ptr())
            assert same_src == same_dst


def test_save_copier_batches_storages_and_keeps_their_bytes(fake):
    # the fixture lets CPU storages stand in for device ones
    storages = [
        torch.arange(1000, dtype=torch.float32).untyped_storage(),
        torch.empty(0).untyped_storage(),
        torch.arange(7, dtype=torch.uint8).untyped_storage(),
    ]
    before = fake.calls()
    out = _hostcopy.storages_to_cpu(storages)
    d = delta(before, fake.calls())
    assert d["malloc_host"] == 1 and d["memcpy_async"] == 2  # the empty one is not copied
    assert len(out) == len(storages)
    for src, dst in zip(storages, out):
        assert dst.device.type == "cpu" and dst.nbytes() == src.nbytes()
        assert bytes(dst) == bytes(src)
        if src.nbytes():
            assert dst.data_ptr() != src.data_ptr()
    del out, dst
    gc.collect()
    assert delta(before, fake.calls()).get("free_host") == 1


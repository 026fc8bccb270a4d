"""The table of src/binding/errors.h, ck_raise_status: what each core status
becomes in Python, for each origin of the failing input (a checkpoint file,
the caller's arguments, a download). Every row reaches the status through a
real path (a hostile file, bad segments, the fake CUDA runtime of
test_devcopy, a download that cannot start), and checks the exception's type
and its whole message, so a change of the mapping in either column shows."""
import ctypes
import ctypes.util
import errno
import os

import numpy as np
import pytest

import ckptio
from ckptio import _native
from faultserver import FaultServer
from test_devcopy import buffers, fake, fake_path  # noqa: F401 (fixtures)

HERE = os.path.dirname(os.path.abspath(__file__))
ATTACKS = os.path.join(HERE, "attacks")
NO_LIBRARY = "/nonexistent/libcudart.so"


def raised(call):
    with pytest.raises(BaseException) as info:
        call()
    return info.value


# ---- origin: a checkpoint file (ck_raise_core) ------------------------------


def test_file_io_with_errno_is_the_errnos_oserror_with_the_file_name(tmp_path):
    path = str(tmp_path / "missing.pth")
    e = raised(lambda: ckptio.load(path))
    assert type(e) is FileNotFoundError
    assert e.errno == errno.ENOENT and e.filename == path
    assert e.strerror == "cannot open the file: No such file or directory"


@pytest.mark.parametrize(
    "status, name, message",
    [
        ("format", None, "too short to be a zip archive (11 bytes)"),
        ("range", "zip_overlapping_records.pt",
         "records 'archive/data.pkl' and 'archive/byteorder' overlap"),
        ("crc", "zip_deflate_bad_crc.pt",
         "record 'archive/data/0' fails its CRC-32 check (8ba71454, expected deadbeef)"),
    ],
)
def test_file_statuses_are_checkpoint_errors_named_by_the_file(tmp_path, status, name, message):
    if name is None:
        path = str(tmp_path / "short.pth")
        with open(path, "wb") as f:
            f.write(b"PK\x03\x04garbage")
    else:
        path = os.path.join(ATTACKS, name)
    e = raised(lambda: ckptio.load(path))
    # a file's bad offset is the file's fault: CheckpointError, not ValueError
    assert type(e) is ckptio.CheckpointError, status
    assert str(e) == f"{path}: {message}"


# ---- origin: the caller's arguments (copy_to_host, copy_into) --------------


def test_caller_range_is_value_error():
    a = np.arange(16, dtype=np.uint8)
    e = raised(lambda: _native.copy_into(bytearray(8), [(a.ctypes.data, 16, -1, 0)]))
    assert type(e) is ValueError
    assert str(e) == "copy_into: segment 0 lies outside the arena"


def test_caller_limit_is_value_error():
    e = raised(lambda: _native.copy_to_host([(1, 2, 0), (1, 2**64 - 1, 0)], NO_LIBRARY))
    assert type(e) is ValueError
    assert str(e) == "copy_to_host: segment 1: the arena size overflows"


@pytest.mark.parametrize("entry", ["copy_to_host", "copy_into"])
def test_caller_notfound_is_checkpoint_error(entry):
    a = np.arange(16, dtype=np.uint8)
    if entry == "copy_to_host":
        e = raised(lambda: _native.copy_to_host([], NO_LIBRARY))
    else:
        e = raised(lambda: _native.copy_into(bytearray(8), [(a.ctypes.data, 4, 0, 0)], NO_LIBRARY))
    assert type(e) is ckptio.CheckpointError
    assert str(e).startswith(f"{entry}: cannot open the CUDA runtime {NO_LIBRARY}: ")


def test_caller_format_is_checkpoint_error():
    libm = ctypes.util.find_library("m")
    if libm is None:
        pytest.skip("no libm to stand in for a library without cudart's functions")
    e = raised(lambda: _native.copy_to_host([], libm))
    assert type(e) is ckptio.CheckpointError
    assert str(e) == f"copy_to_host: the CUDA runtime {libm} has no cudaMallocHost"


@pytest.mark.parametrize("entry", ["copy_to_host", "copy_into"])
def test_caller_io_without_errno_is_checkpoint_error_of_the_copy(fake, entry):  # noqa: F811
    bufs = buffers(100, 200)
    fake.var("fake_fail_memcpy_async").value = fake.calls()["memcpy_async"] + 1
    if entry == "copy_to_host":
        e = raised(lambda: _native.copy_to_host([seg for _, seg in bufs], fake.path))
    else:
        segs = [(seg[0], seg[1], 0, off) for (_, seg), off in zip(bufs, (0, 100))]
        e = raised(lambda: _native.copy_into(bytearray(300), segs, fake.path))
    assert type(e) is ckptio.CheckpointError
    assert str(e) == (f"{entry}: device-to-host copy: cudaMemcpyAsync failed: "
                      "invalid argument (CUDA error 1)")


def test_caller_nomem_is_memory_error_naming_the_arena(fake):  # noqa: F811
    bufs = buffers(100)
    fake.var("fake_fail_malloc_host").value = fake.calls()["malloc_host"] + 1
    e = raised(lambda: _native.copy_to_host([seg for _, seg in bufs], fake.path))
    assert type(e) is MemoryError
    assert str(e) == ("copy_to_host: 100 bytes of pinned memory: "
                      "cudaMallocHost failed: out of memory (CUDA error 2)")


# ---- origin: a download (every status but NOMEM is DownloadError) ----------


def test_download_io_with_errno_is_download_error_with_errno(tmp_path):
    url = "http://127.0.0.1:9/x"
    dst = str(tmp_path / "missing" / "f.bin")
    e = raised(lambda: _native.download(url, dst, retries=0))
    assert type(e) is ckptio.DownloadError
    assert e.errno == errno.ENOENT and e.filename is None
    assert str(e) == f"[Errno 2] cannot create {dst}.partial: No such file or directory"
    assert e.url == url and e.status == 0


def test_download_range_is_download_error_not_value_error(tmp_path):
    url = "http://127.0.0.1:9/x"
    e = raised(lambda: _native.download(url, str(tmp_path / "f"), hash_prefix="0" * 65))
    assert type(e) is ckptio.DownloadError
    assert e.errno is None
    assert str(e) == "hash prefix longer than a SHA-256 digest"
    assert e.url == url and e.status == 0


def test_download_http_is_download_error_with_the_status(tmp_path):
    with FaultServer(b"x" * 100) as server:
        server.plan = ["404"]
        e = raised(lambda: _native.download(server.url(), str(tmp_path / "f"), backoff=0.0))
        url = server.url()
    assert type(e) is ckptio.DownloadError
    assert e.errno is None and e.status == 404 and e.url == url
    assert str(e).startswith(f"HTTP 404 from {url}")


def test_download_error_for_a_path_that_is_not_utf8(tmp_path):
    # the core's message quotes the path's bytes; it used to fail to decode
    # (UnicodeDecodeError in place of the DownloadError)
    url = "http://127.0.0.1:9/x"
    missing = os.fsencode(str(tmp_path)) + b"/\xff"
    e = raised(lambda: _native.download(url, os.fsdecode(missing + b"/f.bin"), retries=0))
    assert type(e) is ckptio.DownloadError
    assert e.errno == errno.ENOENT and e.url == url
    assert str(e) == (f"[Errno 2] cannot create {tmp_path}/\ufffd/f.bin.partial: "
                      "No such file or directory")

"""What ckptio.save does with its target path, checked mid-save from outside
the saving process: an O_TMPFILE inode (no directory entry) where the file
system has it, a named temporary otherwise, stale temporaries of killed
saves cleared by the next save in the directory, and targets that are not
regular files (links, loops, FIFOs, devices, directories) handled as
torch.save handles them."""
import contextlib
import errno
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

import ckptio
from ckptio.saving import save_with
from helpers import fds_into

HERE = os.path.dirname(os.path.abspath(__file__))
# the ckptio under test (the in-place build, or build/asan under make asan)
PKG_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(ckptio.__file__)))

TEMP_RE = re.compile(r"^\..+\.ckptio-(\d+)-(\d+)$")


def temporaries(directory):
    return sorted(n for n in os.listdir(directory) if TEMP_RE.match(n))


class Saver:
    """A child process that builds a large checkpoint, then saves it to
    target when told (one line on stdin), and reports "done"."""

    def __init__(self, target, megabytes=128, named_temp=False, seed=0):
        code = f"""
            import sys, torch, ckptio
            from ckptio.saving import save_with
            obj = {{"w": torch.full(({megabytes} << 18,), {seed}.0), "seed": {seed}}}
            print("ready", flush=True)
            sys.stdin.readline()
            save_with(obj, {str(target)!r}, named_temp={named_temp!r})
            print("done", flush=True)
        """
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([PKG_ROOT, HERE]))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(code)], env=env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "ready"
        self.directory = os.path.dirname(os.path.abspath(target))

    def open_files_in_dir(self):
        """readlink of each descriptor of the child that points into the
        target's directory."""
        return [link for _, link in fds_into(self.proc.pid, self.directory)]

    def start_and_stop_mid_write(self, timeout=60):
        """Starts the save and SIGSTOPs the child as soon as it has a file
        open in the target's directory; returns that file's link text."""
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            links = self.open_files_in_dir()
            if links:
                os.kill(self.proc.pid, signal.SIGSTOP)
                return links[0]
            if self.proc.poll() is not None:
                break
        raise AssertionError("the save was never seen with its file open")

    @contextlib.contextmanager
    def stopped_mid_write(self):
        """start_and_stop_mid_write; the block gets the link text, and the
        save is resumed when it ends, whatever happens in it."""
        link = self.start_and_stop_mid_write()
        try:
            yield link
        finally:
            self.resume()

    def resume(self):
        os.kill(self.proc.pid, signal.SIGCONT)
        out, _ = self.proc.communicate(timeout=120)
        assert self.proc.returncode == 0 and out.strip() == "done"

    def kill(self):
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.proc.stdin.close()
        self.proc.stdout.close()


def o_tmpfile_supported(directory):
    try:
        fd = os.open(directory, os.O_TMPFILE | os.O_WRONLY, 0o600)
    except (AttributeError, OSError):
        return False
    os.close(fd)
    return True


def seed_of(path):
    return torch.load(path, weights_only=True)["seed"]


# ---- O_TMPFILE and the named fallback --------------------------------------------------

def test_save_writes_an_unnamed_o_tmpfile_inode(tmp_path):
    """Mid-save, the directory holds only the old target: the new content is
    an O_TMPFILE inode ("/dir/#<inode> (deleted)" in /proc), named only for
    the rename at the end."""
    assert o_tmpfile_supported(tmp_path), "CI file systems (ext4, tmpfs, xfs) have O_TMPFILE"
    target = tmp_path / "ckpt.pth"
    ckptio.save({"seed": -1}, target)
    saver = Saver(target, seed=1)
    with saver.stopped_mid_write() as link:
        assert re.fullmatch(re.escape(str(tmp_path)) + r"/#\d+ \(deleted\)", link), link
        assert sorted(os.listdir(tmp_path)) == ["ckpt.pth"]
        assert seed_of(target) == -1
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pth"]
    assert seed_of(target) == 1


def test_kill_9_of_an_o_tmpfile_save_leaves_nothing(tmp_path):
    target = tmp_path / "ckpt.pth"
    ckptio.save({"seed": -1}, target)
    saver = Saver(target, seed=1)
    saver.start_and_stop_mid_write()
    saver.kill()
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pth"]
    assert seed_of(target) == -1


def test_named_fallback_writes_a_dot_temporary(tmp_path):
    """Without O_TMPFILE (forced here: named_temp), the new content is a
    named temporary ".<name>.ckptio-<pid>-<n>" beside the target."""
    target = tmp_path / "ckpt.pth"
    save_with({"seed": -1}, target, named_temp=True)
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pth"]
    saver = Saver(target, named_temp=True, seed=2)
    with saver.stopped_mid_write() as link:
        names = temporaries(tmp_path)
        assert names == [f".ckpt.pth.ckptio-{saver.proc.pid}-0"]
        assert link == str(tmp_path / names[0])
        assert seed_of(target) == -1
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pth"]
    assert seed_of(target) == 2


# ---- stale temporaries --------------------------------------------------------------------

def test_temporary_of_a_killed_save_is_removed_by_a_save_of_another_file(tmp_path):
    target = tmp_path / "epoch_1.pth"
    saver = Saver(target, named_temp=True, seed=1)
    saver.start_and_stop_mid_write()
    saver.kill()
    left = temporaries(tmp_path)
    assert left == [f".epoch_1.pth.ckptio-{saver.proc.pid}-0"]
    assert not target.exists()
    # any save in the directory clears it, not only one to the same path
    ckptio.save({"seed": 5}, tmp_path / "epoch_2.pth")
    assert temporaries(tmp_path) == []
    assert sorted(os.listdir(tmp_path)) == ["epoch_2.pth"]


def test_temporary_of_a_live_save_is_left_alone(tmp_path):
    """A concurrent save's temporary (its process stopped, alive, holding the
    temporary's lock) survives other saves in the directory, and that save
    then completes."""
    target = tmp_path / "epoch_1.pth"
    saver = Saver(target, named_temp=True, seed=3)
    with saver.stopped_mid_write():
        before = temporaries(tmp_path)
        assert len(before) == 1
        ckptio.save({"seed": 6}, tmp_path / "epoch_2.pth")
        save_with({"seed": 7}, tmp_path / "epoch_3.pth", named_temp=True)
        assert temporaries(tmp_path) == before
    assert temporaries(tmp_path) == []
    assert seed_of(target) == 3


def dead_pid():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_only_our_own_stale_temporaries_are_removed(tmp_path):
    gone = dead_pid()
    stale = tmp_path / f".a.pth.ckptio-{gone}-0"
    stale.write_bytes(b"stale")
    keep = [f"a.pth.ckptio-{gone}-0", f".a.pth.ckptio-{gone}-", f".a.pth.ckptio-{gone}-0.bak",
            f".ckptio-{gone}-0", f".b.pth.ckptio-{os.getpid()}-0"]
    for name in keep:
        (tmp_path / name).write_bytes(b"keep")
    (tmp_path / f".c.pth.ckptio-{gone}-0").symlink_to(stale)
    keep.append(f".c.pth.ckptio-{gone}-0")
    (tmp_path / f".d.pth.ckptio-{gone}-0").mkdir()
    keep.append(f".d.pth.ckptio-{gone}-0")
    if os.geteuid() == 0:
        theirs = tmp_path / f".e.pth.ckptio-{gone}-0"
        theirs.write_bytes(b"theirs")
        os.chown(theirs, 12345, 12345)  # another user's: never ours to remove
        keep.append(theirs.name)
    ckptio.save({"seed": 1}, tmp_path / "x.pth")
    assert not stale.exists() and stale.is_symlink() is False
    assert sorted(os.listdir(tmp_path)) == sorted(keep + ["x.pth"])


# ---- targets that are not regular files ------------------------------------------------

def read_fifo_while(path, save):
    """Runs save() while a thread reads the FIFO at path; returns the bytes."""
    got = []
    reader = threading.Thread(target=lambda: got.append(open(path, "rb").read()))
    reader.start()
    try:
        save()
    finally:
        reader.join(60)
    return got[0]


def test_fifo_is_written_into_like_torch(tmp_path):
    obj = {"w": torch.arange(1_000_000), "meta": {"epoch": 3}}
    fifo = tmp_path / "stream.pth"
    os.mkfifo(fifo)
    theirs = read_fifo_while(fifo, lambda: torch.save(obj, fifo))
    ours = read_fifo_while(fifo, lambda: ckptio.save(obj, fifo))
    assert ours == theirs
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert sorted(os.listdir(tmp_path)) == ["stream.pth"]
    # through a link to it as well
    link = tmp_path / "link.pth"
    link.symlink_to(fifo.name)
    theirs = read_fifo_while(fifo, lambda: torch.save(obj, link))
    assert read_fifo_while(fifo, lambda: ckptio.save(obj, link)) == theirs
    assert link.is_symlink() and stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_character_device_is_written_into_not_replaced(tmp_path):
    """As root a rename over /dev/null would replace it with a regular file.
    First a private copy of the device node (where mknod is allowed), then
    /dev/null itself only once the copy survived."""
    obj = {"w": torch.ones(1000)}
    if os.geteuid() == 0:
        clone = tmp_path / "null"
        try:
            os.mknod(clone, stat.S_IFCHR | 0o666, os.makedev(1, 3))
        except PermissionError:
            clone = None
        if clone is not None:
            rdev = os.lstat(clone).st_rdev
            ckptio.save(obj, clone)
            after = os.lstat(clone)
            assert stat.S_ISCHR(after.st_mode) and after.st_rdev == rdev
            assert sorted(os.listdir(tmp_path)) == ["null"]
    before = os.stat("/dev/null")
    assert stat.S_ISCHR(before.st_mode)
    ckptio.save(obj, "/dev/null")
    save_with(obj, "/dev/null", named_temp=True)
    after = os.stat("/dev/null")
    assert stat.S_ISCHR(after.st_mode)
    assert (after.st_ino, after.st_rdev) == (before.st_ino, before.st_rdev)


def test_dev_stdout_reaches_the_pipe_like_torch(tmp_path):
    """/dev/stdout is a chain of links ending in /proc's magic link to the
    process's stdout (here a pipe): written into, as torch writes into it."""
    def piped(fn):
        code = f"""
            import torch, ckptio
            {fn}({{"w": torch.arange(1000), "n": "x"}}, "/dev/stdout")
        """
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([PKG_ROOT, HERE]))
        out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                             stdout=subprocess.PIPE, check=True, timeout=120).stdout
        return out

    theirs = piped("torch.save")
    assert theirs[:2] == b"PK"
    assert piped("ckptio.save") == theirs


def test_symlink_loop_is_refused_with_eloop_like_torch(tmp_path):
    a, b = tmp_path / "a.pth", tmp_path / "b.pth"
    a.symlink_to(b.name)
    b.symlink_to(a.name)
    with pytest.raises(RuntimeError, match="Too many levels of symbolic links"):
        torch.save({}, a)
    with pytest.raises(OSError) as info:
        ckptio.save({"w": torch.ones(2)}, a)
    assert info.value.errno == errno.ELOOP
    assert str(a) in str(info.value)
    assert a.is_symlink() and b.is_symlink()
    assert sorted(os.listdir(tmp_path)) == ["a.pth", "b.pth"]


def test_chain_of_links_replaces_the_file_at_its_end(tmp_path):
    """latest.pth -> current.pth -> runs/epoch_3.pth: torch writes into
    epoch_3.pth through the links; ckptio replaces epoch_3.pth atomically
    (a new inode in runs/) and keeps both links."""
    (tmp_path / "runs").mkdir()
    real = tmp_path / "runs" / "epoch_3.pth"
    real.write_bytes(b"old")
    old_inode = real.stat().st_ino
    (tmp_path / "current.pth").symlink_to("runs/epoch_3.pth")
    (tmp_path / "latest.pth").symlink_to("current.pth")
    obj = {"w": torch.arange(5)}
    ckptio.save(obj, tmp_path / "latest.pth")
    assert (tmp_path / "latest.pth").is_symlink() and (tmp_path / "current.pth").is_symlink()
    assert real.stat().st_ino != old_inode
    ref = tmp_path / "ref" / "latest.pth"  # torch names the archive folder after the name given
    ref.parent.mkdir()
    torch.save(obj, ref)
    assert real.read_bytes() == ref.read_bytes()
    assert temporaries(tmp_path / "runs") == [] and temporaries(tmp_path) == []


def test_dangling_link_creates_the_file_it_names_like_torch(tmp_path):
    (tmp_path / "link.pth").symlink_to("made.pth")
    ckptio.save({"w": torch.ones(2)}, tmp_path / "link.pth")
    assert (tmp_path / "link.pth").is_symlink()
    assert torch.load(tmp_path / "made.pth")["w"].tolist() == [1.0, 1.0]
    (tmp_path / "bad.pth").symlink_to("missing/x.pth")
    with pytest.raises(FileNotFoundError):
        ckptio.save({}, tmp_path / "bad.pth")


def test_directory_and_socket_targets_fail_like_torch(tmp_path):
    (tmp_path / "d.pth").mkdir()
    with pytest.raises(IsADirectoryError):
        ckptio.save({}, tmp_path / "d.pth")
    path = str(tmp_path / "s.pth")
    if len(path) < 100:
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(path)
            with pytest.raises(OSError) as info:
                ckptio.save({}, path)
            assert info.value.errno == errno.ENXIO
    assert temporaries(tmp_path) == []


def test_long_file_name_saves(tmp_path):
    """The temporary's name is cut to stay within NAME_MAX."""
    name = "n" * 246 + ".pth"
    for named in (False, True):
        save_with({"w": torch.ones(2)}, tmp_path / name, named_temp=named)
        assert torch.load(tmp_path / name)["w"].tolist() == [1.0, 1.0]
        assert os.listdir(tmp_path) == [name]

"""torch.hub's checkpoint cache, with the transfer done in C.

Same cache layout and names as torch.hub (``$TORCH_HOME/hub/checkpoints``, the
URL's file name, ``name-<sha256 prefix>.ext`` checked with ``check_hash``),
so files cached by either are found by the other. The transfer itself is
``ckptio._native.download`` (libcurl, GIL released): the SHA-256, when a
prefix is checked, computed on a second thread while the bytes arrive;
resume of an interrupted download from ``<dst>.partial``; retries with
backoff; connect and low-speed timeouts; proxies from the environment
(``http_proxy``/``https_proxy``/``no_proxy``, read by libcurl); the CA
certificates of ``SSL_CERT_FILE``/``SSL_CERT_DIR`` as Python's ssl; an fsync
and an atomic rename into place.

Differences from torch.hub, on purpose:
- the partial file is ``<dst>.partial`` (torch: a random name per call) so
  that a later call resumes it; it is kept after a transient failure or
  Ctrl-C when the server gave a strong ETag (or Last-Modified, when a hash
  prefix checks the result), and removed after a permanent one (HTTP 4xx,
  HTML page, hash mismatch). It is private (0600) and only a private file of
  this user is ever adopted. It is locked, so processes downloading the same
  file take turns (a waiter gives up after ``lock_timeout`` seconds without
  progress of the holder), and load_url's waiting process uses the file the
  first one finished;
- an HTML page (login or error page served with 200) is an error, not a
  checkpoint in the cache;
- failures raise ``ckptio.DownloadError``, an OSError (like urllib's errors)
  and a RuntimeError (like torch's hash error, whose text is kept);
- download_url_to_file returns the transfer's record (torch: None), and the
  file is fsynced before the rename (torch does not: ``fsync=False`` to skip);
- the User-Agent is "ckptio" (torch: "torch.hub");
- load_url decodes safely by default (weights_only with allow='openmmlab';
  torch.hub: weights_only=False, so any downloaded file can run code).

Progress, as torch.hub: tqdm's bar when tqdm is installed, else ckptio's own
on stderr (a line every 10% when stderr is not a terminal, so logs stay
readable). The ``ckptio`` logger reports retries and their pauses (WARNING),
waits for another process's download, resumed or discarded partials, cache
hits and the fallback below (INFO).

Where the system has no libcurl (a minimal container), downloads go through
torch.hub.download_url_to_file instead, with a warning: same file, same hash
check, but no resume, retries or lock.
"""
import logging
import os
import re
import sys
import time
import warnings
import zipfile
from urllib.parse import urlparse

from . import _native
from ._allow import OPENMMLAB
from ._native import DownloadError

# matches bfd8deac from resnet18-bfd8deac.pth (torch.hub.HASH_REGEX)
HASH_REGEX = re.compile(r"-([a-f0-9]*)\.")

_USER_AGENT = "ckptio"

_log = logging.getLogger("ckptio")
_NOTE_LEVELS = {1: logging.INFO, 2: logging.WARNING}


def _note(level, message):
    """The C download's log lines (retries, waits, resumes) into the logger."""
    _log.log(_NOTE_LEVELS.get(level, logging.INFO), "%s", message)

__all__ = ["DownloadError", "HASH_REGEX", "download_url_to_file", "get_dir", "load_url"]


def _get_torch_home():
    return os.path.expanduser(
        os.getenv(
            "TORCH_HOME", os.path.join(os.getenv("XDG_CACHE_HOME", "~/.cache"), "torch")
        )
    )


def get_dir():
    """torch.hub.get_dir(): the directory set by torch.hub.set_dir() if torch.hub
    is imported and it was called, else ``$TORCH_HOME/hub`` (``$TORCH_HOME``
    defaulting to ``$XDG_CACHE_HOME/torch``, that to ``~/.cache/torch``)."""
    if os.getenv("TORCH_HUB"):
        warnings.warn("TORCH_HUB is deprecated, please use env TORCH_HOME instead", stacklevel=2)
    hub = sys.modules.get("torch.hub")
    hub_dir = getattr(hub, "_hub_dir", None) if hub is not None else None
    if hub_dir is not None:
        return hub_dir
    return os.path.join(_get_torch_home(), "hub")


class _TextBar:
    """tqdm's interface as far as _ProgressBar uses it, for when tqdm is not
    installed (torch.hub has the same fallback): on a terminal one line
    redrawn, elsewhere a line at every 10% (or every 30 s when the size is
    unknown), so that logs get a few lines and not thousands."""

    def __init__(self, total=None, **_):
        self.total = total
        self.n = 0
        self._tty = _isatty()
        self._start = self._last = time.monotonic()
        self._step = -1

    @staticmethod
    def _size(n):
        for unit in ("B", "KiB", "MiB", "GiB"):
            if n < 1024 or unit == "GiB":
                return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
            n /= 1024
        return f"{n:.1f} TiB"

    def _line(self):
        rate = self.n / max(time.monotonic() - self._start, 1e-9)
        done = self._size(self.n)
        if self.total:
            return f"{100.0 * self.n / self.total:5.1f}% {done} of {self._size(self.total)}, " \
                   f"{self._size(rate)}/s"
        return f"{done}, {self._size(rate)}/s"

    def update(self, n):
        self.n += n
        now = time.monotonic()
        if self._tty:
            if now - self._last >= 0.1 or (self.total and self.n >= self.total):
                sys.stderr.write("\r" + self._line())
                sys.stderr.flush()
                self._last = now
            return
        if self.total:
            step = int(10 * self.n / self.total)
            if step > self._step:
                self._step = step
                sys.stderr.write(self._line() + "\n")
        elif now - self._last >= 30:
            self._last = now
            sys.stderr.write(self._line() + "\n")

    def close(self):
        if self._tty:
            sys.stderr.write("\r" + self._line() + "\n")
        elif not self.total or self._step < 10:
            sys.stderr.write(self._line() + "\n")
        sys.stderr.flush()


def _isatty():
    try:
        return sys.stderr is not None and sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class _ProgressBar:
    """Feeds (done, total) reports from the C download into a bar (tqdm's
    when installed, else _TextBar), made at the first report (when the size
    is known)."""

    def __init__(self):
        try:
            from tqdm import tqdm
        except ImportError:
            tqdm = _TextBar
        self._tqdm = tqdm
        self._bar = None
        self._done = 0

    def __call__(self, done, total):
        if self._bar is None and not total and not done:
            return  # waiting for a response (or for another download's lock)
        if self._bar is None or done < self._done:
            if self._bar is not None:
                self._bar.close()
            self._bar = self._tqdm(
                total=total or None, unit="B", unit_scale=True, unit_divisor=1024
            )
            self._done = 0
        if done > self._done:
            self._bar.update(done - self._done)
            self._done = done

    def close(self):
        if self._bar is not None:
            self._bar.close()


def _progress_bar(progress):
    """A progress callable, or None when no bar is to be shown (progress
    false, or no stderr at all)."""
    if not progress or sys.stderr is None:
        return None
    return _ProgressBar()


def _without_libcurl(url, dst, hash_prefix, progress, why):
    """download_url_to_file through torch.hub, where libcurl is absent."""
    import urllib.error

    import torch.hub

    _log.warning("%s; downloading %s with torch.hub instead (no resume, no retries)", why, url)
    try:
        torch.hub.download_url_to_file(url, dst, hash_prefix, progress=progress)
    except urllib.error.HTTPError as exc:
        raise _download_error(f"HTTP {exc.code} from {url}", url, exc.code) from exc
    except (OSError, RuntimeError) as exc:
        raise _download_error(f"download of {url} failed: {exc}", url, 0) from exc
    return {"size": os.path.getsize(dst), "sha256": "", "resumed_from": 0, "attempts": 1,
            "status": 200, "existed": False}


def _download_error(message, url, status):
    exc = DownloadError(message)
    exc.url, exc.status = url, status
    return exc


def download_url_to_file(url, dst, hash_prefix=None, progress=True, **options):
    """torch.hub.download_url_to_file(url, dst, hash_prefix=None, progress=True).

    Downloads url to dst (``~`` expanded) through ``dst + ".partial"``; when
    hash_prefix is given the file's SHA-256 must start with it, else
    DownloadError (a RuntimeError) 'invalid hash value (expected "...", got
    "...")' and nothing is left behind. ``options`` go to
    ckptio._native.download (retries, backoff, timeout, low_speed_limit,
    low_speed_time, keep_partial, fsync, if_missing, sha256, lock_timeout).
    Returns the transfer's record: size, sha256 (hex; '' unless hash_prefix or sha256=True),
    resumed_from, attempts, status, existed.
    """
    dst = os.path.expanduser(os.fspath(dst))
    libs = _native.libraries()
    if libs["libcurl"] is None:
        return _without_libcurl(url, dst, hash_prefix, progress, libs["libcurl_error"])
    bar = _progress_bar(progress)
    options.setdefault("note", _note)
    options.setdefault("user_agent", _USER_AGENT)
    # like torch.hub, hash only to check a prefix (or when asked to)
    options.setdefault("sha256", hash_prefix is not None)
    try:
        return _native.download(url, dst, hash_prefix=hash_prefix, progress=bar, **options)
    finally:
        if bar is not None:
            bar.close()


def _is_legacy_zip_format(filename):
    """torch.hub's test: a zip holding exactly one file (a torch.save < 1.6
    file zipped by hand), not a torch zip checkpoint (which holds several)."""
    if zipfile.is_zipfile(filename):
        with zipfile.ZipFile(filename) as zf:
            infolist = zf.infolist()
        return len(infolist) == 1 and not infolist[0].is_dir()
    return False


def _legacy_zip_load(filename, model_dir, map_location, weights_only, allow):
    from .serialization import load

    warnings.warn(
        "Falling back to the old format < 1.6. This support will be deprecated in favor of "
        "default zipfile format introduced in 1.6. Please redo torch.save() to save it in the "
        "new zipfile format.",
        FutureWarning,
        stacklevel=3,
    )
    with zipfile.ZipFile(filename) as f:
        members = f.infolist()
        if len(members) != 1:
            raise RuntimeError("Only one file(not dir) is allowed in the zipfile")
        root = os.path.realpath(model_dir)
        target = os.path.realpath(os.path.join(root, members[0].filename))
        if os.path.commonpath([root, target]) != root:
            raise ValueError(
                f"{filename}: member {members[0].filename!r} would be extracted outside "
                f"{model_dir}"
            )
        f.extract(members[0], root)
    return load(target, map_location=map_location, weights_only=weights_only, allow=allow)


def load_url(
    url,
    model_dir=None,
    map_location=None,
    progress=True,
    check_hash=False,
    file_name=None,
    weights_only=None,
    *,
    allow=OPENMMLAB,
):
    """torch.hub.load_state_dict_from_url with ckptio doing the transfer and
    the load: the file is downloaded into model_dir (default
    ``get_dir()/checkpoints``) unless already there, then read with
    ``ckptio.load(cached_file, map_location=map_location,
    weights_only=weights_only, allow=allow)``.

    Unlike torch.hub (whose weights_only defaults to False), a downloaded
    file is decoded safely by default: weights_only (torch's allowlist)
    plus allow='openmmlab' (numpy values and mmengine's HistoryBuffer,
    decoded data-only). weights_only=False, for files from a source you
    trust, resolves and calls any global the file names."""
    from .serialization import load

    if os.getenv("TORCH_MODEL_ZOO"):
        warnings.warn(
            "TORCH_MODEL_ZOO is deprecated, please use env TORCH_HOME instead", stacklevel=2
        )
    if model_dir is None:
        model_dir = os.path.join(get_dir(), "checkpoints")
    os.makedirs(model_dir, exist_ok=True)
    filename = os.path.basename(urlparse(url).path)
    if file_name is not None:
        filename = file_name
    cached_file = os.path.join(model_dir, filename)
    if os.path.exists(cached_file):
        _log.info("using %s, already in the cache, for %s", cached_file, url)
    else:
        sys.stdout.write(f'Downloading: "{url}" to {cached_file}\n')
        hash_prefix = None
        if check_hash:
            r = HASH_REGEX.search(filename)
            hash_prefix = r.group(1) if r else None
        # if_missing: a process that waited for another's download of the
        # same file uses its result instead of downloading it again
        download_url_to_file(url, cached_file, hash_prefix, progress=progress, if_missing=True)
    if _is_legacy_zip_format(cached_file):
        return _legacy_zip_load(cached_file, model_dir, map_location, weights_only, allow)
    return load(cached_file, map_location=map_location, weights_only=weights_only, allow=allow)

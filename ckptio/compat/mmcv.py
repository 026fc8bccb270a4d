"""mmcv 1.x's runner/checkpoint.py surface (1.7.2's names, signatures,
defaults, log lines and exceptions), with files decoded by ckptio.load and
state-dict keys rewritten in C.

    from ckptio.checkpoint import load_checkpoint   # instead of mmcv.runner's

Names are looked up at call time where mmcv's own tests patch them, so the
same patches work here: ``ckptio.__path__`` (mmcv: ``mmcv.__path__``) locates
the model-zoo tables, and ``load_from_http``, ``load_url``, ``get_dist_info``
are module globals; a replaced ``torch.load`` (a mock in a test) is called as
mmcv would call it. After ckptio.patch(), patches of ``mmcv.__path__`` and of
those three names in mmcv.runner.checkpoint take effect here too.

Deliberate differences from mmcv 1.7.2:
- Files are decoded by ckptio.load with weights_only (torch 2.13's default
  for mmcv's plain ``torch.load`` call) and allow='openmmlab': the numpy
  values mmcv's runners put in ``meta`` (and mmengine's HistoryBuffer) are
  decoded data-only, where torch 2.13 refuses the file. Globals outside both
  sets are refused (ckptio.UnpicklingError, a pickle.UnpicklingError
  subclass, with ckptio's own message).
- mmcv and torchvision are not imported: torchvision only when a
  ``torchvision://`` name is resolved; mmcv's print_log, module-wrapper
  registry and FileClient are used when mmcv is already imported (see
  ckptio.compat.base), else equivalents.
- The model-zoo tables ship with ckptio (ckptio/model_zoo/*.json, copied from
  mmcv 1.7.2); $MMCV_HOME/open_mmlab.json still extends them.
- A scheme loader registered by the user may return a path, a bytes-like
  object or a binary file instead of a dict; ckptio decodes it with
  ckptio.load (mmcv would return it unchanged).
- http(s) downloads go through ckptio.hub.load_url (libcurl); the save side
  (weights_to_cpu, get_state_dict, save_checkpoint) is ckptio.compat.mmcv_save's.
- s3:// without mmcv installed goes straight to the petrel (or ceph)
  client, with mmcv's ImportError messages when neither is installed.
"""

import io
import json
import logging
import os
import os.path as osp
import re
import warnings
from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn

from .. import _direct, _native, patching
from .mmcv_save import _save_to_state_dict, get_state_dict, save_checkpoint, weights_to_cpu
from .base import (
    SHARED_NAMES,
    from_openmmlab,
    from_pavi,
    get_dist_info,
    is_module_wrapper,
    load_walk,
    mkdir_or_exist,
    print_log,
    version_before,
    with_prefix,
)
from .._allow import OPENMMLAB
from ..hub import load_url  # torch.hub's 7 positional parameters; a module global, as tests patch it
from ..serialization import load as _ckptio_load

ENV_MMCV_HOME = "MMCV_HOME"
ENV_XDG_CACHE_HOME = "XDG_CACHE_HOME"
DEFAULT_CACHE_DIR = "~/.cache"

# torch.load as imported; another object there at call time is a patch to honour.
_TORCH_LOAD = torch.load


def _load_file(f, map_location):
    """What mmcv's ``torch.load(f, map_location=map_location)`` gives."""
    torch_load = torch.load
    if torch_load is not _TORCH_LOAD:
        return torch_load(f, map_location=map_location)
    return _ckptio_load(f, map_location=map_location, allow=OPENMMLAB)


def _model_zoo_file(name):
    import ckptio

    path = patching.override("mmcv", "__path__") or ckptio.__path__
    return osp.join(path[0], "model_zoo", name)


def _resolve(name):
    """The module-level function name, or what a test put in its place in
    mmcv.runner.checkpoint while ckptio is patched in."""
    return patching.override("mmcv.runner.checkpoint", name) or globals()[name]


def _load_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _get_mmcv_home() -> str:
    mmcv_home = os.path.expanduser(
        os.getenv(
            ENV_MMCV_HOME, os.path.join(os.getenv(ENV_XDG_CACHE_HOME, DEFAULT_CACHE_DIR), "mmcv")
        )
    )
    mkdir_or_exist(mmcv_home)
    return mmcv_home


def load_state_dict(
    module: nn.Module,
    state_dict: Union[dict, OrderedDict],
    strict: bool = False,
    logger: Optional[logging.Logger] = None,
) -> None:
    """Loads state_dict into module as mmcv does: every mismatch (unexpected
    and missing keys, num_batches_tracked aside; shape mismatches) is
    reported on rank 0 even when strict is False, through logger.warning or
    print; strict raises RuntimeError with the same text. Module wrappers
    are unwrapped at every level; _metadata versions reach
    _load_from_state_dict."""
    text = load_walk(module, state_dict, is_module_wrapper, _resolve("get_dist_info"), strict)
    if text is None:
        return
    if logger is not None:
        logger.warning(text)
    else:
        print(text)


def get_torchvision_models():
    """Model name -> URL: torchvision 0.12's table plus, for torchvision >=
    0.13, '<model>.<weights>' and '<model>.default' for each weights enum."""
    import torchvision

    if version_before(torchvision.__version__, "0.13.0a0"):
        import pkgutil
        from importlib import import_module

        model_urls = dict()
        for _, name, ispkg in pkgutil.walk_packages(torchvision.models.__path__):
            if ispkg:
                continue
            zoo = import_module(f"torchvision.models.{name}")
            if hasattr(zoo, "model_urls"):
                model_urls.update(getattr(zoo, "model_urls"))
        return model_urls
    model_urls = _load_json(_model_zoo_file("torchvision_0.12.json"))
    if version_before(torchvision.__version__, "0.14.0a0"):
        weights_list = [
            cls
            for cls_name, cls in torchvision.models.__dict__.items()
            if cls_name.endswith("_Weights")
        ]
    else:
        weights_list = [
            torchvision.models.get_model_weights(model)
            for model in torchvision.models.list_models(torchvision.models)
        ]
    for cls in weights_list:
        # some weights classes (e.g. MNASNet0_75_Weights in 0.13) are empty
        if not hasattr(cls, "DEFAULT"):
            continue
        base = cls.__name__.replace("_Weights", "").lower()
        model_urls[f"{base}.default"] = cls.DEFAULT.url
        for weight_enum in cls:
            model_urls[f"{base}.{weight_enum.name.lower()}"] = weight_enum.url
    return model_urls


def get_external_models():
    mmcv_home = _get_mmcv_home()
    default_urls = _load_json(_model_zoo_file("open_mmlab.json"))
    assert isinstance(default_urls, dict)
    external_json_path = osp.join(mmcv_home, "open_mmlab.json")
    if osp.exists(external_json_path):
        external_urls = _load_json(external_json_path)
        assert isinstance(external_urls, dict)
        default_urls.update(external_urls)
    return default_urls


def get_mmcls_models():
    return _load_json(_model_zoo_file("mmcls.json"))


def get_deprecated_model_names():
    deprecate_urls = _load_json(_model_zoo_file("deprecated.json"))
    assert isinstance(deprecate_urls, dict)
    return deprecate_urls


def _process_mmcls_checkpoint(checkpoint: Dict) -> Dict:
    """{'state_dict': the backbone's weights with 'backbone.' stripped}."""
    # checkpoints converted from other code bases may lack "state_dict"
    state_dict = checkpoint["state_dict"] if "state_dict" in checkpoint else checkpoint
    new_state_dict = OrderedDict()
    for k, v in state_dict.items():
        if k.startswith("backbone."):
            new_state_dict[k[9:]] = v
    return dict(state_dict=new_state_dict)


def _decodable(obj):
    return isinstance(obj, (str, os.PathLike, bytes, bytearray, memoryview)) or hasattr(obj, "read")


class CheckpointLoader:
    """Loaders by URL scheme. A path goes to the first registered prefix
    (longest first) that matches it as a regular expression; '' (local
    files) matches everything."""

    _schemes: dict = {}
    # loaders defined here: their results are checkpoints already
    _builtin: set = set()

    @classmethod
    def _register_scheme(
        cls, prefixes: Union[str, List, Tuple], loader: Callable, force: bool = False
    ) -> None:
        if isinstance(prefixes, str):
            prefixes = [prefixes]
        else:
            assert isinstance(prefixes, (list, tuple))
        for prefix in prefixes:
            if (prefix not in cls._schemes) or force:
                cls._schemes[prefix] = loader
            else:
                raise KeyError(
                    f"{prefix} is already registered as a loader backend, "
                    'add "force=True" if you want to override it'
                )
        # longer prefixes first
        cls._schemes = OrderedDict(sorted(cls._schemes.items(), key=lambda t: t[0], reverse=True))

    @classmethod
    def register_scheme(
        cls,
        prefixes: Union[str, List[str], Tuple[str, ...]],
        loader: Optional[Callable] = None,
        force: bool = False,
    ) -> Callable:
        """Registers loader(filename, map_location) for prefixes (a str or a
        list/tuple of them); without loader, a decorator. KeyError for a
        prefix already registered unless force. The loader returns the
        checkpoint, or a path, bytes-like object or binary file that ckptio
        decodes with ckptio.load."""
        if loader is not None:
            cls._register_scheme(prefixes, loader, force=force)
            return  # type: ignore

        def _register(loader_cls):
            cls._register_scheme(prefixes, loader_cls, force=force)
            return loader_cls

        return _register

    @classmethod
    def _get_checkpoint_loader(cls, path: str):
        """The loader for path ('s3://x' and 'open-mmlab:s3://x' both reach
        load_from_ceph: prefixes are matched as regular expressions)."""
        schemes = cls._view()
        for p in schemes:
            if re.match(p, path) is not None:
                return schemes[p]

    # the class whose registry this one shares (module, name)
    _theirs = ("mmcv.runner.checkpoint", "CheckpointLoader")

    @classmethod
    def _view(cls):
        """The one registry: ckptio's schemes and those users registered with
        mmcv's (or mmengine's) own CheckpointLoader, live, whether or not
        ckptio is patched in and whichever reference to that class they hold.
        A user's loader wins over a built-in one; on ckptio's class over theirs."""
        theirs = patching.original(*cls._theirs)
        if theirs is None or theirs is cls:
            return cls._schemes
        merged = dict(cls._schemes)
        for prefix, loader in list(getattr(theirs, "_schemes", {}).items()):
            if getattr(loader, "__module__", None) == theirs.__module__:
                continue  # mmcv's built-in loaders: ckptio has its own
            if prefix not in merged or merged[prefix] in cls._builtin:
                merged[prefix] = loader
        return OrderedDict(sorted(merged.items(), key=lambda t: t[0], reverse=True))

    @classmethod
    def load_checkpoint(
        cls,
        filename: str,
        map_location: Union[str, Callable, None] = None,
        logger: Optional[logging.Logger] = None,
    ) -> Union[dict, OrderedDict]:
        """The checkpoint at filename, through the loader of its scheme."""
        return cls._load(filename, map_location, logger)

    @classmethod
    def _announce(cls, loader_name: str, filename: str, logger) -> None:
        """The log line naming the loader (mmcv's wording)."""
        print_log(f"load checkpoint from {loader_name} path: {filename}", logger)

    @classmethod
    def _load(cls, filename, map_location, logger):
        checkpoint_loader = cls._get_checkpoint_loader(filename)
        cls._announce(checkpoint_loader.__name__[10:], filename, logger)
        checkpoint = checkpoint_loader(filename, map_location)
        if checkpoint_loader not in cls._builtin and _decodable(checkpoint):
            checkpoint = _ckptio_load(checkpoint, map_location=map_location, allow=OPENMMLAB)
        return checkpoint

    @classmethod
    def _builtin_scheme(cls, prefixes):
        """Decorator registering one of ckptio's own loaders, whose results
        are checkpoints already (never decoded again)."""

        def register(loader):
            cls.register_scheme(prefixes, loader)
            cls._builtin.add(loader)
            return loader

        return register


_builtin_scheme = CheckpointLoader._builtin_scheme


@_builtin_scheme("")
def load_from_local(
    filename: str, map_location: Union[str, Callable, None] = None
) -> Union[dict, OrderedDict]:
    """The checkpoint in a local file (~ expanded)."""
    filename = osp.expanduser(filename)
    if not osp.isfile(filename):
        raise FileNotFoundError(f"{filename} can not be found.")
    return _load_file(filename, map_location)


@_builtin_scheme(("http://", "https://"))
def load_from_http(
    filename: str, map_location: Union[str, Callable, None] = None, model_dir: Optional[str] = None
) -> Union[dict, OrderedDict]:
    """The checkpoint at an http(s) URL, cached in model_dir. In distributed
    runs rank 0 downloads first; the others load after a barrier."""
    rank, world_size = _resolve("get_dist_info")()
    if rank == 0:
        checkpoint = _resolve("load_url")(filename, model_dir=model_dir, map_location=map_location)
    if world_size > 1:
        torch.distributed.barrier()
        if rank > 0:
            checkpoint = _resolve("load_url")(
                filename, model_dir=model_dir, map_location=map_location
            )
    return checkpoint


@_builtin_scheme("pavi://")
def load_from_pavi(
    filename: str, map_location: Union[str, Callable, None] = None
) -> Union[dict, OrderedDict]:
    """The checkpoint at pavi://<model path> (needs the pavi client),
    downloaded to a temporary directory."""
    return from_pavi(filename, map_location, _load_file)


@_builtin_scheme(r"(\S+\:)?s3://")
def load_from_ceph(
    filename: str, map_location: Union[str, Callable, None] = None, backend: str = "petrel"
) -> Union[dict, OrderedDict]:
    """The checkpoint at s3://... through mmcv's FileClient ('petrel', or
    'ceph' when petrel is missing; deprecated)."""
    allowed_backends = ["ceph", "petrel"]
    if backend not in allowed_backends:
        raise ValueError(f"Load from Backend {backend} is not supported.")
    if backend == "ceph":
        warnings.warn(
            "CephBackend will be deprecated, please use PetrelBackend instead", DeprecationWarning
        )
    try:
        from mmcv.fileio import FileClient
    except ImportError:  # no mmcv: the storage clients themselves
        FileClient = _S3Client

    # the petrel and ceph clients share 's3://'; petrel unless it is missing
    try:
        file_client = FileClient(backend=backend)
    except ImportError:
        allowed_backends.remove(backend)
        file_client = FileClient(backend=allowed_backends[0])
    with io.BytesIO(file_client.get(filename)) as buffer:
        checkpoint = _load_file(buffer, map_location)
    return checkpoint


class _S3Client:
    """What load_from_ceph needs of mmcv's FileClient when mmcv is absent:
    get(path) through the petrel or ceph client, and mmcv's ImportError
    when that client is missing."""

    def __init__(self, backend):
        if backend == "petrel":
            try:
                from petrel_client import client
            except ImportError:
                raise ImportError("Please install petrel_client to enable PetrelBackend.")
            self._get = client.Client().Get
        else:
            try:
                import ceph
            except ImportError:
                raise ImportError("Please install ceph to enable CephBackend.")
            self._get = ceph.S3Client().Get

    def get(self, filepath):
        return memoryview(self._get(filepath.replace("\\", "/")))


@_builtin_scheme(("modelzoo://", "torchvision://"))
def load_from_torchvision(
    filename: str, map_location: Union[str, Callable, None] = None
) -> Union[dict, OrderedDict]:
    """torchvision://<model>, also as 'ResNet50_Weights.IMAGENET1K_V1' or
    'resnet50.imagenet1k_v1'; modelzoo:// is the deprecated spelling."""
    model_urls = get_torchvision_models()
    if filename.startswith("modelzoo://"):
        warnings.warn(
            'The URL scheme of "modelzoo://" is deprecated, please use "torchvision://" instead',
            DeprecationWarning,
        )
        model_name = filename[11:]
    else:
        model_name = filename[14:]
    model_name = model_name.lower().replace("_weights", "")
    return _resolve("load_from_http")(model_urls[model_name], map_location=map_location)


@_builtin_scheme(("open-mmlab://", "openmmlab://"))
def load_from_openmmlab(
    filename: str, map_location: Union[str, Callable, None] = None
) -> Union[dict, OrderedDict]:
    """open-mmlab://<name>: a URL from the open_mmlab table (extended by
    $MMCV_HOME/open_mmlab.json), or a file relative to $MMCV_HOME."""
    tables = get_external_models(), get_deprecated_model_names()

    def warn(text):  # a deprecated name
        warnings.warn(text, DeprecationWarning)

    return from_openmmlab(filename, map_location, *tables, warn, _get_mmcv_home,
                          _resolve("load_from_http"), _load_file)


@_builtin_scheme("mmcls://")
def load_from_mmcls(
    filename: str, map_location: Union[str, Callable, None] = None
) -> Union[dict, OrderedDict]:
    """mmcls://<name>: the backbone of an mmcls model-zoo checkpoint."""
    model_urls = get_mmcls_models()
    model_name = filename[8:]
    checkpoint = _resolve("load_from_http")(model_urls[model_name], map_location=map_location)
    return _process_mmcls_checkpoint(checkpoint)


def _load_checkpoint(
    filename: str,
    map_location: Union[str, Callable, None] = None,
    logger: Optional[logging.Logger] = None,
) -> Union[dict, OrderedDict]:
    """The checkpoint at a local path, URL, torchvision://, open-mmlab://,
    mmcls://, pavi://, s3:// name or registered scheme."""
    return CheckpointLoader.load_checkpoint(filename, map_location, logger)


def _load_checkpoint_with_prefix(
    prefix: str, filename: str, map_location: Union[str, Callable, None] = None
) -> Union[dict, OrderedDict]:
    """The weights of the sub-module named prefix, with the prefix removed;
    AssertionError when there are none."""
    return with_prefix(_load_checkpoint(filename, map_location=map_location), prefix)


def _revise(state_dict, revise_keys):
    """mmcv's ``for p, r in revise_keys: re.sub`` loop, in C, then the
    _metadata it keeps (an empty OrderedDict when there was none)."""
    metadata = getattr(state_dict, "_metadata", OrderedDict())
    pairs = [(p, r) for p, r in revise_keys]
    if pairs:
        state_dict = _native.revise_keys(state_dict, pairs)
    state_dict._metadata = metadata
    return state_dict


def load_checkpoint(
    model: torch.nn.Module,
    filename: str,
    map_location: Union[str, Callable, None] = None,
    strict: bool = False,
    logger: Optional[logging.Logger] = None,
    revise_keys: list = [(r"^module\.", "")],
) -> Union[dict, OrderedDict]:
    """Loads the checkpoint at filename into model and returns it.

    revise_keys: (pattern, replacement) pairs applied with re.sub to every
    key in turn; the default strips DataParallel's 'module.' prefix.
    RuntimeError when the checkpoint is not a dict; strict as
    load_state_dict."""
    with _direct.capture() as seen:  # the file ckptio.load maps, to read from directly
        checkpoint = _load_checkpoint(filename, map_location, logger)
    if not isinstance(checkpoint, dict):
        raise RuntimeError(f"No state_dict found in checkpoint file {filename}")
    state_dict = checkpoint["state_dict"] if "state_dict" in checkpoint else checkpoint
    state_dict = _revise(state_dict, revise_keys)
    with _direct.into(model, state_dict, seen, is_module_wrapper) as state_dict:
        load_state_dict(model, state_dict, strict, logger)
    return checkpoint


# the save side, from ckptio's saver
_SAVE_NAMES = ("weights_to_cpu", "_save_to_state_dict", "get_state_dict", "save_checkpoint")


__all__ = ["ENV_MMCV_HOME", *SHARED_NAMES]

# Type stubs of ckptio's public API (the package resolves these names lazily
# at run time, PEP 562, so that import ckptio stays light; mypy reads this).
import logging
import os
import pickle
from collections import OrderedDict
from concurrent.futures import Future
from types import TracebackType
from typing import IO, Any, Callable, Dict, Iterable, List, Optional, Tuple, Type, Union

import torch
from torch.nn import Module
from torch.optim import Optimizer

class Problem(tuple):
    kind: str
    record: Optional[str]
    offset: Optional[int]
    message: str

class VerifyReport:
    name: str
    format: str
    problems: List[Problem]
    counts: Dict[str, int]
    notes: List[str]
    @property
    def ok(self) -> bool: ...
    def __bool__(self) -> bool: ...
    def summary(self) -> str: ...

__version__: str

_Path = Union[str, "os.PathLike[str]"]
_MapLocation = Union[
    None, str, torch.device, Dict[str, str],
    Callable[[Any, str], Any],
]
_Source = Union[_Path, bytes, bytearray, memoryview, IO[bytes]]

class CheckpointError(RuntimeError): ...
class UnpicklingError(pickle.UnpicklingError, CheckpointError): ...

class DownloadError(OSError, CheckpointError):
    url: str
    status: int

def load(
    f: _Source,
    map_location: _MapLocation = None,
    *,
    weights_only: Optional[bool] = None,
    mmap: Optional[bool] = None,
    encoding: str = "utf-8",
    verify: bool = False,
    allow: Union[None, str, Iterable[str]] = None,
) -> Any: ...
def save(obj: object, f: Union[_Path, IO[bytes]], *, fsync: bool = True) -> None: ...
def verify(
    f: _Source,
    strict: bool = False,
    *,
    weights_only: bool = True,
    encoding: str = "utf-8",
    allow: Union[None, str, Iterable[str]] = None,
) -> VerifyReport: ...
def async_save(obj: object, f: Union[_Path, IO[bytes]], *, fsync: bool = True) -> "Future[None]": ...
def wait_async_saves(timeout: Optional[float] = None) -> bool: ...

def add_safe_globals(safe_globals: Iterable[Union[Callable[..., Any], Tuple[Callable[..., Any], str]]]) -> None: ...
def get_safe_globals() -> List[Union[Callable[..., Any], Tuple[Callable[..., Any], str]]]: ...
def clear_safe_globals() -> None: ...

class safe_globals:
    def __init__(self, safe_globals: Iterable[Union[Callable[..., Any], Tuple[Callable[..., Any], str]]]) -> None: ...
    def __enter__(self) -> None: ...
    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None: ...

def download_url_to_file(
    url: str,
    dst: _Path,
    hash_prefix: Optional[str] = None,
    progress: bool = True,
    **options: Any,
) -> Dict[str, Any]: ...
def load_url(
    url: str,
    model_dir: Optional[str] = None,
    map_location: _MapLocation = None,
    progress: bool = True,
    check_hash: bool = False,
    file_name: Optional[str] = None,
    weights_only: bool = False,
) -> Any: ...

# the mmcv 1.7.2 surface (ckptio.checkpoint)
def load_checkpoint(
    model: Module,
    filename: str,
    map_location: Union[str, Callable[..., Any], None] = None,
    strict: bool = False,
    logger: Optional[logging.Logger] = None,
    revise_keys: list = ...,
) -> Union[dict, OrderedDict]: ...
def _load_checkpoint(
    filename: str,
    map_location: Union[str, Callable[..., Any], None] = None,
    logger: Optional[logging.Logger] = None,
) -> Union[dict, OrderedDict]: ...
def _load_checkpoint_with_prefix(
    prefix: str, filename: str, map_location: Union[str, Callable[..., Any], None] = None
) -> Union[dict, OrderedDict]: ...
def load_state_dict(
    module: Module,
    state_dict: Union[dict, OrderedDict],
    strict: bool = False,
    logger: Optional[logging.Logger] = None,
) -> None: ...

class CheckpointLoader:
    @classmethod
    def register_scheme(
        cls,
        prefixes: Union[str, List[str], Tuple[str, ...]],
        loader: Optional[Callable[..., Any]] = None,
        force: bool = False,
    ) -> Any: ...
    @classmethod
    def load_checkpoint(
        cls,
        filename: str,
        map_location: Union[str, Callable[..., Any], None] = None,
        logger: Optional[logging.Logger] = None,
    ) -> Union[dict, OrderedDict]: ...

def weights_to_cpu(state_dict: OrderedDict) -> OrderedDict: ...
def get_state_dict(
    module: Module,
    destination: Optional[OrderedDict] = None,
    prefix: str = "",
    keep_vars: bool = False,
) -> OrderedDict: ...
def save_checkpoint(
    model: Module,
    filename: str,
    optimizer: Optional[Optimizer] = None,
    meta: Optional[dict] = None,
    file_client_args: Optional[dict] = None,
) -> None: ...

def patch() -> None: ...
def unpatch() -> None: ...

__all__: List[str]

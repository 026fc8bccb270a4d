"""The few mmcv/mmengine utilities the checkpoint surface needs, without
importing mmcv or mmengine.

Where mmcv or mmengine is already imported (it is in every program that
uses their runners), their own function is used, looked up in sys.modules
at call time: a registered module wrapper, a patched print_log or a
configured logger behave as they do for mmcv itself. Otherwise a plain
equivalent with the same behaviour runs, so ckptio works without either.
"""

import logging
import os
import os.path as osp
import re
import sys
from tempfile import TemporaryDirectory

import torch


def get_dist_info():
    """(rank, world_size) of the default process group, or (0, 1)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def print_log(msg, logger=None, level=logging.INFO):
    """mmcv.print_log: None prints, a Logger logs, "silent" drops, another
    str names a logger."""
    mmcv = sys.modules.get("mmcv")
    mmcv_print_log = getattr(mmcv, "print_log", None)
    if mmcv_print_log is not None:
        return mmcv_print_log(msg, logger, level)
    if logger is None:
        print(msg)
    elif isinstance(logger, logging.Logger):
        logger.log(level, msg)
    elif logger == "silent":
        pass
    elif isinstance(logger, str):
        logging.getLogger(logger).log(level, msg)
    else:
        raise TypeError(
            "logger should be either a logging.Logger object, str, "
            f'"silent" or None, but got {type(logger)}'
        )


def is_module_wrapper(module):
    """mmcv's is_module_wrapper (what its MODULE_WRAPPERS registry holds)
    when mmcv.parallel is imported, else torch's DataParallel and
    DistributedDataParallel. As in mmcv, wrappers registered only in
    mmengine's MODEL_WRAPPERS are not unwrapped by the mmcv surface (the
    mmengine surface uses mmengine's is_model_wrapper)."""
    check = getattr(sys.modules.get("mmcv.parallel"), "is_module_wrapper", None)
    if check is not None:
        return check(module)
    # mmcv.parallel not imported: no wrapper of its own can exist
    wrappers = (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)
    return isinstance(module, wrappers)


def mkdir_or_exist(dir_name, mode=0o777):
    if dir_name == "":
        return
    os.makedirs(osp.expanduser(dir_name), mode=mode, exist_ok=True)


def version_before(version, bound):
    """True when the release numbers of version are below bound's (the only
    use is torchvision's '0.13'/'0.14' thresholds, which mmcv compares
    against '0.X.0a0', so a/b/rc pre-releases of 0.X count as 0.X, and dev
    builds such as 0.14.0.dev20220801 as before it, as digit_version has it)."""

    def release(v):
        numbers = tuple(int(x) for x in re.findall(r"\d+", v.split("+")[0])[:3])
        return numbers + (0,) * (3 - len(numbers))

    if release(version) != release(bound):
        return release(version) < release(bound)
    # same release: as mmcv's digit_version, a dev build of it (0.14.0.dev2022...,
    # without a/b/rc) sorts before '0.X.0a0'
    local = version.split("+")[0]
    return ".dev" in local and re.search(r"\d(a|b|rc)\d*", local) is None


# what both surfaces export besides their own ENV_*_HOME (mmengine adds
# find_latest_checkpoint)
SHARED_NAMES = [
    "ENV_XDG_CACHE_HOME",
    "DEFAULT_CACHE_DIR",
    "CheckpointLoader",
    "load_state_dict",
    "get_torchvision_models",
    "get_external_models",
    "get_mmcls_models",
    "get_deprecated_model_names",
    "load_from_local",
    "load_from_http",
    "load_from_pavi",
    "load_from_ceph",
    "load_from_torchvision",
    "load_from_openmmlab",
    "load_from_mmcls",
    "load_checkpoint",
    "weights_to_cpu",
    "get_state_dict",
    "save_checkpoint",
]


def load_walk(module, state_dict, unwrap, dist_info, strict, incompatible=None):
    """load_state_dict's walk, shared by the surfaces: every module (unwrapped
    where unwrap says so, as each surface's registry has it) gets its
    _load_from_state_dict call with its _metadata entry. mmcv hands every
    module the whole state dict; mmengine (incompatible given: its
    _IncompatibleKeys) hands each child only the keys under its prefix and
    runs the load-state-dict post hooks after each module's children.
    Returns the text to report (None when everything matched, or off rank
    0 by dist_info(), asked after the walk); strict raises it as
    RuntimeError. num_batches_tracked keys are never missing."""
    unexpected_keys, missing_keys, err_msg = [], [], []
    metadata = getattr(state_dict, "_metadata", None)
    state_dict = state_dict.copy()  # _load_from_state_dict may pop entries
    if metadata is not None:
        state_dict._metadata = metadata

    def load(module, local_state_dict, prefix=""):
        if unwrap(module):
            module = module.module
        local_metadata = {} if metadata is None else metadata.get(prefix[:-1], {})
        module._load_from_state_dict(
            local_state_dict, prefix, local_metadata, True, missing_keys, unexpected_keys, err_msg
        )
        for name, child in module._modules.items():
            if child is None:
                continue
            child_prefix = prefix + name + "."
            if incompatible is not None:
                child_state_dict = {
                    k: v for k, v in local_state_dict.items() if k.startswith(child_prefix)
                }
            else:
                child_state_dict = local_state_dict
            load(child, child_state_dict, child_prefix)
        if incompatible is None:
            return
        # hooks may change missing_keys and unexpected_keys in place
        incompatible_keys = incompatible(missing_keys, unexpected_keys)
        for hook in getattr(module, "_load_state_dict_post_hooks", {}).values():
            out = hook(module, incompatible_keys)
            assert out is None, (
                "Hooks registered with ``register_load_state_dict_post_hook`` are not "
                "expected to return new values, if incompatible_keys need to be "
                "modified, it should be done inplace."
            )

    load(module, state_dict)
    load = None  # the closure refers to itself: break the cycle

    missing_keys = [key for key in missing_keys if "num_batches_tracked" not in key]
    if unexpected_keys:
        err_msg.append(f'unexpected key in source state_dict: {", ".join(unexpected_keys)}\n')
    if missing_keys:
        err_msg.append(f'missing keys in source state_dict: {", ".join(missing_keys)}\n')
    rank, _ = dist_info()
    if len(err_msg) == 0 or rank != 0:
        return None
    err_msg.insert(0, "The model and loaded state dict do not match exactly\n")
    text = "\n".join(err_msg)
    if strict:
        raise RuntimeError(text)
    return text


def from_pavi(filename, map_location, load_file):
    """load_from_pavi's body: pavi://<model path> downloaded to a temporary
    directory (needs the pavi client), then load_file."""
    assert filename.startswith(
        "pavi://"
    ), f"Expected filename startswith `pavi://`, but get {filename}"
    model_path = filename[7:]
    try:
        from pavi import modelcloud
    except ImportError:
        raise ImportError("Please install pavi to load checkpoint from modelcloud.")
    model = modelcloud.get(model_path)
    with TemporaryDirectory() as tmp_dir:
        downloaded_file = osp.join(tmp_dir, model.name)
        model.download(downloaded_file)
        return load_file(downloaded_file, map_location)


def from_openmmlab(filename, map_location, model_urls, deprecated_urls, warn, home, load_http,
                   load_file):
    """load_from_openmmlab's body: open-mmlab://<name> (or openmmlab://)
    through the model-zoo table, a deprecated name warned about (warn(text))
    and replaced; an http(s) URL is loaded by load_http, anything else is a
    file below home() (which makes the directory, as mmcv's does)."""
    prefix_str = "open-mmlab://"
    if filename.startswith(prefix_str):
        model_name = filename[13:]
    else:
        model_name = filename[12:]
        prefix_str = "openmmlab://"
    if model_name in deprecated_urls:
        warn(
            f"{prefix_str}{model_name} is deprecated in favor "
            f"of {prefix_str}{deprecated_urls[model_name]}"
        )
        model_name = deprecated_urls[model_name]
    model_url = model_urls[model_name]
    if model_url.startswith(("http://", "https://")):
        return load_http(model_url, map_location=map_location)
    filename = osp.join(home(), model_url)
    if not osp.isfile(filename):
        raise FileNotFoundError(f"{filename} can not be found.")
    return load_file(filename, map_location)


def with_prefix(checkpoint, prefix):
    """_load_checkpoint_with_prefix's body: the weights under prefix, the
    prefix removed; AssertionError when there are none."""
    state_dict = checkpoint["state_dict"] if "state_dict" in checkpoint else checkpoint
    if not prefix.endswith("."):
        prefix += "."
    prefix_len = len(prefix)
    state_dict = {k[prefix_len:]: v for k, v in state_dict.items() if k.startswith(prefix)}
    assert state_dict, f"{prefix} is not in the pretrained model"
    return state_dict

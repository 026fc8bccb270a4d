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

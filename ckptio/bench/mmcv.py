"""End to end, as training code calls it: mmcv.runner.load_checkpoint
against ckptio.load_checkpoint, the same model and file.

Each side runs in its own child process (ckptio.bench.harness's helpers): the model
(built with SpecModel from the file's state-dict shapes) exists and the
file is in the page cache before anything is measured; one run measures the
extra peak RSS (total, and its private/anonymous part: a mapped file's
pages are page cache, shared and reclaimable), then the best of N runs
gives the time. Both sides run with TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 so
that checkpoints carrying numpy metadata load on both (mmcv's torch.load
would refuse them under torch's weights-only default); ckptio.load follows
the same variable.

    python -m ckptio.bench.mmcv FILE [--runs N] [--json]
"""

import json
import os
import sys
import types

from .harness import SpecModel, child_or_main, run_child, time_in_child, timing_table

METHODS = ("mmcv load_checkpoint", "ckptio load_checkpoint")


def _import_mmcv_checkpoint():
    """mmcv.runner.checkpoint; torchvision (imported there at module level,
    used only for torchvision:// names) replaced by an empty module when it
    cannot be imported beside this torch."""
    try:
        import torchvision  # noqa: F401
    except Exception:
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        sys.modules["torchvision"] = types.ModuleType("torchvision")
    import mmcv.runner.checkpoint

    return mmcv.runner.checkpoint


def _model_for(path):
    import torch

    ckpt = torch.load(path, weights_only=False, mmap=True)
    sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else ckpt
    spec = [(k, tuple(v.shape)) for k, v in sd.items() if isinstance(v, torch.Tensor)]
    del ckpt, sd
    return SpecModel.build(spec)


def child(method, path, runs):
    import logging

    if method == "mmcv load_checkpoint":
        load_checkpoint = _import_mmcv_checkpoint().load_checkpoint
    else:
        from ckptio.checkpoint import load_checkpoint
    model = _model_for(path)
    logger = logging.getLogger("ckptio.bench.mmcv")  # the load line goes nowhere

    def run():
        return load_checkpoint(model, path, map_location="cpu", logger=logger)

    print(json.dumps(time_in_child(run, runs, [path])))


def measure(big_path, runs):
    """{'file', 'bytes', 'rows': {method: {time, times, peak_extra, anon_extra}}}"""
    result = {"file": big_path, "bytes": os.path.getsize(big_path), "rows": {}}
    env = dict(os.environ, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1", PYTHONWARNINGS="ignore")
    for method in METHODS:
        result["rows"][method] = run_child("ckptio.bench.mmcv", method, big_path, runs, env=env)
    return result


def render(result):
    size = result["bytes"]
    rows = result["rows"]
    mmcv_t = rows["mmcv load_checkpoint"]["time"]
    return "\n".join(timing_table(f"end to end into a model: {result['file']}", rows, size,
                                  f"{'vs mmcv':>9}", lambda t: f"{mmcv_t / t:>8.2f}x"))


def main(argv=None):
    from .harness import section_main

    return section_main(sys.modules[__name__], argv, "checkpoint to load (a dict with 'state_dict', or a state dict)", runs=5)


if __name__ == "__main__":
    sys.exit(child_or_main(child, main))

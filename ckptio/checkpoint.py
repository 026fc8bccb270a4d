"""ckptio.checkpoint: mmcv 1.7.2's runner/checkpoint.py surface, the import
path users use (``from ckptio.checkpoint import load_checkpoint``).

The code is ckptio.compat.mmcv (its save side ckptio.compat.mmcv_save, what
both surfaces share ckptio.compat.base). This module *is* that module: it
puts it in its own place in sys.modules, so ``ckptio.checkpoint`` and
``ckptio.compat.mmcv`` are one module object, and a test's patch of
``ckptio.checkpoint.load_url`` (or ``load_from_http``, ``get_dist_info``, ...)
is what the loaders look up at call time, as with mmcv.runner.checkpoint.
"""
import sys

from .compat import mmcv as _surface

sys.modules[__name__] = _surface

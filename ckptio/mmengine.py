"""ckptio.mmengine: mmengine 0.10.7's runner/checkpoint.py load surface, the
import path users use (``from ckptio.mmengine import load_checkpoint``).
Importing it imports mmengine.

The code is ckptio.compat.mmengine (its save side
ckptio.compat.mmengine_save). This module *is* that module: it puts it in its
own place in sys.modules, so ``ckptio.mmengine`` and
``ckptio.compat.mmengine`` are one module object, and a test's patch of
``ckptio.mmengine.load_url`` (or ``get_dist_info``, ...) is what the loaders
look up at call time, as with mmengine.runner.checkpoint.
"""
import sys

from .compat import mmengine as _surface

sys.modules[__name__] = _surface

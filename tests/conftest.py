"""Shared test setup.

torchvision does not import beside torch 2.13, and mmcv.runner imports it
at module level: a stand-in `torchvision` goes into sys.modules before any
test imports mmcv.runner. It carries what mmcv's and ckptio's model-zoo code
reads (a version >= 0.14, list_models, get_model_weights and weights enums
with a DEFAULT alias) and torchvision's URLs for them (nothing is downloaded).

The fixture `patched`: the test runs with ckptio.patch() in place.
"""

import enum
import sys
import types

import pytest


def _stand_in_torchvision():
    tv = types.ModuleType("torchvision")
    tv.__version__ = "0.15.0+standin"
    models = types.ModuleType("torchvision.models")

    class WeightsEnum(enum.Enum):
        @property
        def url(self):
            return self.value

    class ResNet18_Weights(WeightsEnum):
        IMAGENET1K_V1 = "https://download.pytorch.org/models/resnet18-f37072fd.pth"
        DEFAULT = IMAGENET1K_V1

    class ResNet50_Weights(WeightsEnum):
        IMAGENET1K_V1 = "https://download.pytorch.org/models/resnet50-0676ba61.pth"
        IMAGENET1K_V2 = "https://download.pytorch.org/models/resnet50-11ad3fa6.pth"
        DEFAULT = IMAGENET1K_V2

    weights = {"resnet18": ResNet18_Weights, "resnet50": ResNet50_Weights}
    for cls in weights.values():
        setattr(models, cls.__name__, cls)
    models.list_models = lambda module=None: sorted(weights)
    models.get_model_weights = lambda name: weights[name]
    models.__path__ = []
    tv.models = models
    return tv, models


try:
    import torchvision  # noqa: F401
except Exception:
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]
    sys.modules["torchvision"], sys.modules["torchvision.models"] = _stand_in_torchvision()


@pytest.fixture
def patched():
    import ckptio

    ckptio.patch()
    yield
    ckptio.unpatch()


# CKPTIO_EXPECT_INSTALLED=1 (CI's run against the wheel): the suite must be
# testing the installed package, not a source tree that happens to be on
# sys.path
if __import__("os").environ.get("CKPTIO_EXPECT_INSTALLED") == "1":
    import ckptio._native as _native_under_test

    assert "site-packages" in _native_under_test.__file__, _native_under_test.__file__

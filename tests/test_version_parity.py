"""ckptio's torchvision version thresholds take mmcv's digit_version branch,
dev builds included (0.14.0.dev20220801 counts as before 0.14)."""

import pytest

from ckptio._mmcompat import version_before

mmcv_utils = pytest.importorskip("mmcv.utils")

VERSIONS = ["0.12.0", "0.13.0", "0.13.1+cpu", "0.13.0.dev20220601", "0.14.0.dev20220801",
            "0.14.0a0", "0.14.0rc1", "0.14.0", "0.14.1", "0.15.2+cu118", "0.14.0b2",
            "0.13.0rc2", "0.14.0a0.dev1", "0.13"]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("bound", ["0.13.0a0", "0.14.0a0"])  # as get_torchvision_models passes them
def test_version_before_is_digit_version(version, bound):
    d = mmcv_utils.digit_version
    assert version_before(version, bound) == (d(version) < d(bound))

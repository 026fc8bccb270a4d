"""The mmcv surface unwraps the module wrappers mmcv's MODULE_WRAPPERS
holds, on load and on save alike, and (as mmcv) not those registered only in
mmengine's MODEL_WRAPPERS."""

from collections import OrderedDict

import pytest
import torch
import torch.nn as nn

import ckptio.checkpoint as ours

mmcv_ckpt = pytest.importorskip("mmcv.runner.checkpoint")
from mmcv.parallel import MODULE_WRAPPERS  # noqa: E402
import mmengine.model  # noqa: E402,F401  (imported in every mmengine program)
from mmengine.registry import MODEL_WRAPPERS  # noqa: E402


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)


def wrapper_class(name, registry):
    cls = type(name, (nn.Module,), {"__init__": lambda self, m: (nn.Module.__init__(self),
                                                                setattr(self, "module", m))[0]})
    registry.register_module(module=cls)
    return cls


EngineOnly = wrapper_class("CkptioEngineOnlyWrapper", MODEL_WRAPPERS)
MmcvOne = wrapper_class("CkptioMmcvWrapper", MODULE_WRAPPERS)


def state():
    torch.manual_seed(0)
    return OrderedDict((k, v.clone()) for k, v in Net().state_dict().items())


@pytest.mark.parametrize("wrapper", [EngineOnly, MmcvOne])
def test_load_state_dict_unwraps_as_mmcv(wrapper, capsys):
    sd = state()
    results = []
    for mod in (mmcv_ckpt, ours):
        torch.manual_seed(1)
        model = wrapper(Net())
        mod.load_state_dict(model, OrderedDict(sd))
        with pytest.raises(RuntimeError) if wrapper is EngineOnly else _nothing():
            mod.load_state_dict(wrapper(Net()), OrderedDict(sd), strict=True)
        results.append({k: v.clone() for k, v in model.state_dict().items()})
    assert list(results[0]) == list(results[1])
    for k in results[0]:
        assert torch.equal(results[0][k], results[1][k])
    # the mmcv registry's wrapper is unwrapped: the weights were loaded
    assert torch.equal(results[1]["module.fc.weight"], sd["fc.weight"]) == (wrapper is MmcvOne)


@pytest.mark.parametrize("wrapper", [EngineOnly, MmcvOne])
def test_get_state_dict_and_load_agree(wrapper):
    model = wrapper(Net())
    theirs = mmcv_ckpt.get_state_dict(model)
    mine = ours.get_state_dict(model)
    assert list(mine) == list(theirs)
    # what ckptio saves it loads back into the same wrapper, strictly
    ours.load_state_dict(wrapper(Net()), mine, strict=True)
    mmcv_ckpt.load_state_dict(wrapper(Net()), theirs, strict=True)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

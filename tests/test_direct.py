"""load_checkpoint straight into the model (ckptio/_direct.py): entries that
a plain copy would put into a parameter or buffer unchanged are read from
the file into it, and everything else goes through load_state_dict. These
tests hold the direct path to what the normal path gives: the real mmcv
1.7.2 and mmengine 0.10.7 load_checkpoint on the same files, compared
tensor by tensor (bit-exact), with the same printed and logged messages and
the same exceptions; and they check from ckptio._direct.stats that the
direct path was taken where it should be, and not where it must not be."""

import contextlib
import io
import logging

import pytest
import torch
import torch.nn as nn

import ckptio
from ckptio import _direct
import ckptio.checkpoint as ours_mmcv

mmcv_ckpt = pytest.importorskip("mmcv.runner.checkpoint")
mme_ckpt = pytest.importorskip("mmengine.runner.checkpoint")
import ckptio.mmengine as ours_mme  # noqa: E402


class Block(nn.Module):
    def __init__(self, width=4):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3)
        self.norm = nn.BatchNorm2d(width)
        self.register_buffer("scale", torch.ones(width))
        self.register_buffer("scratch", torch.zeros(2), persistent=False)


class Model(nn.Module):
    def __init__(self, width=4):
        super().__init__()
        self.backbone = nn.Sequential(Block(width), Block(width))
        self.head = nn.Linear(width, 5)
        self.half = nn.Linear(3, 3).to(torch.float16)


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(7, 4)
        self.out = nn.Linear(4, 7, bias=False)
        self.out.weight = self.embed.weight


class Custom(nn.Module):
    """A module whose _load_from_state_dict changes what it loads."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "fc.weight"
        if key in state_dict:
            state_dict[key] = state_dict[key] * 2
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class Renaming(nn.Module):
    """A parent whose _load_from_state_dict moves its child's entry away."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if prefix + "fc.weight" in state_dict:
            state_dict[prefix + "old_weight"] = state_dict.pop(prefix + "fc.weight")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class WithCustom(nn.Module):
    def __init__(self):
        super().__init__()
        self.plain = nn.Linear(3, 3)
        self.custom = Custom()
        self.renaming = Renaming()


def _fresh(cls, seed, *args):
    torch.manual_seed(seed)
    model = cls(*args)
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.is_floating_point():
                t.normal_()
    return model


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape, k
        assert torch.equal(sa[k].view(torch.uint8) if sa[k].dtype.is_floating_point else sa[k],
                           sb[k].view(torch.uint8) if sb[k].dtype.is_floating_point else sb[k]), k
    for (na, ta), (nb, tb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb and type(ta) is type(tb) and ta.requires_grad == tb.requires_grad


def _run(fn, *args, **kwargs):
    """(result or exception text, stdout, log text) of one call."""
    out, log = io.StringIO(), io.StringIO()
    logger = logging.getLogger("ckptio-direct-test")
    handler = logging.StreamHandler(log)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with contextlib.redirect_stdout(out):
            try:
                result = fn(*args, logger=logger, **kwargs)
            except Exception as exc:  # compared by type and text
                result = (type(exc), str(exc))
    finally:
        logger.removeHandler(handler)
    return result, out.getvalue(), log.getvalue()


def _both(surface, theirs, path, make, **kwargs):
    """Loads path into two fresh models (same seed) with ours and theirs;
    returns (our model, their model, direct entries read)."""
    ours_model, their_model = make(), make()
    before = dict(_direct.stats)
    r1, out1, log1 = _run(surface.load_checkpoint, ours_model, str(path), **kwargs)
    direct = _direct.stats["direct"] - before["direct"]
    r2, out2, log2 = _run(theirs.load_checkpoint, their_model, str(path), **kwargs)
    assert (out1, log1) == (out2, log2)
    if isinstance(r2, tuple):
        assert r1 == r2
    else:
        assert not isinstance(r1, tuple), r1
    _same_state(ours_model, their_model)
    return ours_model, their_model, direct


SURFACES = [(ours_mmcv, mmcv_ckpt), (ours_mme, mme_ckpt)]


@pytest.mark.parametrize("surface,theirs", SURFACES)
def test_direct_equals_load_state_dict(tmp_path, surface, theirs):
    path = tmp_path / "model.pth"
    src = _fresh(Model, 1)
    torch.save({"state_dict": src.state_dict(), "meta": {"epoch": 3}}, path)
    ours_model, _, direct = _both(surface, theirs, path, lambda: _fresh(Model, 2))
    # every parameter and persistent buffer of the model came straight from the file
    assert direct == len(src.state_dict())
    _same_state(ours_model, src)
    # the model's tensors keep their identity (no new storage was swapped in)
    assert ours_model.head.weight.data_ptr() != 0


@pytest.mark.parametrize("surface,theirs", SURFACES)
def test_mmap_false_and_map_location(tmp_path, surface, theirs):
    path = tmp_path / "model.pth"
    torch.save(_fresh(Model, 1).state_dict(), path)
    for kwargs in ({"map_location": "cpu"}, {"map_location": lambda s, loc: s},
                   {"map_location": torch.device("cpu")}):
        _both(surface, theirs, path, lambda: _fresh(Model, 2), **kwargs)


@pytest.mark.parametrize("surface,theirs", SURFACES)
def test_mismatches_keep_their_messages(tmp_path, surface, theirs):
    """Shape and dtype mismatches, missing and unexpected keys: the same
    messages and results as the normal path; the matching entries are still
    read directly, the others are not."""
    path = tmp_path / "model.pth"
    sd = _fresh(Model, 1).state_dict()
    sd["head.weight"] = torch.randn(6, 4)  # shape mismatch
    sd["head.bias"] = sd["head.bias"].double()  # dtype differs: copy_ casts
    del sd["backbone.1.norm.running_var"]  # missing
    sd["extra.weight"] = torch.ones(2)  # unexpected
    torch.save(sd, path)
    _, _, direct = _both(surface, theirs, path, lambda: _fresh(Model, 2))
    assert direct == len(sd) - 3


@pytest.mark.parametrize("surface,theirs", SURFACES)
def test_strict_errors_identical(tmp_path, surface, theirs):
    path = tmp_path / "model.pth"
    sd = _fresh(Model, 1).state_dict()
    del sd["head.bias"]
    torch.save(sd, path)
    ours_model, their_model = _fresh(Model, 2), _fresh(Model, 2)
    r1 = _run(surface.load_checkpoint, ours_model, str(path), strict=True)
    r2 = _run(theirs.load_checkpoint, their_model, str(path), strict=True)
    assert r1 == r2 and isinstance(r1[0], tuple)
    _same_state(ours_model, their_model)


@pytest.mark.parametrize("surface,theirs", SURFACES)
def test_revise_keys_and_wrapper_prefix(tmp_path, surface, theirs):
    path = tmp_path / "model.pth"
    src = _fresh(Model, 1)
    torch.save({"state_dict": {"module." + k: v for k, v in src.state_dict().items()}}, path)
    ours_model, _, direct = _both(surface, theirs, path, lambda: _fresh(Model, 2))
    assert direct == len(src.state_dict())
    _same_state(ours_model, src)
    sd = {"net." + k: v for k, v in src.state_dict().items()}
    torch.save(sd, path)
    _both(surface, theirs, path, lambda: _fresh(Model, 2), revise_keys=[(r"^net\.", "")])


@pytest.mark.parametrize("surface,theirs", SURFACES)
def test_tied_and_custom_modules_take_the_normal_path(tmp_path, surface, theirs):
    path = tmp_path / "tied.pth"
    torch.save(_fresh(Tied, 1).state_dict(), path)
    _, _, direct = _both(surface, theirs, path, lambda: _fresh(Tied, 2))
    assert direct == 0  # two keys write into one storage: the order matters, left to torch
    torch.save(_fresh(WithCustom, 1).state_dict(), path)
    ours_model, _, direct = _both(surface, theirs, path, lambda: _fresh(WithCustom, 2))
    assert direct == 2  # plain.weight and plain.bias only; Custom doubles its child's weight
    hooked = _fresh(Model, 2)
    hooked.head._register_load_state_dict_pre_hook(
        lambda sd, prefix, *a: sd.__setitem__(prefix + "bias", sd[prefix + "bias"] + 1))
    torch.save(_fresh(Model, 1).state_dict(), path)
    their_model = _fresh(Model, 2)
    their_model.head._register_load_state_dict_pre_hook(
        lambda sd, prefix, *a: sd.__setitem__(prefix + "bias", sd[prefix + "bias"] + 1))
    ours_mmcv_before = _direct.stats["direct"]
    _run(surface.load_checkpoint, hooked, str(path))
    _run(theirs.load_checkpoint, their_model, str(path))
    assert _direct.stats["direct"] - ours_mmcv_before == len(hooked.state_dict()) - 2
    _same_state(hooked, their_model)


@pytest.mark.parametrize("surface,theirs", SURFACES)
def test_batchnorm_metadata_versions(tmp_path, surface, theirs):
    """A checkpoint from before BatchNorm had num_batches_tracked (_metadata
    version 1): BatchNorm's own _load_from_state_dict adds it; the rest is
    read directly."""
    path = tmp_path / "old-bn.pth"
    sd = _fresh(Model, 1).state_dict()
    for k in [k for k in sd if k.endswith("num_batches_tracked")]:
        del sd[k]
    for k in list(sd._metadata):
        if k.endswith("norm"):
            sd._metadata[k]["version"] = 1
    torch.save(sd, path)
    _, _, direct = _both(surface, theirs, path, lambda: _fresh(Model, 2))
    assert direct == len(sd)


def test_not_a_mapped_file_takes_the_normal_path(tmp_path):
    path = tmp_path / "model.pth"
    torch.save(_fresh(Model, 1).state_dict(), path)
    model, other = _fresh(Model, 2), _fresh(Model, 2)
    before = _direct.stats["direct"]
    ours_mmcv.load_state_dict(model, ckptio.load(path))  # no load_checkpoint: nothing captured
    assert _direct.stats["direct"] == before
    ours_mmcv.load_checkpoint(other, str(path))
    _same_state(model, other)


def test_file_replaced_between_map_and_read(tmp_path, monkeypatch):
    """If the file is replaced after it was mapped, its bytes are not read
    from the new file: the mapped (old) bytes are what load_state_dict gets."""
    path = tmp_path / "model.pth"
    src = _fresh(Model, 1)
    torch.save(src.state_dict(), path)
    real = ours_mmcv._load_checkpoint

    def load_then_replace(*args, **kwargs):
        ckpt = real(*args, **kwargs)
        tmp = tmp_path / "new.pth"
        torch.save(_fresh(Model, 3).state_dict(), tmp)
        tmp.replace(path)
        return ckpt

    monkeypatch.setattr(ours_mmcv, "_load_checkpoint", load_then_replace)
    model = _fresh(Model, 2)
    before = _direct.stats["direct"]
    ours_mmcv.load_checkpoint(model, str(path))
    assert _direct.stats["direct"] == before
    _same_state(model, src)


class Recorder(nn.Module):
    """A module with a load-state-dict post hook that reads what was loaded."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.seen = []
        self.register_load_state_dict_post_hook(
            lambda module, keys: module.seen.append(module.fc.weight.detach().clone()))


@pytest.mark.parametrize("surface,theirs", SURFACES)
def test_reads_run_beside_load_state_dict_only_when_nothing_looks(tmp_path, surface, theirs):
    """The preads run while load_state_dict walks the model only when every
    module loads with torch's own code and no post hook runs (mmengine's
    load_state_dict runs them; one may read the bytes just loaded)."""
    path = tmp_path / "model.pth"
    torch.save(_fresh(Model, 1).state_dict(), path)
    before = dict(_direct.stats)
    _both(surface, theirs, path, lambda: _fresh(Model, 2))
    assert _direct.stats["overlapped"] - before["overlapped"] == 1
    torch.save(_fresh(Recorder, 1).state_dict(), path)
    before = dict(_direct.stats)
    ours_model, their_model, direct = _both(surface, theirs, path, lambda: _fresh(Recorder, 2))
    assert direct == 2 and _direct.stats["overlapped"] == before["overlapped"]
    assert len(ours_model.seen) == len(their_model.seen)
    for a, b in zip(ours_model.seen, their_model.seen):
        assert torch.equal(a, b)


@pytest.mark.parametrize("surface,theirs", SURFACES)
@pytest.mark.parametrize("make", [Model, WithCustom], ids=["beside", "before"])
@pytest.mark.parametrize("strict", [False, True])
def test_failed_read_falls_back_to_the_mapping(tmp_path, monkeypatch, surface, theirs, make,
                                               strict):
    """A pread that fails (here: after scribbling over its first target)
    leaves no trace: the entries are copied from the mapping, as
    load_state_dict would have copied them, with the same messages and, for
    strict, the same error."""
    path = tmp_path / "model.pth"
    sd = _fresh(make, 1).state_dict()
    if strict:
        sd["extra.weight"] = torch.ones(2)
    torch.save(sd, path)

    def failing(fd, jobs, threads=2):
        jobs[0][1][:] = 0
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(_direct._native, "pread_into", failing)
    before = dict(_direct.stats)
    ours_model, _, direct = _both(surface, theirs, path, lambda: _fresh(make, 2), strict=strict)
    assert direct == 0 and _direct.stats["normal"] - before["normal"] == 1
    assert _direct.stats["calls"] - before["calls"] == 1

"""The model contract, run on every conf/model/*.yaml in each dim its class supports (no list of models here: a
new network is tested by adding its YAML). Each network, at its YAML's defaults on the smallest resolution it
accepts, takes model(x [B, C, *spatial], t [B], y [B] | None) → x's shape, starts at zero output where it declares so, reads its labels
and the null class, and refuses the dims it does not support in one line."""

from __future__ import annotations

import pytest
import torch

from diffuse.building import build, part_class
from diffuse.errors import DiffuseError
from diffuse.validation import check_model_fits_data

from conftest import compose_cfg, conf_choices

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest's

CASES = [(name, dim) for name in conf_choices("model")
         for dim in part_class(compose_cfg("train", [f"model={name}"]).model._target_).supported_dims]


def _built(name: str, dim: int, conditional: bool = True):
    """The model at its YAML's defaults on shapes data of the smallest resolution (8, 16, 32, 64) it accepts."""
    for resolution in (8, 16, 32, 64):
        cfg = compose_cfg("train", [f"model={name}", f"dim={dim}", f"dataset.resolution={resolution}",
                                    f"conditional={str(conditional).lower()}"])
        model = build(cfg.model, "model")
        shape = (int(cfg.dataset.channels), *[resolution] * dim)
        try:
            check_model_fits_data(model, shape, int(model.num_classes or 0), "contract")
            return model.eval(), shape
        except DiffuseError:
            continue
    raise AssertionError(f"model={name} dim={dim} accepts none of the resolutions 8, 16, 32, 64")


@pytest.mark.parametrize("name,dim", CASES, ids=[f"{n}-{d}d" for n, d in CASES])
def test_model_contract(name, dim):
    torch.manual_seed(0)
    model, shape = _built(name, dim)
    x, t = torch.randn(2, *shape), torch.tensor([0.3, 0.8])
    y = torch.tensor([0, 1])
    with torch.no_grad():
        out = model(x, t, y)
        assert out.shape == x.shape and out.dtype == torch.float32
        if type(model).zero_init_output:  # as the class declares (models.blocks.output_head)
            assert torch.count_nonzero(out) == 0, "the output head must start at zero"
        for p in model.parameters():  # away from the zero head: the output now depends on its inputs
            p.add_(0.05 * torch.randn_like(p))
        out = model(x, t, y)
        assert torch.isfinite(out).all()
        assert not torch.allclose(out, model(x, t.flip(0), y)), "the output does not depend on t"
        assert model.num_classes > 0 and model.null_class == model.num_classes
        assert not torch.allclose(out, model(x, t, y.flip(0))), "the output does not depend on the label"
        null = model(x, t, torch.full_like(y, model.null_class))  # the null class guidance reads
        assert null.shape == x.shape and torch.isfinite(null).all()
    plain, _ = _built(name, dim, conditional=False)
    assert plain.num_classes == 0 and plain.null_class is None
    with torch.no_grad():
        assert plain(x, t, None).shape == x.shape


@pytest.mark.parametrize("name", conf_choices("model"))
def test_unsupported_dims_are_one_line(name):
    cls = part_class(compose_cfg("train", [f"model={name}"]).model._target_)
    for dim in {1, 2, 3} - set(cls.supported_dims):
        cfg = compose_cfg("train", [f"model={name}", f"dim={dim}"])
        with pytest.raises(DiffuseError, match="cannot build model"):
            build(cfg.model, "model")

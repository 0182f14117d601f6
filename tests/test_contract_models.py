"""The model contract, run on every conf/model/*.yaml in each dim its class supports (conftest's MODEL_CASES: no
list of models here, a new network is tested by adding its YAML), at the YAML's sizes on the smallest resolution
it accepts. Each network takes model(x [B, C, *spatial], t [B], y [B] | None) → x's shape, starts at zero output
where it declares so, passes a gradient to every parameter it does not declare inert, reads t, its labels and the
null class, fits a fixed batch in a few steps, and refuses the dims it does not support in one line. (No host
syncs in its training step: test_host_syncs, over the same cases.)"""

from __future__ import annotations

import pytest
import torch

from diffuse.building import build
from diffuse.errors import DiffuseError

from conftest import (MODEL_CASES, MODEL_IDS, compose_cfg, conf_choices, model_dims, model_overrides, model_takes_labels,
                      one_adam_step)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest's


def _built(name: str, dim: int, conditional: bool = True):
    """The model as `diffuse train model=NAME dim=DIM` builds it, and the [C, *spatial] shape of its data
    (conditional where the model takes labels at that dim)."""
    conditional = conditional and model_takes_labels(name, dim)
    cfg = compose_cfg("train", [*model_overrides(name, dim), f"conditional={str(conditional).lower()}"])
    model = build(cfg.model, "model")
    return model, (int(cfg.dataset.channels), *[int(cfg.dataset.resolution)] * dim)


def _batch(shape, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.rand(n, generator=g) * 0.9 + 0.05, torch.arange(n) % 2


@pytest.mark.parametrize("name,dim", MODEL_CASES, ids=MODEL_IDS)
def test_model_contract(name, dim):
    torch.manual_seed(0)
    model, shape = _built(name, dim)
    model.eval()
    x, t, y = torch.randn(2, *shape), torch.tensor([0.3, 0.8]), torch.tensor([0, 1])
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
    if not model_takes_labels(name, dim):  # declared label-free here: a conditional run is refused in one line
        cfg = compose_cfg("train", [*model_overrides(name, dim), "conditional=true"])
        with pytest.raises(DiffuseError) as e:
            build(cfg.model, "model")
        assert "\n" not in str(e.value) and "conditional=false" in str(e.value)
        assert model.num_classes == 0 and model.null_class is None
        return
    with torch.no_grad():
        assert model.num_classes > 0 and model.null_class == model.num_classes
        assert not torch.allclose(out, model(x, t, y.flip(0))), "the output does not depend on the label"
        null = model(x, t, torch.full_like(y, model.null_class))  # the null class guidance reads
        torch.testing.assert_close(model(x, t, None), null)  # y = None is the null class
    plain, _ = _built(name, dim, conditional=False)
    assert plain.num_classes == 0 and plain.null_class is None
    with torch.no_grad():
        assert plain(x, t, None).shape == x.shape


@pytest.mark.parametrize("name,dim", MODEL_CASES, ids=MODEL_IDS)
def test_gradients_reach_every_parameter(name, dim):
    torch.manual_seed(0)
    model, shape = _built(name, dim)
    x, t, y = _batch(shape)
    one_adam_step(model, x, t, y)  # zero-initialised heads pass no gradient back until they have moved once
    model(x, t, y).square().mean().backward()
    inert = type(model).inert_parameters
    for param_name, p in model.named_parameters():
        assert p.grad is not None, f"{param_name}: no gradient"
        if not any(part in param_name for part in inert):
            assert p.grad.abs().sum() > 0, f"{param_name}: gradient all zero"
    assert all(any(part in n for n, _ in model.named_parameters()) for part in inert), "an inert name matches nothing"


@pytest.mark.parametrize("name,dim", MODEL_CASES, ids=MODEL_IDS)
def test_a_few_steps_fit_a_fixed_batch(name, dim):
    """Predict ε from x_t = cos(πt/2) x₀ + sin(πt/2) ε, as training does: 20 AdamW steps lower the loss."""
    torch.manual_seed(0)
    model, shape = _built(name, dim)
    x0, t, y = _batch(shape, n=4)
    x0 = x0.clamp(-1, 1)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    alpha, sigma = [f(t * torch.pi / 2).view(-1, *([1] * (dim + 1))) for f in (torch.cos, torch.sin)]
    x_t = alpha * x0 + sigma * eps
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(20):
        loss = torch.nn.functional.mse_loss(model(x_t, t, y), eps)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("name", conf_choices("model"))
def test_unsupported_dims_are_one_line(name):
    for dim in {1, 2, 3} - set(model_dims(name)):
        cfg = compose_cfg("train", [f"model={name}", f"dim={dim}"])
        with pytest.raises(DiffuseError, match="cannot build model"):
            build(cfg.model, "model")


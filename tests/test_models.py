"""What is particular to each network (MSNAT's levels, windows and backends, ShuffleNet's units, the spatial
transformer's sizes), and on a GPU a bf16 step of every conf/model/*.yaml against fp32. The contract every
network keeps (shapes, gradients, conditioning, fitting a batch) is test_contract_models."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from diffuse.errors import DiffuseError
from diffuse.models.msnat import MSNATUNet, NATBlock, levels_for_dim
from diffuse.models.shufflenet import ShuffleNetUNet, ShuffleUnit, channel_shuffle
from diffuse.models.spatial_transformer import SpatialTransformerUNet

from conftest import (MODEL_CASES, MODEL_IDS, TWO_TINY_STEPS, compose_cfg, model_overrides, one_adam_step, rel_err,
                      requires_cuda)

NUM_CLASSES = 3
TINY_LEVELS = [dict(mult=1, depth=1, heads=2, kernel=3, dilations=[1, 2]), dict(mult=2, depth=1, heads=2, kernel=3)]


def msnat(dim, num_classes=NUM_CLASSES, **kw):
    return MSNATUNet(dim=dim, in_channels=2, base_channels=8, time_emb_dim=8, levels=TINY_LEVELS,
                     num_classes=num_classes, **kw)


def shufflenet(dim, num_classes=NUM_CLASSES, **kw):
    return ShuffleNetUNet(dim=dim, in_channels=2, base_channels=16, channel_mult=(2, 4), units=1, time_emb_dim=16,
                          num_classes=num_classes, **kw)


def spatial_transformer(dim, num_classes=NUM_CLASSES, **kw):
    return SpatialTransformerUNet(dim=dim, in_channels=2, channels=(8, 16, 16, 32), embed_dim=16, context_dim=16,
                                  heads=2, num_classes=num_classes, **kw)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest's


# every conf/model/*.yaml in each dim: one bf16 training step on a GPU agrees with fp32
@requires_cuda
@pytest.mark.parametrize("name,dim", MODEL_CASES, ids=MODEL_IDS)
def test_bf16_training_step_on_cuda_agrees_with_fp32(name, dim):
    from diffuse.jobs.common import build, build_dataset

    cfg = compose_cfg("train", [o for o in TWO_TINY_STEPS if not o.startswith("device=")] + model_overrides(name, dim))
    dataset = build_dataset(cfg)
    model = build(cfg.model, "model").to("cuda")
    for p in model.parameters():  # the zero-initialised output heads would hide every other layer's gradient
        if p.dim() > 1 and not p.any():
            torch.nn.init.normal_(p, std=0.02)
    x, y = dataset.get_batch(torch.arange(4))
    x, y = x.to("cuda"), y.to("cuda")
    t = torch.rand(4, device="cuda")
    losses, grads = {}, {}
    for precision, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
            out = model(x, t, y)
        loss = out.float().pow(2).mean()
        loss.backward()
        losses[precision] = loss.item()
        grads[precision] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert abs(losses["bf16"] - losses["fp32"]) <= 0.03 * losses["fp32"] + 1e-6
    assert rel_err(grads["bf16"], grads["fp32"]) < 0.1


# ----- MSNAT -----

def test_msnat_levels_come_from_the_dims_entry():
    by_dim = {"dim1": [dict(kernel=9)], "dim2": [dict(kernel=5), dict(kernel=3)], "dim3": [dict(kernel=3)]}
    assert [s.kernel for s in levels_for_dim(by_dim, 2)] == [5, 3]
    assert [s.kernel for s in levels_for_dim(by_dim, 1)] == [9]
    assert levels_for_dim([dict(dilations=2)], 3)[0].dilations == (2,)
    with pytest.raises(ValueError, match="no entry dim3"):
        levels_for_dim({"dim2": [{}]}, 3)
    with pytest.raises(ValueError, match="unknown keys"):
        levels_for_dim([dict(kernal=3)], 2)


def test_msnat_blocks_sit_at_every_level_with_their_windows():
    model = msnat(2)
    blocks = [m for m in model.modules() if isinstance(m, NATBlock)]
    assert len(blocks) == 2 + 2 + 1  # depth 1 per level in encoder and decoder, one in the middle
    assert [b.attn.dilations for b in model.encoder[0].blocks] == [(1, 2)]
    assert blocks[0].attn.windows((8, 8)) == [((3, 3), (1, 1)), ((3, 3), (2, 2))]


@pytest.mark.slow
def test_msnat_backends_agree_inside_the_model():
    """The same weights with attention.backend torch and flex (and natten where it runs): same output."""
    torch.manual_seed(0)
    kw = dict(base_channels=16)  # head width 8: natten's minimum
    reference = MSNATUNet(dim=2, in_channels=1, levels=TINY_LEVELS, num_classes=2, time_emb_dim=8,
                          attention={"backend": "torch"}, **kw).eval()
    x, t = torch.randn(2, 1, 12, 10), torch.rand(2)
    one_adam_step(reference.train(), x, t, torch.tensor([0, 1]))
    reference.eval()
    backends = ["flex"] + (["natten"] if _has_natten() else [])
    for backend in backends:
        other = MSNATUNet(dim=2, in_channels=1, levels=TINY_LEVELS, num_classes=2, time_emb_dim=8,
                          attention={"backend": backend}, **kw).eval()
        other.load_state_dict(reference.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(other(x, t, torch.tensor([0, 1])), reference(x, t, torch.tensor([0, 1])),
                                       atol=1e-5, rtol=1e-4, msg=backend)


def _has_natten() -> bool:
    from diffuse.models.attention import natten_available
    return natten_available()


def test_msnat_errors():
    with pytest.raises(ValueError, match="divisible by 2"):
        msnat(2)(torch.randn(1, 2, 9, 8), torch.rand(1))
    with pytest.raises(ValueError, match="unknown keys"):
        msnat(2, attention={"backend": "torch", "tiles": 4})
    with pytest.raises(DiffuseError, match="auto, torch, flex, natten"):
        msnat(2, attention={"backend": "cuda"})


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_msnat_config_builds_each_dims_model(dim):
    cfg = compose_cfg("train", ["model=msnat", f"dim={dim}"])
    model = instantiate(cfg.model)
    assert model.dim == dim and model.num_classes == 4
    assert [s.kernel for s in model.levels] == [{1: 15, 2: 7, 3: 5}[dim]] * 3
    assert model.levels[0].dilations == ((1, 4) if dim == 1 else (1, 2))


# ----- ShuffleNet -----

def test_channel_shuffle_interleaves_the_two_halves():
    x = torch.arange(6.0).view(1, 6, 1, 1)
    assert channel_shuffle(x).flatten().tolist() == [0, 3, 1, 4, 2, 5]


def test_shuffle_unit_passes_half_the_channels_through():
    """ShuffleNet v2's basic unit: the first half is the identity (the residual path), shuffled to even slots."""
    unit = ShuffleUnit(8, 8)
    x = torch.randn(2, 8, 5, 5)
    torch.testing.assert_close(unit(x)[:, 0::2], x[:, :4])


def test_shufflenet_is_2d_and_small():
    with pytest.raises(ValueError, match="2-D only"):
        ShuffleNetUNet(dim=3)
    model = ShuffleNetUNet()  # the MNIST setup's sizes: 28 → 14 → 7
    assert sum(p.numel() for p in model.parameters()) < 3_000_000
    x = torch.randn(2, 1, 28, 28)
    sizes = []
    hooks = [b.register_forward_hook(lambda m, i, o: sizes.append(o[0].shape[-1])) for b in model.encoder]
    assert model(x, torch.rand(2)).shape == x.shape
    assert sizes == [14, 7]
    for h in hooks:
        h.remove()


# ----- spatial transformer -----

@pytest.mark.parametrize("size", [28, 32, 29, 17])
def test_spatial_transformer_takes_28_32_and_odd_sizes(size):
    model = spatial_transformer(2)
    x = torch.randn(2, 2, size, size)
    assert model(x, torch.rand(2), torch.tensor([0, 1])).shape == x.shape


def test_spatial_transformer_follows_the_tutorials_sizes():
    """Song's tutorial UNet at 28×28: encoder maps 26, 12, 5, 2; transformers at the two coarsest."""
    model = SpatialTransformerUNet(num_classes=10)
    sizes = []
    for level in model.enc:
        level.register_forward_hook(lambda m, i, o: sizes.append(tuple(o.shape[1:])))
    model(torch.randn(1, 1, 28, 28), torch.rand(1), torch.tensor([3]))
    assert sizes == [(32, 26, 26), (64, 12, 12), (128, 5, 5), (256, 2, 2)]
    assert [type(a).__name__ for a in model.enc_attn] == ["Identity", "Identity", "SpatialTransformer",
                                                            "SpatialTransformer"]
    assert model.enc_attn[2].block.cross_attn is not None


def test_spatial_transformer_errors():
    with pytest.raises(ValueError, match="≥ 17"):
        spatial_transformer(2)(torch.randn(1, 2, 16, 16), torch.rand(1))
    assert spatial_transformer(2, num_classes=0).enc_attn[2].block.cross_attn is None

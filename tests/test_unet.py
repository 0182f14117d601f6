"""The plain UNet (models/unet.py) and its ResBlock: shapes in every dim, class and time conditioning,
gradients to every parameter, sizes it cannot halve."""

from __future__ import annotations

import pytest
import torch

from diffuse.models.unet import UNet


@pytest.mark.parametrize("dim,size", [(1, 16), (2, 8), (3, 8)])
def test_unet_shapes_conditioning_and_grads(dim, size):
    torch.manual_seed(0)
    model = UNet(dim=dim, in_channels=2, base_channels=8, channel_mult=(1, 2), attn_levels=(1,), num_classes=3)
    torch.nn.init.normal_(model.head[-1].weight, std=0.1)  # the zero-init head would hide conditioning
    x = torch.randn(2, 2, *([size] * dim))
    t = torch.rand(2)
    out = model(x, t, torch.tensor([0, 1]))
    assert out.shape == x.shape
    assert not torch.allclose(out, model(x, t, torch.tensor([2, 2])))
    assert torch.allclose(model(x, t, None), model(x, t, torch.full((2,), model.null_class)))
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing


def test_unet_rejects_indivisible_sizes():
    model = UNet(dim=2, in_channels=1, base_channels=8, channel_mult=(1, 2, 2))
    with pytest.raises(ValueError, match="divisible by 4"):
        model(torch.randn(1, 1, 10, 10), torch.rand(1))


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_res_block_output_depends_on_the_embedding_even_with_one_channel_per_group(dim):
    """GroupNorm(8) on 8 channels normalises each channel alone: an embedding added before it would vanish."""
    from diffuse.models.blocks import ResBlock

    torch.manual_seed(0)
    block = ResBlock(dim, 8, 8, emb_dim=16)
    x = torch.randn(2, 8, *([6] * dim))
    emb_a, emb_b = torch.randn(1, 16).expand(2, -1), torch.randn(1, 16).expand(2, -1)
    assert (block(x, emb_a) - block(x, emb_b)).abs().max() > 1e-2


def test_unet_output_depends_on_time_and_class_at_every_width():
    torch.manual_seed(0)
    model = UNet(dim=1, in_channels=1, base_channels=16, channel_mult=(1, 2), num_classes=3)
    torch.nn.init.normal_(model.head[-1].weight, std=0.1)
    x = torch.randn(2, 1, 16)
    y = torch.tensor([0, 1])
    assert (model(x, torch.full((2,), 0.1), y) - model(x, torch.full((2,), 0.9), y)).abs().max() > 1e-3
    assert (model(x, torch.full((2,), 0.5), y) - model(x, torch.full((2,), 0.5), torch.tensor([2, 2]))).abs().max() > 1e-3

"""The default parts of issue 2: the shapes dataset and the plain UNet."""

from __future__ import annotations

import pytest
import torch

from diffuse.data.shapes import ShapesDataset
from diffuse.models.unet import UNet


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_shapes_dataset(dim):
    ds = ShapesDataset(dim=dim, resolution=16, size=200, seed=1)
    x, y = ds.get_batch(torch.arange(200))
    assert x.shape == (200, 1, *([16] * dim)) and y.shape == (200,) and y.dtype == torch.int64
    assert x.min() >= -1 and x.max() <= 1
    assert set(y.tolist()) == {0, 1, 2, 3} and len(ds.class_names) == 4
    # deterministic per seed and per index, whatever the batch it is drawn in
    again = ShapesDataset(dim=dim, resolution=16, size=200, seed=1)
    assert torch.equal(again.get_batch(torch.tensor([7, 3]))[0], x[[7, 3]])
    assert not torch.equal(ShapesDataset(dim=dim, resolution=16, size=200, seed=2).get_batch(torch.arange(4))[0], x[:4])
    # each item really is a shape on a background: both levels present
    flat = x.flatten(1)
    assert (flat.min(1).values < -0.9).all() and (flat.max(1).values > 0.5).all()


def test_shapes_classes_differ_in_area():
    """Same centre and radius, different class → different filled area (ball < box in 2-D)."""
    ds = ShapesDataset(dim=2, resolution=32, size=4, seed=0)
    ds.labels = torch.arange(4)
    ds.centers.zero_()
    ds.radii.fill_(0.5)
    x, _ = ds.get_batch(torch.arange(4))
    area = ((x + 1) / 2).flatten(1).mean(1)
    ball, box = area[0].item(), area[1].item()
    assert ball == pytest.approx(torch.pi * 0.5**2 / 4, rel=0.05)       # πr² of the [−1,1]² square
    assert box == pytest.approx((2 * 0.8 * 0.5) ** 2 / 4, rel=0.05)     # half-side 0.8 r


def test_shapes_bad_args():
    with pytest.raises(ValueError, match="dim 1, 2 or 3"):
        ShapesDataset(dim=4)
    with pytest.raises(ValueError, match="num_classes must be 1…4"):
        ShapesDataset(num_classes=7)


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

"""The procedural `shapes` dataset (data/shapes.py) in 1-D, 2-D and 3-D: shapes, value range, classes,
determinism per seed and index, class areas, bad arguments; the same batches on a GPU."""

from __future__ import annotations

import pytest
import torch

from diffuse.data.shapes import ShapesDataset

from conftest import requires_cuda


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


@requires_cuda
def test_shapes_render_on_cuda_like_on_cpu():
    """The trainer moves `shapes` to the GPU (no host time per batch): the same batches, to rounding."""
    for dim in (1, 2, 3):
        cpu = ShapesDataset(dim=dim, resolution=16, channels=3, size=256)
        gpu = ShapesDataset(dim=dim, resolution=16, channels=3, size=256).to("cuda")
        idx = torch.randperm(256)[:32]
        (xc, yc), (xg, yg) = cpu.get_batch(idx), gpu.get_batch(idx)
        assert xg.is_cuda and yg.is_cuda and torch.equal(yg.cpu(), yc)
        torch.testing.assert_close(xg.cpu(), xc, atol=1e-4, rtol=0)

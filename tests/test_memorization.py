"""The memorization test (diffuse/memorization.py) against a brute-force reference, and both ways: copies of
training items (a little noise on them) are flagged, fresh draws from the same law are not; in 1-D, 2-D, 3-D."""

from __future__ import annotations

import pytest
import torch

from diffuse.errors import DiffuseError
from diffuse.memorization import memorization


def _reference(samples, train, k):
    d = torch.cdist(samples.flatten(1).double(), train.flatten(1).double())
    s, i = d.sort(dim=1)
    return i[:, 0], s[:, 0], s[:, 0] / s[:, k - 1]


@pytest.mark.parametrize("shape", [(1, 32), (1, 8, 8), (2, 4, 4, 4)], ids=["1d", "2d", "3d"])
def test_copies_are_flagged_and_new_draws_are_not(shape):
    g = torch.Generator().manual_seed(0)
    train = torch.rand(300, *shape, generator=g) * 2 - 1
    copies = train[:40] + 0.01 * torch.randn(40, *shape, generator=g)
    fresh = torch.rand(60, *shape, generator=g) * 2 - 1
    result = memorization(torch.cat([copies, fresh]), train, k=20, train_chunk=64, batch_size=32)  # chunked
    assert result.copies[:40].all() and not result.copies[40:].any()
    assert result.copy_rate == pytest.approx(40 / 100)
    assert torch.equal(result.nearest[:40], torch.arange(40))
    nearest, d1, ratio = _reference(torch.cat([copies, fresh]), train, 20)
    assert torch.equal(result.nearest, nearest)
    torch.testing.assert_close(result.distance.double(), d1, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(result.ratio.double(), ratio, rtol=1e-4, atol=1e-5)
    assert set(result.closest(5).tolist()) <= set(range(40))


def test_bad_inputs():
    with pytest.raises(DiffuseError, match="differ in shape"):
        memorization(torch.zeros(2, 1, 4), torch.zeros(3, 1, 5))
    with pytest.raises(DiffuseError, match="at least 2 training items"):
        memorization(torch.zeros(2, 1, 4), torch.zeros(1, 1, 4))
    small = memorization(torch.rand(3, 1, 4), torch.rand(5, 1, 4), k=50)
    assert small.k == 5  # capped at the training set's size

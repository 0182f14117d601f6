"""diffuse/metrics.py against references: FD against scipy's sqrtm formula and a closed form, the random
feature net's determinism, nearest-neighbour labels and the off-range fraction."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import linalg

from diffuse.metrics import RandomFeatures, features, frechet_distance, nearest_label, off_range_fraction


def _correlated(n, f, seed):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(f, f, generator=g, dtype=torch.float64)
    return torch.randn(n, f, generator=g, dtype=torch.float64) @ mix + torch.randn(f, generator=g, dtype=torch.float64)


def test_frechet_distance_matches_the_sqrtm_formula():
    a, b = _correlated(300, 12, 0), _correlated(250, 12, 1)
    mu_a, mu_b = a.numpy().mean(0), b.numpy().mean(0)
    cov_a, cov_b = np.cov(a.numpy(), rowvar=False), np.cov(b.numpy(), rowvar=False)
    covmean = linalg.sqrtm(cov_a @ cov_b).real  # the formula of the FID reference code
    want = ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean)
    assert frechet_distance(a, b) == pytest.approx(want, rel=1e-8)


def test_frechet_distance_closed_forms():
    a = _correlated(200, 8, 2)
    assert abs(frechet_distance(a, a)) < 1e-8
    shift = torch.arange(8, dtype=torch.float64)
    assert frechet_distance(a, a + shift) == pytest.approx(float(shift.pow(2).sum()), rel=1e-9)  # equal covariances
    # scaled copy: Σ_b = c²Σ_a, so tr(Σ_a + Σ_b − 2(Σ_aΣ_b)^½) = (1 − c)² tr Σ_a
    c = 3.0
    centred = a - a.mean(0)
    want = (1 - c) ** 2 * torch.cov(centred.T).trace().item()
    assert frechet_distance(centred, c * centred) == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_random_features_are_fixed_and_shaped(dim):
    x = torch.randn(5, 2, *([8] * dim))
    f1 = features(RandomFeatures(dim, 2), x, batch_size=2)
    f2 = features(RandomFeatures(dim, 2), x)
    assert f1.shape == (5, 128) and f1.dtype == torch.float64
    torch.testing.assert_close(f1, f2, rtol=1e-5, atol=1e-5)  # the same net every time (fp32 batching aside)
    assert not torch.equal(f1, features(RandomFeatures(dim, 2, seed=1), x))


def test_nearest_label_and_off_range_fraction():
    bank = torch.stack([torch.full((1, 4, 4), v) for v in (-1.0, 0.0, 1.0)])
    labels = torch.tensor([7, 8, 9])
    x = torch.stack([torch.full((1, 4, 4), v) for v in (0.9, -0.8, 0.1, 0.4)])
    assert nearest_label(x, bank, labels, batch_size=3).tolist() == [9, 7, 8, 8]
    real = torch.stack([torch.full((1, 4, 4), v) for v in (-0.5, 0.5)])
    assert off_range_fraction(x, real) == pytest.approx(0.5)  # 0.9 and −0.8 lie outside [−0.5, 0.5]

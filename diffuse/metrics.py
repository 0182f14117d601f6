"""Sample-quality metrics that need no download: used by `diffuse evaluate` and `benchmarks/`.

- Fréchet distance (FD) between Gaussian fits of image features, as FID (Heusel et al. 2017) computes it, but
  on the features of a fixed, seeded, randomly initialised conv net (mean and max pooled, 128-d) instead of
  Inception's, which would need a download and only sees 299² RGB. It works on 1-, 2- and 3-D data alike.
  Its values are comparable only with each other (same net, same sample count); `real vs real` at the same
  count is the floor that finite samples leave.
- Label agreement (conditional models): the fraction of samples whose nearest real image (L2) has the class
  that was asked for.
- Off-range fraction: samples whose mean brightness lies outside the range of the real images' means: the
  all-white / all-black drift of unclipped samplers on an imperfect model.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class RandomFeatures(nn.Module):
    """A fixed random conv net for 1-, 2- or 3-D images: [B, C, *spatial] → [B, 128]."""

    def __init__(self, dim: int, channels: int, seed: int = 0):
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dim]
        g = torch.Generator().manual_seed(seed)
        self.layers = nn.ModuleList([conv(channels, 32, 3, padding=1), conv(32, 64, 3, stride=2, padding=1)])
        for layer in self.layers:  # He-normal from our own generator: the same net on every machine
            nn.init.normal_(layer.weight, std=(2.0 / layer.weight[0].numel()) ** 0.5, generator=g)
            nn.init.zeros_(layer.bias)
        self.eval().requires_grad_(False)

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = torch.relu(layer(x))
        flat = x.flatten(2)
        return torch.cat([flat.mean(2), flat.amax(2)], dim=1)


@torch.no_grad()
def features(net: RandomFeatures, x: Tensor, batch_size: int = 512) -> Tensor:
    """net over x in batches, on the net's device → [N, 128] float64 on the CPU."""
    device = next(net.parameters()).device
    return torch.cat([net(x[i:i + batch_size].to(device).float()).double().cpu()
                      for i in range(0, len(x), batch_size)])


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """‖μ_a − μ_b‖² + tr(Σ_a + Σ_b − 2(Σ_a Σ_b)^{1/2}) between Gaussian fits of feature sets [N, F].

    tr (Σ_a Σ_b)^{1/2} = Σ √eig(Σ_a^{1/2} Σ_b Σ_a^{1/2}): that matrix is symmetric PSD, so two symmetric
    eigendecompositions in float64 give it stably, without scipy's sqrtm of a non-symmetric product.
    """
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    w, v = torch.linalg.eigh(cov_a)
    root_a = (v * w.clamp(min=0).sqrt()) @ v.T
    inner = root_a @ cov_b @ root_a
    tr_covmean = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * tr_covmean)


def nearest_label(x: Tensor, bank_x: Tensor, bank_y: Tensor, batch_size: int = 1024) -> Tensor:
    """The label of each sample's nearest (L2) image in the bank: [N]."""
    bank = bank_x.flatten(1).float()
    out = [bank_y[torch.cdist(x[i:i + batch_size].flatten(1).float(), bank).argmin(1)]
           for i in range(0, len(x), batch_size)]
    return torch.cat(out)


def off_range_fraction(x: Tensor, real: Tensor) -> float:
    """Fraction of samples whose mean brightness lies outside the range of the real images' means."""
    real_mean, mean = real.flatten(1).float().mean(1), x.flatten(1).float().mean(1)
    return float(((mean < real_mean.min()) | (mean > real_mean.max())).float().mean())

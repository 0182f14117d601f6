"""Does a model return its training items? The nearest-neighbour ratio test of Carlini et al. 2023 ("Extracting
training data from diffusion models", §4: a generation is a copy when it is much closer to one training item
than to the others near it).

For each sample x̂, on raw values (any dim, flattened) with the L2 distance:
    d_1 = distance to its nearest training item, d_k = distance to its k-th nearest
    ratio = d_1 / d_k                                     (in (0, 1]; small = one item stands out)
    copy  = ratio < threshold                             (default 1/3, as the paper's calibrated threshold)
A new sample sits among many training items at similar distances (ratio near 1); a copy sits on one of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from diffuse.errors import DiffuseError

DEFAULT_K = 50
DEFAULT_THRESHOLD = 1 / 3
CANDIDATE_MARGIN = 16  # extra neighbours kept from the fast distances, then ranked by exact ones


@dataclass
class Memorization:
    nearest: Tensor     # [N] int64: index of each sample's nearest training item
    distance: Tensor    # [N] d_1
    ratio: Tensor       # [N] d_1 / d_k
    k: int
    threshold: float

    @property
    def copies(self) -> Tensor:
        """[N] bool: the samples the test calls copies."""
        return self.ratio < self.threshold

    @property
    def copy_rate(self) -> float:
        return float(self.copies.float().mean()) if len(self.ratio) else 0.0

    def closest(self, n: int) -> Tensor:
        """Indices of the n samples with the smallest ratio (the likeliest copies), most suspect first."""
        return self.ratio.argsort()[:n]


@torch.no_grad()
def memorization(samples: Tensor, train: Tensor, k: int = DEFAULT_K, threshold: float = DEFAULT_THRESHOLD,
                 batch_size: int = 256, train_chunk: int = 8192) -> Memorization:
    """samples [N, C, *spatial], train [M, C, *spatial] (the same shape) → each sample's nearest training item and
    its ratio test. k is capped at M (with M < 2 there is no k-th neighbour: an error). Distances are computed in
    fp32 in chunks, so M may be a whole training set."""
    if samples.shape[1:] != train.shape[1:]:
        raise DiffuseError(f"memorization: samples {list(samples.shape[1:])} and training items "
                           f"{list(train.shape[1:])} differ in shape")
    if len(train) < 2:
        raise DiffuseError("memorization needs at least 2 training items")
    k = max(2, min(int(k), len(train)))
    a, b = samples.flatten(1).float(), train.flatten(1).float()
    keep = min(len(b), k + CANDIDATE_MARGIN)
    nearest, d1, dk = [], [], []
    for i in range(0, len(a), batch_size):
        rows = a[i:i + batch_size]
        best_d, best_i = None, None
        for j in range(0, len(b), train_chunk):  # the `keep` smallest over the chunks seen so far
            dist = torch.cdist(rows, b[j:j + train_chunk])  # BLAS form: fast, a few ulp of the norms off
            d, idx = dist.topk(min(keep, dist.shape[1]), dim=1, largest=False)
            idx = idx + j
            if best_d is not None:
                d, order = torch.cat([best_d, d], 1).topk(min(keep, best_d.shape[1] + d.shape[1]), dim=1,
                                                          largest=False)
                idx = torch.cat([best_i, idx], 1).gather(1, order)
            best_d, best_i = d, idx
        # the candidates' distances again, exactly (fp64 differences): a near-copy's d_1 is small, where the
        # BLAS form's cancellation error is largest
        exact = (rows.double()[:, None] - b.double()[best_i]).norm(dim=2)
        exact, order = exact.sort(dim=1)
        nearest.append(best_i.gather(1, order)[:, 0])
        d1.append(exact[:, 0].float())
        dk.append(exact[:, k - 1].float())
    d1, dk = torch.cat(d1), torch.cat(dk)
    ratio = d1 / dk.clamp_min(1e-12)
    return Memorization(torch.cat(nearest), d1, ratio, k, float(threshold))

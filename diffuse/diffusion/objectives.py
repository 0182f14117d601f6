"""What the network predicts, conversions between predictions, and the training loss.

All conversions live here (the NVlabs/edm idea: preconditioning in one place). With x_t = α x₀ + σ ε:
  eps:  ε̂                  x̂₀ = (x_t − σ ε̂)/α
  x0:   x̂₀                 ε̂ = (x_t − α x̂₀)/σ
  v:    v̂ = α ε − σ x₀     (Salimans & Ho 2022; for α² + σ² ≠ 1 we use v = α ε − σ x₀ all the same)
The score of the noised data is ∇ log p_t(x_t) = −ε̂/σ.
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffuse.diffusion.schedules import Schedule

PREDICTIONS = ("eps", "x0", "v")
WEIGHTINGS = ("none", "min_snr")


def _bcast(coef: Tensor | float, x: Tensor) -> Tensor:
    """[B] (or a scalar, or a Python float) → [B, 1, …, 1] matching x's ndim, in x's dtype."""
    coef = torch.as_tensor(coef, device=x.device, dtype=x.dtype)
    if coef.ndim == 0:
        return coef
    return coef.view(-1, *([1] * (x.ndim - 1)))


def check_prediction(prediction: str) -> str:
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {', '.join(PREDICTIONS)}; got {prediction!r}")
    return prediction


def prediction_to_eps(pred: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor, prediction: str) -> Tensor:
    """Turn the network output into ε̂. alpha, sigma: [B] or scalars."""
    a, s = _bcast(alpha, x_t), _bcast(sigma, x_t)
    if prediction == "eps":
        return pred
    if prediction == "x0":
        return (x_t - a * pred) / s
    if prediction == "v":
        # x_t = α x₀ + σ ε and v = α ε − σ x₀  ⇒  ε = (σ x_t + α v)/(α² + σ²)
        return (s * x_t + a * pred) / (a**2 + s**2)
    raise ValueError(f"unknown prediction {prediction!r}")


def eps_to_x0(eps: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    a, s = _bcast(alpha, x_t), _bcast(sigma, x_t)
    return (x_t - s * eps) / a


def training_target(x0: Tensor, noise: Tensor, alpha: Tensor, sigma: Tensor, prediction: str) -> Tensor:
    """What the network should output for a given (x₀, ε, t)."""
    if prediction == "eps":
        return noise
    if prediction == "x0":
        return x0
    a, s = _bcast(alpha, x0), _bcast(sigma, x0)
    return a * noise - s * x0


def loss_weight(alpha: Tensor, sigma: Tensor, prediction: str, weighting: str, gamma: float) -> Tensor:
    """Per-sample weight [B] of the MSE on the network's own target.

    min_snr (Hang et al. 2023): weight the x₀-space error by min(SNR, γ), SNR = α²/σ², expressed on each
    target through ‖x̂₀ − x₀‖² = ‖ε̂ − ε‖²/SNR = σ²/(α² + σ²)² · ‖v̂ − v‖²:
    eps: min(SNR, γ)/SNR, x0: min(SNR, γ), v: min(SNR, γ)·σ²/(α² + σ²)² (= min(SNR, γ)/(SNR + 1), the
    paper's, when α² + σ² = 1).
    """
    if weighting == "none":
        return torch.ones_like(alpha)
    if weighting != "min_snr":
        raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}; got {weighting!r}")
    snr = (alpha / sigma) ** 2
    clipped = snr.clamp(max=gamma)
    if prediction == "eps":
        return clipped / snr
    if prediction == "x0":
        return clipped
    return clipped * sigma**2 / (alpha**2 + sigma**2) ** 2


class DiffusionLoss:
    """Denoising score-matching loss: E_t,ε w(t)·‖net(α x₀ + σ ε, t, y) − target‖², mean over elements.

    With eps prediction and no weighting this is Ho et al.'s L_simple; on the VE-SDE it equals the
    conditional seed's MSE(score·σ(t), −z), since score·σ = −ε̂.
    The loss is always reduced in fp32 even when the network runs under autocast.
    cond_drop_prob: the fraction of labels replaced by null_class, so the network also learns the unconditional
    prediction that classifier-free guidance needs; nothing is dropped for a network without a null class.
    """

    def __init__(self, prediction: str = "eps", weighting: str = "none", min_snr_gamma: float = 5.0,
                 cond_drop_prob: float = 0.0, null_class: int | None = None):
        self.prediction = check_prediction(prediction)
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}; got {weighting!r}")
        self.weighting = weighting
        self.min_snr_gamma = min_snr_gamma
        self.cond_drop_prob = cond_drop_prob
        self.null_class = null_class

    def __call__(self, model, schedule: Schedule, x0: Tensor, y: Tensor | None,
                 generator: torch.Generator | None = None) -> Tensor:
        b = x0.shape[0]
        t = schedule.sample_training_times(b, generator=generator, device=x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        alpha, sigma = schedule.alpha(t).float(), schedule.sigma(t).float()
        x_t = _bcast(alpha, x0) * x0 + _bcast(sigma, x0) * noise
        if y is not None and self.null_class is not None and self.cond_drop_prob > 0:
            drop = torch.rand(b, generator=generator, device=x0.device) < self.cond_drop_prob
            y = torch.where(drop, torch.full_like(y, self.null_class), y)
        out = model(x_t, t, y).float()
        target = training_target(x0, noise, alpha, sigma, self.prediction)
        per_sample = ((out - target) ** 2).flatten(1).mean(1)
        weight = loss_weight(alpha, sigma, self.prediction, self.weighting, self.min_snr_gamma)
        return (weight * per_sample).mean()

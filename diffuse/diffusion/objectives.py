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


class Parameterization:
    """What the network predicts, as one object (EDM's preconditioning in one place): it turns the output into
    ε̂ and x̂₀, and gives the training target and the per-sample loss weight. Shared by the training loss, the
    held-out loss and the denoiser every sampler calls. alpha, sigma: [B], 0-d tensors or floats (broadcast).

    weighting: "none" (the MSE on the network's own target) or "min_snr" (Hang et al. 2023): the x₀-space error
    weighted by min(SNR, γ), SNR = α²/σ², expressed on each target through
    ‖x̂₀ − x₀‖² = ‖ε̂ − ε‖²/SNR = σ²/(α² + σ²)² · ‖v̂ − v‖² (`min_snr_weight` below)."""

    name = ""

    def __init__(self, weighting: str = "none", min_snr_gamma: float = 5.0):
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}; got {weighting!r}")
        self.weighting, self.min_snr_gamma = weighting, float(min_snr_gamma)

    def eps(self, out: Tensor, x_t: Tensor, alpha, sigma) -> Tensor:
        """ε̂ from the network output."""
        raise NotImplementedError

    def x0(self, out: Tensor, x_t: Tensor, alpha, sigma) -> Tensor:
        """x̂₀ from the network output."""
        return eps_to_x0(self.eps(out, x_t, alpha, sigma), x_t, alpha, sigma)

    def target(self, x0: Tensor, noise: Tensor, alpha, sigma) -> Tensor:
        """What the network should output for (x₀, ε) at (α, σ)."""
        raise NotImplementedError

    def min_snr_weight(self, clipped: Tensor, snr: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        """min(SNR, γ) times k, where ‖x̂₀ − x₀‖² = k · ‖out − target‖² (per sample)."""
        raise NotImplementedError

    def weight(self, alpha: Tensor, sigma: Tensor) -> Tensor:
        """Per-sample weight [B] of the MSE on the network's own target."""
        if self.weighting == "none":
            return torch.ones_like(alpha)
        snr = (alpha / sigma) ** 2
        return self.min_snr_weight(snr.clamp(max=self.min_snr_gamma), snr, alpha, sigma)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(weighting={self.weighting!r}, min_snr_gamma={self.min_snr_gamma})"


class EpsPrediction(Parameterization):
    """ε̂ (Ho et al. 2020); x̂₀ = (x_t − σ ε̂)/α."""

    name = "eps"

    def eps(self, out, x_t, alpha, sigma):
        return out

    def target(self, x0, noise, alpha, sigma):
        return noise

    def min_snr_weight(self, clipped, snr, alpha, sigma):
        return clipped / snr  # k = 1/SNR


class X0Prediction(Parameterization):
    """x̂₀; ε̂ = (x_t − α x̂₀)/σ."""

    name = "x0"

    def eps(self, out, x_t, alpha, sigma):
        return (x_t - _bcast(alpha, x_t) * out) / _bcast(sigma, x_t)

    def x0(self, out, x_t, alpha, sigma):
        return out

    def target(self, x0, noise, alpha, sigma):
        return x0

    def min_snr_weight(self, clipped, snr, alpha, sigma):
        return clipped  # k = 1


class VPrediction(Parameterization):
    """v̂ = α ε − σ x₀ (Salimans & Ho 2022); x_t = α x₀ + σ ε ⇒ ε = (σ x_t + α v)/(α² + σ²)."""

    name = "v"

    def eps(self, out, x_t, alpha, sigma):
        a, s = _bcast(alpha, x_t), _bcast(sigma, x_t)
        return (s * x_t + a * out) / (a**2 + s**2)

    def target(self, x0, noise, alpha, sigma):
        a, s = _bcast(alpha, x0), _bcast(sigma, x0)
        return a * noise - s * x0

    def min_snr_weight(self, clipped, snr, alpha, sigma):
        return clipped * sigma**2 / (alpha**2 + sigma**2) ** 2  # k = σ²/(α² + σ²)²; α² + σ² = 1: 1/(SNR + 1)


PARAMETERIZATIONS = {cls.name: cls for cls in (EpsPrediction, X0Prediction, VPrediction)}


def parameterization(objective=None, *, prediction: str = "eps", weighting: str = "none",
                     min_snr_gamma: float = 5.0) -> Parameterization:
    """The Parameterization of an `objective` config node ({prediction, weighting, min_snr_gamma}), of a
    prediction's name, or of the keywords; a Parameterization is returned as it is."""
    if isinstance(objective, Parameterization):
        return objective
    if isinstance(objective, str):
        prediction = objective
    elif objective is not None:
        prediction = objective.get("prediction", prediction)
        weighting = objective.get("weighting", weighting)
        min_snr_gamma = objective.get("min_snr_gamma", min_snr_gamma)
    return PARAMETERIZATIONS[check_prediction(prediction)](weighting, min_snr_gamma)


def prediction_to_eps(pred: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor, prediction: str) -> Tensor:
    """Turn the network output into ε̂. alpha, sigma: [B] or scalars."""
    if prediction not in PARAMETERIZATIONS:
        raise ValueError(f"unknown prediction {prediction!r}")
    return PARAMETERIZATIONS[prediction]().eps(pred, x_t, alpha, sigma)


def eps_to_x0(eps: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    a, s = _bcast(alpha, x_t), _bcast(sigma, x_t)
    return (x_t - s * eps) / a


def training_target(x0: Tensor, noise: Tensor, alpha: Tensor, sigma: Tensor, prediction: str) -> Tensor:
    """What the network should output for a given (x₀, ε, t)."""
    return parameterization(prediction=prediction).target(x0, noise, alpha, sigma)


def loss_weight(alpha: Tensor, sigma: Tensor, prediction: str, weighting: str, gamma: float) -> Tensor:
    """Per-sample weight [B] of the MSE on the network's own target (Parameterization.weight):
    eps: min(SNR, γ)/SNR, x0: min(SNR, γ), v: min(SNR, γ)·σ²/(α² + σ²)²."""
    return parameterization(prediction=prediction, weighting=weighting, min_snr_gamma=gamma).weight(alpha, sigma)


class DiffusionLoss:
    """Denoising score-matching loss: E_t,ε w(t)·‖net(α x₀ + σ ε, t, y) − target‖², mean over elements, with
    target and w from the parameterization.

    With eps prediction and no weighting this is Ho et al.'s L_simple; on the VE-SDE it equals the score-SDE
    tutorial's MSE(score·σ(t), −z), since score·σ = −ε̂.
    The loss is always reduced in fp32 even when the network runs under autocast.
    prediction: a Parameterization, or its name (then weighting and min_snr_gamma make it).
    cond_drop_prob: the fraction of labels replaced by null_class, so the network also learns the unconditional
    prediction that classifier-free guidance needs; nothing is dropped for a network without a null class.
    """

    def __init__(self, prediction: Parameterization | str = "eps", weighting: str = "none",
                 min_snr_gamma: float = 5.0, cond_drop_prob: float = 0.0, null_class: int | None = None):
        self.parameterization = parameterization(prediction, weighting=weighting, min_snr_gamma=min_snr_gamma)
        self.cond_drop_prob = cond_drop_prob
        self.null_class = null_class

    def __call__(self, model, schedule: Schedule, x0: Tensor, y: Tensor | None,
                 generator: torch.Generator | None = None) -> Tensor:
        b = x0.shape[0]
        t = schedule.sample_training_times(b, generator=generator, device=x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_t, alpha, sigma = noised(schedule, x0, t, noise)
        if y is not None and self.null_class is not None and self.cond_drop_prob > 0:
            drop = torch.rand(b, generator=generator, device=x0.device) < self.cond_drop_prob
            y = torch.where(drop, torch.full_like(y, self.null_class), y)
        out = model(x_t, t, y).float()
        target = self.parameterization.target(x0, noise, alpha, sigma)
        per_sample = ((out - target) ** 2).flatten(1).mean(1)
        return (self.parameterization.weight(alpha, sigma) * per_sample).mean()


def noised(schedule: Schedule, x0: Tensor, t: Tensor, noise: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The forward process: x_t = α(t) x₀ + σ(t) ε, with α, σ [B] fp32 (t [B])."""
    alpha, sigma = schedule.alpha(t).float(), schedule.sigma(t).float()
    return _bcast(alpha, x0) * x0 + _bcast(sigma, x0) * noise, alpha, sigma

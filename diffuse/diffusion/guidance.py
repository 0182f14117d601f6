"""The denoiser every sampler talks to: network output → ε̂, with classifier-free guidance.

Samplers never see the network, its prediction type, its labels or the guidance: they call
`denoiser.eps(x, t)` with x in fp32 and t a scalar time, and get ε̂ in fp32 (the network itself may run
under autocast), as k-diffusion keeps its samplers ignorant of conditioning.
Guidance (Ho & Salimans 2022): ε̂ = ε̂_∅ + w·(ε̂_y − ε̂_∅); w = the `guidance.scale` of the config.
We follow the diffusers convention (w = 1 ⇒ conditional, w = 0 ⇒ unconditional); a scale of 0 is read as
"no guidance" (plain conditional, one network pass).
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from diffuse.diffusion.objectives import Parameterization, parameterization
from diffuse.diffusion.schedules import Schedule


def null_class_of(model) -> int | None:
    """The label a class-conditional network reads as "no class" (our models: one past their classes, learned
    from the labels training drops), None for an unconditional one. The one place this convention is read."""
    return getattr(model, "null_class", None)


def is_guided(scale: float | None) -> bool:
    """w ∉ {0, 1}: each step then evaluates the conditional and the null-class copy (one batched pass over 2×)."""
    return float(scale or 0.0) not in (0.0, 1.0)


def guidance_note(scale: float | None) -> str:
    """' (guidance w 1.1)' for log lines when guided, else ''."""
    return f" (guidance w {float(scale):g})" if is_guided(scale) else ""


class Denoiser:
    """model (called as model(x, t, y)) with its parameterization (objectives.Parameterization, or its name:
    eps | x0 | v), the batch's labels y [B] (or None) and the guidance scale w, seen as ε̂(x, t); `nfe` counts
    network evaluations (a guided call counts as one)."""

    def __init__(self, model, schedule: Schedule, prediction: Parameterization | str = "eps", y: Tensor | None = None,
                 guidance_scale: float = 0.0, autocast_dtype=None):
        self.model = model
        self.schedule = schedule
        self.parameterization = parameterization(prediction)
        self.y = y
        self.guidance_scale = float(guidance_scale or 0.0)
        self.null_class = null_class_of(model)
        self.autocast_dtype = autocast_dtype
        self.nfe = 0
        if self.guided and (y is None or self.null_class is None):
            raise ValueError("guidance scale ≠ 0, 1 needs class labels and a model trained with a null class")

    @property
    def guided(self) -> bool:
        return is_guided(self.guidance_scale)

    def _net(self, x: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
        ctx = (torch.autocast(x.device.type, dtype=self.autocast_dtype) if self.autocast_dtype
               else contextlib.nullcontext())
        with ctx:
            return self.model(x, t, y).float()

    @torch.no_grad()
    def eps(self, x: Tensor, t: Tensor | float) -> Tensor:
        """ε̂(x, t). x: [B, C, *spatial] fp32; t: scalar time (float or 0-d tensor)."""
        return self.eps_with_grad(x, t)

    def eps_with_grad(self, x: Tensor, t: Tensor | float) -> Tensor:
        """ε̂(x, t) as `eps`, differentiable in x where autograd is on (reconstruction guidance needs ∂ε̂/∂x)."""
        t = torch.as_tensor(t, dtype=torch.float64)
        b = x.shape[0]
        t_batch = t.to(device=x.device, dtype=torch.float32).expand(b)
        alpha, sigma = self.schedule.alpha(t), self.schedule.sigma(t)
        self.nfe += 1
        if not self.guided:
            out = self._net(x, t_batch, self.y)
            return self.parameterization.eps(out, x, alpha, sigma)
        y_null = torch.full_like(self.y, self.null_class)
        out = self._net(torch.cat([x, x]), torch.cat([t_batch, t_batch]), torch.cat([self.y, y_null]))
        eps_c, eps_u = self.parameterization.eps(out, torch.cat([x, x]), alpha, sigma).chunk(2)
        return eps_u + self.guidance_scale * (eps_c - eps_u)

"""Samplers: each one a short loop over a descending time grid, written against (α, σ) and a denoiser.

A sampler never sees the network: it calls `denoiser.eps(x, t)` (see guidance.py), so every sampler runs
on every schedule. Arithmetic is fp32 with times and coefficients computed in fp64.

Noise comes from a `NoiseSource` that gives each sample its own generator, so the samples drawn for a
seed list do not depend on the batch size they are drawn with (as EDM's `--seeds`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor

from diffuse.diffusion.schedules import Schedule


class NoiseSource:
    """Per-sample Gaussian noise: row i comes from its own generator seeded with seeds[i]."""

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu"):
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.device = torch.device(device)

    def __len__(self) -> int:
        return len(self.generators)

    def randn(self, sample_shape: Sequence[int]) -> Tensor:
        """[len(seeds), *sample_shape] standard normal, fp32, on `device`."""
        rows = [torch.randn(tuple(sample_shape), generator=g) for g in self.generators]
        return torch.stack(rows).to(self.device)

    def randn_like(self, x: Tensor) -> Tensor:
        return self.randn(x.shape[1:]).to(dtype=x.dtype)


@dataclass
class Trajectory:
    """What a sampler visited: times [K] and states [K, B, C, *spatial] (x_T first, the sample last)."""

    times: list[float] = field(default_factory=list)
    states: list[Tensor] = field(default_factory=list)
    denoised: list[Tensor] = field(default_factory=list)


StepCallback = Callable[[int, float, Tensor, Tensor], None]  # (step index, t, x after the step, x̂₀)


class Sampler:
    """Base: holds the grid settings; subclasses implement `run(denoiser, x, grid, noise, callback)`.

    steps: network evaluations of the grid (some samplers spend more per step; see `nfe`).
    spacing: how a discrete schedule's grid is laid out (see Schedule.timesteps).
    guidance_scale: classifier-free guidance weight, read by whoever builds the denoiser.
    """

    stochastic = False

    def __init__(self, steps: int = 1000, spacing: str = "auto", guidance_scale: float = 0.0):
        self.steps = int(steps)
        self.spacing = spacing
        self.guidance_scale = float(guidance_scale)

    def grid(self, schedule: Schedule) -> Tensor:
        return schedule.timesteps(self.steps, self.spacing)

    def run(self, denoiser, x: Tensor, grid: Tensor, noise: NoiseSource | None,
            callback: StepCallback | None) -> Tensor:
        raise NotImplementedError

    def __call__(self, denoiser, x: Tensor, noise: NoiseSource | None = None,
                 callback: StepCallback | None = None) -> Tensor:
        """Denoise x (drawn from the prior at the grid's first time) down to t = 0."""
        if self.stochastic and noise is None:
            noise = _GlobalNoise(x.device)
        return self.run(denoiser, x.float(), self.grid(denoiser.schedule), noise, callback)


class _GlobalNoise:
    """Fallback noise from torch's global RNG, when the caller passes no NoiseSource."""

    def __init__(self, device):
        self.device = device

    def randn_like(self, x: Tensor) -> Tensor:
        return torch.randn_like(x)


def prior_sample(schedule: Schedule, noise: NoiseSource, sample_shape: Sequence[int]) -> Tensor:
    """x_T ~ N(0, σ(t_max)² I), one row per seed."""
    return noise.randn(sample_shape) * schedule.prior_std


def sample(denoiser, sampler: Sampler, noise: NoiseSource, sample_shape: Sequence[int],
           trajectory: int | bool = False) -> tuple[Tensor, Trajectory | None]:
    """Draw x_T from the prior and run the sampler.

    trajectory: False, True (keep every state) or a number K of states to keep, spread evenly over the
    grid (x_T and the final sample always among them), so long runs on big data stay small in memory.
    """
    x = prior_sample(denoiser.schedule, noise, sample_shape)
    if not trajectory:
        return sampler(denoiser, x, noise, None), None
    grid = sampler.grid(denoiser.schedule)
    n_states = len(grid)
    if trajectory is True or trajectory >= n_states:
        keep = set(range(n_states))
    else:
        keep = {round(k * (n_states - 1) / (trajectory - 1)) for k in range(trajectory)} if trajectory > 1 \
            else {n_states - 1}
    traj = Trajectory()
    if 0 in keep:
        traj.times.append(float(grid[0]))
        traj.states.append(x.cpu())
        traj.denoised.append(x.cpu())

    def callback(i, t, x_new, x0_hat):
        if i + 1 in keep:
            traj.times.append(t)
            traj.states.append(x_new.cpu())
            traj.denoised.append(x0_hat.cpu())

    return sampler(denoiser, x, noise, callback), traj


# ---------------------------------------------------------------------------------------------------
def _coefs(schedule: Schedule, t: Tensor) -> tuple[float, float]:
    return float(schedule.alpha(t)), float(schedule.sigma(t))


class DDPM(Sampler):
    """Ancestral sampling, Ho et al. 2020 Algorithm 2, for any pair of grid times t > s.

    With α_{t|s} = α_t/α_s and σ²_{t|s} = σ_t² − α²_{t|s} σ_s² (= β_t between neighbouring steps):
        x_s = (x_t − σ²_{t|s}/σ_t · ε̂) / α_{t|s} + σ z,    z ~ N(0, I), no noise on the last step,
    which is Algorithm 2 exactly when the grid is every step of the schedule.
    variance: "beta" (σ² = σ²_{t|s}, Algorithm 2's β_t) or "posterior" (σ² = σ²_{t|s} σ_s²/σ_t², β̃_t).
    clip_x0: predict x̂₀, clamp it to clip_range, then take the posterior mean
        μ = α_s σ²_{t|s}/σ_t² · x̂₀ + α_{t|s} σ_s²/σ_t² · x_t   (the MNIST seed's `sample_clip`).
    """

    stochastic = True

    def __init__(self, steps: int = 1000, spacing: str = "auto", guidance_scale: float = 0.0,
                 variance: str = "beta", clip_x0: bool = False, clip_range: Sequence[float] = (-1.0, 1.0)):
        super().__init__(steps, spacing, guidance_scale)
        if variance not in ("beta", "posterior"):
            raise ValueError(f"variance must be 'beta' or 'posterior'; got {variance!r}")
        self.variance = variance
        self.clip_x0 = clip_x0
        self.clip_range = tuple(clip_range)

    def run(self, denoiser, x, grid, noise, callback):
        schedule = denoiser.schedule
        for i in range(len(grid) - 1):
            t, s = grid[i], grid[i + 1]
            a_t, s_t = _coefs(schedule, t)
            a_s, s_s = _coefs(schedule, s)
            a_ts = a_t / a_s
            var_ts = s_t**2 - a_ts**2 * s_s**2
            eps = denoiser.eps(x, t)
            x0_hat = (x - s_t * eps) / a_t
            if self.clip_x0:
                x0_hat = x0_hat.clamp(*self.clip_range)
                mean = (a_s * var_ts / s_t**2) * x0_hat + (a_ts * s_s**2 / s_t**2) * x
            else:
                mean = (x - (var_ts / s_t) * eps) / a_ts
            if float(s) > 0:
                var = var_ts if self.variance == "beta" else var_ts * s_s**2 / s_t**2
                x = mean + var**0.5 * noise.randn_like(x)
            else:
                x = mean
            if callback is not None:
                callback(i, float(s), x, x0_hat)
        return x

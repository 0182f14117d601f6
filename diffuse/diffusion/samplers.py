"""Samplers: each one a short loop over a descending time grid, written against (α, σ) and a denoiser.

A sampler never sees the network: it calls `denoiser.eps(x, t)` (see guidance.py), so every sampler runs
on every schedule. Arithmetic is fp32 with times and coefficients computed in fp64.

  DDPM               ancestral sampling, Ho et al. 2020 Alg. 2 (`ddpm`; `ddpm_clip` = clip_x0, the MNIST ShuffleNet setup's)
  DDIM               Song, Meng & Ermon 2021, eq. 12, η ∈ [0, 1]
  EulerMaruyama      reverse SDE, Song et al. 2021 (the score-SDE tutorial setup's sampler on the VE-SDE)
  PredictorCorrector reverse-diffusion predictor + Langevin corrector, Song et al. 2021
  Heun               probability-flow ODE, Karras et al. 2022 Alg. 1/2
  DPMSolverPP        DPM-Solver++(2M), Lu et al. 2022

The grid (Schedule.timesteps) is t_0 = t_max > … > t_{steps−1} > 0 = t_steps; a sampler takes one update per
interval and calls `callback(i, t_{i+1}, x after the update, x̂₀)` exactly once per interval i.

Noise comes from a `NoiseSource` that gives each sample its own generator, so the samples drawn for a
seed list do not depend on the batch size they are drawn with (as EDM's `--seeds`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor

from diffuse.devices import to_device
from diffuse.diffusion.objectives import eps_to_x0
from diffuse.diffusion.schedules import GRID_SIGMA_MAX, SPACINGS, Schedule
from diffuse.rules import BOOL, POSITIVE, PROBABILITY, Choice, Float, Int, Pair


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
        return to_device(torch.stack(rows), self.device)  # queued: the host draws the next step's meanwhile

    def randn_like(self, x: Tensor) -> Tensor:
        return self.randn(x.shape[1:]).to(dtype=x.dtype)


@dataclass
class Trajectory:
    """What a sampler visited: times [K] and states [K, B, C, *spatial] (x_T first, the sample last)."""

    times: list[float] = field(default_factory=list)
    states: list[Tensor] = field(default_factory=list)


StepCallback = Callable[[int, float, Tensor, Tensor], None]  # (step index, t, x after the step, x̂₀)


def dynamic_threshold(x0: Tensor, quantile: float) -> Tensor:
    """Imagen's dynamic thresholding: s = max(1, quantile of |x̂₀| over each sample's values), then
    clamp(x̂₀, −s, s)/s. Samples already within [−1, 1] are unchanged. x0: [B, C, *spatial]."""
    s = torch.quantile(x0.abs().flatten(1), quantile, dim=1).clamp(min=1.0)
    s = s.view(-1, *([1] * (x0.dim() - 1)))
    return torch.maximum(torch.minimum(x0, s), -s) / s


class Sampler:
    """Base: holds the grid settings; subclasses implement `run(denoiser, x, grid, noise, callback)`.

    steps: points of the grid before t = 0, i.e. updates, i.e. network evaluations for the samplers that
        spend one per update (Heun spends 2·steps − 1, predictor–corrector steps·(1 + corrector_steps)).
    spacing: how the grid is laid out (auto, linspace, leading, trailing, karras, logsnr: Schedule.timesteps).
    clip_x0: clamp x̂₀ to clip_range and re-derive ε̂ = (x − α x̂₀)/σ from it, i.e. run the sampler on the
        clamped denoiser (diffusers' `clip_sample` with `use_clipped_model_output`; for DDPM it is the
        MNIST ShuffleNet setup's `sample_clip`). Data in [−1, 1] stay there; helps under-trained networks a lot.
    dynamic_threshold: Imagen's dynamic thresholding (Saharia et al. 2022, §2.3) instead: per sample,
        s = max(1, the `dynamic_threshold` quantile of |x̂₀|), x̂₀ ← clamp(x̂₀, −s, s)/s; null = off.
    Stochastic samplers draw all their noise from `noise.randn_like(x)` (per-sample generators).
    """

    stochastic = False
    order: int | None = None  # deterministic ODE solvers: the global order of convergence in the step size
    config_rules = {"steps": Int(1, auto=True), "spacing": Choice(*SPACINGS), "clip_x0": BOOL,
                    "clip_range": Pair(), "dynamic_threshold": Float(0, 1, open_lo=True, nullable=True)}

    def __init__(self, steps: int = 1000, spacing: str = "auto", clip_x0: bool = False,
                 clip_range: Sequence[float] = (-1.0, 1.0), dynamic_threshold: float | None = None):
        self.steps = int(steps)
        self.spacing = spacing
        self.clip_x0 = bool(clip_x0)
        self.clip_range = tuple(float(v) for v in clip_range)
        if dynamic_threshold is not None and not 0.0 < float(dynamic_threshold) <= 1.0:
            raise ValueError(f"dynamic_threshold must be a quantile in (0, 1] or null; got {dynamic_threshold}")
        self.dynamic_threshold = None if dynamic_threshold is None else float(dynamic_threshold)

    def denoise(self, denoiser, x: Tensor, t, alpha: float, sigma: float) -> tuple[Tensor, Tensor]:
        """(ε̂, x̂₀) at time t (σ > 0), x̂₀ = (x − σ ε̂)/α, both from the clamped x̂₀ when clip_x0."""
        eps = denoiser.eps(x, t)
        x0 = eps_to_x0(eps, x, alpha, sigma)
        if self.dynamic_threshold is not None:
            x0 = dynamic_threshold(x0, self.dynamic_threshold)
            eps = (x - alpha * x0) / sigma
        elif self.clip_x0:
            x0 = x0.clamp(*self.clip_range)
            eps = (x - alpha * x0) / sigma
        return eps, x0

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
           trajectory: int | bool = False, on_step: Callable[[], None] | None = None,
           ) -> tuple[Tensor, Trajectory | None]:
    """Draw x_T from the prior and run the sampler.

    trajectory: False, True (keep every state) or a number K of states to keep, spread evenly over the
    grid (x_T and the final sample always among them), so long runs on big data stay small in memory.
    on_step: called after every update of the sampler (once per grid interval), e.g. to advance a progress
    bar; it sees nothing of the state, so the samples are the same with or without it.
    """
    x = prior_sample(denoiser.schedule, noise, sample_shape)
    if not trajectory:
        step_callback = None if on_step is None else (lambda i, t, x_new, x0_hat: on_step())
        return sampler(denoiser, x, noise, step_callback), None
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

    def callback(i, t, x_new, x0_hat):
        if i + 1 in keep:
            traj.times.append(t)
            traj.states.append(x_new.cpu())
        if on_step is not None:
            on_step()

    return sampler(denoiser, x, noise, callback), traj


# ---------------------------------------------------------------------------------------------------
def _coefs(schedule: Schedule, t: Tensor) -> tuple[float, float]:
    """(α(t), σ(t)) as Python floats, computed in fp64."""
    t = torch.as_tensor(t, dtype=torch.float64)
    return float(schedule.alpha(t)), float(schedule.sigma(t))


def _intervals(schedule: Schedule, grid: Tensor):
    """(i, t, s, α_t, σ_t, α_s, σ_s) for each grid interval t → s; each time's coefficients computed once."""
    coefs = [_coefs(schedule, t) for t in grid]
    for i in range(len(grid) - 1):
        yield (i, grid[i], grid[i + 1], *coefs[i], *coefs[i + 1])


def _per_sample_norm(x: Tensor) -> Tensor:
    """‖x_b‖ over all but the batch dim, shaped [B, 1, …, 1] to broadcast against x."""
    return x.flatten(1).norm(dim=1).view(-1, *([1] * (x.ndim - 1)))


class DDPM(Sampler):
    """Ancestral sampling, Ho et al. 2020 Algorithm 2, for any pair of grid times t > s.

    With α_{t|s} = α_t/α_s and σ²_{t|s} = σ_t² − α²_{t|s} σ_s² (= β_t between neighbouring steps):
        x_s = (x_t − σ²_{t|s}/σ_t · ε̂) / α_{t|s} + σ z,    z ~ N(0, I), no noise on the last step,
    which is Algorithm 2 exactly when the grid is every step of the schedule.
    variance: "beta" (σ² = σ²_{t|s}, Algorithm 2's β_t) or "posterior" (σ² = σ²_{t|s} σ_s²/σ_t², β̃_t).
    clip_x0: with ε̂ re-derived from the clamped x̂₀ the mean above is the posterior mean (Ho et al. eq. 7)
        μ = α_s σ²_{t|s}/σ_t² · x̂₀ + α_{t|s} σ_s²/σ_t² · x_t   (the MNIST ShuffleNet setup's `sample_clip`).
    One network evaluation per step.
    """

    stochastic = True
    config_rules = {"variance": Choice("beta", "posterior")}

    def __init__(self, steps: int = 1000, spacing: str = "auto", variance: str = "beta", **kwargs):
        super().__init__(steps, spacing, **kwargs)
        if variance not in ("beta", "posterior"):
            raise ValueError(f"variance must be 'beta' or 'posterior'; got {variance!r}")
        self.variance = variance

    def run(self, denoiser, x, grid, noise, callback):
        for i, t, s, a_t, s_t, a_s, s_s in _intervals(denoiser.schedule, grid):
            a_ts = a_t / a_s
            var_ts = s_t**2 - a_ts**2 * s_s**2
            eps, x0_hat = self.denoise(denoiser, x, t, a_t, s_t)
            mean = (x - (var_ts / s_t) * eps) / a_ts
            if float(s) > 0:
                var = var_ts if self.variance == "beta" else var_ts * s_s**2 / s_t**2
                x = mean + var**0.5 * noise.randn_like(x)
            else:
                x = mean
            if callback is not None:
                callback(i, float(s), x, x0_hat)
        return x


class DDIM(Sampler):
    """Denoising diffusion implicit models, Song, Meng & Ermon 2021, eq. 12 with σ_t(η) of eq. 16.

    For grid times t > s, with x̂₀ = (x_t − σ_t ε̂)/α_t and α_{t|s} = α_t/α_s:
        σ_η² = η² · σ_s²/σ_t² · (σ_t² − α²_{t|s} σ_s²)      (eq. 16 in the α/σ view)
        x_s  = α_s x̂₀ + √(σ_s² − σ_η²) · ε̂ + σ_η z
    η = 0 is the deterministic DDIM (a first-order solver of the probability-flow ODE); η = 1 on the full
    grid is DDPM with the posterior variance β̃_t. Any number of steps; one network evaluation per step.
    """

    order = 1  # at eta 0
    config_rules = {"eta": PROBABILITY}

    def __init__(self, steps: int = 50, spacing: str = "auto", eta: float = 0.0, **kwargs):
        super().__init__(steps, spacing, **kwargs)
        if not 0.0 <= float(eta) <= 1.0:
            raise ValueError(f"eta must be in [0, 1]; got {eta}")
        self.eta = float(eta)

    @property
    def stochastic(self) -> bool:
        return self.eta > 0

    def run(self, denoiser, x, grid, noise, callback):
        for i, t, s, a_t, s_t, a_s, s_s in _intervals(denoiser.schedule, grid):
            eps, x0_hat = self.denoise(denoiser, x, t, a_t, s_t)
            var = self.eta**2 * s_s**2 / s_t**2 * (s_t**2 - (a_t / a_s) ** 2 * s_s**2)
            x = a_s * x0_hat + max(s_s**2 - var, 0.0) ** 0.5 * eps
            if var > 0:
                x = x + var**0.5 * noise.randn_like(x)
            if callback is not None:
                callback(i, float(s), x, x0_hat)
        return x


class EulerMaruyama(Sampler):
    """Euler–Maruyama on the reverse-time SDE (Song et al. 2021, eq. 6; Anderson 1982):

        dx = [f(t) x − g(t)² ∇ₓ log p_t(x)] dt + g(t) dw̄,   so a step of length dt back in time is
        x ← x − (f x − g² · score) dt + g √dt · z,          score = −ε̂/σ(t),
    with f, g² evaluated at the step's start; the last step returns its mean (no noise).
    On the VE-SDE (f = 0, g = σ^t) this is the score-SDE tutorial setup's `Euler_Maruyama_sampler`
    x ← x + g² · score · dt + g √dt · z.
    t_end: on a continuous schedule, evaluate at linspace(t_max, t_end, steps) with one step length
        dt = (t_max − t_end)/(steps − 1) for every step, the last included (as the score-SDE tutorial setup, t_end = 1e-3: its
        last step ends at t_end − dt ≈ 0); None = the schedule's grid, whose last step ends at t = 0.
        Ignored on discrete schedules (their trailing grid is evenly spaced and ends at 0).
    final_denoise: the last step returns x̂₀ of its own evaluation (Tweedie's denoised estimate; score_sde's
        `noise_removal`, k-diffusion's last Euler step) instead of the SDE step's mean, which still holds the
        noise of the step before (at t_end on the score-SDE tutorial setup grid: a grainy background). False = the score-SDE tutorial setup's sampler.
    One network evaluation per step.
    """

    stochastic = True
    config_rules = {"t_end": Float(0, 1, open_lo=True, open_hi=True, nullable=True), "final_denoise": BOOL}

    def __init__(self, steps: int = 500, spacing: str = "auto",
                 t_end: float | None = None, final_denoise: bool = False, **kwargs):
        super().__init__(steps, spacing, **kwargs)
        self.t_end = None if t_end is None else float(t_end)
        self.final_denoise = bool(final_denoise)

    def _seed_grid(self, schedule: Schedule) -> bool:
        return self.t_end is not None and schedule.num_timesteps is None and self.steps > 1

    def grid(self, schedule: Schedule) -> Tensor:
        if not self._seed_grid(schedule):
            return super().grid(schedule)
        times = torch.linspace(schedule.t_max, self.t_end, self.steps, dtype=torch.float64)
        return torch.cat([times, times.new_zeros(1)])

    def run(self, denoiser, x, grid, noise, callback):
        schedule = denoiser.schedule
        n = len(grid) - 1
        fixed_dt = float(grid[0] - grid[1]) if self._seed_grid(schedule) else None
        for i in range(n):
            t = grid[i]
            dt = fixed_dt if fixed_dt is not None else float(t - grid[i + 1])
            a_t, s_t = _coefs(schedule, t)
            f, g2 = float(schedule.drift_coeff(t)), float(schedule.diffusion_coeff_sq(t))
            eps, x0_hat = self.denoise(denoiser, x, t, a_t, s_t)
            score = -eps / s_t
            mean = x - (f * x - g2 * score) * dt
            if float(grid[i + 1]) > 0:  # not the step to t = 0 (also on a part of a grid, as RePaint runs)
                x = mean + (g2 * dt) ** 0.5 * noise.randn_like(x)
            else:
                x = x0_hat if self.final_denoise else mean
            if callback is not None:
                callback(i, float(grid[i + 1]), x, x0_hat)
        return x


class PredictorCorrector(Sampler):
    """Predictor–corrector sampling, Song et al. 2021 (Algorithm 1), with the reverse-diffusion predictor
    (Algorithms 2/3) and the Langevin corrector (Algorithms 4/5).

    On grid interval t → s, with α_{t|s} = α_t/α_s and σ²_{t|s} = σ_t² − α²_{t|s} σ_s²:
      corrector (at t, `corrector_steps` times; as in the authors' code it precedes the predictor):
        ε = 2 α²_{t|s} (snr · ‖z‖ / ‖score‖)²,   x ← x + ε · score + √(2ε) · z
      predictor (reverse diffusion): x ← (2 − α_{t|s}) x + σ²_{t|s} · score + σ_{t|s} z
        (no noise on the last step: it returns the mean).
    The Langevin step size uses norms per sample (the authors average them over the batch; per sample,
    a sample does not depend on its batch-mates), so it assumes many coordinates per sample (images).
    The last predictor step (to t = 0, σ_s = 0) already returns x̂₀ on the VE-SDE (α = 1) and nearly so on VP
    schedules, so unlike Euler–Maruyama it needs no final denoising.
    Network evaluations: steps × (1 + corrector_steps).
    """

    stochastic = True
    config_rules = {"snr": POSITIVE, "corrector_steps": Int(0)}

    def __init__(self, steps: int = 500, spacing: str = "auto", snr: float = 0.16, corrector_steps: int = 1, **kwargs):
        super().__init__(steps, spacing, **kwargs)
        self.snr = float(snr)
        self.corrector_steps = int(corrector_steps)

    def run(self, denoiser, x, grid, noise, callback):
        for i, t, s, a_t, s_t, a_s, s_s in _intervals(denoiser.schedule, grid):
            a_ts = a_t / a_s
            for _ in range(self.corrector_steps):
                score = -self.denoise(denoiser, x, t, a_t, s_t)[0] / s_t
                z = noise.randn_like(x)
                ratio = _per_sample_norm(z) / _per_sample_norm(score).clamp_min(1e-20)
                step = 2 * a_ts**2 * (self.snr * ratio) ** 2
                x = x + step * score + (2 * step).sqrt() * z
            eps, x0_hat = self.denoise(denoiser, x, t, a_t, s_t)
            var_ts = s_t**2 - a_ts**2 * s_s**2
            x = (2 - a_ts) * x - (var_ts / s_t) * eps
            if float(s) > 0:
                x = x + var_ts**0.5 * noise.randn_like(x)
            if callback is not None:
                callback(i, float(s), x, x0_hat)
        return x


class Heun(Sampler):
    """Heun's 2nd-order method on the probability-flow ODE, Karras et al. 2022 Algorithm 2 (Algorithm 1
    when s_churn = 0), in the α/σ view: with x̃ = x/α and σ̃ = σ/α the forward process is x̃ = x₀ + σ̃ ε,
    and the ODE is dx̃/dσ̃ = ε̂(α x̃, t(σ̃)).

    Step i (σ̃_i → σ̃_{i+1}): γ = min(s_churn/N, √2 − 1) if s_tmin ≤ σ̃_i ≤ s_tmax else 0;
      σ̂ = σ̃_i (1 + γ), x̂ = x̃ + √(σ̂² − σ̃_i²) · s_noise · z          (churn: noise added back)
      d = ε̂(x̂, σ̂);  x̃' = x̂ + (σ̃_{i+1} − σ̂) d                          (Euler)
      if σ̃_{i+1} ≠ 0: x̃' = x̂ + (σ̃_{i+1} − σ̂)(d + ε̂(x̃', σ̃_{i+1}))/2     (2nd-order correction)
    s_tmin/s_tmax are on σ̃ (EDM's σ). σ̂ is capped at σ̃(t_max), the largest noise the schedule defines.
    A step that starts above σ̃ = 80 (EDM's σ_max; VP schedules reach 157 (linear) and 2·10⁴ (cosine) at
    t = 1) is a plain Euler step: there x̃ is noise, Euler is exact to O(s²/σ̃²), and the trapezoid rule
    across such a σ̃ ratio is not. Network evaluations: 2·steps − 1, one fewer per such step (the last
    step, to σ̃ = 0, is an Euler step).
    """

    order = 2  # at s_churn 0
    config_rules = {"s_churn": Float(0), "s_tmin": Float(0), "s_tmax": Float(0, infinite=True), "s_noise": POSITIVE}

    def __init__(self, steps: int = 18, spacing: str = "auto",
                 s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
                 **kwargs):
        super().__init__(steps, spacing, **kwargs)
        self.s_churn, self.s_noise = float(s_churn), float(s_noise)
        self.s_tmin, self.s_tmax = float(s_tmin), float(s_tmax)

    @property
    def stochastic(self) -> bool:
        return self.s_churn > 0

    def run(self, denoiser, x, grid, noise, callback):
        schedule = denoiser.schedule
        n = len(grid) - 1
        alphas, sigmas = zip(*(_coefs(schedule, t) for t in grid))
        sig = [s / a for a, s in zip(alphas, sigmas)]  # σ̃ at the grid times; σ̃ = 0 at t = 0
        xt = x / alphas[0]
        for i in range(n):
            t_hat, sig_hat, a_hat = grid[i], sig[i], alphas[i]
            gamma = min(self.s_churn / n, 2**0.5 - 1) if self.s_tmin <= sig[i] <= self.s_tmax else 0.0
            if gamma > 0:
                sig_hat = min(sig[i] * (1 + gamma), sig[0])
                t_hat = schedule.time_at_log_snr(-2 * math.log(sig_hat))
                a_hat = _coefs(schedule, t_hat)[0]
                xt = xt + max(sig_hat**2 - sig[i] ** 2, 0.0) ** 0.5 * self.s_noise * noise.randn_like(xt)
            d, x0_hat = self.denoise(denoiser, a_hat * xt, t_hat, a_hat, a_hat * sig_hat)  # x̂₀ = x̃ − σ̂ d
            x_next = xt + (sig[i + 1] - sig_hat) * d
            if sig[i + 1] > 0 and sig_hat <= GRID_SIGMA_MAX:
                d2, _ = self.denoise(denoiser, alphas[i + 1] * x_next, grid[i + 1], alphas[i + 1], sigmas[i + 1])
                x_next = xt + (sig[i + 1] - sig_hat) * (d + d2) / 2
            xt = x_next
            if callback is not None:
                callback(i, float(grid[i + 1]), alphas[i + 1] * xt, x0_hat)
        return alphas[-1] * xt


class DPMSolverPP(Sampler):
    """DPM-Solver++(2M), Lu et al. 2022 ("DPM-Solver++", arXiv:2211.01095) Algorithm 2: a multistep
    second-order solver of the probability-flow ODE in data prediction x̂₀ and λ = log(α/σ).

    Step t_{i−1} → t_i, h_i = λ_{t_i} − λ_{t_{i−1}}, r_i = h_{i−1}/h_i:
        D_i = (1 + 1/(2 r_i)) x̂₀(t_{i−1}) − 1/(2 r_i) x̂₀(t_{i−2})     (D_1 = x̂₀(t_0): first order)
        x_{t_i} = (σ_{t_i}/σ_{t_{i−1}}) x_{t_{i−1}} − α_{t_i} (e^{−h_i} − 1) D_i
    The final step to t = 0 has λ = ∞ (h = ∞): it is taken first-order, x₀ = α(0) x̂₀ (diffusers'
    `final_sigmas_type="zero"`). One network evaluation per step.
    """

    order = 2

    def __init__(self, steps: int = 20, spacing: str = "auto", **kwargs):
        super().__init__(steps, spacing, **kwargs)

    def run(self, denoiser, x, grid, noise, callback):
        prev_x0, prev_h = None, None
        for i, t, s, a_t, s_t, a_s, s_s in _intervals(denoiser.schedule, grid):
            x0_hat = self.denoise(denoiser, x, t, a_t, s_t)[1]
            if s_s == 0:
                x = a_s * x0_hat
            else:
                h = math.log(a_s / s_s) - math.log(a_t / s_t)
                if prev_x0 is None:
                    d = x0_hat
                else:
                    r = prev_h / h
                    d = (1 + 1 / (2 * r)) * x0_hat - (1 / (2 * r)) * prev_x0
                x = (s_s / s_t) * x - a_s * math.expm1(-h) * d
                prev_x0, prev_h = x0_hat, h
            if callback is not None:
                callback(i, float(s), x, x0_hat)
        return x


class EulerAncestral(Sampler):
    """Euler ancestral sampling (k-diffusion's `sample_euler_ancestral`, after Karras et al. 2022 §3 in σ̃ = σ/α):
    an Euler step of the probability-flow ODE down to σ̃_down, then fresh noise back up to σ̃_{i+1}.

    With x̃ = x/α (so x̃ = x₀ + σ̃ ε and dx̃/dσ̃ = ε̂) and step σ̃_i → σ̃_{i+1}:
        σ̃_up   = min(σ̃_{i+1}, η · √(σ̃_{i+1}² (σ̃_i² − σ̃_{i+1}²) / σ̃_i²)),   σ̃_down = √(σ̃_{i+1}² − σ̃_up²)
        x̃'     = x̃ + (σ̃_down − σ̃_i) · ε̂(x, t_i) + s_noise · σ̃_up · z      (no noise on the last step)
    and x_{i+1} = α_{i+1} x̃'. At η = 0 this is the deterministic Euler step, i.e. DDIM (η = 0) on the same
    grid; η = 1 adds the most noise the step allows. One network evaluation per step.
    """

    order = 1  # at eta 0
    config_rules = {"eta": PROBABILITY, "s_noise": POSITIVE}

    def __init__(self, steps: int = 30, spacing: str = "auto", eta: float = 1.0, s_noise: float = 1.0, **kwargs):
        super().__init__(steps, spacing, **kwargs)
        self.eta, self.s_noise = float(eta), float(s_noise)

    @property
    def stochastic(self) -> bool:
        return self.eta > 0

    def run(self, denoiser, x, grid, noise, callback):
        for i, t, s, a_t, s_t, a_s, s_s in _intervals(denoiser.schedule, grid):
            sig_t, sig_s = s_t / a_t, s_s / a_s
            up = min(sig_s, self.eta * (sig_s**2 * (sig_t**2 - sig_s**2) / sig_t**2) ** 0.5) if sig_s > 0 else 0.0
            down = (sig_s**2 - up**2) ** 0.5
            eps, x0_hat = self.denoise(denoiser, x, t, a_t, s_t)
            xt = x / a_t + (down - sig_t) * eps
            if up > 0:
                xt = xt + self.s_noise * up * noise.randn_like(x)
            x = a_s * xt
            if callback is not None:
                callback(i, float(s), x, x0_hat)
        return x

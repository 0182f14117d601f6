"""Noise schedules in one view: x_t = α(t)·x₀ + σ(t)·ε on continuous time t ∈ [0, 1].

Every sampler and loss is written against `alpha(t)` and `sigma(t)` alone, so every sampler runs on
every schedule. Discrete (DDPM-style) schedules keep their published table ᾱ_i exact at the grid
points t_i = (i+1)/T and interpolate log ᾱ linearly in between (t = 0 is clean data, ᾱ = 1).

The forward SDE with these marginals (Song et al. 2021; Kingma et al. 2021) follows from the pair:
f(t) = d log α/dt, g²(t) = dσ²/dt − 2 f(t) σ².
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from diffuse.rules import Float, Int


#: The grid layouts Schedule.timesteps knows (see there).
SPACINGS = ("auto", "linspace", "leading", "trailing", "karras", "logsnr")

#: EDM's σ_max (Karras et al. 2022): the karras/logsnr grids spread their steps below σ̃ = σ/α = 80.
GRID_SIGMA_MAX = 80.0


class Schedule:
    """Base class: subclasses define `alpha` and `sigma` (and may override the rest in closed form)."""

    #: number of discrete training steps T, or None for a continuous-time schedule
    num_timesteps: int | None = None
    #: smallest and largest time a sampler visits (the data end t = 0 is always the last grid point)
    t_min: float = 0.0
    t_max: float = 1.0

    def alpha(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def sigma(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    # ----- derived quantities -------------------------------------------------------------
    def log_snr(self, t: Tensor) -> Tensor:
        """λ(t) = log(α²/σ²)."""
        return 2 * (torch.log(self.alpha(t)) - torch.log(self.sigma(t)))

    def drift_coeff(self, t: Tensor) -> Tensor:
        """f(t) = d log α / dt (the forward SDE is dx = f(t)·x dt + g(t) dW)."""
        t = t.detach().to(torch.float64).requires_grad_(True)
        (grad,) = torch.autograd.grad(torch.log(self.alpha(t)).sum(), t)
        return grad

    def diffusion_coeff_sq(self, t: Tensor) -> Tensor:
        """g²(t) = dσ²/dt − 2 f(t) σ²."""
        t64 = t.detach().to(torch.float64).requires_grad_(True)
        (dvar,) = torch.autograd.grad((self.sigma(t64) ** 2).sum(), t64)
        return dvar - 2 * self.drift_coeff(t) * self.sigma(t.to(torch.float64)) ** 2

    def diffusion_coeff(self, t: Tensor) -> Tensor:
        """g(t)."""
        return self.diffusion_coeff_sq(t).clamp_min(0).sqrt()

    def time_at_log_snr(self, lam: Tensor | float) -> Tensor:
        """The time t ∈ [0, t_max] where λ(t) = lam (λ decreases in t), by bisection in fp64.

        Used where a sampler needs a time between grid points (Heun's churn, the karras/logsnr grids).
        """
        lam = torch.as_tensor(lam, dtype=torch.float64)
        lo, hi = torch.zeros_like(lam), torch.full_like(lam, self.t_max)
        for _ in range(64):  # 2⁻⁶⁴ of [0, 1]: below fp64 resolution
            mid = (lo + hi) / 2
            later = self.log_snr(mid) > lam  # λ still above the target ⇒ the root lies after mid
            lo, hi = torch.where(later, mid, lo), torch.where(later, hi, mid)
        return (lo + hi) / 2

    @property
    def prior_std(self) -> float:
        """Std of the noise a sampler starts from: σ(t_max) (data contributes α(t_max)·x₀ ≈ 0 or ≪ σ)."""
        return float(self.sigma(torch.tensor(self.t_max, dtype=torch.float64)))

    # ----- time grids -------------------------------------------------------------------
    def sample_training_times(self, batch: int, generator: torch.Generator | None = None,
                              device: torch.device | str = "cpu") -> Tensor:
        """Times for the training loss: uniform over the T grid points, or U[t_min, 1] if continuous."""
        if self.num_timesteps is not None:
            i = torch.randint(0, self.num_timesteps, (batch,), generator=generator, device=device)
            return (i + 1).to(torch.float32) / self.num_timesteps
        u = torch.rand(batch, generator=generator, device=device)
        return self.t_min + (1.0 - self.t_min) * u

    def timesteps(self, steps: int, spacing: str = "auto") -> Tensor:
        """Descending sampling grid [t_0 = t_max, …, t_{steps−1}, 0]: `steps` network evaluations.

        spacing (index grids for discrete schedules; names and formulas as in diffusers):
          - "linspace": indices round(linspace(T−1, 0, steps)): starts at T, ends at the first grid point.
          - "leading":  indices k·(T // steps), k = steps−1 … 0: DDIM's original grid, never starts at T.
          - "trailing": indices round(T − k·T/steps) − 1: starts at T, evenly spaced (Lin et al. 2024).
          - "auto": "trailing" for discrete schedules, "logsnr" for continuous ones (on the VE-SDE: σ
            geometric, the discretization of Song et al. 2021).
        continuous grids from t_max down to t_min (any schedule; times need not be on the T grid):
          - "karras": σ̃ = σ/α at (σ̃_max^{1/ρ} + k/(steps−1)·(σ̃_min^{1/ρ} − σ̃_max^{1/ρ}))^ρ, ρ = 7
            (Karras et al. 2022, eq. 5).
          - "logsnr": uniform in λ = log(α²/σ²) (Lu et al. 2022's "logSNR" grid).
          - "linspace" on a continuous schedule: uniform in t.
        The final 0 is the clean-data end: the last update jumps from the smallest t to t = 0.
        """
        if steps < 1:
            raise ValueError(f"steps must be ≥ 1, got {steps}")
        T = self.num_timesteps
        if spacing == "auto" and T is None:
            spacing = "logsnr"
        if spacing in ("karras", "logsnr"):
            grid = self._continuous_grid(steps, spacing)
        elif T is None:
            if spacing != "linspace":
                raise ValueError(f"continuous schedule supports spacing auto|linspace|karras|logsnr, got {spacing!r}")
            grid = torch.linspace(self.t_max, self.t_min, steps, dtype=torch.float64)
        else:
            if steps > T:
                raise ValueError(f"steps={steps} exceeds the schedule's T={T}")
            if spacing == "auto":
                spacing = "trailing"
            if spacing == "linspace":
                idx = torch.linspace(T - 1, 0, steps, dtype=torch.float64).round().long()
            elif spacing == "leading":
                idx = torch.arange(steps - 1, -1, -1, dtype=torch.long) * (T // steps)
            elif spacing == "trailing":
                idx = (T - torch.arange(0, steps, dtype=torch.float64) * (T / steps)).round().long() - 1
            else:
                raise ValueError(f"unknown spacing {spacing!r}; choose auto, linspace, leading, trailing, "
                                 "karras or logsnr")
            grid = (idx.to(torch.float64) + 1) / T
        return torch.cat([grid, grid.new_zeros(1)])

    def _continuous_grid(self, steps: int, spacing: str) -> Tensor:
        """karras / logsnr grids between σ̃(t_min) and σ̃(t_max), σ̃ = σ/α = e^{−λ/2}.

        Where σ̃(t_max) exceeds EDM's σ_max = 80 (cosine: 2·10⁴, linear: 157), the grid starts at t_max and
        spreads the other steps − 1 points from σ̃ = 80 down: above it x̃ is pure noise and the ODE barely
        moves, and one large step there costs nothing, while steps spent there are lost below.
        """
        if steps == 1:
            return torch.tensor([self.t_max], dtype=torch.float64)
        lam_lo, lam_hi = (float(v) for v in self.log_snr(torch.tensor([self.t_max, self.t_min], dtype=torch.float64)))
        head = []
        if -lam_lo / 2 > math.log(GRID_SIGMA_MAX) and steps > 2:
            head, steps, lam_lo = [self.t_max], steps - 1, -2 * math.log(GRID_SIGMA_MAX)
        k = torch.linspace(0, 1, steps, dtype=torch.float64)
        if spacing == "logsnr":
            lam = lam_lo + k * (lam_hi - lam_lo)
        else:
            rho = 7.0
            root_max, root_min = math.exp(-lam_lo / (2 * rho)), math.exp(-lam_hi / (2 * rho))  # σ̃^{1/ρ}
            lam = -2 * rho * torch.log(root_max + k * (root_min - root_max))
        grid = self.time_at_log_snr(lam)
        if not head:
            grid[0] = self.t_max  # the ends exactly, not to bisection precision
        grid[-1] = self.t_min
        return torch.cat([grid.new_tensor(head), grid])


class DiscreteSchedule(Schedule):
    """A DDPM-style schedule given by its table ᾱ_i, i = 0…T−1, placed at t_i = (i+1)/T."""

    def __init__(self, alphas_cumprod: Tensor):
        self.alphas_cumprod = alphas_cumprod.to(torch.float64)
        self.num_timesteps = len(alphas_cumprod)
        self.t_min = 1.0 / self.num_timesteps
        self.t_max = 1.0
        # log ᾱ at t = 0, 1/T, …, 1 for piecewise-linear interpolation (ᾱ(0) = 1: clean data)
        self._log_ac = torch.cat([torch.zeros(1, dtype=torch.float64), torch.log(self.alphas_cumprod)])
        self._log_ac_on: dict[torch.device, Tensor] = {}

    def _log_ac_table(self, device: torch.device) -> Tensor:
        """The log ᾱ table on `device`, copied there once: a copy per call would make every training step
        wait for the GPU (a CPU → CUDA copy from pageable memory synchronises)."""
        if device not in self._log_ac_on:
            self._log_ac_on[device] = self._log_ac.to(device)
        return self._log_ac_on[device]

    @property
    def betas(self) -> Tensor:
        ac = self.alphas_cumprod
        prev = torch.cat([ac.new_ones(1), ac[:-1]])
        return 1 - ac / prev

    def log_alphas_cumprod(self, t: Tensor) -> Tensor:
        """log ᾱ(t), exact at t = (i+1)/T, linear in t in between."""
        table = self._log_ac_table(t.device)
        pos = t.to(torch.float64).clamp(0, 1) * self.num_timesteps
        lo = pos.floor().long().clamp(max=self.num_timesteps - 1)
        frac = pos - lo
        out = table[lo] * (1 - frac) + table[lo + 1] * frac
        return out.to(t.dtype) if t.is_floating_point() else out

    def alpha(self, t: Tensor) -> Tensor:
        return torch.exp(0.5 * self.log_alphas_cumprod(t))

    def sigma(self, t: Tensor) -> Tensor:
        return torch.sqrt(-torch.expm1(self.log_alphas_cumprod(t)))

    def drift_coeff(self, t: Tensor) -> Tensor:
        """f(t) = d log α/dt = ½·T·log(1 − β_i) on the cell ((i)/T, (i+1)/T] holding t.

        log ᾱ is piecewise linear, so f is piecewise constant; at a grid point t_i we take the cell *below*
        it, the one a reverse step from t_i crosses first.
        """
        t = torch.as_tensor(t, dtype=torch.float64)
        T = self.num_timesteps
        cell = (torch.ceil(t * T - 1e-9) - 1).long().clamp(0, T - 1)
        table = self._log_ac_table(t.device)
        return 0.5 * T * (table[cell + 1] - table[cell])

    def diffusion_coeff_sq(self, t: Tensor) -> Tensor:
        """g²(t) = dσ²/dt − 2fσ² = −2f(t) since α² + σ² = 1: −T·log(1 − β_i) ≈ T·β_i, the VP-SDE's β(t)."""
        return -2 * self.drift_coeff(t)


class LinearSchedule(DiscreteSchedule):
    """Ho et al. 2020: β linear from beta_start to beta_end over T steps, ᾱ_i = Π_{j≤i} (1 − β_j)."""

    config_rules = {"beta_start": Float(0, 1, open_lo=True, open_hi=True),
                    "beta_end": Float(0, 1, open_lo=True, open_hi=True), "num_timesteps": Int(2)}

    def __init__(self, beta_start: float = 1e-4, beta_end: float = 0.02, num_timesteps: int = 1000):
        betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
        super().__init__(torch.cumprod(1 - betas, dim=0))
        self.beta_start, self.beta_end = beta_start, beta_end


class CosineSchedule(DiscreteSchedule):
    """Nichol & Dhariwal 2021, eq. 17: ᾱ(t) = f(t)/f(0), f(t) = cos²(((t/T) + s)/(1 + s) · π/2), β ≤ max_beta."""

    config_rules = {"num_timesteps": Int(2), "s": Float(0), "max_beta": Float(0, 1, open_lo=True)}

    def __init__(self, num_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999):
        steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
        f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        betas = (1 - f[1:] / f[:-1]).clamp(max=max_beta)
        super().__init__(torch.cumprod(1 - betas, dim=0))
        self.s, self.max_beta = s, max_beta


class VESDESchedule(Schedule):
    """Variance-exploding SDE as in Song's score-SDE tutorial (the score-SDE tutorial setup).

    dx = σ^t dW, so α(t) = 1, g(t) = σ^t and σ(t) = marginal_prob_std(t) = √((σ^{2t} − 1) / (2 ln σ)).
    Times live in [eps, 1]; the prior is N(0, σ(1)²).
    """

    config_rules = {"sigma": Float(1, open_lo=True), "eps": Float(0, 1, open_lo=True, open_hi=True)}

    def __init__(self, sigma: float = 25.0, eps: float = 1e-5):
        self.sigma_max_base = float(sigma)
        self.t_min = float(eps)
        self.t_max = 1.0
        self.num_timesteps = None

    def alpha(self, t: Tensor) -> Tensor:
        return torch.ones_like(t, dtype=t.dtype if t.is_floating_point() else torch.float32)

    def sigma(self, t: Tensor) -> Tensor:
        log_s = math.log(self.sigma_max_base)
        return torch.sqrt(torch.expm1(2 * t * log_s) / (2 * log_s))

    def drift_coeff(self, t: Tensor) -> Tensor:
        return torch.zeros_like(t, dtype=torch.float64)

    def diffusion_coeff(self, t: Tensor) -> Tensor:
        return self.sigma_max_base ** t.to(torch.float64)

    def diffusion_coeff_sq(self, t: Tensor) -> Tensor:
        return self.diffusion_coeff(t) ** 2

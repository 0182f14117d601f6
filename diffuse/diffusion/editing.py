"""Editing with a trained denoiser: inpainting, image-to-image (SDEdit), deterministic inversion, interpolation.

Every method runs the samplers of samplers.py unchanged, on every schedule and dim: inpainting wraps the
denoiser (`KnownRegion`), RePaint and SDEdit run a sampler on parts of its own grid, inversion runs the
probability-flow ODE up the grid. Masks (masks.py) are bool [B|1, 1, *spatial], True = known.

  replacement  Song et al. 2021 (score_sde's inpainter): before every network evaluation at time t the known
               region of x is set to the input noised to t, α_t x_known + σ_t z (fresh z each time).
  reconstruction  Ho et al. 2022 ("Video diffusion models", eq. 7): replacement, and the unknown region's x̂₀
               moved against the gradient of how far the known region's x̂₀ is from the input,
               x̂₀_u ← x̂₀_u − (w α_t / 2) ∇_{x_t,u} ‖x_known − x̂₀_k(x_t)‖², so the known region steers what
               is filled in through the network (replacement alone never lets it: RePaint's "disharmony").
               One backward pass through the network per evaluation.
  RePaint      Lugmayr et al. 2022: replacement, and the grid walked in jumps of `jump_length` intervals, each
               jump done `resample` times, the state re-noised back up the jump in between by the forward
               process q(x_a | x_b) = N(α_{a|b} x_b, σ_a² − α_{a|b}² σ_b²). resample = 1 is replacement.
  SDEdit       Meng et al. 2022: the input noised to t = strength · t_max (snapped down to the sampler's grid,
               as diffusers' img2img does), then the sampler from there; strength = 1 is plain sampling.
  inversion    x₀ → x_T along the probability-flow ODE, the sampler's grid run upwards (DDIM inversion: DDIM's
               step, i.e. Euler in σ̃ = σ/α, for first-order samplers; Heun's step for the others). σ(0) = 0
               has no ε̂ to read, so the first step reads ε̂ at the next grid time (diffusers' inverse DDIM
               does the same). Decoding is the sampler run down from x_T.
  slerp        spherical interpolation of two noises (Shoemake 1985), which keeps the norm a Gaussian
               sample has, as the DDIM paper interpolates latents.
  infer_labels for a class-conditional run given inputs without labels: each input's class read from its known
               region by the run's own network, as the diffusion classifier of Li et al. 2023 ("Your diffusion
               model is secretly a zero-shot classifier") does: the class whose ε̂ best predicts the noise added.

After inpainting, the known region of the output is the input exactly (pasted at t = 0).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from diffuse.diffusion.samplers import (DDIM, EulerAncestral, NoiseSource, Sampler, StepCallback, _coefs,
                                        prior_sample)
from diffuse.errors import DiffuseError

METHODS = ("replacement", "reconstruction", "repaint")
# labels=infer (Li et al. 2023's adaptive diffusion classifier): every class scored at SCREEN_TIMES, then the
# INFER_KEEP best at REFINE_TIMES too (a fresh noise at each time); mid-range t separates MNIST digits best.
SCREEN_TIMES = (0.4, 0.5)
REFINE_TIMES = (0.4, 0.5, 0.45)
INFER_KEEP = 3


def infer_passes(num_classes: int) -> int:
    """Network passes per input that infer_labels spends for a run of num_classes classes."""
    if num_classes <= INFER_KEEP:
        return num_classes * (len(SCREEN_TIMES) + len(REFINE_TIMES))
    return num_classes * len(SCREEN_TIMES) + INFER_KEEP * len(REFINE_TIMES)


def filled_with_known_mean(known: Tensor, mask: Tensor) -> Tensor:
    """known [B, C, *S] with the region where mask is False set to the per-channel mean of its known pixels, so
    nothing the input holds there is ever read. mask: bool [B, 1, *S]."""
    m = mask.to(known.dtype)
    mean = (known * m).flatten(2).sum(2) / m.flatten(2).sum(2).clamp_min(1)  # [B, C]
    return torch.where(mask, known, mean.view(*mean.shape, *([1] * (known.dim() - 2))).expand_as(known))


def class_errors(denoiser_for: Callable[[Tensor], object], x: Tensor, mask: Tensor, classes: Tensor, times,
                 noise: NoiseSource) -> Tensor:
    """[B, k]: Σ over `times` of ‖mask ⊙ (ε̂(α_t x + σ_t ε, t | c) − ε)‖² for the classes [B, k] of each row of x,
    one fresh noise ε per time (drawn from `noise`, a row per input) shared by all k classes of a row, so the
    classes are compared on equal terms. One call of denoiser_for per network pass."""
    m = mask.to(x.dtype)
    total = torch.zeros(classes.shape, dtype=torch.float32, device=x.device)
    for t in times:
        denoisers = [denoiser_for(labels) for labels in classes.T]
        schedule, t = denoisers[0].schedule, torch.as_tensor(float(t), dtype=torch.float64)
        eps = noise.randn(x.shape[1:]).to(x.dtype)
        xt = schedule.alpha(t).float() * x + schedule.sigma(t).float() * eps
        total += torch.stack([((d.eps(xt, t) - eps) ** 2 * m).flatten(1).sum(1) for d in denoisers], 1)
    return total


def infer_labels(denoiser_for: Callable[[Tensor], object], known: Tensor, mask: Tensor, num_classes: int,
                 noise: NoiseSource) -> Tensor:
    """[B] classes of the inputs `known` [B, C, *S] from their known region (mask True), by the diffusion
    classifier (Li et al. 2023) on those pixels only:
        ĉ = argmin_c Σ_k ‖mask ⊙ (ε̂(α_k x + σ_k ε_k, t_k | c) − ε_k)‖²  (class_errors).
    As in their paper's adaptive scheme, all classes are screened at SCREEN_TIMES and only the INFER_KEEP
    lowest go on to REFINE_TIMES (the sum runs over all the times a class was scored at). What the input holds
    where mask is False is never read (filled_with_known_mean). denoiser_for(labels [B]) gives the unguided
    Denoiser of those labels. infer_passes(num_classes) network passes per input."""
    mask = mask.to(known.device).expand(len(known), 1, *known.shape[2:])
    x = filled_with_known_mean(known, mask)
    candidates = torch.arange(num_classes, device=known.device).expand(len(known), num_classes)
    total = class_errors(denoiser_for, x, mask, candidates, SCREEN_TIMES, noise)
    if num_classes > INFER_KEEP:
        total, kept = total.topk(INFER_KEEP, dim=1, largest=False)
        candidates = candidates.gather(1, kept)
    total = total + class_errors(denoiser_for, x, mask, candidates, REFINE_TIMES, noise)
    return candidates.gather(1, total.argmin(1, keepdim=True)).squeeze(1)


class KnownRegion:
    """A denoiser for inpainting by replacement: ε̂(x, t) of the inner denoiser at x with its known region
    replaced by the input noised to t; on the known region itself it returns ε̂ = (x − α_t x_known)/σ_t, so
    x̂₀ there is the input and every sampler's state carries the known region down its noised path.
    reconstruction_weight w > 0 adds Ho et al.'s reconstruction guidance to the unknown region (see the module).

    known: [B, C, *spatial] (data or latents); mask: bool [B|1, 1, *spatial]; noise: per-sample noise."""

    def __init__(self, denoiser, known: Tensor, mask: Tensor, noise: NoiseSource, reconstruction_weight: float = 0.0):
        if known.shape[2:] != mask.shape[2:] or mask.shape[0] not in (1, known.shape[0]):
            raise DiffuseError(f"a mask of shape {list(mask.shape)} does not fit items of shape {list(known.shape)}")
        if float(reconstruction_weight) < 0:
            raise DiffuseError(f"reconstruction_weight must be ≥ 0; got {reconstruction_weight}")
        self.inner, self.schedule = denoiser, denoiser.schedule
        self.known, self.mask, self.noise = known.float(), mask.to(known.device), noise
        self.weight = float(reconstruction_weight)

    @property
    def nfe(self) -> int:
        return self.inner.nfe

    def eps(self, x: Tensor, t) -> Tensor:
        a, s = _coefs(self.schedule, t)
        noised = a * self.known + s * self.noise.randn_like(x)
        x_in = torch.where(self.mask, noised, x)
        if self.weight == 0 or s == 0:
            eps = self.inner.eps(x_in, t)
        else:
            eps = self._reconstruction_guided(x_in, t, a, s)
        if s == 0:
            return eps
        return torch.where(self.mask, (x - a * self.known) / s, eps)

    def _reconstruction_guided(self, x_in: Tensor, t, a: float, s: float) -> Tensor:
        """ε̂ of x̂₀_u − (w α/2) ∇_{x,u} ‖x_known − x̂₀_k‖² (x_in's unknown region is the sampler's own x)."""
        with torch.enable_grad():
            x_in = x_in.detach().requires_grad_(True)
            eps = getattr(self.inner, "eps_with_grad", self.inner.eps)(x_in, t)
            x0 = (x_in - s * eps) / a
            error = ((x0 - self.known) ** 2 * self.mask).sum()  # a sum of per-sample terms: per-sample gradients
            (grad,) = torch.autograd.grad(error, x_in)
        x0 = x0.detach() - (self.weight * a / 2) * grad
        return (x_in.detach() - a * x0) / s


def paste(x: Tensor, known: Tensor, mask: Tensor) -> Tensor:
    """The known region of the input over x (both [B, C, *spatial])."""
    return torch.where(mask.to(x.device), known.to(x.device, x.dtype), x)


def renoise(schedule, x: Tensor, t_from, t_to, noise: NoiseSource) -> Tensor:
    """A draw of x_{t_to} ~ q(x_{t_to} | x_{t_from} = x) for t_to > t_from (the forward process between them)."""
    a_b, s_b = _coefs(schedule, t_from)
    a_a, s_a = _coefs(schedule, t_to)
    ratio = a_a / a_b
    return ratio * x + max(s_a**2 - ratio**2 * s_b**2, 0.0) ** 0.5 * noise.randn_like(x)


def _counting(callback: StepCallback | None, offset: list[int]) -> StepCallback | None:
    """The sampler's per-interval callback renumbered across several runs on parts of a grid."""
    if callback is None:
        return None

    def wrapped(i, t, x, x0):
        callback(offset[0], t, x, x0)
        offset[0] += 1
    return wrapped


def inpaint(denoiser, sampler: Sampler, known: Tensor, mask: Tensor, noise: NoiseSource, method: str = "replacement",
            jump_length: int = 10, resample: int = 10, reconstruction_weight: float = 20.0,
            callback: StepCallback | None = None) -> Tensor:
    """Completions of `known` where mask is False, one per row of `noise` (rows of known/mask repeat as the
    caller lays them out). denoiser: the (guided) Denoiser of the batch's labels. Network evaluations: those
    of the sampler, × resample for RePaint (reconstruction: each with a backward pass, at weight
    reconstruction_weight). callback(k, t, x, x̂₀) once per interval walked (RePaint: once per
    interval of every repetition)."""
    if method not in METHODS:
        raise DiffuseError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    schedule = denoiser.schedule
    wrapped = KnownRegion(denoiser, known, mask, noise,
                          reconstruction_weight=reconstruction_weight if method == "reconstruction" else 0.0)
    x = prior_sample(schedule, noise, known.shape[1:])
    grid = sampler.grid(schedule)
    if method in ("replacement", "reconstruction"):
        out = sampler.run(wrapped, x, grid, noise, callback)
        return paste(out, known, mask)
    if not sampler.stochastic:
        raise DiffuseError(f"RePaint resamples with the noise of a stochastic sampler; {type(sampler).__name__} "
                           f"is deterministic here: use method=replacement, or a stochastic sampler (ddpm, "
                           f"euler_ancestral, ddim with eta > 0)")
    if int(jump_length) < 1 or int(resample) < 1:
        raise DiffuseError(f"RePaint needs jump_length ≥ 1 and resample ≥ 1; got {jump_length}, {resample}")
    count = [0]
    step_callback = _counting(callback, count)
    intervals = len(grid) - 1
    for start in range(0, intervals, int(jump_length)):
        part = grid[start:min(intervals, start + int(jump_length)) + 1]
        for r in range(int(resample)):
            x = sampler.run(wrapped, x, part, noise, step_callback)
            if r < int(resample) - 1:
                x = renoise(schedule, x, part[-1], part[0], noise)
    return paste(x, known, mask)


def sdedit_grid(sampler: Sampler, schedule, strength: float) -> Tensor:
    """The sampler's grid from t = strength · t_max down: its points at or below that time (the first of them
    is where the input is noised to). strength = 1 is the whole grid."""
    if not 0.0 < float(strength) <= 1.0:
        raise DiffuseError(f"strength must be in (0, 1]; got {strength}")
    grid = sampler.grid(schedule)
    if float(strength) >= 1.0:
        return grid
    t_start = float(strength) * float(schedule.t_max)
    below = (grid <= t_start + 1e-12).nonzero()
    first = int(below[0]) if len(below) else len(grid) - 1
    first = min(first, len(grid) - 2)  # at least one interval: the smallest strength still denoises once
    return grid[first:]


def sdedit(denoiser, sampler: Sampler, x_in: Tensor, strength: float, noise: NoiseSource,
           callback: StepCallback | None = None) -> tuple[Tensor, float]:
    """SDEdit: x_in [B, C, *spatial] noised to the start of sdedit_grid, then the sampler down to 0. Returns
    the outputs and the time they started from. At strength 1 the start is the prior draw `sample` makes
    (the same noise, so the same samples), whatever the input."""
    schedule = denoiser.schedule
    grid = sdedit_grid(sampler, schedule, strength)
    z = noise.randn(x_in.shape[1:])
    if float(strength) >= 1.0:
        x = z * schedule.prior_std
    else:
        a, s = _coefs(schedule, grid[0])
        x = a * x_in.to(z.device, torch.float32) + s * z
    return sampler.run(denoiser, x, grid, noise, callback), float(grid[0])


def check_invertible(sampler: Sampler) -> None:
    """Inversion runs a deterministic ODE: a stochastic sampler is one line."""
    if sampler.stochastic:
        raise DiffuseError(f"inversion and interpolation need a deterministic sampler; {type(sampler).__name__} "
                           f"draws noise here: use sampler=ddim (eta 0), heun or dpm_solver")


@torch.no_grad()
def invert(denoiser, sampler: Sampler, x0: Tensor, callback: Callable[[int, float, Tensor], None] | None = None
           ) -> Tensor:
    """x0 [B, C, *spatial] → x_T at the top of the sampler's grid along the probability-flow ODE (see the
    module's docstring); decoding with `sampler.run(denoiser, x_T, grid, None, None)` returns close to x0,
    closer as steps grow. callback(i, t, x) after each step up."""
    check_invertible(sampler)
    schedule = denoiser.schedule
    grid = sampler.grid(schedule).flip(0)  # 0 = t_N < … < t_0 = t_max
    first_order = isinstance(sampler, (DDIM, EulerAncestral))
    coefs = [_coefs(schedule, t) for t in grid]
    x = x0.float()
    for i in range(len(grid) - 1):
        (a_t, s_t), (a_s, s_s) = coefs[i], coefs[i + 1]
        t_read = grid[i] if s_t > 0 else grid[i + 1]  # σ(0) = 0: read ε̂ at the next time
        eps = denoiser.eps(x, t_read)
        xt = x / a_t + (s_s / a_s - s_t / a_t) * eps  # Euler in σ̃: x̃_s = x̃_t + (σ̃_s − σ̃_t) ε̂ (DDIM's step)
        if not first_order:  # Heun: the trapezoid with ε̂ at the step's end
            eps_end = denoiser.eps(a_s * xt, grid[i + 1])
            xt = x / a_t + (s_s / a_s - s_t / a_t) * (eps + eps_end) / 2
        x = a_s * xt
        if callback is not None:
            callback(i, float(grid[i + 1]), x)
    return x


def slerp(z0: Tensor, z1: Tensor, weight: float) -> Tensor:
    """Spherical interpolation per sample between z0 and z1 ([B, …]) at weight ∈ [0, 1] (0 → z0, 1 → z1);
    linear where the two are (nearly) parallel."""
    a, b = z0.flatten(1).double(), z1.flatten(1).double()
    cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-30)
    theta = torch.arccos(cos.clamp(-1, 1))
    sin = torch.sin(theta)
    w = float(weight)
    linear = sin.abs() < 1e-6
    c0 = torch.where(linear, torch.full_like(theta, 1 - w), torch.sin((1 - w) * theta) / sin.where(~linear, 1.0))
    c1 = torch.where(linear, torch.full_like(theta, w), torch.sin(w * theta) / sin.where(~linear, 1.0))
    out = c0[:, None] * a + c1[:, None] * b
    return out.view_as(z0).to(z0.dtype)


def interpolation_weights(frames: int) -> list[float]:
    """frames ≥ 2 evenly spaced weights from 0 to 1, both ends included."""
    if int(frames) < 2:
        raise DiffuseError(f"an interpolation needs at least 2 frames; got {frames}")
    return [k / (int(frames) - 1) for k in range(int(frames))]


def slerp_path(z0: Tensor, z1: Tensor, frames: int) -> Tensor:
    """[frames, B, …]: slerp(z0, z1, w) at interpolation_weights(frames)."""
    return torch.stack([slerp(z0, z1, w) for w in interpolation_weights(frames)])


"""Editing (diffusion/editing.py, masks.py) on data whose exact denoiser is known: a correlated Gaussian.

Data x ~ N(0, Σ) with Σ_ij = ρ^|i−j| along one axis of L positions (an AR(1) signal): E[ε | x_t] =
σ (α² Σ + σ² I)^(−1) x_t, exact at every t. Inpainting then has a closed-form answer, the conditional
Gaussian of the missing positions given the known ones, mean Σ_uk Σ_kk^(−1) x_k.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffuse.diffusion import masks
from diffuse.diffusion.editing import (INFER_KEEP, REFINE_TIMES, SCREEN_TIMES, KnownRegion, infer_labels, infer_passes,
                                       inpaint, interpolation_weights, invert, sdedit, sdedit_grid, slerp, slerp_path)
from diffuse.diffusion.samplers import DDIM, DDPM, DPMSolverPP, EulerAncestral, Heun, NoiseSource, sample
from diffuse.diffusion.schedules import CosineSchedule
from diffuse.errors import DiffuseError

from conftest import conf_choices, load_sampler, schedules

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest's

L, RHO = 16, 0.9
SIGMA = torch.tensor([[RHO ** abs(i - j) for j in range(L)] for i in range(L)], dtype=torch.float64)
SCHEDULES = schedules()


class CorrelatedGaussianDenoiser:
    """Exact ε̂ for x [B, 1, L] ~ N(0, Σ): σ (α² Σ + σ² I)^(−1) x."""

    def __init__(self, schedule):
        self.schedule, self.nfe = schedule, 0

    def eps(self, x, t):
        self.nfe += 1
        t = torch.as_tensor(t, dtype=torch.float64)
        a, s = float(self.schedule.alpha(t)), float(self.schedule.sigma(t))
        cov = a * a * SIGMA + s * s * torch.eye(L, dtype=torch.float64)
        flat = x.double().reshape(-1, L)
        return (s * torch.linalg.solve(cov, flat.T).T).reshape(x.shape).to(x.dtype)


def _data(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    chol = torch.linalg.cholesky(SIGMA)
    return (torch.randn(n, L, dtype=torch.float64, generator=g) @ chol.T).float().view(n, 1, L)


def _conditional_mean(x, mask):
    """E[x_u | x_k] for each row: Σ_uk Σ_kk^(−1) x_k (mask [1, 1, L], True = known)."""
    k = mask.view(-1).numpy()
    u = ~k
    s = SIGMA.numpy()
    gain = s[np.ix_(u, k)] @ np.linalg.inv(s[np.ix_(k, k)])
    return torch.from_numpy(x.view(len(x), L).double().numpy()[:, k] @ gain.T)


# -- inpainting ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
@pytest.mark.parametrize("name", conf_choices("sampler"))
def test_every_sampler_keeps_the_known_region_exactly(name, schedule):
    sched = SCHEDULES[schedule]
    sampler = load_sampler(name, steps=8)
    x = _data(3)
    mask = masks.named_mask("right_half", (L,))
    den = CorrelatedGaussianDenoiser(sched)
    out = inpaint(den, sampler, x, mask, NoiseSource(range(3)))
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert torch.equal(out[..., :L // 2], x[..., :L // 2])  # kept: the input, bit for bit
    assert not torch.equal(out[..., L // 2:], x[..., L // 2:])


def test_the_known_region_gives_the_input_as_its_denoised_estimate():
    sched = CosineSchedule()
    x, mask = _data(2), masks.named_mask("left_half", (L,))
    wrapped = KnownRegion(CorrelatedGaussianDenoiser(sched), x, mask, NoiseSource(range(2)))
    x_t = torch.randn(2, 1, L)
    t = torch.tensor(0.4, dtype=torch.float64)
    a, s = float(sched.alpha(t)), float(sched.sigma(t))
    eps = wrapped.eps(x_t, t)
    x0 = (x_t - s * eps) / a
    torch.testing.assert_close(x0[..., L // 2:], x[..., L // 2:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sampler", [DDPM(40), EulerAncestral(40), DDIM(40, eta=1.0)], ids=lambda s: type(s).__name__)
def test_repaint_with_one_resample_is_replacement(sampler):
    sched, x, mask = CosineSchedule(), _data(4), masks.named_mask("center_box", (L,))
    den = CorrelatedGaussianDenoiser(sched)
    plain = inpaint(den, sampler, x, mask, NoiseSource(range(4)), method="replacement")
    jumps = inpaint(den, sampler, x, mask, NoiseSource(range(4)), method="repaint", jump_length=7, resample=1)
    assert torch.equal(plain, jumps)


def test_completions_follow_the_conditional_gaussian():
    """Many completions of the right half of one signal: their mean approaches the exact conditional mean
    Σ_uk Σ_kk⁻¹ x_k, closer than the prior mean 0 is, and RePaint's resampling much closer than replacement."""
    sched, n = CosineSchedule(), 1024
    x = _data(1, seed=5).expand(n, 1, L).contiguous()
    mask = masks.named_mask("right_half", (L,))
    want = _conditional_mean(x[:1], mask)[0]                       # [L/2]
    baseline = want.norm().item()                                  # what ignoring the input would miss by
    errors = {}
    for method, kw in (("replacement", {}), ("repaint", {"jump_length": 5, "resample": 4}),
                       ("reconstruction", {"reconstruction_weight": 2.0})):
        out = inpaint(CorrelatedGaussianDenoiser(sched), DDPM(100), x, mask, NoiseSource(range(n)), method=method, **kw)
        got = out[:, 0, L // 2:].double().mean(0)
        errors[method] = (got - want).norm().item()
        # next to the boundary the signal is pinned: ρ · x_k, the conditional mean at the first missing position
        assert abs(got[0].item() - want[0].item()) < 0.15, (method, got[0].item(), want[0].item())
    # replacement is known to be biased (the known region never hears back from the filled-in one: RePaint's
    # "disharmony"); its resampling removes most of it. Measured: 0.21 and 0.044 of a baseline 0.43.
    assert errors["replacement"] < 0.7 * baseline, (errors, baseline)
    assert errors["repaint"] < 0.25 * baseline and errors["repaint"] < 0.5 * errors["replacement"], (errors, baseline)
    # reconstruction guidance lets the known half steer the rest through ∂ε̂/∂x: 0.13 measured at w 2 (the best
    # weight depends on the data: 1–5 here, ≈ 20 on MNIST; far too large overshoots)
    assert errors["reconstruction"] < 0.8 * errors["replacement"], (errors, baseline)


def test_reconstruction_guidance_at_weight_zero_is_replacement_and_follows_eq_7():
    sched, x, mask = CosineSchedule(), _data(3), masks.named_mask("right_half", (L,))
    plain = inpaint(CorrelatedGaussianDenoiser(sched), DDIM(12), x, mask, NoiseSource(range(3)))
    zero = inpaint(CorrelatedGaussianDenoiser(sched), DDIM(12), x, mask, NoiseSource(range(3)), method="reconstruction",
                   reconstruction_weight=0.0)
    assert torch.equal(plain, zero)
    # one evaluation against eq. 7 by hand: x̂₀_u − (w α/2) ∇ ‖x_k − x̂₀_k‖², the gradient of the exact denoiser's
    # linear map x̂₀ = (x − σ ε̂(x))/α, i.e. ∇ = 2 J_kᵀ (x̂₀_k − x_k) with J = (I − σ² (α² Σ + σ² I)⁻¹)/α
    t = torch.tensor(0.5, dtype=torch.float64)
    a, s = float(sched.alpha(t)), float(sched.sigma(t))
    wrapped = KnownRegion(CorrelatedGaussianDenoiser(sched), x, mask, NoiseSource(range(3)), reconstruction_weight=3.0)
    x_t = torch.randn(3, 1, L, generator=torch.Generator().manual_seed(9))
    eps = wrapped.eps(x_t, t)
    noised = a * x + s * NoiseSource(range(3)).randn_like(x)  # the replacement noise it drew (its first draw)
    x_in = torch.where(mask, noised, x_t).double().view(3, L)
    jac = (torch.eye(L, dtype=torch.float64) - s * s * torch.linalg.inv(a * a * SIGMA + s * s * torch.eye(L,
           dtype=torch.float64))) / a                                                      # ∂x̂₀/∂x, symmetric
    x0 = x_in @ jac.T
    k = mask.view(-1)
    residual = torch.where(k, x0 - x.double().view(3, L), torch.zeros_like(x0))
    grad = 2 * residual @ jac
    want_x0 = x0 - (3.0 * a / 2) * grad
    got_x0 = (x_t.double().view(3, L) - s * eps.double().view(3, L)) / a
    torch.testing.assert_close(got_x0[:, ~k], want_x0[:, ~k], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_x0[:, k], x.double().view(3, L)[:, k], rtol=1e-4, atol=1e-4)


def test_repaint_refuses_a_deterministic_sampler_and_spends_resample_times_the_passes():
    sched, x, mask = CosineSchedule(), _data(2), masks.named_mask("right_half", (L,))
    with pytest.raises(DiffuseError, match="RePaint resamples .* DDIM is deterministic"):
        inpaint(CorrelatedGaussianDenoiser(sched), DDIM(10), x, mask, NoiseSource(range(2)), method="repaint")
    den = CorrelatedGaussianDenoiser(sched)
    inpaint(den, DDPM(12), x, mask, NoiseSource(range(2)), method="repaint", jump_length=4, resample=3)
    assert den.nfe == 12 * 3
    with pytest.raises(DiffuseError, match="method must be one of replacement, reconstruction, repaint"):
        inpaint(den, DDPM(12), x, mask, NoiseSource(range(2)), method="blend")
    with pytest.raises(DiffuseError, match="reconstruction_weight must be ≥ 0"):
        KnownRegion(den, x, mask, NoiseSource(range(2)), reconstruction_weight=-1)


# -- SDEdit ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", conf_choices("sampler"))
def test_sdedit_at_strength_one_is_sample(name):
    sched = SCHEDULES["cosine"]
    sampler = load_sampler(name, steps=6)
    den = CorrelatedGaussianDenoiser(sched)
    drawn, _ = sample(den, sampler, NoiseSource(range(10, 13)), (1, L))
    edited, t_start = sdedit(den, sampler, _data(3), 1.0, NoiseSource(range(10, 13)))
    assert torch.equal(drawn, edited) and t_start == pytest.approx(float(sampler.grid(sched)[0]))


def test_sdedit_stays_closer_to_the_input_the_smaller_the_strength():
    sched, x = CosineSchedule(), _data(256, seed=1)
    distances = []
    for strength in (0.1, 0.3, 0.5, 0.8, 1.0):
        out, t_start = sdedit(CorrelatedGaussianDenoiser(sched), DDIM(50), x, strength, NoiseSource(range(256)))
        assert t_start <= strength + 1e-9
        distances.append((out - x).flatten(1).norm(dim=1).mean().item())
    assert all(a < b for a, b in zip(distances, distances[1:])), distances
    assert distances[0] < 0.3 * distances[-1]


def test_sdedit_grid_starts_at_the_strength_and_errors():
    sched, sampler = CosineSchedule(), DDIM(20)
    full = sampler.grid(sched)
    part = sdedit_grid(sampler, sched, 0.5)
    assert float(part[0]) <= 0.5 < float(full[len(full) - len(part) - 1]) and float(part[-1]) == 0
    assert torch.equal(part, full[len(full) - len(part):])
    assert len(sdedit_grid(sampler, sched, 1e-6)) == 2  # the smallest strength still denoises once
    for bad in (0.0, 1.5, -0.2):
        with pytest.raises(DiffuseError, match=r"strength must be in \(0, 1\]"):
            sdedit_grid(sampler, sched, bad)


# -- inversion and interpolation ---------------------------------------------------------------------------
@pytest.mark.parametrize("make", [lambda n: DDIM(n), lambda n: Heun(n), lambda n: DPMSolverPP(n)],
                         ids=["ddim", "heun", "dpm_solver"])
@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_inversion_then_decoding_returns_the_input_closer_with_more_steps(make, schedule):
    sched = SCHEDULES[schedule]
    x = _data(8, seed=2)
    errors = []
    for steps in (10, 40, 160):
        sampler = make(steps)
        den = CorrelatedGaussianDenoiser(sched)
        x_T = invert(den, sampler, x)
        back = sampler.run(den, x_T, sampler.grid(sched), None, None)
        errors.append(((back - x).norm() / x.norm()).item())
    assert errors[2] < errors[0] and errors[2] < 0.1, errors
    # the encoding is a Gaussian-shaped noise at the top of the grid: its spread is the prior's
    assert 0.5 < x_T.std().item() / sched.prior_std < 1.5


def test_inversion_refuses_a_stochastic_sampler():
    with pytest.raises(DiffuseError, match="need a deterministic sampler; DDPM draws noise"):
        invert(CorrelatedGaussianDenoiser(CosineSchedule()), DDPM(10), _data(1))


def test_slerp_keeps_the_ends_and_the_norm():
    g = torch.Generator().manual_seed(0)
    z0, z1 = torch.randn(4, 1, 4096, generator=g), torch.randn(4, 1, 4096, generator=g)
    torch.testing.assert_close(slerp(z0, z1, 0.0), z0)
    torch.testing.assert_close(slerp(z0, z1, 1.0), z1)
    mid = slerp(z0, z1, 0.5)
    assert mid.flatten(1).norm(dim=1).div(64).sub(1).abs().max() < 0.05  # ‖z‖ ≈ √n kept; lerp: ≈ √n/√2
    assert ((z0 + z1) / 2).flatten(1).norm(dim=1).div(64).mean() < 0.75
    torch.testing.assert_close(slerp(z0, 2 * z0, 0.5), 1.5 * z0)  # parallel: linear
    path = slerp_path(z0, z1, 5)
    assert path.shape == (5, *z0.shape) and torch.equal(path[0], slerp(z0, z1, 0.0))
    assert interpolation_weights(3) == [0.0, 0.5, 1.0]
    with pytest.raises(DiffuseError, match="at least 2 frames"):
        interpolation_weights(1)


# -- masks -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dim", [1, 2, 3])
def test_named_masks_in_each_dim(dim):
    spatial = (8,) * dim
    for name in masks.PATTERNS:
        if dim not in masks.DIMS.get(name, (1, 2, 3)):
            with pytest.raises(DiffuseError, match=f"mask {name} is for"):
                masks.named_mask(name, spatial)
            continue
        m = masks.named_mask(name, spatial, batch=3, seed=4)
        assert m.shape == (3, 1, *spatial) and m.dtype == torch.bool
        missing = (~m).float().mean().item()
        assert 0 < missing < 1, name
        if name.endswith("_half"):
            assert missing == 0.5
        if name in ("random", "random_boxes"):
            assert torch.equal(m[1:], masks.named_mask(name, spatial, batch=2, seed=5))  # item i from seed + i
    if dim == 2:
        bottom = masks.named_mask("bottom_half", spatial)[0, 0]
        assert bottom[:4].all() and not bottom[4:].any()  # the top kept, the bottom filled in
    with pytest.raises(DiffuseError, match="mask must be a file or one of"):
        masks.named_mask("diagonal", spatial)


def test_mask_files_and_the_latent_grid(tmp_path):
    from PIL import Image

    array = np.zeros((8, 8), bool)
    array[:, :3] = True
    np.save(tmp_path / "m.npy", array)
    Image.fromarray(array.astype(np.uint8) * 255).save(tmp_path / "m.png")
    for name in ("m.npy", "m.png"):
        m = masks.load_mask(tmp_path / name, (8, 8))
        assert m.shape == (1, 1, 8, 8) and torch.equal(m[0, 0], torch.from_numpy(array))
    with pytest.raises(DiffuseError, match=r"has shape \(8, 8\); the data's items are \[16, 16\]"):
        masks.load_mask(tmp_path / "m.npy", (16, 16))
    np.save(tmp_path / "bad.npy", np.full((8, 8), 0.5))
    with pytest.raises(DiffuseError, match="values must be 0/1"):
        masks.load_mask(tmp_path / "bad.npy", (8, 8))
    with pytest.raises(DiffuseError, match="does not exist"):
        masks.load_mask(tmp_path / "none.npy", (8, 8))
    coarse = masks.to_grid(torch.from_numpy(array)[None, None], (4, 4))
    # a latent cell is known only where all the pixels it covers are: columns 0 (pixels 0, 1) only
    assert coarse[0, 0, :, 0].all() and not coarse[0, 0, :, 1:].any()


class ClassMeansDenoiser:
    """Exact ε̂ for class c's data ~ N(μ_c, τ² I) ([B, 1, L]): ε̂ = σ (x − α μ_c) / (α² τ² + σ²)."""

    def __init__(self, schedule, means, y, tau=0.3):
        self.schedule, self.means, self.y, self.tau, self.nfe = schedule, means, y, tau, 0

    def eps(self, x, t):
        self.nfe += 1
        t = torch.as_tensor(t, dtype=torch.float64)
        a, s = float(self.schedule.alpha(t)), float(self.schedule.sigma(t))
        return s * (x - a * self.means[self.y]) / (a * a * self.tau ** 2 + s * s)


def test_infer_labels_reads_the_class_from_the_known_region_only():
    """Four classes whose means differ only in the first half of the signal; the inputs keep that half and have
    noise elsewhere. The diffusion classifier on the known half finds the class (the exact ε̂ makes it the
    maximum-likelihood choice); on the half where the classes agree it cannot, and guesses."""
    schedule = CosineSchedule()
    g = torch.Generator().manual_seed(0)
    means = torch.zeros(4, 1, L)
    means[:, :, : L // 2] = torch.randn(4, 1, L // 2, generator=g) * 1.5
    y = torch.arange(64) % 4
    x = means[y] + 0.3 * torch.randn(64, 1, L, generator=g)
    x[:, :, L // 2:] = torch.randn(64, 1, L - L // 2, generator=g) * 3  # the unknown half: junk
    calls = []

    def denoiser_for(labels):
        calls.append(1)
        return ClassMeansDenoiser(schedule, means, labels)

    known = torch.zeros(1, 1, L, dtype=torch.bool)
    known[..., : L // 2] = True
    found = infer_labels(denoiser_for, x, known, 4, NoiseSource(range(64)))
    assert torch.equal(found, y)
    # each class at the screening times, then the 3 kept at the refining times: one call per network pass
    assert len(calls) == 4 * len(SCREEN_TIMES) + INFER_KEEP * len(REFINE_TIMES)
    assert infer_passes(4) == len(calls) and infer_passes(2) == 2 * (len(SCREEN_TIMES) + len(REFINE_TIMES))
    blind = infer_labels(denoiser_for, x, ~known, 4, NoiseSource(range(64)))
    assert (blind == y).float().mean() < 0.6  # the other half says nothing of the class


def test_infer_labels_never_reads_the_unknown_region():
    """What the input holds where the mask is False must not sway the class: the network is shown the same
    tensors whatever lies there (the known pixels' mean fills it), so the classes come out the same."""
    schedule = CosineSchedule()
    g = torch.Generator().manual_seed(1)
    means = torch.randn(12, 1, L, generator=g)
    x = means[torch.arange(8) % 12] + 0.3 * torch.randn(8, 1, L, generator=g)
    known = torch.zeros(8, 1, L, dtype=torch.bool)
    known[..., : L // 3] = True
    other = torch.where(known, x, torch.randn(8, 1, L, generator=g) * 5)
    seen = {}

    def spy(key):
        def denoiser_for(labels):
            inner = ClassMeansDenoiser(schedule, means, labels)

            class Spy:
                def eps(self, xt, t):
                    seen.setdefault(key, []).append(xt.clone())
                    return inner.eps(xt, t)
            spy_ = Spy()
            spy_.schedule = schedule
            return spy_
        return denoiser_for

    a = infer_labels(spy("a"), x, known, 12, NoiseSource(range(8)))
    b = infer_labels(spy("b"), other, known, 12, NoiseSource(range(8)))
    assert torch.equal(a, b)
    assert len(seen["a"]) == len(seen["b"]) == 12 * len(SCREEN_TIMES) + INFER_KEEP * len(REFINE_TIMES)
    assert all(torch.equal(p, q) for p, q in zip(seen["a"], seen["b"]))
    assert not torch.equal(x, other)

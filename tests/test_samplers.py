"""Samplers against the papers' update equations and against exact answers on Gaussian data.

With data N(μ, s²) the exact denoiser is closed form, E[ε | x_t] = σ(x_t − αμ)/(α²s² + σ²), so a sampler's
output can be compared with what its own update gives when carried through the Gaussian (deterministic
samplers: exactly, sample by sample) and with μ, s (stochastic samplers, at the step counts they are meant
for). Few-step deterministic samplers legitimately miss s (a probability-flow ODE solved in a few steps carries
its discretisation error into the spread): for them the recurrence is the check, and convergence at the
method's order as steps double.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffuse.diffusion.samplers import (DDIM, DDPM, DPMSolverPP, EulerAncestral, EulerMaruyama, Heun, NoiseSource,
                                        PredictorCorrector, sample)
from diffuse.diffusion.schedules import LinearSchedule, VESDESchedule

from conftest import conf_choices, load_sampler, schedules

# Every conf/sampler/*.yaml on every conf/schedule/*.yaml: a new sampler or schedule is tested with no edit here.
SCHEDULES = schedules()
SAMPLERS = conf_choices("sampler")
# Deterministic at their YAML's settings, with a declared convergence order: the order test runs on these.
ORDERED = [name for name in SAMPLERS if not load_sampler(name).stochastic and load_sampler(name).order]
f64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest's


def _coefs(schedule, t):
    t = torch.as_tensor(t, dtype=f64)
    return float(schedule.alpha(t)), float(schedule.sigma(t))


class GaussianDenoiser:
    """Exact ε̂ for data N(μ, s²) in every coordinate: E[ε | x_t] = σ(x_t − αμ)/(α²s² + σ²)."""

    def __init__(self, schedule, mu: float, s: float):
        self.schedule, self.mu, self.s, self.nfe = schedule, mu, s, 0

    def eps(self, x, t):
        self.nfe += 1
        a, sg = _coefs(self.schedule, t)
        return (sg * (x.double() - a * self.mu) / (a * a * self.s**2 + sg * sg)).to(x.dtype)


class MixtureDenoiser:
    """Exact ε̂ for data Σ_k w_k N(μ_k, s²): the per-component ones weighted by the posterior p(k | x_t)."""

    def __init__(self, schedule, mus, s: float, weights):
        self.schedule, self.mus, self.s, self.nfe = schedule, list(mus), s, 0
        self.log_w = [math.log(w) for w in weights]

    def eps(self, x, t):
        self.nfe += 1
        a, sg = _coefs(self.schedule, t)
        var = a * a * self.s**2 + sg * sg
        diffs = torch.stack([x.double() - a * m for m in self.mus])  # [K, *x.shape]
        log_p = torch.stack([lw - d**2 / (2 * var) for lw, d in zip(self.log_w, diffs)])
        post = torch.softmax(log_p, dim=0)
        return (sg * (post * diffs).sum(0) / var).to(x.dtype)


class WildDenoiser:
    """A nonlinear stand-in network whose x̂₀ leaves [−1, 1] (so clipping matters) for transcription tests."""

    def __init__(self, schedule):
        self.schedule, self.nfe = schedule, 0

    def eps(self, x, t):
        self.nfe += 1
        return 0.8 * torch.tanh(1.5 * x) + 0.1 * math.sin(7 * float(t))


# ----- discrete-time fidelity: the papers' equations, transcribed ---------------------------------------------
def _record(states):
    return lambda i, t, x, x0: states.append(x.clone())


@pytest.mark.parametrize("variance", ["beta", "posterior"])
def test_ddpm_is_ho_et_al_algorithm_2(variance):
    sched = LinearSchedule()
    T = sched.num_timesteps
    den = WildDenoiser(sched)
    x_T = NoiseSource(range(100, 104)).randn((1, 8)).double()
    ours = []
    DDPM(T, variance=variance).run(den, x_T.clone(), sched.timesteps(T), NoiseSource(range(4)), _record(ours))

    # Algorithm 2: x_{t−1} = 1/√α_t (x_t − (1−α_t)/√(1−ᾱ_t) ε_θ(x_t, t)) + σ_t z, z = 0 at t = 1
    betas = np.linspace(1e-4, 0.02, T)
    alphas = 1 - betas
    abar = np.cumprod(alphas)
    x, noise = x_T.clone(), NoiseSource(range(4))
    for step, t in enumerate(range(T, 0, -1)):  # the paper's 1-based t
        i = t - 1
        eps = den.eps(x, t / T)
        if variance == "beta":
            sigma_t = math.sqrt(betas[i])
        else:  # β̃_t = (1 − ᾱ_{t−1})/(1 − ᾱ_t) β_t
            sigma_t = math.sqrt((1 - abar[i - 1]) / (1 - abar[i]) * betas[i]) if t > 1 else 0.0
        z = noise.randn_like(x) if t > 1 else torch.zeros_like(x)
        x = 1 / math.sqrt(alphas[i]) * (x - (1 - alphas[i]) / math.sqrt(1 - abar[i]) * eps) + sigma_t * z
        assert torch.allclose(ours[step], x, rtol=1e-9, atol=1e-9), f"step t={t}"
    assert len(ours) == T


def test_ddpm_clip_is_the_mnist_setups_sample_clip():
    sched = LinearSchedule()
    T = sched.num_timesteps
    den = WildDenoiser(sched)
    x_T = NoiseSource(range(50, 53)).randn((1, 8)).double()
    ours, clipped = [], []
    sampler = load_sampler("ddpm_clip")
    sampler.run(den, x_T.clone(), sampler.grid(sched), NoiseSource(range(3)),
                lambda i, t, x, x0: ours.append(x.clone()))

    # the MNIST setup's _reverse_diffusion_with_clip (0-based t), noise drawn every step as it does
    betas = torch.linspace(1e-4, 0.02, T, dtype=f64)
    alphas = 1 - betas
    abar = torch.cumprod(alphas, 0)
    x, noise = x_T.clone(), NoiseSource(range(3))
    for step, t in enumerate(range(T - 1, -1, -1)):
        pred = den.eps(x, (t + 1) / T)
        x_0_pred = torch.sqrt(1.0 / abar[t]) * x - torch.sqrt(1.0 / abar[t] - 1.0) * pred
        clipped.append(bool((x_0_pred.abs() > 1).any()))
        x_0_pred = x_0_pred.clamp(-1.0, 1.0)
        if t > 0:
            mean = (betas[t] * torch.sqrt(abar[t - 1]) / (1.0 - abar[t])) * x_0_pred + \
                   ((1.0 - abar[t - 1]) * torch.sqrt(alphas[t]) / (1.0 - abar[t])) * x
            std = torch.sqrt(betas[t] * (1.0 - abar[t - 1]) / (1.0 - abar[t]))
            x = mean + std * noise.randn_like(x)
        else:
            x = (betas[t] / (1.0 - abar[t])) * x_0_pred
        assert torch.allclose(ours[step], x, rtol=1e-9, atol=1e-9), f"step t={t}"
    assert sum(clipped) > 100  # the clamp was active


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("steps", [1000, 50])
def test_ddim_is_song_et_al_eq_12(eta, steps):
    """The authors' `generalized_steps` on their "uniform" skip grid range(0, T, T // S) (our "leading")."""
    sched = LinearSchedule()
    T = sched.num_timesteps
    den = WildDenoiser(sched)
    x_T = NoiseSource(range(7, 11)).randn((1, 8)).double()
    ours = []
    sampler = DDIM(steps, spacing="leading", eta=eta)
    sampler.run(den, x_T.clone(), sampler.grid(sched), NoiseSource(range(4)), _record(ours))

    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, T))
    seq = list(range(0, T, T // steps))
    seq_next = [-1] + seq[:-1]
    x, noise = x_T.clone(), NoiseSource(range(4))
    for step, (i, j) in enumerate(zip(reversed(seq), reversed(seq_next))):
        at, at_next = abar[i], (abar[j] if j >= 0 else 1.0)
        e = den.eps(x, (i + 1) / T)
        x0_t = (x - e * math.sqrt(1 - at)) / math.sqrt(at)
        c1 = eta * math.sqrt((1 - at / at_next) * (1 - at_next) / (1 - at))  # σ_t(η), eq. 16
        c2 = math.sqrt((1 - at_next) - c1**2)
        x = math.sqrt(at_next) * x0_t + c2 * e
        if c1 > 0:
            x = x + c1 * noise.randn_like(x)
        assert torch.allclose(ours[step], x, rtol=1e-9, atol=1e-9), f"step {step} (index {i})"
    assert len(ours) == steps


def test_ddim_eta_1_on_the_full_grid_is_ddpm_with_posterior_variance():
    sched = LinearSchedule()
    den = WildDenoiser(sched)
    x_T = NoiseSource(range(3)).randn((1, 16)).double()
    grid = sched.timesteps(1000)
    a = DDIM(1000, eta=1.0).run(den, x_T.clone(), grid, NoiseSource(range(9, 12)), None)
    b = DDPM(1000, variance="posterior").run(den, x_T.clone(), grid, NoiseSource(range(9, 12)), None)
    assert torch.allclose(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("num_steps", [500, 37])
def test_euler_maruyama_on_vesde_is_the_conditional_setups_sampler(num_steps):
    sched = VESDESchedule()
    den = MixtureDenoiser(sched, [-0.5, 0.4], 0.2, [0.4, 0.6])
    shape = (1, 8)

    # ours, as `diffuse sample sampler=euler_maruyama sampler.final_denoise=false` runs it (fp64, to compare tightly)
    sampler = load_sampler("euler_maruyama", steps=num_steps, final_denoise=False)
    ours = sampler.run(den, NoiseSource(range(5)).randn(shape).double() * sched.prior_std, sampler.grid(sched),
                       NoiseSource(range(5, 10)), None)

    # the conditional setup's Euler_Maruyama_sampler, with its score model s(x, t) = −ε̂/σ(t)
    def marginal_prob_std(t):
        return torch.sqrt((25.0 ** (2 * t) - 1.0) / 2.0 / math.log(25.0))

    def diffusion_coeff(t):
        return 25.0**t

    def score_model(x, t):
        return -den.eps(x, t) / marginal_prob_std(t)

    eps = 1e-3
    t = torch.ones((), dtype=f64)
    init_x = NoiseSource(range(5)).randn(shape).double() * marginal_prob_std(t)
    time_steps = torch.linspace(1.0, eps, num_steps, dtype=f64)
    step_size = time_steps[0] - time_steps[1]
    x, noise = init_x, NoiseSource(range(5, 10))
    for time_step in time_steps:
        g = diffusion_coeff(time_step)
        mean_x = x + (g**2) * score_model(x, time_step) * step_size
        x = mean_x + torch.sqrt(step_size) * g * noise.randn_like(x)
    assert torch.allclose(ours, mean_x, rtol=1e-9, atol=1e-9)  # the last step: its mean, no noise


@pytest.mark.parametrize("name", ["euler_maruyama"])
def test_final_denoise_returns_the_last_evaluations_x0(name):
    """final_denoise (the YAML default): the run is the same up to the last step, which returns x̂₀ = (x − σ ε̂)/α
    of that step's own evaluation instead of the step's mean (score_sde's noise_removal)."""
    sched = VESDESchedule()
    den = MixtureDenoiser(sched, [-0.5, 0.4], 0.2, [0.4, 0.6])
    x_T = NoiseSource(range(4)).randn((1, 8)).double() * sched.prior_std
    seen = []
    plain = load_sampler(name, steps=40, final_denoise=False)
    plain.run(den, x_T.clone(), plain.grid(sched), NoiseSource(range(4, 8)), lambda i, t, x, x0: seen.append((x, x0)))
    final = load_sampler(name, steps=40)
    assert final.final_denoise
    out = final.run(den, x_T.clone(), final.grid(sched), NoiseSource(range(4, 8)), None)
    assert torch.equal(out, seen[-1][1])  # the last step's x̂₀, bit for bit (same process, same shapes)
    assert not torch.equal(out, seen[-1][0])


# ----- Gaussian data with the exact denoiser ------------------------------------------------------------------
MU, S = 0.25, 0.25  # N(μ, s²): inside [−1, 1] (3 s from the edge), so ddpm_clip's clamp is harmless
SHAPE = (1, 1024)  # 16 seeds × 1024 iid coordinates = 16384 samples of 1-D data
N_SEEDS = 16


class Affine:
    """x = k·x_T + m: every update of a deterministic sampler, with the exact Gaussian ε̂, is affine in x_T."""

    def __init__(self, k, m=0.0):
        self.k, self.m = k, m

    def __add__(self, o):
        return Affine(self.k + o.k, self.m + o.m) if isinstance(o, Affine) else Affine(self.k, self.m + o)

    __radd__ = __add__

    def __sub__(self, o):
        return self + (-1.0) * o

    def __mul__(self, c):
        return Affine(self.k * c, self.m * c)

    __rmul__ = __mul__

    def __truediv__(self, c):
        return Affine(self.k / c, self.m / c)


def gaussian_eps(x: Affine, a, sg, mu=MU, s=S) -> Affine:
    return (x - a * mu) * (sg / (a * a * s * s + sg * sg))


def recurrence(sampler, schedule, grid) -> Affine | None:
    """The method's own update (as in its paper) carried through the Gaussian, as a scalar affine map.

    Written from the papers, independently of samplers.py: DDIM eq. 12 (η = 0); DPM-Solver++ Algorithm 2
    (first-order first and final steps); EDM Algorithm 1 in σ̃ = σ/α, x̃ = x/α (Euler where σ̃ > 80).
    """
    ab = [_coefs(schedule, t) for t in grid]
    x = Affine(1.0)
    if isinstance(sampler, (DDIM, EulerAncestral)):  # Euler ancestral at η = 0 is DDIM's step
        for (a, sg), (a2, sg2) in zip(ab[:-1], ab[1:]):
            x0 = (x - sg * gaussian_eps(x, a, sg)) / a
            x = a2 * x0 + sg2 * gaussian_eps(x, a, sg)
    elif isinstance(sampler, DPMSolverPP):
        prev = None
        for (a, sg), (a2, sg2) in zip(ab[:-1], ab[1:]):
            x0 = (x - sg * gaussian_eps(x, a, sg)) / a
            if sg2 == 0:
                x = a2 * x0
                continue
            h = math.log(a2 / sg2) - math.log(a / sg)
            d = x0 if prev is None else (1 + h / (2 * h_prev)) * x0 - (h / (2 * h_prev)) * prev  # 1/(2r), r = h_{i−1}/h_i
            x = (sg2 / sg) * x - a2 * (math.exp(-h) - 1) * d
            prev, h_prev = x0, h
    elif isinstance(sampler, Heun):
        sig = [sg / a for a, sg in ab]
        xt = x / ab[0][0]

        def d_of(xt_, i):  # dx̃/dσ̃ = (x̃ − D(x̃; σ̃))/σ̃, D(x̃; σ̃) = μ + s²/(s² + σ̃²)(x̃ − μ)
            return (xt_ - MU) * (sig[i] / (S * S + sig[i] ** 2))

        for i in range(len(grid) - 1):
            d = d_of(xt, i)
            nxt = xt + (sig[i + 1] - sig[i]) * d
            if sig[i + 1] > 0 and sig[i] <= 80.0:
                nxt = xt + (sig[i + 1] - sig[i]) * (d + d_of(nxt, i + 1)) * 0.5
            xt = nxt
        x = xt * ab[-1][0]
    else:
        return None
    return x


@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("sched_name", SCHEDULES)
def test_gaussian_data(sched_name, name):
    sched = SCHEDULES[sched_name]
    sampler = load_sampler(name)
    if sampler.stochastic:  # at the step counts they are meant for: their YAML's, at least 500
        sampler = load_sampler(name, steps=max(sampler.steps, 500))
    den = GaussianDenoiser(sched, MU, S)
    noise = NoiseSource(range(N_SEEDS))
    out, _ = sample(den, sampler, noise, SHAPE)
    x_T = NoiseSource(range(N_SEEDS)).randn(SHAPE) * sched.prior_std
    mean, std = out.mean().item(), out.std().item()
    if not sampler.stochastic:
        # sample by sample, what the method's update gives (tight: only fp32 rounding separates them)
        rec = recurrence(sampler, sched, sampler.grid(sched))
        assert rec is not None, f"{name}: write the paper's update for it in recurrence()"
        expected = rec.k * x_T.double() + rec.m
        assert torch.allclose(out.double(), expected, atol=2e-5), f"max diff {(out - expected).abs().max():.2e}"
        assert std == pytest.approx(abs(rec.k) * x_T.std().item(), rel=1e-4)
        # …and how close that is to s at the default steps (the closed-form values: DDIM-50 on linear 0.90 s)
        band = {DDIM: 0.12, Heun: 0.08, DPMSolverPP: 0.04}.get(type(sampler), 0.12)
        assert abs(std / S - 1) < band, std
        assert mean == pytest.approx(MU, abs=0.02 if sched_name == "vesde" else 0.005)  # VE: prior ignores μ
    else:
        # stochastic samplers at ≥ 500 steps (ddpm: 1000): the data distribution within a few percent
        assert mean == pytest.approx(MU, abs=0.01)
        assert std == pytest.approx(S, rel=0.03)
    assert den.nfe == nfe_of(sampler, sched)


def nfe_of(sampler, schedule) -> int:
    """Network evaluations per sample: steps, except Heun (2 per step but the last and those above σ̃ = 80)
    and predictor-corrector (1 + corrector_steps per step)."""
    grid = sampler.grid(schedule)
    if isinstance(sampler, Heun):
        sig = [s / a for a, s in (_coefs(schedule, t) for t in grid[:-1])]
        return 2 * sampler.steps - 1 - sum(1 for v in sig[:-1] if v > 80.0)
    if isinstance(sampler, PredictorCorrector):
        return sampler.steps * (1 + sampler.corrector_steps)
    return sampler.steps


@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("sched_name", SCHEDULES)
def test_gaussian_mixture_mode_fractions(sched_name, name):
    """Two modes, 30 % / 70 %: each sampler puts the right fraction of samples in each."""
    sched = SCHEDULES[sched_name]
    den = MixtureDenoiser(sched, [-0.5, 0.5], 0.15, [0.3, 0.7])
    out, _ = sample(den, load_sampler(name), NoiseSource(range(8)), (1, 1024))
    upper = (out > 0).float().mean().item()
    assert upper == pytest.approx(0.7, abs=0.03)
    # and the modes sit where they should
    assert out[out > 0].mean().item() == pytest.approx(0.5, abs=0.03)
    assert out[out < 0].mean().item() == pytest.approx(-0.5, abs=0.03)


# ----- convergence order ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,spacing", [(name, None) for name in ORDERED] + [("ddim", "logsnr")])
@pytest.mark.parametrize("sched_name", SCHEDULES)
def test_convergence_order(sched_name, name, spacing):
    """The error against the exact flow falls as steps^−order as steps double (20 → 40 → 80 → 160).

    Reference: the exact probability-flow map, which scales x − αμ by √(v(t')/v(t_max)), v = α²s² + σ².
    Grids whose last evaluation time t_last is fixed (logsnr, karras) share their final step t_last → 0
    (x̂₀, first order, the same for every step count): there the reference is the exact map to t_last
    followed by that step. The trailing grid (ddim's default) ends at t_last = 1/steps: the map to t = 0.
    """
    sched = SCHEDULES[sched_name]
    s = 0.3
    errors = []
    for steps in (20, 40, 80, 160):
        overrides = {"steps": steps} if spacing is None else {"steps": steps, "spacing": spacing}
        sampler = load_sampler(name, **overrides)
        order = sampler.order  # as the class declares it
        grid = sampler.grid(sched)
        out = sampler.run(GaussianDenoiser(sched, 0.0, s), torch.ones(1, 1, 1, dtype=f64), grid, None, None)
        (a0, s0), (a1, s1) = _coefs(sched, grid[0]), _coefs(sched, grid[-2])
        v0, v1 = a0**2 * s**2 + s0**2, a1**2 * s**2 + s1**2
        if sched.num_timesteps and sampler.spacing == "auto":
            exact = math.sqrt(s**2 / v0)
        else:
            exact = math.sqrt(v1 / v0) * a1 * s**2 / v1
        errors.append(abs(out.item() / exact - 1))
    orders = [math.log2(e1 / e2) for e1, e2 in zip(errors, errors[1:])]
    assert all(order - 0.2 < p < order + 0.45 for p in orders), (errors, orders)


# ----- the sampler contract ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("sched_name", SCHEDULES)
def test_callback_once_per_interval_and_trajectory(sched_name, name):
    sched = SCHEDULES[sched_name]
    sampler = load_sampler(name, steps=6)
    grid = sampler.grid(sched)
    calls = []
    den = GaussianDenoiser(sched, MU, S)
    x = sampler(den, NoiseSource(range(2)).randn((1, 4)) * sched.prior_std, NoiseSource(range(2)),
                lambda i, t, x_, x0: calls.append((i, t, x_.clone(), x0.shape)))
    assert [c[0] for c in calls] == list(range(len(grid) - 1)) == list(range(6))
    assert [c[1] for c in calls] == pytest.approx(grid[1:].tolist())
    assert calls[-1][1] == 0.0 and torch.equal(calls[-1][2], x)
    assert all(c[3] == x.shape for c in calls)
    out, traj = sample(den, sampler, NoiseSource(range(2)), (1, 4), trajectory=True)
    assert len(traj.states) == len(traj.times) == len(grid) and traj.times == pytest.approx(grid.tolist())
    assert torch.equal(traj.states[-1], out)
    _, traj4 = sample(den, sampler, NoiseSource(range(2)), (1, 4), trajectory=4)
    assert len(traj4.states) == 4 and traj4.times[0] == grid[0].item() and traj4.times[-1] == 0.0


@pytest.mark.parametrize("spacing", ["auto", "linspace", "karras", "logsnr"])
@pytest.mark.parametrize("sched_name", SCHEDULES)
def test_every_sampler_runs_with_few_steps_on_every_grid(sched_name, spacing):
    sched = SCHEDULES[sched_name]
    den = GaussianDenoiser(sched, MU, S)
    for name in SAMPLERS:
        for steps in (1, 2, 3):
            out, _ = sample(den, load_sampler(name, steps=steps, spacing=spacing), NoiseSource(range(2)), (1, 8))
            assert out.shape == (2, 1, 8) and torch.isfinite(out).all(), (name, steps)


@pytest.mark.parametrize("name", SAMPLERS + ["heun_churn"])
def test_samples_do_not_depend_on_the_batch_they_are_drawn_in(name):
    sched = LinearSchedule()
    sampler = Heun(8, s_churn=10.0) if name == "heun_churn" else load_sampler(name, steps=8)
    den = MixtureDenoiser(sched, [-0.5, 0.5], 0.15, [0.3, 0.7])
    together, _ = sample(den, sampler, NoiseSource(range(6)), (1, 64))
    first, _ = sample(den, sampler, NoiseSource(range(2)), (1, 64))
    rest, _ = sample(den, sampler, NoiseSource(range(2, 6)), (1, 64))
    assert torch.allclose(together, torch.cat([first, rest]), atol=1e-6)
    if sampler.stochastic:
        other, _ = sample(den, sampler, NoiseSource(range(6, 12)), (1, 64))
        assert not torch.allclose(other, together)


def test_heun_churn_adds_noise_where_asked():
    """Karras et al. Algorithm 2: churn only where s_tmin ≤ σ̃ ≤ s_tmax; s_churn = 0 is Algorithm 1."""
    sched = VESDESchedule()
    den = GaussianDenoiser(sched, MU, S)
    x = NoiseSource(range(4)).randn((1, 256)) * sched.prior_std
    plain = Heun(18, spacing="karras")(den, x.clone())
    assert not plain.isnan().any() and not Heun(18).stochastic
    outside = Heun(18, spacing="karras", s_churn=40.0, s_tmin=100.0, s_tmax=200.0)
    assert torch.allclose(outside(den, x.clone(), NoiseSource(range(4))), plain)
    churned = Heun(18, spacing="karras", s_churn=40.0, s_tmin=0.05, s_tmax=50.0, s_noise=1.003)
    out = churned(den, x.clone(), NoiseSource(range(4)))
    assert churned.stochastic and not torch.allclose(out, plain)
    assert out.std().item() == pytest.approx(S, rel=0.1)


class ClampedDenoiser:
    """ε̂ of the denoiser whose x̂₀ is clamped to [−1, 1]: ε̂' = (x − α·clamp(x̂₀))/σ."""

    def __init__(self, inner):
        self.inner, self.schedule = inner, inner.schedule

    def eps(self, x, t):
        a, s = _coefs(self.schedule, t)
        x0 = ((x - s * self.inner.eps(x, t)) / a).clamp(-1, 1)
        return (x - a * x0) / s


@pytest.mark.parametrize("name", SAMPLERS)
def test_clip_x0_runs_the_sampler_on_the_clamped_denoiser(name):
    sched = LinearSchedule()
    den = WildDenoiser(sched)
    clipped = load_sampler(name, steps=12, clip_x0=True)
    plain = load_sampler(name, steps=12, clip_x0=False)
    x0s = []
    a = clipped(den, NoiseSource(range(3)).randn((1, 32)), NoiseSource(range(3, 6)),
                lambda i, t, x, x0: x0s.append(x0))
    b = plain(ClampedDenoiser(den), NoiseSource(range(3)).randn((1, 32)), NoiseSource(range(3, 6)))
    assert torch.allclose(a, b, atol=1e-5)
    assert all(x0.abs().max() <= 1 for x0 in x0s)
    if isinstance(clipped, (DDPM, DDIM, DPMSolverPP, Heun, EulerAncestral)):  # their last step returns x̂₀ itself
        assert a.abs().max() <= 1 + 1e-6


def test_bad_sampler_settings():
    with pytest.raises(ValueError, match="eta"):
        DDIM(10, eta=1.5)
    with pytest.raises(ValueError, match="variance"):
        DDPM(10, variance="large")
    with pytest.raises(ValueError, match="exceeds"):
        DDIM(1001).grid(LinearSchedule())
    # any steps ≤ T on a discrete schedule, any steps on a continuous one
    for steps in (1, 2, 3, 999, 1000):
        assert len(DDIM(steps).grid(LinearSchedule())) == steps + 1
    assert len(EulerMaruyama(1234).grid(VESDESchedule())) == 1235
    assert isinstance(load_sampler("dpm_solver"), DPMSolverPP)


def test_dynamic_threshold_is_imagens():
    """Saharia et al. 2022 §2.3, written out with numpy: s = max(1, percentile(|x̂₀|, p)), clip(x̂₀, −s, s)/s."""
    import numpy as np
    from diffuse.diffusion.samplers import dynamic_threshold
    x0 = torch.randn(5, 2, 6, 6, generator=torch.Generator().manual_seed(0)) * torch.tensor([0.3, 1, 2, 4, 8]).view(5, 1, 1, 1)
    got = dynamic_threshold(x0, 0.995).numpy()
    for i, sample in enumerate(x0.numpy()):
        s = max(1.0, np.percentile(np.abs(sample), 99.5))
        np.testing.assert_allclose(got[i], np.clip(sample, -s, s) / s, rtol=1e-6, atol=1e-7)
    inside = x0[:1].clamp(-0.9, 0.9)
    assert torch.equal(dynamic_threshold(inside, 0.995), inside)  # |x̂₀| ≤ 1 already: unchanged
    assert got.min() >= -1 and got.max() <= 1


def test_dynamic_threshold_keeps_samples_in_range():
    from diffuse.diffusion.guidance import Denoiser
    from diffuse.diffusion.samplers import DDIM
    schedule = LinearSchedule()
    wild = lambda x, t, y: 3.0 * torch.ones_like(x)  # noqa: E731 - an ε̂ far off: x̂₀ far outside [−1, 1]
    x = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    out = DDIM(steps=10, dynamic_threshold=0.995)(Denoiser(wild, schedule), x)
    assert out.abs().max() <= 1 + 1e-5
    with pytest.raises(ValueError, match="dynamic_threshold"):
        DDIM(dynamic_threshold=1.5)


def test_euler_ancestral_is_ddim_at_eta_0_and_adds_the_ancestral_noise():
    """k-diffusion's get_ancestral_step in σ̃ = σ/α: at η = 0 the step is the Euler step of the probability-flow
    ODE, which is DDIM's (η = 0) on the same grid; at η = 1 one step from σ̃_i to σ̃_{i+1} adds noise of std
    α_{i+1}·σ̃_up, σ̃_up = σ̃_{i+1}·√(1 − σ̃_{i+1}²/σ̃_i²)."""
    for sched in SCHEDULES.values():
        den = GaussianDenoiser(sched, MU, S)
        x = NoiseSource(range(4)).randn((1, 64)) * sched.prior_std
        ea, ddim = EulerAncestral(20, "logsnr", eta=0.0), DDIM(20, "logsnr")
        assert not ea.stochastic and ea.order == 1
        torch.testing.assert_close(ea(den, x.clone()), ddim(den, x.clone()), rtol=1e-4, atol=1e-4)
    sched = LinearSchedule()
    den = GaussianDenoiser(sched, MU, S)
    grid = torch.tensor([0.6, 0.3], dtype=f64)  # one step, not to t = 0
    x = torch.zeros(1, 1, 20000)
    one = EulerAncestral(1, eta=1.0).run(den, x, grid, NoiseSource(range(1)), None)
    (a_t, s_t), (a_s, s_s) = _coefs(sched, grid[0]), _coefs(sched, grid[1])
    sig_t, sig_s = s_t / a_t, s_s / a_s
    up = sig_s * math.sqrt(1 - sig_s**2 / sig_t**2)
    down = math.sqrt(sig_s**2 - up**2)
    mean = a_s * (x / a_t + (down - sig_t) * den.eps(x, grid[0]))
    assert (one - mean).std().item() == pytest.approx(a_s * up, rel=0.02)

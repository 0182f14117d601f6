"""Noise schedules against their published formulas, the SDE identities, and the sampling grids."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffuse.diffusion.schedules import GRID_SIGMA_MAX, CosineSchedule, LinearSchedule, VESDESchedule

T = 1000
f64 = torch.float64


def grid_times(indices: list[int]) -> list[float]:
    """Discrete indices i (0-based, as in diffusers) → our times (i+1)/T, plus the final 0."""
    return [(i + 1) / T for i in indices] + [0.0]


# ----- the tables -----------------------------------------------------------------------------------------
def test_linear_table_is_the_product_of_one_minus_beta():
    sched = LinearSchedule()
    betas = np.linspace(1e-4, 0.02, T)  # Ho et al. 2020, §4
    prod, expected = 1.0, []
    for b in betas:
        prod *= 1.0 - b
        expected.append(prod)
    assert torch.allclose(sched.alphas_cumprod, torch.tensor(expected, dtype=f64), rtol=1e-12, atol=0)
    assert sched.betas[0].item() == pytest.approx(1e-4, rel=1e-9)
    assert sched.betas[-1].item() == pytest.approx(0.02, rel=1e-9)
    # α(t_i)² = ᾱ_i and σ² = 1 − ᾱ exactly at every grid point t_i = (i+1)/T
    t = torch.arange(1, T + 1, dtype=f64) / T
    assert torch.allclose(sched.alpha(t) ** 2, sched.alphas_cumprod, rtol=1e-12, atol=0)
    assert torch.allclose(sched.sigma(t) ** 2, 1 - sched.alphas_cumprod, rtol=1e-10, atol=0)
    assert sched.alpha(torch.tensor(0.0, dtype=f64)).item() == 1.0
    assert sched.sigma(torch.tensor(0.0, dtype=f64)).item() == 0.0


def test_cosine_table_matches_nichol_dhariwal():
    sched = CosineSchedule()
    s = 0.008
    f = [math.cos((i / T + s) / (1 + s) * math.pi / 2) ** 2 for i in range(T + 1)]  # eq. 17
    betas = [min(1 - f[i + 1] / f[i], 0.999) for i in range(T)]  # β_t = 1 − ᾱ_t/ᾱ_{t−1}, clipped
    expected = np.cumprod([1 - b for b in betas])
    assert torch.allclose(sched.alphas_cumprod, torch.tensor(expected, dtype=f64), rtol=1e-10, atol=1e-300)
    # unclipped, ᾱ_i = f((i+1)/T)/f(0): the last β is the clipped one
    assert torch.allclose(sched.alphas_cumprod[:-1], torch.tensor([f[i + 1] / f[0] for i in range(T - 1)], dtype=f64),
                          rtol=1e-9)
    assert sched.betas[-1].item() == pytest.approx(0.999)
    assert (sched.betas[:-1] < 0.999).all()


def published_marginal_prob_std(t, sigma=25.0):
    """The conditional setup (Song's tutorial): std of x_t | x_0 under dx = σ^t dw."""
    t = np.asarray(t, dtype=np.float64)
    return np.sqrt((sigma ** (2 * t) - 1.0) / 2.0 / np.log(sigma))


def published_diffusion_coeff(t, sigma=25.0):
    return sigma ** np.asarray(t, dtype=np.float64)


def test_vesde_matches_the_conditional_setup():
    sched = VESDESchedule()
    t = np.array([1e-5, 1e-3, 0.1, 0.37, 0.5, 0.9, 1.0])
    tt = torch.tensor(t, dtype=f64)
    np.testing.assert_allclose(sched.sigma(tt).numpy(), published_marginal_prob_std(t), rtol=1e-12)
    np.testing.assert_allclose(sched.diffusion_coeff(tt).numpy(), published_diffusion_coeff(t), rtol=1e-12)
    assert (sched.alpha(tt) == 1).all()
    assert sched.prior_std == pytest.approx(float(published_marginal_prob_std(1.0)), rel=1e-12)
    assert sched.t_min == 1e-5 and VESDESchedule(sigma=10.0, eps=1e-3).t_min == 1e-3
    # training times: the conditional setup's `torch.rand(B) * (1 - eps) + eps`
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    ours = sched.sample_training_times(512, generator=g1)
    published = torch.rand(512, generator=g2) * (1.0 - 1e-5) + 1e-5
    assert torch.equal(ours, published)


def test_discrete_training_times_are_grid_points():
    t = LinearSchedule().sample_training_times(4096, generator=torch.Generator().manual_seed(0))
    idx = t * T
    assert torch.allclose(idx, idx.round()) and idx.min() >= 1 and idx.max() <= T
    assert len(torch.unique(idx.round())) > 900  # uniform over the T steps


# ----- the SDE --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sched", [LinearSchedule(), CosineSchedule(), VESDESchedule()], ids=["linear", "cosine", "vesde"])
def test_sde_coefficients_satisfy_g2_equals_dvar_minus_2_f_var(sched):
    """f = d log α/dt and g² = dσ²/dt − 2fσ², checked by central differences inside the cells."""
    if sched.num_timesteps:
        t = (torch.tensor([3, 100, 500, 900, 990], dtype=f64) + 0.5) / T  # mid-cell: α is smooth there
        h = 0.1 / T
    else:
        t = torch.tensor([0.01, 0.2, 0.5, 0.8, 0.99], dtype=f64)
        h = 1e-6
    f_fd = (torch.log(sched.alpha(t + h)) - torch.log(sched.alpha(t - h))) / (2 * h)
    dvar_fd = (sched.sigma(t + h) ** 2 - sched.sigma(t - h) ** 2) / (2 * h)
    f, g2 = sched.drift_coeff(t), sched.diffusion_coeff_sq(t)
    assert torch.allclose(f, f_fd, rtol=1e-6, atol=1e-9)
    assert torch.allclose(g2, dvar_fd - 2 * f_fd * sched.sigma(t) ** 2, rtol=1e-6)
    assert torch.allclose(sched.diffusion_coeff(t), g2.sqrt())


def test_discrete_sde_coefficients_at_grid_points_use_the_cell_below():
    """At t_i = (i+1)/T a reverse step crosses the cell (i/T, (i+1)/T]: f·(1/T) = log √(1 − β_i), g²/T ≈ β_i."""
    sched = LinearSchedule()
    i = torch.tensor([0, 10, 499, 998, 999])
    t = (i + 1).to(f64) / T
    betas = sched.betas[i]
    assert torch.allclose(sched.drift_coeff(t) / T, 0.5 * torch.log1p(-betas), rtol=1e-9)
    assert torch.allclose(sched.diffusion_coeff_sq(t) / T, -torch.log1p(-betas), rtol=1e-9)
    assert torch.allclose(sched.diffusion_coeff_sq(t) / T, betas, rtol=0.011)  # the VP-SDE's β(t)·dt


@pytest.mark.parametrize("sched", [LinearSchedule(), CosineSchedule(), VESDESchedule()], ids=["linear", "cosine", "vesde"])
def test_time_at_log_snr_inverts_log_snr(sched):
    t = torch.tensor([sched.t_min, 0.003, 0.25, 0.5, 0.77, 0.999, 1.0], dtype=f64)
    assert torch.allclose(sched.time_at_log_snr(sched.log_snr(t)), t, rtol=1e-9, atol=1e-12)


# ----- grids ----------------------------------------------------------------------------------------------
def test_discrete_grids_match_hand_written_index_lists():
    sched = LinearSchedule()
    expected = {  # diffusers' index lists (0-based) for T = 1000, 10 steps
        "linspace": [999, 888, 777, 666, 555, 444, 333, 222, 111, 0],
        "leading": [900, 800, 700, 600, 500, 400, 300, 200, 100, 0],
        "trailing": [999, 899, 799, 699, 599, 499, 399, 299, 199, 99],
    }
    for spacing, idx in expected.items():
        grid = sched.timesteps(10, spacing)
        assert grid.tolist() == pytest.approx(grid_times(idx), abs=1e-15), spacing
    assert sched.timesteps(10).tolist() == pytest.approx(grid_times(expected["trailing"]))  # auto = trailing
    assert sched.timesteps(3, "trailing").tolist() == pytest.approx(grid_times([999, 666, 332]))
    assert sched.timesteps(3, "linspace").tolist() == pytest.approx(grid_times([999, 500, 0]))  # round(499.5) = 500
    assert sched.timesteps(1, "trailing").tolist() == [1.0, 0.0]
    assert sched.timesteps(1, "linspace").tolist() == [1.0, 0.0]  # one step starts from pure noise
    full = sched.timesteps(T)
    assert full.tolist() == pytest.approx(grid_times(list(range(T - 1, -1, -1))))  # every step: Algorithm 2's grid
    with pytest.raises(ValueError, match="exceeds"):
        sched.timesteps(T + 1)
    with pytest.raises(ValueError, match="unknown spacing"):
        sched.timesteps(10, "nope")
    with pytest.raises(ValueError, match="≥ 1"):
        sched.timesteps(0)


def test_discrete_grids_agree_with_diffusers():
    diffusers = pytest.importorskip("diffusers")
    sched = LinearSchedule()
    for spacing in ("linspace", "leading", "trailing"):
        for steps in (1, 7, 10, 50, 999):
            if (spacing, steps) == ("linspace", 1):
                continue  # diffusers: linspace(0, 999, 1) = [0], one step from t = 1/T; ours starts at t = 1
            ref = diffusers.DDIMScheduler(num_train_timesteps=T, beta_schedule="linear", timestep_spacing=spacing)
            ref.set_timesteps(steps)
            assert sched.timesteps(steps, spacing).tolist() == pytest.approx(grid_times(ref.timesteps.tolist())), \
                (spacing, steps)


def test_continuous_grids():
    ve = VESDESchedule()
    lin = ve.timesteps(5, "linspace")
    assert lin.tolist() == pytest.approx([1.0, 0.75 + 0.25e-5, 0.5 + 0.5e-5, 0.25 + 0.75e-5, 1e-5, 0.0])
    with pytest.raises(ValueError, match="continuous schedule"):
        ve.timesteps(5, "trailing")
    for sched in (ve, LinearSchedule(), CosineSchedule()):
        for steps in (6, 20):
            logsnr = sched.timesteps(steps, "logsnr")
            karras = sched.timesteps(steps, "karras")
            for grid in (logsnr, karras):
                assert grid[0] == sched.t_max and grid[-2] == sched.t_min and grid[-1] == 0
                assert (grid[1:] < grid[:-1]).all() and len(grid) == steps + 1
            lam = sched.log_snr(logsnr[:-1])
            sig = torch.exp(-lam / 2)  # σ̃ = σ/α
            sig_k = torch.exp(-sched.log_snr(karras[:-1]) / 2)
            if sig[0] > GRID_SIGMA_MAX:  # linear (157), cosine (2·10⁴): t_max, then the grid from σ̃ = 80 down
                lam, sig, sig_k = lam[1:], sig[1:], sig_k[1:]
                assert sig[0].item() == pytest.approx(GRID_SIGMA_MAX) and sig_k[0].item() == pytest.approx(GRID_SIGMA_MAX)
            assert torch.allclose(lam.diff(), lam.diff().mean().expand(len(lam) - 1), rtol=1e-8)  # uniform in λ
            root = sig_k ** (1 / 7)  # Karras et al. eq. 5: σ^{1/ρ} uniform, ρ = 7
            assert torch.allclose(root.diff(), root.diff().mean().expand(len(root) - 1), rtol=1e-8)
    assert ve.timesteps(7).tolist() == ve.timesteps(7, "logsnr").tolist()  # auto on a continuous schedule
    assert ve.timesteps(1, "karras").tolist() == [1.0, 0.0]

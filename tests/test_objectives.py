"""Prediction types, their conversions, min-SNR weighting, and the training loss against the published setups' losses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffuse.diffusion.objectives import (DiffusionLoss, eps_to_x0, loss_weight, prediction_to_eps,
                                          training_target)
from diffuse.diffusion.schedules import CosineSchedule, LinearSchedule, VESDESchedule

SCHEDULES = {"linear": LinearSchedule(), "cosine": CosineSchedule(), "vesde": VESDESchedule()}


def _batch(schedule, b=64, shape=(2, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand((b, *shape), generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn((b, *shape), generator=g, dtype=torch.float64)
    t = schedule.sample_training_times(b, generator=g).to(torch.float64)
    return x0, eps, schedule.alpha(t), schedule.sigma(t)


def _col(v):
    return v.view(-1, 1, 1)


@pytest.mark.parametrize("name", SCHEDULES)
def test_conversions_round_trip(name):
    x0, eps, a, s = _batch(SCHEDULES[name])
    x_t = _col(a) * x0 + _col(s) * eps
    for prediction in ("eps", "x0", "v"):
        target = training_target(x0, eps, a, s, prediction)
        # the exact target of each prediction type gives back the true ε and x₀
        eps_back = prediction_to_eps(target, x_t, a, s, prediction)
        assert torch.allclose(eps_back, eps, atol=1e-9), prediction
        assert torch.allclose(eps_to_x0(eps_back, x_t, a, s), x0, atol=1e-6 if name == "cosine" else 1e-9)
    v = _col(a) * eps - _col(s) * x0  # Salimans & Ho 2022
    assert torch.allclose(training_target(x0, eps, a, s, "v"), v)
    assert torch.equal(training_target(x0, eps, a, s, "x0"), x0)
    assert torch.equal(training_target(x0, eps, a, s, "eps"), eps)
    with pytest.raises(ValueError, match="unknown prediction"):
        prediction_to_eps(eps, x_t, a, s, "score")


def test_min_snr_weights_match_hang_et_al():
    sched = LinearSchedule()
    t = torch.tensor([0.001, 0.01, 0.05, 0.2, 0.5, 1.0], dtype=torch.float64)
    a, s = sched.alpha(t), sched.sigma(t)
    snr = a**2 / s**2
    gamma = 5.0
    # Hang et al. 2023, §3.4: ε-prediction min(SNR, γ)/SNR, x₀: min(SNR, γ), v: min(SNR, γ)/(SNR + 1)
    ref = {"eps": [min(r, gamma) / r for r in snr.tolist()], "x0": [min(r, gamma) for r in snr.tolist()],
           "v": [min(r, gamma) / (r + 1) for r in snr.tolist()]}
    for prediction, expected in ref.items():
        w = loss_weight(a, s, prediction, "min_snr", gamma)
        assert w.tolist() == pytest.approx(expected, rel=1e-9), prediction
        assert loss_weight(a, s, prediction, "none", gamma).tolist() == [1.0] * len(t)
    assert snr[0] > gamma > snr[-1]  # both branches of the min are exercised
    with pytest.raises(ValueError, match="weighting"):
        loss_weight(a, s, "eps", "p2", gamma)


@pytest.mark.parametrize("name", SCHEDULES)
def test_min_snr_is_the_same_x0_space_loss_for_every_prediction(name):
    """w·‖out − target‖² = min(SNR, γ)·‖x̂₀ − x₀‖² per sample, whatever the network predicts."""
    x0, eps, a, s = _batch(SCHEDULES[name], seed=1)
    x_t = _col(a) * x0 + _col(s) * eps
    g = torch.Generator().manual_seed(5)
    eps_hat = eps + 0.3 * torch.randn(eps.shape, generator=g, dtype=torch.float64)  # an imperfect network
    x0_hat = eps_to_x0(eps_hat, x_t, a, s)
    snr = a**2 / s**2
    x0_loss = snr.clamp(max=5.0) * ((x0_hat - x0) ** 2).flatten(1).mean(1)
    for prediction in ("eps", "x0", "v"):
        out = training_target(x0_hat, eps_hat, a, s, prediction)  # what that network outputs in this parametrization
        per_sample = ((out - training_target(x0, eps, a, s, prediction)) ** 2).flatten(1).mean(1)
        weighted = loss_weight(a, s, prediction, "min_snr", 5.0) * per_sample
        assert torch.allclose(weighted, x0_loss, rtol=1e-6, atol=1e-12), prediction


class _EpsNet(torch.nn.Module):
    """A small fixed network ε̂(x, t) for loss tests; records the labels it was given."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.seen_y = []

    def forward(self, x, t, y=None):
        self.seen_y.append(None if y is None else y.clone())
        return torch.tanh(self.lin(x.flatten(1)) + t[:, None]).view_as(x)


def test_vesde_default_loss_is_the_conditional_setups_score_matching_loss():
    """The conditional setup: score = model(x + σ(t) z, t, y); loss = MSE(score·σ(t), −z), t ~ U[ε, 1].

    A network predicting ε̂ is the conditional setup's score model through score = −ε̂/σ(t).
    """
    sched = VESDESchedule()
    net = _EpsNet()
    x = torch.rand(32, 1, 4) * 2 - 1
    y = torch.randint(0, 3, (32,))
    ours = DiffusionLoss()(net, sched, x, y, generator=torch.Generator().manual_seed(7))

    def score_model(x_t, t, y):
        return -net(x_t, t, y) / sched.sigma(t)[:, None, None]

    def marginal_prob_std(t, sigma=25.0):
        return torch.sqrt((sigma ** (2 * t) - 1.0) / 2.0 / torch.log(torch.tensor(sigma)))

    # the conditional setup's loss_fn, transcribed, with its random draws taken from the same generator
    gen, eps = torch.Generator().manual_seed(7), 1e-5
    random_t = torch.rand(x.shape[0], generator=gen) * (1.0 - eps) + eps
    z = torch.randn(x.shape, generator=gen)
    std = marginal_prob_std(random_t)
    perturbed_x = x + z * std[:, None, None]
    score = score_model(perturbed_x, random_t, y)
    published = F.mse_loss(score * std[:, None, None], -z, reduction="mean")
    assert ours.item() == pytest.approx(published.item(), rel=1e-5)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_loss_is_the_mse_on_the_prediction_target(prediction):
    sched = CosineSchedule()
    net = _EpsNet()
    x = torch.rand(16, 1, 4) * 2 - 1
    loss = DiffusionLoss(prediction=prediction)(net, sched, x, None, generator=torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(2)
    t = sched.sample_training_times(16, generator=g)
    noise = torch.randn(x.shape, generator=g)
    a, s = sched.alpha(t).float(), sched.sigma(t).float()
    out = net(_col(a) * x + _col(s) * noise, t, None)
    expected = ((out - training_target(x, noise, a, s, prediction)) ** 2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_label_dropout_for_classifier_free_guidance():
    sched = LinearSchedule()
    x = torch.zeros(4000, 1, 4)
    y = torch.randint(0, 3, (4000,))
    for p, expected in ((0.0, 0.0), (1.0, 1.0), (0.25, 0.25)):
        net = _EpsNet()
        DiffusionLoss(cond_drop_prob=p, null_class=3)(net, sched, x, y, generator=torch.Generator().manual_seed(0))
        seen = net.seen_y[-1]
        dropped = seen == 3
        assert dropped.float().mean().item() == pytest.approx(expected, abs=0.03)
        assert torch.equal(seen[~dropped], y[~dropped])  # kept labels are untouched
    with pytest.raises(ValueError, match="prediction"):
        DiffusionLoss(prediction="score")
    with pytest.raises(ValueError, match="weighting"):
        DiffusionLoss(weighting="p2")


def test_v_keeps_the_x0_error_bounded_at_high_noise_where_eps_multiplies_it():
    """Why the default objective is v: an error δ in the network's output becomes an x̂₀ error of σ/α·δ for
    eps (157·δ at t = 1 on the linear schedule: an under-trained model's small offset turns a few-step
    sample all-white or all-black) but of σ/(α² + σ²)·δ = σ·δ ≤ δ for v (x̂₀ = (αx − σv̂)/(α² + σ²))."""
    sched = LinearSchedule()
    t = torch.tensor(1.0, dtype=torch.float64)
    a, s = sched.alpha(t), sched.sigma(t)
    x_t = torch.randn(1, 16, dtype=torch.float64)
    delta = 0.01
    err = {}
    for prediction in ("eps", "v"):
        out = torch.randn(1, 16, dtype=torch.float64)
        x0 = eps_to_x0(prediction_to_eps(out, x_t, a, s, prediction), x_t, a, s)
        x0_off = eps_to_x0(prediction_to_eps(out + delta, x_t, a, s, prediction), x_t, a, s)
        err[prediction] = (x0_off - x0).abs().max().item()
    assert err["eps"] == pytest.approx(float(s / a) * delta, rel=1e-6) and float(s / a) > 150
    assert err["v"] == pytest.approx(float(s / (a**2 + s**2)) * delta, rel=1e-6) and err["v"] <= delta


def test_default_objective_is_v_with_min_snr_and_eps_on_the_vesde():
    from conftest import compose_cfg

    for overrides, want in (([], ("v", "min_snr")), (["schedule=cosine"], ("v", "min_snr")),
                            (["schedule=vesde"], ("eps", "none")),
                            (["schedule=vesde", "objective.prediction=v"], ("v", "none")),  # the command line wins
                            (["experiment=mnist_shufflenet"], ("eps", "none"))):  # a published setup keeps its loss
        cfg = compose_cfg("train", overrides)
        assert (cfg.objective.prediction, cfg.objective.weighting) == want, overrides

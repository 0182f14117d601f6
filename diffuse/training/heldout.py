"""A validation loss that sweeps can optimise: the ε-prediction error of the EMA model on a fixed held-out
set, with a fixed (t, ε) per item, so the number moves only when the model does.

The error is measured on ε̂ whatever the network predicts (ε, x₀ or v are converted with the schedule's
α, σ), so runs with different `objective.prediction` are compared on one scale: Ho et al.'s L_simple.
"""

from __future__ import annotations

import torch
from torch import nn

from diffuse.diffusion.objectives import Parameterization, noised, parameterization


class HeldOutLoss:
    """dataset: the held-out items (the `diffuse.data` interface); n: how many (the first n); returns
    {"val_loss": mean over items of mean_elements (ε̂ − ε)²} from `__call__(model)`."""

    def __init__(self, dataset, schedule, prediction: Parameterization | str, n: int = 256, batch_size: int = 64,
                 device: torch.device | str = "cpu", seed: int = 0):
        n = min(int(n), len(dataset))
        fixed = torch.Generator().manual_seed(seed)  # the same items, times and noise in every evaluation
        x0, y = dataset.get_batch(torch.arange(n), fixed)
        self.x0, self.y = x0.float().to(device), y.to(device)
        self.t = schedule.sample_training_times(n, generator=fixed, device="cpu").to(device)
        self.noise = torch.randn(self.x0.shape, generator=fixed).to(device)
        self.schedule, self.batch_size = schedule, int(batch_size)
        self.parameterization = parameterization(prediction)
        self.conditional = getattr(dataset, "num_classes", 0) > 0

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> dict:
        was_training = model.training
        model.eval()
        total = 0.0
        for i in range(0, len(self.x0), self.batch_size):
            x0, t, noise = (v[i:i + self.batch_size] for v in (self.x0, self.t, self.noise))
            y = self.y[i:i + self.batch_size] if self.conditional else None
            x_t, alpha, sigma = noised(self.schedule, x0, t, noise)
            eps = self.parameterization.eps(model(x_t, t, y).float(), x_t, alpha, sigma)
            total += float(((eps - noise) ** 2).flatten(1).mean(1).sum())
        model.train(was_training)
        return {"val_loss": total / len(self.x0), "val_items": len(self.x0)}

"""Exponential moving average of the weights, with a decay warm-up whose counter is checkpointed.

decay_n = min(decay, (1 + n)/(10 + n)) for update n, so a short run samples from an average of recent
weights rather than from near-initial ones (a trap the peers' users keep falling into).

The update counter and the decay live on the weights' device, and an update can be masked by a device
flag (the training step's "gradient was finite"): the loop never waits for the GPU to learn whether a step
was taken, yet a skipped step leaves no trace in the average or the counter.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn


class EMA:
    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True):
        self.decay = decay
        self.warmup = warmup
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        device = next(self.model.parameters(), torch.empty(0)).device
        self._updates = torch.zeros((), dtype=torch.int64, device=device)

    @property
    def num_updates(self) -> int:
        return int(self._updates)  # waits for the device: for checkpoints and tests, not every step

    def _decay(self) -> Tensor:
        """This update's decay, a 0-d float32 tensor on the weights' device."""
        if not self.warmup:
            return torch.full((), self.decay, device=self._updates.device)
        n = self._updates.float()
        return torch.clamp((1 + n) / (10 + n), max=self.decay)

    def current_decay(self) -> float:
        return float(self._decay())

    @torch.no_grad()
    def update(self, model: nn.Module, taken: Tensor | None = None) -> None:
        """ema ← ema + (1 − d)·(θ − ema); nothing (and the counter unchanged) where `taken` (a 0-d bool on the
        device) is false."""
        weight = 1 - self._decay()
        if taken is not None:
            weight = weight * taken
        ema_params = list(self.model.parameters())
        step = torch._foreach_sub([p.detach() for p in model.parameters()], ema_params)
        torch._foreach_mul_(step, weight)
        torch._foreach_add_(ema_params, step)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)
        self._updates += 1 if taken is None else taken

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "num_updates": self.num_updates}  # decay: the config's

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self._updates.fill_(int(state["num_updates"]))

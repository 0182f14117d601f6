"""Keeping count of skipped training steps on the device, so that no step waits for the GPU.

A step whose gradient norm is NaN/inf is skipped on the device (the fused AdamW reads `found_inf`, the EMA
update is masked); it still counts as a step, as under torch's GradScaler recipe. This record keeps, as
device tensors, how many steps were skipped, the longest run of them in a row and where it began; the loop
reads it only where it reports anyway (log, checkpoint, end) and every `limit` steps, so a run of `limit`
skipped steps in a row stops training within `limit` more steps.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from diffuse.errors import DiffuseError


class NonFiniteSteps:
    def __init__(self, device: torch.device, limit: int, skipped: int = 0):
        self.limit = limit
        self.reported = skipped  # skipped steps up to the last read

        def zero(dtype=torch.int64):
            return torch.zeros((), dtype=dtype, device=device)

        self._skipped = zero()      # since the last read
        self._streak = zero()       # skipped steps in a row up to now
        self._start = zero()        # the step the current streak began at, and its loss and grad norm
        self._start_loss, self._start_grad = zero(torch.float32), zero(torch.float32)
        # the first streak to reach `limit`: the step it began at (−1: none yet), its loss and grad norm there
        self._tripped_at, self._tripped_loss, self._tripped_grad = zero() - 1, zero(torch.float32), zero(torch.float32)

    def record(self, step: int, taken: Tensor, loss: Tensor, grad_norm: Tensor) -> None:
        """After step number `step`; taken: 0-d bool on the device (False = skipped)."""
        skipped = ~taken
        self._skipped += skipped
        self._streak.add_(1).mul_(skipped)
        begins = self._streak == 1
        self._start.copy_(torch.where(begins, step, self._start))
        self._start_loss.copy_(torch.where(begins, loss.float(), self._start_loss))
        self._start_grad.copy_(torch.where(begins, grad_norm.float(), self._start_grad))
        trips = (self._streak == self.limit) & (self._tripped_at < 0)
        self._tripped_at.copy_(torch.where(trips, self._start, self._tripped_at))
        self._tripped_loss.copy_(torch.where(trips, self._start_loss, self._tripped_loss))
        self._tripped_grad.copy_(torch.where(trips, self._start_grad, self._tripped_grad))

    def read(self) -> int:
        """All skipped steps so far (this waits for the device). Raises once `limit` were skipped in a row."""
        self.reported += int(self._skipped)
        self._skipped.zero_()
        if int(self._tripped_at) >= 0:
            loss, grad = float(self._tripped_loss), float(self._tripped_grad)
            what = f"loss became {loss}" if not math.isfinite(loss) else f"gradient became {grad} (loss {loss:.4g})"
            raise DiffuseError(f"{what} at step {int(self._tripped_at)}, {self.limit} steps in a row "
                               f"(trainer.max_nonfinite_steps)")
        return self.reported

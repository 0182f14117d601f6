"""What the training loop does besides stepping, as callbacks: one protocol for the held-out loss, sample quality,
logging, checkpoints and sample grids.

After every optimizer step the loop makes a `StepEnd` and runs each callback that is `due` for it, in this order:
  1. measuring callbacks (`measures = True`: held-out loss, sample quality): their metrics join the step's
     log line (StepEnd.metrics) and the run's summary;
  2. LogMetrics (every trainer.log_every steps, and whenever a measurement was made);
  3. SaveCheckpoint (every trainer.checkpoint_every steps);
  4. the others (sample grids, a VAE's reconstruction grids).
A callback is due every `every` steps and at the last step of a start (max_steps reached or the time budget
spent; `every = 0`: only then). When a signal stops the run only the callbacks with `on_signal` run (logging and
the checkpoint): the grace period is short. `main_only` callbacks run on rank 0 while the other ranks wait at a
barrier (drawing samples); the others run on every rank (the held-out loss is a collective-free EMA forward on
every rank, the checkpoint gathers RNG states).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from diffuse.errors import DiffuseError

if TYPE_CHECKING:
    from diffuse.training.loop import Trainer

log = logging.getLogger(__name__)


@dataclass
class StepEnd:
    """The state after optimizer step `step`: at_end = the last step of this start; interrupted = a signal
    asked to stop; metrics = what measuring callbacks returned at this step so far."""

    step: int
    at_end: bool
    interrupted: bool = False
    metrics: dict = field(default_factory=dict)


class Callback:
    every: int = 0           # steps between runs (0: only at the end of a start)
    measures: bool = False   # returns metrics for the step's log line (runs before logging)
    main_only: bool = False  # rank 0 runs it; the others wait at a barrier
    on_signal: bool = False  # runs also when a signal stops the run

    def due(self, event: StepEnd) -> bool:
        if event.interrupted and not self.on_signal:
            return False
        return event.at_end or bool(self.every and event.step % self.every == 0)

    def __call__(self, trainer: "Trainer", event: StepEnd) -> dict | None:
        raise NotImplementedError


class Measurement(Callback):
    """measure(ema_model) -> metrics, e.g. HeldOutLoss (every rank) or SampleQuality (main_only)."""

    measures = True

    def __init__(self, measure: Callable[[nn.Module], dict], every: int, main_only: bool = False):
        self.measure, self.every, self.main_only = measure, int(every or 0), main_only

    def __call__(self, trainer, event):
        return self.measure(trainer.ema.model)


class Grids(Callback):
    """draw(step, ema_model, last) writes a grid (SampleGrids, ReconstructionGrids); rank 0 draws."""

    main_only = True

    def __init__(self, draw: Callable[[int, nn.Module, bool], None], every: int):
        self.draw, self.every = draw, int(every or 0)

    def __call__(self, trainer, event):
        self.draw(event.step, trainer.ema.model, event.at_end)


class StepMeter:
    """Sums over the steps since the last log line, on the device (nothing here waits for it): the loss and
    gradient norm of the steps taken (a skipped step's NaN stays out), how many were taken, images seen."""

    def __init__(self, device: torch.device):
        self.loss, self.grad_norm, self.taken = (torch.zeros((), device=device) for _ in range(3))
        self.images, self.since = 0, time.perf_counter()

    def add(self, loss: torch.Tensor, grad_norm: torch.Tensor, taken: torch.Tensor, images: int) -> None:
        self.loss += torch.where(taken, loss, 0.0)
        self.grad_norm += torch.where(taken, grad_norm, 0.0)
        self.taken += taken
        self.images += images

    def reset(self) -> None:
        self.loss.zero_(), self.grad_norm.zero_(), self.taken.zero_()
        self.images, self.since = 0, time.perf_counter()


class LogMetrics(Callback):
    """The step's metrics line (metrics.jsonl, W&B): loss and grad norm averaged over the steps taken since the
    last line, lr, images/s, epoch, skipped steps, and the measurements; at steps between log lines where a
    measurement was made, that measurement alone. A non-finite average loss (whose gradient was finite)
    stops the run."""

    on_signal = True

    def __init__(self, every: int):
        self.every = int(every)

    def due(self, event):
        return super().due(event) or bool(event.metrics)

    def __call__(self, trainer, event):
        if not Callback.due(self, event):  # a measurement between log lines
            trainer.tracker.log(event.metrics, event.step)
            return None
        meter = trainer.meter
        seconds = time.perf_counter() - meter.since
        metrics = {"lr": trainer.optimizer.param_groups[0]["lr"], "images_per_s": meter.images / seconds,
                   "epoch": trainer.data.epoch, "skipped_steps": trainer.skipped_steps, **event.metrics}
        taken = int(meter.taken)
        if taken:  # else every step since the last line was skipped: no loss to average
            loss = float(meter.loss) / taken
            if not math.isfinite(loss):
                raise DiffuseError(f"loss became {loss} by step {event.step}: training stopped; "
                                   f"last good checkpoint kept: {trainer.kept()}")
            trainer.last_loss = loss
            metrics = {"loss": loss, "grad_norm": float(meter.grad_norm) / taken, **metrics}
            trainer.bar.set_postfix(loss=f"{loss:.4f}")
        trainer.tracker.log(metrics, event.step)
        meter.reset()
        return None


class SaveCheckpoint(Callback):
    """checkpoints/step_N.ckpt and last.ckpt (Trainer.save: rank 0 writes, every rank takes part)."""

    on_signal = True

    def __init__(self, every: int):
        self.every = int(every)

    def __call__(self, trainer, event):
        trainer.save()
        return None

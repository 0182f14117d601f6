"""The training loop: one optimizer step per iteration, everything it needs to resume kept in `state_dict`.

Read it top to bottom like nanoGPT's: batch → loss (autocast, reduced in fp32) → backward → clip → step →
LR schedule → EMA; every `log_every` steps metrics, every `checkpoint_every` a checkpoint, every
`sample_every` a sample grid (through a callback, so this file knows nothing of samplers or pictures).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from diffuse.errors import DiffuseError
from diffuse.training.checkpoint import rng_state, save_checkpoint, set_rng_state
from diffuse.training.distributed import DistInfo, barrier
from diffuse.training.ema import EMA

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
LR_SCHEDULES = ("onecycle", "cosine", "constant")


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=tuple(betas))


def build_lr_scheduler(optimizer, name: str, max_steps: int, lr: float, warmup_steps: int = 0,
                       pct_start: float = 0.3, min_lr_ratio: float = 0.0):
    """onecycle: torch's OneCycleLR (the MNIST seed); cosine / constant: linear warm-up, then cosine decay to
    min_lr_ratio·lr, or flat. Stepped once per optimizer step (not per process, not per epoch)."""
    if name == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=max(max_steps, 2),
                                                   pct_start=pct_start)
    if name not in LR_SCHEDULES:
        raise DiffuseError(f"trainer.lr_schedule must be one of {', '.join(LR_SCHEDULES)}; got {name!r}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if name == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def use_channels_last(setting, model: nn.Module, device: torch.device) -> bool:
    """Whether to store a model's weights channels-last (NHWC), which only 2-D convolutions can use.

    auto: on the CPU for models with 2-D convolutions and no 1-D/3-D ones (the default UNet's step measured
    ~10% faster there: oneDNN's convolutions run NHWC natively); elsewhere left to the user.
    """
    convs = {type(m) for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)}
    planar = nn.Conv2d in convs and not convs - {nn.Conv2d, nn.ConvTranspose2d}
    if setting == "auto":
        return planar and device.type == "cpu"
    if setting is True and not planar:
        raise DiffuseError("trainer.channels_last=true needs a model with 2-D convolutions only (dim=2)")
    if isinstance(setting, bool):
        return setting
    raise DiffuseError(f"trainer.channels_last must be auto, true or false; got {setting!r}")


def prepare_training(model: nn.Module, tcfg, batches_per_epoch: int, device: torch.device, dist: DistInfo):
    """The parts every trainer needs, from the `trainer` config: step count, EMA, the (compiled, DDP-wrapped)
    module to train, AdamW and its LR schedule. Returns (max_steps, ema, train_model, optimizer, lr_scheduler)."""
    max_steps = int(tcfg.epochs) * batches_per_epoch if tcfg.get("epochs") else tcfg.max_steps
    if not max_steps or max_steps < 1:
        raise DiffuseError("set trainer.max_steps or trainer.epochs to a positive number")
    if use_channels_last(tcfg.get("channels_last", "auto"), model, device):
        model.to(memory_format=torch.channels_last)  # before the EMA copy and the optimizer see the weights
    ema = EMA(model, decay=tcfg.ema_decay, warmup=tcfg.ema_warmup)
    train_model = torch.compile(model) if tcfg.compile else model
    if dist.enabled:
        train_model = torch.nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = build_optimizer(model, tcfg.lr, tcfg.weight_decay, tcfg.betas)
    lr_scheduler = build_lr_scheduler(optimizer, tcfg.lr_schedule, max_steps, tcfg.lr, tcfg.warmup_steps,
                                      tcfg.pct_start, tcfg.min_lr_ratio)
    return max_steps, ema, train_model, optimizer, lr_scheduler


@dataclass
class TrainerConfig:
    max_steps: int
    log_every: int = 50
    checkpoint_every: int = 1000
    sample_every: int = 1000
    grad_clip: float | None = 1.0
    precision: str = "fp32"

    @classmethod
    def from_config(cls, tcfg, max_steps: int) -> "TrainerConfig":
        """From a `trainer` config node, with the step count prepare_training resolved."""
        return cls(max_steps=max_steps, log_every=tcfg.log_every, checkpoint_every=tcfg.checkpoint_every,
                   sample_every=tcfg.sample_every, grad_clip=tcfg.grad_clip, precision=tcfg.precision)


class Trainer:
    """Owns model, EMA, optimizer, LR schedule, data stream and loss RNG; `fit()` runs to max_steps."""

    def __init__(self, model: nn.Module, loss_fn: Callable, schedule, data, optimizer, lr_scheduler,
                 ema: EMA, cfg: TrainerConfig, run_dir: Path, tracker, dist: DistInfo,
                 device: torch.device, seed: int, config_dict: dict,
                 on_sample: Callable[[int, nn.Module], None] | None = None):
        if cfg.precision not in PRECISIONS:
            raise DiffuseError(f"trainer.precision must be one of {', '.join(PRECISIONS)}; got {cfg.precision!r}")
        self.model, self.loss_fn, self.schedule, self.data = model, loss_fn, schedule, data
        self.optimizer, self.lr_scheduler, self.ema, self.cfg = optimizer, lr_scheduler, ema, cfg
        self.run_dir, self.tracker, self.dist, self.device = Path(run_dir), tracker, dist, device
        self.config_dict, self.on_sample = config_dict, on_sample
        self.step = 0
        self.loss_generator = torch.Generator(device=device).manual_seed(seed * 7919 + dist.rank)
        self.autocast_dtype = PRECISIONS[cfg.precision]
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16" and device.type == "cuda")
        self.extra_state: dict = {}

    @property
    def raw_model(self) -> nn.Module:
        return self.model.module if hasattr(self.model, "module") else self.model

    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / "checkpoints" / "last.ckpt"

    # ----- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "config": self.config_dict,
            "model": self.raw_model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": {**rng_state(), "loss": self.loss_generator.get_state()},
            "data": self.data.state_dict(),
            **self.extra_state,
        }

    def load_state_dict(self, state: dict) -> None:
        self.raw_model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        sched_state = state["lr_scheduler"]
        if isinstance(self.lr_scheduler, torch.optim.lr_scheduler.OneCycleLR) \
                and sched_state["total_steps"] != self.lr_scheduler.total_steps:
            # resumed with a new trainer.max_steps: continue on the new cycle instead of failing at the old end
            self.lr_scheduler.last_epoch = int(sched_state["last_epoch"])
            self.lr_scheduler._step_count = int(sched_state["_step_count"])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for group, lr in zip(self.optimizer.param_groups, self.lr_scheduler.get_lr()):
                    group["lr"] = lr
        else:
            self.lr_scheduler.load_state_dict(sched_state)
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        self.loss_generator.set_state(state["rng"]["loss"])
        self.data.load_state_dict(state["data"])
        self.step = int(state["step"])

    def save(self) -> Path | None:
        """Rank 0 writes checkpoints/step_N.ckpt and updates last.ckpt (both atomic)."""
        if self.dist.is_main:
            state = self.state_dict()
            save_checkpoint(state, self.run_dir / "checkpoints" / f"step_{self.step}.ckpt")
            save_checkpoint(state, self.checkpoint_path)
        barrier(self.dist)
        return self.checkpoint_path

    # ----- loop --------------------------------------------------------------------------------
    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _check_finite(self, loss_sum: torch.Tensor) -> None:
        value = float(loss_sum)
        if not math.isfinite(value):
            kept = self.checkpoint_path if self.checkpoint_path.exists() else "none written yet"
            raise DiffuseError(f"loss became {value} by step {self.step}: training stopped; last good "
                               f"checkpoint kept: {kept}")

    def train_step(self, x0, y) -> tuple[torch.Tensor, torch.Tensor]:
        self.model.train()
        with self._autocast():
            loss = self.loss_fn(self.model, self.schedule, x0, y, self.loss_generator)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.lr_scheduler.step()
        self.ema.update(self.raw_model)
        self.step += 1
        return loss.detach(), grad_norm.detach()

    def fit(self) -> dict:
        cfg = self.cfg
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not self.dist.is_main, desc="train",
                   dynamic_ncols=True)
        loss_sum = torch.zeros((), device=self.device)
        grad_sum = torch.zeros((), device=self.device)
        count, images, t0 = 0, 0, time.perf_counter()
        last_loss = float("nan")
        while self.step < cfg.max_steps:
            x0, y = next(self.data)
            loss, grad_norm = self.train_step(x0, y)
            loss_sum += loss
            grad_sum += grad_norm
            count += 1
            images += x0.shape[0] * self.dist.world_size
            bar.update(1)
            at_end = self.step == cfg.max_steps
            if self.step % cfg.log_every == 0 or at_end:
                self._check_finite(loss_sum)
                dt = time.perf_counter() - t0
                last_loss = float(loss_sum) / count
                metrics = {"loss": last_loss, "grad_norm": float(grad_sum) / count,
                           "lr": self.optimizer.param_groups[0]["lr"], "images_per_s": images / dt,
                           "epoch": self.data.epoch}
                self.tracker.log(metrics, self.step)
                bar.set_postfix(loss=f"{last_loss:.4f}")
                loss_sum.zero_(), grad_sum.zero_()
                count, images, t0 = 0, 0, time.perf_counter()
            if self.step % cfg.checkpoint_every == 0 or at_end:
                self._check_finite(loss_sum) if count else None
                self.save()
            if self.on_sample is not None and (self.step % cfg.sample_every == 0 or at_end):
                if self.dist.is_main:
                    self.on_sample(self.step, self.ema.model)
                barrier(self.dist)
        bar.close()
        return {"step": self.step, "loss": last_loss, "checkpoint": str(self.checkpoint_path)}

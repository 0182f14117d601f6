"""The training loop: one optimizer step per iteration, everything it needs to resume kept in `state_dict`.

Read it top to bottom like nanoGPT's: batch → loss (autocast, reduced in fp32) → backward → clip → step →
LR schedule → EMA; then the callbacks that are due (training/callbacks.py: held-out loss, sample quality, the
metrics line, the checkpoint, sample grids), so this file knows nothing of samplers, metrics or pictures.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from diffuse.devices import COMPILE_MODES, PRECISIONS, resolve_precision, use_channels_last
from diffuse.errors import DiffuseError
from diffuse.storage.checkpoint import (check_like, mark_run, non_finite, prune_checkpoints, rng_state, save_checkpoint,
                                         set_rng_state)
from diffuse.training.distributed import DistInfo, all_gather_object, barrier
from diffuse.training.ema import EMA
from diffuse.training.graphs import GraphedNetwork, use_cuda_graphs
from diffuse.training.nonfinite import NonFiniteSteps
from diffuse.training.callbacks import Callback, LogMetrics, SaveCheckpoint, StepEnd, StepMeter
from diffuse.training.settings import LR_SCHEDULES, TrainerSettings
from diffuse.training.stopping import TIME_BUDGET, Interrupted, StopRequest

log = logging.getLogger(__name__)



def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas) -> torch.optim.Optimizer:
    """AdamW, with the fused kernel on the CPU and CUDA: one pass over all parameters (on CUDA one launch
    instead of a few per tensor), and it reads GradScaler's `found_inf` on the device, which lets a step be
    skipped without a host sync."""
    fused = {p.device.type for p in model.parameters()} <= {"cpu", "cuda"}
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=tuple(betas),
                             fused=fused or None)


def optimizer_step(optimizer: torch.optim.Optimizer, found_inf: torch.Tensor) -> None:
    """optimizer.step() unless found_inf (a 0-d float on the device) is 1. An optimizer that takes GradScaler's
    protocol (the fused AdamW) skips inside its kernel, so the host never waits; any other asks the device."""
    if getattr(optimizer, "_step_supports_amp_scaling", False):
        optimizer.grad_scale, optimizer.found_inf = None, found_inf
        try:
            optimizer.step()
        finally:
            del optimizer.grad_scale, optimizer.found_inf
    elif not bool(found_inf):
        optimizer.step()


def grad_norm_(parameters, max_norm: float | None) -> torch.Tensor:
    """The gradients' global L2 norm (a 0-d tensor, not read on the host); with max_norm, the gradients scaled
    so their norm is at most max_norm, as torch's clip_grad_norm_ (which, from torch 2.6, this equals)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    if max_norm:
        torch._foreach_mul_(grads, (max_norm / (norm + 1e-6)).clamp(max=1.0))
    return norm


def build_lr_scheduler(optimizer, name: str, max_steps: int, lr: float, warmup_steps: int = 0,
                       pct_start: float = 0.3, min_lr_ratio: float = 0.0):
    """onecycle: torch's OneCycleLR (the MNIST ShuffleNet setup); cosine / constant: linear warm-up, then cosine decay to
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


def compile_model(model: nn.Module, setting) -> nn.Module:
    """trainer.compile: false | true (torch.compile's default mode) | one of its modes by name
    (reduce-overhead adds CUDA graphs; max-autotune-no-cudagraphs tunes the kernels without them)."""
    if setting is False or setting is None or setting == "false":
        return model
    if setting is True or setting == "true":
        return torch.compile(model)
    if setting in COMPILE_MODES:
        return torch.compile(model, mode=setting)
    raise DiffuseError(f"trainer.compile must be true, false or one of {', '.join(COMPILE_MODES)}; got {setting!r}")


@dataclass
class Run:
    """Where a trainer runs and reports: its folder, tracker, process group, device, seed, and the resolved
    config its checkpoints keep."""

    dir: Path
    tracker: object
    dist: DistInfo
    device: torch.device
    seed: int
    config: dict


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP (`.module`) and torch.compile (`._orig_mod`) wrappers: its state dict has
    no `module.`/`_orig_mod.` prefixes, so checkpoints load whether or not the next run compiles."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


# Optimizer settings taken from the config on resume (the moments come from the checkpoint).
HYPERPARAMETERS = ("lr", "initial_lr", "max_lr", "min_lr", "weight_decay", "betas")


class Trainer:
    """Owns model, EMA, optimizer, LR schedule, data stream and loss RNG; `fit()` runs to max_steps.

    model: the network (plain; compiled and DDP-wrapped here); loss_fn(model, schedule, x0, y, generator) →
    loss; data: a BatchStream; settings: TrainerSettings (or a `trainer` config node); run: see Run;
    schedule: what loss_fn gets (None for the VAE); kind: what the checkpoints hold ("diffusion" | "vae");
    extra_state: more entries for every checkpoint; callbacks: what runs besides the steps (training/callbacks.py:
    measurements, grids); the metrics line and the checkpoint are always there."""

    def __init__(self, model: nn.Module, loss_fn: Callable, data, settings, run: Run, schedule=None,
                 kind: str = "diffusion", extra_state: dict | None = None, callbacks: Sequence[Callback] = ()):
        cfg = settings if isinstance(settings, TrainerSettings) else TrainerSettings.from_config(settings)
        self.settings, self.max_steps = cfg, cfg.total_steps(data.batches_per_epoch)
        self.precision = resolve_precision(cfg.precision, run.device, model)
        if self.precision not in PRECISIONS:
            raise DiffuseError(f"trainer.precision must be one of {', '.join(PRECISIONS)}, auto; got {self.precision!r}")
        device, dist = run.device, run.dist
        # the training set-up, in order: weight layout → EMA copy → compile → DDP → optimizer → LR → scaler
        self.autocast_dtype = PRECISIONS[self.precision]
        if use_channels_last(cfg.channels_last, model, device, self.autocast_dtype):
            model.to(memory_format=torch.channels_last)  # before the EMA copy and the optimizer see the weights
        self.ema = EMA(model, decay=cfg.ema_decay, warmup=cfg.ema_warmup)
        self.model = compile_model(model, cfg.compile)
        graphs = cfg.cuda_graphs
        if kind != "diffusion":  # GraphedNetwork is called as net(x, t, y); the VAE's loss calls it otherwise
            if graphs is True:
                raise DiffuseError("trainer.cuda_graphs=true is for `diffuse train`, not `diffuse train-vae`")
            graphs = False
        self.cuda_graphs = use_cuda_graphs(graphs, device, self.model is not model, dist.world_size,
                                           cfg.grad_accum_steps)
        if dist.enabled:
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None)
        # what the loss calls: the (compiled, DDP-wrapped) network, or its recorded CUDA graphs
        self.network = GraphedNetwork(model) if self.cuda_graphs else self.model
        self.optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, cfg.betas)
        self.lr_scheduler = build_lr_scheduler(self.optimizer, cfg.lr_schedule, self.max_steps, cfg.lr,
                                               cfg.warmup_steps, cfg.pct_start, cfg.min_lr_ratio)
        # fp16 needs loss scaling on every device (its range underflows small gradients), bf16 does not
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision == "fp16")
        # the configured optimizer settings, to win over the checkpoint's on resume
        self.configured_groups = [{k: g[k] for k in HYPERPARAMETERS if k in g} for g in self.optimizer.param_groups]

        self.loss_fn, self.schedule, self.data, self.kind = loss_fn, schedule, data, kind
        self.run_dir, self.tracker, self.dist, self.device = Path(run.dir), run.tracker, dist, device
        self.seed, self.config_dict = run.seed, run.config
        measuring = [c for c in callbacks if c.measures]
        self.callbacks = [*measuring, LogMetrics(cfg.log_every), SaveCheckpoint(cfg.checkpoint_every),
                          *(c for c in callbacks if not c.measures)]
        self.extra_state = dict(extra_state or {})
        self.step = 0
        self.skipped_steps = 0  # optimizer steps skipped for a non-finite gradient, in all
        self.last_loss = float("nan")  # the mean loss of the last metrics line
        self.loss_generator = torch.Generator(device=device).manual_seed(run.seed * 7919 + dist.rank)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.raw_model.parameters())

    @property
    def raw_model(self) -> nn.Module:
        return unwrap(self.model)

    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / "checkpoints" / "last.ckpt"

    # ----- state -------------------------------------------------------------------------------
    def _rng_states(self) -> list[dict]:
        """Every rank's RNG states, in rank order (each rank draws its own t, ε and label drops)."""
        return all_gather_object(rng_state(self.loss_generator), self.dist)

    def state_dict(self) -> dict:
        """The whole training state. Collective under DDP (gathers every rank's RNG states)."""
        return {
            "kind": self.kind,
            "step": self.step,
            "config": self.config_dict,
            "model": self.raw_model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": self._rng_states(),
            "world_size": self.dist.world_size,
            "skipped_steps": self.skipped_steps,
            "data": self.data.state_dict(),
            **self.extra_state,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a checkpoint's state (vetted by load_checkpoint); a state that does not fit this run
        (another network's weights, an optimizer of other parameters) is one line, and nothing is written."""
        step = int(state["step"])
        if step >= self.max_steps:  # the LR schedule has no value past its length; nothing to train
            raise DiffuseError(f"already at step {step}: trainer.max_steps={self.max_steps} leaves nothing to "
                               f"train; give trainer.max_steps above {step} to continue")
        try:
            self._load_state_dict(state)
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DiffuseError(f"the checkpoint's training state does not fit this run ({first[:200]})") from None

    def _check_training_state(self, state: dict) -> None:
        """The optimizer's, the data stream's and the EMA's entries of a checkpoint, checked against what this
        run writes (check_like), so that an odd file fails here in one line, not inside a step."""
        source = "the checkpoint"
        mine = self.optimizer.state_dict()
        optimizer = state.get("optimizer")
        if not isinstance(optimizer, dict) or not isinstance(optimizer.get("state"), dict):
            raise DiffuseError(f"{source}: optimizer must be the optimizer's state (a mapping with `state`)")
        check_like(mine["param_groups"], optimizer.get("param_groups"), source, "optimizer.param_groups",
                   optional_keys=HYPERPARAMETERS)  # this run's config sets those (_apply_configured_…)
        params = list(self.raw_model.parameters())
        for index, entry in optimizer["state"].items():
            if not isinstance(index, int) or not 0 <= index < len(params) or not isinstance(entry, dict):
                raise DiffuseError(f"{source}: optimizer.state has an entry {index!r} for no parameter of this model")
            like = {"step": torch.zeros((), dtype=torch.float32), "exp_avg": params[index].detach(),
                    "exp_avg_sq": params[index].detach()}
            check_like({k: v.cpu() for k, v in like.items()}, {k: v.cpu() if isinstance(v, torch.Tensor) else v
                                                               for k, v in entry.items()},
                       source, f"optimizer.state[{index}]")
        check_like(self.data.state_dict(), state.get("data"), source, "data")
        check_like({"num_updates": 0}, {k: v for k, v in (state.get("ema") or {}).items() if k != "model"},
                   source, "ema")

    def _load_state_dict(self, state: dict) -> None:
        self._check_training_state(state)
        self.raw_model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self._apply_configured_optimizer_settings(state)
        if state.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        self._load_rng(state)
        self.data.load_state_dict(state["data"])

    def _apply_configured_optimizer_settings(self, state: dict) -> None:
        """The checkpoint brings Adam's moments and the step; lr, weight_decay, betas and the LR schedule
        (its kind, length, warm-up) are this run's config. The schedule is placed at the saved step: both
        kinds compute the LR in closed form from the step, so an unchanged config continues exactly."""
        changed = set()
        for group, configured in zip(self.optimizer.param_groups, self.configured_groups):
            for key in set(HYPERPARAMETERS) - set(configured):  # a schedule of another kind left them
                group.pop(key, None)
            for key, value in configured.items():
                old = group.get(key)
                if key not in ("lr", "min_lr") and old is not None and _as_tuple(old) != _as_tuple(value):
                    changed.add(f"{'lr' if key in ('initial_lr', 'max_lr') else key} {old} → {value}")
                group[key] = value
        sched = self.lr_scheduler
        sched.last_epoch = int(state["step"])
        sched._step_count = sched.last_epoch + 1
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # get_lr() outside step() warns; it is the closed form here
            lrs = sched.get_lr()
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        sched._last_lr = list(lrs)
        if changed and self.dist.is_main:
            log.info("resumed with this run's optimizer settings: %s", ", ".join(sorted(changed)))

    def _load_rng(self, state: dict) -> None:
        saved = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]  # older: rank 0's only
        saved_world = int(state.get("world_size", len(saved)))
        if saved_world != self.dist.world_size or len(saved) != self.dist.world_size:
            if self.dist.is_main:
                log.warning("resuming a %d-process run with %d processes: it continues, but the exact "
                            "continuation needs the same number of processes", saved_world, self.dist.world_size)
            torch.manual_seed(self.seed + self.dist.rank + 1_000_003 * self.step)
            self.loss_generator.manual_seed(self.seed * 7919 + self.dist.rank + 1_000_003 * self.step)
            return
        if not set_rng_state(saved[self.dist.rank], self.loss_generator) and self.dist.is_main:
            log.warning("resuming a %s run on %s: the random streams are re-seeded (exact only on the same "
                        "device type)", saved[self.dist.rank].get("loss_device", "?"), self.device.type)

    def save(self) -> Path:
        """Rank 0 writes checkpoints/step_N.ckpt and updates last.ckpt (both atomic), then keeps the newest
        `keep_checkpoints` step files. Weights or moments holding NaN/inf are never written (every rank checks
        its own copy: DDP keeps them equal, so they agree). Parameters, not buffers: a buffer may hold NaN on
        purpose (a VAE's scale factor before it is fitted)."""
        moments = [v for per_param in self.optimizer.state.values() for v in per_param.values()
                   if isinstance(v, torch.Tensor)]
        bad = non_finite({"model": self.raw_model.parameters(), "EMA": self.ema.model.parameters(),
                          "optimizer": moments})
        if bad:
            raise DiffuseError(f"the {' and '.join(bad)} state holds NaN/inf at step {self.step}: not written; "
                               f"last good checkpoint kept: {self.kept()}")
        if self.dist.enabled:  # DDP keeps the replicas equal; a checkpoint is rank 0's, so make sure
            total = float(sum(p.detach().double().sum() for p in self.raw_model.parameters()))
            sums = all_gather_object(total, self.dist)
            if len(set(sums)) > 1:
                raise DiffuseError(f"the {self.dist.world_size} ranks disagree on the weights at step {self.step} "
                                   f"(parameter sums {sums}): not written; last good checkpoint kept: {self.kept()}")
        state = self.state_dict()
        if self.dist.is_main:
            folder = self.checkpoint_path.parent
            save_checkpoint(state, folder / f"step_{self.step}.ckpt")
            save_checkpoint(state, self.checkpoint_path)
            prune_checkpoints(folder, self.settings.keep_checkpoints)
        barrier(self.dist)
        return self.checkpoint_path

    def kept(self) -> str:
        """The last checkpoint written, for error lines."""
        return str(self.checkpoint_path) if self.checkpoint_path.exists() else "none written yet"

    # ----- loop --------------------------------------------------------------------------------
    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        # recording CUDA graphs needs autocast without its cast cache (the weights are cast inside the graph)
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, cache_enabled=not self.cuda_graphs)

    def train_step(self, batches) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One optimizer step over `batches` [(x0, y), …] (grad_accum_steps micro-batches; under DDP the
        gradients are all-reduced on the last one only). Returns (mean loss, grad norm, taken), 0-d tensors on
        the device: nothing here waits for the GPU. A non-finite gradient norm (a NaN or inf loss, or a finite
        loss whose backward overflowed) skips the update and the EMA on the device, as a GradScaler does; the
        step still counts (LR schedule, step number). DDP has all-reduced the gradients, so every rank sees
        the same norm and skips alike."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        for i, (x0, y) in enumerate(batches):
            sync = i == len(batches) - 1 or not hasattr(self.model, "no_sync")
            with contextlib.nullcontext() if sync else self.model.no_sync():
                with self._autocast():
                    loss = self.loss_fn(self.network, self.schedule, x0, y, self.loss_generator) / len(batches)
                self.scaler.scale(loss).backward()
            total += loss.detach()
        self.scaler.unscale_(self.optimizer)  # fp16: also records the scaler's own inf check, for update()
        grad_norm = grad_norm_(self.raw_model.parameters(), self.settings.grad_clip).detach()
        taken = torch.isfinite(grad_norm)
        optimizer_step(self.optimizer, (~taken).float())
        self.scaler.update()  # fp16: a smaller loss scale after an overflow
        self.lr_scheduler.step()
        self.ema.update(self.raw_model, taken)
        self.step += 1
        return total, grad_norm, taken

    @property
    def resume_hint(self) -> str:
        job = "train-vae" if self.kind == "vae" else "train"
        return f"resume with `diffuse {job} resume={self.run_dir}`"

    def fit(self) -> dict:
        """Train to max_steps, or until the time budget is spent or a signal asks to stop (then checkpoint;
        a signal ends in Interrupted after the checkpoint, the budget in a normal return)."""
        if self.dist.is_main:
            mark_run(self.run_dir, self.kind)
        with StopRequest(self.dist, self.settings.max_time_s) as stop:
            summary = self._loop(stop)
            reason = summary.pop("stop_code")
            if reason and reason != TIME_BUDGET:
                message = f"stopped by {stop.describe(reason)} at step {self.step}; {self.resume_hint}"
                if self.dist.is_main:
                    log.warning(message)
                stop.chain(reason)  # a launcher's own handler (submitit: requeue) after our checkpoint
                raise Interrupted(message, stop.signal_of(reason))
        if reason == TIME_BUDGET and self.dist.is_main:
            log.info("time budget (trainer.max_time) spent at step %d of %d; %s", self.step, self.max_steps,
                     self.resume_hint)
        return summary

    def _loop(self, stop: StopRequest) -> dict:
        """The steps, each followed by the callbacks due. The host reads device values (loss, skipped steps)
        only where a callback runs and every max_nonfinite_steps steps; between those it only queues work."""
        limit = self.settings.max_nonfinite_steps
        self.bar = tqdm(total=self.max_steps, initial=self.step, disable=not self.dist.is_main, desc="train",
                        dynamic_ncols=True)
        self.meter, nonfinite = StepMeter(self.device), NonFiniteSteps(self.device, limit, self.skipped_steps)
        measured, reason = {}, 0
        while self.step < self.max_steps and not reason:
            batches = [next(self.data) for _ in range(self.settings.grad_accum_steps)]
            loss, grad_norm, taken = self.train_step(batches)
            nonfinite.record(self.step, taken, loss, grad_norm)
            self.meter.add(loss, grad_norm, taken, sum(x0.shape[0] for x0, _ in batches) * self.dist.world_size)
            self.bar.update(1)
            reason = stop.check()
            event = StepEnd(self.step, at_end=self.step == self.max_steps or bool(reason),
                            interrupted=bool(reason) and reason != TIME_BUDGET)
            if self.step % limit == 0 or any(c.due(event) for c in self.callbacks):
                self._read_skipped(nonfinite)
            for callback in self.callbacks:
                if callback.due(event):
                    event.metrics.update(self._run_callback(callback, event) or {})
            measured.update(event.metrics)
        self.bar.close()
        if self.skipped_steps and self.dist.is_main:
            log.warning("%d of %d steps were skipped for a non-finite loss or gradient", self.skipped_steps,
                        self.step)
        return {"step": self.step, "loss": self.last_loss, "checkpoint": str(self.checkpoint_path),
                "skipped_steps": self.skipped_steps, **measured, "stop_code": reason}

    def _run_callback(self, callback: Callback, event: StepEnd) -> dict | None:
        if not callback.main_only:
            return callback(self, event)
        out = callback(self, event) if self.dist.is_main else None
        barrier(self.dist)
        return out

    def _read_skipped(self, nonfinite: NonFiniteSteps) -> None:
        """Bring the device's count of skipped steps to the host; stop the run on too many in a row."""
        try:
            self.skipped_steps = nonfinite.read()
        except DiffuseError as e:
            raise DiffuseError(f"{e}: training stopped; last good checkpoint kept: {self.kept()}") from None


def _as_tuple(value) -> tuple:
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)

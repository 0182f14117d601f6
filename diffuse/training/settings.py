"""The `trainer` config node as one typed object: every key users type under `trainer.`, its type, the value a
config that lacks it gets (configs stored by older versions), and its rule (checked by `validation`).

conf/trainer/default.yaml documents each key and sets the values a new run starts with; the defaults here
only fill keys a stored or hand-written config does not have.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar

from diffuse.devices import COMPILE_MODES
from diffuse.errors import DiffuseError
from diffuse.rules import BOOL, POSITIVE, PROBABILITY, Choice, Float, Int, Pair, Rule
from diffuse.training.stopping import parse_max_time

LR_SCHEDULES = ("onecycle", "cosine", "constant")
PRECISION = Choice("fp32", "bf16", "fp16", "auto")


@dataclass(frozen=True)
class TrainerSettings:
    # length and batches
    max_steps: int | None = 1000          # optimizer steps (ignored when epochs is set)
    epochs: int | None = None             # passes over the data instead
    max_time: float | str | None = None   # time budget: minutes or DD:HH:MM:SS (see stopping.parse_max_time)
    batch_size: int = 64                  # per process
    grad_accum_steps: int = 1             # micro-batches per optimizer step
    # optimizer, LR schedule, EMA
    lr: float = 2e-3
    lr_schedule: str = "onecycle"
    warmup_steps: int = 0
    pct_start: float = 0.3
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    ema_decay: float = 0.999
    ema_warmup: bool = True
    grad_clip: float | None = 1.0
    cond_drop_prob: float = 0.1           # classifier-free guidance: labels dropped to the null class
    # how the step runs
    precision: str = "auto"               # devices.resolve_precision
    compile: bool | str = False
    cuda_graphs: bool | str = False
    channels_last: bool | str = "auto"
    # what the loop does besides stepping (each a callback: training/callbacks.py)
    log_every: int = 25
    checkpoint_every: int = 500
    keep_checkpoints: int | None = 3
    max_nonfinite_steps: int = 20
    val_every: int = 500
    val_items: int = 256
    eval_every: int = 0
    eval_metric: str = "fd"
    eval_num_samples: int = 256
    eval_sampler_steps: int | None = 50
    eval_inception_weights: str | None = None
    sample_every: int = 500
    sample_steps: int | str | None = "auto"
    num_sample_images: int | str = "auto"
    grid_max_columns: int = 16
    final_samples: bool = True
    final_animation: bool = True
    dist_timeout_min: float = 60.0

    config_rules: ClassVar[dict[str, Rule | None]] = {
        "max_steps": Int(1, nullable=True), "epochs": Int(1, nullable=True), "max_time": None,  # parse_max_time
        "batch_size": Int(1), "grad_accum_steps": Int(1),
        "lr": POSITIVE, "lr_schedule": Choice(*LR_SCHEDULES), "warmup_steps": Int(0),
        "pct_start": Float(0, 1, open_lo=True, open_hi=True), "min_lr_ratio": PROBABILITY,
        "weight_decay": Float(0), "betas": Pair(0, 1, open_hi=True), "ema_decay": Float(0, 1, open_hi=True),
        "ema_warmup": BOOL, "grad_clip": Float(0, open_lo=True, nullable=True),
        "cond_drop_prob": Float(0, 1, open_hi=True),
        "precision": PRECISION, "compile": Choice(True, False, *COMPILE_MODES),
        "cuda_graphs": Choice("auto", True, False), "channels_last": Choice("auto", True, False),
        "log_every": Int(1), "checkpoint_every": Int(1), "keep_checkpoints": Int(0, nullable=True),
        "max_nonfinite_steps": Int(1), "val_every": Int(0), "val_items": Int(0), "eval_every": Int(0),
        "eval_metric": Choice("fd", "fid"), "eval_num_samples": Int(2), "eval_sampler_steps": Int(1, nullable=True),
        "eval_inception_weights": None, "sample_every": Int(0), "sample_steps": Int(1, nullable=True, auto=True),
        "num_sample_images": Int(1, auto=True), "grid_max_columns": Int(1), "final_samples": BOOL,
        "final_animation": BOOL, "dist_timeout_min": POSITIVE,
    }

    @classmethod
    def from_config(cls, node) -> "TrainerSettings":
        """From a `trainer` node (DictConfig or mapping); keys it lacks take the defaults above."""
        values = {f.name: node[f.name] for f in fields(cls) if f.name in node}
        if "betas" in values:
            values["betas"] = tuple(float(b) for b in values["betas"])
        return cls(**values)

    def total_steps(self, batches_per_epoch: int) -> int:
        """The run's optimizer steps: epochs × batches per epoch when epochs is set, else max_steps."""
        steps = int(self.epochs) * batches_per_epoch if self.epochs else self.max_steps
        if not steps or steps < 1:
            raise DiffuseError("set trainer.max_steps or trainer.epochs to a positive number")
        return int(steps)

    @property
    def max_time_s(self) -> float | None:
        return parse_max_time(self.max_time)

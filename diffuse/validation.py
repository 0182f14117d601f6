"""The composed config, checked before any work starts: one line per bad value, naming the key, the value
and what is allowed.

Rules are a table per job (top-level keys) plus one per component group (model, dataset, schedule,
sampler, vae), applied to whichever of their keys the chosen component has, so `sampler.eta` is checked for
DDIM and `model.channel_mult` for the UNet without a schema per class. Component constructors still check
what only they can (a ShuffleNet is 2-D only); `check_model_fits_data` then runs the built model once on
a zero batch of the data's shape, which catches every resolution a model cannot downsample.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from diffuse.diffusion.guidance import is_guided
from diffuse.errors import DiffuseError
from diffuse.training.loop import COMPILE_MODES
from diffuse.training.stopping import parse_max_time

SPACINGS = ("auto", "linspace", "leading", "trailing", "karras", "logsnr")
TRAIN_METRICS = ("val_loss", "loss", "fd", "fid")  # the summary values of `diffuse train` a sweep can optimise


@dataclass(frozen=True)
class Rule:
    """kind: int | float | bool | choice | pair | ints; lo/hi bounds (inclusive unless open_lo/open_hi);
    auto: the string "auto" is allowed too (a value the job works out, e.g. trainer.num_sample_images)."""

    kind: str
    lo: float | None = None
    hi: float | None = None
    open_lo: bool = False
    open_hi: bool = False
    choices: tuple = ()
    nullable: bool = False
    auto: bool = False
    infinite: bool = False  # float: ±inf allowed (sampler.s_tmax: .inf); NaN never is

    def allowed(self) -> str:
        if self.kind == "bool":
            text = "true or false"
        elif self.kind == "choice" and all(isinstance(c, int) for c in self.choices):
            text = ", ".join(map(str, self.choices[:-1])) + f" or {self.choices[-1]}"  # "1, 2 or 3"
        elif self.kind == "choice":
            text = "one of " + ", ".join(_show(c) for c in self.choices)
        else:
            noun = {"int": "an integer", "float": "a number", "pair": "two numbers [a, b] with a < b",
                    "ints": "a non-empty list of integers"}[self.kind]
            if self.lo is not None and self.hi is not None:
                bounds = [f"in {'(' if self.open_lo else '['}{_fmt(self.lo)}, {_fmt(self.hi)}{')' if self.open_hi else ']'}"]
            elif self.lo is not None:
                bounds = [f"{'>' if self.open_lo else '≥'} {_fmt(self.lo)}"]
            elif self.hi is not None:
                bounds = [f"{'<' if self.open_hi else '≤'} {_fmt(self.hi)}"]
            else:
                bounds = []
            sep = ", each " if self.kind in ("pair", "ints") else " "
            text = noun + (sep + bounds[0] if bounds else "")
        return text + (", auto" if self.auto and self.nullable else ", or auto" if self.auto else "") \
            + (" or null" if self.nullable and self.auto else ", or null" if self.nullable else "")

    def _in_range(self, v: float) -> bool:
        if isinstance(v, float) and (math.isnan(v) or (math.isinf(v) and not self.infinite)):
            return False
        if self.lo is not None and (v < self.lo or (self.open_lo and v == self.lo)):
            return False
        return not (self.hi is not None and (v > self.hi or (self.open_hi and v == self.hi)))

    def ok(self, v) -> bool:
        if v is None:
            return self.nullable
        if self.auto and v == "auto":
            return True
        if self.kind == "bool":
            return isinstance(v, bool)
        if self.kind == "choice":
            return any(v == c and type(v) is type(c) for c in self.choices)
        if self.kind == "int":
            return isinstance(v, int) and not isinstance(v, bool) and self._in_range(v)
        if self.kind == "float":
            return isinstance(v, (int, float)) and not isinstance(v, bool) and self._in_range(float(v))
        if self.kind in ("pair", "ints"):
            if not isinstance(v, (list, tuple, ListConfig)) or not len(v):
                return False
            want = int if self.kind == "ints" else (int, float)
            if not all(isinstance(x, want) and not isinstance(x, bool) and self._in_range(x) for x in v):
                return False
            return self.kind == "ints" or (len(v) == 2 and v[0] < v[1])
        raise ValueError(self.kind)


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def Int(lo=None, hi=None, nullable=False, auto=False):  # noqa: N802 - reads as a type in the tables below
    return Rule("int", lo, hi, nullable=nullable, auto=auto)


def Float(lo=None, hi=None, open_lo=False, open_hi=False, nullable=False, auto=False, infinite=False):  # noqa: N802
    """A finite number (infinite=True: ±inf too) within the bounds."""
    return Rule("float", lo, hi, open_lo, open_hi, nullable=nullable, auto=auto, infinite=infinite)


def Choice(*choices, nullable=False):  # noqa: N802
    return Rule("choice", choices=choices, nullable=nullable)


BOOL = Rule("bool")
POSITIVE = Float(0, open_lo=True)
PROBABILITY = Float(0, 1)

PRECISION = Choice("fp32", "bf16", "fp16", "auto")
MAX_SEED = 2**32 - 1  # sample i draws with seed + i, the loss generator with seed·7919 + rank: all within 64 bits
COMMON = {"seed": Int(0, MAX_SEED), "device": None}  # device: checked by resolve_device (cuda:N etc.)
GUIDANCE = {"guidance.scale": Float(0, auto=True)}

TRAINER = {
    "max_steps": Int(1, nullable=True), "epochs": Int(1, nullable=True), "batch_size": Int(1),
    "lr": POSITIVE, "lr_schedule": Choice("onecycle", "cosine", "constant"), "warmup_steps": Int(0),
    "pct_start": Float(0, 1, open_lo=True, open_hi=True), "min_lr_ratio": PROBABILITY,
    "weight_decay": Float(0), "betas": Rule("pair", 0, 1, open_hi=True), "ema_decay": Float(0, 1, open_hi=True),
    "ema_warmup": BOOL, "grad_clip": Float(0, open_lo=True, nullable=True),
    "precision": PRECISION,
    "compile": Choice(True, False, *COMPILE_MODES), "cuda_graphs": Choice("auto", True, False),
    "channels_last": Choice("auto", True, False), "cond_drop_prob": Float(0, 1, open_hi=True),
    "log_every": Int(1), "checkpoint_every": Int(1), "keep_checkpoints": Int(0, nullable=True),
    "max_nonfinite_steps": Int(1), "sample_every": Int(0), "sample_steps": Int(1, nullable=True, auto=True),
    "num_sample_images": Int(1, auto=True), "grid_max_columns": Int(1), "final_samples": BOOL, "final_animation": BOOL, "val_every": Int(0), "val_items": Int(0),
    "grad_accum_steps": Int(1), "dist_timeout_min": POSITIVE, "eval_every": Int(0),
    "eval_metric": Choice("fd", "fid"), "eval_num_samples": Int(2), "eval_sampler_steps": Int(1, nullable=True),
}
SAMPLER = {
    "steps": Int(1, auto=True), "spacing": Choice(*SPACINGS), "clip_x0": BOOL,
    "clip_range": Rule("pair"), "dynamic_threshold": Float(0, 1, open_lo=True, nullable=True), "eta": PROBABILITY, "variance": Choice("beta", "posterior"),
    "t_end": Float(0, 1, open_lo=True, open_hi=True, nullable=True), "snr": POSITIVE,
    "corrector_steps": Int(0), "s_churn": Float(0), "s_tmin": Float(0), "s_tmax": Float(0, infinite=True), "s_noise": POSITIVE,
}
SCHEDULE = {
    "num_timesteps": Int(2), "beta_start": Float(0, 1, open_lo=True, open_hi=True),
    "beta_end": Float(0, 1, open_lo=True, open_hi=True), "s": Float(0), "max_beta": Float(0, 1, open_lo=True),
    "sigma": Float(1, open_lo=True), "eps": Float(0, 1, open_lo=True, open_hi=True),
}
DATASET = {
    "dim": Choice(1, 2, 3), "resolution": Int(2), "channels": Int(1), "num_classes": Int(0, nullable=True),
    "size": Int(1), "download": BOOL, "hflip": Rule("bool", nullable=True), "num_workers": Int(0, nullable=True),
    "max_memory_mb": Float(0, open_lo=True),
}
MODEL = {
    "dim": Choice(1, 2, 3), "in_channels": Int(1), "base_channels": Int(1), "channel_mult": Rule("ints", 1),
    "num_res_blocks": Int(1), "attn_levels": Rule("ints", 0), "attn_heads": Int(1), "time_emb_dim": Int(2),
    "num_classes": Int(0), "dropout": Float(0, 1, open_hi=True), "mid_depth": Int(0), "mlp_ratio": POSITIVE,
    "units": Int(1), "channels": Rule("ints", 1), "embed_dim": Int(2), "context_dim": Int(1), "heads": Int(1),
    "fourier_scale": POSITIVE, "norm": Choice("group", "batch"),
}
VAE = {
    "dim": Choice(1, 2, 3), "in_channels": Int(1), "channels": Int(1), "channel_mult": Rule("ints", 1),
    "num_res_blocks": Int(1), "latent_channels": Int(1), "scale_factor": None,  # a number or auto
}
GROUPS = {"trainer": TRAINER, "sampler": SAMPLER, "schedule": SCHEDULE, "dataset": DATASET, "model": MODEL,
          "vae": VAE}

JOBS = {
    "train": {**COMMON, **GUIDANCE, "dim": Choice(1, 2, 3), "conditional": BOOL, "objective.prediction": Choice("eps", "x0", "v"),
              "objective.weighting": Choice("none", "min_snr"), "objective.min_snr_gamma": POSITIVE,
              "latent.cache": BOOL, "latent.sample": BOOL, "init_weights": Choice("ema", "raw"),
              "init_skip_mismatched": BOOL,
              "logger.mode": Choice("auto", "online", "offline", "disabled")},
    "train_vae": {**COMMON, "dim": Choice(1, 2, 3), "loss.reconstruction": Choice("l1", "l2"),
                  "loss.kl_weight": Float(0), "scale_batches": Int(1), "evaluate.max_items": Int(1, nullable=True),
                  "logger.mode": Choice("auto", "online", "offline", "disabled")},
    "sample": {**COMMON, **GUIDANCE, "num_samples": Int(1), "class_label": Int(0, nullable=True), "batch_size": Int(1),
               "precision": PRECISION, "use_ema": BOOL, "view": Choice("slices", "mip"),
               "grid_max_columns": Int(1), "animation.enabled": BOOL, "animation.frames": Int(2), "animation.fps": Int(1),
               "animation.format": Choice("gif", "mp4"), "animation.hold": Float(0), "animation.strip_steps": Int(1)},
    "evaluate": {**COMMON, **GUIDANCE, "num_samples": Int(2), "label_bank": Int(1), "download": BOOL, "batch_size": Int(1), "precision": PRECISION,
                 "use_ema": BOOL, "save_samples": BOOL, "inception_batch_size": Int(1), "kid_subset_size": Int(2),
                 "kid_subsets": Int(1), "prc_neighborhood": Int(1)},
    "export": {"use_ema": BOOL},
    "stored": {**GUIDANCE, "dim": Choice(1, 2, 3), "conditional": BOOL, "objective.prediction": Choice("eps", "x0", "v"),
               "objective.weighting": Choice("none", "min_snr"), "objective.min_snr_gamma": POSITIVE},
}


def _plain(v):
    return OmegaConf.to_container(v, resolve=True) if isinstance(v, (DictConfig, ListConfig)) else v


def _check(key: str, value, rule: Rule | None) -> None:
    if rule is not None and not rule.ok(_plain(value)):
        raise DiffuseError(f"{key} must be {rule.allowed()}; got {_show(value)}")


def _show(value) -> str:
    value = _plain(value)
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def validate(cfg: DictConfig, job: str, groups: Sequence[str] = tuple(GROUPS)) -> None:
    """Check every value of a composed `job` config (train, train_vae, sample, evaluate) against its rule."""
    for key, rule in JOBS.get(job, {}).items():
        value = OmegaConf.select(cfg, key, default="__missing__")
        if value != "__missing__":
            _check(key, value, rule)
    for group in groups:
        rules, node = GROUPS[group], cfg.get(group)
        if not isinstance(node, DictConfig):
            continue
        if group in ("model", "vae") and not str(node.get("_target_") or "diffuse.").startswith("diffuse."):
            continue  # a network of the user's own: its arguments mean what it says (`channels: 64` is fine)
        for key, rule in rules.items():
            if key in node:
                _check(f"{group}.{key}", node[key], rule)
    _check_combinations(cfg, job)


# What sampling reads from a stored config (a checkpoint's or an export's config.json), checked by the same rules
# as the command line's: the trainer's settings are not (a run already trained with them).
STORED_GROUPS = ("model", "schedule", "sampler", "dataset")


def validate_stored(config, source: str) -> None:
    """A config read from a file: the rules of the groups sampling builds, and the run keys it reads (dim,
    conditional, objective, guidance, seed); one line naming the file."""
    cfg = config if isinstance(config, DictConfig) else OmegaConf.create(config)
    try:
        validate(cfg, "stored", STORED_GROUPS)
    except DiffuseError as e:
        raise DiffuseError(f"{source}: stored config: {e}") from None


def _check_combinations(cfg: DictConfig, job: str) -> None:
    trainer = cfg.get("trainer") if job != "stored" else None  # a stored run trained already
    sampler = cfg.get("sampler")
    if isinstance(sampler, DictConfig) and "guidance_scale" in sampler:
        raise DiffuseError("sampler.guidance_scale is now guidance.scale (guidance belongs to the denoiser, which "
                           "every sampler calls, not to a sampler): use guidance.scale=W")
    if trainer is not None and trainer.get("max_steps") is None and trainer.get("epochs") is None:
        raise DiffuseError("trainer.max_steps and trainer.epochs are both null: set one to a positive number")
    schedule = cfg.get("schedule")
    if schedule is not None and "beta_start" in schedule and schedule.beta_start >= schedule.beta_end:
        raise DiffuseError(f"schedule.beta_start={schedule.beta_start} must be below "
                           f"schedule.beta_end={schedule.beta_end}")
    metric = cfg.get("optimized_metric")
    if job == "train" and metric is not None:
        if metric not in TRAIN_METRICS:
            raise DiffuseError(f"optimized_metric must be one of {', '.join(TRAIN_METRICS)} (what `diffuse train` "
                               f"returns), or null; got {metric}")
    if trainer is not None and "max_time" in trainer:
        parse_max_time(trainer.max_time)
    # resume=self (a requeued job) may come with init_from: the first start loads it, a restart resumes; a
    # resumed run's merged config keeps the command line's init_from beside `initialized_from` (ignored there)
    if job == "train" and cfg.get("init_from") and cfg.get("resume") not in (None, "", "self") \
            and not cfg.get("initialized_from"):
        raise DiffuseError(f"init_from={cfg.init_from} starts a new run from another run's weights, resume={cfg.resume} "
                           "continues a run with all it had: give one of them")
    if job == "train" and cfg.get("guidance") is not None and trainer is not None:
        run_guidance_scale(cfg, "this run")


# guidance.scale=auto on a run that learned a null class. The few-step table (README, Benchmarks) on MNIST after
# 19 minutes, DPM-Solver++ at 10 guided steps (20 network passes): w 1.0 → FD 0.228, label agreement 0.894;
# 1.1 → 0.233, 0.917; 1.2 → 0.252, 0.926; 1.5 → 0.345, 0.968. 1.1 buys the asked class for little diversity.
AUTO_GUIDANCE_SCALE = 1.1


def guidance_scale(value, conditional: bool, cond_drop_prob: float, run: str) -> float:
    """guidance.scale as the number to sample with. auto: AUTO_GUIDANCE_SCALE for a class-conditional run
    trained with label dropout (it has a null class to guide with), else 0 (none); a number is checked
    against how the run was trained (check_guidance)."""
    if value == "auto":
        return AUTO_GUIDANCE_SCALE if conditional and cond_drop_prob > 0 else 0.0
    scale = float(value or 0.0)
    check_guidance(scale, conditional, cond_drop_prob, run)
    return scale


def run_guidance_scale(config, run: str, scale=None) -> float:
    """guidance_scale for a run's config (composed or stored; DictConfig or dict): `scale`, or when None the
    config's own guidance.scale (auto when it has none), against how that run was trained."""
    if scale is None:
        scale = (config.get("guidance") or {}).get("scale", "auto")
    cond_drop_prob = float((config.get("trainer") or {}).get("cond_drop_prob") or 0.0)
    return guidance_scale(scale, bool(config.get("conditional")), cond_drop_prob, run)


# sampler.steps=auto (dpm_solver's default): 20 network passes per sample, i.e. 20 steps, or 10 guided steps
# (each one pass over the conditional and the null-class copies, as costly as two plain steps).
AUTO_NETWORK_PASSES = 20


def with_steps(node, guidance: float):
    """The sampler node with steps=auto made a number (AUTO_NETWORK_PASSES per sample at this guidance scale);
    any other node as it is."""
    if node is None or node.get("steps") != "auto":
        return node
    return OmegaConf.merge(node, {"steps": AUTO_NETWORK_PASSES // (2 if is_guided(guidance) else 1)})


def check_guidance(scale: float, conditional: bool, cond_drop_prob: float, run: str) -> None:
    """Classifier-free guidance mixes the conditional prediction with the null class's, which a model only
    learns when labels were dropped in training (cond_drop_prob > 0): refuse it on a model that never did."""
    if scale in (0.0, 1.0):
        return
    if not conditional:
        raise DiffuseError(f"guidance.scale={scale} needs a class-conditional model; {run} is "
                           "unconditional (conditional=false): use guidance.scale=0")
    if cond_drop_prob <= 0:
        raise DiffuseError(f"guidance.scale={scale} needs a model trained with trainer.cond_drop_prob > 0: "
                           f"{run} used 0, so its null class never learned anything and guidance would sample "
                           "garbage; use guidance.scale=0 (or retrain with cond_drop_prob=0.1)")


MAX_ITEM_VALUES = 2**28  # one item of 1 GiB in fp32 (3-D 512³ is 2**27): larger is a typo, not a dataset


def check_model_fits_data(model: torch.nn.Module, shape: Sequence[int], num_classes: int, what: str) -> None:
    """Run the model once on a zero batch of one item [1, *shape] (on the model's device)
    so that a resolution it cannot downsample, or too few channels, is one line now, not a traceback later."""
    if math.prod(int(v) for v in shape) > MAX_ITEM_VALUES:
        raise DiffuseError(f"{what}: one item of shape {tuple(shape)} holds more than {MAX_ITEM_VALUES} values, "
                           "more than any network here trains on: lower dataset.resolution")
    was_training = model.training
    try:
        device = next(model.parameters(), torch.zeros(())).device
        x = torch.zeros(1, *shape, device=device)  # inside: a shape too large to allocate is the config's error too
        y = torch.zeros(1, dtype=torch.long, device=device) if num_classes else None
        with torch.no_grad():
            model.eval()(x, torch.full((1,), 0.5, device=device), y)
    except (ValueError, RuntimeError, MemoryError, TypeError, IndexError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DiffuseError(f"{what} does not fit model {type(model).__name__}: {msg}") from None
    finally:
        model.train(was_training)

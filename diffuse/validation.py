"""The composed config, checked before any work starts: one line per bad value, naming the key, the value
and what is allowed.

Where the rules come from: a job's own keys from the table JOBS below; `trainer.*` from TrainerSettings; a
part's keys (sampler, schedule, dataset, model, vae) from the class its `_target_` names, which declares them
(`config_rules`, see diffuse/rules.py) beside its constructor, so a new part brings its rules with it. A key its
constructor does not take is refused. Constructors still check what only they can (a ShuffleNet is 2-D only);
`check_model_fits_data` then runs the built model once on a zero batch of the data's shape, which catches
every resolution a model cannot downsample.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from diffuse.building import LOCATION_KEYS, part_class
from diffuse.diffusion.samplers import Sampler
from diffuse.errors import DiffuseError
from diffuse.rules import BOOL, POSITIVE, Choice, Float, Int, Rule, accepted_keys, declared_rules
from diffuse.training.settings import PRECISION, TrainerSettings
from diffuse.training.stopping import parse_max_time

TRAIN_METRICS = ("val_loss", "loss", "fd", "fid")  # the summary values of `diffuse train` a sweep can optimise

MAX_SEED = 2**32 - 1  # sample i draws with seed + i, the loss generator with seed·7919 + rank: all within 64 bits
COMMON = {"seed": Int(0, MAX_SEED), "device": None}  # device: checked by resolve_device (cuda:N etc.)
GUIDANCE = {"guidance.scale": Float(0, auto=True)}

# The groups whose node names a part by `_target_`: its class declares the rules (rules.declared_rules).
PART_GROUPS = ("sampler", "schedule", "dataset", "model", "vae")
GROUPS = ("trainer", *PART_GROUPS)

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
                 "kid_subsets": Int(1), "prc_neighborhood": Int(1), "memorization_k": Int(2),
                 "memorization_threshold": Float(0, 1, open_lo=True), "memorization_max_train": Int(2)},
    "edit": {**COMMON, **GUIDANCE, "mode": Choice("inpaint", "img2img", "invert", "interpolate"),
             "input.count": Int(1), "num_samples": Int(1), "method": Choice("auto", "replacement", "reconstruction", "repaint"), "reconstruction_weight": Float(0),
             "jump_length": Int(1), "resample": Int(1), "strength": Float(0, 1, open_lo=True), "frames": Int(2),
             "batch_size": Int(1), "precision": PRECISION, "use_ema": BOOL, "view": Choice("slices", "mip"),
             "animation.enabled": BOOL, "animation.frames": Int(2), "animation.fps": Int(1),
             "animation.format": Choice("gif", "mp4"), "animation.hold": Float(0)},
    "export": {"use_ema": BOOL, "format": Choice("diffuse", "diffusers"), "push_private": BOOL},
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


def validate(cfg: DictConfig, job: str, groups: Sequence[str] = GROUPS) -> None:
    """Check every value of a composed `job` config (train, train_vae, sample, evaluate) against its rule:
    the job's own keys (JOBS), `trainer.*` (TrainerSettings), and each part's keys against the rules its class
    declares, refusing a key its constructor does not take."""
    for key, rule in JOBS.get(job, {}).items():
        value = OmegaConf.select(cfg, key, default="__missing__")
        if value != "__missing__":
            _check(key, value, rule)
    for group in groups:
        node = cfg.get(group)
        if not isinstance(node, DictConfig):
            continue
        if group == "trainer":
            _check_node(node, group, TrainerSettings.config_rules, None)
        else:
            _check_part(node, group)
    _check_combinations(cfg, job)


def _check_node(node: DictConfig, prefix: str, rules: dict, accepted: set[str] | None, owner: str = "") -> None:
    for key in node:
        if str(key).startswith("_"):
            continue
        if accepted is not None and key not in accepted and key not in LOCATION_KEYS:  # locations: see building
            raise DiffuseError(f"{prefix}.{key} is not a setting of {owner}: it takes "
                               f"{', '.join(sorted(accepted))}")
        rule = rules.get(key)
        if rule is not None:
            _check(f"{prefix}.{key}", node[key], rule)
        child = node._get_node(key)
        if isinstance(child, DictConfig) and "_target_" in child:  # a part inside a part (a latent set's data)
            _check_part(child, f"{prefix}.{key}")


def _check_part(node: DictConfig, prefix: str) -> None:
    """A part's node against its class's declared rules. Only our own parts' classes are imported here: a class
    of the user's is checked by its own constructor when built, after the allow-list (building.check_targets)."""
    if "_target_" not in node and prefix == "sampler":  # sample/evaluate: values over the run's own sampler
        _check_node(node, prefix, _every_sampler_rule(), None)
        return
    cls = part_class(node.get("_target_"))
    if cls is not None:
        _check_node(node, prefix, declared_rules(cls), accepted_keys(cls), cls.__name__)


def _every_sampler_rule() -> dict:
    """The rules any of our samplers declares for a key (the run's sampler is known only once it is read;
    open_run checks the merged node against that class)."""
    rules, todo = {}, [Sampler]
    while todo:
        cls = todo.pop()
        rules = {**declared_rules(cls), **rules}
        todo += cls.__subclasses__()
    return rules


# What sampling reads from a stored config (a checkpoint's or an export's config.json), checked by the same rules
# as the command line's: the trainer's settings are not (a run already trained with them).
STORED_GROUPS = ("model", "schedule", "sampler", "dataset")


def validate_part(node: DictConfig, group: str) -> None:
    """One part's node (e.g. the sampler a sample job merged over the run's own) against its class's rules."""
    _check_part(node if isinstance(node, DictConfig) else OmegaConf.create(node), group)


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
    scale = (cfg.get("guidance") or {}).get("scale", "auto")
    if job == "train" and trainer is not None and scale != "auto":  # auto is always possible (jobs/sampling_setup)
        check_guidance(float(scale or 0.0), bool(cfg.get("conditional")), float(trainer.get("cond_drop_prob") or 0.0),
                       "this run")


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

"""`diffuse train`: compose data, model, schedule, loss and trainer from the config, then fit."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from diffuse import media
from diffuse.building import build
from diffuse.data.latent import CHECKPOINT_KEY, LATENT_DATASET, NO_EMBEDDED_VAE, LatentDataset, is_latent_run
from diffuse.data.loader import BatchStream
from diffuse.diffusion.generation import SamplingPlan
from diffuse.diffusion.guidance import null_class_of
from diffuse.diffusion.objectives import DiffusionLoss
from diffuse.dims import config_item_shape
from diffuse.errors import DiffuseError
from diffuse.jobs.common import build_dataset, data_shape, fit, run_trainer_process, start_run
from diffuse.jobs.latent_space import latent_sampler_config, use_latent_space
from diffuse.training.heldout import HeldOutLoss
from diffuse.training.init_weights import start_from_weights
from diffuse.training.loop import Trainer
from diffuse.training.sample_grids import SampleGrids
from diffuse.training.sample_quality import SampleQuality
from diffuse.validation import check_model_fits_data, run_guidance_scale, with_steps

log = logging.getLogger(__name__)

def run(cfg: DictConfig, run_dir: Path, overrides: list[str] | None = None) -> dict:
    return run_trainer_process(cfg, Path(run_dir), overrides or [], "diffusion", _train)


# trainer.num_sample_images / sample_steps = auto: today's 32 images × 250 steps up to this many values per
# sample (every 1-D set, 2-D up to 128² grey or 64² RGB); above it, about SAMPLE_BUDGET values per grid
# (8 samples of 32³) at AUTO_STEPS_BIG steps (the msnat_3d experiment's 8 × 50): 20× less than 32 × 250, the
# >10 min end of a 3-D run on the CPU, which a single CPU core still needs ~6 min for at 32³ with MSNAT.
AUTO_SMALL_VALUES, SAMPLE_BUDGET = 16384, 8 * 32 ** 3
AUTO_IMAGES, AUTO_STEPS, AUTO_STEPS_BIG, AUTO_MIN_IMAGES = 32, 250, 50, 4


def training_sample_counts(num_images, steps, sample_shape, sampler_max_steps: int) -> tuple[int, int]:
    """(samples, sampler steps) of the training-time grids: numbers as given (steps at most the sampler's
    own; null = the sampler's own), `auto` by the values per sample (channels × spatial size):
    ≤ 16384 (1-D, 2-D up to 128² grey / 64² RGB): 32 samples × 250 steps, as before; more (3-D 32³ = 32768,
    2-D 128² RGB): 8 × 32³ values in all, in multiples of 4 (8 samples at 32³, at least 4), × 50 steps."""
    values = math.prod(int(v) for v in sample_shape)
    small = values <= AUTO_SMALL_VALUES
    if num_images == "auto":
        num_images = AUTO_IMAGES if small else max(AUTO_MIN_IMAGES, SAMPLE_BUDGET // values // 4 * 4)
    if steps == "auto":
        steps = AUTO_STEPS if small else AUTO_STEPS_BIG
    steps = sampler_max_steps if steps is None else min(int(steps), sampler_max_steps)
    return int(num_images), steps


def heldout_dataset(cfg: DictConfig, n: int, pixels: bool = False):
    """The held-out items of the validation loss: the dataset's test split where it has splits, `shapes` from
    another seed range; None for data with neither (the loss then uses training items, with a warning).
    pixels: for a latent run, the data under the VAE rather than its latents."""
    node = OmegaConf.to_container(cfg.dataset, resolve=True)
    latent = node.get("_target_") == LATENT_DATASET
    if latent and pixels:
        node, latent = node["data"], False
    inner = node["data"] if latent else node
    if "split" in inner:
        inner["split"] = "test"
    elif inner.get("_target_", "").endswith(".ShapesDataset"):
        inner.update(seed=int(inner.get("seed", 0)) + 1_000_003, size=n)  # indices never seen in training
    else:
        return None
    if latent:
        node["cache"] = False  # encode only the items used
    return build(node, "held-out dataset")


def run_guidance(cfg: DictConfig) -> float:
    """The guidance scale of this run's own samples (guidance.scale; auto: guided when it learns a null class)."""
    return run_guidance_scale(cfg, "this run")


def run_sampler(cfg: DictConfig) -> DictConfig:
    """The run's own sampler node (latent runs: unclipped), steps=auto made a number."""
    return with_steps(latent_sampler_config(cfg.sampler, is_latent_run(cfg)), run_guidance(cfg))


def sampling_plan(cfg: DictConfig, schedule, sample_shape, device, steps: int | None = None) -> SamplingPlan:
    """The run's own sampler (run_sampler), `steps` of it when given, guided by `guidance.scale`."""
    node = run_sampler(cfg)
    if steps is not None:
        node = OmegaConf.merge(node, {"steps": int(steps)})
    return SamplingPlan(schedule, build(node, "sampler"), sample_shape, cfg.objective.prediction,
                        run_guidance(cfg), int(cfg.trainer.batch_size), device, int(cfg.seed))


def sample_grids(cfg: DictConfig, schedule, dataset, data, class_names, tracker, run_dir: Path, device) -> SampleGrids:
    """trainer.sample_every's grids, with counts that scale with the data's size (training_sample_counts)."""
    tcfg, shape = cfg.trainer, data_shape(dataset)
    num_images, steps = training_sample_counts(tcfg.get("num_sample_images", "auto"), tcfg.get("sample_steps", "auto"),
                                               shape, int(run_sampler(cfg).steps))
    return SampleGrids(sampling_plan(cfg, schedule, shape, device, steps), num_images, class_names,
                       run_dir / "samples", tracker, data,
                       max_columns=int(tcfg.get("grid_max_columns", media.GRID_MAX_COLUMNS) or 0) or None,
                       final_samples=bool(tcfg.get("final_samples", True)), final_animation=bool(tcfg.final_animation),
                       decode=dataset.decode if isinstance(dataset, LatentDataset) else None)


def sample_quality(cfg: DictConfig, schedule, dataset, num_classes: int, device) -> SampleQuality:
    """trainer.eval_every's scorer: `eval_num_samples` EMA samples (the run's sampler, `eval_sampler_steps`
    steps) against as many held-out real images (data space: latent runs decode), by `eval_metric`."""
    tcfg = cfg.trainer
    n = int(tcfg.eval_num_samples)
    latent = dataset if isinstance(dataset, LatentDataset) else None
    reference = heldout_dataset(cfg, n, pixels=True) or (latent.data if latent else dataset)
    if len(reference) < n:
        raise DiffuseError(f"trainer.eval_num_samples={n} but the held-out data holds {len(reference)} items")
    real = reference.get_batch(torch.arange(n), torch.Generator().manual_seed(0))[0]
    plan = sampling_plan(cfg, schedule, data_shape(dataset), device, tcfg.get("eval_sampler_steps"))
    return SampleQuality(tcfg.eval_metric, real, plan, num_classes, decode=latent.decode if latent else None,
                         weights=tcfg.get("eval_inception_weights"))


def held_out_loss(cfg: DictConfig, schedule, dataset, device, is_main: bool) -> HeldOutLoss | None:
    """trainer.val_items' validation loss, on held-out items where the data has them."""
    tcfg = cfg.trainer
    if not tcfg.val_items:
        return None
    heldout = heldout_dataset(cfg, int(tcfg.val_items))
    if heldout is None and is_main:
        log.warning("dataset has no test split: the validation loss is measured on training items")
    return HeldOutLoss(heldout or dataset, schedule, cfg.objective.prediction, n=int(tcfg.val_items),
                       batch_size=tcfg.batch_size, device=device)


def build_model(cfg: DictConfig, state: dict | None, is_main: bool) -> torch.nn.Module:
    """The configured network; a new run with init_from starts from another run's weights (fresh optimizer,
    EMA, step); run once on a zero item, so a model that cannot take the data's shape fails here, in one line."""
    model = build(cfg.model, "model")
    if cfg.get("init_from") and state is None:
        start_from_weights(model, cfg, is_main)
    shape = config_item_shape(cfg)
    check_model_fits_data(model, shape, int(getattr(model, "num_classes", 0) or 0),
                          f"data of shape {shape} (dataset.channels, dataset.resolution)")
    return model


def _train(cfg, run_dir, state, device, dist) -> dict:
    """The recipe: data, model, schedule and loss from the config; the trainer with its grids, validation
    loss and sample quality; fit; report."""
    tcfg = cfg.trainer
    use_latent_space(cfg)  # latent.vae=PATH: cfg.dataset becomes that VAE's latents of the data
    model = build_model(cfg, state, dist.is_main).to(device)
    record = None
    if state is not None and is_latent_run(cfg):  # the VAE the checkpoint carries, never a path it names
        record = state.get(CHECKPOINT_KEY)
        if record is None:
            raise DiffuseError(NO_EMBEDDED_VAE)
    dataset = build_dataset(cfg, device, vae_record=record)
    schedule = build(cfg.schedule, "schedule")
    loss_fn = DiffusionLoss(cfg.objective.prediction, cfg.objective.weighting, cfg.objective.min_snr_gamma,
                            cond_drop_prob=tcfg.cond_drop_prob, null_class=null_class_of(model))
    data = BatchStream(dataset, tcfg.batch_size, seed=cfg.seed, rank=dist.rank, world_size=dist.world_size,
                       device=device)
    run = start_run(cfg, run_dir, state, device, dist)

    num_classes = int(getattr(model, "num_classes", 0) or 0)
    class_names = [str(c) for c in getattr(dataset, "class_names", None) or range(num_classes)]
    extra_state = {"wandb_id": run.tracker.run_id or "", "class_names": class_names,
                   **(dataset.checkpoint_state() if isinstance(dataset, LatentDataset) else {})}
    grids = sample_grids(cfg, schedule, dataset, data, class_names[:num_classes], run.tracker, run.dir, device) \
        if tcfg.sample_every else None
    evaluator = sample_quality(cfg, schedule, dataset, num_classes, device) if tcfg.eval_every else None
    trainer = Trainer(model, loss_fn, data, tcfg, run, schedule=schedule, kind="diffusion", extra_state=extra_state,
                      on_sample=grids, validator=held_out_loss(cfg, schedule, dataset, device, dist.is_main),
                      evaluator=evaluator)
    return fit(trainer, state, f"model {cfg.model._target_.rsplit('.', 1)[-1]}")

"""`diffuse train`: compose data, model, schedule, loss and trainer from the config, then fit."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from omegaconf import DictConfig

from diffuse.building import build
from diffuse.data.latent import CHECKPOINT_KEY, NO_EMBEDDED_VAE, LatentDataset, is_latent_run
from diffuse.data.base import heldout_of
from diffuse.data.loader import BatchStream
from diffuse.diffusion.generation import SamplingPlan
from diffuse.diffusion.guidance import null_class_of
from diffuse.diffusion.objectives import DiffusionLoss, parameterization
from diffuse.dims import config_item_shape
from diffuse.errors import DiffuseError
from diffuse.jobs.common import build_dataset, data_shape, fit, run_trainer_process, start_run
from diffuse.jobs.latent_space import use_latent_space
from diffuse.jobs.sampling_setup import resolved_sampler, run_guidance_scale, sampling_plan
from diffuse.training.callbacks import Grids, Measurement
from diffuse.training.heldout import HeldOutLoss
from diffuse.training.init_weights import start_from_weights, use_pretrained_unet
from diffuse.training.loop import Trainer
from diffuse.training.sample_grids import SampleGrids
from diffuse.training.sample_quality import SampleQuality
from diffuse.training.settings import TrainerSettings
from diffuse.validation import check_model_fits_data

log = logging.getLogger(__name__)

def run(cfg: DictConfig, run_dir: Path, overrides: list[str] | None = None) -> dict:
    return run_trainer_process(cfg, Path(run_dir), overrides or [], "diffusion", _train)


# trainer.num_sample_images / sample_steps = auto: 32 images × 250 steps up to AUTO_SMALL_VALUES values per
# sample (every 1-D set, 2-D up to 128² grey or 64² RGB); above it, about SAMPLE_BUDGET values per grid
# (8 samples of 32³) at AUTO_STEPS_BIG steps (the msnat_3d experiment's 8 × 50): 20× less work per grid.
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


def run_plan(cfg: DictConfig, schedule, sample_shape, device, steps: int | None = None, model=None) -> SamplingPlan:
    """How this run draws its own samples (grids, eval_every): its sampler (`steps` of it when given), its
    guidance.scale, the network at trainer.precision; one set-up with sample/evaluate (jobs/sampling_setup.py)."""
    plan, _ = sampling_plan(cfg, sample_shape, device, schedule=schedule, model=model, steps=steps,
                            precision=cfg.trainer.get("precision", "auto"), batch_size=int(cfg.trainer.batch_size),
                            seed=int(cfg.seed))
    return plan


def sample_grids(cfg: DictConfig, settings: TrainerSettings, schedule, dataset, model, data, class_names, tracker,
                 run_dir: Path, device) -> Grids:
    """trainer.sample_every's grids, with counts that scale with the data's size (training_sample_counts)."""
    shape = data_shape(dataset)
    own_steps = int(resolved_sampler(cfg, guidance=run_guidance_scale(cfg, "this run")).steps)
    num_images, steps = training_sample_counts(settings.num_sample_images, settings.sample_steps, shape, own_steps)
    grids = SampleGrids(run_plan(cfg, schedule, shape, device, steps, model), num_images, class_names,
                        run_dir / "samples", tracker, data, max_columns=settings.grid_max_columns or None,
                        final_samples=settings.final_samples, final_animation=settings.final_animation,
                        decode=dataset.decode if isinstance(dataset, LatentDataset) else None)
    return Grids(grids, settings.sample_every)


def sample_quality(cfg: DictConfig, settings: TrainerSettings, schedule, dataset, model, device) -> Measurement:
    """trainer.eval_every's scorer: `eval_num_samples` EMA samples (the run's sampler, `eval_sampler_steps`
    steps) against as many held-out real images (data space: latent runs decode), by `eval_metric`."""
    n = settings.eval_num_samples
    pixels = dataset.data if isinstance(dataset, LatentDataset) else dataset
    reference = heldout_of(pixels, n) or pixels
    if len(reference) < n:
        raise DiffuseError(f"trainer.eval_num_samples={n} but the held-out data holds {len(reference)} items")
    real = reference.get_batch(torch.arange(n), torch.Generator().manual_seed(0))[0]
    plan = run_plan(cfg, schedule, data_shape(dataset), device, settings.eval_sampler_steps, model)
    quality = SampleQuality(settings.eval_metric, real, plan, int(getattr(model, "num_classes", 0) or 0),
                            decode=dataset.decode if pixels is not dataset else None,
                            weights=settings.eval_inception_weights)
    return Measurement(quality, settings.eval_every, main_only=True)


def held_out_loss(cfg: DictConfig, settings: TrainerSettings, schedule, dataset, device,
                  is_main: bool) -> Measurement | None:
    """trainer.val_items' validation loss, on the dataset's held-out items where it has them."""
    if not settings.val_items:
        return None
    heldout = heldout_of(dataset, settings.val_items)
    if heldout is None and is_main:
        log.warning("dataset has no test split: the validation loss is measured on training items")
    loss = HeldOutLoss(heldout or dataset, schedule, parameterization(cfg.objective), n=settings.val_items,
                       batch_size=settings.batch_size, device=device)
    return Measurement(loss, settings.val_every)


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
    """The recipe: data, model, schedule and loss from the config; the trainer with its callbacks (held-out
    loss, sample quality, grids); fit; report."""
    settings = TrainerSettings.from_config(cfg.trainer)
    use_latent_space(cfg)  # latent.vae=PATH: cfg.dataset becomes that VAE's latents of the data
    if state is None:
        use_pretrained_unet(cfg)  # model.pretrained=PATH: its architecture into cfg.model, its weights init_from
    model = build_model(cfg, state, dist.is_main).to(device)
    record = None
    if state is not None and is_latent_run(cfg):  # the VAE the checkpoint carries, never a path it names
        record = state.get(CHECKPOINT_KEY)
        if record is None:
            raise DiffuseError(NO_EMBEDDED_VAE)
    dataset = build_dataset(cfg, device, vae_record=record)
    schedule = build(cfg.schedule, "schedule")
    loss_fn = DiffusionLoss(parameterization(cfg.objective), cond_drop_prob=settings.cond_drop_prob,
                            null_class=null_class_of(model))
    data = BatchStream(dataset, settings.batch_size, seed=cfg.seed, rank=dist.rank, world_size=dist.world_size,
                       device=device)
    run = start_run(cfg, run_dir, state, device, dist)

    num_classes = int(getattr(model, "num_classes", 0) or 0)
    class_names = [str(c) for c in getattr(dataset, "class_names", None) or range(num_classes)]
    extra_state = {"wandb_id": run.tracker.run_id or "", "class_names": class_names,
                   **(dataset.checkpoint_state() if isinstance(dataset, LatentDataset) else {})}
    callbacks = [held_out_loss(cfg, settings, schedule, dataset, device, dist.is_main),
                 sample_quality(cfg, settings, schedule, dataset, model, device) if settings.eval_every else None,
                 sample_grids(cfg, settings, schedule, dataset, model, data, class_names[:num_classes], run.tracker,
                              run.dir, device) if settings.sample_every else None]
    trainer = Trainer(model, loss_fn, data, settings, run, schedule=schedule, kind="diffusion",
                      extra_state=extra_state, callbacks=[c for c in callbacks if c is not None])
    return fit(trainer, state, f"model {cfg.model._target_.rsplit('.', 1)[-1]}")

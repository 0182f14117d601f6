"""`diffuse train`: compose data, model, schedule, loss and trainer from the config, then fit."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from diffuse import media
from diffuse.data.loader import BatchStream
from diffuse.diffusion.generation import class_labels, generate, progress_bar, sampler_steps
from diffuse.diffusion.objectives import DiffusionLoss
from diffuse.errors import DiffuseError
from diffuse.jobs.common import build, build_dataset, build_tracker, data_shape, run_trainer_process
from diffuse.latent import LATENT_DATASET, LatentDataset, unclipped_in_latent_space, use_latent_space
from diffuse.training.heldout import HeldOutLoss
from diffuse.training.init_weights import start_from_weights
from diffuse.training.loop import Trainer, TrainerConfig, prepare_training
from diffuse.training.sample_quality import SampleQuality
from diffuse.validation import check_model_fits_data

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


def sample_quality(cfg, dataset, schedule, sample_shape, num_classes, null_class, latent, device) -> SampleQuality:
    """trainer.eval_every's scorer: `eval_num_samples` EMA samples (the run's sampler, `eval_sampler_steps`
    steps) against as many held-out real images (data space: latent runs decode), by `eval_metric`."""
    tcfg = cfg.trainer
    n = int(tcfg.eval_num_samples)
    reference = heldout_dataset(cfg, n, pixels=True) or (latent.data if latent else dataset)
    if len(reference) < n:
        raise DiffuseError(f"trainer.eval_num_samples={n} but the held-out data holds {len(reference)} items")
    real = reference.get_batch(torch.arange(n), torch.Generator().manual_seed(0))[0]
    sampler = unclipped_in_latent_space(build(cfg.sampler, "sampler"), latent is not None)
    if tcfg.get("eval_sampler_steps"):
        sampler.steps = int(tcfg.eval_sampler_steps)
    return SampleQuality(tcfg.eval_metric, real, schedule, sampler, sample_shape, cfg.objective.prediction,
                         num_classes, null_class, tcfg.batch_size, device, seed=cfg.seed,
                         decode=latent.decode if latent else None, weights=tcfg.get("eval_inception_weights"))


def _train(cfg, run_dir, state, device, dist) -> dict:
    tcfg = cfg.trainer

    use_latent_space(cfg)  # latent.vae=PATH: cfg.dataset becomes that VAE's latents of the data
    model = build(cfg.model, "model")
    if cfg.get("init_from") and state is None:  # a new run from another run's weights (fresh optimizer, EMA, step)
        start_from_weights(model, cfg, dist.is_main)
    shape = (int(cfg.dataset.channels), *[int(cfg.dataset.resolution)] * int(cfg.dim))
    check_model_fits_data(model, shape, int(getattr(model, "num_classes", 0) or 0),
                          f"data of shape {shape} (dataset.channels, dataset.resolution)")
    model.to(device)
    dataset = build_dataset(cfg, device)
    latent = dataset if isinstance(dataset, LatentDataset) else None
    schedule = build(cfg.schedule, "schedule")
    null_class = getattr(model, "null_class", None)
    loss_fn = DiffusionLoss(prediction=cfg.objective.prediction, weighting=cfg.objective.weighting,
                            min_snr_gamma=cfg.objective.min_snr_gamma,
                            cond_drop_prob=tcfg.cond_drop_prob if null_class is not None else 0.0,
                            null_class=null_class)
    data = BatchStream(dataset, tcfg.batch_size, seed=cfg.seed, rank=dist.rank, world_size=dist.world_size,
                       device=device)
    max_steps, ema, train_model, optimizer, lr_scheduler = prepare_training(
        model, tcfg, data.batches_per_epoch, device, dist)

    config_dict = OmegaConf.to_container(cfg, resolve=True)
    n_params = sum(p.numel() for p in model.parameters())
    tracker = build_tracker(cfg, run_dir, config_dict, state, dist.is_main)
    sample_shape = data_shape(dataset)
    num_classes = int(getattr(model, "num_classes", 0) or 0)
    class_names = [str(c) for c in getattr(dataset, "class_names", None) or range(num_classes)]
    sampler = unclipped_in_latent_space(build(cfg.sampler, "sampler"), latent is not None)
    num_images, sampler.steps = training_sample_counts(tcfg.get("num_sample_images", "auto"),
                                                       tcfg.get("sample_steps", "auto"), sample_shape, sampler.steps)
    max_columns = int(tcfg.get("grid_max_columns", media.GRID_MAX_COLUMNS) or 0) or None

    def on_sample(step: int, ema_model, last: bool = False) -> None:
        """A grid of EMA samples (a row per class); at the end (last: max_steps, or a spent time budget) also
        an animation of the denoising."""
        if last and not tcfg.get("final_samples", True):
            return  # trainer.final_samples=false: no end-of-run grid (nor animation)
        final = last and tcfg.final_animation
        labels = class_labels(num_images, num_classes)
        n = num_images if labels is None else len(labels)
        steps = sampler_steps(sampler, schedule)
        bar = progress_bar(n, steps, f"step {step} samples", leave=False)
        start = time.perf_counter()
        try:
            out = generate(ema_model, schedule, sampler, sample_shape, num_images, labels=labels,
                           seed=cfg.seed, batch_size=tcfg.batch_size, prediction=cfg.objective.prediction,
                           null_class=null_class, device=device, trajectory=40 if final else False,
                           step_progress=bar.update)
        finally:
            bar.close()
        seconds = time.perf_counter() - start
        nrow = len(out.x) // num_classes if num_classes else None
        shown = latent.decode(out.x) if latent else out.x
        path = run_dir / "samples" / f"step_{step}.png"
        if num_classes:
            media.save_class_grid(shown, out.y, path, class_names=class_names, max_columns=max_columns)
        else:
            media.save_grid(shown, path, max_columns=max_columns)
        tracker.log_image("samples", path, step)
        capped = f" ({min(nrow, max_columns)} of {nrow} per class shown)" \
            if nrow and max_columns and nrow > max_columns else ""
        log.info("step %d: samples: %d × %d steps in %.1f s → %s%s", step, n, steps, seconds, path, capped)
        # the seed's table of grids by epoch: samples/README.md + index.html, and a W&B table step → grid
        rows = media.write_sample_index(path.parent, step, data.epoch + data.position / data.batches_per_epoch)
        tracker.log_table("sample_grids", ["step", "epoch", "grid"],
                          [[r["step"], r["epoch"], str(path.parent / r["file"])] for r in rows], step, ("grid",))
        if final:
            fps = 10
            states = [latent.decode(z) for z in out.states] if latent else out.states
            anim = media.save_animation(states, run_dir / "samples" / "animation.gif", nrow=nrow, fps=fps,
                                        times=out.times, row_labels=class_names[:num_classes] if num_classes else None,
                                        max_columns=max_columns)
            tracker.log_video("denoising", anim, step, fps=fps)
            log.info("animation → %s", anim)

    heldout = heldout_dataset(cfg, int(tcfg.val_items)) if tcfg.val_items else None
    if tcfg.val_items and heldout is None and dist.is_main:
        log.warning("dataset has no test split: the validation loss is measured on training items")
    validator = HeldOutLoss(heldout or dataset, schedule, cfg.objective.prediction, n=int(tcfg.val_items),
                            batch_size=tcfg.batch_size, device=device) if tcfg.val_items else None
    evaluator = sample_quality(cfg, dataset, schedule, sample_shape, num_classes, null_class, latent, device) \
        if tcfg.eval_every else None
    extra_state = {"wandb_id": tracker.run_id or "", "class_names": class_names,
                   **(latent.checkpoint_state() if latent else {})}
    trainer = Trainer(train_model, loss_fn, schedule, data, optimizer, lr_scheduler, ema,
                      TrainerConfig.from_config(tcfg, max_steps), run_dir, tracker, dist, device, cfg.seed, config_dict,
                      on_sample=on_sample if tcfg.sample_every else None, kind="diffusion", extra_state=extra_state,
                      validator=validator, evaluator=evaluator)
    if state is not None:
        trainer.load_state_dict(state)
    if dist.is_main:
        accum = int(tcfg.get("grad_accum_steps") or 1)
        log.info("model %s: %.2fM parameters; %d steps of batch %d×%d%s (global batch %d) on %s; run dir %s",
                 cfg.model._target_.rsplit(".", 1)[-1], n_params / 1e6, max_steps, tcfg.batch_size,
                 dist.world_size, f"×{accum} accumulated" if accum > 1 else "",
                 tcfg.batch_size * dist.world_size * accum, device, run_dir)
    try:
        summary = trainer.fit()
    finally:
        tracker.finish()
    summary.update(run_dir=str(run_dir), parameters=n_params)
    if dist.is_main:
        log.info("done: step %d, loss %.4f, checkpoint %s", summary["step"], summary["loss"], summary["checkpoint"])
    return summary

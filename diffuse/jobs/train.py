"""`diffuse train`: compose data, model, schedule, loss and trainer from the config, then fit."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from diffuse import media
from diffuse.data.loader import BatchStream
from diffuse.diffusion.generation import class_labels, generate
from diffuse.diffusion.objectives import DiffusionLoss
from diffuse.errors import DiffuseError
from diffuse.jobs.common import (build, build_dataset, build_tracker, data_shape, find_checkpoint,
                                 run_trainer_process)
from diffuse.latent import LatentDataset, unclipped_in_latent_space, use_latent_space
from diffuse.training.checkpoint import load_checkpoint, run_folder_of
from diffuse.training.loop import Trainer, TrainerConfig, prepare_training
from diffuse.validation import check_model_fits_data, validate

log = logging.getLogger(__name__)

# Groups whose choice defines the run: a resumed run keeps them from its checkpoint.
RUN_DEFINING = ("model", "schedule", "dataset", "dim", "objective", "conditional", "latent")


def merge_resume_config(saved: dict, cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """The resumed run's config: the checkpoint's, plus the scalar overrides given on this command line
    (e.g. trainer.max_steps=…). Changing what defines the run (model, data, schedule…) is refused."""
    merged = OmegaConf.create(saved)
    for item in overrides:
        key = item.split("=", 1)[0].lstrip("+~")
        if key == "resume" or key.startswith("hydra."):
            continue
        if key.split(".")[0] in RUN_DEFINING:
            raise DiffuseError(f"cannot change {key!r} when resuming: the run keeps its {key.split('.')[0]}; "
                               "start a new run instead")
        # a group choice (logger=none) replaces the whole node; a value (trainer.max_steps=…) just itself
        OmegaConf.update(merged, key, OmegaConf.select(cfg, key), force_add=True, merge=False)
    return merged


def resolve_resume(cfg: DictConfig, run_dir: Path, overrides: list[str],
                   kind: str = "diffusion") -> tuple[DictConfig, Path, dict | None]:
    """resume: null (fresh run) | auto (the run of `kind` under outputs/ (re)started last) | PATH (checkpoint
    file or run folder). A checkpoint inside a run folder continues there; any other file (a copy in ~/)
    starts a new run folder from its state instead of writing next to it."""
    if not cfg.get("resume"):
        return cfg, run_dir, None
    path = find_checkpoint(None if cfg.resume in ("auto", True) else str(cfg.resume), kind, for_resume=True)
    state = load_checkpoint(path, kind=kind, allow_targets=cfg.get("allow_targets") or ())
    merged = merge_resume_config(state["config"], cfg, overrides)
    merged.resume = str(path)
    folder = run_folder_of(path)
    if folder is None:
        log.info("%s is not inside a run folder: continuing its run in %s", path, run_dir)
    log.info("resuming %s from step %d", path, state["step"])
    return merged, folder or run_dir, state


def run(cfg: DictConfig, run_dir: Path, overrides: list[str] | None = None) -> dict:
    cfg, run_dir, state = resolve_resume(cfg, Path(run_dir), overrides or [])
    validate(cfg, "train")  # the resumed run's merged config; app.py checked the composed one
    return run_trainer_process(cfg, run_dir, state, _train)


def _train(cfg, run_dir, state, device, dist) -> dict:
    tcfg = cfg.trainer

    use_latent_space(cfg)  # latent.vae=PATH: cfg.dataset becomes that VAE's latents of the data
    model = build(cfg.model, "model")
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
    if tcfg.get("sample_steps"):
        sampler.steps = min(int(tcfg.sample_steps), sampler.steps)

    def on_sample(step: int, ema_model) -> None:
        """A grid of EMA samples (a row per class); at the last step also an animation of the denoising."""
        final = step == max_steps and tcfg.final_animation
        labels = class_labels(tcfg.num_sample_images, num_classes)
        out = generate(ema_model, schedule, sampler, sample_shape, tcfg.num_sample_images, labels=labels,
                       seed=cfg.seed, batch_size=tcfg.batch_size, prediction=cfg.objective.prediction,
                       null_class=null_class, device=device, trajectory=40 if final else False)
        nrow = len(out.x) // num_classes if num_classes else None
        shown = latent.decode(out.x) if latent else out.x
        path = run_dir / "samples" / f"step_{step}.png"
        if num_classes:
            media.save_class_grid(shown, out.y, path, class_names=class_names)
        else:
            media.save_grid(shown, path)
        tracker.log_image("samples", path, step)
        log.info("step %d: samples → %s", step, path)
        if final:
            fps = 10
            states = [latent.decode(z) for z in out.states] if latent else out.states
            anim = media.save_animation(states, run_dir / "samples" / "animation.gif", nrow=nrow, fps=fps,
                                        times=out.times, row_labels=class_names[:num_classes] if num_classes else None)
            tracker.log_video("denoising", anim, step, fps=fps)
            log.info("animation → %s", anim)

    extra_state = {"wandb_id": tracker.run_id or "", "class_names": class_names,
                   **(latent.checkpoint_state() if latent else {})}
    trainer = Trainer(train_model, loss_fn, schedule, data, optimizer, lr_scheduler, ema,
                      TrainerConfig.from_config(tcfg, max_steps), run_dir, tracker, dist, device, cfg.seed, config_dict,
                      on_sample=on_sample if tcfg.sample_every else None, kind="diffusion", extra_state=extra_state)
    if state is not None:
        trainer.load_state_dict(state)
    if dist.is_main:
        log.info("model %s: %.2fM parameters; %d steps of batch %d×%d on %s; run dir %s",
                 cfg.model._target_.rsplit(".", 1)[-1], n_params / 1e6, max_steps, tcfg.batch_size,
                 dist.world_size, device, run_dir)
    try:
        summary = trainer.fit()
    finally:
        tracker.finish()
    summary.update(run_dir=str(run_dir), parameters=n_params)
    if dist.is_main:
        log.info("done: step %d, loss %.4f, checkpoint %s", summary["step"], summary["loss"], summary["checkpoint"])
    return summary

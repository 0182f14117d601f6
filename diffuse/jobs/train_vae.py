"""`diffuse train-vae`: train the autoencoder of latent diffusion with the diffusion trainer's machinery.

The VAE loss has the Trainer's loss signature (schedule unused), so EMA, LR schedules, precision, exact
resume, DDP and atomic checkpoints (same format, config included) come from training/loop.py unchanged.
Every `sample_every` steps: a grid of originals above their (EMA, posterior-mean) reconstructions. After
training: `vae.scale_factor=auto` is fitted on training data and the checkpoint re-saved with it; the
reconstruction MSE on the `evaluate.split` split is logged. Then: `diffuse train latent.vae=PATH`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from diffuse import media
from diffuse.data.loader import BatchStream
from diffuse.errors import DiffuseError
from diffuse.jobs.common import build, build_dataset, build_tracker, run_trainer_process
from diffuse.models.vae import VAELoss
from diffuse.tracking import Tracker
from diffuse.training.loop import Trainer, TrainerConfig, prepare_training

log = logging.getLogger(__name__)

VAE_RUN_DEFINING = ("vae", "loss")  # besides train.py's dataset, dim: a resumed VAE run keeps them


class _TrackerWithLossParts:
    """The run's Tracker, adding the VAE loss's averaged parts (recon, mse, kl) to every metrics line."""

    def __init__(self, tracker: Tracker, loss_fn: VAELoss):
        self.tracker, self.loss_fn = tracker, loss_fn

    def log(self, metrics: dict, step: int) -> None:
        self.tracker.log({**metrics, **self.loss_fn.pop_averages()}, step)

    def __getattr__(self, name):
        return getattr(self.tracker, name)


def run(cfg: DictConfig, run_dir: Path, overrides: list[str] | None = None) -> dict:
    overrides = overrides or []
    if cfg.get("resume"):
        for item in overrides:
            key = item.split("=", 1)[0].lstrip("+~")
            if key.split(".")[0] in VAE_RUN_DEFINING:
                raise DiffuseError(f"cannot change {key!r} when resuming: the run keeps its {key.split('.')[0]}; "
                                   "start a new run instead")
    return run_trainer_process(cfg, Path(run_dir), overrides, "vae", _train_vae)


def reconstruction_grid(x: torch.Tensor, recon: torch.Tensor, path: Path, per_row: int = 8) -> Path:
    """Rows of originals, each followed by a row of their reconstructions."""
    rows = []
    for start in range(0, len(x), per_row):
        rows += [x[start:start + per_row], recon[start:start + per_row]]
    return media.save_grid(torch.cat(rows), path, nrow=min(per_row, len(x)))


@torch.no_grad()
def reconstruction_mse(vae, dataset, batch_size: int, device: torch.device, max_items: int | None = None) -> float:
    """Mean (x − decode(μ(x)))² over the dataset's first max_items items, in data units ([−1, 1])."""
    n = len(dataset) if not max_items else min(len(dataset), int(max_items))
    total, count = 0.0, 0
    for start in range(0, n, batch_size):
        x, _ = dataset.get_batch(torch.arange(start, min(n, start + batch_size)), None)
        x = x.to(device)
        recon, _, _ = vae(x, sample=False)
        total, count = total + float((recon.float() - x).pow(2).sum()), count + x.numel()
    return total / count


def _evaluation_dataset(cfg: DictConfig):
    """The dataset again with `split` = evaluate.split, or None when the dataset has no splits."""
    split = cfg.get("evaluate", {}).get("split")
    if not split or "split" not in cfg.dataset:
        return None
    node = OmegaConf.to_container(cfg.dataset, resolve=True)
    node["split"] = split
    return build(node, "evaluation dataset")


def _train_vae(cfg, run_dir, state, device, dist) -> dict:
    tcfg = cfg.trainer

    dataset = build_dataset(cfg, device)
    vae = build(cfg.vae, "vae").to(device)
    if dataset.resolution % vae.downsample_factor:
        raise DiffuseError(f"dataset.resolution={dataset.resolution} is not divisible by the VAE's downsampling "
                           f"×{vae.downsample_factor}: it would not decode back to the same size")
    try:
        loss_fn = VAELoss(cfg.loss.reconstruction, cfg.loss.kl_weight)
    except ValueError as e:
        raise DiffuseError(f"loss: {e}") from None
    data = BatchStream(dataset, tcfg.batch_size, seed=cfg.seed, rank=dist.rank, world_size=dist.world_size,
                       device=device)
    max_steps, ema, train_model, optimizer, lr_scheduler = prepare_training(
        vae, tcfg, data.batches_per_epoch, device, dist)
    config_dict = OmegaConf.to_container(cfg, resolve=True)
    n_params = sum(p.numel() for p in vae.parameters())
    tracker = build_tracker(cfg, run_dir, config_dict, state, dist.is_main)

    num_shown = 32 if tcfg.num_sample_images == "auto" else int(tcfg.num_sample_images)  # no sampling here: auto = 32
    shown = dataset.get_batch(torch.arange(min(num_shown, len(dataset))), None)[0].to(device)

    def on_sample(step: int, ema_model, last: bool = False) -> None:
        with torch.no_grad():
            recon, _, _ = ema_model(shown, sample=False)
        path = reconstruction_grid(shown, recon.clamp(-1, 1), run_dir / "samples" / f"step_{step}.png")
        tracker.log({"ema_recon_mse": float((recon.float() - shown).pow(2).mean())}, step)
        tracker.log_image("reconstructions", path, step)
        log.info("step %d: reconstructions → %s", step, path)

    trainer = Trainer(train_model, loss_fn, None, data, optimizer, lr_scheduler, ema,
                      TrainerConfig.from_config(tcfg, max_steps), run_dir, _TrackerWithLossParts(tracker, loss_fn), dist, device, cfg.seed, config_dict,
                      on_sample=on_sample if tcfg.sample_every else None, kind="vae",
                      extra_state={"wandb_id": tracker.run_id or ""})
    if state is not None:
        trainer.load_state_dict(state)
    if dist.is_main:
        log.info("VAE: %.2fM parameters, ×%d downsampling to %d latent channels; %d steps of batch %d×%d on %s; "
                 "run dir %s", n_params / 1e6, vae.downsample_factor, vae.latent_channels, max_steps,
                 tcfg.batch_size, dist.world_size, device, run_dir)
    try:
        summary = trainer.fit()
        if cfg.vae.scale_factor == "auto":
            # measured with the EMA weights (the ones latent diffusion loads), once, on fixed batches
            stream = BatchStream(dataset, tcfg.batch_size, seed=cfg.seed + 1, device=device)
            generator = torch.Generator(device=device).manual_seed(cfg.seed)
            scale = ema.model.fit_scale_factor((next(stream)[0] for _ in range(int(cfg.scale_batches))), generator)
            vae.set_scale_factor(scale)
            trainer.save()  # the same step's checkpoints again, now holding the factor
            tracker.log({"scale_factor": scale}, trainer.step)
            log.info("scale_factor = 1/std of the latents = %.5f (stored in %s)", scale, trainer.checkpoint_path)
        summary["scale_factor"] = ema.model.scale_factor
        eval_data = _evaluation_dataset(cfg) if dist.is_main else None
        if eval_data is not None:
            mse = reconstruction_mse(ema.model, eval_data, tcfg.batch_size, device, cfg.evaluate.get("max_items"))
            tracker.log({"eval_recon_mse": mse}, trainer.step)
            summary["eval_recon_mse"] = mse
            log.info("reconstruction MSE on the %s split (%d items, data in [-1, 1]): %.5f", cfg.evaluate.split,
                     min(len(eval_data), int(cfg.evaluate.get("max_items") or len(eval_data))), mse)
    finally:
        tracker.finish()
    summary.update(run_dir=str(run_dir), parameters=n_params)
    if dist.is_main:
        log.info("done: step %d, loss %.4f, checkpoint %s", summary["step"], summary["loss"], summary["checkpoint"])
    return summary

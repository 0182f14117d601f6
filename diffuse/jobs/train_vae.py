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
from diffuse.building import build
from diffuse.data.base import split_config
from diffuse.data.loader import BatchStream
from diffuse.errors import DiffuseError
from diffuse.jobs.common import build_dataset, fit, run_trainer_process, start_run
from diffuse.models.vae import VAELoss, check_vae_fits_data
from diffuse.tracking import Tracker
from diffuse.training.callbacks import Grids
from diffuse.training.loop import Trainer

log = logging.getLogger(__name__)


class _TrackerWithLossParts:
    """The run's Tracker, adding the VAE loss's averaged parts (recon, mse, kl) to every metrics line."""

    def __init__(self, tracker: Tracker, loss_fn: VAELoss):
        self.tracker, self.loss_fn = tracker, loss_fn

    def log(self, metrics: dict, step: int) -> None:
        self.tracker.log({**metrics, **self.loss_fn.pop_averages()}, step)

    def __getattr__(self, name):
        return getattr(self.tracker, name)


def run(cfg: DictConfig, run_dir: Path, overrides: list[str] | None = None) -> dict:
    return run_trainer_process(cfg, Path(run_dir), overrides or [], "vae", _train_vae)


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
    """The dataset again with `split` = evaluate.split, or None when the dataset has no named splits."""
    node = split_config(OmegaConf.to_container(cfg.dataset, resolve=True), cfg.get("evaluate", {}).get("split"))
    return None if node is None else build(node, "evaluation dataset")


class ReconstructionGrids:
    """trainer.sample_every's callback: `shown` images [N, C, *S] above their EMA reconstructions (posterior
    means) in samples/step_N.png, and their MSE logged as ema_recon_mse."""

    def __init__(self, shown: torch.Tensor, folder: Path, tracker):
        self.shown, self.folder, self.tracker = shown, Path(folder), tracker

    @torch.no_grad()
    def __call__(self, step: int, ema_model, last: bool = False) -> None:
        recon, _, _ = ema_model(self.shown, sample=False)
        path = reconstruction_grid(self.shown, recon.clamp(-1, 1), self.folder / f"step_{step}.png")
        self.tracker.log({"ema_recon_mse": float((recon.float() - self.shown).pow(2).mean())}, step)
        self.tracker.log_image("reconstructions", path, step)
        log.info("step %d: reconstructions → %s", step, path)


def fit_scale_factor(cfg: DictConfig, trainer: Trainer, dataset, device) -> float:
    """vae.scale_factor=auto: 1/std of the EMA weights' latents (the weights latent diffusion loads), measured
    once on fixed batches; the step's checkpoints are written again holding it."""
    stream = BatchStream(dataset, cfg.trainer.batch_size, seed=cfg.seed + 1, device=device)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    scale = trainer.ema.model.fit_scale_factor((next(stream)[0] for _ in range(int(cfg.scale_batches))), generator)
    trainer.raw_model.set_scale_factor(scale)
    trainer.save()
    trainer.tracker.log({"scale_factor": scale}, trainer.step)
    log.info("scale_factor = 1/std of the latents = %.5f (stored in %s)", scale, trainer.checkpoint_path)
    return scale


def _train_vae(cfg, run_dir, state, device, dist) -> dict:
    """The recipe: data and VAE from the config; the trainer with its reconstruction grids; fit; then the
    latent scale factor and the held-out reconstruction error; report."""
    tcfg = cfg.trainer
    dataset = build_dataset(cfg, device)
    vae = build(cfg.vae, "vae").to(device)
    check_vae_fits_data(vae.dim, vae.in_channels, vae.downsample_factor, dataset.dim, dataset.channels,
                        dataset.resolution)
    try:
        loss_fn = VAELoss(cfg.loss.reconstruction, cfg.loss.kl_weight)
    except ValueError as e:
        raise DiffuseError(f"loss: {e}") from None
    data = BatchStream(dataset, tcfg.batch_size, seed=cfg.seed, rank=dist.rank, world_size=dist.world_size,
                       device=device)
    run = start_run(cfg, run_dir, state, device, dist)
    run.tracker = _TrackerWithLossParts(run.tracker, loss_fn)

    num_shown = 32 if tcfg.num_sample_images == "auto" else int(tcfg.num_sample_images)  # no sampling here: auto = 32
    shown = dataset.get_batch(torch.arange(min(num_shown, len(dataset))), None)[0].to(device)
    callbacks = [Grids(ReconstructionGrids(shown, run.dir / "samples", run.tracker), tcfg.sample_every)] \
        if tcfg.sample_every else []
    trainer = Trainer(vae, loss_fn, data, tcfg, run, kind="vae", extra_state={"wandb_id": run.tracker.run_id or ""},
                      callbacks=callbacks)

    def after(summary: dict) -> None:
        if cfg.vae.scale_factor == "auto":
            fit_scale_factor(cfg, trainer, dataset, device)
        summary["scale_factor"] = trainer.ema.model.scale_factor
        eval_data = _evaluation_dataset(cfg) if dist.is_main else None
        if eval_data is not None:
            max_items = cfg.evaluate.get("max_items")
            mse = reconstruction_mse(trainer.ema.model, eval_data, tcfg.batch_size, device, max_items)
            trainer.tracker.log({"eval_recon_mse": mse}, trainer.step)
            summary["eval_recon_mse"] = mse
            log.info("reconstruction MSE on the %s split (%d items, data in [-1, 1]): %.5f", cfg.evaluate.split,
                     min(len(eval_data), int(max_items or len(eval_data))), mse)

    return fit(trainer, state, f"VAE (×{vae.downsample_factor} downsampling to {vae.latent_channels} latent "
                               "channels)", after=after)

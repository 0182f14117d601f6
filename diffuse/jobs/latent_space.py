"""The job side of latent diffusion: `diffuse train latent.vae=PATH` turns the run's `dataset` node into a
LatentDataset's (diffuse/data/latent.py) over the configured data, and sampling leaves latents unclipped."""

from __future__ import annotations

import logging

from omegaconf import DictConfig, OmegaConf, open_dict

from diffuse.data.latent import LATENT_DATASET, read_vae_checkpoint
from diffuse.models.vae import check_vae_fits_data, downsample_factor

log = logging.getLogger(__name__)


def use_latent_space(cfg: DictConfig) -> bool:
    """With latent.vae set, make cfg.dataset a LatentDataset over the configured data (in place).

    Idempotent: a resumed run's config already has it. Returns whether the run is a latent one.
    """
    latent = cfg.get("latent") or {}
    if not latent.get("vae"):
        return False
    if cfg.dataset.get("_target_") == LATENT_DATASET:  # a resumed run: encode on this run's device
        with open_dict(cfg):
            cfg.dataset.device = cfg.get("device", "auto")
        return True
    record = read_vae_checkpoint(latent.vae)
    vae_cfg = record["config"]
    factor = downsample_factor(vae_cfg["channel_mult"])
    data = OmegaConf.to_container(cfg.dataset, resolve=True)
    resolution = int(data["resolution"])
    check_vae_fits_data(vae_cfg["dim"], vae_cfg["in_channels"], factor, cfg.dim, data["channels"], resolution,
                        vae=f"the VAE {record['path']}")
    with open_dict(cfg):
        cfg.latent.vae = record["path"]
        cfg.dataset = {"_target_": LATENT_DATASET, "data": data, "vae": record["path"],
                       "cache": bool(latent.get("cache", True)), "sample": bool(latent.get("sample", True)),
                       "device": cfg.get("device", "auto"), "dim": int(cfg.dim),
                       "resolution": resolution // factor, "channels": int(vae_cfg["latent_channels"]),
                       "num_classes": int(data.get("num_classes") or 0)}
    log.info("latent diffusion: data %s → VAE %s → latents %s",
             (data["channels"], *[resolution] * cfg.dim), record["path"],
             (vae_cfg["latent_channels"], *[resolution // factor] * cfg.dim))
    return True


def latent_sampler_config(node: DictConfig, latent: bool) -> DictConfig:
    """The sampler config a run samples with: for a latent run, without x̂₀ clipping to the data range.

    Clipping clamps x̂₀ to [−1, 1]. Scaled latents are not bounded by it (std ≈ 1: the clamp cuts about a
    third of them) and clamping them ruins the samples (latent MNIST, 1000 samples of DDPM with 1000 steps:
    FD 0.30 unclipped vs 2.37 clipped). So a latent run samples unclipped unless clip_range was set to
    something other than the data range; dynamic thresholding (towards the data range) is dropped too.
    Returns a new node; `node` is left as it is."""
    if not latent:
        return node
    changes = {}
    if node.get("dynamic_threshold") is not None:
        log.warning("sampler.dynamic_threshold rescales x̂₀ towards the data range, which latents do not lie in: "
                    "sampling without it")
        changes["dynamic_threshold"] = None
    if node.get("clip_x0") and tuple(node.get("clip_range", (-1.0, 1.0))) == (-1.0, 1.0):
        log.warning("sampler.clip_x0 clamps x̂₀ to the data range [-1, 1], which latents do not lie in: "
                    "sampling without it (set sampler.clip_range to clamp latents)")
        changes["clip_x0"] = False
    return OmegaConf.merge(node, changes) if changes else node

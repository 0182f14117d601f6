"""Latent diffusion (Rombach et al. 2022): train and sample any diffusion model in the latent space of a
frozen VAE trained by `diffuse train-vae`, or a pretrained diffusers AutoencoderKL folder (SD's VAE).

    diffuse train latent.vae=outputs/…/checkpoints/last.ckpt dataset=mnist model=unet …
    diffuse train latent.vae=/models/sd-vae-ft-mse dataset=folder dataset.path=/data/pets dataset.resolution=256
    diffuse sample                     # decodes to data space by itself

This module is the data side: `LatentDataset` (items are a frozen VAE's scaled latents of another dataset's
items, encoded per batch or once up front into memory, `latent.cache`) and the VAE decoding that turns a
latent run's samples back into data. The job side, which rewrites a run's `dataset` node into a
LatentDataset's (diffuse/jobs/latent_space.py), makes everything that reads `${dataset.channels}` or
`dataset.resolution` see the latent without knowing about it. The diffusion checkpoint stores the VAE's path
and also its config and weights (`latent_vae`), so `diffuse sample` decodes from the checkpoint alone.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Callable

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from tqdm.auto import tqdm

from diffuse.building import build
from diffuse.data.base import Dataset, heldout_of
from diffuse.devices import resolve_device, to_device
from diffuse.errors import DiffuseError
from diffuse.models.vae import VAE, check_vae_fits_data
from diffuse.storage import hub
from diffuse.storage.checkpoint import load_checkpoint
from diffuse.storage.diffusers_format import is_diffusers_folder, read_autoencoder_kl

log = logging.getLogger(__name__)

LATENT_DATASET = "diffuse.data.latent.LatentDataset"
CHECKPOINT_KEY = "latent_vae"  # the VAE record inside a latent-diffusion checkpoint
NO_EMBEDDED_VAE = ("this latent-diffusion checkpoint does not carry its VAE (written before diffuse embedded it), "
                   "and a VAE path that a checkpoint names is never opened: train the latent run again")


# ----- the VAE: from its own checkpoint, or from the record a diffusion checkpoint embeds --------------

def vae_from_record(record: dict, device: torch.device | str = "cpu") -> VAE:
    """record: {"config": the VAE's resolved config node, "weights": its state dict, …} → frozen VAE."""
    vae = build(OmegaConf.create(record["config"]), "vae")
    try:
        vae.load_state_dict(record["weights"])
    except RuntimeError as e:
        raise DiffuseError(f"VAE weights do not match their config: {str(e).splitlines()[0]}") from None
    return vae.to(device).eval().requires_grad_(False)


def read_vae_checkpoint(path: str | Path) -> dict:
    """A `diffuse train-vae` checkpoint, or a diffusers AutoencoderKL folder (e.g. a local copy of
    stabilityai/sd-vae-ft-mse), → the record to embed: path, step, config, (EMA) weights."""
    path = Path(hub.local(str(path))).expanduser()  # hf://…: downloaded, then read as a local path
    if is_diffusers_folder(path):
        try:
            record = read_autoencoder_kl(path)
            vae_from_record(record)  # the weights must fit the config: refused here, not mid-run
        except DiffuseError as e:
            raise DiffuseError(f"latent.vae: {e}") from None
        return record
    try:
        state = load_checkpoint(path, kind="vae")  # vetted: its config builds only our classes
    except DiffuseError as e:
        raise DiffuseError(f"latent.vae: {e}") from None
    weights = state["ema"]["model"] if "ema" in state else state["model"]
    return {"path": str(path.resolve()), "step": int(state["step"]), "config": state["config"]["vae"],
            "weights": weights}


def decode_latents(vae: VAE, z: Tensor, batch_size: int = 64) -> Tensor:
    """Latents [N, latent_channels, *L] → data [N, C, *S] in [−1, 1], fp32 on the CPU, in batches."""
    device = next(vae.parameters()).device
    with torch.no_grad():
        out = [vae.decode(z[i:i + batch_size].to(device, torch.float32)).float().cpu()
               for i in range(0, len(z), batch_size)]
    return torch.cat(out).clamp(-1, 1) if out else z


def latent_vae(state: dict, device: torch.device | str = "cpu") -> VAE | None:
    """The frozen VAE a latent run's checkpoint embeds; None for a pixel-space run. A checkpoint never chooses a
    file to open: a latent run without its VAE embedded is refused."""
    latent = (state.get("config") or {}).get("latent") or {}
    if CHECKPOINT_KEY in state:
        return vae_from_record(state[CHECKPOINT_KEY], device)
    if latent.get("vae"):
        raise DiffuseError(NO_EMBEDDED_VAE)
    return None


def latent_decoder(state: dict, device: torch.device | str = "cpu") -> Callable[[Tensor], Tensor]:
    """What turns a run's samples into data: the identity for pixel-space runs; for latent runs the decoder
    of the VAE embedded in the checkpoint."""
    vae = latent_vae(state, device)
    if vae is None:
        return lambda x: x
    return lambda z: decode_latents(vae, z)


def encode_data(vae: VAE, x: Tensor, batch_size: int = 64) -> Tensor:
    """Data [N, C, *S] in [−1, 1] → the run's latents μ · scale_factor [N, latent_channels, *L] (the posterior
    mean: an edit starts from the item itself, not a draw around it), fp32 on the CPU."""
    device = next(vae.parameters()).device
    with torch.no_grad():
        out = [vae.encode(x[i:i + batch_size].to(device, torch.float32), sample=False).float().cpu()
               for i in range(0, len(x), batch_size)]
    return torch.cat(out)


def is_latent_run(config: DictConfig | dict) -> bool:
    """Whether a run's (saved) config diffuses in a VAE's latent space."""
    return (config.get("dataset") or {}).get("_target_") == LATENT_DATASET


# ----- the dataset ---------------------------------------------------------------------------------

class LatentDataset(Dataset):
    """A dataset seen through a frozen VAE encoder: items are scaled latents z = (μ + σ·ε)·scale_factor.

    data: any dataset (the `diffuse.data` interface); vae: a VAE checkpoint path, a VAE, or a VAE record
        ({config, weights, path, step}, as read_vae_checkpoint returns and a latent checkpoint embeds).
    cache: encode every item once up front and keep μ, σ in memory (`to(device)` moves them), without
        the data's random augmentation (flips); cache=false encodes each batch instead.
    sample: draw z from the posterior with the batch's generator (LDM); false: z = μ.
    dim / resolution / channels / num_classes: what the config says the latent is; checked.
    Labels pass through unchanged. `decode(z)` maps latents back to data.
    """

    def __init__(self, data, vae: str | Path | VAE, cache: bool = True, sample: bool = True,
                 device: str | torch.device = "auto", dim: int | None = None, resolution: int | None = None,
                 channels: int | None = None, num_classes: int | None = None, batch_size: int = 256):
        self.device = resolve_device(device) if isinstance(device, str) else torch.device(device)
        if isinstance(vae, VAE):
            self.vae, self.record = vae.to(self.device).eval().requires_grad_(False), None
        elif isinstance(vae, dict):  # a record (read_vae_checkpoint's, or the one a checkpoint embeds)
            self.record, self.vae = vae, vae_from_record(vae, self.device)
        else:
            self.record = read_vae_checkpoint(vae)
            self.vae = vae_from_record(self.record, self.device)
        check_vae_fits_data(self.vae.dim, self.vae.in_channels, self.vae.downsample_factor, data.dim, data.channels,
                            data.resolution)
        self.data, self.sample, self.batch_size = data, bool(sample), batch_size
        self.dim, self.channels = data.dim, self.vae.latent_channels
        self.resolution = data.resolution // self.vae.downsample_factor
        self.num_classes, self.class_names = data.num_classes, getattr(data, "class_names", ())
        for name, want in (("dim", dim), ("resolution", resolution), ("channels", channels),
                           ("num_classes", num_classes)):
            if want is not None and int(want) != int(getattr(self, name)):
                raise DiffuseError(f"latent dataset: config says {name}={want}, the VAE and data give "
                                   f"{getattr(self, name)}")
        if math.isnan(self.vae.scale_factor):
            self._fit_scale_factor()
        self.scale = self.vae.scale_factor
        self.mean = self.std = self.labels = None
        if cache:
            self._encode_all()

    def __len__(self) -> int:
        return len(self.data)

    @torch.no_grad()
    def _moments(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mean, logvar = self.vae.encoder.moments(x.to(self.device, torch.float32))
        return mean.float(), torch.exp(0.5 * logvar.float())

    def _fit_scale_factor(self) -> None:
        """An `auto` VAE checkpoint saved before its run ended has no factor yet: fit it here, as train-vae
        would, on up to 32 batches of the data (in order)."""
        n = min(len(self.data), 32 * self.batch_size)
        batches = (self.data.get_batch(torch.arange(i, min(n, i + self.batch_size)), None)[0].to(self.device)
                   for i in range(0, n, self.batch_size))
        scale = self.vae.fit_scale_factor(batches, torch.Generator(device=self.device).manual_seed(0))
        log.warning("the VAE's scale_factor (auto) was not fitted yet: fitted on %d items: %.5f", n, scale)
        if self.record is not None:
            self.record = {**self.record, "weights": {k: v.detach().cpu() for k, v in self.vae.state_dict().items()}}

    def _encode_all(self) -> None:
        """μ and σ of every item, once (random flips of the data switched off while encoding)."""
        flips = getattr(self.data, "hflip", False)
        if flips:
            log.warning("latent.cache: the data's random flips are not applied to cached latents (cache=false keeps them)")
            self.data.hflip = False
        means, stds, labels = [], [], []
        try:
            for start in tqdm(range(0, len(self.data), self.batch_size), desc="encode latents", dynamic_ncols=True,
                              leave=False):
                idx = torch.arange(start, min(len(self.data), start + self.batch_size))
                x, y = self.data.get_batch(idx, None)
                mean, std = self._moments(x)
                means.append(mean.cpu()), stds.append(std.cpu()), labels.append(y.cpu())
        finally:
            if flips:
                self.data.hflip = flips
        self.mean, self.std, self.labels = torch.cat(means), torch.cat(stds), torch.cat(labels)
        log.info("cached the latents of %d items (%.1f MB)", len(self.mean),
                 2 * self.mean.numel() * 4 / 2**20)

    def to(self, device: torch.device | str) -> "LatentDataset":
        """Keep the cached latents (or else the data) on `device`, like the in-memory datasets."""
        if self.mean is not None:
            self.mean, self.std, self.labels = self.mean.to(device), self.std.to(device), self.labels.to(device)
        elif hasattr(self.data, "to"):
            self.data.to(device)
        return self

    def get_batch(self, indices: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """indices [B] → z float32 [B, latent_channels, *latent] (scaled), y int64 [B]."""
        if self.mean is not None:
            idx = to_device(indices, self.mean.device)
            mean, std, y = self.mean[idx], self.std[idx], self.labels[idx]
        else:
            x, y = self.data.get_batch(indices, generator)
            mean, std = self._moments(x)
        if self.sample:
            noise = torch.randn(mean.shape, generator=generator)  # a CPU generator, as BatchStream's
            mean = mean + std * to_device(noise, mean.device)
        return mean * self.scale, y

    def heldout(self, n: int) -> "LatentDataset | None":
        """The data's held-out items seen through the same VAE, encoded per batch (only the items used)."""
        data = heldout_of(self.data, n)
        if data is None:
            return None
        return LatentDataset(data, self.vae, cache=False, sample=self.sample, device=self.device,
                             batch_size=self.batch_size)

    def decode(self, z: Tensor) -> Tensor:
        """Latents → data [N, C, *S] in [−1, 1] on the CPU."""
        return decode_latents(self.vae, z)

    def checkpoint_state(self) -> dict:
        """What a diffusion checkpoint keeps so that it decodes on its own: {latent_vae: record}."""
        return {CHECKPOINT_KEY: self.record} if self.record is not None else {}

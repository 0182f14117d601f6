"""What `diffuse sample` and `diffuse evaluate` set up alike: the run read back from its checkpoint, the
sampler to draw with, guidance checked against how the run was trained, the decoder to data space, and the
processes that draw.

Under torchrun (or several Slurm tasks) every process draws a share of the samples (whole batches; sample i
keeps seed + i) on its own GPU, and rank 0 gathers them and writes everything: the same samples as one
process draws, in 1/N of the time. The others write nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from diffuse.building import build
from diffuse.data.latent import is_latent_run, latent_decoder
from diffuse.devices import resolve_device
from diffuse.diffusion.generation import Generated, SamplingPlan
from diffuse.dims import config_item_shape
from diffuse.errors import DiffuseError
from diffuse.jobs.common import LoadedRun, find_checkpoint, joined_processes, load_run, on_rank0
from diffuse.jobs.latent_space import latent_sampler_config
from diffuse.training.distributed import DistInfo, gather_to_main
from diffuse.training.loop import PRECISIONS, resolve_precision, use_channels_last
from diffuse.validation import check_model_fits_data, run_guidance_scale, with_steps

log = logging.getLogger(__name__)

def sampler_config(chosen: DictConfig | None, saved: DictConfig) -> DictConfig:
    """The sampler to draw with. `chosen` is the composed config's `sampler` node: one with a `_target_`
    (sampler=X on the command line) is used as it is; None (the default) means the run's own sampler, and a
    node of bare values (sampler.steps=50 alone) the run's own sampler with those values over it."""
    if chosen is not None and "_target_" in chosen:
        return chosen
    if not saved.get("sampler"):
        raise DiffuseError("the run's config names no sampler: choose one, e.g. sampler=ddpm")
    return OmegaConf.merge(OmegaConf.to_container(saved.sampler), chosen or {})


def prepare_for_sampling(model: torch.nn.Module, device: torch.device, autocast_dtype=None) -> torch.nn.Module:
    """Eval mode; channels-last weights for 2-D conv models on the CPU in fp32 (the default UNet's sampling
    forward at batch 64, 32², one thread: ~0.80 s NCHW vs ~0.61–0.74 s NHWC; under bf16 NCHW is the faster,
    see use_channels_last). The samples agree to float rounding."""
    model.eval()
    if use_channels_last("auto", model, device, autocast_dtype):
        model.to(memory_format=torch.channels_last)
    return model


@contextmanager
def sampling_processes(cfg: DictConfig, run_dir: Path) -> Iterator[tuple[DistInfo, torch.device, Path]]:
    """The processes that draw (joined_processes: this one's DistInfo, its device, rank 0's run dir), with
    rank 0's choice of `cfg.checkpoint` (null: the newest run, which ranks could see differently)."""
    with joined_processes(cfg.device, run_dir, cfg.get("dist_timeout_min", 60)) as (dist, device, run_dir):
        if dist.enabled:
            cfg.checkpoint = on_rank0(lambda: str(find_checkpoint(cfg.checkpoint, "diffusion")), dist)
        yield dist, device, run_dir


@dataclass
class SamplingSession:
    """A trained run ready to draw from: `draw(n, labels)` draws (this process's share, gathered on rank 0),
    `decode` maps the samples to data."""

    run: LoadedRun
    model: torch.nn.Module
    plan: SamplingPlan
    sampler_config: DictConfig
    decode: Callable[[Tensor], Tensor]
    dist: DistInfo = field(default_factory=DistInfo)

    @property
    def num_classes(self) -> int:
        return int(getattr(self.model, "num_classes", 0) or 0)

    @property
    def precision(self) -> str:
        """The network's precision while drawing: fp32, bf16 or fp16 (precision=auto resolved)."""
        return {dtype: name for name, dtype in PRECISIONS.items()}[self.plan.autocast_dtype]

    def draw(self, num_samples: int, labels: Tensor | None = None, trajectory: int | bool = False,
             desc: str = "samples") -> tuple[Generated | None, float]:
        """All the samples (as plan(model, n, labels) draws them) on rank 0 under a progress bar, and the
        seconds they took there (gathering included); other ranks draw their share and get (None, seconds)."""
        out, seconds = self.plan.with_progress(self.model, num_samples, labels, trajectory, desc=desc,
                                               rank=self.dist.rank, world=self.dist.world_size)
        if not self.dist.enabled:
            return out, seconds
        start = time.perf_counter()
        parts = gather_to_main(out, self.dist)
        return (Generated.cat(parts) if parts else None), seconds + time.perf_counter() - start


def open_run(cfg: DictConfig, device: torch.device | None = None, dist: DistInfo | None = None) -> SamplingSession:
    """The run `cfg.checkpoint` names (EMA weights unless use_ema=false), its sampler (see sampler_config;
    latent runs unclipped), and guidance `guidance.scale` (auto: the run's own, whose auto is guided where the
    run learned a null class; a number refused for a run that never did); steps=auto sized by the guidance.
    `device` and `dist`: this process's (sampling_processes); default: cfg.device, one process."""
    device = resolve_device(cfg.device) if device is None else device
    loaded = load_run(cfg.checkpoint, device, use_ema=cfg.use_ema, allow_targets=cfg.get("allow_targets") or ())
    saved = loaded.config
    shape = config_item_shape(saved)  # a stored shape its model cannot take: one line now, not mid-sampling
    check_model_fits_data(loaded.model, shape, int(getattr(loaded.model, "num_classes", 0) or 0),
                          f"{loaded.path}: its data shape {shape} (dataset.channels, dataset.resolution)")
    scale = cfg.guidance.scale  # auto: the run's own, as sampler=null is its own sampler (its auto: auto again)
    guidance = run_guidance_scale(saved, f"the run {loaded.path}", None if scale == "auto" else scale)
    chosen = with_steps(latent_sampler_config(sampler_config(cfg.get("sampler"), saved), is_latent_run(saved)),
                        guidance)
    autocast_dtype = PRECISIONS[resolve_precision(cfg.get("precision", "auto"), device, loaded.model)]
    plan = SamplingPlan(loaded.schedule, build(chosen, "sampler"), shape,
                        saved.objective.prediction, guidance, int(cfg.batch_size), device, int(cfg.seed),
                        autocast_dtype)
    return SamplingSession(loaded, prepare_for_sampling(loaded.model, device, autocast_dtype), plan, chosen,
                           latent_decoder(loaded.state, device), dist or DistInfo())

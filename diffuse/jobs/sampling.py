"""What `diffuse sample` and `diffuse evaluate` set up alike: the run read back from its checkpoint, the plan to
draw with (jobs/sampling_setup.py, shared with the training grids), the decoder to data space, and the
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
from omegaconf import DictConfig
from torch import Tensor

from diffuse.data.latent import latent_decoder
from diffuse.devices import resolve_device
from diffuse.diffusion.generation import Generated, SamplingPlan
from diffuse.dims import config_item_shape
from diffuse.jobs.common import LoadedRun, find_checkpoint, joined_processes, load_run, on_rank0
from diffuse.jobs.sampling_setup import precision_name, prepare_for_sampling, sampling_plan
from diffuse.training.distributed import DistInfo, gather_to_main
from diffuse.validation import check_model_fits_data

log = logging.getLogger(__name__)

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
        return precision_name(self.plan.autocast_dtype)

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
    """The run `cfg.checkpoint` names (EMA weights unless use_ema=false) and the plan to draw from it
    (jobs/sampling_setup.py: the sampler, steps, guidance and precision this job asks for, over the run's own).
    `device` and `dist`: this process's (sampling_processes); default: cfg.device, one process."""
    device = resolve_device(cfg.device) if device is None else device
    loaded = load_run(cfg.checkpoint, device, use_ema=cfg.use_ema, allow_targets=cfg.get("allow_targets") or ())
    saved = loaded.config
    shape = config_item_shape(saved)  # a stored shape its model cannot take: one line now, not mid-sampling
    check_model_fits_data(loaded.model, shape, int(getattr(loaded.model, "num_classes", 0) or 0),
                          f"{loaded.path}: its data shape {shape} (dataset.channels, dataset.resolution)")
    plan, chosen = sampling_plan(saved, shape, device, schedule=loaded.schedule, model=loaded.model,
                                 sampler=cfg.get("sampler"), guidance=cfg.guidance.scale,
                                 precision=cfg.get("precision", "auto"), batch_size=int(cfg.batch_size),
                                 seed=int(cfg.seed), run=f"the run {loaded.path}")
    return SamplingSession(loaded, prepare_for_sampling(loaded.model, device, plan.autocast_dtype), plan, chosen,
                           latent_decoder(loaded.state, device), dist or DistInfo())

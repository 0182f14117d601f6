"""Draw samples from a trained network in batches: labels per class, seeds per sample, optional trajectory.

Sample i always uses seed `seed + i`, so the samples do not depend on the batch size used to draw them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from diffuse.diffusion.guidance import Denoiser
from diffuse.diffusion.samplers import NoiseSource, Sampler, sample


def class_labels(num_samples: int, num_classes: int) -> Tensor | None:
    """Labels in class-major order (a row per class when drawn with nrow = num_samples // num_classes)."""
    if num_classes <= 0:
        return None
    per_class = max(1, -(-num_samples // num_classes))
    return torch.arange(num_classes).repeat_interleave(per_class)


@dataclass
class Generated:
    x: Tensor                      # [N, C, *spatial] fp32 on CPU
    y: Tensor | None               # [N] int64 or None
    times: list[float] | None      # trajectory times (x_T first) when asked
    states: list[Tensor] | None    # [K] × [N, C, *spatial]
    nfe: int = 0


@torch.no_grad()
def generate(model, schedule, sampler: Sampler, sample_shape: Sequence[int], num_samples: int,
             labels: Tensor | None = None, seed: int = 0, batch_size: int = 64, prediction: str = "eps",
             null_class: int | None = None, device: torch.device | str = "cpu", trajectory: int | bool = False,
             autocast_dtype=None, progress=None) -> Generated:
    device = torch.device(device)
    xs, states, times, nfe = [], None, None, 0
    n = num_samples if labels is None else len(labels)
    for start in range(0, n, batch_size):
        stop = min(n, start + batch_size)
        y = labels[start:stop].to(device) if labels is not None else None
        denoiser = Denoiser(model, schedule, prediction, y=y, guidance_scale=sampler.guidance_scale,
                            null_class=null_class, autocast_dtype=autocast_dtype)
        noise = NoiseSource(range(seed + start, seed + stop), device)
        out, traj = sample(denoiser, sampler, noise, sample_shape, trajectory=trajectory)
        nfe = denoiser.nfe
        xs.append(out.cpu())
        if traj is not None:
            times = traj.times
            states = traj.states if states is None else [torch.cat([a, b]) for a, b in zip(states, traj.states)]
        if progress is not None:
            progress(stop - start)
    return Generated(x=torch.cat(xs), y=labels, times=times, states=states, nfe=nfe)

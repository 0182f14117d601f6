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


def sampler_steps(sampler: Sampler, schedule) -> int:
    """Updates the sampler takes per batch on this schedule (intervals of its grid; sampler.steps unless the
    schedule's grid merges points): the unit count of `generate`'s step_progress per sample."""
    return len(sampler.grid(schedule)) - 1


def progress_bar(total_samples: int, steps: int, desc: str, **kwargs):
    """A tqdm bar over samples × sampler steps (advanced by a batch's size after each of its steps)."""
    from tqdm.auto import tqdm
    return tqdm(total=total_samples * steps, desc=f"{desc}: {total_samples} samples × {steps} steps",
                unit="sample-step", dynamic_ncols=True, **kwargs)


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
             autocast_dtype=None, progress=None, step_progress=None) -> Generated:
    """progress(k): called after each batch with its k samples; step_progress(k): after every sampler step of
    a batch of k samples (a bar of num_samples × sampler_steps(...) units advances per step). Neither changes
    the samples."""
    device = torch.device(device)
    xs, states, times, nfe = [], None, None, 0
    n = num_samples if labels is None else len(labels)
    for start in range(0, n, batch_size):
        stop = min(n, start + batch_size)
        y = labels[start:stop].to(device) if labels is not None else None
        denoiser = Denoiser(model, schedule, prediction, y=y, guidance_scale=sampler.guidance_scale,
                            null_class=null_class, autocast_dtype=autocast_dtype)
        noise = NoiseSource(range(seed + start, seed + stop), device)
        on_step = None if step_progress is None else (lambda k=stop - start: step_progress(k))
        out, traj = sample(denoiser, sampler, noise, sample_shape, trajectory=trajectory, on_step=on_step)
        nfe = denoiser.nfe
        xs.append(out.cpu())
        if traj is not None:
            times = traj.times
            states = traj.states if states is None else [torch.cat([a, b]) for a, b in zip(states, traj.states)]
        if progress is not None:
            progress(stop - start)
    return Generated(x=torch.cat(xs), y=labels, times=times, states=states, nfe=nfe)

"""Draw samples from a trained network in batches: labels per class, seeds per sample, optional trajectory.

Sample i always uses seed `seed + i`, so the samples do not depend on the batch size used to draw them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from diffuse.diffusion.guidance import Denoiser
from diffuse.diffusion.objectives import Parameterization
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


def share(num_samples: int, batch_size: int, rank: int = 0, world: int = 1) -> range:
    """The samples process `rank` of `world` draws: a contiguous run of whole batches of batch_size, the same
    batches one process would draw (so the same samples, bit for bit, on the same machine), at most one batch
    more than another process's share. Empty where there are fewer batches than processes."""
    batches = -(-num_samples // batch_size)
    first, stop = batches * rank // world, batches * (rank + 1) // world
    return range(min(num_samples, first * batch_size), min(num_samples, stop * batch_size))


@dataclass
class Generated:
    x: Tensor                      # [N, C, *spatial] fp32 on CPU
    y: Tensor | None               # [N] int64 or None
    times: list[float] | None      # trajectory times (x_T first) when asked
    states: list[Tensor] | None    # [K] × [N, C, *spatial]
    nfe: int = 0

    @staticmethod
    def cat(parts: Sequence[Generated]) -> Generated:
        """Consecutive draws (a draw's batches; shares of the processes, in rank order) as one, each state of
        the trajectory joined once; empty shares are left out."""
        parts = [p for p in parts if len(p.x)] or list(parts[:1])
        states = None if parts[0].states is None else [torch.cat(s) for s in zip(*(p.states for p in parts))]
        y = None if parts[0].y is None else torch.cat([p.y for p in parts])
        return Generated(x=torch.cat([p.x for p in parts]), y=y, times=parts[0].times, states=states,
                         nfe=max(p.nfe for p in parts))


@torch.no_grad()
def generate(model, schedule, sampler: Sampler, sample_shape: Sequence[int], num_samples: int,
             labels: Tensor | None = None, seed: int = 0, batch_size: int = 64,
             prediction: Parameterization | str = "eps",
             guidance_scale: float = 0.0, device: torch.device | str = "cpu", trajectory: int | bool = False,
             autocast_dtype=None, progress=None, step_progress=None) -> Generated:
    """`num_samples` samples of shape sample_shape ([C, *spatial]) with the sampler, sample i of class
    labels[i] (when given) and seed seed + i, classifier-free guided by guidance_scale (see Denoiser).
    progress(k): called after each batch with its k samples; step_progress(k): after every sampler step of
    a batch of k samples (a bar of num_samples × sampler_steps(...) units advances per step). Neither changes
    the samples."""
    device = torch.device(device)
    batches = []
    n = num_samples if labels is None else len(labels)
    for start in range(0, n, batch_size):
        stop = min(n, start + batch_size)
        y = labels[start:stop] if labels is not None else None
        denoiser = Denoiser(model, schedule, prediction, y=None if y is None else y.to(device),
                            guidance_scale=guidance_scale, autocast_dtype=autocast_dtype)
        noise = NoiseSource(range(seed + start, seed + stop), device)
        on_step = None if step_progress is None else (lambda k=stop - start: step_progress(k))
        out, traj = sample(denoiser, sampler, noise, sample_shape, trajectory=trajectory, on_step=on_step)
        batches.append(Generated(x=out.cpu(), y=y, times=None if traj is None else traj.times,
                                 states=None if traj is None else traj.states, nfe=denoiser.nfe))
        if progress is not None:
            progress(stop - start)
    if not batches:  # an empty share of a parallel draw
        return Generated(x=torch.empty(0, *sample_shape), y=labels, times=None, states=None)
    return Generated.cat(batches)


@dataclass
class SamplingPlan:
    """How a job draws samples, all but the network and the labels: built once from the config and the run
    (training grids, trainer.eval_every, `diffuse sample`, `diffuse evaluate`), then `plan(model, n, labels)`.

    sample_shape: [C, *spatial]; guidance_scale: classifier-free guidance w (see Denoiser); seed: sample i
    uses seed + i; autocast_dtype: the network's precision (the sampler's arithmetic stays fp32)."""

    schedule: object
    sampler: Sampler
    sample_shape: tuple
    prediction: Parameterization | str = "eps"
    guidance_scale: float = 0.0
    batch_size: int = 64
    device: torch.device | str = "cpu"
    seed: int = 0
    autocast_dtype: torch.dtype | None = None

    @property
    def steps(self) -> int:
        return sampler_steps(self.sampler, self.schedule)

    def __call__(self, model, num_samples: int, labels: Tensor | None = None, trajectory: int | bool = False,
                 step_progress=None, samples: range | None = None) -> Generated:
        """The samples (of labels[i] when given); only those of `samples` (a range of indices, e.g. a share)
        when given, each with the seed it has in the whole draw."""
        first = 0
        if samples is not None:
            first, num_samples = samples.start, len(samples)
            labels = None if labels is None else labels[samples.start:samples.stop]
        return generate(model, self.schedule, self.sampler, self.sample_shape, num_samples, labels=labels,
                        seed=self.seed + first, batch_size=self.batch_size,
                        prediction=self.prediction, guidance_scale=self.guidance_scale, device=self.device,
                        trajectory=trajectory, autocast_dtype=self.autocast_dtype, step_progress=step_progress)

    def with_progress(self, model, num_samples: int, labels: Tensor | None = None, trajectory: int | bool = False,
                      desc: str = "samples", leave: bool = True, rank: int = 0,
                      world: int = 1) -> tuple[Generated, float]:
        """The samples drawn under a progress bar over samples × steps, and the seconds they took. With
        world > 1, only process `rank`'s share of them (see `share`); the bar is rank 0's, over its share."""
        n = num_samples if labels is None else len(labels)
        mine = share(n, self.batch_size, rank, world)
        if world > 1:
            desc = f"{desc} [process 0 of {world}; {n} samples in all]"
        bar = progress_bar(len(mine), self.steps, desc, leave=leave, disable=rank > 0)
        start = time.perf_counter()
        try:
            out = self(model, num_samples, labels, trajectory, step_progress=bar.update, samples=mine)
        finally:
            bar.close()
        return out, time.perf_counter() - start

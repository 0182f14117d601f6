"""`generate` (diffusion/generation.py), the batched sampling every job uses: the per-step progress it
reports counts samples × steps, batch by batch, and changes no sample."""

from __future__ import annotations

import pytest
import torch

from diffuse.diffusion.generation import generate, sampler_steps
from diffuse.diffusion.samplers import DDIM, DDPM
from diffuse.diffusion.schedules import LinearSchedule
from diffuse.models.unet import UNet


@pytest.mark.parametrize("sampler", [DDPM(steps=6), DDIM(steps=5)], ids=["ddpm", "ddim"])
def test_step_progress_counts_samples_times_steps_and_changes_nothing(sampler):
    torch.manual_seed(0)
    model = UNet(dim=2, in_channels=1, base_channels=8, channel_mult=[1, 2], num_res_blocks=1, attn_levels=[],
                 time_emb_dim=8, num_classes=0).eval()
    schedule = LinearSchedule(num_timesteps=100)
    calls = []
    kwargs = dict(num_samples=7, seed=3, batch_size=3)
    plain = generate(model, schedule, sampler, (1, 8, 8), **kwargs)
    counted = generate(model, schedule, sampler, (1, 8, 8), step_progress=calls.append, trajectory=3, **kwargs)
    assert sum(calls) == 7 * sampler_steps(sampler, schedule) == 7 * sampler.steps
    assert calls == [3] * sampler.steps + [3] * sampler.steps + [1] * sampler.steps  # per step, per batch
    assert torch.equal(plain.x, counted.x)

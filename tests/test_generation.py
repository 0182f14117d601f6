"""`generate` (diffusion/generation.py), the batched sampling every job uses: the per-step progress it
reports counts samples × steps, batch by batch, and changes no sample."""

from __future__ import annotations

import pytest
import torch

from diffuse.diffusion.generation import Generated, SamplingPlan, generate, sampler_steps, share
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


# ----- a draw split across processes (torchrun sample / evaluate): each draws a share, rank 0 joins them ------

@pytest.mark.parametrize("n,batch,world", [(10, 3, 2), (7, 3, 3), (64, 64, 4), (5, 2, 8), (100, 7, 3)])
def test_shares_are_whole_batches_that_cover_every_sample_once(n, batch, world):
    shares = [share(n, batch, rank, world) for rank in range(world)]
    assert [i for s in shares for i in s] == list(range(n))  # contiguous, in rank order, each sample once
    for s in shares:
        assert s.start % batch == 0  # starts on a batch boundary of the one-process draw
    batches = [-(-len(s) // batch) for s in shares]
    assert max(batches) - min(batches) <= 1  # no process draws more than one batch more than another


def test_shares_joined_in_rank_order_are_the_one_process_draw_bit_for_bit():
    torch.manual_seed(0)
    model = UNet(dim=2, in_channels=1, base_channels=8, channel_mult=[1, 2], num_res_blocks=1, attn_levels=[],
                 time_emb_dim=8, num_classes=3).eval()
    plan = SamplingPlan(LinearSchedule(num_timesteps=100), DDPM(steps=4), (1, 8, 8), batch_size=2, seed=5,
                        guidance_scale=1.5)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    whole = plan(model, 9, labels, trajectory=3)
    for world in (2, 3, 6):  # 5 batches: with 6 processes one share is empty
        parts = [plan.with_progress(model, 9, labels, trajectory=3, rank=r, world=world, leave=False)[0]
                 for r in range(world)]
        assert [len(p.x) for p in parts] == [len(share(9, 2, r, world)) for r in range(world)]
        joined = Generated.cat(parts)
        assert torch.equal(joined.x, whole.x) and torch.equal(joined.y, labels)
        assert joined.times == whole.times and joined.nfe == whole.nfe == 4
        assert all(torch.equal(a, b) for a, b in zip(joined.states, whole.states)) and len(joined.states) == 3

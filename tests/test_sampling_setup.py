"""What `diffuse sample` and `diffuse evaluate` draw with (diffuse/jobs/sampling.py): the run's own sampler by
default, values over it, another sampler when one is chosen; stored configs of older runs still build."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from diffuse.building import build, check_targets, upgrade_stored_config, upgrade_targets
from diffuse.errors import DiffuseError
from diffuse.jobs.sampling import sampler_config

SAVED = OmegaConf.create({"sampler": {"_target_": "diffuse.diffusion.samplers.DPMSolverPP", "steps": 20,
                                      "spacing": "logsnr", "clip_x0": False}})


def test_no_sampler_chosen_is_the_runs_own():
    node = sampler_config(None, SAVED)
    assert node == SAVED.sampler and type(build(node, "sampler")).__name__ == "DPMSolverPP"


def test_bare_values_apply_over_the_runs_own_sampler():
    node = sampler_config(OmegaConf.create({"steps": 8}), SAVED)
    assert node.steps == 8 and node._target_ == SAVED.sampler._target_ and node.spacing == "logsnr"
    assert SAVED.sampler.steps == 20  # the stored config is not edited


def test_a_chosen_sampler_is_used_as_composed():
    chosen = OmegaConf.create({"_target_": "diffuse.diffusion.samplers.DDIM", "steps": 5, "eta": 0.0})
    assert sampler_config(chosen, SAVED) is chosen


def test_older_runs_guidance_scale_on_the_sampler_is_dropped():
    """Runs saved before the `guidance` node stored guidance_scale with their sampler (their training grids'
    setting); loading moves it to the guidance node, which a resumed run keeps, and the sampler builds."""
    stored = upgrade_stored_config({"sampler": {**OmegaConf.to_container(SAVED.sampler), "guidance_scale": 2.0}})
    assert stored["guidance"] == {"scale": 2.0}
    node = sampler_config(None, OmegaConf.create(stored))
    assert "guidance_scale" not in node and build(node, "sampler").steps == 20


def test_a_run_without_a_sampler_says_to_choose_one():
    with pytest.raises(DiffuseError, match="choose one"):
        sampler_config(None, OmegaConf.create({"dataset": {}}))


def test_moved_classes_in_stored_configs_still_load():
    """The latent dataset moved from diffuse.latent to diffuse.data.latent: an older checkpoint's stored
    config is renamed (by exact string, nothing imported) and then vetted as any other."""
    stored = {"dataset": {"_target_": "diffuse.latent.LatentDataset", "data": {"_target_": "x.Y"}}}
    upgraded = upgrade_targets(stored)
    assert upgraded["dataset"]["_target_"] == "diffuse.data.latent.LatentDataset"
    with pytest.raises(DiffuseError, match="x.Y"):  # the rest is still vetted
        check_targets(upgraded, "old.ckpt")
    upgraded["dataset"]["data"] = {"_target_": "diffuse.data.shapes.ShapesDataset"}
    check_targets(upgraded, "old.ckpt")

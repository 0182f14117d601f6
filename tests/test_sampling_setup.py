"""What `diffuse sample` and `diffuse evaluate` draw with (diffuse/jobs/sampling.py): the run's own sampler by
default, values over it, another sampler when one is chosen; stored configs of older runs still build; the
default guidance (auto: guided where the run learned a null class) and steps (auto: 20 network passes)."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from diffuse.building import build, check_targets, upgrade_stored_config, upgrade_targets
from diffuse.errors import DiffuseError
from diffuse.jobs.sampling_setup import (AUTO_GUIDANCE_SCALE, guidance_scale, run_guidance_scale, sampler_config,
                                         with_steps)

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


# ── the default guidance and step count (guidance.scale=auto, sampler.steps=auto) ───────────────────────────

def test_auto_guidance_guides_only_runs_that_learned_a_null_class():
    assert guidance_scale("auto", True, 0.1, "r") == AUTO_GUIDANCE_SCALE == 1.1
    assert guidance_scale("auto", True, 0.0, "r") == 0.0   # no label dropout: nothing to guide with
    assert guidance_scale("auto", False, 0.1, "r") == 0.0  # unconditional
    assert guidance_scale(2.0, True, 0.1, "r") == 2.0 and guidance_scale(None, False, 0.0, "r") == 0.0
    with pytest.raises(DiffuseError, match="cond_drop_prob > 0"):  # a number is still checked
        guidance_scale(2.0, True, 0.0, "r")


def test_auto_steps_are_twenty_network_passes():
    """A guided step is one pass over the conditional and the null-class copies, as costly as two plain ones:
    steps=auto keeps the default at 20 passes per sample either way; a number is that many steps."""
    auto = OmegaConf.merge(SAVED.sampler, {"steps": "auto"})
    assert with_steps(auto, 0.0).steps == 20 and with_steps(auto, 1.0).steps == 20  # w 1: plain conditional
    assert with_steps(auto, 1.1).steps == 10
    assert with_steps(SAVED.sampler, 1.1).steps == 20 and auto.steps == "auto"  # numbers kept; input not edited
    assert build(with_steps(auto, 1.1), "sampler").steps == 10


def test_the_default_dpm_solver_config_is_auto_in_every_job():
    from conftest import compose_cfg
    for job in ("train", "sample", "evaluate"):
        cfg = compose_cfg(job, ["sampler=dpm_solver"])
        assert cfg.guidance.scale == "auto" and cfg.sampler.steps == "auto"


def test_sample_and_train_default_to_ten_guided_steps_where_a_null_class_was_learned(tmp_path):
    """End to end: a conditional run with the default label dropout draws its grids and `diffuse sample`s with
    w = 1.1 at 10 steps (20 passes); guidance.scale=0 gives 20 plain steps; a run trained without label
    dropout has no null class, so auto is no guidance, at 20 steps; evaluate records the scale it used."""
    import json
    import re

    from conftest import TINY
    from inproc_cli import run_inproc

    import torch

    from diffuse.jobs.evaluate import summary_lines
    from diffuse.devices import resolve_precision

    def ok(res):
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
        return res.stdout + res.stderr

    train = ["train", *TINY, "conditional=true", "trainer.max_steps=2", "trainer.val_items=0",
             "trainer.sample_every=2", "trainer.final_animation=false", "trainer.num_sample_images=4"]
    sample = ["sample", "num_samples=4", "device=cpu"]
    dropout, no_dropout = tmp_path / "dropout", tmp_path / "no_dropout"
    for cwd, extra in ((dropout, []), (no_dropout, ["trainer.cond_drop_prob=0"])):
        cwd.mkdir()
        ok(run_inproc([*train, *extra], cwd))
    (log,) = dropout.glob("outputs/*/*/train.log")
    assert re.search(r"samples: 4 × 10 steps \(guidance w 1.1\)", log.read_text())  # the final grid
    precision = resolve_precision("auto", torch.device("cpu"))  # sample/evaluate's precision=auto: bf16 on AMX
    assert f"samples: 4 × 10 steps (guidance w 1.1), {precision}, in" in ok(run_inproc(sample, dropout))
    plain = ok(run_inproc([*sample, "guidance.scale=0"], dropout))
    assert f"samples: 4 × 20 steps, {precision}, in" in plain and "guidance w" not in plain
    assert "samples: 4 × 20 steps, fp32, in" in ok(run_inproc([*sample, "precision=fp32"], no_dropout))
    ok(run_inproc(["evaluate", "num_samples=8", "device=cpu", "hydra.run.dir=eval"], dropout))
    metrics = json.loads((dropout / "eval" / "metrics.json").read_text())
    assert metrics["guidance_scale"] == 1.1 and metrics["steps"] == 10 and metrics["sampler_config"]["steps"] == 10
    assert metrics["precision"] == precision
    assert summary_lines(metrics, 2)[0].startswith(f"DPMSolverPP 10 steps (guidance w 1.1), 10 NFE, 8 samples, "
                                                   f"{precision}, step 2")


def test_training_samples_and_sample_resolve_precision_by_one_rule(monkeypatch):
    """A training run's own samples (grids, eval_every) use trainer.precision, `diffuse sample` its precision;
    both resolve through jobs/sampling_setup.sampling_plan → devices.resolve_precision, so at `auto` they agree:
    fp32 on a CPU without AMX, bf16 on one with it (and fp32 for a model that opts out)."""
    import torch

    from conftest import TINY, compose_cfg

    from diffuse.building import build
    from diffuse.diffusion.schedules import LinearSchedule
    from diffuse.jobs.sampling_setup import sampling_plan
    from diffuse.jobs.train import run_plan

    cfg = compose_cfg("train", TINY)
    model = build(cfg.model, "model")
    cpu = torch.device("cpu")
    for amx, want in ((False, None), (True, torch.bfloat16)):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx, raising=False)
        grids = run_plan(cfg, LinearSchedule(), (1, 8, 8), cpu, steps=3, model=model)
        sample, _ = sampling_plan(OmegaConf.to_container(cfg, resolve=True), (1, 8, 8), cpu,
                                  schedule=LinearSchedule(), model=model, precision="auto")
        assert grids.autocast_dtype is sample.autocast_dtype is want
    fp16 = compose_cfg("train", [*TINY, "trainer.precision=fp16"])
    assert run_plan(fp16, LinearSchedule(), (1, 8, 8), cpu, model=model).autocast_dtype is torch.float16


def test_a_run_whose_data_has_no_classes_samples_unguided():
    """conditional=true (the default) on a dataset without classes (a flat dataset=folder) trains a network with
    num_classes 0: auto guidance must be off for it, and an explicit scale refused in one line, not fail inside
    the sampler."""
    config = {"conditional": True, "model": {"num_classes": 0}, "trainer": {"cond_drop_prob": 0.1},
              "guidance": {"scale": "auto"}}
    assert run_guidance_scale(config, "run") == 0.0
    assert run_guidance_scale({**config, "model": {"num_classes": 4}}, "run") == AUTO_GUIDANCE_SCALE
    with pytest.raises(DiffuseError) as e:
        run_guidance_scale(config, "run", scale=3.0)
    assert "\n" not in str(e.value)

"""The sample grids a training run draws (jobs/train.py): counts and steps that scale with the values per sample
(`auto`) and stay within the sampler's own, their config keys validated, a progress bar per sampler step and the
sample time in train.log, and final_samples=false skipping the end-of-run grid and animation."""

from __future__ import annotations

import re

import pytest

from diffuse.errors import DiffuseError
from diffuse.jobs.train import run_plan, training_sample_counts
from diffuse.validation import validate

from conftest import TINY, compose_cfg
from inproc_cli import run_inproc

TRAIN = TINY + ["conditional=true", "trainer.max_steps=2", "trainer.sample_every=2", "trainer.val_items=0"]


def _ok(res):
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def _train_log(cwd):
    logs = list((cwd / "outputs").glob("*/*/train.log"))
    assert len(logs) == 1
    return logs[0].parent, logs[0].read_text()


@pytest.mark.parametrize("shape,expected", [
    ((1, 28, 28), (32, 250)), ((3, 64, 64), (32, 250)), ((2, 4096), (32, 250)), ((1, 128, 128), (32, 250)),
    ((1, 32, 32, 32), (8, 50)), ((3, 128, 128), (4, 50)), ((1, 64, 64, 64), (4, 50)), ((1, 16, 16, 16), (32, 250)),
])
def test_auto_counts_scale_with_the_values_per_sample(shape, expected):
    assert training_sample_counts("auto", "auto", shape, 1000) == expected


def test_explicit_counts_are_honoured_and_steps_stay_within_the_sampler():
    assert training_sample_counts(5, 7, (1, 32, 32, 32), 1000) == (5, 7)
    assert training_sample_counts(40, 300, (1, 8, 8), 1000) == (40, 300)
    assert training_sample_counts("auto", "auto", (1, 8, 8), 50) == (32, 50)   # ≤ the sampler's own
    assert training_sample_counts(3, None, (1, 8, 8), 60) == (3, 60)           # null: the sampler's own


def test_defaults_are_auto_and_the_sample_keys_are_validated():
    cfg = compose_cfg("train", TINY)
    assert (cfg.trainer.num_sample_images, cfg.trainer.sample_steps) == ("auto", "auto")
    assert cfg.trainer.final_samples is True and cfg.trainer.grid_max_columns == 16
    validate(cfg, "train")
    assert compose_cfg("sample", []).grid_max_columns == 16
    for override, message in [
        ("trainer.num_sample_images=many", "trainer.num_sample_images must be an integer ≥ 1, or auto; got many"),
        ("trainer.sample_steps=0", "trainer.sample_steps must be an integer ≥ 1, auto or null; got 0"),
        ("trainer.final_samples=maybe", "trainer.final_samples must be true or false; got maybe"),
        ("trainer.grid_max_columns=0", "trainer.grid_max_columns must be an integer ≥ 1; got 0"),
    ]:
        with pytest.raises(DiffuseError, match=re.escape(message)):
            validate(compose_cfg("train", TINY + [override]), "train")
    with pytest.raises(DiffuseError, match="grid_max_columns must be an integer ≥ 1; got 0"):
        validate(compose_cfg("sample", ["grid_max_columns=0"]), "sample")


def test_train_shows_a_bar_and_logs_the_sample_time(tmp_path):
    res = _ok(run_inproc(["train", *TRAIN, "trainer.num_sample_images=8", "trainer.sample_steps=3",
                          "trainer.final_animation=false"], tmp_path))
    assert "step 2 samples: 8 samples × 3 steps" in res.stderr and "/24" in res.stderr
    run, text = _train_log(tmp_path)
    assert re.search(r"step 2: samples: 8 × 3 steps \(guidance w 1.1\) in \d+\.\d s → .*step_2\.png", text), text
    assert (run / "samples" / "step_2.png").is_file()


def test_final_samples_false_skips_the_end_of_run_grid_and_animation(tmp_path):
    _ok(run_inproc(["train", *TRAIN, "trainer.num_sample_images=4", "trainer.sample_steps=2",
                    "trainer.final_samples=false"], tmp_path))
    run, text = _train_log(tmp_path)
    assert not list(run.glob("samples/*.png")) and not list(run.glob("samples/*.gif"))
    assert "samples:" not in text


def test_training_samples_use_the_guidance_node_and_the_runs_sampler():
    """Grids and trainer.eval_every draw with the run's sampler at the steps asked, guided by guidance.scale
    (the sampler knows nothing of guidance); the run's config is not edited."""
    from diffuse.diffusion.schedules import LinearSchedule

    cfg = compose_cfg("train", [*TINY, "guidance.scale=2.5", "sampler=ddim", "sampler.steps=30"])
    plan = run_plan(cfg, LinearSchedule(), (1, 8, 8), "cpu", steps=7)
    assert plan.guidance_scale == 2.5 and type(plan.sampler).__name__ == "DDIM" and plan.sampler.steps == 7
    assert not hasattr(plan.sampler, "guidance_scale") and cfg.sampler.steps == 30

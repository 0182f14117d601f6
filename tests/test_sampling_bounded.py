"""Issue 14 item 2: sampling that is bounded and visible — a progress bar per sampler step, sample counts that
scale with the data (`auto`), a switch for the end-of-run grid, and grids capped at a readable width."""

from __future__ import annotations

import re

import imageio.v2 as imageio
import numpy as np
import pytest
import torch

from diffuse import media
from diffuse.diffusion.generation import class_labels, generate, sampler_steps
from diffuse.diffusion.samplers import DDIM, DDPM
from diffuse.diffusion.schedules import LinearSchedule
from diffuse.data.shapes import CLASS_NAMES
from diffuse.errors import DiffuseError
from diffuse.jobs.train import training_sample_counts
from diffuse.models.unet import UNet
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


def test_defaults_are_auto_and_the_new_keys_are_validated():
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


def test_train_shows_a_bar_and_logs_the_sample_time(tmp_path):
    res = _ok(run_inproc(["train", *TRAIN, "trainer.num_sample_images=8", "trainer.sample_steps=3",
                          "trainer.final_animation=false"], tmp_path))
    assert "step 2 samples: 8 samples × 3 steps" in res.stderr and "/24" in res.stderr
    run, text = _train_log(tmp_path)
    assert re.search(r"step 2: samples: 8 × 3 steps in \d+\.\d s → .*step_2\.png", text), text
    assert (run / "samples" / "step_2.png").is_file()


def test_final_samples_false_skips_the_end_of_run_grid_and_animation(tmp_path):
    _ok(run_inproc(["train", *TRAIN, "trainer.num_sample_images=4", "trainer.sample_steps=2",
                    "trainer.final_samples=false"], tmp_path))
    run, text = _train_log(tmp_path)
    assert not list(run.glob("samples/*.png")) and not list(run.glob("samples/*.gif"))
    assert "samples:" not in text


def test_a_1000_sample_class_grid_is_capped_and_the_npz_holds_all(tmp_path):
    _ok(run_inproc(["train", *TRAIN, "trainer.sample_every=0"], tmp_path))
    res = _ok(run_inproc(["sample", "num_samples=1000", "sampler.steps=2", "batch_size=500", "device=cpu"],
                         tmp_path))
    out = res.stdout + res.stderr
    assert "1000 samples × 2 steps" in out and "2000/2000" in out  # advanced per step, not per batch
    assert "first 16 of 250 samples per class" in out
    printed = dict(re.findall(r"^(samples|grid): (.+)$", res.stdout, re.M))
    data = np.load(printed["samples"])
    assert data["x"].shape == (1000, 1, 8, 8) and np.bincount(data["y"]).tolist() == [250] * 4
    grid = imageio.imread(printed["grid"])
    x, y = torch.from_numpy(data["x"]), torch.from_numpy(data["y"])
    names = CLASS_NAMES[2][:4]  # the shapes' class names label the rows
    reference = imageio.imread(media.save_class_grid(x, y, tmp_path / "ref16.png", names, per_class=16))
    assert grid.shape == reference.shape  # 16 columns (plus the class-name margin), 4 rows
    wider = imageio.imread(media.save_class_grid(x, y, tmp_path / "ref17.png", names, per_class=17))
    assert grid.shape[1] < wider.shape[1] and grid.shape[1] < 1100  # uncapped: 250 columns, ~15000 px


def test_grids_wrap_and_animation_rows_are_cut_to_max_columns(tmp_path):
    x = torch.rand(100, 1, 8, 8) * 2 - 1
    wide = imageio.imread(media.save_grid(x, tmp_path / "a.png", nrow=50))
    capped = imageio.imread(media.save_grid(x, tmp_path / "b.png", nrow=50, max_columns=10))
    ten = imageio.imread(media.save_grid(x, tmp_path / "c.png", nrow=10))
    assert capped.shape == ten.shape and capped.shape[1] < wide.shape[1]
    assert media.first_columns(6, 3, 2) == ([0, 1, 3, 4], 2)
    labels = class_labels(40, 4)  # 10 per class
    states = [x[:40], x[40:80]]
    path = media.save_animation(states, tmp_path / "a.gif", nrow=10, max_columns=4, row_labels=list("abcd"))
    frames = imageio.mimread(path)
    ref = media.render_frames([s[media.first_columns(40, 10, 4)[0]] for s in states], 4, row_labels=list("abcd"))
    assert frames[0].shape[:2] == ref[0].shape[:2] and len(labels) == 40

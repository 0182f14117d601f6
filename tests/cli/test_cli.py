"""`diffuse` from the command line, in a subprocess at tiny sizes: `train` writes its run folder (checkpoints,
metrics, grids, animation, offline W&B), `sample`/`animate` find the newest checkpoint, samples do not depend on
the batch size, `resume=auto`, a multirun, `--cfg`/`--help`, one clear line for bad input, the flag
translation; on a GPU, train in bf16/fp16 and sample."""

from __future__ import annotations

import json
import re
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest
import torch

from diffuse.cli import own_sampler_overrides, split_flags, translate

from conftest import CUDA_TINY, TINY, requires_cuda, run_cli

TRAIN = TINY + ["trainer.max_steps=6", "trainer.checkpoint_every=3", "trainer.sample_every=6",
                "trainer.sample_steps=5", "trainer.num_sample_images=8", "logger.mode=offline"]
TRAIN = [a for a in TRAIN if a != "logger=none"]


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _losses(run_dir):
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """`diffuse train` once in a scratch folder; later tests sample and resume from it."""
    cwd = tmp_path_factory.mktemp("cli")
    proc = _ok(run_cli(["train", *TRAIN], cwd))
    runs = list((cwd / "outputs").glob("*/*/checkpoints/last.ckpt"))
    assert len(runs) == 1, proc.stderr
    return cwd, runs[0].parent.parent


@pytest.mark.slow
def test_train_writes_the_run_folder(trained):
    cwd, run = trained
    assert (run / ".hydra" / "config.yaml").is_file()
    assert {p.name for p in (run / "checkpoints").iterdir()} == {"last.ckpt", "step_3.ckpt", "step_6.ckpt"}
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert {"loss", "lr", "grad_norm", "images_per_s"} <= set(rows[0])
    assert len(imageio.mimread(run / "samples" / "animation.gif")) > 2  # the end-of-training animation
    grid = imageio.imread(run / "samples" / "step_6.png")
    assert grid.ndim == 3 and grid.shape[2] == 3
    assert list((run / "wandb").glob("offline-run-*")), "offline W&B run expected"
    assert (run / "train.log").is_file()


@pytest.mark.slow
def test_sample_with_animation_finds_newest_checkpoint(trained):
    cwd, run = trained
    proc = _ok(run_cli(["sample", "--animation", "sampler.steps=10", "num_samples=8", "animation.frames=5",
                        "animation.hold=0.5", "animation.fps=4", "device=cpu"], cwd))
    printed = dict(re.findall(r"^(samples|grid|animation|steps): (.+)$", proc.stdout, re.M))
    assert set(printed) == {"samples", "grid", "animation", "steps"}
    data = np.load(printed["samples"])
    assert data["x"].shape == (8, 1, 8, 8) and data["x"].dtype == np.float32
    assert data["y"].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]  # rows per class
    frames = imageio.mimread(printed["animation"])
    assert len(frames) == 5  # x_T, three states between, the sample
    assert imageio.imread(printed["steps"]).shape[0] > imageio.imread(printed["steps"]).shape[1] / 5  # 4 rows
    from PIL import Image
    with Image.open(printed["animation"]) as gif:
        durations = []
        for i in range(gif.n_frames):
            gif.seek(i)
            durations.append(gif.info["duration"])
    assert durations[:4] == [250] * 4 and durations[-1] == 250 + 500  # the last frame held 0.5 s at 4 fps
    assert Path(printed["grid"]).is_file()
    # four rows (one per class) of two samples: taller than wide
    grid = imageio.imread(printed["grid"])
    assert grid.shape[0] > grid.shape[1]


@pytest.mark.slow
def test_sample_is_reproducible_whatever_the_batch_size(trained):
    cwd, run = trained
    ckpt = run / "checkpoints" / "last.ckpt"
    outs = []
    for bs in (8, 3):
        proc = _ok(run_cli(["sample", f"checkpoint={ckpt}", "sampler.steps=10", "num_samples=8",
                            f"batch_size={bs}", "device=cpu"], cwd))
        outs.append(np.load(re.search(r"^samples: (.+)$", proc.stdout, re.M).group(1))["x"])
    # per-sample seeds make the samples the same draws; the float results may differ in the last bits, since
    # oneDNN picks its convolution kernels by batch size (seen: 4e-7 between batch 8 and 3 on one x86 CPU)
    np.testing.assert_allclose(outs[0], outs[1], rtol=0, atol=1e-5)


@pytest.mark.slow
def test_animate_job_equals_sample_animation(trained):
    cwd, _ = trained
    proc = _ok(run_cli(["animate", "sampler.steps=4", "num_samples=4", "animation.frames=3", "device=cpu"], cwd))
    assert "animation: " in proc.stdout


@pytest.mark.slow
def test_resume_auto_continues_the_newest_run(trained):
    cwd, run = trained
    proc = _ok(run_cli(["train", "resume=auto", "trainer.max_steps=8", "logger=none"], cwd))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows][-2:] == [7, 8]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["step"] == 8
    assert "resuming" in proc.stdout + proc.stderr


@pytest.mark.slow
@requires_cuda
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_train_then_sample_from_the_cli_on_cuda(tmp_path, precision):
    proc = run_cli(["train", *CUDA_TINY, "trainer.max_steps=6", f"trainer.precision={precision}",
                    "trainer.sample_every=6", "trainer.sample_steps=5", "trainer.num_sample_images=4"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = next((tmp_path / "outputs").glob("*/*"))
    assert (run / "samples" / "step_6.png").is_file()
    assert all(map(lambda loss: loss == loss and loss < 10, _losses(run).values()))
    proc = run_cli(["sample", f"checkpoint={run}", "device=cuda", "sampler=dpm_solver", "sampler.steps=8",
                    "num_samples=8", "--animation"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "samples: " in proc.stdout


@pytest.mark.slow
def test_multirun_sweep_runs_two_jobs(tmp_path):
    proc = _ok(run_cli(["train", "-m", "trainer.lr=1e-4,3e-4", *TINY, "trainer.max_steps=1"], tmp_path))
    ckpts = sorted((tmp_path / "multirun").glob("*/*/*/checkpoints/last.ckpt"))
    assert len(ckpts) == 2, proc.stdout
    lrs = sorted(torch.load(c, weights_only=True)["config"]["trainer"]["lr"] for c in ckpts)
    assert lrs == [1e-4, 3e-4]


@pytest.mark.slow
def test_cfg_job_prints_config_and_help_lists_jobs(tmp_path):
    proc = _ok(run_cli(["train", "model.base_channels=16", "--cfg", "job", "seed=3"], tmp_path))
    assert "seed: 3" in proc.stdout
    assert "base_channels: 16" in proc.stdout and "_target_: diffuse.models.unet.UNet" in proc.stdout
    assert not (tmp_path / "outputs").exists()
    proc = _ok(run_cli(["--help"], tmp_path))
    assert all(job in proc.stdout for job in ("train", "sample", "animate"))
    proc = _ok(run_cli(["train", "--help"], tmp_path))
    assert "model: " in proc.stdout and "unet" in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("args,message", [
    (["train", "model=nonexistent"], r"Could not find 'model/nonexistent'.*Available options in 'model'"),
    (["train", "dim=4"], r"dim must be 1, 2 or 3; got 4"),
    (["train", "trainer.precision=fp8"], r"precision must be one of fp32, bf16, fp16"),
    (["frobnicate"], r"unknown job 'frobnicate'"),
])
def test_bad_input_is_one_clear_error(tmp_path, args, message):
    proc = run_cli(args + ["logger=none"] if args[0] == "train" else args, tmp_path)
    assert proc.returncode != 0
    assert re.search(message, proc.stderr, re.S), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_sample_without_any_checkpoint_says_train_first(tmp_path):
    proc = run_cli(["sample"], tmp_path)
    assert proc.returncode != 0 and "run `diffuse train` first" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_sample_from_corrupt_checkpoint(tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_text("not a checkpoint")
    proc = run_cli(["sample", f"checkpoint={bad}"], tmp_path)
    assert proc.returncode != 0 and "corrupt or not a PyTorch file" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_flag_translation():
    assert translate(["--animation", "--checkpoint", "a/b.ckpt", "--num-samples=4", "-m", "x=1"]) == [
        "animation.enabled=true", "checkpoint=a/b.ckpt", "num_samples=4", "-m", "x=1"]
    assert translate(["--cfg", "job", "--help"]) == ["--cfg", "job", "--help"]
    assert split_flags(["a=1", "--cfg", "job", "b=2", "-m"]) == (["a=1", "b=2"], ["--cfg", "job", "-m"])


def test_sampler_values_without_a_sampler_choice_apply_to_the_runs_own():
    """sample/evaluate have no sampler node unless one is chosen (sampler: null = the run's own): their
    sampler.* values become add-or-override (++), which works with and without a choice, in a sweep too."""
    assert own_sampler_overrides("sample", ["sampler.steps=8", "num_samples=4"]) == ["++sampler.steps=8", "num_samples=4"]
    assert own_sampler_overrides("evaluate", ["sampler=ddim,heun", "sampler.steps=4"]) == [
        "sampler=ddim,heun", "++sampler.steps=4"]
    assert own_sampler_overrides("train", ["sampler.steps=8"]) == ["sampler.steps=8"]  # train: a sampler always

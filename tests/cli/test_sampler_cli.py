"""From the command line: train on the VE-SDE with Euler–Maruyama, then sample that checkpoint with every sampler."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import conf_choices, run_cli

pytestmark = pytest.mark.slow  # `diffuse train` and `sample` with every sampler, in subprocesses

SAMPLERS = conf_choices("sampler")  # every conf/sampler/*.yaml
TINY_TRAIN = ["trainer.max_steps=4", "trainer.batch_size=8", "dataset.resolution=8", "dataset.size=64",
              "model.base_channels=8", "model.channel_mult=[1,2]", "trainer.sample_every=0", "logger=none",
              "device=cpu"]


def _npz_paths(stdout: str) -> list[str]:
    return [line.split(": ", 1)[1] for line in stdout.splitlines() if line.startswith("samples: ")]


def test_train_vesde_then_sample_with_every_sampler(tmp_path):
    train = run_cli(["train", "schedule=vesde", "sampler=euler_maruyama", *TINY_TRAIN], tmp_path)
    assert train.returncode == 0, train.stderr[-2000:]
    ckpts = sorted(tmp_path.glob("outputs/*/*/checkpoints/last.ckpt"))
    assert len(ckpts) == 1

    # every sampler on that checkpoint, in one Hydra multirun (one process: the CLI's start-up paid once)
    multi = run_cli(["sample", "-m", f"checkpoint={ckpts[0]}", f"sampler={','.join(SAMPLERS)}", "sampler.steps=5",
                     "num_samples=4", "device=cpu"], tmp_path)
    assert multi.returncode == 0, multi.stderr[-2000:]
    paths = _npz_paths(multi.stdout)
    assert len(paths) == len(SAMPLERS)
    for name, path in zip(SAMPLERS, paths):
        data = np.load(path)
        assert data["x"].shape == (4, 1, 8, 8) and data["x"].dtype == np.float32, name
        assert np.isfinite(data["x"]).all(), name
        assert data["y"].tolist() == [0, 1, 2, 3], name  # a row per class
    assert f"sampler={SAMPLERS[-1]}" in multi.stderr + multi.stdout

    # the run's own sampler (Euler–Maruyama), guided, as a plain `diffuse sample`
    guided = run_cli(["sample", f"checkpoint={ckpts[0]}", "sampler.steps=8", "guidance.scale=2.0",
                      "num_samples=4", "device=cpu"], tmp_path)
    assert guided.returncode == 0, guided.stderr[-2000:]
    assert "sample (EulerMaruyama): 4 samples × 8 steps" in guided.stderr  # the run's own sampler, 8 steps
    (path,) = _npz_paths(guided.stdout)
    assert np.isfinite(np.load(path)["x"]).all()

    bad = run_cli(["sample", f"checkpoint={ckpts[0]}", "sampler=ddim", "sampler.eta=2", "device=cpu"], tmp_path)
    assert bad.returncode == 1 and "sampler.eta must be a number in [0, 1]; got 2" in bad.stderr

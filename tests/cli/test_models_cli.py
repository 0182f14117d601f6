"""`diffuse train` with each model family from the command line (msnat in dim 1, 2, 3; shufflenet and
spatial_transformer in 2-D; their tiny overrides in conftest), 2 steps, then `diffuse sample` on every checkpoint;
a bad attention backend and a 3-D ShuffleNet are one clear line."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import MSNAT, SHUFFLENET, SPATIAL_TRANSFORMER, TWO_TINY_STEPS, run_cli

pytestmark = pytest.mark.slow  # five tiny models trained and sampled through `diffuse` in subprocesses


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_train_then_sample_each_model_from_the_cli(tmp_path):
    # the three MSNAT dims in one multirun (one process start-up)
    _ok(run_cli(["train", "-m", "dim=1,2,3", *MSNAT, *TWO_TINY_STEPS], tmp_path))
    _ok(run_cli(["train", *SHUFFLENET, *TWO_TINY_STEPS], tmp_path))
    _ok(run_cli(["train", *SPATIAL_TRANSFORMER, *TWO_TINY_STEPS], tmp_path))
    checkpoints = sorted(tmp_path.glob("multirun/*/*/*/checkpoints/last.ckpt")) + \
        sorted(tmp_path.glob("outputs/*/*/checkpoints/last.ckpt"))
    assert len(checkpoints) == 5, checkpoints
    for ckpt in checkpoints:
        metrics = (ckpt.parent.parent / "metrics.jsonl").read_text().splitlines()
        assert len(metrics) == 2  # both steps ran and were logged

    # sample every checkpoint, in one multirun
    proc = _ok(run_cli(["sample", "-m", "checkpoint=" + ",".join(map(str, checkpoints)), "sampler.steps=5",
                        "num_samples=4", "device=cpu"], tmp_path))
    paths = [line.split(": ", 1)[1] for line in proc.stdout.splitlines() if line.startswith("samples: ")]
    expected = [(4, 1, 8), (4, 1, 8, 8), (4, 1, 8, 8, 8), (4, 1, 28, 28), (4, 1, 32, 32)]
    assert len(paths) == len(expected)
    for path, shape in zip(paths, expected):
        data = np.load(path)
        assert data["x"].shape == shape, path
        assert np.isfinite(data["x"]).all()
        assert data["y"].tolist() == [0, 1, 2, 3]  # conditional by default: one row per class


def test_unknown_attention_backend_is_a_one_line_error(tmp_path):
    proc = run_cli(["train", *MSNAT, "dim=2", "model.attention.backend=cuda", *TWO_TINY_STEPS], tmp_path)
    assert proc.returncode == 1
    assert "attention backend must be one of auto, torch, flex, natten" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_shufflenet_in_3d_is_a_clear_error(tmp_path):
    proc = run_cli(["train", "model=shufflenet", "dim=3", "dataset.resolution=8", *TWO_TINY_STEPS], tmp_path)
    assert proc.returncode == 1 and "2-D only" in proc.stderr

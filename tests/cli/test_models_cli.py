"""`diffuse train` with every conf/model/*.yaml in each dim it supports from the command line (at the YAML's
sizes, on the smallest resolution the model accepts), 2 steps, then `diffuse sample` on every checkpoint;
a bad attention backend and a 3-D ShuffleNet are one clear line."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import MODEL_CASES, TWO_TINY_STEPS, model_overrides, run_cli

pytestmark = pytest.mark.slow  # every model in every dim trained and sampled through `diffuse` in subprocesses


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_train_then_sample_each_model_from_the_cli(tmp_path):
    # every conf/model/*.yaml in each dim its class supports; one multirun per model and resolution
    runs: dict[tuple[str, str], list[int]] = {}
    for name, dim in MODEL_CASES:
        _, _, resolution = model_overrides(name, dim)
        runs.setdefault((name, resolution), []).append(dim)
    expected = []
    for (name, resolution), dims in runs.items():
        (tmp_path / name).mkdir()
        _ok(run_cli(["train", "-m", f"model={name}", resolution, "dim=" + ",".join(map(str, dims)), *TWO_TINY_STEPS],
                    tmp_path / name))
        expected += [(4, 1, *[int(resolution.split("=")[1])] * dim) for dim in dims]
    checkpoints = [sorted((tmp_path / name).glob("multirun/*/*/*/checkpoints/last.ckpt"),
                          key=lambda p: int(p.parents[1].name)) for name, _ in runs]  # job number = the dim's order
    checkpoints = [ckpt for per_model in checkpoints for ckpt in per_model]
    assert len(checkpoints) == len(MODEL_CASES), checkpoints
    for ckpt in checkpoints:
        metrics = (ckpt.parent.parent / "metrics.jsonl").read_text().splitlines()
        assert len(metrics) == 2  # both steps ran and were logged

    # sample every checkpoint, in one multirun
    proc = _ok(run_cli(["sample", "-m", "checkpoint=" + ",".join(map(str, checkpoints)), "sampler.steps=5",
                        "num_samples=4", "device=cpu"], tmp_path))
    paths = [line.split(": ", 1)[1] for line in proc.stdout.splitlines() if line.startswith("samples: ")]
    assert len(paths) == len(expected)
    for path, shape in zip(paths, expected):
        data = np.load(path)
        assert data["x"].shape == shape, path
        assert np.isfinite(data["x"]).all()
        assert data["y"].tolist() == [0, 1, 2, 3]  # conditional by default: one row per class


def test_unknown_attention_backend_is_a_one_line_error(tmp_path):
    proc = run_cli(["train", *model_overrides("msnat", 2), "model.attention.backend=cuda", *TWO_TINY_STEPS], tmp_path)
    assert proc.returncode == 1
    assert "attention backend must be one of auto, torch, flex, natten" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_shufflenet_in_3d_is_a_clear_error(tmp_path):
    proc = run_cli(["train", "model=shufflenet", "dim=3", "dataset.resolution=8", *TWO_TINY_STEPS], tmp_path)
    assert proc.returncode == 1 and "2-D only" in proc.stderr

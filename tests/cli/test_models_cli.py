"""`diffuse train` with every conf/model/*.yaml in each dim it supports from the command line (at the YAML's
sizes, on the smallest resolution the model accepts), 2 steps, then `diffuse sample` on every checkpoint;
a bad attention backend and a 3-D ShuffleNet are one clear line."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import MODEL_CASES, TWO_TINY_STEPS, model_overrides, model_takes_labels, run_cli

pytestmark = pytest.mark.slow  # every model in every dim trained and sampled through `diffuse` in subprocesses


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_train_then_sample_each_model_from_the_cli(tmp_path):
    # every conf/model/*.yaml in each dim its class supports; one multirun per model and resolution
    runs: dict[tuple[str, str, bool], list[int]] = {}
    for name, dim in MODEL_CASES:
        resolution = model_overrides(name, dim)[-1]
        runs.setdefault((name, resolution, model_takes_labels(name, dim)), []).append(dim)
    expected = []  # (shape, conditional) per checkpoint
    for (name, resolution, labels), dims in runs.items():
        folder = tmp_path / f"{name}-{len(expected)}"
        folder.mkdir()
        _ok(run_cli(["train", "-m", f"model={name}", resolution, "dim=" + ",".join(map(str, dims)),
                     f"conditional={str(labels).lower()}", *TWO_TINY_STEPS], folder))
        expected += [((4, 1, *[int(resolution.split("=")[1])] * dim), labels) for dim in dims]
        runs[(name, resolution, labels)] = sorted(folder.glob("multirun/*/*/*/checkpoints/last.ckpt"),
                                                  key=lambda p: int(p.parents[1].name))  # job number: dims' order
    checkpoints = [ckpt for per_run in runs.values() for ckpt in per_run]
    assert len(checkpoints) == len(MODEL_CASES), checkpoints
    for ckpt in checkpoints:
        metrics = (ckpt.parent.parent / "metrics.jsonl").read_text().splitlines()
        assert len(metrics) == 2  # both steps ran and were logged

    # sample every checkpoint, in one multirun
    proc = _ok(run_cli(["sample", "-m", "checkpoint=" + ",".join(map(str, checkpoints)), "sampler.steps=5",
                        "num_samples=4", "device=cpu"], tmp_path))
    paths = [line.split(": ", 1)[1] for line in proc.stdout.splitlines() if line.startswith("samples: ")]
    assert len(paths) == len(expected)
    for path, (shape, labels) in zip(paths, expected):
        data = np.load(path)
        assert data["x"].shape == shape, path
        assert np.isfinite(data["x"]).all()
        if labels:
            assert data["y"].tolist() == [0, 1, 2, 3]  # conditional: one row per class


def test_unknown_attention_backend_is_a_one_line_error(tmp_path):
    proc = run_cli(["train", *model_overrides("msnat", 2), "model.attention.backend=cuda", *TWO_TINY_STEPS], tmp_path)
    assert proc.returncode == 1
    assert "attention backend must be one of auto, torch, flex, natten" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_shufflenet_in_3d_is_a_clear_error(tmp_path):
    proc = run_cli(["train", "model=shufflenet", "dim=3", "dataset.resolution=8", *TWO_TINY_STEPS], tmp_path)
    assert proc.returncode == 1 and "2-D only" in proc.stderr

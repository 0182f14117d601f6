"""`diffuse train` with each model family from the command line (msnat in dim 1, 2, 3; shufflenet and
spatial_transformer in 2-D), 2 steps at tiny sizes, then `diffuse sample` on every checkpoint."""

from __future__ import annotations

import numpy as np

from conftest import run_cli

COMMON = ["trainer.max_steps=2", "trainer.batch_size=2", "dataset.size=16", "trainer.sample_every=0",
          "trainer.log_every=1", "logger=none", "device=cpu"]
# a 2-level MSNAT of width 8 for every dim (the model takes levels.dim{dim})
TINY_LEVELS = "[{mult: 1, heads: 2, kernel: 3, dilations: [1, 2]}, {mult: 2, heads: 2, kernel: 3}]"
MSNAT = ["model=msnat", "dataset.resolution=8", "model.base_channels=8", "model.time_emb_dim=8",
         *[f"model.levels.dim{d}={TINY_LEVELS}" for d in (1, 2, 3)]]
SHUFFLENET = ["model=shufflenet", "dim=2", "dataset.resolution=28", "model.base_channels=8", "model.units=1",
              "model.time_emb_dim=16"]
SPATIAL_TRANSFORMER = ["model=spatial_transformer", "dim=2", "dataset.resolution=32", "model.channels=[8,16,16,32]",
                       "model.embed_dim=16", "model.context_dim=16"]


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_train_then_sample_each_model_from_the_cli(tmp_path):
    # the three MSNAT dims in one multirun (one process start-up)
    _ok(run_cli(["train", "-m", "dim=1,2,3", *MSNAT, *COMMON], tmp_path))
    _ok(run_cli(["train", *SHUFFLENET, *COMMON], tmp_path))
    _ok(run_cli(["train", *SPATIAL_TRANSFORMER, *COMMON], tmp_path))
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
    proc = run_cli(["train", *MSNAT, "dim=2", "model.attention.backend=cuda", *COMMON], tmp_path)
    assert proc.returncode == 1
    assert "attention backend must be one of auto, torch, flex, natten" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_shufflenet_in_3d_is_a_clear_error(tmp_path):
    proc = run_cli(["train", "model=shufflenet", "dim=3", "dataset.resolution=8", *COMMON], tmp_path)
    assert proc.returncode == 1 and "2-D only" in proc.stderr

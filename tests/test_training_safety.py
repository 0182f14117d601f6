"""What training never does: write NaN into a checkpoint, keep every checkpoint forever, leave debris or a
traceback when the disk is full, or run fp16 without loss scaling."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from diffuse.errors import DiffuseError
from diffuse.jobs import train as train_job
from diffuse.storage.checkpoint import load_checkpoint

from conftest import TINY, compose_cfg, run_cli


def _train(tmp_path, name, overrides):
    return train_job.run(compose_cfg("train", TINY + overrides), tmp_path / name, [])


def _nan_gradient_at(calls: set[int] | None, original):
    """DiffusionLoss.__call__ whose loss stays finite but whose gradient is NaN on the given calls (all from
    the first one in the set when None is passed): 0·√(p − p) is 0, its gradient 0·∞ = NaN."""
    count = {"n": 0}

    def poisoned(self, model, *args, **kwargs):
        count["n"] += 1
        loss = original(self, model, *args, **kwargs)
        if calls is None or count["n"] in calls:
            p = next(model.parameters())
            loss = loss + 0.0 * torch.sqrt((p - p.detach()).sum())
        return loss

    return poisoned


def _tensors(state) -> list[torch.Tensor]:
    """Every floating tensor in a (nested) state dict, in a fixed order."""
    if isinstance(state, torch.Tensor):
        return [state.float()] if state.is_floating_point() else []
    if isinstance(state, dict):
        return [t for key in sorted(state, key=str) for t in _tensors(state[key])]
    if isinstance(state, (list, tuple)):
        return [t for item in state for t in _tensors(item)]
    return []


def test_a_finite_loss_with_a_nan_gradient_skips_the_step(tmp_path, monkeypatch):
    monkeypatch.setattr(train_job.DiffusionLoss, "__call__", _nan_gradient_at({3}, train_job.DiffusionLoss.__call__))
    summary = _train(tmp_path, "run", ["trainer.max_steps=5", "trainer.checkpoint_every=1",
                                       "trainer.keep_checkpoints=null"])
    assert summary["step"] == 5 and summary["skipped_steps"] == 1 and math.isfinite(summary["loss"])
    folder = tmp_path / "run" / "checkpoints"
    state = load_checkpoint(folder / "last.ckpt")
    assert state["skipped_steps"] == 1 and state["ema"]["num_updates"] == 4  # the skipped one left no trace:
    step_2, step_3 = load_checkpoint(folder / "step_2.ckpt"), load_checkpoint(folder / "step_3.ckpt")
    for part in ("model", "optimizer"):  # neither the weights nor Adam's moments and step moved
        assert torch.equal(torch.cat([t.flatten() for t in _tensors(step_2[part])]),
                           torch.cat([t.flatten() for t in _tensors(step_3[part])]))
    assert torch.equal(torch.cat([t.flatten() for t in _tensors(step_2["ema"]["model"])]),
                       torch.cat([t.flatten() for t in _tensors(step_3["ema"]["model"])]))
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert all(torch.isfinite(v).all() for v in state["ema"]["model"].values() if v.is_floating_point())


@pytest.mark.slow
def test_persistent_nan_gradients_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path):
    """Through the CLI: the loss is patched in the CLI's own process to be finite with a NaN gradient from the
    4th step on; the run stops with one line once 3 steps in a row were skipped (the host reads the count at
    step 6), and last.ckpt is the step-4 one, whose skipped update left the weights NaN-free."""
    code = ("import torch; from diffuse.diffusion.objectives import DiffusionLoss as L; o = L.__call__; n = [0]\n"
            "def f(self, model, *a, **k):\n"
            "    n[0] += 1; loss = o(self, model, *a, **k)\n"
            "    p = next(model.parameters())\n"
            "    return loss + 0.0 * torch.sqrt((p - p.detach()).sum()) if n[0] >= 4 else loss\n"
            "L.__call__ = f\nfrom diffuse.cli import main; main()")
    proc = run_cli(["train", *TINY, "trainer.max_steps=10", "trainer.checkpoint_every=2",
                    "trainer.max_nonfinite_steps=3"], tmp_path, launcher=[sys.executable, "-c", code])
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "gradient became nan (loss" in proc.stderr and "at step 4, 3 steps in a row" in proc.stderr
    assert "last good checkpoint kept" in proc.stderr
    (last,) = tmp_path.glob("outputs/*/*/checkpoints/last.ckpt")
    state = load_checkpoint(last)
    assert state["step"] == 4 and state["skipped_steps"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_a_checkpoint_is_never_written_with_nan_weights(tmp_path, monkeypatch):
    from diffuse.training.loop import Trainer
    original = Trainer.save

    def poisoned_save(self):
        if self.step == 4:
            with torch.no_grad():
                next(self.raw_model.parameters()).fill_(float("nan"))
        return original(self)

    monkeypatch.setattr(Trainer, "save", poisoned_save)
    with pytest.raises(DiffuseError, match="the model state holds NaN/inf at step 4: not written"):
        _train(tmp_path, "run", ["trainer.max_steps=6", "trainer.checkpoint_every=2"])
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")["step"] == 2
    assert not (tmp_path / "run" / "checkpoints" / "step_4.ckpt").exists()


def test_fp16_on_the_cpu_scales_the_loss(tmp_path):
    summary = _train(tmp_path, "run", ["trainer.max_steps=3", "trainer.precision=fp16"])
    assert math.isfinite(summary["loss"])
    scaler = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")["scaler"]
    assert scaler and scaler["scale"] > 1  # a GradScaler ran (its state is empty when disabled)


def test_keep_checkpoints_keeps_the_newest(tmp_path):
    _train(tmp_path, "run", ["trainer.max_steps=5", "trainer.checkpoint_every=1", "trainer.keep_checkpoints=2"])
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == ["last.ckpt", "step_4.ckpt", "step_5.ckpt"]


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_leaves_last_ckpt_intact(tmp_path):
    """torch.save raises ENOSPC from the third call on (the step-4 checkpoint), in the CLI's process."""
    code = ("import errno, torch; s = torch.save; n = [0]\n"
            "def f(*a, **k):\n"
            "    n[0] += 1\n"
            "    if n[0] > 2: a[1].write(b'partial'); raise OSError(errno.ENOSPC, 'No space left on device')\n"
            "    return s(*a, **k)\n"
            "torch.save = f\nfrom diffuse.cli import main; main()")
    proc = run_cli(["train", *TINY, "trainer.max_steps=6", "trainer.checkpoint_every=2"], tmp_path,
                   launcher=[sys.executable, "-c", code])
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "cannot write checkpoint" in proc.stderr and "No space left on device" in proc.stderr
    (folder,) = tmp_path.glob("outputs/*/*/checkpoints")
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt", "step_2.ckpt"]  # no temp file left
    assert load_checkpoint(folder / "last.ckpt")["step"] == 2

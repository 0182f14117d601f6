"""Long runs: signals and time budgets stop cleanly with a loadable checkpoint, a held-out loss to optimise,
gradient accumulation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from diffuse.data.shapes import ShapesDataset
from diffuse.diffusion.schedules import LinearSchedule
from diffuse.errors import DiffuseError
from diffuse.jobs import train as train_job
from diffuse.models.unet import UNet
from diffuse.training import stopping
from diffuse.storage.checkpoint import load_checkpoint
from diffuse.training.heldout import HeldOutLoss
from diffuse.training.stopping import parse_max_time

from conftest import TINY, compose_cfg

ENV = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
LONG = TINY + ["trainer.max_steps=100000", "trainer.checkpoint_every=100000", "trainer.val_items=0"]


def _train(tmp_path, name, overrides):
    return train_job.run(compose_cfg("train", TINY + overrides), tmp_path / name, [])


def _start(cmd, cwd):
    return subprocess.Popen(cmd, cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_steps(cwd, n: int, proc, timeout: float = 120) -> None:
    """Until metrics.jsonl (log_every=1) shows step n: the run is inside its training loop."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for path in cwd.glob("outputs/*/*/metrics.jsonl"):
            if len(path.read_text().splitlines()) >= n:
                return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    raise AssertionError("the run did not reach its training loop")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1])
def test_a_signal_stops_the_run_with_a_checkpoint_at_the_reported_step(tmp_path, sig):
    proc = _start([sys.executable, "-m", "diffuse", "train", *LONG], tmp_path)
    _wait_for_steps(tmp_path, 3, proc)
    sent = time.monotonic()
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    took = time.monotonic() - sent
    name = signal.Signals(sig).name
    assert proc.returncode == 128 + sig, err[-2000:]
    assert "Traceback" not in err
    line = next(line for line in err.splitlines() if "error:" in line)
    step = int(line.split(" at step ")[1].split(";")[0])
    assert f"stopped by {name} at step {step}; resume with `diffuse train resume=" in line
    (ckpt,) = tmp_path.glob("outputs/*/*/checkpoints/last.ckpt")
    assert load_checkpoint(ckpt)["step"] == step and took < 30
    assert not list(ckpt.parent.glob(".*tmp*"))


@pytest.mark.slow
def test_a_signal_to_one_rank_stops_both_at_the_same_step(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "diffuse",
           "train", *LONG]
    proc = _start(cmd, tmp_path)
    _wait_for_steps(tmp_path, 3, proc)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2, workers
    os.kill(int(sorted(workers, key=int)[1]), signal.SIGUSR1)  # rank 1 only (started second)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    lines = [line for line in err.splitlines() if "stopped by SIGUSR1 at step" in line]
    assert lines, err[-3000:]
    step = int(lines[0].split(" at step ")[1].split(";")[0])
    (ckpt,) = tmp_path.glob("outputs/*/*/checkpoints/last.ckpt")
    state = load_checkpoint(ckpt)
    assert state["step"] == step and len(state["rng"]) == 2  # every rank's RNG states, one checkpoint


def test_time_budget_stops_within_one_step(tmp_path, monkeypatch):
    """A fake clock that advances 1 s per reading: a 5 s budget (max_time=5/60 min) ends at step 5."""
    clock = {"t": 0.0}

    def tick():
        clock["t"] += 1.0
        return clock["t"]

    monkeypatch.setattr(stopping.time, "monotonic", tick)
    summary = _train(tmp_path, "run", ["trainer.max_steps=1000", f"trainer.max_time={5 / 60}",
                                       "trainer.checkpoint_every=1000", "trainer.val_items=8"])
    assert summary["step"] in (4, 5)  # the deadline falls within one step
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert state["step"] == summary["step"] and "val_loss" in summary
    # a later run with a new budget continues
    cli = [f"resume={tmp_path / 'run'}", "trainer.max_time=0.5"]
    summary = train_job.run(compose_cfg("train", TINY + ["trainer.max_steps=1000", "trainer.val_items=8", *cli]),
                            tmp_path / "x", cli)
    assert summary["step"] > state["step"]


@pytest.mark.parametrize("value,seconds", [(1.5, 90.0), ("00:01:00:30", 3630.0), (None, None), ("2", None)])
def test_parse_max_time(value, seconds):
    if value == "2":
        with pytest.raises(DiffuseError, match="DD:HH:MM:SS"):
            parse_max_time(value)
    else:
        assert parse_max_time(value) == seconds
    for bad in ("abc", -1, 0, "1:2:3"):
        with pytest.raises(DiffuseError, match=r"trainer.max_time must be minutes"):
            parse_max_time(bad)


@pytest.mark.slow
def test_validation_loss_is_deterministic_and_falls(tmp_path):
    summary = _train(tmp_path, "run", ["trainer.max_steps=60", "trainer.val_every=10", "trainer.val_items=32",
                                       "trainer.log_every=10"])
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    val = {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}
    assert sorted(val) == [10, 20, 30, 40, 50, 60] and summary["val_loss"] == val[60]
    assert val[60] < val[10]
    # the same items, times and noise every time: the same model scores the same
    model = UNet(dim=2, in_channels=1, base_channels=8, channel_mult=[1, 2], time_emb_dim=8, num_classes=4)
    loss = HeldOutLoss(ShapesDataset(resolution=8, size=32, seed=5), LinearSchedule(), "eps", n=32)
    assert loss(model) == loss(model)


def test_gradient_accumulation_takes_several_batches_per_step(tmp_path):
    summary = _train(tmp_path, "run", ["trainer.max_steps=3", "trainer.grad_accum_steps=2"])
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert summary["step"] == 3 and state["lr_scheduler"]["last_epoch"] == 3
    assert state["data"]["position"] == 6  # two micro-batches per optimizer step
    assert torch.isfinite(torch.tensor(summary["loss"]))


def test_sample_quality_during_training_is_logged_and_returned(tmp_path):
    summary = _train(tmp_path, "run", ["trainer.max_steps=4", "trainer.eval_every=2", "trainer.eval_num_samples=8",
                                       "trainer.eval_sampler_steps=3", "trainer.log_every=2"])
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    fd = {r["step"]: r for r in rows if "fd" in r}
    assert sorted(fd) == [2, 4] and fd[4]["eval_samples"] == 8 and "val_loss" in fd[4] and "loss" in fd[4]
    assert summary["fd"] == fd[4]["fd"] > 0


@pytest.mark.slow
def test_a_second_ctrl_c_exits_at_once(tmp_path):
    """Two SIGINTs 50 ms apart inside one slow step (the default 32² UNet, batch 64: ~0.5 s a step here): the
    second ends the process at once, before the first's checkpoint is written."""
    proc = _start([sys.executable, "-m", "diffuse", "train", "logger=none", "device=cpu", "trainer.log_every=1",
                   "trainer.val_items=0", "trainer.sample_every=0", "trainer.checkpoint_every=100000"], tmp_path)
    _wait_for_steps(tmp_path, 1, proc)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "stopped by" not in err and "Traceback" not in err
    assert not list(tmp_path.glob("outputs/*/*/checkpoints/*.ckpt"))

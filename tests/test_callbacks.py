"""The trainer's callback protocol (diffuse/training/callbacks.py): when each callback runs, what it gets, where
its metrics go (the step's metrics line and the run's summary), and which run when a signal stops the run."""

from __future__ import annotations

import json

import pytest
import torch

from diffuse.data.loader import BatchStream
from diffuse.data.shapes import ShapesDataset
from diffuse.diffusion.objectives import DiffusionLoss
from diffuse.diffusion.schedules import LinearSchedule
from diffuse.models.unet import UNet
from diffuse.tracking import Tracker
from diffuse.training.callbacks import Callback, Grids, LogMetrics, Measurement, SaveCheckpoint, StepEnd
from diffuse.training.distributed import DistInfo
from diffuse.training.loop import Run, Trainer
from diffuse.training.settings import TrainerSettings


def _trainer(tmp_path, callbacks, **settings) -> Trainer:
    torch.manual_seed(0)
    model = UNet(dim=1, base_channels=8, channel_mult=(1, 2), time_emb_dim=8)
    data = BatchStream(ShapesDataset(dim=1, resolution=8, size=32), batch_size=4, seed=0)
    run = Run(dir=tmp_path, tracker=Tracker(tmp_path, mode="disabled"), dist=DistInfo(), device=torch.device("cpu"),
              seed=0, config={})
    base = dict(max_steps=6, log_every=2, checkpoint_every=3, precision="fp32", lr_schedule="constant",
                channels_last=False)
    return Trainer(model, DiffusionLoss("eps"), data, TrainerSettings(**{**base, **settings}), run,
                   schedule=LinearSchedule(), callbacks=callbacks)


class Recorder(Callback):
    def __init__(self, every, measures=False, on_signal=False):
        self.every, self.measures, self.on_signal, self.calls = every, measures, on_signal, []

    def __call__(self, trainer, event):
        self.calls.append((event.step, event.at_end, dict(event.metrics)))
        return {"probe": float(event.step)} if self.measures else None


def test_due_every_n_steps_and_at_the_end_of_a_start():
    cb = Recorder(every=4)
    assert [s for s in range(1, 11) if cb.due(StepEnd(s, at_end=s == 10))] == [4, 8, 10]
    assert [s for s in range(1, 11) if Recorder(every=0).due(StepEnd(s, at_end=s == 10))] == [10]
    assert not cb.due(StepEnd(8, at_end=True, interrupted=True))  # a signal: only on_signal callbacks
    assert Recorder(every=4, on_signal=True).due(StepEnd(7, at_end=True, interrupted=True))
    assert LogMetrics(5).due(StepEnd(3, at_end=False, metrics={"val_loss": 1.0}))  # a measurement is logged


def test_callbacks_run_in_order_and_measurements_reach_the_log_line_and_summary(tmp_path):
    """Measurements run first and their metrics join that step's metrics line; the others run after the
    checkpoint, so a grid callback sees the checkpoint of its step on disk."""
    seen_checkpoints = []
    measure = Recorder(every=3, measures=True)
    after = Recorder(every=2)

    class SeesCheckpoint(Callback):
        every = 3

        def __call__(self, trainer, event):
            seen_checkpoints.append((event.step, (tmp_path / "checkpoints" / f"step_{event.step}.ckpt").exists()))

    trainer = _trainer(tmp_path, [after, measure, SeesCheckpoint()])
    assert [type(c).__name__ for c in trainer.callbacks] == ["Recorder", "LogMetrics", "SaveCheckpoint",
                                                             "Recorder", "SeesCheckpoint"]
    summary = trainer.fit()
    assert [c[0] for c in measure.calls] == [3, 6] and [c[0] for c in after.calls] == [2, 4, 6]
    assert after.calls[-1][2] == {"probe": 6.0}  # a later callback sees the step's measurements
    assert seen_checkpoints == [(3, True), (6, True)]
    assert summary["probe"] == 6.0 and summary["step"] == 6
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    by_step = {}
    for line in lines:
        by_step.setdefault(line["step"], []).append(line)
    assert [s for s in by_step] == [2, 3, 4, 6]
    assert by_step[3] == [{"step": 3, "probe": 3.0}]  # a measurement between metrics lines: logged alone
    (six,) = by_step[6]
    assert six["probe"] == 6.0 and "loss" in six and "lr" in six  # one line per step: loss and measurement


def test_main_only_callbacks_run_on_rank_zero_only(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path, [], max_steps=2)
    barriers = []
    monkeypatch.setattr("diffuse.training.loop.barrier", lambda dist: barriers.append(dist))
    grid_calls = []
    grids = Grids(lambda step, model, last: grid_calls.append((step, last)), every=1)
    trainer._run_callback(grids, StepEnd(1, at_end=False))
    assert grid_calls == [(1, False)] and len(barriers) == 1
    monkeypatch.setattr(trainer, "dist", DistInfo(rank=1, world_size=2))
    trainer._run_callback(grids, StepEnd(2, at_end=True))
    assert grid_calls == [(1, False)] and len(barriers) == 2  # rank 1 waits, draws nothing


def test_measurement_gets_the_ema_model(tmp_path):
    got = []
    trainer = _trainer(tmp_path, [Measurement(lambda model: got.append(model) or {"m": 1.0}, every=0)], max_steps=2)
    trainer.fit()
    assert got == [trainer.ema.model]


def test_a_signal_runs_only_logging_and_the_checkpoint(tmp_path):
    from diffuse.training import stopping

    measure, after = Recorder(every=1, measures=True), Recorder(every=1)
    trainer = _trainer(tmp_path, [measure, after], max_steps=6, log_every=100, checkpoint_every=100)

    class Stop(Callback):  # asks to stop after step 2, as a SIGTERM handler would
        every = 2

        def __call__(self, trainer, event):
            if event.step == 2:
                import os
                import signal
                os.kill(os.getpid(), signal.SIGUSR1)

    trainer.callbacks.append(Stop())
    with pytest.raises(stopping.Interrupted):
        trainer.fit()
    assert trainer.step == 3  # the signal is seen after the next step
    assert [c[0] for c in measure.calls] == [1, 2] and [c[0] for c in after.calls] == [1, 2]
    assert (tmp_path / "checkpoints" / "step_3.ckpt").exists()  # written at the interrupted step


def test_trainer_settings_match_the_trainer_yaml():
    """conf/trainer/default.yaml and TrainerSettings describe the same keys, and each has a rule entry."""
    from dataclasses import fields
    from pathlib import Path

    from omegaconf import OmegaConf

    import diffuse
    yaml_keys = set(OmegaConf.load(Path(diffuse.__file__).parent / "conf" / "trainer" / "default.yaml"))
    names = {f.name for f in fields(TrainerSettings)}
    assert yaml_keys == names
    assert set(TrainerSettings.config_rules) == names
    assert isinstance(SaveCheckpoint(1), Callback) and TrainerSettings().total_steps(10) == 1000

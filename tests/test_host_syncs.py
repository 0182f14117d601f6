"""No training step waits for the device: between the steps where the loop reports (log, checkpoint, every
max_nonfinite_steps, end) nothing reads a device value on the host.

On the CPU every op that brings a tensor's value to Python (`item`, `bool`, `float`: aten._local_scalar_dense)
or whose output size depends on the data (nonzero, boolean-mask indexing: a sync on CUDA) is recorded with the
step it happened in. On a GPU, CUDA's own sync detector (torch.cuda.set_sync_debug_mode) is recorded too: it
also sees blocking host-to-device copies, which the CPU cannot show.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from diffuse.jobs import train as train_job
from diffuse.training.loop import Trainer

from conftest import (CUDA_TINY, MODEL_CASES, MODEL_IDS, SHARED_DATA, TINY, compose_cfg, model_overrides,
                      requires_cuda)

HOST_READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
              torch.ops.aten.masked_select.default}
INDEXING = {torch.ops.aten.index.Tensor, torch.ops.aten.index_put_.default, torch.ops.aten.index_put.default}


class HostReads(TorchDispatchMode):
    """Records (where(), op) for every op that makes the host wait for a tensor's value."""

    def __init__(self, where):
        super().__init__()
        self.where, self.reads = where, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        masks = func in INDEXING and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                         for i in (args[1] if len(args) > 1 else ()) if i is not None)
        if func in HOST_READS or masks:
            self.reads.append((self.where(), str(func)))
        return func(*args, **(kwargs or {}))


def _reads_per_step(monkeypatch, tmp_path, overrides: list[str], cuda: bool) -> list[tuple]:
    """Trains with `overrides`; returns [(where, what)] for every host read inside the loop, where is
    ("step", n) inside train_step n or ("after", n) in the loop's own code after step n."""
    phase = {"where": ("before", 0)}
    original_step, original_loop = Trainer.train_step, Trainer._loop
    recorder = HostReads(lambda: phase["where"])

    def train_step(self, batches):
        phase["where"] = ("step", self.step + 1)
        out = original_step(self, batches)
        phase["where"] = ("after", self.step)
        return out

    def loop(self, stop):
        with recorder, warnings.catch_warnings():
            if not cuda:
                return original_loop(self, stop)
            warnings.simplefilter("always")
            shown = warnings.showwarning

            def record(message, category, *args, **kwargs):
                if "synchroniz" in str(message):
                    recorder.reads.append((phase["where"], f"cuda sync: {message}"))
                else:
                    shown(message, category, *args, **kwargs)

            warnings.showwarning = record
            torch.cuda.set_sync_debug_mode("warn")
            try:
                return original_loop(self, stop)
            finally:
                torch.cuda.set_sync_debug_mode("default")
                warnings.showwarning = shown

    monkeypatch.setattr(Trainer, "train_step", train_step)
    monkeypatch.setattr(Trainer, "_loop", loop)
    train_job.run(compose_cfg("train", overrides), tmp_path / "run", [])
    return recorder.reads


# 8 steps; the loop reports at step 4 (log_every, max_nonfinite_steps) and at the end (8), nowhere else
REPORTING = ["trainer.max_steps=8", "trainer.log_every=4", "trainer.max_nonfinite_steps=4",
             "trainer.checkpoint_every=1000", "trainer.sample_every=0"]


def _check(reads: list[tuple]) -> None:
    in_steps = [r for r in reads if r[0][0] == "step"]
    between = [r for r in reads if r[0][0] == "after" and r[0][1] not in (4, 8)]
    assert not in_steps, f"host reads inside training steps: {in_steps[:5]}"
    assert not between, f"host reads after steps that do not report: {between[:5]}"
    assert any(r[0] == ("after", 4) for r in reads)  # the recorder sees the reads that are there


@pytest.mark.parametrize("dataset", ["shapes", "mnist"])
def test_no_training_step_reads_a_device_value_on_the_host(tmp_path, monkeypatch, dataset):
    if dataset == "mnist" and not (SHARED_DATA / "MNIST").exists():
        pytest.skip(f"needs MNIST in {SHARED_DATA}")
    tiny = TINY if dataset == "shapes" else [o for o in TINY if not o.startswith("dataset.")] + [
        "dataset=mnist", f"dataset.root={SHARED_DATA}", "dataset.hflip=true"]  # the in-memory images, flipped
    _check(_reads_per_step(monkeypatch, tmp_path, [*tiny, *REPORTING], cuda=False))


@pytest.mark.parametrize("name,dim", MODEL_CASES, ids=MODEL_IDS)
def test_no_model_reads_a_device_value_in_its_training_step(tmp_path, monkeypatch, name, dim):
    """Every conf/model/*.yaml in each dim it supports, at its YAML's sizes (MSNAT's neighborhood attention,
    ShuffleNet, the transformer, the UNet)."""
    tiny = [o for o in TINY if not o.startswith(("dataset.resolution", "model."))]
    _check(_reads_per_step(monkeypatch, tmp_path, [*tiny, *model_overrides(name, dim), *REPORTING], cuda=False))


@requires_cuda
@pytest.mark.parametrize("graphs", [False, True])
@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_no_training_step_synchronises_with_the_gpu(tmp_path, monkeypatch, precision, graphs):
    """The training step on CUDA (fused AdamW, masked EMA, device-side skip count) in each precision, eager
    and with trainer.cuda_graphs (after step 1, which records): no sync inside a step or between reporting
    steps, by CUDA's own detector."""
    reads = _reads_per_step(monkeypatch, tmp_path, [*CUDA_TINY, *REPORTING, f"trainer.precision={precision}",
                                                    f"trainer.cuda_graphs={str(graphs).lower()}"], cuda=True)
    _check([r for r in reads if not (graphs and r[0] == ("step", 1))])

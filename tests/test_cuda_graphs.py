"""trainer.cuda_graphs: where it may be on, the wrapper that records once and replays, and (on a GPU) that a
graphed run trains as the eager one does, resumes exactly, and never synchronises."""

from __future__ import annotations

import logging

import pytest
import torch

from diffuse.errors import DiffuseError
from diffuse.jobs import train as train_job
from diffuse.training import graphs
from diffuse.storage.checkpoint import load_checkpoint
from diffuse.training.graphs import GraphedNetwork, use_cuda_graphs

from conftest import CUDA_TINY, TINY, compose_cfg, requires_cuda, straight_and_resumed

CUDA = torch.device("cuda")


def test_auto_is_on_only_where_graphs_can_work_and_true_says_what_is_missing():
    assert use_cuda_graphs("auto", CUDA, compiled=False, processes=1, grad_accum_steps=1)
    assert not use_cuda_graphs("auto", torch.device("cpu"), compiled=False, processes=1, grad_accum_steps=1)
    assert not use_cuda_graphs("auto", CUDA, compiled=True, processes=1, grad_accum_steps=1)
    assert not use_cuda_graphs("auto", CUDA, compiled=False, processes=2, grad_accum_steps=1)
    assert not use_cuda_graphs("auto", CUDA, compiled=False, processes=1, grad_accum_steps=4)
    assert not use_cuda_graphs(False, CUDA, compiled=False, processes=1, grad_accum_steps=1)
    with pytest.raises(DiffuseError, match=r"cuda_graphs=true needs a CUDA device, one process \(no DDP\)"):
        use_cuda_graphs(True, torch.device("cpu"), compiled=False, processes=2, grad_accum_steps=1)
    with pytest.raises(DiffuseError, match="must be auto, true or false"):
        use_cuda_graphs("yes", CUDA, compiled=False, processes=1, grad_accum_steps=1)


def test_cuda_graphs_true_on_the_cpu_is_one_line_before_training(tmp_path):
    with pytest.raises(DiffuseError, match="cuda_graphs=true needs a CUDA device"):
        train_job.run(compose_cfg("train", [*TINY, "trainer.max_steps=1", "trainer.cuda_graphs=true"]),
                      tmp_path / "run", [])
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_vae_training_takes_no_cuda_graphs(tmp_path):
    """The VAE's loss calls its network in its own way: `auto` leaves graphs off there, `true` is one line."""
    from diffuse.jobs import train_vae
    args = ["dataset.resolution=8", "dataset.size=64", "logger=none", "device=cpu", "vae.channels=8",
            "vae.channel_mult=[1,2]", "trainer.max_steps=1", "trainer.batch_size=8", "trainer.sample_every=0",
            "scale_batches=1", "trainer.final_samples=false"]
    summary = train_vae.run(compose_cfg("train_vae", [*args, "trainer.cuda_graphs=auto"]), tmp_path / "auto", [])
    assert summary["step"] == 1
    with pytest.raises(DiffuseError, match="cuda_graphs=true is for `diffuse train`, not `diffuse train-vae`"):
        train_vae.run(compose_cfg("train_vae", [*args, "trainer.cuda_graphs=true"]), tmp_path / "true", [])


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 3)

    def forward(self, x, t, y=None):
        return self.lin(x) * t[:, None] + (0 if y is None else y[:, None])


def _fake_recorder(monkeypatch, fail: bool = False) -> list:
    """make_graphed_callables stand-in (CPU): records its arguments, returns the module; RNG calls no-ops."""
    calls = []

    def record(module, sample, allow_unused_input=False):
        if fail:
            raise RuntimeError("operation not permitted when stream is capturing\nmore")
        calls.append((module, sample))
        return module

    monkeypatch.setattr(graphs.torch.cuda, "make_graphed_callables", record)
    monkeypatch.setattr(graphs.torch.cuda, "get_rng_state", lambda device=None: torch.zeros(1))
    monkeypatch.setattr(graphs.torch.cuda, "set_rng_state", lambda state, device=None: None)
    return calls


def test_the_wrapper_records_once_on_copies_and_runs_other_shapes_eagerly(monkeypatch):
    calls = _fake_recorder(monkeypatch)
    net = _Net()
    graphed = GraphedNetwork(net)
    x, t, y = torch.randn(4, 3), torch.rand(4), torch.arange(4)
    for _ in range(3):
        torch.testing.assert_close(graphed(x, t, y), net(x, t, y))
    (module, sample), = calls  # recorded once, on the first call
    assert len(sample) == 3
    assert all(torch.equal(a, b) and a.data_ptr() != b.data_ptr() for a, b in zip(sample, (x, t, y)))
    assert module.net is net
    torch.testing.assert_close(graphed(x[:2], t[:2], y[:2]), net(x[:2], t[:2], y[:2]))  # another batch size
    assert len(calls) == 1
    unconditional = GraphedNetwork(net)
    torch.testing.assert_close(unconditional(x, t), net(x, t))
    assert len(calls[1][1]) == 2  # (x, t): no None among a graph's inputs


def test_a_network_that_cannot_be_recorded_trains_eagerly_with_one_warning(monkeypatch, caplog):
    _fake_recorder(monkeypatch, fail=True)
    net, x, t = _Net(), torch.randn(4, 3), torch.rand(4)
    graphed = GraphedNetwork(net)
    with caplog.at_level(logging.WARNING, logger="diffuse.training.graphs"):
        for _ in range(3):
            torch.testing.assert_close(graphed(x, t), net(x, t))
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "could not be recorded" in warnings[0] and "not permitted" in warnings[0]


# ----- on a GPU ------------------------------------------------------------------------------------------------

def _weights(run_dir):
    return load_checkpoint(run_dir / "checkpoints" / "last.ckpt")["model"]


@requires_cuda
def test_a_graphed_run_trains_as_the_eager_one(tmp_path, caplog):
    common = [*CUDA_TINY, "trainer.max_steps=6", "model.dropout=0.1", "trainer.precision=fp32"]
    with caplog.at_level(logging.INFO, logger="diffuse.training.graphs"):
        train_job.run(compose_cfg("train", [*common, "trainer.cuda_graphs=true"]), tmp_path / "graphed", [])
    assert any("recorded as CUDA graphs" in r.getMessage() for r in caplog.records)
    train_job.run(compose_cfg("train", [*common, "trainer.cuda_graphs=false"]), tmp_path / "eager", [])
    graphed, eager = _weights(tmp_path / "graphed"), _weights(tmp_path / "eager")
    for key in eager:  # the same kernels replayed, the same dropout draws: equal up to CUDA's atomics
        torch.testing.assert_close(graphed[key], eager[key], atol=1e-5, rtol=1e-4, msg=key)


@requires_cuda
def test_a_graphed_run_resumes_as_it_would_have_gone_on(tmp_path):
    """Recording again at step 5 of the resumed run draws nothing from the generators the run uses."""
    overrides = [*CUDA_TINY, "trainer.max_steps=8", "trainer.checkpoint_every=4", "model.dropout=0.1",
                 "trainer.cuda_graphs=true"]
    straight, interrupted = straight_and_resumed(tmp_path, overrides, at_step=4)
    a, b = _weights(straight), _weights(interrupted)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4, msg=key)


@requires_cuda
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_graphed_steps_in_each_precision_stay_finite_and_move_the_weights(tmp_path, precision):
    """fp16's loss scale may skip the first steps (an overflow at 2¹⁶): six steps leave room for it."""
    train_job.run(compose_cfg("train", [*CUDA_TINY, "trainer.max_steps=6", "trainer.checkpoint_every=1",
                                        "trainer.keep_checkpoints=null", "trainer.cuda_graphs=true",
                                        f"trainer.precision={precision}"]), tmp_path / "run", [])
    folder = tmp_path / "run" / "checkpoints"
    one, two = load_checkpoint(folder / "step_1.ckpt")["model"], load_checkpoint(folder / "step_6.ckpt")["model"]
    assert all(torch.isfinite(v).all() for v in two.values() if v.is_floating_point())
    assert any(not torch.equal(one[k], two[k]) for k in two)

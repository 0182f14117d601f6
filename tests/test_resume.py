"""Resume: what the new command line says is applied (never recorded and ignored), a run continues in its own
folder only, each job finds runs of its own kind, and checkpoints load across compile and devices."""

from __future__ import annotations

import functools
import json
import shutil

import pytest
import torch

from diffuse.errors import DiffuseError
from diffuse.jobs.common import resume_checkpoint
from diffuse.jobs import train as train_job
from diffuse.training import loop
from diffuse.storage.checkpoint import load_checkpoint, mark_run, save_checkpoint
from diffuse.training.loop import build_lr_scheduler

from conftest import TINY, compose_cfg, run_cli


def _train(tmp_path, name, overrides, cli=()):
    cfg = compose_cfg("train", TINY + overrides)
    return train_job.run(cfg, tmp_path / name, list(cli))


def _resume(tmp_path, run, overrides):
    cli = [f"resume={run}", *overrides]
    return train_job.run(compose_cfg("train", TINY + cli), tmp_path / "unused", cli)


def _expected_lrs(name: str, max_steps: int, lr: float, steps: int) -> float:
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = build_lr_scheduler(opt, name, max_steps, lr)
    for _ in range(steps):
        opt.step()
        sched.step()
    return opt.param_groups[0]["lr"]


def test_resume_applies_new_optimizer_settings(tmp_path):
    _train(tmp_path, "run", ["trainer.max_steps=4"])
    _resume(tmp_path, tmp_path / "run", ["trainer.max_steps=8", "trainer.lr=1e-3", "trainer.weight_decay=0.05",
                                         "trainer.betas=[0.8,0.99]"])
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    group = state["optimizer"]["param_groups"][0]
    # β1 is OneCycle's cycled momentum (0.95 → 0.85 → 0.95), placed at step 8; β2 is the new one
    assert group["weight_decay"] == 0.05 and group["betas"][1] == 0.99 and 0.85 <= group["betas"][0] <= 0.95
    assert group["max_lr"] == 1e-3  # the OneCycle of the new lr and length, at step 8
    assert group["lr"] == pytest.approx(_expected_lrs("onecycle", 8, 1e-3, 8), rel=1e-12)
    assert state["config"]["trainer"]["lr"] == 1e-3  # recorded and used


def test_resume_applies_new_betas_on_a_constant_schedule(tmp_path):
    _train(tmp_path, "run", ["trainer.max_steps=2", "trainer.lr_schedule=constant"])
    _resume(tmp_path, tmp_path / "run", ["trainer.max_steps=3", "trainer.betas=[0.8,0.99]", "trainer.lr=5e-4"])
    group = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")["optimizer"]["param_groups"][0]
    assert tuple(group["betas"]) == (0.8, 0.99) and group["lr"] == 5e-4


def test_resume_with_another_lr_schedule(tmp_path):
    _train(tmp_path, "run", ["trainer.max_steps=4"])
    _resume(tmp_path, tmp_path / "run", ["trainer.max_steps=8", "trainer.lr_schedule=cosine"])
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    group = state["optimizer"]["param_groups"][0]
    assert "max_lr" not in group  # nothing of the old OneCycle left behind
    assert group["lr"] == pytest.approx(_expected_lrs("cosine", 8, 2e-3, 8), rel=1e-12)


@pytest.mark.slow
def test_compiled_run_saves_plain_keys_and_resumes_uncompiled(tmp_path, monkeypatch):
    # the eager backend wraps the model as torch.compile does (an OptimizedModule with _orig_mod) without
    # the minutes inductor takes on this CPU
    monkeypatch.setattr(loop.torch, "compile", functools.partial(torch.compile, backend="eager"))
    _train(tmp_path, "run", ["trainer.max_steps=2", "trainer.compile=true"])
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert not any("_orig_mod" in k for k in state["model"]) and not any("_orig_mod" in k for k in state["ema"]["model"])
    assert _resume(tmp_path, tmp_path / "run", ["trainer.max_steps=3", "trainer.compile=false"])["step"] == 3
    # an old checkpoint with prefixed keys still loads
    state["model"] = {f"_orig_mod.{k}": v for k, v in state["model"].items()}
    save_checkpoint({k: v for k, v in state.items() if k not in ("format", "version")}, tmp_path / "old.ckpt")
    assert all("_orig_mod" not in k for k in load_checkpoint(tmp_path / "old.ckpt")["model"])


def test_sample_with_raw_weights_of_a_compiled_run(tmp_path, monkeypatch):
    from diffuse.jobs.common import load_run
    monkeypatch.setattr(loop.torch, "compile", functools.partial(torch.compile, backend="eager"))
    _train(tmp_path, "run", ["trainer.max_steps=2", "trainer.compile=true"])
    run = load_run(str(tmp_path / "run"), torch.device("cpu"), use_ema=False)
    assert run.step == 2


def test_cuda_checkpoint_resumes_on_the_cpu(tmp_path, caplog):
    """A CUDA run's RNG states (a 16-byte Philox state for the loss generator, CUDA generator states) cannot
    be loaded into CPU generators: the run continues, re-seeded, and says it is not the exact continuation."""
    _train(tmp_path, "run", ["trainer.max_steps=2"])
    path = tmp_path / "run" / "checkpoints" / "last.ckpt"
    state = load_checkpoint(path)
    philox = torch.zeros(16, dtype=torch.uint8)
    state["rng"] = [{"torch": state["rng"][0]["torch"], "loss": philox, "loss_device": "cuda", "cuda": [philox]}]
    save_checkpoint({k: v for k, v in state.items() if k not in ("format", "version")}, path)
    summary = _resume(tmp_path, tmp_path / "run", ["trainer.max_steps=4"])
    assert summary["step"] == 4 and summary["loss"] == summary["loss"]
    assert "re-seeded" in caplog.text


def test_different_world_size_continues_with_a_warning(tmp_path, caplog):
    _train(tmp_path, "run", ["trainer.max_steps=2"])
    path = tmp_path / "run" / "checkpoints" / "last.ckpt"
    state = load_checkpoint(path)
    state["rng"], state["world_size"] = state["rng"] * 2, 2  # as a 2-process run writes it
    save_checkpoint({k: v for k, v in state.items() if k not in ("format", "version")}, path)
    assert _resume(tmp_path, tmp_path / "run", ["trainer.max_steps=3"])["step"] == 3
    assert "exact continuation needs the same number of processes" in caplog.text


# ----- through the CLI: where a resumed run writes, and which run a job finds -------------------------------

CLI_TRAIN = [a for a in TINY if a != "logger=none"] + ["logger=none", "trainer.checkpoint_every=2"]


def _runs(cwd):
    return sorted(p.parent for p in (cwd / "outputs").glob("*/*/run.json"))


@pytest.mark.slow
def test_resumed_run_writes_only_into_its_own_folder(tmp_path):
    proc = run_cli(["train", *CLI_TRAIN, "trainer.max_steps=4"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (run,) = _runs(tmp_path)
    folders_before = set((tmp_path / "outputs").glob("*/*"))
    log_before = (run / "train.log").read_text()
    # resume from step 2, although metrics.jsonl already has steps 3 and 4
    proc = run_cli(["train", f"resume={run / 'checkpoints' / 'step_2.ckpt'}", "trainer.max_steps=5"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert set((tmp_path / "outputs").glob("*/*")) == folders_before  # no new, empty run folder
    assert (run / "train.log").read_text().startswith(log_before) and "resuming" in (run / "train.log").read_text()
    (resume_cfg,) = (run / ".hydra").glob("resume-*/config.yaml")
    assert "resume:" in resume_cfg.read_text() and (run / ".hydra" / "config.yaml").is_file()
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]  # no step twice


@pytest.mark.slow
def test_resume_from_a_file_outside_a_run_folder_starts_a_new_folder(tmp_path):
    _train(tmp_path, "run", ["trainer.max_steps=2"])
    loose = tmp_path / "home" / "model.ckpt"
    loose.parent.mkdir()
    shutil.copy(tmp_path / "run" / "checkpoints" / "last.ckpt", loose)
    proc = run_cli(["train", f"resume={loose}", "trainer.max_steps=3"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in loose.parent.iterdir()) == ["model.ckpt"]  # nothing written beside it
    (run,) = _runs(tmp_path)
    assert load_checkpoint(run / "checkpoints" / "last.ckpt")["step"] == 3


@pytest.mark.slow
def test_each_job_finds_runs_of_its_own_kind(tmp_path):
    """After a diffusion run, a newer VAE run: sample and resume=auto still take the diffusion run; a newer
    diffusion run stopped before its first checkpoint is named, not silently skipped for an older one."""
    proc = run_cli(["train", *CLI_TRAIN, "trainer.max_steps=2"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = run_cli(["train-vae", "dataset.resolution=8", "dataset.size=64", "vae.channels=8",
                    "vae.channel_mult=[1,2]", "trainer.max_steps=2", "trainer.batch_size=8", "trainer.sample_every=0",
                    "logger=none", "device=cpu", "scale_batches=1"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = run_cli(["sample", "sampler.steps=2", "num_samples=4", "device=cpu"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = run_cli(["train", "resume=auto", "trainer.max_steps=3"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    stopped = tmp_path / "outputs" / "9999-01-01" / "00-00-00"  # started after, killed before its checkpoint
    mark_run(stopped, "diffusion")
    proc = run_cli(["train", "resume=auto", "trainer.max_steps=4"], tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "outputs/9999-01-01/00-00-00, stopped before its first checkpoint" in proc.stderr


def test_resume_auto_with_no_run_of_its_kind(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DiffuseError, match="no run of a diffusion model"):
        resume_checkpoint(compose_cfg("train", ["resume=auto"]), tmp_path, "diffusion")


def test_resume_self_continues_this_folder_or_starts_afresh(tmp_path):
    """resume=self (a requeued or restarted job): its own folder's checkpoint if there is one, else fresh."""
    assert _train(tmp_path, "run", ["trainer.max_steps=2", "resume=self"])["step"] == 2
    summary = _train(tmp_path, "run", ["trainer.max_steps=3", "resume=self"], cli=["trainer.max_steps=3"])
    assert summary["step"] == 3  # continued from step 2 (the EMA counter says so), not from 0
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")["ema"]["num_updates"] == 3

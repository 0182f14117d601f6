"""Sweeps: Optuna through Hydra's sweeper, submitit's local launcher, a sweep that outlives a failed job,
and a W&B sweep file whose command line diffuse accepts."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from diffuse.storage.checkpoint import load_checkpoint

from conftest import TINY, run_cli

pytestmark = pytest.mark.slow  # each sweep runs `diffuse` in a subprocess

SMALL = [a for a in TINY if a != "trainer.log_every=1"] + ["trainer.max_steps=3", "trainer.val_items=16"]
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_optuna_search_writes_the_best_parameters(tmp_path):
    fixed = [a for a in SMALL if not a.startswith(("trainer.batch_size=", "model.base_channels="))]
    proc = run_cli(["train", "-m", "hparams_search=shapes_optuna", "hydra.sweeper.n_trials=3",
                    "hydra.sweeper.sampler.n_startup_trials=2", *fixed, "trainer.batch_size=choice(4,8)",
                    "model.base_channels=choice(8,16)"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (results,) = tmp_path.glob("multirun/*/*/optimization_results.yaml")
    best = yaml.safe_load(results.read_text())
    assert best["name"] == "optuna" and set(best["best_params"]) == {
        "trainer.lr", "trainer.ema_decay", "trainer.batch_size", "model.base_channels", "objective.prediction"}
    assert 0 < best["best_value"] < 10
    assert len(list(results.parent.glob("*/checkpoints/last.ckpt"))) == 3  # three trials ran


def test_optuna_needs_a_metric_the_job_produces(tmp_path):
    proc = run_cli(["train", "-m", "hparams_search=shapes_optuna", "hydra.sweeper.n_trials=1", *SMALL,
                    "trainer.val_items=0"], tmp_path)
    assert "optimized_metric=val_loss needs the validation loss: trainer.val_items > 0" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_sweep_runs_all_jobs_when_the_middle_one_diverges(tmp_path):
    """lr=1e30 overflows the weights after one step: its NaN gradients stop that job (max_nonfinite_steps);
    the jobs before and after it still run, and the sweep's exit status reports the failure."""
    proc = run_cli(["train", "-m", *SMALL, "trainer.max_nonfinite_steps=2", "trainer.lr=1e-3,1e30,2e-3",
                    "trainer.lr_schedule=constant"], tmp_path)
    assert proc.returncode == 1
    assert "1 job(s) of the sweep failed" in proc.stderr and "trainer.lr=1e+30" in proc.stderr
    assert "Traceback" not in proc.stderr
    jobs = sorted(tmp_path.glob("multirun/*/*/[0-9]"))
    assert [p.name for p in jobs] == ["0", "1", "2"]
    assert load_checkpoint(jobs[0] / "checkpoints" / "last.ckpt")["step"] == 3
    assert load_checkpoint(jobs[2] / "checkpoints" / "last.ckpt")["step"] == 3


def test_local_launcher_runs_jobs_through_submitit(tmp_path):
    proc = run_cli(["train", "-m", "launcher=local", *SMALL, "trainer.lr=1e-3,2e-3"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Submitit 'local' sweep output dir" in proc.stdout + proc.stderr
    ckpts = sorted(tmp_path.glob("multirun/*/*/*/checkpoints/last.ckpt"))
    assert len(ckpts) == 2 and all(load_checkpoint(c)["step"] == 3 for c in ckpts)
    assert list(tmp_path.glob("multirun/*/*/.submitit"))


def test_slurm_launcher_config_composes(tmp_path):
    proc = run_cli(["train", "launcher=slurm", "hydra.launcher.partition=gpu", "--cfg", "hydra"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    launcher = yaml.safe_load(proc.stdout)["hydra"]["launcher"]
    assert launcher["_target_"].endswith("SlurmLauncher") and launcher["signal_delay_s"] == 120
    assert launcher["partition"] == "gpu" and launcher["max_num_timeout"] == 20


def test_wandb_sweep_command_is_accepted(tmp_path):
    """The agent's command line, built by W&B's own function from one draw of the sweep's parameters."""
    wandb_utils = pytest.importorskip("wandb.sdk.launch.sweeps.utils")
    sweep = yaml.safe_load((EXAMPLES / "wandb_sweep.yaml").read_text())
    draw = {name: {"value": spec["values"][0] if "values" in spec else spec["min"]}
            for name, spec in sweep["parameters"].items()}
    args = wandb_utils.create_sweep_command_args({"args": draw})["args_no_hyphens"]
    command = [a for c in sweep["command"] for a in (args if c == "${args_no_hyphens}" else [c])]
    assert command[:2] == ["diffuse", "train"]
    proc = run_cli([*command[1:], "--cfg", "job"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    job = yaml.safe_load(proc.stdout)
    assert job["trainer"]["lr"] == 0.0003 and job["objective"]["prediction"] == "eps"
    assert job["model"]["base_channels"] == 16 and job["trainer"]["max_steps"] == 500

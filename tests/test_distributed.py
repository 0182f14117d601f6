"""Data-parallel training under torchrun with 2 CPU processes (gloo)."""

from __future__ import annotations

import json
import sys

import torch

from conftest import TINY, run_cli


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

"""How close the default training step is to its device work (issue 14, item 4): wall time per step against
the time the GPU is busy, and the kernels and launches per step, eager and with trainer.cuda_graphs.

    python benchmarks/profile_step.py [--device cuda] [--steps 30] [--out profile_step.json]

Builds the default `diffuse train` run (its Trainer, data stream and loss, with no grids or validation),
takes 10 warm-up steps (the graphed run records on its first), then `steps` steps timed wall-clock with one
sync at the end, then `steps` more under torch.profiler: the GPU's busy time is the union of its kernels'
intervals, launches are the host's kernel and graph launch calls. Eager first, then graphed (CUDA only). On
the CPU (a dry run) the busy time and the kernels are left out.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx", "cudaGraphLaunch")


def busy_ms(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end] intervals (µs) in ms."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total / 1000


def measure(trainer, steps: int) -> dict:
    cuda = trainer.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def run(n: int) -> None:
        for _ in range(n):
            trainer.train_step([next(trainer.data) for _ in range(trainer.settings.grad_accum_steps)])

    run(10)
    sync()
    start = time.perf_counter()
    run(steps)
    sync()
    wall_ms = (time.perf_counter() - start) / steps * 1000
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        run(steps)
        sync()
    events = prof.events()
    kernels = [e for e in events if e.device_type == DeviceType.CUDA]
    launches = sum(1 for e in events if e.name in LAUNCHES)
    row = {"wall_ms_per_step": wall_ms, "launches_per_step": launches / steps}
    if cuda:
        gpu = busy_ms([(e.time_range.start, e.time_range.end) for e in kernels]) / steps
        row.update(gpu_busy_ms_per_step=gpu, kernels_per_step=len(kernels) / steps, gpu_busy_fraction=gpu / wall_ms)
    return row


def profile_run(device: str, cuda_graphs: bool, steps: int) -> dict:
    """The default run's Trainer, measured in place of its fit()."""
    from diffuse.app import compose_config
    from diffuse.jobs import train as train_job
    from diffuse.training.loop import Trainer

    cfg = compose_config("train", [f"device={device}", f"trainer.cuda_graphs={str(cuda_graphs).lower()}",
                                   "logger=none", "trainer.final_samples=false", "trainer.sample_every=0",
                                   "trainer.val_items=0"])
    result = {}
    original = Trainer.fit

    def fit(self):
        result.update(measure(self, steps))
        return {"step": self.step, "loss": float("nan"), "checkpoint": ""}

    Trainer.fit = fit
    try:
        with tempfile.TemporaryDirectory() as tmp:
            train_job.run(cfg, Path(tmp) / "run", [])
    finally:
        Trainer.fit = original
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--out", default="profile_step.json")
    args = p.parse_args(argv)
    results = {"eager": profile_run(args.device, False, args.steps)}
    if args.device.startswith("cuda"):
        results["cuda_graphs"] = profile_run(args.device, True, args.steps)
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{torch.get_num_threads()} threads"
    print(f"default training step, {where}, {args.steps} steps")
    for name, row in results.items():
        print(f"{name:<12}" + "  ".join(f"{k} {v:.2f}" for k, v in row.items()))
    with open(args.out, "w") as f:
        json.dump({"device": where, "steps": args.steps, "results": results}, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

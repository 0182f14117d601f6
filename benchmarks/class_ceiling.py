"""How well a run's own network knows a digit's class: the diffusion classifier of `labels=infer` at a large budget.

    python benchmarks/class_ceiling.py --checkpoint outputs/…/checkpoints/last.ckpt --data ../shared/data \
        [--first 1000] [--n 300] [--noises 5] [--out benchmarks/results/editing_mnist_class_ceiling.md]

`labels=infer` reads an input's class as argmin_c Σ ‖mask ⊙ (ε̂(x_t, t | c) − ε)‖² (editing.class_errors, the
unknown region filled with the known pixels' mean). Here every class is scored at t = 0.3, 0.4, 0.45, 0.5 and
0.6 with --noises fresh noises each (5 → 25 evaluations, 250 network passes per digit for 10 classes), on the
top half of the digits (what inpainting the bottom half knows) and on the whole digit. The accuracy reached is
about what no budget of this classifier passes; the 29 passes of labels=infer are reported beside it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from diffuse.data.vision import MNISTDataset
from diffuse.diffusion import editing, masks
from diffuse.diffusion.guidance import Denoiser
from diffuse.diffusion.objectives import parameterization
from diffuse.diffusion.samplers import NoiseSource
from diffuse.jobs.common import load_run
from diffuse.jobs.sampling_setup import prepare_for_sampling
from machine import cpu_name  # benchmarks/machine.py

TIMES = (0.3, 0.4, 0.45, 0.5, 0.6)
BATCH = 100


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--data", required=True, help="the folder holding MNIST/raw")
    ap.add_argument("--first", type=int, default=1000)
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--noises", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/editing_mnist_class_ceiling.md")
    args = ap.parse_args()
    run = load_run(args.checkpoint, torch.device("cpu"))
    model = prepare_for_sampling(run.model, torch.device("cpu"))
    prediction = parameterization(run.config.get("objective"))
    x, y = MNISTDataset(root=args.data, split="test").get_batch(torch.arange(args.first, args.first + args.n), None)
    classes = run.model.num_classes

    def denoiser_for(labels):
        return Denoiser(model, run.schedule, prediction, y=labels)

    masks_ = {"top half (bottom_half filled in)": masks.named_mask("bottom_half", (28, 28)),
              "whole digit": torch.ones(1, 1, 28, 28, dtype=torch.bool)}
    rows = []
    for name, mask in masks_.items():
        start, picks, quick = time.perf_counter(), [], []
        for s in range(0, args.n, BATCH):
            sl = slice(s, min(args.n, s + BATCH))
            m = mask.expand(sl.stop - sl.start, 1, 28, 28)
            every = torch.arange(classes).expand(len(m), classes)
            noise = NoiseSource(range(args.first + sl.start, args.first + sl.stop))
            with torch.inference_mode():
                filled = editing.filled_with_known_mean(x[sl], m)
                total = sum(editing.class_errors(denoiser_for, filled, m, every, TIMES, noise)
                            for _ in range(args.noises))
                quick.append(editing.infer_labels(denoiser_for, x[sl], m, classes,
                                                  NoiseSource(range(10**6 + sl.start, 10**6 + sl.stop))))
            picks.append(total.argmin(1))
        acc = (torch.cat(picks) == y).float().mean().item()
        acc_quick = (torch.cat(quick) == y).float().mean().item()
        rows.append((name, acc, acc_quick, time.perf_counter() - start))
        print(rows[-1], flush=True)
    passes = classes * len(TIMES) * args.noises
    lines = ["# The run's own class knowledge: its diffusion classifier at a large budget", "",
             f"Checkpoint: `{args.checkpoint}` (step {run.step}), EMA weights, fp32. Test digits {args.first}…"
             f"{args.first + args.n - 1}. Machine: {cpu_name()}, {torch.get_num_threads()} torch threads. Script: "
             f"`benchmarks/class_ceiling.py`.", "",
             f"| what the classifier sees | class right, {passes} passes per digit ({len(TIMES)} times × "
             f"{args.noises} noises × {classes} classes) | class right, labels=infer's {editing.infer_passes(classes)} "
             f"passes | seconds (both) |", "|---|---|---|---|"]
    lines += [f"| {name} | {acc:.3f} | {quick:.3f} | {sec:.0f} |" for name, acc, quick, sec in rows]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

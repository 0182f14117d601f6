"""Judge what `diffuse edit mode=inpaint` wrote on MNIST test digits with the independent digit classifier.

    diffuse edit checkpoint=… mode=inpaint mask=bottom_half input.count=1000 num_samples=1 input.root=../shared/data
    python benchmarks/judge_edits.py outputs/…/edits.npz --data ../shared/data [--out FILE.md]

The edit job's inputs are the first input.count items of the run's test split, in order (its held-out items), so
output i is judged against test digit i. Printed: the classifier on the real digits (the ceiling), on the inputs
with the region to fill left blank (background −1: the baseline), and on every completion; the largest error on
the known region (0: it is pasted), and which labels the edit drew with.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from diffuse.data.vision import MNISTDataset
from diffuse.digit_classifier import load_digit_classifier


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("edits", type=Path)
    ap.add_argument("--data", required=True, help="the folder holding MNIST/raw")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    with np.load(args.edits, allow_pickle=False) as edits:
        x, m, out = (torch.from_numpy(edits[k]) for k in ("inputs", "masks", "outputs"))
        labels = torch.from_numpy(edits["labels"]) if "labels" in edits else None
    n, k = out.shape[:2]
    real, y = MNISTDataset(root=args.data, split="test").get_batch(torch.arange(n), None)
    if not torch.equal(real, x):
        raise SystemExit("the edits' inputs are not the first test digits in order")
    judge = load_digit_classifier()
    blank = torch.where(m, x, torch.full_like(x, -1.0))
    agree = lambda images, truth: (judge.predict(images) == truth).float().mean().item()  # noqa: E731
    known_error = (out - x[:, None]).abs()[m[:, None].expand_as(out)].max().item()
    given = "none (the null class)" if labels is None else (
        "the digits' own" if torch.equal(labels, y[:, None].expand(n, k)) else "others (labels=K or infer)")
    lines = [f"`{args.edits}`: {n} test digits × {k} completions, labels {given}", "",
             "| | classifier agrees with the digit |", "|---|---|",
             f"| real test digits (ceiling) | {agree(x, y):.3f} |",
             f"| region to fill blank (baseline) | {agree(blank, y):.3f} |",
             f"| completions | {agree(out.flatten(0, 1), y.repeat_interleave(k)):.3f} |", "",
             f"Largest error on the known region: {known_error:.1e}.", ""]
    print("\n".join(lines))
    if args.out:
        args.out.write_text("\n".join(lines))


if __name__ == "__main__":
    main()

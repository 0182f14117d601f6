"""Sample quality against network evaluations (NFE) for every sampler, on one trained checkpoint.

    python benchmarks/sampler_quality.py [CHECKPOINT] [--train-steps 1000] [--num-samples 256] [--out FILE]

Without a checkpoint it first trains a small conditional UNet on 2-D `shapes` (16×16) for --train-steps.
Rows named *_clip run with clip_x0 (x̂₀ clamped to [−1, 1]); ddpm_clip is the MNIST ShuffleNet setup's sample_clip.
Cost: about 1800 network evaluations of --num-samples images (ddpm's 1000 dominate), plus the training;
`--quick` runs fewer rows.

Metrics (diffuse/metrics.py, the ones `diffuse evaluate` reports):
  - FD: Fréchet distance between Gaussian fits of features of generated and real images, the features being
    those of a fixed, randomly initialised conv net (seeded; global mean+max pooling, 128-d). An FID-like
    distance without a download. The "real vs real" row is the floor for that sample count.
  - label agreement (conditional models): the fraction of samples whose nearest real image (L2, over a bank
    of real images) has the class that was asked for.
"off" is the fraction of samples whose mean brightness is outside the range of the real images' means.
The question it answers: do the few-step samplers at ~20 NFE reach what `ddpm` reaches at 1000?

If `diffusers` is installed it also runs its DDIMScheduler and DPMSolverMultistepScheduler (DPM-Solver++ 2M)
with the same network, noise and time grid as ours, and prints the largest difference and the time ratio.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from diffuse.diffusion.generation import class_labels, generate
from diffuse.diffusion.guidance import Denoiser
from diffuse.diffusion.samplers import (DDIM, DDPM, DPMSolverPP, EulerMaruyama, Heun, NoiseSource,
                                        PredictorCorrector, prior_sample)
from diffuse.building import build
from diffuse.devices import resolve_device
from diffuse.jobs.common import load_run
from diffuse.metrics import RandomFeatures, frechet_distance, nearest_label, off_range_fraction

# (name, sampler, steps): NFE ≈ 10 / 20 / 50 / 100 for each, ddpm up to its full 1000
CONFIGS = [
    *[("ddpm", lambda n: DDPM(n), n) for n in (10, 20, 50, 100, 1000)],
    *[("ddpm_clip", lambda n: DDPM(n, variance="posterior", clip_x0=True), n) for n in (20, 100)],
    *[("ddim", lambda n: DDIM(n), n) for n in (10, 20, 50)],
    *[("ddim_clip", lambda n: DDIM(n, clip_x0=True), n) for n in (10, 20)],
    ("ddim_eta1", lambda n: DDIM(n, eta=1.0), 20),
    *[("dpm_solver", lambda n: DPMSolverPP(n, spacing="logsnr"), n) for n in (10, 20)],
    *[("dpm_solver_clip", lambda n: DPMSolverPP(n, spacing="logsnr", clip_x0=True), n) for n in (10, 20)],
    *[("heun", lambda n: Heun(n, spacing="karras"), n) for n in (6, 11)],
    *[("heun_clip", lambda n: Heun(n, spacing="karras", clip_x0=True), n) for n in (6, 11)],
    *[("euler_maruyama", lambda n: EulerMaruyama(n, t_end=1e-3), n) for n in (20, 100)],
    *[("pc", lambda n: PredictorCorrector(n), n) for n in (10, 50)],
]
QUICK = [c for c in CONFIGS if c[2] in (10, 11, 1000) and not c[0].endswith("clip")]


# ----- the checkpoint ------------------------------------------------------------------------------------------
def train_small(steps: int, extra: list[str]) -> Path:
    from diffuse.app import compose_config
    from diffuse.jobs import train as train_job

    overrides = ["dataset.resolution=16", "model.base_channels=32", "model.channel_mult=[1,2]",
                 f"trainer.max_steps={steps}", "trainer.batch_size=64", "trainer.sample_every=0", "logger=none",
                 f"trainer.checkpoint_every={steps}", "trainer.log_every=100", *extra]
    cfg = compose_config("train", overrides)
    run_dir = Path(tempfile.mkdtemp(prefix="sampler_quality_"))
    print(f"training {steps} steps of a small UNet on 2-D shapes 16×16 into {run_dir} {' '.join(extra)}…",
          flush=True)
    t0 = time.time()
    train_job.run(cfg, run_dir, overrides)
    print(f"  done in {time.time() - t0:.0f} s", flush=True)
    return run_dir / "checkpoints" / "last.ckpt"


# ----- the cross-check against diffusers ----------------------------------------------------------------------------
def diffusers_check(loaded, device, shape, n: int) -> list[dict]:
    try:
        import diffusers
    except ImportError:
        print("\ndiffusers not installed: cross-check skipped (pip install diffusers)")
        return []
    sched_cfg = loaded.config.schedule
    target = sched_cfg._target_.rsplit(".", 1)[-1]
    if target == "LinearSchedule":
        kw = dict(beta_schedule="linear", beta_start=sched_cfg.beta_start, beta_end=sched_cfg.beta_end)
    elif target == "CosineSchedule":
        kw = dict(beta_schedule="squaredcos_cap_v2")
    else:
        print(f"\ndiffusers cross-check skipped: {target} has no diffusers scheduler")
        return []
    T = loaded.schedule.num_timesteps
    model = loaded.model
    prediction = loaded.config.objective.prediction  # any: both sides get ε̂ from the same Denoiser
    labels = class_labels(n, int(getattr(model, "num_classes", 0) or 0))
    labels = None if labels is None else labels[:n].to(device)
    rows = []
    # warm-up (cuDNN autotuning, allocator growth), so that the first timed row is not charged for it
    Denoiser(model, loaded.schedule, prediction, y=labels).eps(
        prior_sample(loaded.schedule, NoiseSource(range(n), device), shape), 0.5)
    print(f"\ncross-check against diffusers {diffusers.__version__} (same network, noise and grid; {n} samples)")
    print(f"{'scheduler':<34}{'steps':>6}{'max |Δx|':>12}{'ours s':>9}{'diffusers s':>13}{'ratio':>7}")
    for label, make_ref, ours_cls in (
            ("DDIMScheduler (trailing, eta 0)",
             lambda: diffusers.DDIMScheduler(num_train_timesteps=T, timestep_spacing="trailing",
                                             clip_sample=False, set_alpha_to_one=True, **kw), DDIM),
            ("DPMSolverMultistep (2M, ++)",
             lambda: diffusers.DPMSolverMultistepScheduler(num_train_timesteps=T, algorithm_type="dpmsolver++",
                                                           solver_order=2, final_sigmas_type="zero", **kw),
             DPMSolverPP)):
        for steps in (10, 20, 50):
            ref = make_ref()
            ref.set_timesteps(steps)
            grid = torch.cat([(ref.timesteps.double() + 1) / T, torch.zeros(1, dtype=torch.float64)])
            x_T = prior_sample(loaded.schedule, NoiseSource(range(n), device), shape)

            den = Denoiser(model, loaded.schedule, prediction, y=labels)
            t0 = time.perf_counter()
            ours = ours_cls(steps).run(den, x_T.clone(), grid, None, None)
            t_ours = time.perf_counter() - t0

            den = Denoiser(model, loaded.schedule, prediction, y=labels)
            t0 = time.perf_counter()
            x = x_T.clone()
            for ts in ref.timesteps:
                eps = den.eps(x, (float(ts) + 1) / T)
                x = ref.step(eps, ts, x).prev_sample
            t_ref = time.perf_counter() - t0
            diff = (ours - x).abs().max().item()
            rows.append({"scheduler": label, "steps": steps, "max_abs_diff": diff, "ours_s": t_ours,
                         "diffusers_s": t_ref})
            print(f"{label:<34}{steps:>6}{diff:>12.2e}{t_ours:>9.2f}{t_ref:>13.2f}{t_ours / t_ref:>7.2f}")
    return rows


# ----- main ------------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", nargs="?", help="a last.ckpt (or run folder); default: train a small one")
    p.add_argument("--train-steps", type=int, default=1000)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override for the training run (repeatable), e.g. trainer.batch_size=128")
    p.add_argument("--num-samples", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--quick", action="store_true", help="fewer configurations (a smoke run)")
    p.add_argument("--out", default="sampler_quality.json")
    args = p.parse_args(argv)
    torch.manual_seed(0)

    device = resolve_device(args.device)
    ckpt = args.checkpoint or train_small(args.train_steps, args.set)
    loaded = load_run(str(ckpt), device)
    cfg, model = loaded.config, loaded.model
    dataset = build(cfg.dataset, "dataset")
    shape = (dataset.channels, *([dataset.resolution] * dataset.dim))
    num_classes = int(getattr(model, "num_classes", 0) or 0)
    n = args.num_samples

    # real data: a reference set, a second set for the floor, and a labelled bank for nearest-neighbour labels
    g = torch.Generator().manual_seed(123)
    idx = torch.randperm(len(dataset), generator=g)
    real_a, _ = dataset.get_batch(idx[:n])
    real_b, _ = dataset.get_batch(idx[n:2 * n])
    bank_x, bank_y = dataset.get_batch(idx[2 * n:2 * n + 4096])
    feats = RandomFeatures(dataset.dim, dataset.channels)
    ref_feats = feats(real_a)
    floor = frechet_distance(ref_feats, feats(real_b))

    labels = class_labels(n, num_classes)
    labels = None if labels is None else labels[:n]
    print(f"\ncheckpoint {loaded.path} (step {loaded.step}; schedule {cfg.schedule._target_.rsplit('.', 1)[-1]}, "
          f"{dataset.dim}-D {'×'.join(map(str, shape[1:]))}); {n} samples per row, FD on random-conv features")
    head = f"{'sampler':<18}{'steps':>6}{'NFE':>6}{'FD':>9}{'labels':>8}{'off':>7}{'time s':>8}"
    print(head + "\n" + "-" * len(head))
    print(f"{'real vs real':<18}{'':>6}{'':>6}{floor:>9.3f}{'':>8}{'':>7}{'':>8}")
    rows = []
    for name, make, steps in (QUICK if args.quick else CONFIGS):
        sampler = make(steps)
        t0 = time.time()
        out = generate(model, loaded.schedule, sampler, shape, n, labels=labels, seed=10_000,
                       batch_size=args.batch_size, prediction=cfg.objective.prediction, device=device)
        elapsed = time.time() - t0
        x = out.x.clamp(-1, 1)
        fd = frechet_distance(feats(x), ref_feats)
        agree = (nearest_label(x, bank_x, bank_y) == labels).float().mean().item() if labels is not None else None
        off = off_range_fraction(x, real_a)
        rows.append({"sampler": name, "steps": steps, "nfe": out.nfe, "fd": fd, "label_agreement": agree,
                     "off_range_fraction": off, "seconds": elapsed})
        print(f"{name:<18}{steps:>6}{out.nfe:>6}{fd:>9.3f}{'' if agree is None else f'{agree:8.3f}'}"
              f"{off:>7.3f}{elapsed:>8.1f}", flush=True)

    reference = next((r for r in rows if r["sampler"] == "ddpm" and r["steps"] == 1000), None)
    if reference is not None:
        print(f"\nddpm at 1000 NFE: FD {reference['fd']:.3f}. Best at ≤ 20 NFE:")
        for name in dict.fromkeys(r["sampler"] for r in rows):
            few = [r for r in rows if r["sampler"] == name and r["nfe"] <= 21]
            if few:
                best = min(few, key=lambda r: r["fd"])
                verdict = "reaches it" if best["fd"] <= 1.1 * reference["fd"] + 0.5 * floor else "does not"
                print(f"  {name:<18} FD {best['fd']:.3f} at {best['nfe']} NFE: {verdict}")

    cross = diffusers_check(loaded, device, shape, min(n, 64))
    result = {"checkpoint": str(loaded.path), "step": loaded.step, "num_samples": n, "metric": {
        "fd": "Frechet distance of random-conv features (128-d) to real data",
        "label_agreement": "fraction whose nearest real image (L2) has the asked class"},
        "real_vs_real_fd": floor, "rows": rows, "diffusers": cross}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

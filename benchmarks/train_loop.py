"""Whole training steps, as each tool's users run them: `diffuse train`'s default run against the step of
diffusers' example script (examples/unconditional_image_generation/train_unconditional.py) on the same network
layout, data size and precision. Images per second, same run.

    python benchmarks/train_loop.py [--device cpu|cuda] [--steps 300] [--window 50] [--compile MODE]
                                    [--cuda-graphs] [--out train_loop.json]

ours: `python -m diffuse train` with the default config (shapes 32², the default UNet, batch 64, precision
auto, fused AdamW, EMA, gradient clipping, onecycle LR) and no grids, validation or checkpoints on the way;
images/s is the loop's own `images_per_s` of each log window (log_every = --window), which ends with the one host
read of a window. The first window (warm-up, compilation) is left out; the median of the others is reported.
diffusers: UNet2DModel of the same layout (benchmarks/train_step.py's), DDPMScheduler.add_noise, MSE on ε,
clip_grad_norm_(1.0), torch's AdamW with its defaults, diffusers' cosine LR schedule and EMAModel.step, the batch
already on the device (its best case: no DataLoader), the same autocast as ours. Two rows: as the script runs
(`loss.detach().item()` for its progress bar after every step: a host sync per step), and with that read only
once a window, as ours.
--compile MODE: trainer.compile=MODE for ours and torch.compile(mode=MODE) for diffusers' network (true =
torch's default mode). --cuda-graphs: trainer.cuda_graphs=true for ours (the script has no such option).
Run it on a quiet machine: two busy processes on two cores slow each other several-fold.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from train_step import peer

REPO = Path(__file__).resolve().parents[1]


def ours(device: str, steps: int, window: int, compile_mode: str, cuda_graphs: bool) -> dict:
    """The default `diffuse train` for `steps` steps; images/s per log window from its metrics.jsonl."""
    with tempfile.TemporaryDirectory() as tmp:
        args = [sys.executable, "-m", "diffuse", "train", f"device={device}", f"trainer.max_steps={steps}",
                f"trainer.log_every={window}", "trainer.val_every=0", "trainer.val_items=0",
                "trainer.final_samples=false", "trainer.sample_every=0", f"trainer.checkpoint_every={10 * steps}",
                f"trainer.compile={compile_mode}", f"trainer.cuda_graphs={str(cuda_graphs).lower()}", "logger=none",
                f"hydra.run.dir={tmp}/run"]
        env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        start = time.perf_counter()
        proc = subprocess.run(args, cwd=tmp, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode:
            raise SystemExit(f"diffuse train failed:\n{proc.stderr[-3000:]}")
        rows = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    rates = [r["images_per_s"] for r in rows if "images_per_s" in r]
    return {"images_per_s": statistics.median(rates[1:] or rates), "windows": rates, "wall_s": wall}


def default_settings() -> dict:
    """Batch, resolution, channels, classes and precision of the default run (from its config)."""
    from diffuse.app import compose_config

    cfg = compose_config("train")
    return {"batch": cfg.trainer.batch_size, "resolution": cfg.dataset.resolution, "channels": cfg.dataset.channels,
            "num_classes": cfg.dataset.num_classes, "precision": cfg.trainer.precision}


def diffusers_step(device: torch.device, settings: dict, steps: int, window: int, compile_mode: str,
                   read_every_step: bool) -> dict:
    """train_unconditional.py's inner loop (with class labels), on a batch held on the device."""
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    from diffuse.devices import resolve_precision

    torch.manual_seed(0)
    b, r = settings["batch"], settings["resolution"]
    model = peer(r).to(device)
    ema = EMAModel(model.parameters(), decay=0.999, use_ema_warmup=True, inv_gamma=1.0, power=0.75,
                   model_cls=type(model), model_config=model.config)
    ema.to(device)
    mode = None if compile_mode == "true" else compile_mode
    net = model if compile_mode == "false" else torch.compile(model, mode=mode)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.999), weight_decay=0.0, eps=1e-8)
    lr_scheduler = get_scheduler("cosine", optimizer=optimizer, num_warmup_steps=0, num_training_steps=steps)
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000)
    clean = torch.rand(b, settings["channels"], r, r, device=device) * 2 - 1
    labels = torch.randint(0, settings["num_classes"], (b,), device=device)
    bf16 = resolve_precision(settings["precision"], device) == "bf16"  # as ours resolves it (auto: GPU, AMX CPU)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    rates, t0 = [], time.perf_counter()
    for step in range(1, steps + 1):
        noise = torch.randn(clean.shape, device=device)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (b,), device=device).long()
        noisy = noise_scheduler.add_noise(clean, noise, timesteps)
        with autocast:
            out = net(noisy, timesteps, class_labels=labels).sample
        loss = torch.nn.functional.mse_loss(out.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
        ema.step(model.parameters())
        if read_every_step or step % window == 0:
            loss.detach().item()  # the script's progress bar and logger, every step
        if step % window == 0:
            now = time.perf_counter()
            rates.append(window * b / (now - t0))
            t0 = now
    return {"images_per_s": statistics.median(rates[1:] or rates), "windows": rates}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--window", type=int, default=50)
    p.add_argument("--compile", default="false", help="false | true | a torch.compile mode, e.g. reduce-overhead")
    p.add_argument("--cuda-graphs", action="store_true", help="trainer.cuda_graphs=true for ours")
    p.add_argument("--out", default="train_loop.json")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    settings = default_settings()
    results = {"diffuse": ours(args.device, args.steps, args.window, args.compile, args.cuda_graphs),
               "diffusers (script: a read per step)": diffusers_step(device, settings, args.steps, args.window,
                                                                     args.compile, read_every_step=True),
               "diffusers (a read per window)": diffusers_step(device, settings, args.steps, args.window,
                                                               args.compile, read_every_step=False)}
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"default run: batch {settings['batch']}, {settings['resolution']}², precision {settings['precision']}, "
          f"compile {args.compile}, cuda_graphs {args.cuda_graphs}, {where}; {args.steps} steps, median of windows "
          f"of {args.window} after the first")
    base = results["diffuse"]["images_per_s"]
    for name, row in results.items():
        print(f"{name:<38}{row['images_per_s']:>10.1f} images/s{base / row['images_per_s']:>8.2f}× (ours/this)")
    with open(args.out, "w") as f:
        json.dump({"settings": settings, "device": where, "steps": args.steps, "window": args.window,
                   "compile": args.compile, "cuda_graphs": args.cuda_graphs, "results": results}, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

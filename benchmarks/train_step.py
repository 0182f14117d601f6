"""Our default UNet against diffusers' UNet2DModel of the same layout: training step and sampling forward.

    python benchmarks/train_step.py [--batch 64] [--resolution 32] [--repeats 5] [--device cpu|cuda]
                                    [--precision fp32|bf16] [--out train_step.json]

Both models: 3 levels of 32/64/64 channels, one residual block per level (diffusers: layers_per_block=1),
self-attention at the coarsest level, a class embedding (4 classes + null), GroupNorm, SiLU. Timed: one
AdamW step (forward, ε-MSE loss, backward, step) and one no-grad forward (a sampler's network evaluation),
median of `repeats` after two warm-ups, same inputs for both. On CUDA each timing synchronises the device
before reading the clock; bf16 runs the forward under autocast (weights and optimizer stay fp32), as the
trainer's `precision=bf16` does. Prints a table with the ratio ours/diffusers
and writes JSON. Run it on a quiet machine: two busy processes on two cores slow each other several-fold.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from diffuse.models.unet import UNet


def ours(resolution: int):
    return UNet(dim=2, in_channels=1, base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                attn_levels=(2,), time_emb_dim=32, num_classes=4)


def peer(resolution: int):
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=resolution, in_channels=1, out_channels=1, block_out_channels=(32, 64, 64),
                       layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), num_class_embeds=5,
                       norm_num_groups=32, attention_head_dim=64)


def timed(fn, repeats: int, device: torch.device) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--compile", action="store_true", help="torch.compile both models (trainer.compile=true)")
    p.add_argument("--out", default="train_step.json")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    device = torch.device(args.device)
    b, r = args.batch, args.resolution
    x = torch.randn(b, 1, r, r, device=device)
    t = torch.rand(b, device=device)
    y = torch.randint(0, 4, (b,), device=device)
    noise = torch.randn_like(x)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    results = {}
    for name, build in (("diffuse", ours), ("diffusers", peer)):
        model = build(r).to(device)
        if args.compile:
            model = torch.compile(model)
        if name == "diffuse":
            net = lambda xx: model(xx, t, y)  # noqa: E731 - t in [0, 1], as our models take it
        else:
            net = lambda xx: model(xx, (t * 999).long(), class_labels=y).sample  # noqa: E731 - integer steps
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def train_step():
            with autocast:
                out = net(x)
            loss = (out.float() - noise).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        def forward():
            with torch.no_grad(), autocast:
                net(x)

        results[name] = {"parameters": sum(q.numel() for q in model.parameters()),
                         "train_step_s": timed(train_step, args.repeats, device),
                         "forward_s": timed(forward, args.repeats, device)}
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"batch {b}, {r}×{r}, {args.precision}{', compiled' if args.compile else ''}, {where}, "
          f"median of {args.repeats}")
    print(f"{'':<11}{'params':>10}{'train step s':>14}{'forward s':>11}")
    for name, row in results.items():
        print(f"{name:<11}{row['parameters'] / 1e6:>9.2f}M{row['train_step_s']:>14.3f}{row['forward_s']:>11.3f}")
    ratio = {k: results["diffuse"][k] / results["diffusers"][k] for k in ("train_step_s", "forward_s")}
    print(f"{'ours/peer':<11}{'':>10}{ratio['train_step_s']:>14.2f}{ratio['forward_s']:>11.2f}")
    with open(args.out, "w") as f:
        json.dump({"batch": b, "resolution": r, "device": where, "precision": args.precision,
                   "compiled": args.compile, "results": results,
                   "ratio_ours_over_diffusers": ratio}, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

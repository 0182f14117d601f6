"""RePaint: ours (`diffuse edit method=repaint`'s function) against diffusers' RePaintPipeline, same network.

    python benchmarks/repaint_peer.py [--unet FOLDER] [--batch 8] [--steps 50] [--jump 10] [--resample 10]
                                      [--repeats 3] [--out FILE.json]

Both inpaint the bottom half of the same `batch` inputs with one diffusers UNet2DModel: a seeded random one
(1 channel, 32², 3 levels of 32/64/64, attention at the coarsest; the layout of benchmarks/train_step.py) or
the ε-predicting diffusers folder `--unet` (e.g. a local google/ddpm-cifar10-32), on the linear β schedule of
1000 steps. Ours: DDPM with the posterior variance (what RePaintScheduler's η = 1 draws) on the same
"leading" grid, `diffuse.diffusion.editing.inpaint(method="repaint")`. Theirs: RePaintPipeline with
RePaintScheduler at η = 1.

The two walk the grid differently, so they run different numbers of network passes: RePaintScheduler
resamples every jump but the one at the top of the grid (steps + (steps/jump − 1)·(resample − 1)·jump
passes), ours resamples every jump (steps · resample). Timed: the whole call, median of `repeats`, ours and
theirs alternating, after a warm-up each. Reported: passes, seconds per completion, milliseconds per network
pass and the ratio ours/diffusers of the last (the loop's overhead over the same network), and for both the
largest error on the known half (0 for ours: the input is pasted; diffusers' last step keeps it to float error).
Run it on a quiet machine: two busy processes on two cores slow each other several-fold.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_name  # noqa: E402


def random_unet():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(sample_size=32, in_channels=1, out_channels=1, block_out_channels=(32, 64, 64),
                       layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), norm_num_groups=32,
                       attention_head_dim=64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--unet", type=Path, help="a diffusers UNet2DModel folder (ε-prediction); default: random")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--jump", type=int, default=10)
    parser.add_argument("--resample", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import tempfile

    from diffusers import RePaintPipeline, RePaintScheduler, UNet2DModel

    from diffuse.diffusion.editing import inpaint
    from diffuse.diffusion.guidance import Denoiser
    from diffuse.diffusion.samplers import DDPM, NoiseSource
    from diffuse.diffusion.schedules import LinearSchedule
    from diffuse.storage.diffusers_format import unet_model

    with tempfile.TemporaryDirectory() as scratch:
        folder = args.unet
        if folder is None:
            folder = Path(scratch) / "unet"
            random_unet().save_pretrained(folder)
        peer_unet = UNet2DModel.from_pretrained(folder).eval()
        ours_unet = unet_model(folder)  # the folder as our DiffusersUNet
    c, size = peer_unet.config.in_channels, peer_unet.config.sample_size
    size = size if isinstance(size, int) else size[0]
    shape = (args.batch, c, size, size)
    gen = torch.Generator().manual_seed(1)
    images = (torch.rand(shape, generator=gen) * 2 - 1).clamp(-1, 1)
    known = torch.zeros(1, 1, size, size, dtype=torch.bool)
    known[..., : size // 2, :] = True

    scheduler = RePaintScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    pipe = RePaintPipeline(unet=peer_unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    peer_out: dict = {}

    def run_peer():
        calls = [0]
        forward = peer_unet.forward

        def counted(*a, **k):
            calls[0] += 1
            return forward(*a, **k)
        peer_unet.forward = counted
        try:
            image = pipe(image=images, mask_image=known.float().expand(args.batch, 1, size, size),
                         num_inference_steps=args.steps, eta=1.0, jump_length=args.jump, jump_n_sample=args.resample,
                         generator=torch.Generator().manual_seed(0), output_type="np").images
        finally:
            peer_unet.forward = forward
        peer_out.update(x=torch.from_numpy(image).permute(0, 3, 1, 2) * 2 - 1, passes=calls[0])

    ours_out: dict = {}

    def run_ours():
        denoiser = Denoiser(ours_unet, LinearSchedule(), "eps")
        noise = NoiseSource(range(args.batch))
        x = inpaint(denoiser, DDPM(args.steps, spacing="leading", variance="posterior"), images, known, noise,
                    method="repaint", jump_length=args.jump, resample=args.resample)
        ours_out.update(x=x, passes=denoiser.nfe)

    with torch.no_grad():
        ours_times, peer_times = [], []
        run_ours(), run_peer()  # warm-ups
        for _ in range(args.repeats):
            ours_times.append(_clock(run_ours))
            peer_times.append(_clock(run_peer))

    rows = {}
    for name, out, times in (("diffuse", ours_out, ours_times), ("diffusers", peer_out, peer_times)):
        seconds = statistics.median(times)
        known_err = (out["x"] - images).abs()[known.expand_as(images)].max().item()
        rows[name] = dict(passes=int(out["passes"]), s_per_completion=seconds / args.batch,
                          ms_per_pass=1000 * seconds / out["passes"], known_max_err=known_err,
                          times_s=[round(t, 4) for t in times])
    ratio = rows["diffuse"]["ms_per_pass"] / rows["diffusers"]["ms_per_pass"]
    params = sum(p.numel() for p in peer_unet.parameters())
    print(f"RePaint, bottom half of {args.batch} inputs {list(shape[1:])}, UNet2DModel {params / 1e6:.2f}M params "
          f"({'random' if args.unet is None else args.unet}), {args.steps} steps, jump {args.jump}, "
          f"resample {args.resample}; {cpu_name()}, {args.threads} threads")
    print("| | network passes | s per completion | ms per network pass | max error, known half |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['passes']} | {r['s_per_completion']:.3f} | {r['ms_per_pass']:.1f} | "
              f"{r['known_max_err']:.1e} |")
    print(f"ms per pass, diffuse / diffusers: {ratio:.3f}")
    if args.out:
        args.out.write_text(json.dumps(dict(cpu=cpu_name(), threads=args.threads, shape=list(shape), params=params,
                                            steps=args.steps, jump=args.jump, resample=args.resample, rows=rows,
                                            ratio_ms_per_pass=ratio), indent=1))


def _clock(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()

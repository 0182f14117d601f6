"""Classifier-free guidance on `shapes`: does a larger guidance scale w give more samples of the asked class?

    python benchmarks/guidance_shapes.py [CHECKPOINT] [--train-steps 1000] [--sampler dpm_solver]
                                         [--scales 0,1.5,3,5] [--num-samples 256]

Without a checkpoint it trains the same small conditional UNet as sampler_quality.py (labels dropped to the
null class with trainer.cond_drop_prob = 0.1). The class of a sample is that of its nearest real image (L2,
over a bank of 4096 labelled real images): the table gives, per w, the fraction classified as the asked
class, and the FD of sampler_quality.py (diversity falls as w grows: FD usually rises).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from hydra.utils import instantiate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sampler_quality import RandomFeatures, frechet_distance, nearest_label, train_small  # noqa: E402

from diffuse.diffusion.generation import class_labels, generate  # noqa: E402
from diffuse.diffusion.guidance import null_class_of  # noqa: E402
from diffuse.app import compose_config  # noqa: E402
from diffuse.building import build  # noqa: E402
from diffuse.devices import resolve_device  # noqa: E402
from diffuse.jobs.common import load_run  # noqa: E402
from diffuse.jobs.sampling_setup import with_steps  # noqa: E402



def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", nargs="?")
    p.add_argument("--train-steps", type=int, default=1000)
    p.add_argument("--sampler", default="dpm_solver", help="a conf/sampler name")
    p.add_argument("--steps", type=int, default=None, help="override the sampler's steps")
    p.add_argument("--scales", default="0,1.5,3,5")
    p.add_argument("--num-samples", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="guidance_shapes.json")
    args = p.parse_args(argv)

    device = resolve_device(args.device)
    loaded = load_run(str(args.checkpoint or train_small(args.train_steps, [])), device)
    model, cfg = loaded.model, loaded.config
    if null_class_of(model) is None:
        print("the checkpoint's model has no null class: train it with conditional=true")
        return 1
    dataset = build(cfg.dataset, "dataset")
    shape = (dataset.channels, *([dataset.resolution] * dataset.dim))
    idx = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(123))
    bank_x, bank_y = dataset.get_batch(idx[: 4096])
    real, _ = dataset.get_batch(idx[4096: 4096 + args.num_samples])
    feats = RandomFeatures(dataset.dim, dataset.channels)
    real_feats = feats(real)
    labels = class_labels(args.num_samples, model.num_classes)[: args.num_samples]

    print(f"{loaded.path} (step {loaded.step}); sampler {args.sampler} ({args.steps or 'default'} steps); "
          f"{len(labels)} samples per row;"
          " class = nearest real image's")
    print(f"{'w':>6}{'asked class':>13}{'FD':>9}   per class")
    rows = []
    for w in (float(v) for v in args.scales.split(",")):
        node = compose_config("sample", [f"sampler={args.sampler}"]).sampler  # with its group's _common.yaml
        if args.steps:
            node.steps = args.steps
        sampler = instantiate(with_steps(node, w))  # steps=auto: 20 network passes (10 guided steps)
        out = generate(model, loaded.schedule, sampler, shape, len(labels), labels=labels, seed=0,
                       batch_size=len(labels), prediction=cfg.objective.prediction, guidance_scale=w,
                       device=device)
        x = out.x.clamp(-1, 1)
        hit = nearest_label(x, bank_x, bank_y) == labels
        per_class = [hit[labels == k].float().mean().item() for k in range(model.num_classes)]
        fd = frechet_distance(feats(x), real_feats)
        rows.append({"w": w, "asked_class_fraction": hit.float().mean().item(), "per_class": per_class, "fd": fd})
        print(f"{w:>6.2f}{hit.float().mean().item():>13.3f}{fd:>9.3f}   " + " ".join(f"{v:.2f}" for v in per_class),
              flush=True)
    Path(args.out).write_text(json.dumps({"checkpoint": str(loaded.path), "sampler": args.sampler,
                                          "num_samples": len(labels), "rows": rows}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

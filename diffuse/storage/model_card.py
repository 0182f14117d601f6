"""The README.md that goes into every export (the Hugging Face Hub shows it as the model card): what the network
is, how it was trained, how to load it, the metrics `diffuse evaluate` measured on that checkpoint and a sample
grid. Written from the vetted checkpoint's config; the local file layout is never named."""

from __future__ import annotations

import json
from pathlib import Path

SHOWN_METRICS = ("fid", "fid_real_vs_real", "fd", "fd_real_vs_real", "kid_mean", "prc_precision", "prc_recall",
                 "digit_accuracy", "label_agreement", "memorization_copy_rate")


def _name(node: dict | None) -> str:
    return str((node or {}).get("_target_", "?")).rsplit(".", 1)[-1]


def find_metrics(run: Path | None, checkpoint: Path) -> dict | None:
    """The newest metrics.json `diffuse evaluate` wrote for this checkpoint, among the runs beside `run`."""
    if run is None:
        return None
    found = []
    for path in run.parent.parent.glob("*/*/metrics.json"):
        try:
            metrics = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        if isinstance(metrics, dict) and Path(str(metrics.get("checkpoint", ""))).resolve() == checkpoint.resolve():
            found.append((path.stat().st_mtime, metrics))
    return max(found, key=lambda f: f[0])[1] if found else None


def latest_grid(run: Path | None) -> Path | None:
    """The run's last training grid (samples/step_N.png), if it drew any."""
    grids = list((run / "samples").glob("step_*.png")) if run is not None else []
    return max(grids, key=lambda p: int(p.stem.split("_")[1]) if p.stem.split("_")[1].isdigit() else -1,
               default=None)


def model_card(config: dict, step: int, source: str, fmt: str, metrics: dict | None, grid: str | None) -> str:
    """README.md's text. fmt: diffuse | diffusers (how to load it differs)."""
    dataset = config.get("dataset") or {}
    objective = config.get("objective") or {}
    sampler = config.get("sampler") or {}
    trainer = config.get("trainer") or {}
    lines = ["---", "library_name: " + ("diffusers" if fmt == "diffusers" else "diffuse"),
             "tags: [diffusion, diffuse" + (", unconditional-image-generation" if not config.get("conditional") else "")
             + "]", "---", "",
             f"# {_name(config.get('model'))} on {_name(dataset)}, step {step}", "",
             f"Trained with diffuse; exported from `{source}`.", "",
             "| | |", "|---|---|",
             f"| model | `{_name(config.get('model'))}` |",
             f"| data | `{_name(dataset)}`, {dataset.get('channels', '?')} channels, resolution "
             f"{dataset.get('resolution', '?')}, {config.get('dim', 2)}-D |",
             f"| class-conditional | {bool(config.get('conditional'))} |",
             f"| schedule | `{_name(config.get('schedule'))}` |",
             f"| objective | predicts {objective.get('prediction', 'eps')}, weighting {objective.get('weighting', 'none')} |",
             f"| training | {step} steps, batch {trainer.get('batch_size', '?')}, lr {trainer.get('lr', '?')}, "
             f"EMA {trainer.get('ema_decay', '?')} |",
             f"| sampler | `{_name(sampler)}`, {sampler.get('steps', '?')} steps, guidance "
             f"{(config.get('guidance') or {}).get('scale', 0)} |",
             f"| latent | {'yes: decode with the VAE in this folder' if (config.get('latent') or {}).get('vae') else 'no'} |",
             ""]
    if fmt == "diffusers" and int(config.get("dim", 2)) == 1:
        lines += ["## Load it", "", "```python", "import torch",
                  "from diffusers import DDIMScheduler, UNet1DModel",
                  "unet = UNet1DModel.from_pretrained(FOLDER, subfolder=\"unet\")",
                  "scheduler = DDIMScheduler.from_pretrained(FOLDER, subfolder=\"scheduler\")   # or DDPMScheduler",
                  "scheduler.set_timesteps(50)",
                  f"x = torch.randn(4, unet.config.in_channels, {dataset.get('resolution', 'LENGTH')})",
                  "with torch.no_grad():", "    for t in scheduler.timesteps:",
                  "        x = scheduler.step(unet(x, t).sample, t, x).prev_sample", "```", "",
                  "The UNet takes diffusers' integer timesteps 0 … T−1; diffuse's t = (i + 1)/T. No diffusers "
                  "pipeline samples a 1-D UNet with this scheduler (DanceDiffusionPipeline feeds float timesteps), "
                  "so the folder has no model_index.json: the loop above is the pipeline.", ""]
    elif fmt == "diffusers":
        lines += ["## Load it", "", "```python", "from diffusers import DDPMPipeline",
                  "pipe = DDPMPipeline.from_pretrained(FOLDER)   # or DDIMPipeline, same folder",
                  "images = pipe(batch_size=4, num_inference_steps=50).images", "```", "",
                  "The UNet takes diffusers' integer timesteps 0 … T−1; diffuse's t = (i + 1)/T. "
                  + ("Class-conditional: pass class_labels to the UNet (the last class index is the null class "
                     "classifier-free guidance reads); the plain pipelines draw the null class." if
                     config.get("conditional") else ""), ""]
    else:
        lines += ["## Load it", "", "```bash", "diffuse sample checkpoint=FOLDER", "```", "",
                  "`model.safetensors` holds the weights and `config.json` the model, schedule and sampler.", ""]
    lines += ["## Metrics", ""]
    if metrics:
        n = metrics.get("num_samples")
        lines += [f"`diffuse evaluate` on this checkpoint: {metrics.get('sampler')} {metrics.get('steps')} steps, "
                  f"{n} samples (FID falls as the count grows: compare at equal counts).", "",
                  "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {metrics[k]:.4g} |" for k in SHOWN_METRICS if isinstance(metrics.get(k), (int, float))]
        lines.append("")
    else:
        lines += ["None measured: `diffuse evaluate checkpoint=…` before exporting adds them here.", ""]
    if grid:
        lines += ["## Samples", "", f"![samples]({grid})", ""]
    return "\n".join(lines)

"""`diffuse sample` (and `diffuse animate`): rebuild a run from its checkpoint, draw samples, save them.

Writes into its own run dir: samples.npz (x [N, C, *spatial] fp32 in [−1, 1], y [N] when conditional),
grid.png (a row per class when conditional), sample.png (the first sample alone, at the data's own size) and,
with animation.enabled, animation.gif|mp4. `checkpoint` may also be a `diffuse export` folder.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from diffuse import media
from diffuse.diffusion.generation import class_labels, generate, progress_bar, sampler_steps
from diffuse.errors import DiffuseError
from diffuse.jobs.common import build, load_run, resolve_device
from diffuse.latent import is_latent_run, latent_decoder, unclipped_in_latent_space
from diffuse.training.loop import PRECISIONS, use_channels_last
from diffuse.validation import check_guidance

log = logging.getLogger(__name__)


def sampler_config(cfg: DictConfig, saved: DictConfig, overrides: list[str]) -> DictConfig:
    """The sampler the user chose (sampler=X on the command line), else the one the run was trained with;
    `sampler.key=value` overrides apply to either."""
    if any(o.split("=", 1)[0].lstrip("+") == "sampler" for o in overrides):
        return cfg.sampler
    chosen = OmegaConf.create(OmegaConf.to_container(saved.sampler)) if "sampler" in saved else cfg.sampler
    for o in overrides:
        key = o.split("=", 1)[0].lstrip("+")
        if key.startswith("sampler."):
            OmegaConf.update(chosen, key[len("sampler."):], OmegaConf.select(cfg, key), force_add=True)
    return chosen


def prepare_for_sampling(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Eval mode; channels-last weights for 2-D conv models on the CPU (the default UNet's sampling forward at
    batch 64, 32², one thread: ~0.80 s NCHW vs ~0.61–0.74 s NHWC). The samples agree to float rounding."""
    model.eval()
    if use_channels_last("auto", model, device):
        model.to(memory_format=torch.channels_last)
    return model


def run(cfg: DictConfig, run_dir: Path, overrides: list[str] | None = None) -> dict:
    with torch.inference_mode():
        return _run(cfg, run_dir, overrides)


def _run(cfg: DictConfig, run_dir: Path, overrides: list[str] | None = None) -> dict:
    run_dir = Path(run_dir)
    device = resolve_device(cfg.device)
    loaded = load_run(cfg.checkpoint, device, use_ema=cfg.use_ema, allow_targets=cfg.get("allow_targets") or ())
    saved = loaded.config
    sampler = unclipped_in_latent_space(build(sampler_config(cfg, saved, overrides or []), "sampler"),
                                        is_latent_run(saved))
    model = prepare_for_sampling(loaded.model, device)
    check_guidance(sampler.guidance_scale, bool(saved.get("conditional")),
                   float(saved.get("trainer", {}).get("cond_drop_prob") or 0), f"the run {loaded.path}")
    num_classes = int(getattr(model, "num_classes", 0) or 0)
    if cfg.get("class_label") is not None:
        if not 0 <= int(cfg.class_label) < max(num_classes, 1) or not num_classes:
            raise DiffuseError(f"class_label={cfg.class_label} but the model has {num_classes} classes")
        labels = torch.full((cfg.num_samples,), int(cfg.class_label), dtype=torch.long)
    else:
        labels = class_labels(cfg.num_samples, num_classes)
    dataset_cfg = saved.dataset
    sample_shape = (int(dataset_cfg.channels), *([int(dataset_cfg.resolution)] * int(saved.dim)))
    anim = cfg.animation
    n = cfg.num_samples if labels is None else len(labels)
    steps = sampler_steps(sampler, loaded.schedule)
    bar = progress_bar(n, steps, f"sample ({type(sampler).__name__})")
    start = time.perf_counter()
    out = generate(model, loaded.schedule, sampler, sample_shape, cfg.num_samples, labels=labels,
                   seed=cfg.seed, batch_size=cfg.batch_size, prediction=saved.objective.prediction,
                   null_class=getattr(model, "null_class", None), device=device,
                   trajectory=int(anim.frames) if anim.enabled else False,
                   autocast_dtype=PRECISIONS.get(cfg.get("precision", "fp32")), step_progress=bar.update)
    bar.close()
    log.info("samples: %d × %d steps in %.1f s", n, steps, time.perf_counter() - start)
    decode = latent_decoder(loaded.state, device)  # latent diffusion runs: the VAE decoder; else identity
    x = decode(out.x.float()).clamp(-1, 1)  # the data range (DESIGN §3); an undertrained model can overshoot
    run_dir.mkdir(parents=True, exist_ok=True)
    arrays = {"x": x.numpy().astype(np.float32)}
    if out.y is not None:
        arrays["y"] = out.y.numpy().astype(np.int64)
    paths = {"samples": run_dir / "samples.npz"}
    np.savez(paths["samples"], **arrays)
    per_class_rows = bool(num_classes) and cfg.get("class_label") is None
    nrow = len(x) // num_classes if per_class_rows else None
    class_names = list(loaded.state.get("class_names") or map(str, range(num_classes)))
    max_columns = int(cfg.get("grid_max_columns", media.GRID_MAX_COLUMNS) or 0) or None
    if per_class_rows:  # the conditional seed's classes figure: a labelled row per class
        paths["grid"] = media.save_class_grid(x, out.y, run_dir / "grid.png", class_names=class_names,
                                              view=cfg.view, max_columns=max_columns)
        if max_columns and nrow > max_columns:
            log.info("grid.png shows the first %d of %d samples per class (grid_max_columns=%d; all %d are in %s)",
                     max_columns, nrow, max_columns, len(x), paths["samples"].name)
    else:
        paths["grid"] = media.save_grid(x, run_dir / "grid.png", view=cfg.view, max_columns=max_columns)
    # the first sample alone at the data's own size (the Flowers seed's generated_pixel_diffusion.png)
    paths["sample"] = media.save_sample_image(x, run_dir / "sample.png", view=cfg.view)
    if anim.enabled:
        frames = [decode(s) for s in out.states]
        paths["animation"] = media.save_animation(frames, run_dir / f"animation.{anim.format}",
                                                  nrow=nrow, fps=anim.fps, hold_last=anim.hold, view=cfg.view,
                                                  times=out.times, max_columns=max_columns,
                                                  row_labels=class_names[:num_classes] if per_class_rows else None)
        # the conditional seed's step strip: one sample per row (the first of each class) across the steps
        firsts = [int(i) for i in range(0, len(x), nrow)] if per_class_rows else [0]
        paths["steps"] = media.save_step_strip(frames, out.times, run_dir / "steps.png", index=firsts,
                                               steps=int(anim.strip_steps), view=cfg.view)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return {"checkpoint": str(loaded.path), "step": loaded.step, "nfe": out.nfe,
            **{k: str(v) for k, v in paths.items()}}

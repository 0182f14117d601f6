"""`diffuse sample` (and `diffuse animate`): rebuild a run from its checkpoint, draw samples, save them.

Writes into its own run dir: samples.npz (x [N, C, *spatial] fp32 in [−1, 1], y [N] when conditional),
grid.png (a row per class when conditional), sample.png (the first sample alone, at the data's own size) and,
with animation.enabled, animation.gif|mp4. `checkpoint` may also be a `diffuse export` folder. Under torchrun
each process draws a share and rank 0 writes (see jobs/sampling.py).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from diffuse import media
from diffuse.diffusion.generation import class_labels
from diffuse.diffusion.guidance import guidance_note
from diffuse.errors import DiffuseError
from diffuse.jobs.common import report
from diffuse.jobs.sampling import open_run, sampling_processes
from diffuse.training.distributed import DistInfo

log = logging.getLogger(__name__)


def run(cfg: DictConfig, run_dir: Path, overrides: list[str] | None = None) -> dict:
    with sampling_processes(cfg, Path(run_dir)) as (dist, device, run_dir), torch.inference_mode():
        return _run(cfg, run_dir, device, dist)


def sample_labels(cfg: DictConfig, num_classes: int) -> torch.Tensor | None:
    """class_label: every sample of that class; else, for a conditional model, the classes in turn (a grid row
    per class); None for an unconditional one."""
    if cfg.get("class_label") is None:
        return class_labels(cfg.num_samples, num_classes)
    if not num_classes or not 0 <= int(cfg.class_label) < num_classes:
        raise DiffuseError(f"class_label={cfg.class_label} but the model has {num_classes} classes")
    return torch.full((cfg.num_samples,), int(cfg.class_label), dtype=torch.long)


def _run(cfg: DictConfig, run_dir: Path, device: torch.device, dist: DistInfo) -> dict:
    """The recipe: open the run, draw, decode to data, write samples.npz, grid.png, sample.png (and the
    animation with its step strip); ranks other than 0 only draw their share."""
    session = open_run(cfg, device, dist)
    num_classes, anim = session.num_classes, cfg.animation
    labels = sample_labels(cfg, num_classes)
    out, seconds = session.draw(cfg.num_samples, labels, trajectory=int(anim.frames) if anim.enabled else False,
                                desc=f"sample ({type(session.plan.sampler).__name__})")
    if not dist.is_main:
        return {}
    log.info("samples: %d × %d steps%s, %s, in %.1f s%s", len(out.x), session.plan.steps,
             guidance_note(session.plan.guidance_scale), session.precision, seconds,
             f" ({dist.world_size} processes)" if dist.enabled else "")
    x = session.decode(out.x.float()).clamp(-1, 1)  # the data range; an undertrained model can overshoot it
    run_dir.mkdir(parents=True, exist_ok=True)
    arrays = {"x": x.numpy().astype(np.float32)}
    if out.y is not None:
        arrays["y"] = out.y.numpy().astype(np.int64)
    paths = {"samples": run_dir / "samples.npz"}
    np.savez(paths["samples"], **arrays)
    per_class_rows = bool(num_classes) and cfg.get("class_label") is None
    nrow = len(x) // num_classes if per_class_rows else None
    class_names = list(session.run.state.get("class_names") or map(str, range(num_classes)))
    max_columns = int(cfg.get("grid_max_columns", media.GRID_MAX_COLUMNS) or 0) or None
    if per_class_rows:  # the score-SDE tutorial setup's classes figure: a labelled row per class
        paths["grid"] = media.save_class_grid(x, out.y, run_dir / "grid.png", class_names=class_names,
                                              view=cfg.view, max_columns=max_columns)
        if max_columns and nrow > max_columns:
            log.info("grid.png shows the first %d of %d samples per class (grid_max_columns=%d; all %d are in %s)",
                     max_columns, nrow, max_columns, len(x), paths["samples"].name)
    else:
        paths["grid"] = media.save_grid(x, run_dir / "grid.png", view=cfg.view, max_columns=max_columns)
    # the first sample alone at the data's own size (the Flowers UNet setup's generated_pixel_diffusion.png)
    paths["sample"] = media.save_sample_image(x, run_dir / "sample.png", view=cfg.view)
    if anim.enabled:
        frames = [session.decode(s) for s in out.states]
        paths["animation"] = media.save_animation(frames, run_dir / f"animation.{anim.format}",
                                                  nrow=nrow, fps=anim.fps, hold_last=anim.hold, view=cfg.view,
                                                  times=out.times, max_columns=max_columns,
                                                  row_labels=class_names[:num_classes] if per_class_rows else None)
        # the score-SDE tutorial setup's step strip: one sample per row (the first of each class) across the steps
        firsts = [int(i) for i in range(0, len(x), nrow)] if per_class_rows else [0]
        paths["steps"] = media.save_step_strip(frames, out.times, run_dir / "steps.png", index=firsts,
                                               steps=int(anim.strip_steps), view=cfg.view)
    report(*(f"{name}: {path}" for name, path in paths.items()))
    return {"checkpoint": str(session.run.path), "step": session.run.step, "nfe": out.nfe,
            **{k: str(v) for k, v in paths.items()}}

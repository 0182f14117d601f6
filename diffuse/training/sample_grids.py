"""trainer.sample_every's callback: grids of EMA samples while training, and the denoising animation at the end.

Every call writes samples/step_N.png (a row per class for conditional runs, at most `max_columns` wide),
logs it to the tracker, and updates samples/README.md + index.html (the Flowers UNet setup's table of grids by epoch, also
a W&B table). The last call (max_steps, or a spent time budget) adds samples/animation.gif, unless
`final_samples` is off (then the last call draws nothing) or `final_animation` is.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from torch import Tensor, nn

from diffuse import media
from diffuse.diffusion.generation import SamplingPlan, class_labels
from diffuse.diffusion.guidance import guidance_note

log = logging.getLogger(__name__)

ANIMATION_FRAMES, ANIMATION_FPS = 40, 10


class SampleGrids:
    """plan: how samples are drawn; num_images: per grid (conditional: rounded up to whole rows per class);
    class_names: the row labels ([] for unconditional runs); folder: where grids go; tracker: the run's;
    data: the training stream (its epoch labels each grid); decode: latents → data for latent runs."""

    def __init__(self, plan: SamplingPlan, num_images: int, class_names: Sequence[str], folder: Path, tracker,
                 data, max_columns: int | None = media.GRID_MAX_COLUMNS, final_samples: bool = True,
                 final_animation: bool = True, decode: Callable[[Tensor], Tensor] | None = None):
        self.plan, self.class_names, self.folder, self.tracker, self.data = plan, list(class_names), Path(folder), \
            tracker, data
        self.labels = class_labels(num_images, len(self.class_names))
        self.num_images = num_images if self.labels is None else len(self.labels)
        self.max_columns, self.final_samples, self.final_animation = max_columns, final_samples, final_animation
        self.decode = decode or (lambda x: x)

    def __call__(self, step: int, ema_model: nn.Module, last: bool = False) -> None:
        if last and not self.final_samples:
            return
        animate = last and self.final_animation
        out, seconds = self.plan.with_progress(ema_model, self.num_images, self.labels,
                                               trajectory=ANIMATION_FRAMES if animate else False,
                                               desc=f"step {step} samples", leave=False)
        per_class = len(out.x) // len(self.class_names) if self.class_names else None
        path = self.folder / f"step_{step}.png"
        if self.class_names:
            media.save_class_grid(self.decode(out.x), out.y, path, class_names=self.class_names,
                                  max_columns=self.max_columns)
        else:
            media.save_grid(self.decode(out.x), path, max_columns=self.max_columns)
        self.tracker.log_image("samples", path, step)
        capped = f" ({self.max_columns} of {per_class} per class shown)" \
            if per_class and self.max_columns and per_class > self.max_columns else ""
        log.info("step %d: samples: %d × %d steps%s in %.1f s → %s%s", step, self.num_images, self.plan.steps,
                 guidance_note(self.plan.guidance_scale), seconds, path, capped)
        rows = media.write_sample_index(self.folder, step, self.data.epoch + self.data.position
                                        / self.data.batches_per_epoch)
        self.tracker.log_table("sample_grids", ["step", "epoch", "grid"],
                               [[r["step"], r["epoch"], str(self.folder / r["file"])] for r in rows], step, ("grid",))
        if animate:
            anim = media.save_animation([self.decode(z) for z in out.states], self.folder / "animation.gif",
                                        nrow=per_class, fps=ANIMATION_FPS, times=out.times,
                                        row_labels=self.class_names or None, max_columns=self.max_columns)
            self.tracker.log_video("denoising", anim, step, fps=ANIMATION_FPS)
            log.info("animation → %s", anim)

"""Sample quality during training (`trainer.eval_every`): samples of the EMA model against fixed real images,
scored with `diffuse evaluate`'s metrics — our random-conv FD (offline, any dim) or Inception FID
(torch-fidelity; 2-D). The real images and the sample seeds are fixed for the run, so the number moves only
with the model; it is comparable only at the same `eval_num_samples` (logged with it).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from diffuse import fidelity, metrics
from diffuse.diffusion.generation import SamplingPlan, class_labels
from diffuse.errors import DiffuseError

METRICS = ("fd", "fid")


class SampleQuality:
    """reference: real images [n, C, *S] in [−1, 1] (data space); plan: how samples are drawn; decode:
    latents → data for latent runs; weights: the Inception weights file for fid (None: torch hub's cache).
    `__call__(model)` → {metric: value, "eval_samples": n}."""

    def __init__(self, metric: str, reference: Tensor, plan: SamplingPlan, num_classes: int,
                 decode: Callable[[Tensor], Tensor] | None = None, weights: str | None = None):
        if metric not in METRICS:
            raise DiffuseError(f"trainer.eval_metric must be one of {', '.join(METRICS)}; got {metric!r}")
        self.metric, self.reference, self.plan = metric, reference.float().cpu(), plan
        self.n = len(reference)
        self.weights = None
        if metric == "fid":  # before training starts: no weights must not cost a run
            fidelity.check_images(self.reference.shape[1:])
            self.weights = fidelity.find_weights(weights)
        self.labels = class_labels(self.n, num_classes)
        self.labels = None if self.labels is None else self.labels[:self.n]
        self.decode = decode or (lambda x: x)

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> dict:
        x = self.decode(self.plan(model, self.n, self.labels).x).float().cpu().clamp(-1, 1)
        if self.metric == "fd":
            net = metrics.RandomFeatures(dim=x.dim() - 2, channels=x.shape[1])
            value = metrics.frechet_distance(metrics.features(net, x), metrics.features(net, self.reference))
        else:
            value = fidelity.compute(x, self.reference, ("fid",), weights=self.weights,
                                     device=self.plan.device)["fid"]
        return {self.metric: float(value), "eval_samples": self.n}

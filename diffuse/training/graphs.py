"""The network's training forward and backward as CUDA graphs (trainer.cuda_graphs).

A small network at a small batch is bound by the host, not the GPU: the default UNet's step on an H100
launched 1157 kernels, 34 ms of host time for 8.3 ms of GPU work. torch.cuda.make_graphed_callables records
the forward's and the backward's kernels once, on the first step, and replays each with one launch after, on
the same buffers. The loss's few kernels, the fused optimizer and the EMA stay eager. Recording compiles
nothing (unlike torch.compile), so it costs about a second, not a minute.

Not with torch.compile, several processes (DDP) or gradient accumulation: the backward's gradients are the
graph's own buffers, which a second micro-batch would overwrite.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from diffuse.errors import DiffuseError

log = logging.getLogger(__name__)

CHOICES = (True, False, "auto")


def use_cuda_graphs(setting, device: torch.device, compiled: bool, processes: int, grad_accum_steps: int) -> bool:
    """auto: on a CUDA device when nothing above rules them out; true: the same, or an error saying why not."""
    if setting not in CHOICES:
        raise DiffuseError(f"trainer.cuda_graphs must be auto, true or false; got {setting!r}")
    if setting is False:
        return False
    blockers = [why for why, blocks in (
        ("a CUDA device", device.type != "cuda"), ("trainer.compile=false", compiled),
        ("one process (no DDP)", processes > 1), ("trainer.grad_accum_steps=1", grad_accum_steps > 1)) if blocks]
    if blockers and setting is True:
        raise DiffuseError(f"trainer.cuda_graphs=true needs {', '.join(blockers)}")
    return not blockers


class _Positional(nn.Module):
    """net(x, t, y) with tensors only (make_graphed_callables takes no None): (x, t) or (x, t, y)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: Tensor, t: Tensor, *y: Tensor) -> Tensor:
        return self.net(x, t, y[0] if y else None)


class GraphedNetwork:
    """Called as the network, net(x, t, y) → output, in training steps: records the graphs on the first call
    (under the caller's autocast, which must not cache casts), replays them after. Inputs of another shape,
    or a network that cannot be recorded (a warning says why), run eagerly."""

    def __init__(self, net: nn.Module):
        self.net = net
        self._graphed: nn.Module | None = None
        self._shapes: list[tuple] | None = None
        self._failed = False

    def __call__(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        args = (x, t) if y is None else (x, t, y)
        shapes = [(a.shape, a.dtype) for a in args]
        if self._failed or (self._shapes is not None and shapes != self._shapes):
            return self.net(x, t, y)
        if self._graphed is None:
            try:
                self._graphed = self._record(args)
            except Exception as e:  # noqa: BLE001 - any failure to record means: train eagerly, say so once
                self._failed = True
                log.warning("trainer.cuda_graphs: the network could not be recorded as a CUDA graph (%s: %s); "
                            "training goes on without", type(e).__name__, str(e).splitlines()[0] if str(e) else "")
                return self.net(x, t, y)
            self._shapes = shapes
        return self._graphed(*args)

    def _record(self, args: tuple[Tensor, ...]) -> nn.Module:
        """make_graphed_callables on copies of the first inputs (they become the graph's input buffers). Its
        warm-up runs draw from the default CUDA generator (dropout): its state is put back afterwards, so a
        run draws the same numbers whether it records at step 1 or, resumed, at step 1001."""
        device = args[0].device
        rng = torch.cuda.get_rng_state(device)
        sample = tuple(a.detach().clone() for a in args)
        graphed = torch.cuda.make_graphed_callables(_Positional(self.net), sample, allow_unused_input=True)
        torch.cuda.set_rng_state(rng, device)
        log.info("trainer.cuda_graphs: the network's forward and backward recorded as CUDA graphs")
        return graphed

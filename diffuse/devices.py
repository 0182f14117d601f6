"""Which torch device a `device` setting names (every job and the latent dataset use it)."""

from __future__ import annotations

import torch

from diffuse.errors import DiffuseError


def resolve_device(name: str) -> torch.device:
    """auto = cuda → mps → cpu; an explicit device that is missing is an error, not a silent fallback."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DiffuseError(f"device must be auto, cpu, cuda[:N] or mps; got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DiffuseError("device=cuda but no CUDA device is available (use device=auto or device=cpu)")
    return device

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


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 natively, so that autocast to it pays: a CUDA GPU that has it (Ampere and
    newer), or a CPU with AMX tiles (Intel Sapphire Rapids and newer, where oneDNN runs bf16 convolutions and
    matmuls on them). Other CPUs emulate bf16 and run it slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
    return False


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`tensor` on `device` without making the host wait for the device.

    A CPU → CUDA copy from ordinary (pageable) memory synchronises the host with the GPU's queue, so one per
    training step (a batch's indices, its flips) leaves the GPU idle while the host catches up. From pinned
    memory the copy is queued like any kernel; torch's pinned-memory cache keeps the buffer until it is done.
    """
    device = torch.device(device)
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)

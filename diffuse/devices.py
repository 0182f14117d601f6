"""Device policy in one place: which torch device a `device` setting names, the precision `auto` means on it
(`precision`, `trainer.precision`), and the weight layout (channels-last) that pays there."""

from __future__ import annotations

import torch
from torch import nn

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


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(name: str, device: torch.device, model: nn.Module | None = None) -> str:
    """The precision `name` means on `device`: fp32 | bf16 | fp16 as given; auto = bf16 where the device computes
    it natively (native_bf16: a CUDA GPU that has it, an AMX CPU; half the memory traffic, fp32's range, no loss
    scaling), except on a CPU for a model class that says `bf16_pays_on_cpu = False` (MSNAT); else fp32.
    Measurements: benchmarks/results/precision.md."""
    if name != "auto":
        return name
    if device.type == "cpu" and not getattr(model, "bf16_pays_on_cpu", True):
        return "fp32"
    return "bf16" if native_bf16(device) else "fp32"


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def use_channels_last(setting, model: nn.Module, device: torch.device, autocast_dtype=None) -> bool:
    """Whether to store a model's weights channels-last (NHWC), which only 2-D convolutions can use.

    auto: on the CPU in fp32 for models with 2-D convolutions and no 1-D/3-D ones (oneDNN's fp32 convolutions
    run NHWC natively); not under bf16 autocast, where NHWC is the slower layout; elsewhere off. true refuses a
    model with non-2-D convolutions. Measurements: benchmarks/results/precision.md.
    """
    convs = {type(m) for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)}
    planar = nn.Conv2d in convs and not convs - {nn.Conv2d, nn.ConvTranspose2d}
    if setting == "auto":
        return planar and device.type == "cpu" and autocast_dtype is None
    if setting is True and not planar:
        raise DiffuseError("trainer.channels_last=true needs a model with 2-D convolutions only (dim=2)")
    if isinstance(setting, bool):
        return setting
    raise DiffuseError(f"trainer.channels_last must be auto, true or false; got {setting!r}")

"""Inpainting masks in any dim: `True` = known (kept from the input), `False` = to fill in.

A mask is bool [B or 1, 1, *spatial] (one mask for all channels) and broadcasts against x [B, C, *spatial].
Named patterns (`named_mask`), each for the dims where it means something:

  left_half, right_half      that half of the last axis is filled in (1-D, 2-D, 3-D)
  top_half, bottom_half      that half of the first spatial axis is filled in (2-D, 3-D): bottom_half keeps
                             the top and completes the bottom
  center_box                 a centred box of half the size in every axis is filled in
  random_boxes               per item, `boxes` boxes of a quarter of each axis at random places are filled in
  every_other_segment        the axis cut into `segments` pieces, every other one filled in (1-D)
  octant                     the corner octant (the first half of every axis) is filled in (3-D)
  random                     per item, each position is filled in with probability 1/2

The name says what is *missing*.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from diffuse.errors import DiffuseError

PATTERNS = ("left_half", "right_half", "top_half", "bottom_half", "center_box", "random_boxes",
            "every_other_segment", "octant", "random")
DIMS = {"top_half": (2, 3), "bottom_half": (2, 3), "every_other_segment": (1,), "octant": (3,)}


def named_mask(name: str, spatial: Sequence[int], batch: int = 1, seed: int = 0, boxes: int = 3,
               segments: int = 8) -> Tensor:
    """The pattern `name` for items of spatial size `spatial`: bool [batch, 1, *spatial] (True = known).
    Random patterns draw item i from seed + i, so a mask does not depend on the batch it is made in."""
    spatial = tuple(int(s) for s in spatial)
    dim = len(spatial)
    if name not in PATTERNS:
        raise DiffuseError(f"mask must be a file or one of {', '.join(PATTERNS)}; got {name!r}")
    if dim not in DIMS.get(name, (1, 2, 3)):
        raise DiffuseError(f"mask {name} is for {'/'.join(f'{d}-D' for d in DIMS[name])} data; this run's is {dim}-D")
    missing = torch.zeros((batch, 1, *spatial), dtype=torch.bool)
    if name in ("left_half", "right_half"):
        half = spatial[-1] // 2
        sl = slice(0, half) if name == "left_half" else slice(half, None)
        missing[..., sl] = True
    elif name in ("top_half", "bottom_half"):
        half = spatial[0] // 2
        sl = slice(0, half) if name == "top_half" else slice(half, None)
        missing[:, :, sl] = True
    elif name == "center_box":
        missing[(slice(None), slice(None), *[slice(s // 4, s // 4 + max(1, s // 2)) for s in spatial])] = True
    elif name == "octant":
        missing[(slice(None), slice(None), *[slice(0, s // 2) for s in spatial])] = True
    elif name == "every_other_segment":
        length = max(1, spatial[0] // int(segments))
        for start in range(length, spatial[0], 2 * length):
            missing[..., start:start + length] = True
    else:
        for i in range(batch):
            g = torch.Generator().manual_seed(int(seed) + i)
            if name == "random":
                missing[i, 0] = torch.rand(spatial, generator=g) < 0.5
                continue
            for _ in range(int(boxes)):
                box = []
                for s in spatial:
                    size = max(1, s // 4)
                    start = int(torch.randint(0, s - size + 1, (1,), generator=g))
                    box.append(slice(start, start + size))
                missing[(i, 0, *box)] = True
    return ~missing


def load_mask(path, spatial: Sequence[int]) -> Tensor:
    """A mask from a file: .npy (bool or 0/1, [*spatial], [1, *spatial] or [N, 1, *spatial]) or an image
    (.png etc., 2-D: white = known, black = fill in). → bool [N or 1, 1, *spatial]."""
    import numpy as np
    from pathlib import Path

    path = Path(path).expanduser()
    if not path.is_file():
        raise DiffuseError(f"mask file {path} does not exist")
    spatial = tuple(int(s) for s in spatial)
    try:
        if path.suffix == ".npy":
            array = np.load(path, allow_pickle=False)
        else:
            from PIL import Image
            with Image.open(path) as img:
                array = np.asarray(img.convert("L")) >= 128
    except Exception as e:  # noqa: BLE001 - an unreadable or foreign file
        raise DiffuseError(f"cannot read the mask {path}: {' '.join(str(e).split())}") from None
    if array.dtype != bool:
        if not np.isin(array, (0, 1)).all():
            raise DiffuseError(f"mask {path}: values must be 0/1 or bool (1 = known); got others")
        array = array.astype(bool)
    mask = torch.from_numpy(array)
    if mask.dim() == len(spatial):
        mask = mask[None, None]
    elif mask.dim() == len(spatial) + 1:
        mask = mask[None]
    if mask.dim() != len(spatial) + 2 or tuple(mask.shape[2:]) != spatial or mask.shape[1] != 1:
        raise DiffuseError(f"mask {path} has shape {tuple(array.shape)}; the data's items are {list(spatial)} "
                           f"(a mask is [*spatial], [1, *spatial] or [N, 1, *spatial])")
    return mask


def to_grid(mask: Tensor, spatial: Sequence[int]) -> Tensor:
    """A data-space mask on a coarser (latent) grid of size `spatial`: a latent cell is known only where every
    data position it covers is known (so what is filled in covers all that is missing)."""
    spatial = tuple(int(s) for s in spatial)
    if tuple(mask.shape[2:]) == spatial:
        return mask
    factors = [m // s for m, s in zip(mask.shape[2:], spatial)]
    if any(f < 1 or f * s != m for f, s, m in zip(factors, spatial, mask.shape[2:])):
        raise DiffuseError(f"a mask of size {list(mask.shape[2:])} does not map onto the latent grid {list(spatial)}")
    pool = {1: torch.nn.functional.max_pool1d, 2: torch.nn.functional.max_pool2d,
            3: torch.nn.functional.max_pool3d}[len(spatial)]
    return ~pool((~mask).float(), kernel_size=factors).bool()

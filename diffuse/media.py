"""Pictures and animations of samples in 1-D (line plots), 2-D (image grids) and 3-D (central slices).

Everything goes through `render_grid(x, nrow) -> uint8 [H, W, 3]`, so grids, step strips and animation
frames look the same. x is [B, C, *spatial] in [−1, 1].
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import imageio.v2 as imageio
import numpy as np
import torch
from torch import Tensor
from torchvision.utils import make_grid


def _to_rgb_images(x: Tensor) -> Tensor:
    """[B, C, H, W] in [−1, 1] → [B, 3, H, W] in [0, 1] (grey replicated; >3 channels: first three)."""
    x = ((x.detach().float().cpu() + 1) / 2).clamp(0, 1)
    if x.shape[1] == 1:
        return x.expand(-1, 3, -1, -1)
    if x.shape[1] == 2:
        return torch.cat([x, x[:, :1]], 1)
    return x[:, :3]


def _slices_3d(x: Tensor) -> Tensor:
    """[B, C, D, H, W] → [B, C, S, 3S]: the three central orthogonal slices side by side (S = max size)."""
    d, h, w = x.shape[2:]
    s = max(d, h, w)
    planes = [x[:, :, d // 2], x[:, :, :, h // 2], x[:, :, :, :, w // 2]]
    planes = [torch.nn.functional.interpolate(p, size=(s, s), mode="nearest") for p in planes]
    sep = torch.full((*x.shape[:2], s, 1), -1.0)
    return torch.cat([planes[0], sep, planes[1], sep, planes[2]], dim=-1)


def _lines_1d(x: Tensor, nrow: int, height: int = 48) -> np.ndarray:
    """[B, C, L] → a grid of small line plots drawn directly into pixels (fast enough for animations)."""
    b, c, length = x.shape
    width = max(length, 64)
    cells = []
    colors = np.array([[31, 119, 180], [255, 127, 14], [44, 160, 44]], dtype=np.uint8)
    xs = np.linspace(0, width - 1, length)
    for i in range(b):
        cell = np.full((height, width, 3), 255, dtype=np.uint8)
        cell[height // 2, :] = 220  # zero line
        for ch in range(min(c, 3)):
            v = x[i, ch].detach().float().cpu().clamp(-1.2, 1.2).numpy()
            ys = (height - 1) * (1 - (v + 1.2) / 2.4)
            # draw segments by dense interpolation
            dense_x = np.linspace(0, width - 1, width * 4)
            dense_y = np.interp(dense_x, xs, ys)
            cell[np.round(dense_y).astype(int).clip(0, height - 1), np.round(dense_x).astype(int)] = colors[ch]
        cells.append(torch.from_numpy(cell).permute(2, 0, 1).float() / 255)
    grid = make_grid(torch.stack(cells), nrow=nrow, padding=2, pad_value=0.6)
    return (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def render_grid(x: Tensor, nrow: int | None = None) -> np.ndarray:
    """Samples → one uint8 RGB picture [H, W, 3]; nrow = samples per row (default ≈ √B)."""
    nrow = nrow or max(1, math.ceil(math.sqrt(x.shape[0])))
    dim = x.ndim - 2
    if dim == 1:
        return _lines_1d(x, nrow)
    if dim == 3:
        x = _slices_3d(x.detach().float().cpu())
    elif dim != 2:
        raise ValueError(f"cannot draw data with {dim} spatial dims")
    grid = make_grid(_to_rgb_images(x), nrow=nrow, padding=2, pad_value=0.5)
    return (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def _upscale(img: np.ndarray, min_size: int = 256) -> np.ndarray:
    """Nearest-neighbour upscale so small grids are visible (integer factor)."""
    k = max(1, math.ceil(min_size / max(img.shape[:2])))
    return img.repeat(k, 0).repeat(k, 1) if k > 1 else img


def save_grid(x: Tensor, path: str | Path, nrow: int | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    imageio.imwrite(path, _upscale(render_grid(x, nrow)))
    return path


def pick_frames(num_states: int, frames: int) -> list[int]:
    """Indices of `frames` states spread over a trajectory of num_states, always with first and last."""
    if frames >= num_states:
        return list(range(num_states))
    return sorted(set(np.linspace(0, num_states - 1, frames).round().astype(int).tolist()))


def save_animation(states: Sequence[Tensor], path: str | Path, nrow: int | None = None, fps: int = 10,
                   hold_last: float = 1.0) -> Path:
    """One frame per state (each [B, C, *spatial]); the final frame is held `hold_last` seconds.

    The format follows the suffix: .gif (imageio) or .mp4 (needs imageio-ffmpeg: `pip install diffuse[video]`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = [_upscale(render_grid(s, nrow)) for s in states]
    if path.suffix == ".gif":
        # GIF writers merge identical frames, so the hold is the last frame's own duration
        durations = [1000 / fps] * len(frames)
        durations[-1] += 1000 * hold_last
        imageio.mimsave(path, frames, duration=durations, loop=0)
    elif path.suffix == ".mp4":
        try:
            import imageio_ffmpeg  # noqa: F401
        except ImportError:
            raise RuntimeError("MP4 output needs imageio-ffmpeg: pip install 'diffuse[video]'") from None
        frames += [frames[-1]] * max(0, int(round(hold_last * fps)))  # video: constant frame rate
        even = [f[: f.shape[0] // 2 * 2, : f.shape[1] // 2 * 2] for f in frames]
        imageio.mimsave(path, even, fps=fps, macro_block_size=1)
    else:
        raise ValueError(f"animation format must be .gif or .mp4; got {path.suffix!r}")
    return path

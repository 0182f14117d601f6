"""Pictures and animations of samples: 1-D line plots, 2-D image grids, 3-D slices or projections.

Every sample becomes a *tile* (uint8 RGB): 2-D an image; 1-D a framed line plot (one line per channel,
zero and ±1 guides); 3-D its three central orthogonal slices, or its three maximum-intensity projections
(`view="mip"`), side by side. Tiles are laid out in a grid (`render_grid`), upscaled by a whole factor so
small data stays visible, and optionally labelled (rows: class names; columns: t; a caption). Grids, the
step strip, the classes grid and animation frames all go through that one path, so they look alike.

x is [B, C, *spatial] in [−1, 1]; states are a trajectory [K] × [B, C, *spatial], x_T first.
GIFs are written with imageio (Pillow); MP4 needs imageio-ffmpeg (`pip install "diffuse[video]"`).
"""

from __future__ import annotations

import html
import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

import imageio.v2 as imageio
import imageio.v3 as iio
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

VIEWS = ("slices", "mip")  # 3-D: central slices | maximum-intensity projections
MIN_SIZE = 256             # small grids are upscaled (nearest, whole factor) until their long side reaches this
MIN_TILE = 48              # … and until every tile is at least this tall
FONT_SIZE = 14
GRID_MAX_COLUMNS = 16      # the jobs' default cap on grid columns (`grid_max_columns`): wider grids wrap or subsample

_IMAGE_PAD, _IMAGE_PAD_COLOR = 2, (128, 128, 128)
_PLOT_PAD, _PLOT_PAD_COLOR = 3, (255, 255, 255)
_LINE_COLORS = np.array([[31, 119, 180], [255, 127, 14], [44, 160, 44]], dtype=np.uint8)  # channels 0, 1, 2
_FRAME, _ZERO_LINE, _UNIT_LINE = 90, 200, 232                                             # grey levels


# -- tiles: one uint8 [h, w, 3] picture per sample ---------------------------------------------------------
def _image_tiles(x: Tensor) -> np.ndarray:
    """[B, C, H, W] in [−1, 1] → uint8 [B, H, W, 3] (grey replicated; 2 channels: R, G, R; >3: first three)."""
    x = x.detach().float().cpu()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    elif x.shape[1] == 2:
        x = torch.cat([x, x[:, :1]], 1)
    else:
        x = x[:, :3]
    u8 = ((x + 1) * 127.5).round_().clamp_(0, 255).to(torch.uint8)
    return u8.permute(0, 2, 3, 1).numpy()


def _panels_3d(x: Tensor, view: str = "slices") -> Tensor:
    """[B, C, D, H, W] → [B, C, S, 3S + 2] (S = the largest side): three orthogonal views side by side,
    separated by a grey line. slices: the central plane across each axis; mip: the maximum along it."""
    if view not in VIEWS:
        raise ValueError(f"3-D view must be one of {', '.join(VIEWS)}; got {view!r}")
    x = x.detach().float().cpu()
    d, h, w = x.shape[2:]
    s = max(d, h, w)
    if view == "slices":
        planes = [x[:, :, d // 2], x[:, :, :, h // 2], x[:, :, :, :, w // 2]]
    else:
        planes = [x.amax(2), x.amax(3), x.amax(4)]
    planes = [p if p.shape[-2:] == (s, s) else torch.nn.functional.interpolate(p, size=(s, s), mode="nearest")
              for p in planes]
    sep = torch.zeros((*x.shape[:2], s, 1))  # mid grey: visible against both background and shape
    return torch.cat([planes[0], sep, planes[1], sep, planes[2]], dim=-1)


def _plot_size(length: int) -> tuple[int, int]:
    """Pixels of one 1-D plot (height, width): about one column per sample, within 96…256."""
    width = min(max(length, 96), 256)
    return max(48, width * 2 // 3), width


def _plot_tiles(x: Tensor, value_range: float = 1.25) -> np.ndarray:
    """[B, C, L] → uint8 [B, h, w, 3]: framed line plots (y from −1.25 to 1.25), one colour per channel.

    Rasterised directly (no matplotlib), vectorised over the batch: each pixel column is filled between
    the lowest and highest point of the polyline inside it, so steep and dense curves stay connected.
    """
    x = x.detach().float().cpu()[:, :3]
    b, c, length = x.shape
    h, w = _plot_size(length)
    # value → row (float pixels), inside the frame
    rows = 1 + (h - 3) * (1 - (x.clamp(-value_range, value_range) + value_range) / (2 * value_range))
    scale = (length - 1) / max(w - 1, 1)
    edges = ((torch.arange(w + 1) - 0.5) * scale).clamp(0, length - 1)  # column edges in sample units
    i0 = edges.floor().long().clamp(max=length - 1)
    i1 = (i0 + 1).clamp(max=length - 1)
    frac = edges - i0
    at_edges = rows[..., i0] * (1 - frac) + rows[..., i1] * frac      # [B, C, w + 1]
    lo = torch.minimum(at_edges[..., :-1], at_edges[..., 1:])
    hi = torch.maximum(at_edges[..., :-1], at_edges[..., 1:])
    if length > 1:  # samples strictly inside a column (several per column when length > w)
        col = (torch.arange(length) / scale).round().long().clamp(0, w - 1).expand(b, c, -1)
        lo = lo.scatter_reduce(-1, col, rows, "amin")
        hi = hi.scatter_reduce(-1, col, rows, "amax")
    r = torch.arange(h).view(1, 1, h, 1).float()
    ink = (r >= lo.unsqueeze(2) - 0.75) & (r <= hi.unsqueeze(2) + 0.75)  # [B, C, h, w], ~2 px thick
    canvas = np.full((b, h, w, 3), 255, dtype=np.uint8)
    for level, value in ((_UNIT_LINE, 1.0), (_UNIT_LINE, -1.0), (_ZERO_LINE, 0.0)):
        canvas[:, round(1 + (h - 3) * (1 - (value + value_range) / (2 * value_range))), 1:-1] = level
    ink = ink.numpy()
    for ch in range(c):
        canvas[ink[:, ch]] = _LINE_COLORS[ch]
    canvas[:, [0, -1], :] = _FRAME
    canvas[:, :, [0, -1]] = _FRAME
    return canvas


def _tiles(x: Tensor, view: str = "slices") -> tuple[np.ndarray, int, tuple[int, int, int]]:
    """Samples → (uint8 tiles [B, h, w, 3], grid padding, padding colour)."""
    dim = x.ndim - 2
    if dim == 1:
        return _plot_tiles(x), _PLOT_PAD, _PLOT_PAD_COLOR
    if dim == 2:
        return _image_tiles(x), _IMAGE_PAD, _IMAGE_PAD_COLOR
    if dim == 3:
        return _image_tiles(_panels_3d(x, view)), _IMAGE_PAD, _IMAGE_PAD_COLOR
    raise ValueError(f"cannot draw data with {dim} spatial dims (x must be [B, C, *spatial], 1–3 spatial dims)")


def _tile_grid(tiles: np.ndarray, nrow: int, pad: int, pad_color, blank: Sequence[int] = ()) -> np.ndarray:
    """uint8 [B, h, w, 3] → [rows·(h+pad)+pad, nrow·(w+pad)+pad, 3] (as torchvision's make_grid lays out);
    tiles listed in `blank` are left as background."""
    b, h, w, _ = tiles.shape
    ncol = min(nrow, b)
    nrows = math.ceil(b / nrow)
    out = np.empty((nrows * (h + pad) + pad, ncol * (w + pad) + pad, 3), dtype=np.uint8)
    out[:] = pad_color
    skip = set(blank)
    for i in range(b):
        if i not in skip:
            r, c = divmod(i, nrow)
            out[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = tiles[i]
    return out


def render_grid(x: Tensor, nrow: int | None = None, view: str = "slices") -> np.ndarray:
    """Samples [B, C, *spatial] → one uint8 RGB picture [H, W, 3]; nrow = samples per row (default ≈ √B).
    Not upscaled: see `render_frame` for the upscaled, labelled picture that files get."""
    nrow = nrow or max(1, math.ceil(math.sqrt(x.shape[0])))
    tiles, pad, color = _tiles(x, view)
    return _tile_grid(tiles, nrow, pad, color)


# -- upscaling and labels ----------------------------------------------------------------------------------
def _scale_factor(grid_shape: Sequence[int], tile_h: int, min_size: int = MIN_SIZE) -> int:
    """The whole factor that brings the grid's long side to min_size and each tile to MIN_TILE rows."""
    return max(1, math.ceil(min_size / max(grid_shape[0], grid_shape[1])), math.ceil(MIN_TILE / tile_h))


def _font(size: int = FONT_SIZE):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: the small bitmap font
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


class _Layout:
    """Where tile rows and columns land in the upscaled picture, and the label margins around it.

    Built once per figure (or animation), so labelling every frame costs a paste and a few text draws.
    """

    def __init__(self, grid_shape, tile_shape, pad: int, row_labels=None, col_labels=None, caption: bool = False,
                 min_size: int = MIN_SIZE):
        self.font = _font()
        probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        line_h = _text_size(probe, "Mg=0.9", self.font)[1]
        gap = 6
        self.row_labels = [str(s) for s in row_labels] if row_labels else []
        self.col_labels = [str(s) for s in col_labels] if col_labels else []
        k = _scale_factor(grid_shape, tile_shape[0], min_size)
        if self.col_labels:  # wide enough that column labels do not run into each other
            widest = max(_text_size(probe, s, self.font)[0] for s in self.col_labels)
            k = max(k, math.ceil((widest + gap) / (tile_shape[1] + pad)))
        if self.row_labels:
            k = max(k, math.ceil(line_h / tile_shape[0]))
        self.k = k
        self.tile_h, self.tile_w, self.pad = tile_shape[0] * k, tile_shape[1] * k, pad * k
        self.left = (max(_text_size(probe, s, self.font)[0] for s in self.row_labels) + 2 * gap
                     if self.row_labels else 0)
        self.caption_h = line_h + 2 * gap if caption else 0
        self.cols_h = line_h + 2 * gap if self.col_labels else 0
        self.top = self.caption_h + self.cols_h
        self.height = grid_shape[0] * self.k + self.top
        self.width = grid_shape[1] * self.k + self.left
        self.background = None
        if self.left or self.top:
            bg = Image.new("RGB", (self.width, self.height), (255, 255, 255))
            draw = ImageDraw.Draw(bg)
            for i, label in enumerate(self.row_labels):
                y = self.top + self.pad + i * (self.tile_h + self.pad) + self.tile_h // 2
                draw.text((self.left - gap, y), label, fill=(0, 0, 0), font=self.font, anchor="rm")
            for j, label in enumerate(self.col_labels):
                x = self.left + self.pad + j * (self.tile_w + self.pad) + self.tile_w // 2
                draw.text((x, self.caption_h + self.cols_h // 2), label, fill=(0, 0, 0), font=self.font,
                          anchor="mm")
            self.background = np.asarray(bg).copy()

    def frame(self, grid: np.ndarray, caption: str | None = None) -> np.ndarray:
        big = _upscale_by(grid, self.k)
        if self.background is None:
            return big
        out = self.background.copy()
        out[self.top:, self.left:] = big
        if caption and self.caption_h:
            img = Image.fromarray(out)
            ImageDraw.Draw(img).text((self.width // 2, self.caption_h // 2), caption, fill=(0, 0, 0),
                                     font=self.font, anchor="mm")
            out = np.asarray(img)
        return out


def _upscale_by(img: np.ndarray, k: int) -> np.ndarray:
    return img.repeat(k, 0).repeat(k, 1) if k > 1 else img


def render_frame(x: Tensor, nrow: int | None = None, view: str = "slices", row_labels=None, col_labels=None,
                 caption: str | None = None, min_size: int = MIN_SIZE) -> np.ndarray:
    """The picture a file gets: render_grid upscaled (nearest, by a whole factor k: the long side to
    ≥ min_size, tiles to ≥ MIN_TILE rows, column labels not overlapping), with optional row labels (left),
    column labels (top) and a caption line (above them). uint8 [H, W, 3]."""
    nrow = nrow or max(1, math.ceil(math.sqrt(x.shape[0])))
    tiles, pad, color = _tiles(x, view)
    grid = _tile_grid(tiles, nrow, pad, color)
    layout = _Layout(grid.shape, tiles.shape[1:3], pad, row_labels, col_labels, caption is not None, min_size)
    return layout.frame(grid, caption)


def _write_image(img: np.ndarray, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    imageio.imwrite(path, img)
    return path


# -- figures -----------------------------------------------------------------------------------------------
def _capped(nrow: int | None, n: int, max_columns: int | None) -> int:
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    return min(nrow, max_columns) if max_columns else nrow


def first_columns(n: int, nrow: int, max_columns: int | None) -> tuple[list[int], int]:
    """For n items laid out nrow to a row (a class per row): the indices of the first max_columns items of
    every row, and the new row length. All indices (and nrow) when the rows are short enough."""
    keep = min(nrow, max_columns) if max_columns else nrow
    return [r * nrow + j for r in range(math.ceil(n / nrow)) for j in range(keep) if r * nrow + j < n], keep


def save_grid(x: Tensor, path: str | Path, nrow: int | None = None, view: str = "slices",
              row_labels: Sequence[str] | None = None, max_columns: int | None = None) -> Path:
    """A grid of samples [B, C, *spatial] as a PNG; nrow samples per row (default ≈ √B), at most
    max_columns (more wrap onto further rows) so that a big sample count stays readable."""
    return _write_image(render_frame(x, _capped(nrow, x.shape[0], max_columns), view, row_labels=row_labels), path)


def save_class_grid(x: Tensor, y: Tensor, path: str | Path, class_names: Sequence[str] | None = None,
                    per_class: int | None = None, view: str = "slices", labels: bool = True,
                    max_columns: int | None = None) -> Path:
    """The score-SDE tutorial setup's classes grid: a row per class present in y (increasing), up to per_class
    samples each (default: the most any class has, at most max_columns: the first ones; shorter rows end
    in background), labelled with class_names[c] (or the class index) on the left when `labels`.
    x: [N, C, *spatial], y: [N] int."""
    y = torch.as_tensor(y).cpu().long()
    classes = torch.unique(y).tolist()
    groups = [torch.nonzero(y == c).flatten() for c in classes]
    per_class = per_class or max(len(g) for g in groups)
    if max_columns:
        per_class = min(per_class, max_columns)
    order, blank = [], []
    for g in groups:
        take = g[:per_class].tolist()
        blank += range(len(order) + len(take), len(order) + per_class)
        order += take + [take[0]] * (per_class - len(take))  # placeholders, left blank below
    tiles, pad, color = _tiles(x[torch.tensor(order)], view)
    grid = _tile_grid(tiles, per_class, pad, color, blank=blank)
    names = None
    if labels:
        names = [class_names[c] if class_names is not None and c < len(class_names) else str(c) for c in classes]
    layout = _Layout(grid.shape, tiles.shape[1:3], pad, row_labels=names)
    return _write_image(layout.frame(grid), path)


def save_step_strip(states: Sequence[Tensor], times: Sequence[float | str] | None, path: str | Path,
                    index: int | Sequence[int] = 0, steps: int = 8, view: str = "slices",
                    labels: bool = True) -> Path:
    """The score-SDE tutorial setup's step strip: one sample's denoising in a row, x_T on the left, the sample on
    the right, at `steps` states spread over the trajectory (first and last included), each column
    labelled t=… when times are given (or with the strings given, e.g. "50 steps": then a state may as
    well be the result of one sampler run per step count). states: [K] × [B, C, *spatial]; times: [K]
    floats or strings; index: the sample (an int) or several samples (a list: one row each)."""
    rows = [index] if isinstance(index, int) else list(index)
    picked = pick_frames(len(states), steps)
    x = torch.stack([states[k][i].detach().float().cpu() for i in rows for k in picked])
    tiles, pad, color = _tiles(x, view)
    grid = _tile_grid(tiles, len(picked), pad, color)
    cols = None
    if labels and times is not None:
        cols = [times[k] if isinstance(times[k], str) else f"t={float(times[k]):.2f}" for k in picked]
    layout = _Layout(grid.shape, tiles.shape[1:3], pad, col_labels=cols)
    return _write_image(layout.frame(grid), path)


# -- animations --------------------------------------------------------------------------------------------
def pick_frames(num_states: int, frames: int) -> list[int]:
    """Indices of `frames` states spread over a trajectory of num_states, always with first and last."""
    if frames >= num_states:
        return list(range(num_states))
    return sorted(set(np.linspace(0, num_states - 1, max(frames, 2)).round().astype(int).tolist()))


def render_frames(states: Sequence[Tensor], nrow: int | None = None, view: str = "slices",
                  times: Sequence[float] | None = None, row_labels: Sequence[str] | None = None,
                  min_size: int = MIN_SIZE) -> list[np.ndarray]:
    """One uint8 [H, W, 3] frame per state, all the same size (a caption `t = …` when times are given)."""
    nrow = nrow or max(1, math.ceil(math.sqrt(states[0].shape[0])))
    layout, frames = None, []
    for k, s in enumerate(states):
        tiles, pad, color = _tiles(s, view)
        grid = _tile_grid(tiles, nrow, pad, color)
        if layout is None:
            layout = _Layout(grid.shape, tiles.shape[1:3], pad, row_labels=row_labels,
                             caption=times is not None, min_size=min_size)
        frames.append(layout.frame(grid, f"t = {float(times[k]):.3f}" if times is not None else None))
    return frames


def save_animation(states: Sequence[Tensor], path: str | Path, nrow: int | None = None, fps: int = 10,
                   hold_last: float = 1.0, view: str = "slices", times: Sequence[float] | None = None,
                   row_labels: Sequence[str] | None = None, max_columns: int | None = None) -> Path:
    """One frame per state (each [B, C, *spatial]), the last one held `hold_last` seconds; rows of nrow
    samples (default ≈ √B) cut to their first max_columns (a class per row keeps its row).

    The format follows the suffix: .gif (imageio/Pillow; the hold is the last frame's duration, since GIF
    merges repeated frames anyway) or .mp4 (imageio-ffmpeg, H.264 at a constant fps: the last frame is
    repeated round(hold_last·fps) times; odd sides are padded by one background pixel).
    """
    path = Path(path)
    if path.suffix not in (".gif", ".mp4"):
        raise ValueError(f"animation format must be .gif or .mp4; got {path.suffix!r}")
    if path.suffix == ".mp4":
        try:
            import imageio_ffmpeg  # noqa: F401
        except ImportError:
            raise RuntimeError("MP4 output needs imageio-ffmpeg: pip install 'diffuse[video]'") from None
    if not states:
        raise ValueError("no states to animate")
    if max_columns and nrow and nrow > max_columns:  # rows are meaningful (a class each): keep their first ones
        keep, nrow = first_columns(states[0].shape[0], nrow, max_columns)
        states = [s[keep] for s in states]
    frames = render_frames(states, _capped(nrow, states[0].shape[0], max_columns), view, times, row_labels)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gif":
        step_ms = 1000 / fps
        durations = [step_ms] * len(frames)
        durations[-1] += 1000 * max(0.0, hold_last)
        grey = all(np.array_equal(f[..., 0], f[..., 1]) and np.array_equal(f[..., 0], f[..., 2]) for f in frames)
        stack = np.stack([f[..., 0] for f in frames] if grey else frames)  # grey: exact 8-bit, faster to encode
        iio.imwrite(path, stack, extension=".gif", duration=durations, loop=0)
    else:
        frames += [frames[-1]] * max(0, round(hold_last * fps))
        h, w = frames[0].shape[:2]
        if h % 2 or w % 2:  # H.264 with yuv420p needs even sides
            frames = [np.pad(f, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge") for f in frames]
        imageio.mimsave(path, frames, format="FFMPEG", fps=fps, macro_block_size=2, quality=8)
    return path



# -- one sample at full size, and the table of training-time grids ------------------------------------------
MIN_SINGLE = 64  # a single 2-D sample smaller than this (side) is upscaled (nearest, whole factor) to reach it


def save_sample_image(x: Tensor, path: str | Path, index: int = 0, view: str = "slices",
                      min_side: int = MIN_SINGLE) -> Path:
    """Sample `index` of x [N, C, *spatial] alone, as a PNG (the Flowers UNet setup's generated_pixel_diffusion.png).
    2-D: the data's own pixels (64² flowers stay 64², no frame), upscaled by a whole factor, nearest, only
    when the shorter side is under `min_side` (a 28² digit becomes 84²) so that it stays visible. 1-D and 3-D
    have no pixels of their own: the line plot or the three views (`view`) of the grids, one tile."""
    one = x[index:index + 1].detach().float().cpu()
    if one.ndim - 2 != 2:
        return _write_image(render_frame(one, 1, view), path)
    img = _image_tiles(one)[0]
    k = max(1, math.ceil(min_side / min(img.shape[:2])))
    return _write_image(_upscale_by(img, k), path)


def _fmt_epoch(epoch) -> str:
    return "" if epoch is None else f"{round(float(epoch), 2):g}"


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_sample_index(folder: str | Path, step: int | None = None, epoch: float | None = None) -> list[dict]:
    """The table of a run's training-time grids (the Flowers UNet setup's README table, epoch 30 … 270): records
    that `step_{step}.png` was drawn at `epoch` (epochs of data seen, e.g. 30 or 2.5) and rewrites, in
    `folder` (the run's samples/), `index.json` (the records: the table survives a resume), `README.md` (a
    markdown table) and `index.html` (open in a browser), listing every step_N.png there in step order.
    Grids without a record (older runs) are listed without an epoch. Returns the rows
    [{"step", "epoch", "file"}]."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    records: dict[int, float | None] = {}
    try:
        for row in json.loads((folder / "index.json").read_text()):
            records[int(row["step"])] = row.get("epoch")
    except (OSError, ValueError, TypeError, KeyError):
        pass  # none yet, or unreadable: rebuilt from the files
    if step is not None:
        records[int(step)] = None if epoch is None else round(float(epoch), 4)
    grids = {int(m.group(1)): p.name for p in folder.glob("step_*.png")
             if (m := re.fullmatch(r"step_(\d+)\.png", p.name))}
    rows = [{"step": s, "epoch": records.get(s), "file": name} for s, name in sorted(grids.items())]
    _write_text(folder / "index.json", json.dumps(rows, indent=1) + "\n")
    md = ["# Samples during training", "", "| step | epoch | samples (EMA) |", "|---:|---:|---|"]
    md += [f"| {r['step']} | {_fmt_epoch(r['epoch'])} | ![step {r['step']}]({r['file']}) |" for r in rows]
    _write_text(folder / "README.md", "\n".join(md) + "\n")
    cells = "\n".join(
        f"<tr><td>{r['step']}</td><td>{_fmt_epoch(r['epoch'])}</td>"
        f"<td><img src=\"{html.escape(r['file'])}\" alt=\"step {r['step']}\"></td></tr>" for r in rows)
    _write_text(folder / "index.html", (
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>Samples during training</title>\n"
        "<style>body{font-family:sans-serif} td{padding:4px 12px;text-align:right;vertical-align:middle}"
        " img{image-rendering:pixelated;max-width:90vw}</style></head>\n<body><h1>Samples during training</h1>\n"
        f"<table>\n<tr><th>step</th><th>epoch</th><th>samples (EMA)</th></tr>\n{cells}\n</table>\n</body></html>\n"))
    return rows

"""Pictures and animations: sizes, tile placement and pixel values, 3-D views, frame counts and the held
last frame, grids wrapped and animation rows cut at max_columns, read back from the written files."""

from __future__ import annotations

import math

import imageio.v2 as imageio
import imageio.v3 as iio
import numpy as np
import pytest
import torch
from PIL import Image

from diffuse import media
from diffuse.diffusion.generation import class_labels

PAD, PAD_COLOR, PLOT_PAD = 2, 128, 3  # grid padding of images / plots, as media lays them out


def _u8(v: float) -> int:
    return round((v + 1) * 127.5)


def _scale(grid_h: int, grid_w: int, tile_h: int) -> int:
    """Whole upscale factor: long side to ≥ 256 px and tiles to ≥ 48 rows."""
    return max(1, math.ceil(256 / max(grid_h, grid_w)), math.ceil(48 / tile_h))


def _samples(dim: int, b: int, size: int = 8, channels: int = 1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, channels, *([size] * dim), generator=g) * 2 - 1


def _expected_size(dim: int, b: int, nrow: int, size: int) -> tuple[int, int]:
    """The file's pixel size, from the layout rules: tiles of (h, w), padding, whole-factor upscale."""
    if dim == 1:
        w = min(max(size, 96), 256)
        h, pad = max(48, w * 2 // 3), PLOT_PAD
    elif dim == 2:
        h, w, pad = size, size, PAD
    else:
        h, w, pad = size, 3 * size + 2, PAD  # three views and two 1-px separators
    rows = math.ceil(b / nrow)
    gh, gw = rows * (h + pad) + pad, min(nrow, b) * (w + pad) + pad
    k = _scale(gh, gw, h)
    return gh * k, gw * k


def _read_gif(path):
    frames = iio.imread(path, index=None)
    with Image.open(path) as im:
        durations = []
        for i in range(im.n_frames):
            im.seek(i)
            durations.append(im.info["duration"])
    return frames, durations


# -- grids -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dim, b, nrow, size", [(1, 4, 2, 40), (1, 5, 3, 600), (2, 6, 3, 16), (2, 3, 8, 28),
                                                (3, 2, 2, 8), (3, 5, 2, 12)])
def test_grid_file_size(tmp_path, dim, b, nrow, size):
    path = media.save_grid(_samples(dim, b, size), tmp_path / "grid.png", nrow=nrow)
    img = iio.imread(path)
    assert img.shape[:2] == _expected_size(dim, b, nrow, size) and img.dtype == np.uint8


def test_2d_grid_places_each_sample_exactly():
    x = _samples(2, 5, size=6, channels=1)
    grid = media.render_grid(x, nrow=3)
    assert grid.shape == (2 * 8 + 2, 3 * 8 + 2, 3)
    for i in range(5):
        r, c = divmod(i, 3)
        tile = grid[PAD + r * 8: PAD + r * 8 + 6, PAD + c * 8: PAD + c * 8 + 6]
        expected = ((x[i, 0] + 1) * 127.5).round().numpy().astype(np.uint8)
        for ch in range(3):  # grey replicated
            assert np.array_equal(tile[..., ch], expected)
    assert (grid[PAD + 8: PAD + 14, PAD + 16: PAD + 22] == PAD_COLOR).all()  # the empty sixth slot
    rgb = media.render_grid(_samples(2, 1, size=4, channels=3), nrow=1)
    assert not np.array_equal(rgb[..., 0], rgb[..., 1])


def test_3d_slices_and_projections():
    """A bright voxel off centre is in every maximum-intensity projection and in no central slice; one at
    the centre is in all three slices."""
    n = 8
    x = torch.full((1, 1, n, n, n), -1.0)
    x[0, 0, 2, 5, 6] = 1.0

    def panels(img):  # the three S×S views of the single tile
        return [img[PAD:PAD + n, PAD + j * (n + 1): PAD + j * (n + 1) + n, 0] for j in range(3)]

    mip = panels(media.render_grid(x, nrow=1, view="mip"))
    for panel, (r, c) in zip(mip, [(5, 6), (2, 6), (2, 5)]):  # max over D, over H, over W
        assert panel[r, c] == 255 and (panel == 255).sum() == 1 and (panel == 0).sum() == n * n - 1
    assert all((p == 0).all() for p in panels(media.render_grid(x, nrow=1, view="slices")))
    x[0, 0, n // 2, n // 2, n // 2] = 1.0
    for p in panels(media.render_grid(x, nrow=1, view="slices")):
        assert p[n // 2, n // 2] == 255 and (p == 255).sum() == 1
    img = media.render_grid(x, nrow=1)
    assert (img[PAD:PAD + n, PAD + n] == PAD_COLOR).all()  # grey separator between the views
    with pytest.raises(ValueError, match="slices, mip"):
        media.render_grid(x, view="volume")


def test_1d_plot_lines_and_frame():
    """Channel 0 constant 0.5 and channel 1 constant −0.5 land on their rows in their colours; the plot has a
    frame; a sawtooth denser than the pixel columns stays connected from +1 to −1 in every column."""
    length = 50
    h, w = 64, 96
    x = torch.stack([torch.full((length,), 0.5), torch.full((length,), -0.5)])[None]
    img = media.render_grid(x, nrow=1)
    assert img.shape == (h + 2 * PLOT_PAD, w + 2 * PLOT_PAD, 3)
    tile = img[PLOT_PAD:PLOT_PAD + h, PLOT_PAD:PLOT_PAD + w]

    def row(v):
        return 1 + (h - 3) * (1 - (v + 1.25) / 2.5)

    blue, orange = (31, 119, 180), (255, 127, 14)
    for v, color in ((0.5, blue), (-0.5, orange)):
        ink = [r for r in range(h) if tuple(tile[r, w // 2]) == color]
        assert ink and all(abs(r - row(v)) <= 1 for r in ink)
    assert (tile[0] == 90).all() and (tile[-1] == 90).all() and (tile[:, 0] == 90).all() and (tile[:, -1] == 90).all()

    saw = torch.tensor([1.0, -1.0] * 500)[None, None]  # 1000 samples on 256 columns
    tile = media.render_grid(saw, nrow=1)[PLOT_PAD:-PLOT_PAD, PLOT_PAD:-PLOT_PAD]
    hh = tile.shape[0]
    top, bottom = 1 + (hh - 3) * (1 - 2.25 / 2.5), 1 + (hh - 3) * (1 - 0.25 / 2.5)
    for col in (10, 100, 200):
        assert all(tuple(tile[r, col]) == blue for r in range(math.ceil(top), math.floor(bottom) + 1))


# -- the conditional setup's two figures --------------------------------------------------------------------
def test_class_grid_rows_per_class(tmp_path):
    values = [-0.8, -0.4, 0.0, 0.4, 0.8]
    x = torch.tensor(values).view(5, 1, 1, 1).expand(5, 1, 16, 16).clone()
    y = torch.tensor([2, 0, 2, 1, 0])
    plain = iio.imread(media.save_class_grid(x, y, tmp_path / "plain.png", labels=False))
    gh, gw = 3 * 18 + 2, 2 * 18 + 2
    k = _scale(gh, gw, 16)
    assert plain.shape[:2] == (gh * k, gw * k)
    expected_rows = [[1, 4], [3, None], [0, 2]]  # classes 0, 1, 2; class 1 has one sample, then background
    for r, samples in enumerate(expected_rows):
        for c, i in enumerate(samples):
            cy, cx = (PAD + r * 18 + 8) * k, (PAD + c * 18 + 8) * k
            assert plain[cy, cx, 0] == (PAD_COLOR if i is None else _u8(values[i]))
    named = iio.imread(media.save_class_grid(x, y, tmp_path / "named.png", class_names=["zero", "one", "two"]))
    assert named.shape[0] == plain.shape[0] and named.shape[1] > plain.shape[1]  # a label column on the left
    assert np.array_equal(named[:, -plain.shape[1]:], plain)
    assert (named[:, : named.shape[1] - plain.shape[1]] < 128).any()  # some text was drawn
    two = iio.imread(media.save_class_grid(x, y, tmp_path / "two.png", per_class=1, labels=False))
    assert two.shape[1] < plain.shape[1]


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_step_strip(tmp_path, dim):
    """One sample's states at evenly picked steps, left (x_T) to right (x_0); one row per index."""
    k_states, size = 10, 16
    levels = torch.linspace(-1, 1, k_states)
    states = [torch.stack([torch.full((1, *[size] * dim), float(v)), torch.full((1, *[size] * dim), -float(v))])
              for v in levels]
    times = torch.linspace(1, 0, k_states).tolist()
    picked = media.pick_frames(k_states, 4)
    assert picked == [0, 3, 6, 9]
    plain = iio.imread(media.save_step_strip(states, times, tmp_path / "a.png", index=[0, 1], steps=4, labels=False))
    assert plain.shape[:2] == _expected_size(dim, 8, 4, size)
    if dim == 2:
        k = plain.shape[0] // (2 * 18 + 2)
        for r, sign in enumerate((1, -1)):
            for c, s in enumerate(picked):
                assert plain[(PAD + r * 18 + 8) * k, (PAD + c * 18 + 8) * k, 0] == _u8(sign * float(levels[s]))
    labelled = iio.imread(media.save_step_strip(states, times, tmp_path / "b.png", index=0, steps=4))
    one_row = iio.imread(media.save_step_strip(states, times, tmp_path / "c.png", index=0, steps=4, labels=False))
    assert labelled.shape[0] > one_row.shape[0]  # a row of t=… labels on top
    if labelled.shape[1] == one_row.shape[1]:
        assert np.array_equal(labelled[-one_row.shape[0]:], one_row)
    # the conditional setup's variant: one sampler run per step count, labelled with the counts
    runs = [states[k] for k in picked]
    named = iio.imread(media.save_step_strip(runs, ["10 steps", "50", "250", "1000 steps"], tmp_path / "d.png"))
    assert named.shape[0] > one_row.shape[0] and named.shape[1] >= one_row.shape[1]


# -- animations --------------------------------------------------------------------------------------------
def _trajectory(dim: int, k: int = 6, b: int = 4, size: int = 8):
    noise, data = _samples(dim, b, size, seed=1), _samples(dim, b, size, seed=2).sign()
    ts = torch.linspace(1, 0, k)
    return [t * noise + (1 - t) * data for t in ts], ts.tolist()


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_gif_frames_sizes_and_held_last_frame(tmp_path, dim):
    states, times = _trajectory(dim)
    path = media.save_animation(states, tmp_path / "a.gif", nrow=2, fps=10, hold_last=1.0)
    frames, durations = _read_gif(path)
    assert len(frames) == len(states)
    assert frames.shape[1:3] == _expected_size(dim, 4, 2, 8)
    assert durations == [100] * (len(states) - 1) + [1100]  # the last frame held 1 s more
    last = media.render_frame(states[-1], nrow=2)
    got = frames[-1] if frames.ndim == 4 else np.repeat(frames[-1][..., None], 3, -1)
    assert np.array_equal(got[..., :3], last)  # few colours / grey: GIF keeps them exactly
    captioned, _ = _read_gif(media.save_animation(states, tmp_path / "b.gif", nrow=2, times=times))
    assert len(captioned) == len(states) and captioned.shape[1] > frames.shape[1]  # a "t = …" line on top
    assert captioned.shape[2] == frames.shape[2]


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_mp4_frames_sizes_and_held_last_frame(tmp_path, dim):
    pytest.importorskip("imageio_ffmpeg")
    states, _ = _trajectory(dim)
    path = media.save_animation(states, tmp_path / "a.mp4", nrow=2, fps=10, hold_last=1.0)
    with imageio.get_reader(path, format="FFMPEG") as reader:
        frames = np.stack([f for f in reader.iter_data()]).astype(np.float32)
    held = 10  # round(hold_last · fps)
    assert len(frames) == len(states) + held
    h, w = _expected_size(dim, 4, 2, 8)
    assert frames.shape[1:3] == (h + h % 2, w + w % 2)  # even sides for H.264
    assert np.abs(frames[-1] - frames[len(states) - 1]).mean() < 2  # the held copies of the last state
    assert np.abs(frames[0] - frames[-1]).mean() > 10               # and the animation does move


def test_animation_rejects_unknown_format(tmp_path):
    states, _ = _trajectory(2)
    with pytest.raises(ValueError, match=".gif or .mp4"):
        media.save_animation(states, tmp_path / "a.avi")


def test_pick_frames():
    assert media.pick_frames(1000, 40)[0] == 0 and media.pick_frames(1000, 40)[-1] == 999
    assert len(media.pick_frames(1000, 40)) == 40
    assert media.pick_frames(5, 40) == [0, 1, 2, 3, 4]
    assert media.pick_frames(10, 1) == [0, 9]


def test_grids_wrap_and_animation_rows_are_cut_to_max_columns(tmp_path):
    x = torch.rand(100, 1, 8, 8) * 2 - 1
    wide = imageio.imread(media.save_grid(x, tmp_path / "a.png", nrow=50))
    capped = imageio.imread(media.save_grid(x, tmp_path / "b.png", nrow=50, max_columns=10))
    ten = imageio.imread(media.save_grid(x, tmp_path / "c.png", nrow=10))
    assert capped.shape == ten.shape and capped.shape[1] < wide.shape[1]
    assert media.first_columns(6, 3, 2) == ([0, 1, 3, 4], 2)
    labels = class_labels(40, 4)  # 10 per class
    states = [x[:40], x[40:80]]
    path = media.save_animation(states, tmp_path / "a.gif", nrow=10, max_columns=4, row_labels=list("abcd"))
    frames = imageio.mimread(path)
    ref = media.render_frames([s[media.first_columns(40, 10, 4)[0]] for s in states], 4, row_labels=list("abcd"))
    assert frames[0].shape[:2] == ref[0].shape[:2] and len(labels) == 40

"""What sampling writes: `diffuse sample` one sample alone at the data's size (sample.png), and a class grid
capped at grid_max_columns while the .npz holds every sample; a training run keeps the table of its sample grids
by step and epoch (samples/README.md, index.html, a W&B table)."""

from __future__ import annotations

import json
import re

import imageio.v2 as imageio
import numpy as np
import pytest
import torch

from diffuse import media
from diffuse.data.shapes import CLASS_NAMES
from diffuse.tracking import Tracker

from conftest import TINY
from inproc_cli import run_inproc

TRAIN = TINY + ["conditional=true", "trainer.max_steps=2", "trainer.sample_every=2", "trainer.val_items=0"]


def _ok(res):
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def _u8(x: torch.Tensor) -> np.ndarray:
    """[C, H, W] in [−1, 1] → uint8 [H, W, 3] as a PNG holds it (grey repeated)."""
    x = x.expand(3, -1, -1) if x.shape[0] == 1 else x
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def test_sample_image_is_the_sample_at_its_own_pixels(tmp_path):
    x = torch.rand(3, 3, 64, 64) * 2 - 1
    img = imageio.imread(media.save_sample_image(x, tmp_path / "a.png", index=1))
    np.testing.assert_array_equal(img, _u8(x[1]))  # 64² stays 64², exactly the sample's pixels
    grey = torch.rand(2, 1, 8, 8) * 2 - 1
    img = imageio.imread(media.save_sample_image(grey, tmp_path / "b.png"))
    assert img.shape == (64, 64, 3)  # tiny: nearest ×8, each pixel a block
    np.testing.assert_array_equal(img[::8, ::8], _u8(grey[0]))
    np.testing.assert_array_equal(img[7::8, 7::8], _u8(grey[0]))
    assert imageio.imread(media.save_sample_image(torch.zeros(1, 1, 28, 28), tmp_path / "c.png")).shape == (84, 84, 3)
    plot = imageio.imread(media.save_sample_image(torch.zeros(2, 2, 32), tmp_path / "d.png"))  # 1-D: a line plot
    views = imageio.imread(media.save_sample_image(torch.zeros(2, 1, 8, 8, 8), tmp_path / "e.png"))  # 3-D: 3 views
    assert plot.ndim == 3 and views.shape[1] > 2 * views.shape[0]


def test_sample_index_lists_every_grid_with_step_and_epoch(tmp_path):
    folder = tmp_path / "samples"
    folder.mkdir()
    png = np.zeros((4, 4, 3), np.uint8)
    imageio.imwrite(folder / "step_50.png", png)  # a grid drawn before the table existed: no epoch known
    for step in (900, 450):
        imageio.imwrite(folder / f"step_{step}.png", png)
        rows = media.write_sample_index(folder, step, step / 15)
    assert [(r["step"], r["epoch"]) for r in rows] == [(50, None), (450, 30.0), (900, 60.0)]
    readme = (folder / "README.md").read_text()
    assert "| step | epoch | samples (EMA) |" in readme
    assert "| 450 | 30 | ![step 450](step_450.png) |" in readme and "| 50 |  | ![step 50](step_50.png) |" in readme
    html = (folder / "index.html").read_text()
    assert re.search(r"<tr><td>900</td><td>60</td><td><img src=\"step_900.png\"", html)
    # the records survive (a resumed run keeps its table); an unreadable index.json is rebuilt, never an error
    assert [r["epoch"] for r in media.write_sample_index(folder)] == [None, 30.0, 60.0]
    (folder / "index.json").write_text("{not json")
    assert [r["step"] for r in media.write_sample_index(folder, 950, 63.3333)] == [50, 450, 900]  # no step_950.png
    assert json.loads((folder / "index.json").read_text())[1] == {"step": 450, "epoch": None, "file": "step_450.png"}


class _FakeWandb:
    def __init__(self, fail: bool = False):
        self.logged, self.fail = [], fail

    def Image(self, path):  # noqa: N802 - wandb's names
        return ("image", path)

    def Table(self, columns, data):  # noqa: N802
        if self.fail:
            raise RuntimeError("W&B is down")
        return ("table", columns, data)

    def log(self, payload, step):
        self.logged.append((payload, step))


def test_log_table_turns_paths_into_images_and_never_raises(tmp_path, caplog):
    tracker = Tracker(tmp_path, mode="disabled")
    tracker.wandb = fake = _FakeWandb()
    tracker.log_table("sample_grids", ["step", "epoch", "grid"], [[3, 0.5, "a.png"], [6, 1.0, "b.png"]], 6, ("grid",))
    assert fake.logged == [({"sample_grids": ("table", ["step", "epoch", "grid"],
                                              [[3, 0.5, ("image", "a.png")], [6, 1.0, ("image", "b.png")]])}, 6)]
    tracker.wandb = _FakeWandb(fail=True)
    tracker.log_table("sample_grids", ["step", "grid"], [[3, "a.png"]], 7, ("grid",))  # no exception
    assert tracker.wandb is None and "disabling it" in caplog.text
    tracker.log_table("sample_grids", ["step", "grid"], [[3, "a.png"]], 8, ("grid",))  # W&B off: a no-op


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("outputs")
    res = run_inproc(["train", *TINY, "trainer.max_steps=6", "trainer.sample_every=3", "trainer.sample_steps=2",
                      "trainer.num_sample_images=4", "trainer.final_animation=false"], cwd)
    assert res.returncode == 0, res.stderr[-3000:]
    (run,) = (cwd / "outputs").glob("*/*")
    return cwd, run


def test_training_writes_the_table_of_its_grids(trained):
    _, run = trained
    readme = (run / "samples" / "README.md").read_text()
    # 64 items / batch 4 = 16 steps an epoch: step 3 is epoch 0.19, step 6 epoch 0.38
    assert "| 3 | 0.19 | ![step 3](step_3.png) |" in readme and "| 6 | 0.38 | ![step 6](step_6.png) |" in readme
    assert '<img src="step_6.png"' in (run / "samples" / "index.html").read_text()


def test_sample_writes_one_image_at_the_data_size(trained):
    cwd, run = trained
    res = run_inproc(["sample", "sampler.steps=2", "num_samples=4", "device=cpu"], cwd)
    assert res.returncode == 0, res.stderr[-3000:]
    printed = dict(re.findall(r"^(samples|grid|sample): (.+)$", res.stdout, re.M))
    x = np.load(printed["samples"])["x"]
    img = imageio.imread(printed["sample"])
    assert img.shape == (64, 64, 3)  # 8² data upscaled ×8 (under 64 px)
    np.testing.assert_array_equal(img[::8, ::8], _u8(torch.from_numpy(x[0])))


def test_a_1000_sample_class_grid_is_capped_and_the_npz_holds_all(tmp_path):
    _ok(run_inproc(["train", *TRAIN, "trainer.sample_every=0"], tmp_path))
    res = _ok(run_inproc(["sample", "num_samples=1000", "sampler.steps=2", "batch_size=500", "device=cpu"],
                         tmp_path))
    out = res.stdout + res.stderr
    assert "1000 samples × 2 steps" in out and "2000/2000" in out  # advanced per step, not per batch
    assert "first 16 of 250 samples per class" in out
    printed = dict(re.findall(r"^(samples|grid): (.+)$", res.stdout, re.M))
    data = np.load(printed["samples"])
    assert data["x"].shape == (1000, 1, 8, 8) and np.bincount(data["y"]).tolist() == [250] * 4
    grid = imageio.imread(printed["grid"])
    x, y = torch.from_numpy(data["x"]), torch.from_numpy(data["y"])
    names = CLASS_NAMES[2][:4]  # the shapes' class names label the rows
    reference = imageio.imread(media.save_class_grid(x, y, tmp_path / "ref16.png", names, per_class=16))
    assert grid.shape == reference.shape  # 16 columns (plus the class-name margin), 4 rows
    wider = imageio.imread(media.save_class_grid(x, y, tmp_path / "ref17.png", names, per_class=17))
    assert grid.shape[1] < wider.shape[1] and grid.shape[1] < 1100  # uncapped: 250 columns, ~15000 px

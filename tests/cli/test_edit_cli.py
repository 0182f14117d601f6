"""`diffuse edit` from the command line on tiny trained runs in 1-D, 2-D and 3-D: every mode writes edits.npz and
grid.png (and the animation when asked); inpainting keeps the known region exactly; inputs come from the run's
held-out items, a samples.npz or a folder of images; every bad input is one line."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from diffuse.jobs import train as train_job

from conftest import TINY, compose_cfg
from inproc_cli import run_inproc

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest's

MASK_PER_DIM = {1: "every_other_segment", 2: "bottom_half", 3: "octant"}


@pytest.fixture(scope="module", params=[1, 2, 3], ids=["1d", "2d", "3d"])
def run(request, tmp_path_factory):
    """A conditional UNet on shapes, 8 steps (enough to run every mode; the quality is not checked here)."""
    folder = tmp_path_factory.mktemp(f"run{request.param}d")
    train_job.run(compose_cfg("train", [*TINY, f"dim={request.param}", "trainer.max_steps=8"]), folder, [])
    return request.param, folder / "checkpoints" / "last.ckpt"


def _edit(ckpt, tmp_path, *args):
    res = run_inproc(["edit", f"checkpoint={ckpt}", "device=cpu", "sampler.steps=6", "input.count=3",
                      "num_samples=2", *args], tmp_path)
    return res, dict(line.split(": ", 1) for line in res.stdout.splitlines() if ": " in line)


def _ok(res):
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


def test_every_mode_in_each_dim(run, tmp_path):
    dim, ckpt = run
    spatial = (8,) * dim
    res, paths = _edit(ckpt, tmp_path, "mode=inpaint", f"mask={MASK_PER_DIM[dim]}", "--animation",
                       "animation.frames=3")
    _ok(res)
    edits = np.load(paths["edits"])
    x, m, out = edits["inputs"], edits["masks"], edits["outputs"]
    assert x.shape == (3, 1, *spatial) and m.shape == (3, 1, *spatial) and out.shape == (3, 2, 1, *spatial)
    assert 0 < m.mean() < 1
    known = np.broadcast_to(m[:, None], out.shape)
    assert np.array_equal(out[known], np.broadcast_to(x[:, None], out.shape)[known])  # kept exactly
    assert edits["labels"].shape == (3, 2)
    for key in ("grid", "animation"):
        assert (tmp_path / paths[key]).is_file()

    res, paths = _edit(ckpt, tmp_path, "mode=inpaint", "method=repaint", "sampler=ddpm", "sampler.steps=6",
                       "jump_length=3", "resample=2", "mask=random_boxes")
    _ok(res)
    assert np.load(paths["edits"])["outputs"].shape == (3, 2, 1, *spatial)

    res, paths = _edit(ckpt, tmp_path, "mode=img2img", "strength=0.4", "labels=1")
    _ok(res)
    edits = np.load(paths["edits"])
    assert edits["outputs"].shape == (3, 2, 1, *spatial) and (edits["labels"] == 1).all()
    assert 0 < float(edits["t_start"]) <= 0.4

    res, paths = _edit(ckpt, tmp_path, "mode=invert", "sampler=ddim", "sampler.steps=6")
    _ok(res)
    edits = np.load(paths["edits"])
    assert edits["noise"].shape == edits["outputs"].shape == (3, 1, *spatial)
    assert np.isfinite(edits["reconstruction_error"]).all() and "reconstruction_error" in paths

    res, paths = _edit(ckpt, tmp_path, "mode=interpolate", "input.count=4", "frames=5", "--animation")
    _ok(res)
    edits = np.load(paths["edits"])
    assert edits["frames"].shape == (2, 5, 1, *spatial) and edits["weights"].tolist() == [0, 0.25, 0.5, 0.75, 1]
    assert (tmp_path / paths["animation"]).is_file()


def test_inputs_from_a_samples_file_and_from_a_folder(run, tmp_path):
    dim, ckpt = run
    if dim != 2:
        pytest.skip("images are 2-D")
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (4, 1, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "samples.npz", x=x, y=np.array([0, 1, 2, 3]))
    res, paths = _edit(ckpt, tmp_path, f"input.path={tmp_path / 'samples.npz'}", "mask=center_box")
    _ok(res)
    edits = np.load(paths["edits"])
    assert np.array_equal(edits["inputs"], x[:3]) and edits["labels"][:, 0].tolist() == [0, 1, 2]
    assert str(edits["method"]) == "replacement"  # method=auto: the completions follow the inputs' classes
    (tmp_path / "pngs").mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(tmp_path / "pngs" / f"{i}.png")
    res, paths = _edit(ckpt, tmp_path, f"input.path={tmp_path / 'pngs'}", "mode=img2img", "strength=0.3")
    _ok(res)
    assert np.load(paths["edits"])["inputs"].shape == (3, 1, 8, 8)
    res, paths = _edit(ckpt, tmp_path, f"input.path={tmp_path / 'pngs'}", "mask=left_half")
    _ok(res)
    edits = np.load(paths["edits"])
    assert "labels" not in edits and str(edits["method"]) == "reconstruction"  # no labels: no class to follow


def test_bad_inputs_are_one_line(run, tmp_path):
    dim, ckpt = run
    if dim != 2:
        pytest.skip("the checks do not depend on the dim")
    np.save(tmp_path / "mask.npy", np.ones((5, 5), bool))
    np.savez(tmp_path / "small.npz", x=np.zeros((2, 1, 4, 4), np.float32))
    np.savez(tmp_path / "loud.npz", x=np.full((2, 1, 8, 8), 3.0, np.float32))
    cases = [
        ([f"mask={tmp_path / 'mask.npy'}"], r"mask .*mask.npy has shape \(5, 5\); the data's items are \[8, 8\]"),
        (["mask=diagonal"], "mask must be a file or one of left_half"),
        (["mask=octant"], "mask octant is for 3-D data; this run's is 2-D"),
        ([f"input.path={tmp_path / 'small.npz'}"], r"the inputs are items of shape \[1, 4, 4\]; the run's are \[1, 8, 8\]"),
        ([f"input.path={tmp_path / 'loud.npz'}"], r"the inputs must be finite and in \[−1, 1\]"),
        ([f"input.path={tmp_path / 'none.npz'}"], "does not exist"),
        (["mode=img2img", "strength=0"], r"strength must be"),
        (["mode=img2img", "strength=1.5"], r"strength must be"),
        (["method=repaint", "sampler=dpm_solver"], "RePaint resamples .* DPMSolverPP is deterministic"),
        (["mode=invert", "sampler=ddpm"], "need a deterministic sampler; DDPM draws noise"),
        (["mode=interpolate", "input.count=1"], "give at least 2 inputs"),
        (["labels=9"], r"labels=9 but the run has 4 classes"),
        (["mode=interpolate", "labels=infer"], "labels=infer reads each input's class .* not interpolate"),
        (["mode=blend"], "mode must be one of inpaint, img2img, invert, interpolate"),
        (["method=blur"], "method must be one of auto, replacement, reconstruction, repaint; got blur"),
    ]
    for args, message in cases:
        res, _ = _edit(ckpt, tmp_path, *args)
        assert res.returncode == 1, (args, res.stdout[-2000:], res.stderr[-2000:])
        assert "Traceback" not in res.stderr, res.stderr[-3000:]
        lines = [line for line in res.stderr.splitlines() if line.strip()]
        assert any(re.search(message, line) for line in lines), (args, res.stderr[-1500:])
    assert not list(tmp_path.glob("outputs/*/*/edits.npz"))  # nothing written by a refused edit


def test_labels_inferred_from_the_known_region(run, tmp_path):
    dim, ckpt = run
    if dim != 2:
        pytest.skip("the inference does not depend on the dim (tests/test_editing.py checks it)")
    for mode in ("inpaint", "img2img"):
        res, paths = _edit(ckpt, tmp_path, f"mode={mode}", "labels=infer")
        _ok(res)
        labels = np.load(paths["edits"])["labels"]
        assert labels.shape == (3, 2) and (labels[:, 0] == labels[:, 1]).all()  # one class per input
        assert ((0 <= labels) & (labels < 4)).all()
        assert "labels=infer: classes" in res.stdout + res.stderr

"""Latent diffusion from the CLI: `diffuse train-vae`, then `diffuse train latent.vae=…`, then `diffuse sample`
decoding to data space from the checkpoint alone; and the LatentDataset against a direct computation."""

from __future__ import annotations

import json
import re
import shutil

import imageio.v2 as imageio
import numpy as np
import pytest
import torch

from diffuse import media
from diffuse.data.shapes import ShapesDataset
from diffuse.errors import DiffuseError
from diffuse.jobs.train_vae import reconstruction_mse
from diffuse.data.latent import CHECKPOINT_KEY, LatentDataset, latent_decoder
from diffuse.jobs.latent_space import use_latent_space
from diffuse.models.vae import VAE
from diffuse.storage.checkpoint import load_checkpoint

from conftest import compose_cfg, run_cli

DATA = ["dataset.resolution=8", "dataset.size=64", "logger=none", "device=cpu", "trainer.log_every=1"]
VAE_ARGS = DATA + ["vae.channels=8", "vae.channel_mult=[1,2]", "trainer.max_steps=4", "trainer.batch_size=8",
                   "trainer.sample_every=4", "trainer.num_sample_images=4", "scale_batches=2"]
DIFFUSION_ARGS = DATA + ["model.base_channels=8", "model.channel_mult=[1,2]", "model.time_emb_dim=8",
                         "trainer.batch_size=8", "trainer.sample_every=2", "trainer.sample_steps=4",
                         "trainer.num_sample_images=4", "trainer.checkpoint_every=2"]


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("latent")
    _ok(run_cli(["train-vae", *VAE_ARGS], cwd))
    (ckpt,) = (cwd / "outputs").glob("*/*/checkpoints/last.ckpt")
    return cwd, ckpt


@pytest.fixture(scope="module")
def latent_run(vae_run):
    cwd, vae_ckpt = vae_run
    before = set((cwd / "outputs").glob("*/*"))
    _ok(run_cli(["train", f"latent.vae={vae_ckpt}", "trainer.max_steps=2", "sampler=ddpm_clip", *DIFFUSION_ARGS],
                cwd))  # ddpm_clip: a sampler that clips x̂₀ in data space, which latent runs must not
    (run,) = set((cwd / "outputs").glob("*/*")) - before
    return cwd, run


@pytest.mark.slow
def test_train_vae_logs_reconstructions_and_stores_the_fitted_scale(vae_run):
    _, ckpt = vae_run
    run = ckpt.parent.parent
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert {"recon", "mse", "kl", "lr", "grad_norm"} <= set(steps[0])
    assert all(r["loss"] == pytest.approx(r["recon"] + 1e-6 * r["kl"] / 64, rel=1e-4) for r in steps)
    (scale_row,) = [r for r in rows if "scale_factor" in r]
    grid = imageio.imread(run / "samples" / "step_4.png")  # 4 originals above their 4 reconstructions
    assert grid.shape[0] < grid.shape[1]
    state = load_checkpoint(ckpt)
    assert state["step"] == 4 and state["config"]["vae"]["scale_factor"] == "auto"
    for weights in (state["model"], state["ema"]["model"]):
        assert float(weights["encoder.scale_factor"]) == pytest.approx(scale_row["scale_factor"], rel=1e-6)
        assert float(weights["decoder.scale_factor"]) == pytest.approx(scale_row["scale_factor"], rel=1e-6)
    assert (run / "checkpoints" / "step_4.ckpt").is_file()


@pytest.mark.slow
def test_latent_training_stores_the_vae_and_the_latent_shape(vae_run, latent_run):
    _, vae_ckpt = vae_run
    _, run = latent_run
    state = load_checkpoint(run / "checkpoints" / "last.ckpt")
    cfg = state["config"]
    assert cfg["latent"]["vae"] == str(vae_ckpt.resolve())
    assert (cfg["dataset"]["channels"], cfg["dataset"]["resolution"]) == (4, 4)  # 1×8×8 → 4×4×4
    assert cfg["dataset"]["data"]["_target_"] == "diffuse.data.shapes.ShapesDataset"
    assert cfg["model"]["in_channels"] == 4
    record = state[CHECKPOINT_KEY]
    vae_state = load_checkpoint(vae_ckpt)
    assert record["config"] == vae_state["config"]["vae"] and record["step"] == 4
    for name, value in vae_state["ema"]["model"].items():
        torch.testing.assert_close(record["weights"][name], value, rtol=0, atol=0)
    assert (run / "samples" / "step_2.png").is_file() and (run / "samples" / "animation.gif").is_file()
    # training-time grids are decoded: one sample per class of 1×8×8 images, not of 4×4×4 latents
    labels, names = torch.arange(4), [str(n) for n in ShapesDataset(resolution=8, size=1).class_names]
    as_data = media.save_class_grid(torch.zeros(4, 1, 8, 8), labels, run / "data.png", class_names=names)
    as_latent = media.save_class_grid(torch.zeros(4, 4, 4, 4), labels, run / "latent.png", class_names=names)
    shape = imageio.imread(run / "samples" / "step_2.png").shape
    assert shape == imageio.imread(as_data).shape != imageio.imread(as_latent).shape


@pytest.mark.slow
def test_sample_decodes_to_data_space_from_the_checkpoint_alone(vae_run, latent_run):
    cwd, vae_ckpt = vae_run
    _, run = latent_run
    moved = vae_ckpt.with_name("moved.ckpt")
    shutil.move(vae_ckpt, moved)  # the diffusion checkpoint carries the VAE itself
    try:
        proc = _ok(run_cli(["sample", f"checkpoint={run}", "num_samples=4", "sampler.steps=4", "--animation",
                            "animation.frames=3", "device=cpu"], cwd))
    finally:
        shutil.move(moved, vae_ckpt)
    printed = dict(re.findall(r"^(samples|grid|animation): (.+)$", proc.stdout, re.M))
    x = np.load(printed["samples"])["x"]
    assert x.shape == (4, 1, 8, 8)  # the data's shape, not the latent's 4×4×4
    assert x.min() >= -1 and x.max() <= 1
    frames = imageio.mimread(printed["animation"])
    # decoded frames: as wide as the grid of decoded samples (same tiles, same row labels)
    assert len(frames) >= 3 and frames[-1].shape[1] == imageio.imread(printed["grid"]).shape[1]


@pytest.mark.slow
def test_edit_works_in_latent_space_and_keeps_the_known_pixels(vae_run, latent_run):
    """Inpainting a latent run: the mask goes to the 4×4 latent grid (a cell kept only where all its pixels are
    known), the completions are decoded to 8×8 data, and the known pixels are the input's exactly."""
    cwd, _ = vae_run
    _, run = latent_run
    proc = _ok(run_cli(["edit", f"checkpoint={run}", "mask=right_half", "input.count=2", "num_samples=2",
                        "sampler.steps=4", "device=cpu"], cwd))
    printed = dict(re.findall(r"^(edits|grid): (.+)$", proc.stdout, re.M))
    edits = np.load(printed["edits"])
    x, m, out = edits["inputs"], edits["masks"], edits["outputs"]
    assert x.shape == (2, 1, 8, 8) and out.shape == (2, 2, 1, 8, 8) and edits["latent_masks"].shape == (2, 1, 4, 4)
    assert edits["latent_masks"][..., :2].all() and not edits["latent_masks"][..., 2:].any()
    known = np.broadcast_to(m[:, None], out.shape)
    assert np.array_equal(out[known], np.broadcast_to(x[:, None], out.shape)[known])
    proc = _ok(run_cli(["edit", f"checkpoint={run}", "mode=img2img", "strength=0.5", "input.count=2",
                        "sampler.steps=4", "device=cpu"], cwd))
    printed = dict(re.findall(r"^(edits|grid): (.+)$", proc.stdout, re.M))
    assert np.load(printed["edits"])["outputs"].shape == (2, 4, 1, 8, 8)


@pytest.mark.slow
def test_latent_run_resumes(vae_run, latent_run):
    cwd, _ = vae_run
    _, run = latent_run
    _ok(run_cli(["train", f"resume={run}", "trainer.max_steps=3", "logger=none", "device=cpu"], cwd))
    state = load_checkpoint(run / "checkpoints" / "last.ckpt")
    assert state["step"] == 3 and CHECKPOINT_KEY in state


# ----- in process ------------------------------------------------------------------------------

def _vae(scale="auto") -> VAE:
    torch.manual_seed(0)
    return VAE(dim=2, in_channels=1, latent_channels=3, channels=8, channel_mult=(1, 2), num_res_blocks=1,
               scale_factor=scale).eval()


def test_latent_dataset_matches_direct_encoding_cached_or_not():
    data = ShapesDataset(resolution=8, size=20)
    vae = _vae(scale=0.5)
    cached = LatentDataset(data, vae, cache=True, device="cpu", batch_size=7)
    streamed = LatentDataset(data, vae, cache=False, device="cpu")
    assert (cached.dim, cached.resolution, cached.channels, cached.num_classes, len(cached)) == (2, 4, 3, 4, 20)
    idx = torch.tensor([3, 0, 17, 9])
    za, ya = cached.get_batch(idx, torch.Generator().manual_seed(1))
    zb, yb = streamed.get_batch(idx, torch.Generator().manual_seed(1))
    x, y = data.get_batch(idx)
    with torch.no_grad():
        expected = vae.encode(x, torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(1)))
    torch.testing.assert_close(za, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(zb, expected, atol=1e-5, rtol=1e-5)
    assert ya.tolist() == yb.tolist() == y.tolist()
    means = LatentDataset(data, vae, cache=True, sample=False, device="cpu").get_batch(idx)[0]
    torch.testing.assert_close(means, vae.encode(x, sample=False), atol=1e-5, rtol=1e-5)
    decoded = cached.decode(za)
    assert decoded.shape == (4, 1, 8, 8) and decoded.abs().max() <= 1
    with torch.no_grad():
        torch.testing.assert_close(decoded, vae.decode(za).clamp(-1, 1))


def test_latent_dataset_fits_an_unfitted_auto_scale_and_checks_shapes():
    data = ShapesDataset(resolution=8, size=16)
    vae = _vae("auto")
    ds = LatentDataset(data, vae, cache=True, device="cpu")
    assert np.isfinite(ds.scale) and ds.scale == vae.scale_factor
    z, _ = LatentDataset(data, vae, cache=True, sample=True, device="cpu").get_batch(torch.arange(16),
                                                                                   torch.Generator().manual_seed(0))
    assert 0.5 < z.std().item() < 2.0  # about unit variance after scaling
    with pytest.raises(DiffuseError, match="divisible"):
        LatentDataset(ShapesDataset(resolution=9, size=4), vae, device="cpu")
    with pytest.raises(DiffuseError, match="channels"):
        LatentDataset(ShapesDataset(resolution=8, size=4, channels=3), vae, device="cpu")
    with pytest.raises(DiffuseError, match="resolution=5"):
        LatentDataset(data, vae, device="cpu", resolution=5)


@pytest.mark.slow
def test_use_latent_space_rewrites_the_dataset_config(vae_run):
    _, vae_ckpt = vae_run
    cfg = compose_cfg("train", ["dataset.resolution=8", f"latent.vae={vae_ckpt}", "device=cpu"])
    assert cfg.model.in_channels == 1
    assert use_latent_space(cfg)
    assert cfg.dataset._target_ == "diffuse.data.latent.LatentDataset"
    assert (cfg.dataset.channels, cfg.dataset.resolution, cfg.dataset.data.resolution) == (4, 4, 8)
    assert cfg.model.in_channels == 4  # ${dataset.channels} now reads the latent's
    assert use_latent_space(cfg) and cfg.dataset.data.resolution == 8  # idempotent
    assert not use_latent_space(compose_cfg("train", []))
    with pytest.raises(DiffuseError, match="divisible"):
        use_latent_space(compose_cfg("train", ["dataset.resolution=9", f"latent.vae={vae_ckpt}"]))
    with pytest.raises(DiffuseError, match=r"latent.vae: .*x.ckpt is a diffusion model .* needs a VAE"):
        other = compose_cfg("train", [f"latent.vae={vae_ckpt}"])
        torch.save({"format": "diffuse-checkpoint", "version": 1, "config": {}}, vae_ckpt.with_name("x.ckpt"))
        other.latent.vae = str(vae_ckpt.with_name("x.ckpt"))
        use_latent_space(other)


def test_latent_decoder_is_the_identity_for_pixel_runs():
    z = torch.randn(2, 1, 4, 4)
    assert latent_decoder({"config": {"latent": {"vae": None}}})(z) is z


@torch.no_grad()
def test_reconstruction_mse_is_the_mean_squared_error_of_the_posterior_mean():
    data = ShapesDataset(resolution=8, size=10)
    vae = _vae(scale=1.0)
    x, _ = data.get_batch(torch.arange(7))
    expected = (vae(x, sample=False)[0] - x).pow(2).mean().item()
    assert reconstruction_mse(vae, data, batch_size=3, device=torch.device("cpu"), max_items=7) == pytest.approx(
        expected, rel=1e-5)


@pytest.mark.slow
def test_latent_runs_sample_without_data_range_clipping(vae_run, latent_run):
    """x̂₀ clipping to [−1, 1] is for data space: the latent run's own ddpm_clip samples unclipped (and says
    so), in training, `sample` and `evaluate`; a clip_range chosen for latents is kept."""
    from omegaconf import OmegaConf

    from diffuse.jobs.latent_space import latent_sampler_config

    clipped = OmegaConf.create({"_target_": "diffuse.diffusion.samplers.DDPM", "steps": 4, "clip_x0": True,
                                "clip_range": [-1.0, 1.0]})
    assert latent_sampler_config(clipped, latent=True).clip_x0 is False
    assert clipped.clip_x0 is True  # the run's config is left as it is
    assert latent_sampler_config(clipped, latent=False).clip_x0 is True
    wide = OmegaConf.merge(clipped, {"clip_range": [-3.0, 3.0]})
    assert latent_sampler_config(wide, latent=True).clip_x0 is True

    cwd, run = latent_run
    assert "which latents do not lie in" in (run / "train.log").read_text()
    proc = _ok(run_cli(["evaluate", f"checkpoint={run}", "num_samples=8", "sampler.steps=3", "device=cpu"], cwd))
    assert "which latents do not lie in" in proc.stderr + proc.stdout
    metrics_path = cwd / proc.stdout.split("metrics: ", 1)[1].splitlines()[0]
    result = json.loads(metrics_path.read_text())
    assert result["clip_x0"] is False and result["sampler"] == "DDPM"
    assert result["fd"] > 0 and 0 <= result["label_agreement"] <= 1

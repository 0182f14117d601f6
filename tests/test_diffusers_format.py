"""diffusers' folders read into our classes (diffuse/storage/diffusers_format.py): a pretrained AutoencoderKL as
`latent.vae=FOLDER`, equal to diffusers' own encode/decode; folders of the wrong kind refused in one line; and a
latent run on a tiny RGB folder that trains, samples, decodes and exports with it, with no `train-vae`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffuse.data.latent import read_vae_checkpoint, vae_from_record
from diffuse.errors import DiffuseError
from diffuse.storage import diffusers_format

from conftest import run_cli

diffusers = pytest.importorskip("diffusers")

SCALE = 0.3  # not SD's 0.18215: proves the factor comes from the folder's config


def _autoencoder(**overrides) -> "diffusers.AutoencoderKL":
    torch.manual_seed(0)
    kw = dict(in_channels=3, out_channels=3, block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
              up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4, norm_num_groups=32,
              scaling_factor=SCALE)
    return diffusers.AutoencoderKL(**{**kw, **overrides}).eval()


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sd-vae") / "vae"
    _autoencoder().save_pretrained(folder)  # config.json + diffusion_pytorch_model.safetensors
    return folder


@torch.no_grad()
def test_a_diffusers_vae_encodes_and_decodes_as_diffusers_does(vae_folder):
    theirs = diffusers.AutoencoderKL.from_pretrained(vae_folder).eval()
    record = read_vae_checkpoint(vae_folder)
    assert record["config"]["scale_factor"] == SCALE and record["source"] == "diffusers AutoencoderKL"
    assert record["config"]["channel_mult"] == [1, 2] and record["step"] is None
    ours = vae_from_record(record)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    z = ours.encode(x, sample=False)  # the scaled posterior mean
    torch.testing.assert_close(z, theirs.encode(x).latent_dist.mean * SCALE, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.decode(z), theirs.decode(z / SCALE).sample, atol=1e-5, rtol=1e-5)
    # the weights file itself names the folder too
    assert read_vae_checkpoint(vae_folder / diffusers_format.WEIGHTS[0])["path"] == str(vae_folder.resolve())


def _copy_with(folder: Path, dest: Path, **config_changes) -> Path:
    dest.mkdir()
    config = json.loads((folder / "config.json").read_text())
    (dest / "config.json").write_text(json.dumps({**config, **config_changes}))
    (dest / diffusers_format.WEIGHTS[0]).write_bytes((folder / diffusers_format.WEIGHTS[0]).read_bytes())
    return dest


@pytest.mark.parametrize("changes,words", [
    ({"_class_name": "UNet2DModel"}, "not an AutoencoderKL"),
    ({"act_fn": "gelu"}, "act_fn='gelu'"),
    ({"norm_num_groups": 16}, "norm_num_groups=16"),
    ({"shift_factor": 0.1159}, "shift_factor"),
    ({"block_out_channels": [32, 48]}, "block_out_channels"),
    ({"down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]}, "DownEncoderBlock2D"),
    ({"out_channels": 1}, "out_channels"),
    ({"new_feature": True}, "does not know"),
    ({"layers_per_block": 2}, "do not match their config"),  # the config says more blocks than the weights hold
])
def test_a_folder_of_another_kind_is_refused_in_one_line(vae_folder, tmp_path, changes, words):
    folder = _copy_with(vae_folder, tmp_path / "other", **changes)
    with pytest.raises(DiffuseError) as e:
        read_vae_checkpoint(folder)
    assert "\n" not in str(e.value) and words in str(e.value) and str(e.value).startswith("latent.vae:")


def test_weights_that_are_not_plain_tensors_are_refused(vae_folder, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text((vae_folder / "config.json").read_text())
    torch.save({"conv_in.weight": Path("x")}, folder / "diffusion_pytorch_model.bin")  # unpickling would build it
    with pytest.raises(DiffuseError, match="refused"):
        read_vae_checkpoint(folder)
    (folder / "diffusion_pytorch_model.bin").unlink()
    with pytest.raises(DiffuseError, match="no diffusion_pytorch_model.safetensors"):
        read_vae_checkpoint(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(DiffuseError, match="not a readable JSON config"):
        read_vae_checkpoint(folder)


def test_diffusers_names_map_onto_ours_one_to_one(vae_folder):
    from safetensors.torch import load_file
    theirs = load_file(str(vae_folder / diffusers_format.WEIGHTS[0]))
    ours = vae_from_record(read_vae_checkpoint(vae_folder)).state_dict()
    merged = sum(1 for k in theirs if ".to_k." in k or ".to_v." in k)  # stacked into to_kv
    assert len(ours) == len(theirs) - merged // 2 + 2  # + the two scale-factor buffers


@pytest.mark.slow
def test_a_latent_run_trains_samples_and_exports_with_a_diffusers_vae(vae_folder, tmp_path):
    images = tmp_path / "rgb"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(images / f"{i}.png")
    common = ["logger=none", "device=cpu"]
    proc = run_cli(["train", "dataset=folder", f"dataset.path={images}", "dataset.resolution=16",
                    f"latent.vae={vae_folder}", "model.base_channels=8", "model.channel_mult=[1,2]",
                    "model.time_emb_dim=8", "trainer.max_steps=3", "trainer.batch_size=4", "trainer.sample_every=0",
                    "trainer.final_animation=false", *common], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = (tmp_path / "outputs").glob("*/*")
    assert "latents (4, 8, 8)" in (proc.stdout + proc.stderr)
    proc = run_cli(["sample", f"checkpoint={run}", "num_samples=2", "sampler.steps=3", "device=cpu"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (samples,) = (tmp_path / "outputs").glob("*/*/samples.npz")
    assert np.load(samples)["x"].shape == (2, 3, 16, 16)  # decoded to data space
    proc = run_cli(["export", f"checkpoint={run}", f"out={tmp_path / 'export'}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["vae"]["config"]["scale_factor"] == SCALE and (tmp_path / "export" / "vae.safetensors").is_file()
    assert config["vae"]["step"] is None and config["vae"]["source"] == "vae"  # pretrained: no step; no local path
    proc = run_cli(["sample", f"checkpoint={tmp_path / 'export'}", "num_samples=2", "sampler.steps=3", "device=cpu"],
                   tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]

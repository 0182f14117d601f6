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

from conftest import compose_cfg, run_cli

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


# ----- model=diffusers_unet: diffusers' UNet2DModel, our samplers against diffusers' pipelines --------------------

def _unet(**overrides) -> "diffusers.UNet2DModel":
    torch.manual_seed(0)
    kw = dict(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
              down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
              norm_num_groups=8, attention_head_dim=8)
    unet = diffusers.UNet2DModel(**{**kw, **overrides}).eval()
    with torch.no_grad():  # diffusers' init leaves conv_out near zero: give ε̂ some size, so samples differ
        for p in unet.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return unet


@pytest.fixture(scope="module")
def unet_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ddpm") / "unet"
    _unet().save_pretrained(folder)
    return folder


def _ours(folder: Path):
    return diffusers_format.unet_model(folder)


@pytest.mark.parametrize("kind,spacing", [("ddim", "trailing"), ("ddim", "leading"), ("dpm_solver", "trailing")])
@torch.no_grad()
def test_our_samplers_on_a_diffusers_unet_equal_diffusers_pipelines(unet_folder, kind, spacing):
    """The same UNet, the same noise: our DDIM (η = 0) / DPM-Solver++(2M) on our linear schedule against
    diffusers' DDIMPipeline / DPMSolverMultistepScheduler loop, 10 steps, to 1e-4. Timestep i of diffusers is
    our t = (i + 1)/T: DiffusersUNet feeds the network t·T − 1."""
    from diffuse.diffusion.guidance import Denoiser
    from diffuse.diffusion.samplers import DDIM, DPMSolverPP
    from diffuse.diffusion.schedules import LinearSchedule
    unet = diffusers.UNet2DModel.from_pretrained(unet_folder).eval()
    steps, shape = 10, (2, 3, 8, 8)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    common = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                  timestep_spacing=spacing, prediction_type="epsilon")
    if kind == "ddim":
        scheduler = diffusers.DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=True)
        pipe = diffusers.DDIMPipeline(unet=unet, scheduler=scheduler)
        image = pipe(batch_size=2, generator=torch.Generator().manual_seed(3), eta=0.0, num_inference_steps=steps,
                     output_type="np").images  # [B, H, W, C] in [0, 1]: the same noise, drawn by the pipeline
        theirs = torch.from_numpy(image).permute(0, 3, 1, 2) * 2 - 1
        sampler = DDIM(steps=steps, spacing=spacing, eta=0.0)
    else:
        scheduler = diffusers.DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_order=2,
                                                          final_sigmas_type="zero")
        scheduler.set_timesteps(steps)
        x = noise.clone()
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t).sample, t, x).prev_sample
        theirs = x
        sampler = DPMSolverPP(steps=steps, spacing=spacing)
    ours = sampler(Denoiser(_ours(unet_folder), LinearSchedule(), "eps"), noise.clone())
    if kind == "ddim":
        ours = ours.clamp(-1, 1)  # the pipeline's output is clamped to the image range
    assert ours.abs().max() > 0.1 and (ours - noise).abs().max() > 0.1  # a real run, not the input back
    # DPM-Solver++ works in x̂₀ = (x − σ ε̂)/α: a random network's ε̂ is no noise estimate, so x̂₀ and the samples
    # reach ~400 here and float32 leaves ~1e-4 of them; relative to that scale the two agree to 1e-6
    torch.testing.assert_close(ours, theirs.float(), atol=1e-4, rtol=0 if kind == "ddim" else 1e-6)


def test_model_time_is_the_diffusers_timestep():
    from diffuse.models.diffusers_unet import DiffusersUNet
    model = DiffusersUNet(in_channels=3, num_timesteps=1000, block_out_channels=(32,), down_block_types=("DownBlock2D",),
                          up_block_types=("UpBlock2D",))
    t = (torch.tensor([0, 99, 999]) + 1).float() / 1000
    assert model.timestep(t).tolist() == [0.0, 99.0, 999.0]  # exact on the grid, whatever float error t has
    assert model.timestep(torch.tensor([0.0905])).item() == pytest.approx(89.5)  # between steps: interpolated
    continuous = DiffusersUNet(in_channels=3, num_timesteps=None, block_out_channels=(32,),
                               down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",))
    assert continuous.timestep(torch.tensor([0.25])).item() == 250.0


@pytest.mark.parametrize("changes,words", [
    ({"_class_name": "UNet2DConditionModel"}, "not an UNet2DModel or UNet1DModel"),
    ({"class_embed_type": "timestep"}, "class_embed_type"),
    ({"addition_embed_type": "text"}, "does not take"),
])
def test_a_unet_folder_of_another_kind_is_refused(unet_folder, tmp_path, changes, words):
    folder = _copy_with(unet_folder, tmp_path / "other", **changes)
    with pytest.raises(DiffuseError) as e:
        diffusers_format.unet_architecture(folder)
    assert "\n" not in str(e.value) and words in str(e.value)


@pytest.mark.slow
def test_fine_tune_a_diffusers_checkpoint_then_sample_it_in_one_command(unet_folder, tmp_path):
    """`diffuse train model=diffusers_unet model.pretrained=FOLDER …` starts from the folder's weights with its
    architecture (the stored config names no folder to read again); sampling it with DPM-Solver++ at 20 steps is
    one command; a resumed run continues it."""
    from safetensors.torch import load_file
    from diffuse.storage.checkpoint import load_checkpoint
    common = ["dataset.resolution=8", "dataset.channels=3", "dataset.size=16", "conditional=false", "logger=none", "device=cpu",
              "trainer.batch_size=2", "trainer.sample_every=0", "trainer.final_animation=false",
              "objective.prediction=eps", "objective.weighting=none"]
    proc = run_cli(["train", "model=diffusers_unet", f"model.pretrained={unet_folder}", "trainer.max_steps=2",
                    "trainer.lr=1e-12", *common], tmp_path)  # Adam moves each weight by ~lr: still the folder's
    assert proc.returncode == 0, proc.stderr[-3000:]
    (ckpt,) = (tmp_path / "outputs").glob("*/*/checkpoints/last.ckpt")
    state = load_checkpoint(ckpt)
    assert state["config"]["model"]["pretrained"] is None and state["config"]["model"]["block_out_channels"] == [32, 64]
    assert state["config"]["initialized_from"]["source"] == "diffusers UNet2DModel"
    theirs = load_file(str(unet_folder / diffusers_format.WEIGHTS[0]))
    for name, value in theirs.items():
        torch.testing.assert_close(state["model"]["unet." + name], value, atol=1e-8, rtol=0)
    proc = run_cli(["sample", f"checkpoint={ckpt}", "sampler=dpm_solver", "sampler.steps=20", "num_samples=2",
                    "device=cpu"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "DPMSolverPP" in proc.stdout + proc.stderr
    proc = run_cli(["train", f"resume={ckpt.parent.parent}", "trainer.max_steps=3", "logger=none", "device=cpu"],
                   tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert load_checkpoint(ckpt)["step"] == 3


@pytest.mark.slow
def test_export_for_diffusers_round_trips_to_the_same_samples(unet_folder, tmp_path):
    """train 3 steps → `diffuse export format=diffusers` → DDIMPipeline.from_pretrained (no diffuse code) gives
    the samples `diffuse sample` gives with DDIM on the same noise, to 1e-4; the folder has a model card."""
    common = ["dataset.resolution=8", "dataset.channels=3", "dataset.size=16", "conditional=false", "logger=none",
              "device=cpu", "trainer.batch_size=2", "trainer.sample_every=0", "trainer.final_animation=false",
              "objective.prediction=eps", "objective.weighting=none"]
    proc = run_cli(["train", "model=diffusers_unet", f"model.pretrained={unet_folder}", "trainer.max_steps=3",
                    *common], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (ckpt,) = (tmp_path / "outputs").glob("*/*/checkpoints/last.ckpt")
    out = tmp_path / "pipeline"
    proc = run_cli(["export", f"checkpoint={ckpt}", "format=diffusers", f"out={out}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {p.name for p in out.iterdir()} >= {"unet", "scheduler", "model_index.json", "README.md"}
    assert "DDPMPipeline.from_pretrained" in (out / "README.md").read_text()
    proc = run_cli(["sample", f"checkpoint={ckpt}", "sampler=ddim", "sampler.steps=10", "sampler.spacing=trailing",
                    "num_samples=2", "seed=0", "device=cpu"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours = torch.from_numpy(np.load(next((tmp_path / "outputs").glob("*/*/samples.npz")))["x"])

    from diffuse.diffusion.samplers import NoiseSource, prior_sample
    from diffuse.diffusion.schedules import LinearSchedule
    noise = prior_sample(LinearSchedule(), NoiseSource(range(2)), (3, 8, 8))  # `diffuse sample seed=0`'s start
    pipe = diffusers.DDIMPipeline.from_pretrained(out)
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config, set_alpha_to_one=True)
    pipe.scheduler.set_timesteps(10)
    x = noise.clone()
    with torch.no_grad():
        for t in pipe.scheduler.timesteps:
            x = pipe.scheduler.step(pipe.unet(x, t).sample, t, x, eta=0.0).prev_sample
    torch.testing.assert_close(ours, x.clamp(-1, 1), atol=1e-4, rtol=0)


def _unet1d() -> "diffusers.UNet1DModel":
    torch.manual_seed(0)
    unet = diffusers.UNet1DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(32, 64),
                                 down_block_types=("DownResnetBlock1D",) * 2, up_block_types=("UpResnetBlock1D",),
                                 mid_block_type="MidResTemporalBlock1D", out_block_type="OutConv1DBlock",
                                 time_embedding_type="positional", use_timestep_embedding=True, norm_num_groups=8,
                                 act_fn="silu").eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return unet


@pytest.fixture(scope="module")
def unet1d_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ddpm1d") / "unet"
    _unet1d().save_pretrained(folder)
    return folder


@torch.no_grad()
def test_a_1d_diffusers_unet_samples_as_diffusers_ddim_does(unet1d_folder):
    """model=diffusers_unet dim=1 is diffusers' UNet1DModel: its folder reads as dim 1 with the folder's keys, its
    weights load one to one, and our DDIM on the same noise equals diffusers' DDIMScheduler loop to 1e-4."""
    from diffuse.diffusion.guidance import Denoiser
    from diffuse.diffusion.samplers import DDIM
    from diffuse.diffusion.schedules import LinearSchedule
    arch, facts = diffusers_format.unet_architecture(unet1d_folder)
    assert arch["dim"] == 1 and arch["mid_block_type"] == "MidResTemporalBlock1D" and facts["in_channels"] == 1
    assert facts["num_class_embeds"] is None
    assert diffusers_format.unet_class_of(unet1d_folder) == "UNet1DModel"
    ours = diffusers_format.unet_model(unet1d_folder)  # strict: the same parameters, renamed
    assert ours.dim == 1
    unet = diffusers.UNet1DModel.from_pretrained(unet1d_folder).eval()
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                                        beta_schedule="linear", timestep_spacing="trailing", prediction_type="epsilon",
                                        clip_sample=False, set_alpha_to_one=True)
    scheduler.set_timesteps(10)
    noise = torch.randn((2, 1, 16), generator=torch.Generator().manual_seed(3))
    x = noise.clone()
    for t in scheduler.timesteps:
        x = scheduler.step(unet(x, t).sample, t, x, eta=0.0).prev_sample
    mine = DDIM(steps=10, spacing="trailing", eta=0.0)(Denoiser(ours, LinearSchedule(), "eps"), noise.clone())
    assert (mine - noise).abs().max() > 0.1
    torch.testing.assert_close(mine.clamp(-1, 1), x.clamp(-1, 1), atol=1e-4, rtol=0)


def test_a_1d_folder_in_a_run_of_another_dim_is_one_line(unet1d_folder, unet_folder):
    from diffuse.training.init_weights import use_pretrained_unet
    for folder, dim in ((unet1d_folder, 2), (unet_folder, 1)):
        cfg = compose_cfg("train", ["model=diffusers_unet", f"model.pretrained={folder}", f"dim={dim}",
                                    "conditional=false", "dataset.channels=1" if dim == 2 else "dataset.channels=3"])
        with pytest.raises(DiffuseError) as e:
            use_pretrained_unet(cfg)
        assert "\n" not in str(e.value) and f"this run has dim={dim}" in str(e.value)


@pytest.mark.slow
def test_a_1d_run_fine_tunes_exports_and_loads_in_diffusers(unet1d_folder, tmp_path):
    """dim=1: train 3 steps from a UNet1DModel folder → export format=diffusers → UNet1DModel / DDIMScheduler
    .from_pretrained (no diffuse code) sample what `diffuse sample` samples with DDIM on the same noise, to 1e-4.
    No model_index.json: no diffusers pipeline samples a UNet1DModel with a DDPM scheduler."""
    common = ["dim=1", "dataset.resolution=16", "dataset.channels=1", "dataset.size=16", "conditional=false",
              "logger=none", "device=cpu", "trainer.batch_size=2", "trainer.sample_every=0",
              "trainer.final_animation=false", "objective.prediction=eps", "objective.weighting=none"]
    proc = run_cli(["train", "model=diffusers_unet", f"model.pretrained={unet1d_folder}", "trainer.max_steps=3",
                    *common], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (ckpt,) = (tmp_path / "outputs").glob("*/*/checkpoints/last.ckpt")
    out = tmp_path / "export"
    proc = run_cli(["export", f"checkpoint={ckpt}", "format=diffusers", f"out={out}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {p.name for p in out.iterdir()} >= {"unet", "scheduler", "README.md"}
    assert not (out / "model_index.json").exists() and "UNet1DModel.from_pretrained" in (out / "README.md").read_text()
    proc = run_cli(["sample", f"checkpoint={ckpt}", "sampler=ddim", "sampler.steps=10", "sampler.spacing=trailing",
                    "num_samples=2", "seed=0", "device=cpu"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours = torch.from_numpy(np.load(next((tmp_path / "outputs").glob("*/*/samples.npz")))["x"])
    assert ours.shape == (2, 1, 16)

    from diffuse.diffusion.samplers import NoiseSource, prior_sample
    from diffuse.diffusion.schedules import LinearSchedule
    noise = prior_sample(LinearSchedule(), NoiseSource(range(2)), (1, 16))  # `diffuse sample seed=0`'s start
    unet = diffusers.UNet1DModel.from_pretrained(out, subfolder="unet").eval()
    scheduler = diffusers.DDIMScheduler.from_pretrained(out, subfolder="scheduler", set_alpha_to_one=True)
    scheduler.set_timesteps(10)
    x = noise.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t).sample, t, x, eta=0.0).prev_sample
    torch.testing.assert_close(ours, x.clamp(-1, 1), atol=1e-4, rtol=0)


def test_export_for_diffusers_refuses_other_models_in_one_line(tmp_path):
    from conftest import TINY
    proc = run_cli(["train", *TINY, "trainer.max_steps=1"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_cli(["export", "format=diffusers", f"out={tmp_path / 'x'}"], tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and "model=diffusers_unet" in lines[0], proc.stderr


def test_scheduler_configs_give_our_schedules_tables():
    from diffuse.diffusion.schedules import CosineSchedule, LinearSchedule
    for ours, node in [(LinearSchedule(), {"_target_": "diffuse.diffusion.schedules.LinearSchedule"}),
                       (CosineSchedule(), {"_target_": "diffuse.diffusion.schedules.CosineSchedule"})]:
        config = diffusers_format.scheduler_config({"schedule": node, "objective": {"prediction": "v"}})
        theirs = diffusers.DDPMScheduler(**config)
        assert config["prediction_type"] == "v_prediction"
        torch.testing.assert_close(theirs.alphas_cumprod.double(), ours.alphas_cumprod, atol=1e-6, rtol=0)
    with pytest.raises(DiffuseError, match="no diffusers scheduler"):
        diffusers_format.scheduler_config({"schedule": {"_target_": "diffuse.diffusion.schedules.VESDESchedule"}})


@torch.no_grad()
def test_our_vae_written_as_autoencoder_kl_decodes_the_same(vae_folder):
    record = read_vae_checkpoint(vae_folder)
    ours = vae_from_record(record)
    theirs = diffusers_format.to_autoencoder_kl(record["config"], ours.state_dict()).eval()
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(theirs.decode(z / SCALE).sample, ours.decode(z), atol=1e-5, rtol=1e-5)
    assert theirs.config.scaling_factor == SCALE

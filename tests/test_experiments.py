"""Every file in conf/experiment/, found by globbing the folder: it composes, every interpolation resolves, its
values pass validation, and `diffuse train experiment=NAME` trains 2 steps on small data and writes a checkpoint;
the published setups hold the values their documents give (model, data, schedule, sampler, optimizer, length)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from diffuse.app import CONF_DIR
from diffuse.building import part_class
from diffuse.storage.checkpoint import load_checkpoint
from diffuse.validation import validate

from conftest import compose_cfg, smallest_resolution
from inproc_cli import run_inproc

EXPERIMENTS = [path.stem for path in sorted((Path(CONF_DIR) / "experiment").glob("*.yaml"))]


# -- every experiment trains, at its own model sizes on the smallest resolution that model accepts -----------
TWO_STEPS = ["trainer.max_steps=2", "trainer.epochs=null", "trainer.batch_size=2", "trainer.log_every=1",
             "trainer.sample_every=0", "trainer.final_samples=false", "trainer.val_items=0", "trainer.eval_every=0",
             "logger=none", "device=cpu"]


def _data_args(dataset_target: str, tmp_path: Path) -> list[str]:
    """Where the experiment's data comes from in a test: the tiny copy of its files the dataset class writes
    (`write_example`; procedural data needs none), small where the class takes a size."""
    cls = part_class(dataset_target)
    keys = cls.write_example(tmp_path / "data")
    if "size" in cls.config_rules:
        keys["size"] = 16
    return [f"dataset.{key}={value}" for key, value in keys.items()]


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_trains(name, tmp_path):
    cfg = compose_cfg("train", [f"experiment={name}"])
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    validate(cfg, "train")  # the experiment's own values, before the tiny overrides below
    resolution = smallest_resolution((f"experiment={name}",))
    args = [f"experiment={name}", f"dataset.resolution={resolution}",
            *_data_args(cfg.dataset._target_, tmp_path), *TWO_STEPS]
    res = run_inproc(["train", *args], tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    (ckpt,) = tmp_path.glob("outputs/*/*/checkpoints/last.ckpt")
    assert load_checkpoint(ckpt)["step"] == 2


# -- the published setups -------------------------------------------------------------------------------------
PUBLISHED_VALUES = {  # the published setups each experiment reproduces
    "mnist_shufflenet": {"model._target_": "diffuse.models.shufflenet.ShuffleNetUNet", "dataset._target_":
                         "diffuse.data.vision.MNISTDataset", "schedule.num_timesteps": 1000, "sampler.clip_x0": True,
                         "trainer.lr_schedule": "onecycle", "trainer.epochs": 30, "conditional": False,
                         "objective.prediction": "eps", "objective.weighting": "none"},
    "flowers_unet": {"model._target_": "diffuse.models.unet.UNet", "dataset._target_":
                     "diffuse.data.vision.Flowers102Dataset", "dataset.resolution": 64, "schedule.num_timesteps": 1000,
                     "model.base_channels": 64, "model.time_emb_dim": 128, "trainer.batch_size": 64,
                     "trainer.epochs": 300, "objective.prediction": "eps", "objective.weighting": "none"},
    "mnist_cond_vesde": {"model._target_": "diffuse.models.spatial_transformer.SpatialTransformerUNet",
                         "dataset._target_": "diffuse.data.vision.MNISTDataset", "schedule.sigma": 25.0,
                         "sampler._target_": "diffuse.diffusion.samplers.EulerMaruyama", "sampler.steps": 250,
                         "conditional": True, "model.num_classes": 10, "objective.prediction": "eps",
                         "objective.weighting": "none", "sampler.final_denoise": True},
    "fashion_cond_vesde": {"model._target_": "diffuse.models.spatial_transformer.SpatialTransformerUNet",
                           "dataset._target_": "diffuse.data.vision.FashionMNISTDataset", "schedule.sigma": 25.0,
                           "sampler._target_": "diffuse.diffusion.samplers.EulerMaruyama", "sampler.steps": 250,
                           "conditional": True, "model.num_classes": 10, "objective.prediction": "eps",
                           "objective.weighting": "none", "sampler.final_denoise": True},
    "cifar10_ddpm": {"model._target_": "diffuse.models.unet.UNet", "dataset._target_": "diffuse.data.vision.CIFAR10Dataset",
                     "model.base_channels": 128, "model.channel_mult": [1, 2, 2, 2], "model.num_res_blocks": 2,
                     "model.attn_levels": [1], "model.dropout": 0.1, "model.time_emb_dim": 512,
                     "schedule.beta_start": 1e-4, "schedule.beta_end": 0.02, "schedule.num_timesteps": 1000,
                     "trainer.lr": 2e-4, "trainer.warmup_steps": 5000, "trainer.lr_schedule": "constant",
                     "trainer.batch_size": 128, "trainer.ema_decay": 0.9999, "trainer.max_steps": 800000,
                     "trainer.grad_clip": 1.0, "dataset.hflip": True, "conditional": False, "sampler.steps": 1000,
                     "objective.prediction": "eps", "objective.weighting": "none"},
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_VALUES))
def test_experiment_composes_with_the_published_values(name):
    cfg = compose_cfg("train", [f"experiment={name}"])
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    assert cfg.dim == 2 and cfg.dataset.dim == 2
    for key, value in PUBLISHED_VALUES[name].items():
        assert OmegaConf.select(cfg, key) == value, key


def test_flowers_experiment_is_the_flowers_setup(tmp_path):
    cfg = compose_cfg("train", ["experiment=flowers_unet"])
    assert (cfg.dataset.resolution, cfg.dataset.split, cfg.trainer.batch_size, cfg.trainer.epochs) == \
        (64, "train", 64, 300)
    assert (cfg.schedule.num_timesteps, cfg.model.base_channels, cfg.model.time_emb_dim) == (1000, 64, 128)
    assert (cfg.sampler.steps, cfg.trainer.sample_steps, cfg.trainer.lr, cfg.trainer.lr_schedule) == \
        (1000, 1000, 1e-4, "constant")
    assert cfg.conditional is False and cfg.trainer.num_sample_images == 16
    steps_per_epoch = 1020 // cfg.trainer.batch_size  # Flowers102's train split holds 1020 images
    assert cfg.trainer.sample_every == 30 * steps_per_epoch  # the Flowers setup's table: a grid every 30 epochs


@pytest.mark.parametrize("name", [n for n in EXPERIMENTS if n.startswith("msnat_")])
def test_msnat_experiments_compose(name):
    cfg = compose_cfg("train", [f"experiment={name}"])
    assert cfg.model._target_.endswith("MSNATUNet") and cfg.dim == int(name[-2])
    assert cfg.dataset._target_.endswith("ShapesDataset")


@pytest.mark.parametrize("overrides,expected", [
    ([], (32, 32, 64, 1000)),                                          # 2-D: unchanged
    (["dim=1"], (32, 32, 64, 1000)),
    (["dim=3"], (16, 16, 16, 600)),                                    # 3-D: ~10 min on 2 CPU cores
    (["dim=3", "model=msnat"], (16, 16, 16, 600)),
    (["dim=3", "dataset.resolution=32", "trainer.batch_size=4"], (32, 16, 4, 600)),  # a value given wins
    (["experiment=msnat_3d"], (16, 32, 8, 1000)),                      # a published setup pins its own
])
def test_defaults_are_sized_per_dim(overrides, expected):
    """(dataset.resolution, model.base_channels, trainer.batch_size, trainer.max_steps) by dim (${by_dim:…})."""
    cfg = compose_cfg("train", overrides)
    assert (cfg.dataset.resolution, cfg.model.base_channels, cfg.trainer.batch_size, cfg.trainer.max_steps) == expected


def test_msnat_3d_default_has_no_attention_at_the_finest_level_but_the_published_setup_does():
    """The CPU-sized 3-D default skips the 16³ transformer block (README, 3-D on a CPU); experiment=msnat_3d and
    the 1-D/2-D defaults keep one at every level; the built model follows the config."""
    from hydra.utils import instantiate

    depths = lambda cfg: [level.depth for level in cfg.model.levels[f"dim{cfg.dim}"]]  # noqa: E731
    default_3d = compose_cfg("train", ["dim=3", "model=msnat"])
    assert depths(default_3d) == [0, 1, 1]
    assert depths(compose_cfg("train", ["experiment=msnat_3d"])) == [1, 1, 1]
    assert depths(compose_cfg("train", ["model=msnat"])) == [1, 1, 1]
    model = instantiate(default_3d.model)
    assert len(model.encoder[0].blocks) == 0 and len(model.decoder[-1].blocks) == 0
    assert len(model.encoder[1].blocks) == 1 and len(model.mid_blocks) == 1
    x = torch.randn(2, 1, 16, 16, 16)
    assert model(x, torch.rand(2), torch.tensor([0, 3])).shape == x.shape


def test_by_dim_picks_the_value_for_the_dim():
    from diffuse.dims import by_dim

    assert [by_dim(d, "a", "b", "c") for d in (1, 2, 3)] == ["a", "b", "c"]
    assert by_dim(7, "a", "b", "c") == "c"  # validation reports the bad dim itself, in one line
    with pytest.raises(ValueError, match="three values"):
        by_dim(2, "a", "b")

"""Shared helpers: compose configs in-process, tiny run settings, run the CLI in a subprocess, and the
`requires_cuda` marker for the tests that run on a GPU beside their CPU twins."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from diffuse.app import compose_config

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
CONF = REPO / "diffuse" / "conf"


def conf_choices(group: str) -> list[str]:
    """The choices of a config group: its conf/<group>/*.yaml, without the group's shared `_…` files. The
    tests take every part from here, so a new sampler, model, schedule or dataset is tested without an edit."""
    return sorted(p.stem for p in (CONF / group).glob("*.yaml") if not p.stem.startswith("_"))


@functools.lru_cache(maxsize=None)
def _group_node(group: str, name: str):
    job = "sample" if group == "sampler" else "train"
    return OmegaConf.to_container(compose_config(job, [f"{group}={name}"])[group], resolve=False)


def group_node(group: str, name: str, **overrides):
    """The config node `group=name` composes to (its defaults list, _common.yaml included), with overrides."""
    return OmegaConf.merge(_group_node(group, name), overrides)


def load_sampler(name: str, guidance: float = 0.0, **overrides):
    """The sampler exactly as `sampler=NAME` builds it (steps=auto made a number at this guidance scale, as the
    jobs do)."""
    from diffuse.building import build
    from diffuse.jobs.sampling_setup import with_steps
    return build(with_steps(group_node("sampler", name, **overrides), guidance), "sampler")


def schedules() -> dict:
    """Every conf/schedule/*.yaml, built."""
    from diffuse.building import build
    return {name: build(group_node("schedule", name), "schedule") for name in conf_choices("schedule")}

def model_dims(name: str) -> tuple[int, ...]:
    """The spatial dims the class behind conf/model/NAME.yaml supports (its `supported_dims`)."""
    from diffuse.building import part_class
    return tuple(part_class(_group_node("model", name)["_target_"]).supported_dims)


# every conf/model/*.yaml × every dim its class supports: the model tests run on these, at the YAML's defaults
MODEL_CASES = [(name, dim) for name in conf_choices("model") for dim in model_dims(name)]
MODEL_IDS = [f"{name}-{dim}d" for name, dim in MODEL_CASES]


@functools.lru_cache(maxsize=None)
def smallest_resolution(overrides: tuple[str, ...]) -> int:
    """The smallest data resolution in 8, 16, 32, 64 that the train config's model accepts (halves at every
    level, fits its attention windows), as `diffuse train` checks it before step 1."""
    from diffuse.building import build
    from diffuse.errors import DiffuseError
    from diffuse.validation import check_model_fits_data
    for resolution in (8, 16, 32, 64):
        cfg = compose_config("train", [*overrides, f"dataset.resolution={resolution}"])
        model = build(cfg.model, "model")
        try:
            check_model_fits_data(model, (int(cfg.dataset.channels), *[resolution] * int(cfg.dim)),
                                  int(model.num_classes or 0), "test")
            return resolution
        except DiffuseError:
            continue
    raise AssertionError(f"{' '.join(overrides)}: the model accepts none of the resolutions 8, 16, 32, 64")


def model_takes_labels(name: str, dim: int) -> bool:
    """Whether the class behind conf/model/NAME.yaml takes class labels at DIM (its `label_free_dims` say where
    not: diffusers' UNet1DModel has no class embedding)."""
    from diffuse.building import part_class
    return dim not in getattr(part_class(_group_node("model", name)["_target_"]), "label_free_dims", ())


def model_overrides(name: str, dim: int) -> list[str]:
    """`model=NAME dim=DIM` at the YAML's sizes, on the smallest resolution the model accepts (and
    conditional=false where it takes no labels)."""
    args = (f"model={name}", f"dim={dim}") + (() if model_takes_labels(name, dim) else ("conditional=false",))
    return [*args, f"dataset.resolution={smallest_resolution(args)}"]


# A run small enough for a unit test: 8×8 data, a 2-level UNet of width 8, batch 4.
TINY = ["dataset.resolution=8", "dataset.size=64", "model.base_channels=8", "model.channel_mult=[1,2]",
        "model.time_emb_dim=8", "trainer.batch_size=4", "trainer.sample_every=0", "trainer.log_every=1",
        "logger=none", "device=cpu"]
CUDA_TINY = [o for o in TINY if not o.startswith("device=")] + ["device=cuda"]  # the same run on the GPU

# 2 steps of batch 2 on 16 items, as command-line overrides (with model_overrides(name, dim) for any model)
TWO_TINY_STEPS = ["trainer.max_steps=2", "trainer.batch_size=2", "dataset.size=16", "trainer.sample_every=0",
                  "trainer.log_every=1", "logger=none", "device=cpu"]


@pytest.fixture
def one_thread():
    """One intra-op thread for small tensors: thread hand-offs would cost more than the arithmetic on a shared
    machine. Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def one_adam_step(model, x, t, y) -> None:
    """One AdamW step (lr 1e-3) on an MSE to a fixed random target: zero-initialised output heads move off zero,
    so every other layer's gradient shows."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    target = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    torch.nn.functional.mse_loss(model(x, t, y), target).backward()
    opt.step()
    opt.zero_grad()


def requires_cuda(test):
    """Marks a test `cuda` (`pytest -m cuda` runs just these) and skips it where no CUDA device is present
    (CI has none): the GPU twin of a CPU test, kept in the same file."""
    skip = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
    return pytest.mark.cuda(skip(test))


def straight_and_resumed(tmp_path: Path, overrides: list[str], at_step: int) -> tuple[Path, Path]:
    """`diffuse train overrides` straight through in tmp_path/straight; then what an interrupted run leaves (its
    step-`at_step` checkpoint as last.ckpt in tmp_path/interrupted) resumed to the end. Returns both folders."""
    from diffuse.jobs import train as train_job

    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    train_job.run(compose_cfg("train", overrides), straight, [])
    (interrupted / "checkpoints").mkdir(parents=True)
    shutil.copy(straight / "checkpoints" / f"step_{at_step}.ckpt", interrupted / "checkpoints" / "last.ckpt")
    train_job.run(compose_cfg("train", [*overrides, f"resume={interrupted}"]), tmp_path / "ignored",
                  [f"resume={interrupted}"])
    return straight, interrupted


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """‖got − want‖ / ‖want‖ in float64 on the CPU."""
    got, want = got.double().cpu(), want.double().cpu()
    return ((got - want).norm() / want.norm()).item()


def compose_cfg(name: str, overrides: list[str]):
    return compose_config(name, overrides)


def run_cli(args: list[str], cwd: Path, timeout: float = 300, env: dict | None = None,
            launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    """`python -m diffuse ARGS` in `cwd`; returns the finished process (stdout+stderr as text)."""
    full_env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1",
                **(env or {})}
    cmd = (launcher or [sys.executable, "-m", "diffuse"]) + args
    return subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def shared_data() -> Path:
    if not (SHARED_DATA / "MNIST" / "raw").is_dir():
        pytest.skip("../shared/data (MNIST/Fashion-MNIST) not present")
    return SHARED_DATA


# -- Flowers102 on a tiny folder in its format ----------------------------------------------------------------
FLOWERS_SPLITS = {"trnid": [1, 2, 3, 4, 5, 6], "valid": [7, 8, 9], "tstid": [10, 11, 12]}


def flowers_label(image_id: int) -> int:  # 1-based, as in imagelabels.mat
    return (image_id * 7) % 5 + 1


def write_tiny_flowers(root: Path) -> Path:
    """root/flowers-102: 12 JPEGs 96×64 (landscape) or 64×96 (portrait): red left half, blue right half, a green
    top stripe; imagelabels.mat and setid.mat as Oxford's. Returns root (what dataset.root takes)."""
    from PIL import Image
    from scipy.io import savemat

    base = root / "flowers-102"
    (base / "jpg").mkdir(parents=True)
    for i in range(1, 13):
        w, h = (96, 64) if i % 2 else (64, 96)
        img = np.zeros((h, w, 3), np.uint8)
        img[:, : w // 2, 0] = 255
        img[:, w // 2:, 2] = 255
        img[: h // 8, :, :] = (0, 255, 0)
        Image.fromarray(img).save(base / "jpg" / f"image_{i:05d}.jpg", quality=95)
    savemat(base / "imagelabels.mat", {"labels": np.array([[flowers_label(i) for i in range(1, 13)]])})
    savemat(base / "setid.mat", {k: np.array([v]) for k, v in FLOWERS_SPLITS.items()})
    return root


@pytest.fixture
def tiny_flowers(tmp_path) -> Path:
    """A tiny Flowers102 folder (write_tiny_flowers) under tmp_path; returns tmp_path."""
    return write_tiny_flowers(tmp_path)

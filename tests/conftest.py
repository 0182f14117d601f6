"""Shared helpers: compose configs in-process, tiny run settings, run the CLI in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from diffuse.app import CONF_DIR, _register_resolvers

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# A run small enough for a unit test: 8×8 data, a 2-level UNet of width 8, batch 4.
TINY = ["dataset.resolution=8", "dataset.size=64", "model.base_channels=8", "model.channel_mult=[1,2]",
        "model.time_emb_dim=8", "trainer.batch_size=4", "trainer.sample_every=0", "trainer.log_every=1",
        "logger=none", "device=cpu"]


def compose_cfg(name: str, overrides: list[str]):
    _register_resolvers()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


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

"""Hydra entry point: compose `conf/<job>.yaml` with the overrides and run `diffuse.jobs.<job>.run`.

Errors meant for the user (DiffuseError, bad config values) are printed on one line, exit code 1.
"""

from __future__ import annotations

import importlib
import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from diffuse.errors import DiffuseError

log = logging.getLogger("diffuse")

CONF_DIR = str(Path(__file__).parent / "conf")


def _register_resolvers() -> None:
    if not OmegaConf.has_resolver("if"):
        # ${if:cond,a,b}: lets `conditional: false` turn a model's num_classes to 0 in YAML
        OmegaConf.register_new_resolver("if", lambda cond, a, b: a if cond else b)


def launch(config_name: str, overrides: list[str]) -> None:
    _register_resolvers()

    def task(cfg: DictConfig) -> dict | None:
        hc = HydraConfig.get()
        job = importlib.import_module(f"diffuse.jobs.{config_name}")
        try:
            return job.run(cfg, Path(hc.runtime.output_dir), list(hc.overrides.task))
        except DiffuseError as e:
            print(f"diffuse {config_name}: error: {e}", file=sys.stderr)
            sys.exit(1)

    sys.argv = [f"diffuse {config_name}"] + overrides
    hydra.main(config_path=CONF_DIR, config_name=config_name, version_base="1.3")(task)()

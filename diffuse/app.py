"""Hydra entry point: compose `conf/<job>.yaml` with the overrides and run `diffuse.jobs.<job>.run`.

Errors meant for the user (DiffuseError, bad config values) are printed on one line, exit code 1.
"""

from __future__ import annotations

import importlib
import logging
import sys
from datetime import datetime
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from diffuse.data.folder import RESOLVER as FOLDER_CLASSES
from diffuse.data.folder import count_classes
from diffuse.errors import DiffuseError
from diffuse.jobs.common import SEARCH_ROOTS
from diffuse.training.checkpoint import latest_run, run_folder_of, run_kind
from diffuse.validation import validate

log = logging.getLogger("diffuse")

CONF_DIR = str(Path(__file__).parent / "conf")


def resumed_run_folder(resume, kind: str) -> Path | None:
    """The run folder that `resume=…` continues (None: a fresh run, or a checkpoint outside any run folder).
    Resolved before the job starts, so that Hydra puts a resumed run's log and config in its own folder;
    anything it cannot find is left to the job, which says why in one line."""
    if not resume:
        return None
    try:
        if resume in ("auto", True, "latest"):
            run = latest_run(kind, SEARCH_ROOTS)
            return run if run is not None and (run / "checkpoints" / "last.ckpt").is_file() else None
        path = Path(str(resume)).expanduser()
        run = path if path.is_dir() else run_folder_of(path)
        return run if run is not None and run_kind(run) == kind else None
    except OSError:
        return None


def _register_resolvers() -> None:
    if not OmegaConf.has_resolver("if"):
        # ${if:cond,a,b}: lets `conditional: false` turn a model's num_classes to 0 in YAML
        OmegaConf.register_new_resolver("if", lambda cond, a, b: a if cond else b)
    if not OmegaConf.has_resolver(FOLDER_CLASSES):
        # ${folder_classes:path,extensions}: dataset=folder counts its class sub-folders at compose time
        OmegaConf.register_new_resolver(FOLDER_CLASSES, count_classes)
    if not OmegaConf.has_resolver("diffuse_run_dir"):
        # hydra.run.dir of train / train-vae: a resumed run's own folder, else the new default folder
        OmegaConf.register_new_resolver(
            "diffuse_run_dir", lambda resume, kind, default: str(resumed_run_folder(resume, kind) or default))
        # hydra.output_subdir: a resumed run keeps its first .hydra/ and records this start beside it
        OmegaConf.register_new_resolver(
            "diffuse_hydra_subdir", lambda resume, kind: ".hydra" if resumed_run_folder(resume, kind) is None
            else f".hydra/resume-{datetime.now():%Y-%m-%d_%H-%M-%S}")


def launch(config_name: str, overrides: list[str]) -> None:
    _register_resolvers()

    def task(cfg: DictConfig) -> dict | None:
        hc = HydraConfig.get()
        job = importlib.import_module(f"diffuse.jobs.{config_name}")
        try:
            validate(cfg, config_name)
            return job.run(cfg, Path(hc.runtime.output_dir), list(hc.overrides.task))
        except DiffuseError as e:
            print(f"diffuse {config_name}: error: {e}", file=sys.stderr)
            sys.exit(1)

    sys.argv = [f"diffuse {config_name}"] + overrides
    hydra.main(config_path=CONF_DIR, config_name=config_name, version_base="1.3")(task)()

"""Hydra entry point: compose `conf/<job>.yaml` with the overrides and run `diffuse.jobs.<job>.run`.

Errors meant for the user (DiffuseError, bad config values) are printed on one line, exit code 1 (128 + the
signal's number for a run stopped by a signal). In a multirun a failed job is reported and the sweep goes on;
the sweep then exits 1 naming each failed job. A job returns `optimized_metric`'s value (a float) to Hydra,
which is what a sweeper such as Optuna optimises.
"""

from __future__ import annotations

import importlib
import logging
import sys
from datetime import datetime
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.plugins import Plugins
from hydra.plugins.search_path_plugin import SearchPathPlugin
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from diffuse.data.folder import RESOLVER as FOLDER_CLASSES
from diffuse.data.folder import count_classes
from diffuse.dims import by_dim
from diffuse.errors import DiffuseError
from diffuse.jobs.common import SEARCH_ROOTS
from diffuse.storage.checkpoint import latest_run, run_folder_of, run_kind
from diffuse.training.stopping import Interrupted
from diffuse.validation import validate

log = logging.getLogger("diffuse")

CONF_DIR = str(Path(__file__).parent / "conf")
PROJECT_CONF = "conf"  # a user's own configs, in the folder `diffuse` runs from


class ProjectConfigDir(SearchPathPlugin):
    """Puts ./conf (when there is one) on Hydra's config search path right before our packaged conf/, so a
    project's `conf/experiment/mine.yaml` or `conf/model/mynet.yaml` is a choice with no flag, and a file of
    the same name as one of ours (conf/model/unet.yaml) wins over ours.

    Why a plugin: `--config-dir` (one folder, taken by the user's own flag) and `hydra.searchpath` (entries
    appended after the primary config dir, and a warning on every run where the folder is missing) both
    put the folder *behind* the packaged configs; a SearchPathPlugin is Hydra's documented hook to place a
    folder anywhere. It is registered by `launch` only (not through the global `hydra_plugins` namespace),
    and acts only on the search path whose primary configs are ours, so other Hydra apps never see it."""

    def manipulate_search_path(self, search_path) -> None:
        folder = Path.cwd() / PROJECT_CONF
        ours = [e for e in search_path.get_path() if e.provider == "main" and
                str(e.path).removeprefix("file://") == CONF_DIR]
        if ours and folder.is_dir() and folder.resolve() != Path(CONF_DIR).resolve():
            search_path.prepend(provider="diffuse-project", path=f"file://{folder}", anchor="main")


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
    if not OmegaConf.has_resolver("by_dim"):
        # ${by_dim:${dim},a,b,c}: defaults sized per dim (3-D shapes at 16³, a narrower 3-D network, …)
        OmegaConf.register_new_resolver("by_dim", by_dim)
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


def compose_config(config_name: str, overrides: list[str] = ()) -> DictConfig:
    """The config `diffuse <command> overrides` would compose, in this process (benchmarks and tests build a
    job from it): no run folder, no validation."""
    _register_resolvers()
    with hydra.initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra.compose(config_name=config_name, overrides=list(overrides))


def optimized_value(summary, name: str | None, required: bool):
    """What a job returns to Hydra: the float its sweeper optimises (`optimized_metric`), else None; a
    sweeper that optimises (`required`) gets an error for a value the job did not produce."""
    if not name or (not required and (not isinstance(summary, dict) or summary.get(name) is None)):
        return None
    if not isinstance(summary, dict) or summary.get(name) is None:
        raise DiffuseError(f"optimized_metric={name}: the job produced no such value "
                           f"(it produced: {', '.join(sorted(summary or {}))})")
    return float(summary[name])


def launch(config_name: str, overrides: list[str]) -> None:
    _register_resolvers()
    Plugins.instance().register(ProjectConfigDir)  # ./conf before the packaged configs (see the class)
    failures: list[str] = []

    def task(cfg: DictConfig) -> float | None:
        hc = HydraConfig.get()
        job = importlib.import_module(f"diffuse.jobs.{config_name}")
        try:
            validate(cfg, config_name)
            optimizing = "optuna" in str(hc.sweeper.get("_target_", ""))
            problem = None  # a sweep every trial of which would fail the same way: stop it now
            if optimizing and not cfg.get("optimized_metric"):
                problem = (f"an Optuna sweep needs a metric, but `diffuse {config_name.replace('_', '-')}` "
                           "returns none here: set optimized_metric")
            elif optimizing and cfg.optimized_metric == "val_loss" and not cfg.trainer.get("val_items"):
                problem = "optimized_metric=val_loss needs the validation loss: trainer.val_items > 0"
            elif optimizing and cfg.optimized_metric in ("fd", "fid") and (
                    not cfg.trainer.get("eval_every") or cfg.trainer.get("eval_metric") != cfg.optimized_metric):
                problem = (f"optimized_metric={cfg.optimized_metric} needs trainer.eval_every > 0 and "
                           f"trainer.eval_metric={cfg.optimized_metric}")
            if problem:
                print(f"diffuse {config_name}: error: {problem}", file=sys.stderr)
                sys.exit(1)
            try:
                summary = job.run(cfg, Path(hc.runtime.output_dir), list(hc.overrides.task))
            except OSError as e:  # the run folder deleted or read-only, a full disk: the file and the reason
                where = f" {e.filename}" if e.filename else ""
                raise DiffuseError(f"cannot write or read{where}: {e.strerror or e}") from None
            return optimized_value(summary, cfg.get("optimized_metric"), optimizing)
        except DiffuseError as e:
            print(f"diffuse {config_name}: error: {e}", file=sys.stderr)
            if hc.mode != RunMode.MULTIRUN or isinstance(e, Interrupted):
                sys.exit(getattr(e, "exit_code", 1))
            # one job of a sweep failed: say which and go on with the others (None: Optuna records a failed
            # trial; a NaN would make optuna-sweeper 1.3 tell the trial twice and crash)
            failures.append(f"job {hc.job.num} [{' '.join(hc.overrides.task)}] in {hc.runtime.output_dir}: {e}")
            return None

    sys.argv = [f"diffuse {config_name}"] + overrides
    hydra.main(config_path=CONF_DIR, config_name=config_name, version_base="1.3")(task)()
    if failures:
        print(f"diffuse {config_name}: {len(failures)} job(s) of the sweep failed:", file=sys.stderr)
        for line in failures:
            print(f"  {line}", file=sys.stderr)
        sys.exit(1)

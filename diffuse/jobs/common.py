"""What several jobs share: device choice, building parts from config, reading a run back from a checkpoint."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from omegaconf import DictConfig, OmegaConf

from diffuse.building import build
from diffuse.errors import DiffuseError
from diffuse.tracking import Tracker
from diffuse.training.checkpoint import KINDS, latest_run, load_checkpoint
from diffuse.training.distributed import broadcast_object, cleanup, init_distributed

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """auto = cuda → mps → cpu; an explicit device that is missing is an error, not a silent fallback."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DiffuseError(f"device must be auto, cpu, cuda[:N] or mps; got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DiffuseError("device=cuda but no CUDA device is available (use device=auto or device=cpu)")
    return device


def check_dim(cfg: DictConfig) -> int:
    dim = cfg.get("dim")
    if dim not in (1, 2, 3):
        raise DiffuseError(f"dim must be 1, 2 or 3; got {dim!r}")
    return dim


def build_dataset(cfg: DictConfig, device: torch.device | None = None):
    """The configured dataset, checked against the run's `dim`. With a device, datasets that can (in-memory
    images, `shapes`) move there, so batches are drawn on the training device, not copied to it."""
    dataset = build(cfg.dataset, "dataset")
    if dataset.dim != cfg.dim:
        name = cfg.dataset._target_.rsplit(".", 1)[-1]
        raise DiffuseError(f"dataset {name} is {dataset.dim}-D but dim={cfg.dim}")
    if device is not None and hasattr(dataset, "to"):
        dataset.to(device)
    return dataset


def run_trainer_process(cfg: DictConfig, run_dir: Path, state: dict | None, train: Callable) -> dict:
    """The process around a trainer: checks dim, picks the device, joins the torchrun group if any (a GPU per
    process), shares rank 0's run dir, seeds per rank, then `train(cfg, run_dir, state, device, dist)`;
    the group is always left."""
    check_dim(cfg)
    dist, device = init_distributed(resolve_device(cfg.device))
    try:
        run_dir = Path(broadcast_object(str(run_dir), dist))
        torch.manual_seed(cfg.seed + dist.rank)
        return train(cfg, run_dir, state, device, dist)
    finally:
        cleanup(dist)


def build_tracker(cfg: DictConfig, run_dir: Path, config_dict: dict, state: dict | None, is_main: bool):
    """The run's Tracker from `cfg.logger`; a resumed run continues its W&B run (id kept in the checkpoint)
    and its metrics.jsonl, from which the lines after the checkpoint's step are dropped (logged again)."""
    tracker = Tracker(run_dir, mode=cfg.logger.mode, project=cfg.logger.project, config=config_dict,
                      name=cfg.logger.get("name"), run_id=state.get("wandb_id") if state else None,
                      enabled=is_main)
    if state is not None:
        tracker.drop_after(int(state["step"]))
    return tracker


def data_shape(dataset) -> tuple[int, ...]:
    """[C, *spatial] of one item."""
    return (dataset.channels, *([dataset.resolution] * dataset.dim))


SEARCH_ROOTS = ("outputs", "multirun")
JOB_OF_KIND = {"diffusion": "diffuse train", "vae": "diffuse train-vae"}


def find_checkpoint(spec: str | None, kind: str = "diffusion", for_resume: bool = False) -> Path:
    """`spec` may be a file, a run folder, or None/'auto'. auto: the newest run of `kind` under outputs/ or
    multirun/ — to sample, the newest that has a checkpoint; to resume, the run (re)started last, and an
    error if it stopped before its first checkpoint (never silently an older, different run)."""
    if spec in (None, "", "auto", "latest"):
        run = latest_run(kind, SEARCH_ROOTS, with_checkpoint=not for_resume)
        if run is None:
            raise DiffuseError(f"no run of {KINDS[kind]} found under outputs/ or multirun/: run "
                               f"`{JOB_OF_KIND[kind]}` first, or pass a checkpoint path")
        path = run / "checkpoints" / "last.ckpt"
        if not path.is_file():
            raise DiffuseError(f"the newest {JOB_OF_KIND[kind]} run, {run}, stopped before its first checkpoint: "
                               "nothing to resume there; pass resume=PATH for another run, or start afresh")
        return path
    path = Path(spec).expanduser()
    if path.is_dir():
        candidate = path / "checkpoints" / "last.ckpt"
        if candidate.is_file():
            return candidate
        raise DiffuseError(f"no checkpoints/last.ckpt in run folder {path}")
    if not path.exists():
        raise DiffuseError(f"checkpoint not found: {path}")
    return path


@dataclass
class LoadedRun:
    """A trained run rebuilt from its checkpoint alone."""

    path: Path
    config: DictConfig
    model: torch.nn.Module  # the EMA weights, in eval mode
    schedule: object
    step: int
    state: dict


def load_run(spec: str | None, device: torch.device, use_ema: bool = True, allow_targets=()) -> LoadedRun:
    """A diffusion checkpoint (vetted: see load_checkpoint) → its model with the EMA or raw weights."""
    path = find_checkpoint(spec, "diffusion")
    state = load_checkpoint(path, kind="diffusion", allow_targets=allow_targets)
    cfg = OmegaConf.create(state["config"])
    model = build(cfg.model, "model")
    weights = state["ema"]["model"] if use_ema and "ema" in state else state["model"]
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise DiffuseError(f"checkpoint {path} does not match its own model config: {str(e).splitlines()[0]}") from None
    model.to(device).eval().requires_grad_(False)
    schedule = build(cfg.schedule, "schedule")
    log.info("loaded %s (step %d)", path, state["step"])
    return LoadedRun(path=path, config=cfg, model=model, schedule=schedule, step=int(state["step"]), state=state)

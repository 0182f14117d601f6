"""What several jobs share: the process around a trainer (device, process group, resume), its Run and its
wrap-up (`fit`), the command's result lines (`report`), and reading a run back from a checkpoint or export."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from omegaconf import DictConfig, OmegaConf

from diffuse.building import LOCATION_KEYS, build, escape_interpolations, without_locations
from diffuse.data.latent import LatentDataset, is_latent_run
from diffuse.devices import resolve_device
from diffuse.dims import check_dim, item_shape
from diffuse.errors import DiffuseError
from diffuse.tracking import Tracker
from diffuse.storage import hub
from diffuse.storage.checkpoint import KINDS, latest_run, load_checkpoint, run_folder_of, run_kind
from diffuse.training.distributed import broadcast_object, cleanup, init_distributed
from diffuse.training.loop import Run, Trainer
from diffuse.storage.export import is_export, read_export, run_config
from diffuse.validation import validate, validate_stored

log = logging.getLogger(__name__)


def build_dataset(cfg: DictConfig, device: torch.device | None = None, vae_record: dict | None = None):
    """The configured dataset, checked against the run's `dim`. With a device, datasets that can (in-memory
    images, `shapes`) move there, so batches are drawn on the training device, not copied to it.
    vae_record: a resumed latent run's VAE as its checkpoint embeds it, used instead of any VAE path the
    stored config names (a checkpoint never chooses which files are read)."""
    if vae_record is not None and is_latent_run(cfg):
        node = OmegaConf.to_container(cfg.dataset, resolve=True)
        del node["_target_"]
        dataset = LatentDataset(**{**node, "data": build(node["data"], "dataset"), "vae": vae_record})
    else:
        dataset = build(cfg.dataset, "dataset")
    if dataset.dim != cfg.dim:
        name = cfg.dataset._target_.rsplit(".", 1)[-1]
        raise DiffuseError(f"dataset {name} is {dataset.dim}-D but dim={cfg.dim}")
    if device is not None and hasattr(dataset, "to"):
        dataset.to(device)
    return dataset


def on_rank0(fn: Callable, dist, share: bool = True):
    """fn() on rank 0, its result (or its one-line error) on every rank; share=False: the result stays on
    rank 0 (the others get None) and only an error travels."""
    outcome = result = None
    if dist.is_main:
        try:
            result = fn()
            outcome = ("ok", result if share else None)
        except DiffuseError as e:
            outcome = ("error", str(e))
    kind, value = broadcast_object(outcome, dist)
    if kind == "error":
        raise DiffuseError(value)
    return value if share else result


@contextmanager
def joined_processes(device_name: str, run_dir: Path, timeout_min: float = 60):
    """This process in the launcher's group, if it started several (torchrun, Slurm tasks): (its DistInfo, its
    device, rank 0's run dir: only rank 0 has a Hydra run folder); one process: as given. The group is always
    left."""
    dist, device = init_distributed(resolve_device(device_name), timeout_min)
    try:
        yield dist, device, Path(broadcast_object(str(run_dir), dist))
    finally:
        cleanup(dist)


def run_trainer_process(cfg: DictConfig, run_dir: Path, overrides: list[str], kind: str, train: Callable) -> dict:
    """The process around a trainer: checks dim, joins the processes (joined_processes: a GPU each, rank 0's
    run dir), takes rank 0's choice of the checkpoint to resume (auto and self look at the file system, which
    ranks may see differently), merges and checks a resumed run's config, seeds per rank, then
    `train(cfg, run_dir, state, device, dist)`."""
    check_dim(cfg.get("dim"))
    with joined_processes(cfg.device, run_dir, cfg.trainer.get("dist_timeout_min", 60)) as (dist, device, run_dir):
        if cfg.get("resume"):
            cfg.resume = on_rank0(lambda: resume_checkpoint(cfg, run_dir, kind), dist)
        cfg, run_dir, state = resolve_resume(cfg, run_dir, overrides, kind)
        if state is not None:
            validate(cfg, "train" if kind == "diffusion" else "train_vae")  # the merged config
        torch.manual_seed(cfg.seed + dist.rank)
        return train(cfg, run_dir, state, device, dist)


# Groups whose choice defines the run: a resumed run keeps them from its checkpoint.
RUN_DEFINING = {"diffusion": ("model", "schedule", "dataset", "dim", "objective", "conditional", "latent"),
                "vae": ("vae", "loss", "dataset", "dim")}


def override_keys(overrides: list[str]) -> list[str]:
    """The config keys a command line's overrides set (`+a.b=1` → a.b; `~a` → a), without hydra.* ones. The
    one place a job reads the raw command line: resuming must tell what this start changes from the
    stored config's values, which the composed config alone cannot."""
    keys = (item.split("=", 1)[0].lstrip("+~") for item in overrides)
    return [key for key in keys if not key.startswith("hydra.")]


def location_key(key: str) -> bool:
    """dataset.root / path / cache_dir / download: where the data is read, cached or fetched from, which a
    resumed run takes from the command line, never from its checkpoint (building.LOCATION_KEYS)."""
    group, _, rest = key.partition(".")
    return group == "dataset" and rest in LOCATION_KEYS


def refuse_run_defining(overrides: list[str], kind: str) -> None:
    """A resumed run keeps what defines it (model, data, schedule, …, and the experiment that chose them):
    changing it is an error. Where its data lies (dataset.root=…, dataset.path=…) is this machine's to say."""
    for key in override_keys(overrides):
        group = key.split(".")[0]
        if group == "experiment":
            raise DiffuseError(f"cannot change {key!r} when resuming: an experiment chooses the model, data and "
                               "schedule, which the run keeps; start a new run instead")
        if group in RUN_DEFINING[kind] and not location_key(key):
            raise DiffuseError(f"cannot change {key!r} when resuming: the run keeps its {group}; "
                               "start a new run instead")


def merge_resume_config(saved: dict, cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """The resumed run's config: the checkpoint's, plus the values this command line sets (e.g.
    trainer.max_steps=…), taken from the composed config. The data's location (root, path, cache_dir,
    download) comes from this command line or the defaults, never from the checkpoint: a latent run's
    inner data takes it."""
    keys = [k for k in override_keys(overrides) if k != "resume"]
    given = {k.partition(".")[2]: OmegaConf.select(cfg, k) for k in keys if location_key(k)}
    merged = OmegaConf.create({**saved, "dataset": without_locations(saved["dataset"], given)})
    for key in keys:
        if location_key(key):
            continue
        # a group choice (logger=none) replaces the whole node; a value (trainer.max_steps=…) just itself
        OmegaConf.update(merged, key, OmegaConf.select(cfg, key), force_add=True, merge=False)
    inner = merged.dataset.get("data", merged.dataset)
    if "path" in inner and not inner.path:
        raise DiffuseError("this run trained on a folder (dataset=folder), and a checkpoint never chooses the files "
                           "read: give the folder again with dataset.path=FOLDER")
    return merged


def resume_checkpoint(cfg: DictConfig, run_dir: Path, kind: str) -> str | None:
    """The checkpoint `resume` names: auto = the run of `kind` under outputs/ (re)started last; self = this
    run folder's own last.ckpt if it has one (a requeued or restarted job), else None (a fresh start);
    PATH = a checkpoint file or run folder."""
    if cfg.resume == "self":
        own = run_dir / "checkpoints" / "last.ckpt"
        return str(own) if own.is_file() and run_kind(run_dir) == kind else None
    return str(find_checkpoint(None if cfg.resume in ("auto", True) else str(cfg.resume), kind, for_resume=True))


def resolve_resume(cfg: DictConfig, run_dir: Path, overrides: list[str],
                   kind: str = "diffusion") -> tuple[DictConfig, Path, dict | None]:
    """With `resume` a concrete checkpoint path (see resume_checkpoint): the resumed run's merged config, its
    folder and state. A checkpoint inside a run folder continues there; any other file (a copy in ~/) starts
    a new run folder from its state instead of writing next to it."""
    if not cfg.get("resume") or cfg.resume == "self":
        return cfg, run_dir, None
    path = find_checkpoint(str(cfg.resume), kind, for_resume=True)
    state = load_checkpoint(path, kind=kind, allow_targets=cfg.get("allow_targets") or ())
    refuse_run_defining(overrides, kind)
    merged = merge_resume_config(state["config"], cfg, overrides)
    merged.resume = str(path)
    folder = run_folder_of(path)
    if folder is None:
        log.info("%s is not inside a run folder: continuing its run in %s", path, run_dir)
    log.info("resuming %s from step %d", path, state["step"])
    return merged, folder or run_dir, state


def start_run(cfg: DictConfig, run_dir: Path, state: dict | None, device: torch.device, dist) -> Run:
    """The trainer's Run: the resolved config its checkpoints keep and its Tracker from `cfg.logger`; a
    resumed run continues its W&B run (id kept in the checkpoint) and its metrics.jsonl, from which the lines
    after the checkpoint's step are dropped (logged again)."""
    config = OmegaConf.to_container(cfg, resolve=True)
    tracker = Tracker(run_dir, mode=cfg.logger.mode, project=cfg.logger.project, config=config,
                      name=cfg.logger.get("name"), run_id=state.get("wandb_id") if state else None,
                      enabled=dist.is_main)
    if state is not None:
        tracker.drop_after(int(state["step"]))
    # stored escaped, so that a value holding `${` (logger.name='exp\\${1}') reads back as the literal it was
    return Run(dir=run_dir, tracker=tracker, dist=dist, device=device, seed=int(cfg.seed),
               config=escape_interpolations(config))


def fit(trainer: Trainer, state: dict | None, what: str, after: Callable[[dict], None] | None = None) -> dict:
    """What every trainer does once built: continue a resumed state, say what it trains, fit, run `after`
    (summary) while the tracker is still open, close the tracker; the summary, with run_dir and the
    parameter count. what: the model, for the start line (e.g. "model UNet")."""
    if state is not None:
        trainer.load_state_dict(state)
    dist, n_params = trainer.dist, trainer.num_parameters
    if dist.is_main:
        batch, accum = trainer.data.batch_size, trainer.settings.grad_accum_steps
        log.info("%s: %.2fM parameters; %d steps of batch %d×%d%s (global batch %d) on %s in %s; run dir %s",
                 what, n_params / 1e6, trainer.max_steps, batch, dist.world_size,
                 f"×{accum} accumulated" if accum > 1 else "", batch * dist.world_size * accum, trainer.device,
                 trainer.precision, trainer.run_dir)
    try:
        summary = trainer.fit()
        if after is not None:
            after(summary)
    finally:
        trainer.tracker.finish()
    summary.update(run_dir=str(trainer.run_dir), parameters=n_params)
    if dist.is_main:
        log.info("done: step %d, loss %.4f, checkpoint %s", summary["step"], summary["loss"], summary["checkpoint"])
    return summary


def report(*lines: str) -> None:
    """The command's result on stdout: the paths it wrote ("samples: PATH", one per line, which scripts parse)
    and the numbers it measured. Everything else (progress, diagnostics) goes through logging."""
    for line in lines:
        print(line, flush=True)


def data_shape(dataset) -> tuple[int, ...]:
    """[C, *spatial] of one item."""
    return item_shape(dataset.channels, dataset.resolution, dataset.dim)


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
    path = Path(hub.local(spec)).expanduser()  # hf://…: downloaded, then read as a local path
    if path.suffix == ".safetensors" and is_export(path.parent):  # the export's weights file: its folder
        path = path.parent
    if path.is_dir():
        candidate = path / "checkpoints" / "last.ckpt"
        if candidate.is_file():
            return candidate
        if is_export(path):  # `diffuse export`'s folder: weights for sampling, nothing to resume
            if for_resume or kind != "diffusion":
                raise DiffuseError(f"{path} is a `diffuse export` folder (weights only): it cannot be resumed; "
                                   f"start a new run from it with init_from={path}")
            return path
        raise DiffuseError(f"no checkpoints/last.ckpt in run folder {path} (nor config.json + "
                           "model.safetensors of a `diffuse export`)")
    if not path.exists():
        raise DiffuseError(f"checkpoint not found: {path}")
    return path


@dataclass
class LoadedRun:
    """A trained run rebuilt from its checkpoint (or `diffuse export` folder) alone."""

    path: Path  # the checkpoint file, or the export folder
    config: DictConfig
    model: torch.nn.Module  # the EMA weights, in eval mode
    schedule: object
    step: int
    state: dict


def load_run(spec: str | None, device: torch.device, use_ema: bool = True, allow_targets=()) -> LoadedRun:
    """A diffusion checkpoint (vetted: see load_checkpoint) or a `diffuse export` folder (its config.json vetted
    the same way, before anything is built) → its model with the EMA or raw weights."""
    path = find_checkpoint(spec, "diffusion")
    if path.is_dir():
        return _load_export(path, device, use_ema, allow_targets)
    state = load_checkpoint(path, kind="diffusion", allow_targets=allow_targets)
    cfg = OmegaConf.create(state["config"])
    validate_stored(cfg, str(path))
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


def _load_export(folder: Path, device: torch.device, use_ema: bool, allow_targets) -> LoadedRun:
    """A `diffuse export` folder as a LoadedRun: config.json vetted by check_targets before the model is built,
    weights from safetensors; `state` carries what sampling reads from a checkpoint (config, class names,
    the VAE record of a latent run)."""
    meta, weights, vae_weights = read_export(folder, allow_targets)
    if not use_ema and meta.get("weights") == "ema":
        log.warning("%s holds the EMA weights only (exported with use_ema=true): sampling those", folder)
    config = run_config(meta)
    cfg = OmegaConf.create(config)
    validate_stored(cfg, str(folder / "config.json"))
    model = build(cfg.model, "model")
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise DiffuseError(f"{folder}/model.safetensors does not match its config.json's model: "
                           f"{str(e).splitlines()[0]}") from None
    model.to(device).eval().requires_grad_(False)
    schedule = build(cfg.schedule, "schedule")
    state = {"step": int(meta.get("step") or 0), "config": config, "class_names": meta.get("class_names") or [],
             "kind": "diffusion"}
    if vae_weights is not None:
        state["latent_vae"] = {"config": meta["vae"]["config"], "weights": vae_weights,
                               "path": str(meta["vae"].get("source") or folder), "step": meta["vae"].get("step", 0)}
    log.info("loaded export %s (step %d, %s weights)", folder, state["step"], meta.get("weights", "?"))
    return LoadedRun(path=folder, config=cfg, model=model, schedule=schedule, step=state["step"], state=state)

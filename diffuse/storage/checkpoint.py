"""Checkpoints: one dict of tensors and plain values, written atomically, read without running code.

Layout: {"format": "diffuse-checkpoint", "version": 1, "kind" ("diffusion" | "vae"), "step", "config"
(resolved, plain containers), "model", "ema", "optimizer", "lr_scheduler", "rng", "data", ...}.
`torch.load(weights_only=True)` reads it and `check_targets` vets its stored config (and an embedded VAE
record's) before anything is built from them, so loading a checkpoint can never execute code; a foreign,
corrupt or wrong-kind file gets a one-line error.

Run folders: a trainer marks its run folder with `run.json` ({"kind": …, "started": …}), rewritten at every (re)start,
so `resume=auto` and `diffuse sample` find the newest run of their own kind (a VAE run is never taken
for a diffusion run), and a checkpoint outside a run folder is never mistaken for one.
"""

from __future__ import annotations

import json
import math
import pickle
import re
import struct
import time
import zipfile
from collections.abc import Iterable
from pathlib import Path

import torch

from diffuse.building import check_targets, upgrade_stored_config
from diffuse.errors import DiffuseError
from diffuse.files import atomic_write

FORMAT = "diffuse-checkpoint"
VERSION = 1
KINDS = {"diffusion": "a diffusion model (`diffuse train`)", "vae": "a VAE (`diffuse train-vae`)"}
RUN_MARKER = "run.json"


def non_finite(named_tensors: dict[str, Iterable[torch.Tensor]]) -> list[str]:
    """The names whose floating-point tensors hold NaN/inf (none: [])."""
    return [name for name, tensors in named_tensors.items()
            if any(t.is_floating_point() and not bool(torch.isfinite(t).all()) for t in tensors)]


def save_checkpoint(state: dict, path: str | Path) -> Path:
    """Write atomically (diffuse/files.py): a crash never leaves a half-written file, and a failed write (disk
    full) removes its temp file, leaves the file at `path` as it was and is one DiffuseError line."""
    payload = {"format": FORMAT, "version": VERSION, **state}

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            torch.save(payload, f)

    return atomic_write(path, write, "checkpoint")


def checkpoint_kind(state: dict) -> str:
    """"diffusion" or "vae" (checkpoints written before the field existed: from their config)."""
    return state.get("kind") or ("vae" if "vae" in (state.get("config") or {}) else "diffusion")


def load_checkpoint(path: str | Path, map_location="cpu", kind: str | None = None,
                    allow_targets: Iterable[str] = ()) -> dict:
    """Read a checkpoint without running code and vet it: our format, a version we read, `kind` when
    given, the structure the tool writes (check_checkpoint), finite weights, and a stored config that builds
    only our classes (plus `allow_targets` prefixes)."""
    path = Path(path)
    if not path.is_file():
        raise DiffuseError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "GLOBAL" not in str(e):  # not a pickle of objects: a damaged or foreign file
            raise DiffuseError(f"cannot read checkpoint {path}: corrupt or not a PyTorch file") from None
        # torch's own text advises weights_only=False, the one thing not to do: say what the file is instead
        raise DiffuseError(f"cannot read checkpoint {path}: it holds Python objects other than tensors and plain "
                           "values (a pickle that could run code), so it is refused; diffuse never loads such "
                           "a file") from None
    except (RuntimeError, zipfile.BadZipFile, EOFError, ValueError, OSError, struct.error, KeyError, IndexError,
            TypeError, AttributeError, RecursionError, MemoryError) as e:  # a malformed pickle raises any
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DiffuseError(f"cannot read checkpoint {path}: corrupt or not a PyTorch file ({first[:200]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise DiffuseError(f"{path} is not a diffuse checkpoint (no '{FORMAT}' marker); "
                           "train one with `diffuse train`")
    version = state.get("version", 0)
    if not isinstance(version, int) or isinstance(version, bool) or version > VERSION:
        raise DiffuseError(f"{path} has checkpoint version {version!r}; this diffuse reads ≤ {VERSION}")
    if state.get("kind") is not None and state.get("kind") not in KINDS:
        raise DiffuseError(f"{path}: kind {state.get('kind')!r} is not one of {', '.join(KINDS)}")
    found = checkpoint_kind(state)
    if kind is not None and found != kind:
        raise DiffuseError(f"{path} is {KINDS.get(found, found)} checkpoint, but this needs {KINDS[kind]} one")
    check_checkpoint(state, str(path))
    check_targets(upgrade_stored_config(state["config"]), str(path), allow_targets)
    for weights in (state.get("model"), (state.get("ema") or {}).get("model")):
        # compiled runs saved before loop.unwrap() carry `_orig_mod.` keys
        for key in [k for k in weights or {} if "_orig_mod." in k]:
            weights[key.replace("_orig_mod.", "")] = weights.pop(key)
    if state.get("latent_vae") is not None:
        check_targets(state["latent_vae"]["config"], f"{path} (its VAE)", allow_targets)
    return state


# ----- the structure the tool writes: anything else is refused before it is used ---------------------------

def _fail(source: str, key: str, want: str, value) -> None:
    got = _kind_of(value) if value is not None else "nothing"
    raise DiffuseError(f"{source}: {key} must be {want}, found {got}: not a checkpoint diffuse wrote")


def _expect(state: dict, key: str, kind, source: str, want: str, optional: bool = False):
    value = state.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        _fail(source, key, want, value)
    return value


UNFITTED_OK = ("scale_factor",)  # a VAE's `auto` scale factor is NaN until fitted, on purpose


def check_weights(value, source: str, key: str, optional: bool = False) -> None:
    """value: {name: tensor}, the tensors finite (a NaN weight would sample NaN and still exit 0)."""
    if value is None and optional:
        return
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in value.items()):
        _fail(source, key, "a {name: tensor} state dict", value)
    bad = [k for k, v in value.items() if v.is_floating_point() and not k.endswith(UNFITTED_OK)
           and not bool(torch.isfinite(v).all())]
    if bad:
        raise DiffuseError(f"{source}: {key} holds NaN/inf (in {bad[0]}{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}): "
                           "refusing weights that cannot sample")


def _byte_state(value, source: str, key: str, numel: int | None = None) -> None:
    if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8 or value.dim() != 1 or \
            (numel is not None and value.numel() != numel):
        _fail(source, key, f"a uint8 generator state{f' of {numel} bytes' if numel else ''}", value)


CPU_RNG_BYTES = torch.get_rng_state().numel()


def check_checkpoint(state: dict, source: str) -> None:
    """Refuse a checkpoint whose entries are not of the types and sizes the trainers write (a missing key, a
    list where a dict belongs, a generator state of the wrong size, a config of odd shape): one line each,
    before anything reads them."""
    step = _expect(state, "step", int, source, "a whole number")
    if step < 0:
        _fail(source, "step", "≥ 0", step)
    config = _expect(state, "config", dict, source, "the run's config (a mapping)")
    groups = ("model", "schedule", "dataset") if checkpoint_kind(state) == "diffusion" else ("vae", "dataset")
    for group in groups:
        node = config.get(group)
        if not isinstance(node, dict) or not isinstance(node.get("_target_"), str):
            _fail(source, f"config.{group}", "a mapping with a _target_", node)
    dim = config.get("dim")
    if dim not in (1, 2, 3) or isinstance(dim, bool):
        _fail(source, "config.dim", "1, 2 or 3", dim)
    for group in ("trainer", "objective", "sampler", "guidance", "latent", "logger"):
        if config.get(group) is not None and not isinstance(config[group], dict):
            _fail(source, f"config.{group}", "a mapping", config[group])
    check_weights(state.get("model"), source, "model")
    ema = _expect(state, "ema", dict, source, "the EMA's state (a mapping)", optional=True)
    if ema is not None:
        check_weights(ema.get("model"), source, "ema.model")
    for key in ("optimizer", "lr_scheduler", "scaler", "data"):
        _expect(state, key, dict, source, "a mapping", optional=True)
    rng = state.get("rng")
    if rng is not None:
        for i, entry in enumerate(rng if isinstance(rng, list) else [rng]):
            if not isinstance(entry, dict):
                _fail(source, f"rng[{i}]", "a mapping of generator states", entry)
            _byte_state(entry.get("torch"), source, f"rng[{i}].torch", CPU_RNG_BYTES)
            _byte_state(entry.get("loss"), source, f"rng[{i}].loss")
            if entry.get("loss_device") not in (None, "cpu", "cuda"):
                _fail(source, f"rng[{i}].loss_device", "cpu or cuda", entry.get("loss_device"))
            cuda = entry.get("cuda")
            if cuda is not None and not (isinstance(cuda, list) and all(isinstance(t, torch.Tensor) for t in cuda)):
                _fail(source, f"rng[{i}].cuda", "a list of generator states", cuda)
    for key in ("world_size", "skipped_steps"):
        value = _expect(state, key, int, source, "a whole number", optional=True)
        if value is not None and value < (1 if key == "world_size" else 0):
            _fail(source, key, "a count", value)
    names = _expect(state, "class_names", list, source, "a list of names", optional=True)
    if names is not None and not all(isinstance(n, str) for n in names):
        _fail(source, "class_names", "a list of strings", names)
    _expect(state, "wandb_id", str, source, "a string", optional=True)
    record = _expect(state, "latent_vae", dict, source, "the VAE record (a mapping)", optional=True)
    if record is not None:
        vae = record.get("config")
        if not isinstance(vae, dict) or not isinstance(vae.get("_target_"), str):
            _fail(source, "latent_vae.config", "a mapping with a _target_", vae)
        check_weights(record.get("weights"), source, "latent_vae.weights")
        _expect(record, "step", int, source, "a whole number", optional=True)


def _kind_of(value) -> str:
    if isinstance(value, bool):
        return "true or false"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {list(value.shape)}"
    return {type(None): "null", str: "a string", dict: "a mapping", list: "a list", tuple: "a list"}.get(
        type(value), type(value).__name__)


def check_like(reference, value, source: str, key: str, optional_keys: tuple[str, ...] = ()) -> None:
    """Refuse `value` unless it has the structure of `reference` (what this run itself writes for `key`): every
    key of a mapping (but `optional_keys`), lists of the same length, leaves of the same kind (a number for
    a number, a tensor of the same dtype and shape); keys only `value` has must hold plain numbers."""
    if isinstance(reference, dict):
        if not isinstance(value, dict):
            _fail(source, key, "a mapping", value)
        for k, ref in reference.items():
            if k in value:
                check_like(ref, value[k], source, f"{key}.{k}", optional_keys)
            elif k not in optional_keys:
                _fail(source, f"{key}.{k}", _kind_of(ref), None)
        for k in set(value) - set(reference):
            if not isinstance(value[k], (int, float, type(None))) or isinstance(value[k], bool):
                _fail(source, f"{key}.{k}", "a number", value[k])
    elif isinstance(reference, (list, tuple)):
        if not isinstance(value, (list, tuple)) or len(value) != len(reference):
            _fail(source, key, f"a list of {len(reference)}", value)
        for i, (ref, v) in enumerate(zip(reference, value)):
            check_like(ref, v, source, f"{key}[{i}]", optional_keys)
    elif isinstance(reference, torch.Tensor):
        if not isinstance(value, torch.Tensor) or value.dtype != reference.dtype or value.shape != reference.shape:
            _fail(source, key, _kind_of(reference), value)
    elif reference is None:  # a setting left to the library (foreach: null): a plain value or null
        if value is not None and not isinstance(value, (bool, int, float, str)):
            _fail(source, key, "a plain value or null", value)
    elif _kind_of(reference) != _kind_of(value):
        _fail(source, key, _kind_of(reference), value)
    elif isinstance(value, float) and not math.isfinite(value):
        _fail(source, key, "a finite number", value)


# ----- run folders -------------------------------------------------------------------------------------

def mark_run(run_dir: str | Path, kind: str) -> None:
    """Mark `run_dir` as a run of `kind`, recording when a trainer (re)started there (`started`, Unix time):
    runs are ordered by this record, which copying a folder (or touching the file) does not change."""
    path = Path(run_dir) / RUN_MARKER
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps({"kind": kind, "format": FORMAT,
                                                             "started": time.time()}) + "\n"), "run marker")


def _marker(folder: str | Path) -> dict:
    try:
        record = json.loads((Path(folder) / RUN_MARKER).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    return record if isinstance(record, dict) else {}


def run_kind(folder: str | Path) -> str | None:
    kind = _marker(folder).get("kind")
    return kind if isinstance(kind, str) else None


def run_started(folder: str | Path) -> float:
    """When the tool last (re)started the run in `folder`, as it recorded it; 0 (oldest) for a marker without
    the record (written by an older diffuse) or with a time in the future (no run of ours starts there)."""
    started = _marker(folder).get("started")
    if not isinstance(started, (int, float)) or isinstance(started, bool) or not math.isfinite(started):
        return 0.0
    return float(started) if started <= time.time() + 60 else 0.0


def run_folder_of(checkpoint: str | Path) -> Path | None:
    """The run folder a checkpoint belongs to (RUN/checkpoints/*.ckpt with RUN marked), else None."""
    path = Path(checkpoint).resolve()
    folder = path.parent.parent
    return folder if path.parent.name == "checkpoints" and run_kind(folder) else None


def latest_run(kind: str, roots: Iterable[str | Path], with_checkpoint: bool = False) -> Path | None:
    """The run folder of `kind` below `roots` (with a last.ckpt, if asked) that the tool (re)started last, by
    run_started (file times, which `cp -p`, tar or `touch` set, play no part)."""
    runs = [m.parent for r in roots if Path(r).is_dir() for m in Path(r).rglob(RUN_MARKER)
            if run_kind(m.parent) == kind]
    if with_checkpoint:
        runs = [r for r in runs if (r / "checkpoints" / "last.ckpt").is_file()]
    return max(runs, key=lambda r: (run_started(r), str(r))) if runs else None


def prune_checkpoints(folder: str | Path, keep: int | None) -> list[Path]:
    """Delete all but the newest `keep` step_N.ckpt files in `folder` (None: keep all). Returns the deleted."""
    if keep is None:
        return []
    steps = sorted((int(m.group(1)), p) for p in Path(folder).glob("step_*.ckpt")
                   if (m := re.fullmatch(r"step_(\d+)\.ckpt", p.name)))
    doomed = [p for _, p in steps[:max(0, len(steps) - int(keep))]]
    for p in doomed:
        p.unlink(missing_ok=True)
    return doomed


# ----- random number generators ------------------------------------------------------------------------

def rng_state(loss_generator: torch.Generator) -> dict:
    """This process's RNG states: torch's CPU generator, CUDA's (when used) and the loss generator."""
    state = {"torch": torch.get_rng_state(), "loss": loss_generator.get_state(),
             "loss_device": loss_generator.device.type}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, loss_generator: torch.Generator) -> bool:
    """Restore `rng_state`'s states. A state from another device type (a CUDA run resumed on the CPU or the
    reverse) cannot be loaded into this device's generator: the loss generator is then re-seeded from its
    saved state instead, and False says the continuation is not the exact one."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    saved_device = state.get("loss_device") or ("cpu" if state["loss"].numel() > 16 else "cuda")
    if saved_device == loss_generator.device.type:
        loss_generator.set_state(state["loss"])
        return True
    loss_generator.manual_seed(int.from_bytes(bytes(state["loss"][:8].tolist()), "little") ^ 0x5DEECE66D)
    return False

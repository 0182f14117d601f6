"""Checkpoints: one dict of tensors and plain values, written atomically, read without running code.

Layout: {"format": "diffuse-checkpoint", "version": 1, "kind" ("diffusion" | "vae"), "step", "config"
(resolved, plain containers), "model", "ema", "optimizer", "lr_scheduler", "rng", "data", ...}.
`torch.load(weights_only=True)` reads it and `check_targets` vets its stored config (and an embedded VAE
record's) before anything is built from them, so loading a checkpoint can never execute code; a foreign,
corrupt or wrong-kind file gets a one-line error.

Run folders: a trainer marks its run folder with `run.json` ({"kind": …}), touched at every (re)start,
so `resume=auto` and `diffuse sample` find the newest run of their own kind (a VAE run is never taken
for a diffusion run), and a checkpoint outside a run folder is never mistaken for one.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import struct
import zipfile
from collections.abc import Iterable
from pathlib import Path

import torch

from diffuse.building import check_targets, upgrade_stored_config
from diffuse.errors import DiffuseError

FORMAT = "diffuse-checkpoint"
VERSION = 1
KINDS = {"diffusion": "a diffusion model (`diffuse train`)", "vae": "a VAE (`diffuse train-vae`)"}
RUN_MARKER = "run.json"


def non_finite(named_tensors: dict[str, Iterable[torch.Tensor]]) -> list[str]:
    """The names whose floating-point tensors hold NaN/inf (none: [])."""
    return [name for name, tensors in named_tensors.items()
            if any(t.is_floating_point() and not bool(torch.isfinite(t).all()) for t in tensors)]


def save_checkpoint(state: dict, path: str | Path) -> Path:
    """Write to a temp file beside `path`, fsync, then rename: a crash never leaves a half-written file,
    and a failed write (disk full) removes its temp file and leaves the file at `path` as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    payload = {"format": FORMAT, "version": VERSION, **state}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        kept = f"; {path.name} is unchanged" if path.exists() else ""
        raise DiffuseError(f"cannot write checkpoint {path}: {e.strerror or e}{kept}") from None
    return path


def checkpoint_kind(state: dict) -> str:
    """"diffusion" or "vae" (checkpoints written before the field existed: from their config)."""
    return state.get("kind") or ("vae" if "vae" in (state.get("config") or {}) else "diffusion")


def load_checkpoint(path: str | Path, map_location="cpu", kind: str | None = None,
                    allow_targets: Iterable[str] = ()) -> dict:
    """Read a checkpoint without running code and vet it: our format, a version we read, `kind` when
    given, and a stored config that builds only our classes (plus `allow_targets` prefixes)."""
    path = Path(path)
    if not path.is_file():
        raise DiffuseError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, ValueError, OSError,
            struct.error, KeyError, IndexError, TypeError, AttributeError) as e:  # a malformed pickle raises any
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DiffuseError(f"cannot read checkpoint {path}: corrupt or not a PyTorch file ({first[:200]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise DiffuseError(f"{path} is not a diffuse checkpoint (no '{FORMAT}' marker); "
                           "train one with `diffuse train`")
    if state.get("version", 0) > VERSION:
        raise DiffuseError(f"{path} has checkpoint version {state['version']}; this diffuse reads ≤ {VERSION}")
    found = checkpoint_kind(state)
    if kind is not None and found != kind:
        raise DiffuseError(f"{path} is {KINDS.get(found, found)} checkpoint, but this needs {KINDS[kind]} one")
    check_targets(upgrade_stored_config(state.get("config") or {}), str(path), allow_targets)
    for weights in (state.get("model"), (state.get("ema") or {}).get("model")):
        if isinstance(weights, dict):  # compiled runs saved before loop.unwrap() carry `_orig_mod.` keys
            for key in [k for k in weights if "_orig_mod." in k]:
                weights[key.replace("_orig_mod.", "")] = weights.pop(key)
    if isinstance(state.get("latent_vae"), dict):
        check_targets(state["latent_vae"].get("config") or {}, f"{path} (its VAE)", allow_targets)
    return state


# ----- run folders -------------------------------------------------------------------------------------

def mark_run(run_dir: str | Path, kind: str) -> None:
    """Mark `run_dir` as a run of `kind`; its mtime says when a trainer last (re)started there."""
    path = Path(run_dir) / RUN_MARKER
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"kind": kind, "format": FORMAT}) + "\n")


def run_kind(folder: str | Path) -> str | None:
    try:
        return json.loads((Path(folder) / RUN_MARKER).read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        return None


def run_folder_of(checkpoint: str | Path) -> Path | None:
    """The run folder a checkpoint belongs to (RUN/checkpoints/*.ckpt with RUN marked), else None."""
    path = Path(checkpoint).resolve()
    folder = path.parent.parent
    return folder if path.parent.name == "checkpoints" and run_kind(folder) else None


def latest_run(kind: str, roots: Iterable[str | Path], with_checkpoint: bool = False) -> Path | None:
    """The most recently (re)started run folder of `kind` below `roots` (with a last.ckpt, if asked)."""
    runs = [m.parent for r in roots if Path(r).is_dir() for m in Path(r).rglob(RUN_MARKER)
            if run_kind(m.parent) == kind]
    if with_checkpoint:
        runs = [r for r in runs if (r / "checkpoints" / "last.ckpt").is_file()]
    return max(runs, key=lambda r: (r / RUN_MARKER).stat().st_mtime) if runs else None


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

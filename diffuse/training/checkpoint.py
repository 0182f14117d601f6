"""Checkpoints: one dict of tensors and plain values, written atomically, read without running code.

Layout: {"format": "diffuse-checkpoint", "version": 1, "step", "config" (resolved, plain containers),
"model", "ema", "optimizer", "lr_scheduler", "rng", "data", ...}. `torch.load(weights_only=True)` reads it,
so loading a checkpoint can never execute code; a foreign or corrupt file gets a one-line error.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import torch

from diffuse.errors import DiffuseError

FORMAT = "diffuse-checkpoint"
VERSION = 1


def save_checkpoint(state: dict, path: str | Path) -> Path:
    """Write to a temp file beside `path`, fsync, then rename: a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    payload = {"format": FORMAT, "version": VERSION, **state}
    with open(tmp, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise DiffuseError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DiffuseError(f"cannot read checkpoint {path}: corrupt or not a PyTorch file ({first[:200]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise DiffuseError(f"{path} is not a diffuse checkpoint (no '{FORMAT}' marker); "
                           "train one with `diffuse train`")
    if state.get("version", 0) > VERSION:
        raise DiffuseError(f"{path} has checkpoint version {state['version']}; this diffuse reads ≤ {VERSION}")
    return state


def find_latest_checkpoint(*roots: str | Path) -> Path | None:
    """The newest `last.ckpt` below any of `roots` (by modification time), or None."""
    found = [p for r in roots if Path(r).is_dir() for p in Path(r).rglob("checkpoints/last.ckpt")]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

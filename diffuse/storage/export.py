"""The export format: a trained diffusion model as plain safetensors + JSON, loadable without diffuse's
checkpoint format (how the field shares weights: diffusers, timm, the Hugging Face hub).

    FOLDER/model.safetensors   the network's weights (EMA by default), a flat {name: tensor} dict
    FOLDER/config.json         {"format": "diffuse-export", "version": 1, "kind": "diffusion", "weights": "ema"|"raw",
                                "step", "model" (the model's config node: _target_ + its arguments), "schedule",
                                "sampler" (the one the run used; `diffuse export` resolves steps=auto), "guidance"
                                ({"scale": w}, the run's own; auto resolved), "objective", "dim", "conditional",
                                "dataset",
                                "data_shape" [C, *spatial], "class_names", "cond_drop_prob", "latent", "files",
                                "vae" (latent runs: the VAE's config node, step, source) | null}
    FOLDER/vae.safetensors     latent runs only: the VAE that decodes the samples

Reading never runs code: safetensors holds tensors only, and `read_export` vets config.json with
`check_targets` (as a checkpoint's stored config) before anything is built from it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from diffuse.building import check_targets, upgrade_stored_config, without_locations
from diffuse.errors import DiffuseError
from diffuse.files import atomic_write
from diffuse.storage.checkpoint import check_weights

FORMAT = "diffuse-export"
VERSION = 1
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
VAE_WEIGHTS = "vae.safetensors"


def is_export(folder: str | Path) -> bool:
    folder = Path(folder)
    return folder.is_dir() and (folder / CONFIG).is_file() and (folder / WEIGHTS).is_file()


def _tensors(weights: dict) -> dict[str, torch.Tensor]:
    """Own, contiguous CPU copies: safetensors refuses views, strided (channels-last) and shared tensors."""
    return {k: v.detach().to("cpu").clone(memory_format=torch.contiguous_format)
            for k, v in weights.items() if isinstance(v, torch.Tensor)}


def _portable(node):
    """A config node without this machine's file layout: the data's location keys reset (building.
    without_locations) and VAE paths cut to their file name; the shape-defining values kept."""
    if not isinstance(node, dict):
        return node
    node = without_locations(node) if "_target_" in node else dict(node)
    if isinstance(node.get("vae"), str):
        node["vae"] = Path(node["vae"]).name
    return node


def export_metadata(state: dict, weights: str, source: str) -> dict:
    """config.json's content for a (vetted) diffusion checkpoint `state`; `source` names the checkpoint without
    the folders above its run folder (an export leaks no local file layout)."""
    config = state.get("config") or {}
    dataset = _portable(config.get("dataset") or {})
    vae = state.get("latent_vae")
    return {
        "format": FORMAT, "version": VERSION, "kind": "diffusion", "weights": weights,
        "step": int(state.get("step", 0)), "exported_from": source,
        "model": config["model"], "schedule": config["schedule"], "sampler": config.get("sampler"),
        "guidance": config.get("guidance"),
        "objective": config.get("objective") or {"prediction": "eps"}, "dim": int(config["dim"]),
        "conditional": bool(config.get("conditional")), "dataset": dataset,
        "data_shape": [int(dataset["channels"]), *[int(dataset["resolution"])] * int(config["dim"])],
        "class_names": [str(c) for c in state.get("class_names") or []],
        "cond_drop_prob": float((config.get("trainer") or {}).get("cond_drop_prob") or 0.0),
        "latent": _portable(config.get("latent")),
        "files": {"model": WEIGHTS, "vae": VAE_WEIGHTS if vae else None},
        "vae": {"config": vae["config"], "step": None if vae.get("step") is None else int(vae["step"]),  # None:
                "source": Path(str(vae.get("path", ""))).name}                        # a pretrained one
        if vae else None,
    }


def chosen_weights(state: dict, use_ema: bool = True) -> tuple[str, dict]:
    """("ema" | "raw", that state dict) of a diffusion checkpoint: the EMA weights when asked for and present."""
    which = "ema" if use_ema and isinstance(state.get("ema"), dict) else "raw"
    return which, state["ema"]["model"] if which == "ema" else state["model"]


def write_export(folder: str | Path, state: dict, use_ema: bool = True, source: str = "") -> dict[str, Path]:
    """A diffusion checkpoint's `state` (as load_checkpoint returns it; latent runs carry their VAE record)
    → FOLDER/model.safetensors (+ vae.safetensors) + config.json, each written atomically. Returns the paths."""
    from safetensors.torch import save_file

    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DiffuseError(f"cannot write the export to {folder}: {e.strerror or e}") from None
    which, weights = chosen_weights(state, use_ema)
    meta = export_metadata(state, which, source)
    paths = {"model": folder / WEIGHTS}
    tag = {"format": "pt", "producer": FORMAT}
    atomic_write(paths["model"], lambda p: save_file(_tensors(weights), str(p), metadata=tag))
    if meta["vae"] is not None:
        paths["vae"] = folder / VAE_WEIGHTS
        atomic_write(paths["vae"], lambda p: save_file(_tensors(state["latent_vae"]["weights"]), str(p), metadata=tag))
    paths["config"] = folder / CONFIG
    atomic_write(paths["config"], lambda p: p.write_text(json.dumps(meta, indent=2) + "\n"))
    return paths


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """A .safetensors file → {name: tensor} on the CPU (tensors only: reading runs no code); one line if not."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise DiffuseError(f"weights not found: {path}")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DiffuseError(f"cannot read {path}: not a safetensors file ({first[:200]})") from None


def read_metadata(folder: str | Path, allow_targets=()) -> dict:
    """FOLDER/config.json, checked: our format, a version we read, a diffusion model, and targets that build
    only our part classes (plus `allow_targets` prefixes), before anything is built from it."""
    path = Path(folder) / CONFIG
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DiffuseError(f"cannot read {path}: {getattr(e, 'strerror', None) or str(e).splitlines()[0]}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DiffuseError(f"{path} is not a diffuse export (no \"format\": \"{FORMAT}\"); "
                           "write one with `diffuse export`")
    if not isinstance(meta.get("version"), int) or meta["version"] > VERSION:
        raise DiffuseError(f"{path} has export version {meta.get('version')!r}; this diffuse reads ≤ {VERSION}")
    if meta.get("kind", "diffusion") != "diffusion":
        raise DiffuseError(f"{path} exports a {meta.get('kind')!r} model, but this needs a diffusion model")
    missing = [k for k in ("model", "schedule", "dim", "dataset") if not meta.get(k)]
    if missing:
        raise DiffuseError(f"{path} lacks {', '.join(missing)}: not a complete diffuse export")
    check_metadata(meta, str(path))
    check_targets(upgrade_stored_config(meta), str(path), allow_targets)
    return meta


# config.json's entries and what each must be (None allowed where the value may be null)
_METADATA = {"model": (dict, False), "schedule": (dict, False), "dataset": (dict, False), "sampler": (dict, True),
             "guidance": (dict, True), "objective": (dict, True), "latent": (dict, True), "vae": (dict, True),
             "files": (dict, True), "conditional": (bool, True), "weights": (str, True), "step": (int, True),
             "class_names": (list, True), "data_shape": (list, True), "cond_drop_prob": ((int, float), True),
             "exported_from": (str, True)}


def check_metadata(meta: dict, source: str) -> None:
    """Refuse a config.json whose entries are not of the types `diffuse export` writes (one line each)."""
    for key, (kind, nullable) in _METADATA.items():
        value = meta.get(key)
        if (value is None and nullable) or (isinstance(value, kind) and not (kind is int and isinstance(value, bool))):
            continue
        raise DiffuseError(f"{source}: {key} must be {'a mapping' if kind is dict else getattr(kind, '__name__', 'a number')}"
                           f", found {type(value).__name__}: not a config.json `diffuse export` wrote")
    for key in ("model", "schedule", "dataset"):
        if not isinstance(meta[key].get("_target_"), str):
            raise DiffuseError(f"{source}: {key} has no _target_: not a config.json `diffuse export` wrote")
    if meta["dim"] not in (1, 2, 3) or isinstance(meta["dim"], bool):
        raise DiffuseError(f"{source}: dim must be 1, 2 or 3; found {meta['dim']!r}")
    if not all(isinstance(n, str) for n in meta.get("class_names") or []):
        raise DiffuseError(f"{source}: class_names must be a list of strings")
    if meta.get("vae") is not None and not isinstance(meta["vae"].get("config"), dict):
        raise DiffuseError(f"{source}: vae.config must be the VAE's config (a mapping)")


def read_export(folder: str | Path, allow_targets=()) -> tuple[dict, dict, dict | None]:
    """An export folder → (vetted config.json, model weights, VAE weights or None)."""
    folder = Path(folder)
    meta = read_metadata(folder, allow_targets)
    weights = load_tensors(folder / WEIGHTS)
    check_weights(weights, str(folder / WEIGHTS), "the weights")
    vae = None
    if meta.get("vae"):
        vae = load_tensors(folder / VAE_WEIGHTS)  # a fixed name: the file never chooses what is read
        check_weights(vae, str(folder / VAE_WEIGHTS), "the VAE's weights")
    return meta, weights, vae


def run_config(meta: dict) -> dict:
    """The parts of a run's config that sampling and evaluating read, rebuilt from an export's config.json."""
    config = {k: meta[k] for k in ("model", "schedule", "sampler", "guidance", "objective", "dim", "conditional",
                                    "dataset", "latent") if meta.get(k) is not None}
    config["trainer"] = {"cond_drop_prob": float(meta.get("cond_drop_prob") or 0.0)}
    return config

"""`init_from=PATH`: start a NEW run from another run's weights (fine-tuning, new data, more classes).

PATH is a diffuse checkpoint (file, or a run folder: its checkpoints/last.ckpt), a `diffuse export` folder
(model.safetensors), a bare .safetensors file, or a diffusers UNet2DModel / UNet1DModel folder (for model=diffusers_unet;
`model.pretrained=PATH` is that, with the folder's architecture too: `use_pretrained_unet`). Checkpoints are read through `load_checkpoint` (weights_only,
vetted); safetensors hold tensors only. Nothing is built from the file's config: only its weights are
copied, tensor by tensor, into the model the new run's config built. Optimizer, LR schedule, EMA and step
start fresh (the EMA copies the model after this, so it starts from the loaded weights). Unlike `resume`,
which continues a run with everything it had.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, open_dict

from diffuse.errors import DiffuseError
from diffuse.storage import hub
from diffuse.storage.checkpoint import load_checkpoint
from diffuse.storage.diffusers_format import is_unet_folder, unet_architecture, unet_class_of, unet_weights
from diffuse.storage.export import WEIGHTS, is_export, load_tensors, read_metadata

log = logging.getLogger(__name__)

WHICH = ("ema", "raw")
SHOWN = 8  # mismatched tensors named in the error line; the rest are counted


def read_weights(path: str | Path, which: str = "ema", allow_targets=()) -> tuple[dict, dict]:
    """PATH → (state dict, {"path", "source", "weights", "step"}). which: ema | raw (checkpoints hold both;
    an export or a .safetensors file holds one set, used whatever `which` says)."""
    if which not in WHICH:
        raise DiffuseError(f"init_weights must be one of {', '.join(WHICH)}; got {which!r}")
    p = Path(str(hub.local(str(path)))).expanduser()  # hf://…: downloaded, then read as a local path
    if is_unet_folder(p):
        return unet_weights(p), {"path": str(p.resolve()), "source": f"diffusers {unet_class_of(p)}", "weights": "stored",
                                 "step": None}
    if p.is_dir():
        if is_export(p) or (p / WEIGHTS).is_file():
            meta = read_metadata(p, allow_targets) if (p / "config.json").is_file() else {}
            saved = meta.get("weights", "stored")
            if saved != which and saved in WHICH:
                log.info("init_from=%s: an export holds one set of weights (%s); init_weights=%s does not apply",
                         p, saved, which)
            return load_tensors(p / WEIGHTS), {"path": str(p.resolve()), "source": "export", "weights": saved,
                                               "step": meta.get("step")}
        if (p / "checkpoints" / "last.ckpt").is_file():
            p = p / "checkpoints" / "last.ckpt"
        else:
            raise DiffuseError(f"init_from={path}: the folder holds neither checkpoints/last.ckpt (a run) nor "
                               f"{WEIGHTS} (a `diffuse export`)")
    if not p.exists():
        raise DiffuseError(f"init_from={path}: not found")
    if p.suffix == ".safetensors":
        return load_tensors(p), {"path": str(p.resolve()), "source": "safetensors", "weights": "stored", "step": None}
    try:
        state = load_checkpoint(p, kind="diffusion", allow_targets=allow_targets)
    except DiffuseError as e:
        raise DiffuseError(f"init_from: {e}") from None
    has_ema = isinstance(state.get("ema"), dict) and "model" in state["ema"]
    if which == "ema" and not has_ema:
        raise DiffuseError(f"init_from={path}: the checkpoint holds no EMA weights; use init_weights=raw")
    weights = state["ema"]["model"] if which == "ema" else state["model"]
    return weights, {"path": str(p.resolve()), "source": "checkpoint", "weights": which,
                     "step": int(state.get("step", 0))}


def _shape(t) -> str:
    return "[" + ", ".join(map(str, tuple(t.shape))) + "]"


def load_initial_weights(model: torch.nn.Module, path: str | Path, which: str = "ema",
                         skip_mismatched: bool = False, allow_targets=()) -> dict:
    """Copy the weights at `path` into `model`, tensor by tensor. Tensors whose name or shape differ are an
    error naming them (at most SHOWN, then "… and N more"); with `skip_mismatched` they keep the model's
    own initialisation (and surplus tensors of the file are ignored). Returns a report: path, source,
    weights, step, loaded (count), skipped (names)."""
    weights, report = read_weights(path, which, allow_targets)
    own = model.state_dict()
    problems, matched = [], []
    for name, tensor in own.items():
        saved = weights.get(name)
        if saved is None:
            problems.append((name, f"{name} (not in the file; model {_shape(tensor)})"))
        elif tuple(saved.shape) != tuple(tensor.shape):
            problems.append((name, f"{name} (saved {_shape(saved)} vs model {_shape(tensor)})"))
        else:
            matched.append(name)
    problems += [(name, f"{name} (saved {_shape(t)}, not in the model)") for name, t in weights.items()
                 if name not in own]
    if not matched:
        raise DiffuseError(f"init_from={path}: none of its {len(weights)} tensors matches the model "
                           f"{type(model).__name__} by name and shape: weights of another kind of model?")
    if problems and not skip_mismatched:
        shown = ", ".join(text for _, text in problems[:SHOWN])
        more = f" … and {len(problems) - SHOWN} more" if len(problems) > SHOWN else ""
        raise DiffuseError(f"init_from={path}: {len(problems)} tensor(s) do not match the model: {shown}{more}; "
                           "init_skip_mismatched=true loads the others and leaves these as initialised")
    merged = dict(own)
    merged.update({name: weights[name] for name in matched})
    model.load_state_dict(merged)
    return {**report, "loaded": len(matched), "skipped": [name for name, _ in problems]}


def start_from_weights(model: torch.nn.Module, cfg: DictConfig, is_main: bool = True) -> dict:
    """The train job's `init_from`: load the weights into the freshly built model, log what was loaded and
    skipped, and record it in the run's config as `initialized_from` (the stored config then has init_from
    null, so that resuming this run continues it rather than starting it over from PATH)."""
    # the file's stored config is only vetted (nothing is built from it): the run's own model class, named
    # by this run's trusted config, is allowed there too, so a model of your own fine-tunes from its own runs
    allow = [*(cfg.get("allow_targets") or []), str(cfg.model.get("_target_", ""))]
    report = load_initial_weights(model, cfg.init_from, str(cfg.get("init_weights") or "ema"),
                                  bool(cfg.get("init_skip_mismatched")), [a for a in allow if a])
    if is_main:
        step = "" if report["step"] is None else f" (step {report['step']})"
        log.info("init_from %s%s: loaded %d tensors (%s weights)", report["path"], step, report["loaded"],
                 report["weights"])
        if report["skipped"]:
            log.warning("init_from: %d mismatched tensor(s) left as initialised: %s", len(report["skipped"]),
                        ", ".join(report["skipped"]))
    with open_dict(cfg):
        cfg.initialized_from = {k: report[k] for k in ("path", "source", "weights", "step", "skipped")}
        cfg.init_from = None
    return report


def use_pretrained_unet(cfg: DictConfig) -> None:
    """`model=diffusers_unet model.pretrained=PATH` (in place, before the model is built): the folder's
    architecture replaces the model's keys, its weights become `init_from`, and `pretrained` is cleared, so the
    run's stored config describes the network fully and never names the folder to read again."""
    pretrained = cfg.model.get("pretrained")
    if not pretrained:
        return
    if cfg.get("init_from"):
        raise DiffuseError(f"model.pretrained={pretrained} and init_from={cfg.init_from}: choose one start")
    pretrained = hub.local(str(pretrained))  # hf://…: downloaded, then read as a local folder
    arch, facts = unet_architecture(pretrained)
    if int(cfg.dim) != arch["dim"]:
        raise DiffuseError(f"model.pretrained={pretrained}: a diffusers {unet_class_of(pretrained)} is "
                           f"{arch['dim']}-D; this run has dim={cfg.dim}")
    channels = int(cfg.dataset.channels)
    for key in ("in_channels", "out_channels"):
        if facts[key] is not None and int(facts[key]) != channels:
            raise DiffuseError(f"model.pretrained={pretrained}: its {key} is {facts[key]}, the data has {channels} "
                               f"channels (dataset.channels)")
    classes = int(cfg.model.get("num_classes") or 0)
    if facts["num_class_embeds"] not in (None, classes + 1 if classes else None) \
            and not cfg.get("init_skip_mismatched"):
        raise DiffuseError(f"model.pretrained={pretrained}: it embeds {facts['num_class_embeds']} classes, this run "
                           f"{classes} + the null class; init_skip_mismatched=true starts the class embedding afresh")
    with open_dict(cfg):
        arch.pop("dim")  # the run's own, checked above (model.dim follows it)
        cfg.model.update(arch)
        cfg.model.pretrained = None
        cfg.init_from = str(Path(str(pretrained)).expanduser().resolve())

"""`diffuse export`: a trained diffusion checkpoint → a folder in `out` (default: this job's run folder), with a
model card (README.md: the config, the training, evaluate's metrics of that checkpoint, a sample grid).

format=diffuse (default): model.safetensors + config.json (+ vae.safetensors for a latent run, so that the folder
decodes its samples alone). It loads without diffuse's checkpoint format (safetensors + JSON: see
diffuse/storage/export.py), and `diffuse sample checkpoint=FOLDER` / `diffuse evaluate checkpoint=FOLDER` /
`diffuse train init_from=FOLDER` take it as they take a checkpoint.

format=diffusers: unet/ + scheduler/ + model_index.json, as `DDPMPipeline.from_pretrained` / `DDIMPipeline`
read them with no diffuse installed (and vae/ as an AutoencoderKL for latent runs), for runs of
model=diffusers_unet on a linear or cosine schedule (diffuse/storage/diffusers_format.py); other runs get one
line saying why not.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from diffuse.data.latent import CHECKPOINT_KEY, NO_EMBEDDED_VAE, is_latent_run
from diffuse.errors import DiffuseError
from diffuse.jobs.common import find_checkpoint, report
from diffuse.storage.checkpoint import load_checkpoint, run_folder_of
from diffuse.training.distributed import launched_rank_world
from diffuse.storage import hub
from diffuse.storage.diffusers_format import write_pipeline
from diffuse.storage.export import chosen_weights, write_export
from diffuse.storage.model_card import find_metrics, latest_grid, model_card
from diffuse.jobs.sampling_setup import run_guidance_scale, with_steps

log = logging.getLogger(__name__)


def resolved_sampling(config: dict, source: str) -> dict:
    """The run's config with its sampling settings as numbers, for readers outside diffuse: guidance.scale=auto
    resolved for this run (1.1 where it learned a null class, else 0) and sampler.steps=auto at that scale."""
    scale = run_guidance_scale(config, source)
    sampler = config.get("sampler")
    if sampler:
        sampler = OmegaConf.to_container(with_steps(OmegaConf.create(sampler), scale))
    return {**config, "guidance": {"scale": scale}, "sampler": sampler}


def run(cfg: DictConfig, run_dir: Path, overrides: list[str] | None = None) -> dict:
    if launched_rank_world()[0] > 0:  # under torchrun: one export (rank 0's); the others have no run dir
        return {}
    path = find_checkpoint(cfg.checkpoint, "diffusion")
    if path.is_dir():
        raise DiffuseError(f"{path} is already a `diffuse export` folder")
    state = load_checkpoint(path, kind="diffusion", allow_targets=cfg.get("allow_targets") or ())
    if is_latent_run(state["config"]) and CHECKPOINT_KEY not in state:  # a stored VAE path is never opened
        raise DiffuseError(NO_EMBEDDED_VAE)
    out = Path(str(cfg.out)).expanduser() if cfg.get("out") else Path(run_dir)
    state = {**state, "config": resolved_sampling(state["config"], str(path))}
    run = run_folder_of(path)  # named from its run folder down: an export leaks no local file layout
    source = str(path.resolve().relative_to(run.parent)) if run is not None else path.name
    fmt = str(cfg.get("format") or "diffuse")
    if fmt == "diffusers":
        _, weights = chosen_weights(state, bool(cfg.use_ema))
        paths = write_pipeline(out, state["config"], weights, state.get(CHECKPOINT_KEY))
    else:
        paths = write_export(out, state, use_ema=bool(cfg.use_ema), source=source)
    grid = latest_grid(run)
    if grid is not None:
        paths["grid"] = out / "samples.png"
        shutil.copyfile(grid, paths["grid"])
    paths["card"] = out / "README.md"
    paths["card"].write_text(model_card(state["config"], int(state["step"]), source, fmt, find_metrics(run, path),
                                        paths["grid"].name if grid is not None else None))
    log.info("exported %s (step %d) → %s (%s)", path, int(state["step"]), out, fmt)
    if cfg.get("push_to_hub"):
        paths["hub"] = hub.push(out, str(cfg.push_to_hub), private=bool(cfg.get("push_private", True)))
        log.info("pushed %s → %s", out, paths["hub"])
    report(*(f"{name}: {p}" for name, p in paths.items()), f"export: {out}")
    return {"checkpoint": str(path), "step": int(state["step"]), "export": str(out),
            **{k: str(v) for k, v in paths.items()}}

"""How every job draws samples, in one place: training grids (`trainer.sample_every`), in-training sample quality
(`trainer.eval_every`), `diffuse sample`, `diffuse animate`, `diffuse evaluate` and the sampler an export records.

`sampling_plan` resolves, from the run's config and what the job asks:
  sampler    the run's own (`sampler` of its config); a node with `_target_` (sampler=X) replaces it; bare
             values (sampler.steps=50) apply over it. Latent runs sample unclipped (latent_sampler_config).
  steps      a number; `auto` = AUTO_NETWORK_PASSES network passes per sample (20 steps, or 10 guided ones);
             `steps=` of the call (the grids' and eval's own counts) replaces the sampler's.
  guidance   `auto` = the run's own guidance.scale, whose auto is AUTO_GUIDANCE_SCALE for a class-conditional
             run trained with label dropout (it has a null class to guide with) and 0 otherwise; a number is
             checked against how the run was trained (validation.check_guidance).
  precision  the network's autocast dtype: the job's `precision` (sample, evaluate) or `trainer.precision`
             (grids and eval_every of a training run), `auto` resolved by devices.resolve_precision (bf16 where
             the device computes it natively, else fp32). The sampler's own arithmetic is always fp32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from diffuse.building import build
from diffuse.data.latent import is_latent_run
from diffuse.devices import PRECISIONS, resolve_precision, use_channels_last
from diffuse.diffusion.generation import SamplingPlan
from diffuse.diffusion.guidance import is_guided
from diffuse.diffusion.objectives import parameterization
from diffuse.errors import DiffuseError
from diffuse.jobs.latent_space import latent_sampler_config
from diffuse.validation import check_guidance, validate_part

# guidance.scale=auto on a run that learned a null class. On MNIST after 19 minutes, DPM-Solver++ at 10 guided
# steps (benchmarks/results/few_step_quality_mnist_cpu2.md): w 1.1 buys the asked class for little diversity.
AUTO_GUIDANCE_SCALE = 1.1

# sampler.steps=auto (dpm_solver's default): 20 network passes per sample, i.e. 20 steps, or 10 guided steps
# (each one pass over the conditional and the null-class copies, as costly as two plain steps).
AUTO_NETWORK_PASSES = 20


def guidance_scale(value, conditional: bool, cond_drop_prob: float, run: str) -> float:
    """guidance.scale as the number to sample with (see the module's docstring); `run` names it in errors."""
    if value == "auto":
        return AUTO_GUIDANCE_SCALE if conditional and cond_drop_prob > 0 else 0.0
    scale = float(value or 0.0)
    check_guidance(scale, conditional, cond_drop_prob, run)
    return scale


def run_guidance_scale(config, run: str, scale=None) -> float:
    """guidance_scale for a run's config (composed or stored; DictConfig or dict): `scale`, or when None or
    auto the config's own guidance.scale (auto when it has none), against how that run was trained."""
    if scale is None or scale == "auto":
        scale = (config.get("guidance") or {}).get("scale", "auto")
    cond_drop_prob = float((config.get("trainer") or {}).get("cond_drop_prob") or 0.0)
    return guidance_scale(scale, takes_classes(config), cond_drop_prob, run)


def takes_classes(config) -> bool:
    """Whether the run's network takes class labels: conditional=true *and* a model with classes. A dataset
    without classes (a flat `dataset=folder`, shapes with num_classes=0) leaves num_classes 0 whatever
    `conditional` says, and such a run samples unguided."""
    return bool(config.get("conditional")) and int((config.get("model") or {}).get("num_classes") or 0) > 0


def with_steps(node, guidance: float):
    """The sampler node with steps=auto made a number (AUTO_NETWORK_PASSES per sample at this guidance scale);
    any other node as it is."""
    if node is None or node.get("steps") != "auto":
        return node
    return OmegaConf.merge(node, {"steps": AUTO_NETWORK_PASSES // (2 if is_guided(guidance) else 1)})


def sampler_config(chosen: DictConfig | None, saved: DictConfig) -> DictConfig:
    """The sampler node to draw with. `chosen`: a node with a `_target_` (sampler=X on the command line) is used
    as it is; None means the run's own sampler, and a node of bare values the run's own with those over it."""
    if chosen is not None and "_target_" in chosen:
        return chosen
    if not saved.get("sampler"):
        raise DiffuseError("the run's config names no sampler: choose one, e.g. sampler=ddpm")
    return OmegaConf.merge(OmegaConf.to_container(saved.sampler), chosen or {})


def resolved_sampler(run_config, chosen: DictConfig | None = None, guidance: float = 0.0,
                     steps: int | None = None) -> DictConfig:
    """The sampler node a plan builds: sampler_config, unclipped for latent runs, steps resolved, checked."""
    node = latent_sampler_config(sampler_config(chosen, run_config), is_latent_run(run_config))
    node = with_steps(node, guidance)
    if steps is not None:
        node = OmegaConf.merge(node, {"steps": int(steps)})
    validate_part(node, "sampler")
    return node


def prepare_for_sampling(model: torch.nn.Module, device: torch.device, autocast_dtype=None) -> torch.nn.Module:
    """Eval mode; channels-last weights where devices.use_channels_last("auto") says they pay (2-D conv models on
    the CPU in fp32). The samples agree to float rounding either way."""
    model.eval()
    if use_channels_last("auto", model, device, autocast_dtype):
        model.to(memory_format=torch.channels_last)
    return model


def sampling_plan(run_config, sample_shape: Sequence[int], device: torch.device, *, schedule,
                  model: torch.nn.Module | None = None, sampler: DictConfig | None = None, steps: int | None = None,
                  guidance="auto", precision: str = "auto", batch_size: int = 64, seed: int = 0,
                  run: str = "this run") -> tuple[SamplingPlan, DictConfig]:
    """The plan a job draws with, and the sampler node it built (see the module's docstring). `model` decides
    precision=auto where a model class opts out of CPU bf16 (devices.resolve_precision)."""
    if not isinstance(run_config, DictConfig):
        run_config = OmegaConf.create(run_config)
    scale = run_guidance_scale(run_config, run, guidance)
    node = resolved_sampler(run_config, sampler, scale, steps)
    autocast_dtype = PRECISIONS[resolve_precision(precision, torch.device(device), model)]
    prediction = parameterization(run_config.get("objective"))  # a config without one (older runs): eps
    plan = SamplingPlan(schedule, build(node, "sampler"), tuple(sample_shape), prediction, scale, int(batch_size),
                        device, int(seed), autocast_dtype)
    return plan, node


def precision_name(autocast_dtype) -> str:
    """fp32, bf16 or fp16: the name of a plan's autocast dtype."""
    return {dtype: name for name, dtype in PRECISIONS.items()}[autocast_dtype]

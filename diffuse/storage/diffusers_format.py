"""diffusers' folder format, read into our classes: a pretrained `AutoencoderKL` as our SD-layout VAE, and a
`UNet2DModel` / `UNet1DModel` as the architecture and weights of `model=diffusers_unet`.

    FOLDER/config.json                           {"_class_name": "AutoencoderKL", "block_out_channels": […], …}
    FOLDER/diffusion_pytorch_model.safetensors   its weights (or .bin: read with weights_only=True)

Our VAE (diffuse/models/vae.py) is SD's kl-f8 layout, which is diffusers' AutoencoderKL layer for layer: the
parameter names differ, and our attention keeps k and v as one projection (`to_kv`). So a folder is mapped onto
our class (`read_autoencoder_kl`) rather than run through diffusers: latent runs then need no diffusers
installed, and a latent checkpoint embeds the VAE as it embeds one from `diffuse train-vae` (config + tensors).
Reading never runs code: config.json is JSON, checked key by key (only AutoencoderKL, only the values our layout
reproduces: SiLU, 32 groups, the standard down/up blocks, quant convs, no shift); the weights are tensors only.
The scaling factor is the config's `scaling_factor` (SD: 0.18215).

A UNet2DModel (UNet1DModel) folder gives `model=diffusers_unet` its architecture (`unet_architecture`: the class's
keys, which the model takes under the same names, and dim 2 (1)) and its weights (`unet_weights`: diffusers' names
under "unet.").
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from diffuse.errors import DiffuseError
from diffuse.storage.export import load_tensors

CONFIG = "config.json"
WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
VAE_CLASS = "AutoencoderKL"
OUR_VAE = "diffuse.models.vae.VAE"

# AutoencoderKL config keys: those our layout reproduces only at one value, and those it reads
_FIXED = {"act_fn": "silu", "norm_num_groups": 32, "use_quant_conv": True, "use_post_quant_conv": True,
          "shift_factor": None, "latents_mean": None, "latents_std": None}
_READ = {"in_channels", "out_channels", "latent_channels", "block_out_channels", "down_block_types",
         "up_block_types", "layers_per_block", "scaling_factor", "mid_block_add_attention"}
_IGNORED = {"sample_size", "force_upcast"}  # a size hint and a dtype policy: nothing in the network

_RENAMES = (  # diffusers AutoencoderKL → ours, applied in order (to_k/to_v are merged into to_kv separately)
    ("mid_block.resnets.0", "mid.res1"), ("mid_block.resnets.1", "mid.res2"),
    ("mid_block.attentions.0.group_norm", "mid.attn.norm"), ("mid_block.attentions.0.to_out.0", "mid.attn.attn.out"),
    ("mid_block.attentions.0.", "mid.attn.attn."), ("down_blocks", "down"), ("up_blocks", "up"),
    (".resnets.", ".blocks."), ("downsamplers.0", "resample"), ("upsamplers.0", "resample"),
    ("conv_shortcut", "skip"), ("conv_norm_out", "norm_out"),
)


def is_diffusers_folder(path: str | Path) -> bool:
    """A folder with a config.json (or a weights file inside one): what diffusers' save_pretrained writes."""
    path = Path(path).expanduser()
    folder = path if path.is_dir() else path.parent
    return (folder / CONFIG).is_file() and (path.is_dir() or path.name in WEIGHTS)


def _folder(path: str | Path) -> Path:
    path = Path(path).expanduser()
    return path if path.is_dir() else path.parent


def read_config(folder: Path, expected_class: str | tuple[str, ...]) -> dict:
    """config.json as a dict, refused in one line unless diffusers wrote it for `expected_class` (or one of
    them)."""
    try:
        config = json.loads((folder / CONFIG).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DiffuseError(f"{folder / CONFIG}: not a readable JSON config ({type(e).__name__})") from None
    if not isinstance(config, dict):
        raise DiffuseError(f"{folder / CONFIG}: not a diffusers config (a JSON object)")
    name = config.get("_class_name")
    expected = (expected_class,) if isinstance(expected_class, str) else expected_class
    if name not in expected:
        raise DiffuseError(f"{folder}: a diffusers {name or 'folder of unknown class'}, not an {' or '.join(expected)} "
                           f"(config.json's _class_name)")
    return config


def read_weights(folder: Path) -> dict[str, Tensor]:
    """The folder's weights as tensors only: safetensors, else a .bin read with weights_only=True."""
    for name in WEIGHTS:
        path = folder / name
        if not path.is_file():
            continue
        if name.endswith(".safetensors"):
            return load_tensors(path)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one-line answer
            raise DiffuseError(f"{path}: not a file of tensors, refused ({type(e).__name__})") from None
        if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
            raise DiffuseError(f"{path}: not a flat state dict of tensors, refused")
        return state
    raise DiffuseError(f"{folder}: no {' or '.join(WEIGHTS)} beside config.json")


def vae_config(config: dict, source: str) -> dict:
    """An AutoencoderKL config → our VAE's config node (its _target_ and arguments); one line for anything our
    layout does not reproduce."""
    unknown = sorted(k for k in config if not k.startswith("_") and k not in (*_FIXED, *_READ, *_IGNORED))
    if unknown:
        raise DiffuseError(f"{source}: AutoencoderKL keys this layout does not know: {unknown}")
    for key, value in _FIXED.items():
        if key in config and config[key] != value:
            raise DiffuseError(f"{source}: {key}={config[key]!r}; only {value!r} maps onto our VAE")
    widths = config.get("block_out_channels")
    if not (isinstance(widths, list) and widths and all(isinstance(w, int) and w > 0 and w % 32 == 0 for w in widths)
            and all(w % widths[0] == 0 for w in widths)):
        raise DiffuseError(f"{source}: block_out_channels={widths!r}; expected multiples of 32, each a multiple "
                           f"of the first")
    levels = len(widths)
    if config.get("down_block_types") != ["DownEncoderBlock2D"] * levels or \
            config.get("up_block_types") != ["UpDecoderBlock2D"] * levels:
        raise DiffuseError(f"{source}: only DownEncoderBlock2D / UpDecoderBlock2D blocks, one per width, map onto "
                           f"our VAE")
    in_channels, out_channels = config.get("in_channels", 3), config.get("out_channels", 3)
    if in_channels != out_channels:
        raise DiffuseError(f"{source}: in_channels {in_channels} ≠ out_channels {out_channels}; our VAE decodes to "
                           f"its input's channels")
    scale = config.get("scaling_factor", 0.18215)
    if not isinstance(scale, (int, float)) or not scale > 0:
        raise DiffuseError(f"{source}: scaling_factor={scale!r}; expected a positive number")
    return {"_target_": OUR_VAE, "dim": 2, "in_channels": int(in_channels),
            "latent_channels": int(config.get("latent_channels", 4)), "channels": int(widths[0]),
            "channel_mult": [w // widths[0] for w in widths], "num_res_blocks": int(config.get("layers_per_block", 1)),
            "attention": bool(config.get("mid_block_add_attention", True)), "attn_heads": 1,
            "scale_factor": float(scale)}


def vae_weight_name(name: str) -> str:
    """One AutoencoderKL parameter name → ours (to_k/to_v: see vae_weights)."""
    if name.startswith("quant_conv"):
        return "encoder." + name
    if name.startswith("post_quant_conv"):
        return "decoder." + name
    for a, b in _RENAMES:
        name = name.replace(a, b)
    return name


def vae_weights(theirs: dict[str, Tensor], scale_factor: float) -> dict[str, Tensor]:
    """AutoencoderKL's state dict → our VAE's: renamed, k and v stacked into to_kv, the scale factor added."""
    ours = {}
    for name, value in theirs.items():
        if ".to_k." in name or ".to_v." in name:
            continue
        if ".to_q." in name:
            k, v = theirs.get(name.replace("to_q", "to_k")), theirs.get(name.replace("to_q", "to_v"))
            if k is None or v is None:
                raise DiffuseError(f"AutoencoderKL weights: {name} without its to_k / to_v")
            ours[vae_weight_name(name.replace("to_q", "to_kv"))] = torch.cat([k, v])
        ours[vae_weight_name(name)] = value
    for part in ("encoder", "decoder"):
        ours[f"{part}.scale_factor"] = torch.tensor(float(scale_factor))
    return ours


def read_autoencoder_kl(path: str | Path) -> dict:
    """A diffusers AutoencoderKL folder (or its weights file) → the VAE record latent runs use and embed:
    {path, step: None, source, config (our VAE's node), weights (our names)}. The weights are checked against
    the config by building the VAE (vae_from_record) before anything trains on them."""
    folder = _folder(path)
    config = read_config(folder, VAE_CLASS)
    node = vae_config(config, str(folder))
    return {"path": str(folder.resolve()), "step": None, "source": f"diffusers {VAE_CLASS}", "config": node,
            "weights": vae_weights(read_weights(folder), node["scale_factor"])}


# ----- UNet2DModel / UNet1DModel ------------------------------------------------------------------------------
UNET_CLASSES = {"UNet2DModel": 2, "UNet1DModel": 1}  # class → the dim model=diffusers_unet builds it at
UNET_PREFIX = "unet."  # DiffusersUNet holds the diffusers UNet as .unet
_SHARED = {"block_out_channels", "layers_per_block", "down_block_types", "up_block_types", "norm_num_groups",
           "freq_shift", "flip_sin_to_cos", "act_fn", "time_embedding_type"}
_UNET_ARCHITECTURE = {  # per dim: the keys model=diffusers_unet takes under the same names
    2: _SHARED | {"attention_head_dim", "norm_eps", "dropout", "center_input_sample", "add_attention",
                  "mid_block_scale_factor", "downsample_padding", "resnet_time_scale_shift"},
    1: _SHARED | {"mid_block_type", "out_block_type", "use_timestep_embedding", "extra_in_channels",
                  "downsample_each_block"}}
_UNET_DEFAULTS = {  # per dim: keys our model builds at one value only
    2: {"class_embed_type": None, "mid_block_type": "UNetMidBlock2D", "downsample_type": "conv",
        "upsample_type": "conv", "time_embedding_dim": None, "attn_norm_num_groups": None},
    1: {"time_embedding_dim": None}}
_UNET_OTHER = {  # per dim: keys read for the caller to check against the data, or naming no weights
    2: ("in_channels", "out_channels", "num_class_embeds", "sample_size"),
    1: ("in_channels", "out_channels", "sample_size")}
_UNET_IGNORED = {"num_train_timesteps", "sample_rate"}  # not the network's: the scheduler's, an audio rate


def unet_architecture(path: str | Path) -> tuple[dict, dict]:
    """A diffusers UNet2DModel / UNet1DModel folder's config → ({model key: value} for `model=diffusers_unet`,
    dim included; {in_channels, out_channels, num_class_embeds (None in 1-D), sample_size} as the folder has
    them, for the caller to check against the data). One line for a key or value our model does not take."""
    folder = _folder(path)
    config = read_config(folder, tuple(UNET_CLASSES))
    name = config["_class_name"]
    dim = UNET_CLASSES[name]
    unknown = sorted(k for k in config if not k.startswith("_") and k not in _UNET_IGNORED
                     and k not in (*_UNET_ARCHITECTURE[dim], *_UNET_DEFAULTS[dim], *_UNET_OTHER[dim]))
    if unknown:
        raise DiffuseError(f"{folder}: {name} keys model=diffusers_unet does not take: {unknown}")
    for key, value in _UNET_DEFAULTS[dim].items():
        if config.get(key, value) != value:
            raise DiffuseError(f"{folder}: {key}={config[key]!r}; model=diffusers_unet builds only {value!r}")
    keys = {k: config[k] for k in _UNET_ARCHITECTURE[dim] if k in config}
    facts = {k: config.get(k) for k in ("in_channels", "out_channels", "num_class_embeds", "sample_size")}
    return {**keys, "dim": dim}, facts


def unet_class_of(path: str | Path) -> str:
    """The diffusers class a UNet folder holds (UNet2DModel | UNet1DModel)."""
    return read_config(_folder(path), tuple(UNET_CLASSES))["_class_name"]


def unet_weights(path: str | Path) -> dict[str, Tensor]:
    """A diffusers UNet folder's weights under DiffusersUNet's names (tensors only)."""
    folder = _folder(path)
    read_config(folder, tuple(UNET_CLASSES))
    return {UNET_PREFIX + k: v for k, v in read_weights(folder).items()}


def unet_model(path: str | Path, num_timesteps: int | None = 1000):
    """A DiffusersUNet with a diffusers UNet folder's architecture and weights (strict: the same parameters,
    renamed), in eval mode: the folder as our model, for code that holds no run config."""
    from diffuse.models.diffusers_unet import DiffusersUNet
    arch, facts = unet_architecture(path)
    model = DiffusersUNet(in_channels=facts["in_channels"], num_timesteps=num_timesteps, **arch)
    model.load_state_dict(unet_weights(path))
    return model.eval()


def is_unet_folder(path: str | Path) -> bool:
    if not is_diffusers_folder(path):
        return False
    try:
        return json.loads((_folder(path) / CONFIG).read_text()).get("_class_name") in UNET_CLASSES
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return False


# ----- writing: a run as a diffusers pipeline folder -----------------------------------------------------------
DIFFUSERS_UNET = "diffuse.models.diffusers_unet.DiffusersUNet"
PREDICTION_TYPES = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
VARIANCE_TYPES = {"beta": "fixed_large", "posterior": "fixed_small"}  # DDPM's σ² = β_t | β̃_t


def scheduler_config(config: dict) -> dict:
    """A run's schedule (+ objective, sampler) as DDPMScheduler's keys: the same ᾱ table, prediction and
    variance. One line for a schedule diffusers has no scheduler for."""
    schedule = config["schedule"]
    target = str(schedule.get("_target_", ""))
    name = target.rsplit(".", 1)[-1]
    T = int(schedule.get("num_timesteps") or 1000)
    if name == "LinearSchedule":
        betas = {"beta_schedule": "linear", "beta_start": float(schedule.get("beta_start", 1e-4)),
                 "beta_end": float(schedule.get("beta_end", 0.02))}
    elif name == "CosineSchedule" and float(schedule.get("s", 0.008)) == 0.008 \
            and float(schedule.get("max_beta", 0.999)) == 0.999:
        betas = {"beta_schedule": "squaredcos_cap_v2"}  # Nichol & Dhariwal's, with their s and β cap
    else:
        raise DiffuseError(f"format=diffusers: the schedule {name} ({target}) has no diffusers scheduler (linear, "
                           f"and cosine with s=0.008, max_beta=0.999, do); export it with format=diffuse")
    prediction = str((config.get("objective") or {}).get("prediction", "eps"))
    sampler = config.get("sampler") or {}
    return {"num_train_timesteps": T, **betas, "prediction_type": PREDICTION_TYPES[prediction],
            "variance_type": VARIANCE_TYPES.get(str(sampler.get("variance", "beta")), "fixed_large"),
            "clip_sample": False, "timestep_spacing": "trailing"}


def unet_config(config: dict) -> tuple[str, dict]:
    """A diffusers_unet run's model node → (UNet2DModel | UNet1DModel, its constructor keys)."""
    from diffuse.models.diffusers_unet import block_types, unet_class
    model = config["model"]
    if model.get("_target_") != DIFFUSERS_UNET:
        raise DiffuseError(f"format=diffusers needs a model with a diffusers counterpart (model=diffusers_unet); "
                           f"this run's is {model.get('_target_')}: export it with format=diffuse")
    dim = int(model.get("dim", 2))
    channels = int(model["in_channels"])
    classes = int(model.get("num_classes") or 0)
    arch = {k: model[k] for k in _UNET_ARCHITECTURE[dim] if k in model}
    arch["block_out_channels"] = tuple(arch["block_out_channels"])
    arch["down_block_types"], arch["up_block_types"] = block_types(
        dim, len(arch["block_out_channels"]), arch.get("down_block_types"), arch.get("up_block_types"))
    size = int((config.get("dataset") or {}).get("resolution") or 32)
    keys = {**arch, "in_channels": channels, "out_channels": int(model.get("out_channels") or channels),
            "sample_size": size}
    if dim == 1:
        keys.update(mid_block_type=arch.get("mid_block_type") or "MidResTemporalBlock1D",
                    out_block_type=arch.get("out_block_type") or "OutConv1DBlock")
    else:
        keys["num_class_embeds"] = classes + 1 if classes else None
    return unet_class(dim), keys


def autoencoder_kl_config(vae: dict) -> dict:
    """Our VAE's config node → AutoencoderKL's constructor keys (the inverse of vae_config)."""
    if int(vae.get("dim", 2)) != 2:
        raise DiffuseError(f"format=diffusers: AutoencoderKL is 2-D; this VAE is {vae.get('dim')}-D")
    widths = tuple(int(vae["channels"]) * int(m) for m in vae["channel_mult"])
    if any(w % 32 for w in widths) or int(vae.get("attn_heads", 1)) != 1:
        raise DiffuseError(f"format=diffusers: AutoencoderKL uses 32 groups and one attention head; this VAE has "
                           f"widths {list(widths)}, {vae.get('attn_heads')} heads")
    return {"in_channels": int(vae["in_channels"]), "out_channels": int(vae["in_channels"]),
            "latent_channels": int(vae["latent_channels"]), "block_out_channels": widths,
            "down_block_types": ("DownEncoderBlock2D",) * len(widths), "up_block_types": ("UpDecoderBlock2D",) * len(widths),
            "layers_per_block": int(vae["num_res_blocks"]), "norm_num_groups": 32,
            "mid_block_add_attention": bool(vae.get("attention", True)), "scaling_factor": float(vae["scale_factor"])}


def to_autoencoder_kl(vae_node: dict, weights: dict[str, Tensor]):
    """Our VAE (config node + state dict) as a diffusers AutoencoderKL with the same weights."""
    import diffusers
    theirs = diffusers.AutoencoderKL(**autoencoder_kl_config(vae_node))
    state = {}
    for name in theirs.state_dict():
        if ".to_k." in name or ".to_v." in name:
            kv = weights[vae_weight_name(name.replace("to_k", "to_kv").replace("to_v", "to_kv"))]
            k, v = kv.chunk(2)
            state[name] = k if ".to_k." in name else v
        else:
            state[name] = weights[vae_weight_name(name)]
    theirs.load_state_dict(state)
    return theirs


def write_pipeline(folder: Path, config: dict, weights: dict[str, Tensor], vae: dict | None) -> dict[str, Path]:
    """FOLDER/{unet, scheduler[, vae]}/ + model_index.json, as DDPMPipeline.from_pretrained reads them (the VAE,
    for latent runs, as AutoencoderKL.from_pretrained(FOLDER/vae) reads it). Needs diffusers.

    1-D: unet/ (UNet1DModel) and scheduler/ only, each for from_pretrained(FOLDER, subfolder=…): diffusers has no
    pipeline that samples a UNet1DModel with a DDPM scheduler (DanceDiffusionPipeline casts the timesteps to float,
    which DDPM/DDIM schedulers cannot index by), so no model_index.json claims one; the model card has the loop."""
    try:
        import diffusers
    except ImportError:
        raise DiffuseError("format=diffusers needs diffusers: pip install diffusers") from None
    name, keys = unet_config(config)
    unet = getattr(diffusers, name)(**keys)
    unet.load_state_dict({k[len(UNET_PREFIX):]: v for k, v in weights.items() if k.startswith(UNET_PREFIX)})
    scheduler = diffusers.DDPMScheduler(**scheduler_config(config))
    paths = {"unet": folder / "unet", "scheduler": folder / "scheduler"}
    unet.save_pretrained(paths["unet"])
    scheduler.save_pretrained(paths["scheduler"])
    if vae is not None:
        paths["vae"] = folder / "vae"
        to_autoencoder_kl(vae["config"], vae["weights"]).save_pretrained(paths["vae"])
    if name != "UNet2DModel":
        return paths
    index = {"_class_name": "DDPMPipeline", "_diffusers_version": diffusers.__version__,
             "scheduler": ["diffusers", "DDPMScheduler"], "unet": ["diffusers", name]}
    paths["model_index"] = folder / "model_index.json"
    paths["model_index"].write_text(json.dumps(index, indent=2) + "\n")
    return paths

"""diffusers' folder format, read into our classes: a pretrained `AutoencoderKL` as our SD-layout VAE, and a
`UNet2DModel` as the architecture and weights of `model=diffusers_unet`.

    FOLDER/config.json                           {"_class_name": "AutoencoderKL", "block_out_channels": […], …}
    FOLDER/diffusion_pytorch_model.safetensors   its weights (or .bin: read with weights_only=True)

Our VAE (diffuse/models/vae.py) is SD's kl-f8 layout, which is diffusers' AutoencoderKL layer for layer: the
parameter names differ, and our attention keeps k and v as one projection (`to_kv`). So a folder is mapped onto
our class (`read_autoencoder_kl`) rather than run through diffusers: latent runs then need no diffusers
installed, and a latent checkpoint embeds the VAE as it embeds one from `diffuse train-vae` (config + tensors).
Reading never runs code: config.json is JSON, checked key by key (only AutoencoderKL, only the values our layout
reproduces: SiLU, 32 groups, the standard down/up blocks, quant convs, no shift); the weights are tensors only.
The scaling factor is the config's `scaling_factor` (SD: 0.18215).

A UNet2DModel folder gives `model=diffusers_unet` its architecture (`unet_architecture`: UNet2DModel's keys,
which the model takes under the same names) and its weights (`unet_weights`: diffusers' names under "unet.").
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from diffuse.errors import DiffuseError

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


def read_config(folder: Path, expected_class: str) -> dict:
    """config.json as a dict, refused in one line unless diffusers wrote it for `expected_class`."""
    try:
        config = json.loads((folder / CONFIG).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DiffuseError(f"{folder / CONFIG}: not a readable JSON config ({type(e).__name__})") from None
    if not isinstance(config, dict):
        raise DiffuseError(f"{folder / CONFIG}: not a diffusers config (a JSON object)")
    name = config.get("_class_name")
    if name != expected_class:
        raise DiffuseError(f"{folder}: a diffusers {name or 'folder of unknown class'}, not an {expected_class} "
                           f"(config.json's _class_name)")
    return config


def read_weights(folder: Path) -> dict[str, Tensor]:
    """The folder's weights as tensors only: safetensors, else a .bin read with weights_only=True."""
    for name in WEIGHTS:
        path = folder / name
        if not path.is_file():
            continue
        try:
            if name.endswith(".safetensors"):
                from safetensors.torch import load_file
                state = load_file(str(path))
            else:
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


# ----- UNet2DModel ---------------------------------------------------------------------------------------------
UNET_CLASS = "UNet2DModel"
UNET_PREFIX = "unet."  # DiffusersUNet holds the UNet2DModel as .unet
_UNET_ARCHITECTURE = {"block_out_channels", "layers_per_block", "down_block_types", "up_block_types",
                      "attention_head_dim", "norm_num_groups", "norm_eps", "dropout", "freq_shift", "flip_sin_to_cos",
                      "center_input_sample", "add_attention", "mid_block_scale_factor", "downsample_padding",
                      "act_fn", "resnet_time_scale_shift", "time_embedding_type"}
_UNET_DEFAULTS = {"class_embed_type": None, "mid_block_type": "UNetMidBlock2D", "downsample_type": "conv",
                  "upsample_type": "conv", "time_embedding_dim": None, "attn_norm_num_groups": None}
_UNET_OTHER = {"in_channels", "out_channels", "num_class_embeds", "sample_size", "num_train_timesteps"}


def unet_architecture(path: str | Path) -> dict:
    """A diffusers UNet2DModel folder's config → {model key: value} for `model=diffusers_unet`, plus
    in_channels, out_channels, num_class_embeds and sample_size as the folder has them (for the caller to check
    against the data). One line for a key or value our model does not take."""
    folder = _folder(path)
    config = read_config(folder, UNET_CLASS)
    unknown = sorted(k for k in config if not k.startswith("_")
                     and k not in (*_UNET_ARCHITECTURE, *_UNET_DEFAULTS, *_UNET_OTHER))
    if unknown:
        raise DiffuseError(f"{folder}: UNet2DModel keys model=diffusers_unet does not take: {unknown}")
    for key, value in _UNET_DEFAULTS.items():
        if config.get(key, value) != value:
            raise DiffuseError(f"{folder}: {key}={config[key]!r}; model=diffusers_unet builds only {value!r}")
    out = {k: config[k] for k in _UNET_ARCHITECTURE if k in config}
    out.update({k: config.get(k) for k in ("in_channels", "out_channels", "num_class_embeds", "sample_size")})
    return out


def unet_weights(path: str | Path) -> dict[str, Tensor]:
    """A diffusers UNet2DModel folder's weights under DiffusersUNet's names (tensors only)."""
    folder = _folder(path)
    read_config(folder, UNET_CLASS)
    return {UNET_PREFIX + k: v for k, v in read_weights(folder).items()}


def is_unet_folder(path: str | Path) -> bool:
    if not is_diffusers_folder(path):
        return False
    try:
        return json.loads((_folder(path) / CONFIG).read_text()).get("_class_name") == UNET_CLASS
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return False

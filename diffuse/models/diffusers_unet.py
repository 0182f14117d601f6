"""diffusers' UNet2DModel (dim=2) and UNet1DModel (dim=1) as a diffuse model: `diffuse train model=diffusers_unet`,
trained, sampled by every sampler and evaluated like ours, and fine-tuned from a diffusers folder with
`model.pretrained=PATH`.

forward(x [B, C, *spatial], t [B] in [0, 1], y [B] | None) → [B, C, *spatial], what the network predicts
(`objective.prediction`: ε for diffusers' DDPM checkpoints).

The time convention. A diffusers UNet is trained on integer timesteps i = 0 … T−1, where step i has ᾱ_i of the
scheduler's table. Our discrete schedules put that same ᾱ_i at t = (i + 1)/T (diffuse/diffusion/schedules.py),
so the network is fed timestep = t·T − 1: exactly i on the schedule's grid (rounded there, so float error in t
never moves the sinusoids), and the linear interpolation between two steps off it (DPM-Solver's log-SNR grid).
On a continuous schedule (VE-SDE: num_timesteps null) it is fed 1000·t, the range its embedding was made for.

Class conditioning (2-D) is diffusers' own `num_class_embeds`, with one extra class, `num_classes`, as the null
class classifier-free guidance reads (y = None means it). UNet1DModel has no class embedding: 1-D runs are
unconditional. The keys are diffusers' own names; those only one of the two classes takes are refused at the
other dim unless left at their defaults. The network is held as `self.unet`, so its parameters are diffusers'
names under "unet." (diffuse/storage/diffusers_format.py maps them to and from diffusers' folders). diffusers is
an optional dependency, imported when this model is built.
"""

from __future__ import annotations

import inspect
from typing import Sequence

import torch
from torch import Tensor, nn

from diffuse.errors import DiffuseError
from diffuse.rules import BOOL, Choice, Float, Int, Ints

CONTINUOUS_TIME_SCALE = 1000.0


class DiffusersUNet(nn.Module):
    """A `diffusers.UNet2DModel` (dim 2) or `UNet1DModel` (dim 1) built from these keys (their own names and
    meanings), behind our model interface."""

    supported_dims = (1, 2)
    label_free_dims = (1,)      # UNet1DModel has no class embedding: 1-D runs are unconditional
    zero_init_output = False    # diffusers' own initialisation
    inert_parameters: tuple[str, ...] = ()
    config_rules = {"dim": Choice(1, 2), "in_channels": Int(1), "out_channels": Int(1, nullable=True),
                    "num_classes": Int(0), "num_timesteps": Int(2, nullable=True),
                    "block_out_channels": Ints(1), "layers_per_block": Int(1), "attention_head_dim": Int(1, nullable=True),
                    "norm_num_groups": Int(1), "norm_eps": Float(0, open_lo=True), "dropout": Float(0, 1, open_hi=True),
                    "freq_shift": Float(), "flip_sin_to_cos": BOOL,
                    "center_input_sample": BOOL, "add_attention": BOOL,
                    "mid_block_scale_factor": Float(0, open_lo=True), "downsample_padding": Int(0),
                    "act_fn": None, "resnet_time_scale_shift": Choice("default", "scale_shift"),
                    "time_embedding_type": Choice("positional", "fourier"), "down_block_types": None,
                    "up_block_types": None, "mid_block_type": None, "out_block_type": None,
                    "use_timestep_embedding": BOOL, "extra_in_channels": Int(0), "downsample_each_block": BOOL,
                    "pretrained": None}

    def __init__(self, dim: int = 2, in_channels: int = 3, out_channels: int | None = None, num_classes: int = 0,
                 num_timesteps: int | None = 1000, block_out_channels: Sequence[int] = (32, 64, 64),
                 layers_per_block: int = 1, down_block_types: Sequence[str] | None = None,
                 up_block_types: Sequence[str] | None = None, attention_head_dim: int | None = 8, norm_num_groups: int = 32, norm_eps: float = 1e-5,
                 dropout: float = 0.0, freq_shift: float = 0, flip_sin_to_cos: bool = True,
                 center_input_sample: bool = False, add_attention: bool = True, mid_block_scale_factor: float = 1.0,
                 downsample_padding: int = 1, act_fn: str = "silu", resnet_time_scale_shift: str = "default",
                 time_embedding_type: str = "positional", mid_block_type: str | None = None,
                 out_block_type: str | None = None, use_timestep_embedding: bool = True, extra_in_channels: int = 0,
                 downsample_each_block: bool = False, pretrained: str | None = None):
        super().__init__()
        if int(dim) not in self.supported_dims:
            raise DiffuseError(f"model diffusers_unet is diffusers' UNet2DModel (dim=2) or UNet1DModel (dim=1), "
                               f"not dim={dim}")
        if pretrained:  # the train job reads the folder (architecture + init_from) before building
            raise DiffuseError(f"model.pretrained={pretrained}: read by `diffuse train` only (its architecture "
                               f"becomes the model's keys, its weights init_from)")
        try:
            import diffusers
        except ImportError:
            raise DiffuseError("model diffusers_unet needs diffusers: pip install diffusers") from None
        keys = dict(locals())
        self.dim, self.num_classes = int(dim), int(num_classes)
        self.num_timesteps = None if num_timesteps is None else int(num_timesteps)
        self.num_levels = len(block_out_channels)
        own, other = (ONLY_1D, ONLY_2D) if self.dim == 1 else (ONLY_2D, ONLY_1D)
        changed = [k for k in other if keys[k] != DEFAULTS[k]]
        if changed:
            raise DiffuseError(f"model.{changed[0]} is a key of {unet_class(3 - self.dim)}; dim={self.dim} builds "
                               f"{unet_class(self.dim)}")
        if self.dim == 1 and self.num_classes:
            raise DiffuseError("diffusers' UNet1DModel has no class embedding: a dim=1 diffusers_unet run is "
                               "unconditional (conditional=false)")
        down, up = block_types(self.dim, self.num_levels, down_block_types, up_block_types)
        if len(down) != self.num_levels or len(up) != self.num_levels - (self.dim == 1):
            raise DiffuseError(f"model: {self.num_levels} block_out_channels need {self.num_levels} down_block_types "
                               f"and {self.num_levels - (self.dim == 1)} up_block_types; got {len(down)} and {len(up)}")
        shared = dict(in_channels=in_channels, out_channels=out_channels or in_channels,
                      block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
                      down_block_types=down, up_block_types=up, norm_num_groups=norm_num_groups,
                      freq_shift=freq_shift, flip_sin_to_cos=flip_sin_to_cos, act_fn=act_fn,
                      time_embedding_type=time_embedding_type)
        if self.dim == 1:
            self.unet = diffusers.UNet1DModel(
                **shared, mid_block_type=mid_block_type or "MidResTemporalBlock1D",
                out_block_type=out_block_type or "OutConv1DBlock", use_timestep_embedding=use_timestep_embedding,
                extra_in_channels=extra_in_channels, downsample_each_block=downsample_each_block)
        else:
            self.unet = diffusers.UNet2DModel(
                **shared, attention_head_dim=attention_head_dim, norm_eps=norm_eps, dropout=dropout,
                center_input_sample=center_input_sample, add_attention=add_attention,
                mid_block_scale_factor=mid_block_scale_factor, downsample_padding=downsample_padding,
                resnet_time_scale_shift=resnet_time_scale_shift,
                num_class_embeds=self.num_classes + 1 if self.num_classes > 0 else None)

    @property
    def null_class(self) -> int | None:
        return self.num_classes if self.num_classes > 0 else None

    def timestep(self, t: Tensor) -> Tensor:
        """Our t ∈ [0, 1] → the diffusers timestep the network was trained on (see the module's docstring)."""
        t = t.float()
        if self.num_timesteps is None:
            return t * CONTINUOUS_TIME_SCALE
        step = t * self.num_timesteps - 1
        nearest = step.round()
        return torch.where((step - nearest).abs() < 1e-3, nearest, step)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        factor = 2 ** (self.num_levels - 1)
        if any(s % factor for s in x.shape[2:]):
            raise ValueError(f"diffusers {unet_class(self.dim)} with {self.num_levels} levels needs sizes divisible "
                             f"by {factor}; got {tuple(x.shape[2:])}")
        timestep = self.timestep(t.expand(x.shape[0]))
        if self.dim == 1:
            return self.unet(x, timestep).sample
        labels = None
        if self.num_classes > 0:
            labels = y if y is not None else torch.full((x.shape[0],), self.num_classes, dtype=torch.long,
                                                        device=x.device)
        return self.unet(x, timestep, class_labels=labels).sample


def unet_class(dim: int) -> str:
    """The diffusers class a dim builds."""
    return "UNet1DModel" if dim == 1 else "UNet2DModel"


def block_types(dim: int, levels: int, down: Sequence[str] | None, up: Sequence[str] | None):
    """The blocks, or for those left null the defaults: 2-D DDPM's (attention at the second level), 1-D the
    temporal ResNet blocks of Janner et al.'s diffuser (UNet1DModel: one up block fewer than down)."""
    if dim == 1:
        default_down, default_up = ("DownResnetBlock1D",) * levels, ("UpResnetBlock1D",) * (levels - 1)
    else:
        default_down = tuple("AttnDownBlock2D" if i == 1 else "DownBlock2D" for i in range(levels))
        default_up = tuple(reversed([b.replace("Down", "Up") for b in default_down]))
    return tuple(down) if down is not None else default_down, tuple(up) if up is not None else default_up


ONLY_2D = ("attention_head_dim", "norm_eps", "dropout", "center_input_sample", "add_attention",
           "mid_block_scale_factor", "downsample_padding", "resnet_time_scale_shift")
ONLY_1D = ("mid_block_type", "out_block_type", "use_timestep_embedding", "extra_in_channels",
           "downsample_each_block")
DEFAULTS = {name: p.default for name, p in inspect.signature(DiffusersUNet.__init__).parameters.items()}

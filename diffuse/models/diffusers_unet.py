"""diffusers' UNet2DModel as a diffuse model: `diffuse train model=diffusers_unet`, trained, sampled by every
sampler and evaluated like ours, and fine-tuned from a diffusers folder with `model.pretrained=PATH`.

forward(x [B, C, H, W], t [B] in [0, 1], y [B] | None) → [B, C, H, W], what the network predicts
(`objective.prediction`: ε for diffusers' DDPM checkpoints).

The time convention. A diffusers UNet is trained on integer timesteps i = 0 … T−1, where step i has ᾱ_i of the
scheduler's table. Our discrete schedules put that same ᾱ_i at t = (i + 1)/T (diffuse/diffusion/schedules.py),
so the network is fed timestep = t·T − 1: exactly i on the schedule's grid (rounded there, so float error in t
never moves the sinusoids), and the linear interpolation between two steps off it (DPM-Solver's log-SNR grid).
On a continuous schedule (VE-SDE: num_timesteps null) it is fed 1000·t, the range its embedding was made for.

Class conditioning is diffusers' own `num_class_embeds`, with one extra class, `num_classes`, as the null class
classifier-free guidance reads (y = None means it). The network is held as `self.unet`, so its parameters are
diffusers' names under "unet." (diffuse/storage/diffusers_format.py maps them to and from diffusers' folders).
diffusers is an optional dependency, imported when this model is built.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from diffuse.errors import DiffuseError
from diffuse.rules import BOOL, Choice, Float, Int, Ints

CONTINUOUS_TIME_SCALE = 1000.0


class DiffusersUNet(nn.Module):
    """A `diffusers.UNet2DModel` built from these keys (its own names and meanings), behind our model interface."""

    supported_dims = (2,)       # UNet2DModel; diffusers' UNet1DModel has no class conditioning, so it is not offered
    zero_init_output = False    # diffusers' own initialisation
    inert_parameters: tuple[str, ...] = ()
    config_rules = {"dim": Choice(2), "in_channels": Int(1), "out_channels": Int(1, nullable=True),
                    "num_classes": Int(0), "num_timesteps": Int(2, nullable=True),
                    "block_out_channels": Ints(1), "layers_per_block": Int(1), "attention_head_dim": Int(1, nullable=True),
                    "norm_num_groups": Int(1), "norm_eps": Float(0, open_lo=True), "dropout": Float(0, 1, open_hi=True),
                    "freq_shift": Float(), "flip_sin_to_cos": BOOL,
                    "center_input_sample": BOOL, "add_attention": BOOL,
                    "mid_block_scale_factor": Float(0, open_lo=True), "downsample_padding": Int(0),
                    "act_fn": None, "resnet_time_scale_shift": Choice("default", "scale_shift"),
                    "time_embedding_type": Choice("positional", "fourier"), "down_block_types": None,
                    "up_block_types": None, "pretrained": None}

    def __init__(self, dim: int = 2, in_channels: int = 3, out_channels: int | None = None, num_classes: int = 0,
                 num_timesteps: int | None = 1000, block_out_channels: Sequence[int] = (32, 64, 64),
                 layers_per_block: int = 1,
                 down_block_types: Sequence[str] = ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                 up_block_types: Sequence[str] = ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                 attention_head_dim: int | None = 8, norm_num_groups: int = 32, norm_eps: float = 1e-5,
                 dropout: float = 0.0, freq_shift: float = 0, flip_sin_to_cos: bool = True,
                 center_input_sample: bool = False, add_attention: bool = True, mid_block_scale_factor: float = 1.0,
                 downsample_padding: int = 1, act_fn: str = "silu", resnet_time_scale_shift: str = "default",
                 time_embedding_type: str = "positional", pretrained: str | None = None):
        super().__init__()
        if int(dim) != 2:
            raise DiffuseError(f"model diffusers_unet is diffusers' UNet2DModel: 2-D only, not dim={dim}")
        if pretrained:  # the train job reads the folder (architecture + init_from) before building
            raise DiffuseError(f"model.pretrained={pretrained}: read by `diffuse train` only (its architecture "
                               f"becomes the model's keys, its weights init_from)")
        try:
            from diffusers import UNet2DModel
        except ImportError:
            raise DiffuseError("model diffusers_unet needs diffusers: pip install diffusers") from None
        if len(down_block_types) != len(block_out_channels) or len(up_block_types) != len(block_out_channels):
            raise DiffuseError(f"model: {len(block_out_channels)} block_out_channels need as many down_block_types "
                               f"and up_block_types; got {len(down_block_types)} and {len(up_block_types)}")
        self.dim, self.num_classes = 2, int(num_classes)
        self.num_timesteps = None if num_timesteps is None else int(num_timesteps)
        self.num_levels = len(block_out_channels)
        self.unet = UNet2DModel(
            in_channels=in_channels, out_channels=out_channels or in_channels,
            block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
            down_block_types=tuple(down_block_types), up_block_types=tuple(up_block_types),
            attention_head_dim=attention_head_dim, norm_num_groups=norm_num_groups, norm_eps=norm_eps,
            dropout=dropout, freq_shift=freq_shift, flip_sin_to_cos=flip_sin_to_cos,
            center_input_sample=center_input_sample, add_attention=add_attention,
            mid_block_scale_factor=mid_block_scale_factor, downsample_padding=downsample_padding, act_fn=act_fn,
            resnet_time_scale_shift=resnet_time_scale_shift, time_embedding_type=time_embedding_type,
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
            raise ValueError(f"diffusers UNet2DModel with {self.num_levels} levels needs sizes divisible by "
                             f"{factor}; got {tuple(x.shape[2:])}")
        labels = None
        if self.num_classes > 0:
            labels = y if y is not None else torch.full((x.shape[0],), self.num_classes, dtype=torch.long,
                                                        device=x.device)
        return self.unet(x, self.timestep(t.expand(x.shape[0])), class_labels=labels).sample

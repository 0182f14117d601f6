"""N-dimensional building blocks: the same code serves 1-D, 2-D and 3-D data through `dim`."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from diffuse.dims import check_dim

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


def conv_nd(dim: int, *args, **kwargs) -> nn.Module:
    return _CONV[check_dim(dim)](*args, **kwargs)


def conv_transpose_nd(dim: int, *args, **kwargs) -> nn.Module:
    return _CONV_T[check_dim(dim)](*args, **kwargs)


def group_norm(channels: int, max_groups: int = 32) -> nn.GroupNorm:
    """GroupNorm with the largest group count ≤ max_groups that divides `channels`."""
    groups = max(g for g in range(1, max_groups + 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


def broadcast_channels(v: Tensor, ndim: int) -> Tensor:
    """[B, C] → [B, C, 1, …, 1] to add to a [B, C, *spatial] feature map."""
    return v.view(*v.shape, *([1] * (ndim - 2)))


def output_head(dim: int, channels: int, out_channels: int) -> nn.Sequential:
    """GroupNorm → SiLU → 3-conv, the conv zero-initialised: the network starts as the zero predictor
    (ε̂ = 0), a stable first step."""
    head = nn.Sequential(group_norm(channels), nn.SiLU(), conv_nd(dim, channels, out_channels, 3, padding=1))
    nn.init.zeros_(head[-1].weight)
    nn.init.zeros_(head[-1].bias)
    return head


class ResBlock(nn.Module):
    """GroupNorm → SiLU → conv; GroupNorm scaled and shifted by the embedding → SiLU → dropout → conv; + skip.

    The embedding (time, class) enters as a scale and shift *after* the second GroupNorm (ADM's
    "scale-shift norm", Dhariwal & Nichol 2021). Adding it before the norm, as the original DDPM does, is
    erased by the norm whenever a group holds one channel (GroupNorm(32) on 32 channels): the network
    would then ignore t and y at that level.
    """

    def __init__(self, dim: int, in_ch: int, out_ch: int, emb_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = group_norm(in_ch)
        self.conv1 = conv_nd(dim, in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2 = group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = conv_nd(dim, out_ch, out_ch, 3, padding=1)
        self.skip = conv_nd(dim, in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = broadcast_channels(self.emb(F.silu(emb)), h.ndim).chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class Downsample(nn.Module):
    """Strided 3-conv: halves every spatial size."""

    def __init__(self, dim: int, channels: int):
        super().__init__()
        self.conv = conv_nd(dim, channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest ×2 then a 3-conv (avoids transposed-conv checkerboards)."""

    def __init__(self, dim: int, channels: int):
        super().__init__()
        self.conv = conv_nd(dim, channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))

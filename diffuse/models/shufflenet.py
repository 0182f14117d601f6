"""A small UNet built from ShuffleNet v2 units (the MNIST ShuffleNet setup), 2-D.

forward(x [B, C, H, W], t [B] in [0, 1], y [B] | None) → [B, out_channels, H, W]

ShuffleNet v2 (Ma et al. 2018, https://arxiv.org/abs/1807.11164) units are the residual blocks:
  - basic unit: split the channels in two halves; one passes through untouched (the residual path), the
    other goes 1×1 conv → 3×3 depthwise conv → 1×1 conv; concatenate; shuffle the channels so the halves mix;
  - stride-2 unit (downsampling): both branches see all channels, each with a stride-2 depthwise conv.
The encoder runs 28×28 → 14×14 → 7×7 (for MNIST; any size works) and the decoder comes back with bilinear
upsampling and skip connections, as in that setup. A sinusoidal time embedding goes through an MLP and is
added to the feature maps in every encoder and decoder block; a class embedding (with a null class for
classifier-free guidance) is added to the time embedding.

Departure from the MNIST ShuffleNet setup: GroupNorm instead of BatchNorm by default (`norm: batch` restores it), so a
sample does not depend on what else is in its batch and the EMA weights match their normalisation.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffuse.models.blocks import broadcast_channels, group_norm
from diffuse.rules import Choice, Int, Ints
from diffuse.models.embeddings import ClassEmbedding, SinusoidalTimeEmbedding, TimeAndClassConditioned, TimeMLP

NORMS = ("group", "batch")


def _norm(kind: str, channels: int) -> nn.Module:
    return group_norm(channels) if kind == "group" else nn.BatchNorm2d(channels)


def _conv_norm_act(in_ch: int, out_ch: int, norm: str, kernel: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, kernel, padding=kernel // 2, bias=False),
                         _norm(norm, out_ch), nn.SiLU())


def _depthwise(channels: int, norm: str, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(channels, channels, 3, stride=stride, padding=1, groups=channels, bias=False),
                         _norm(norm, channels))


def channel_shuffle(x: Tensor, groups: int = 2) -> Tensor:
    """[B, g·c, H, W] → interleave the g groups' channels (ShuffleNet's channel shuffle)."""
    b, ch = x.shape[:2]
    return x.view(b, groups, ch // groups, *x.shape[2:]).transpose(1, 2).reshape(x.shape)


class ShuffleUnit(nn.Module):
    """ShuffleNet v2 basic unit, in_ch → out_ch (both even). With in_ch == out_ch the first half is the
    identity (a residual path); otherwise it is projected by depthwise 3×3 → 1×1, as in that setup."""

    def __init__(self, in_ch: int, out_ch: int, norm: str = "group"):
        super().__init__()
        if in_ch % 2 or out_ch % 2:
            raise ValueError(f"ShuffleUnit needs even channel counts; got {in_ch} → {out_ch}")
        half_in, half_out = in_ch // 2, out_ch // 2
        self.left = nn.Identity() if in_ch == out_ch else nn.Sequential(
            _depthwise(half_in, norm), _conv_norm_act(half_in, half_out, norm))
        self.right = nn.Sequential(_conv_norm_act(half_in, half_in, norm), _depthwise(half_in, norm),
                                   _conv_norm_act(half_in, half_out, norm))

    def forward(self, x: Tensor) -> Tensor:
        left, right = x.chunk(2, dim=1)
        return channel_shuffle(torch.cat([self.left(left), self.right(right)], dim=1))


class ShuffleDownUnit(nn.Module):
    """ShuffleNet v2 stride-2 unit: in_ch → out_ch at half the spatial size."""

    def __init__(self, in_ch: int, out_ch: int, norm: str = "group"):
        super().__init__()
        half = out_ch // 2
        self.left = nn.Sequential(_depthwise(in_ch, norm, stride=2), _conv_norm_act(in_ch, half, norm))
        self.right = nn.Sequential(_conv_norm_act(in_ch, half, norm), _depthwise(half, norm, stride=2),
                                   _conv_norm_act(half, half, norm))

    def forward(self, x: Tensor) -> Tensor:
        return channel_shuffle(torch.cat([self.left(x), self.right(x)], dim=1))


class _AddTime(nn.Module):
    """h + Linear(emb) broadcast over space, then SiLU (the MNIST ShuffleNet setup's TimeMLP step)."""

    def __init__(self, emb_dim: int, channels: int):
        super().__init__()
        self.proj = nn.Linear(emb_dim, channels)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        return F.silu(h + broadcast_channels(self.proj(emb), h.ndim))


class EncoderBlock(nn.Module):
    """units × ShuffleUnit(in_ch) → ShuffleUnit(in_ch → out_ch/2) = skip; + time; stride-2 unit → out_ch."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, units: int, norm: str):
        super().__init__()
        self.units = nn.Sequential(*[ShuffleUnit(in_ch, in_ch, norm) for _ in range(units)],
                                   ShuffleUnit(in_ch, out_ch // 2, norm))
        self.time = _AddTime(emb_dim, out_ch // 2)
        self.down = ShuffleDownUnit(out_ch // 2, out_ch, norm)

    def forward(self, x: Tensor, emb: Tensor) -> tuple[Tensor, Tensor]:
        skip = self.units(x)
        return self.down(self.time(skip, emb)), skip


class DecoderBlock(nn.Module):
    """Upsample to the skip's size, concat the skip (in_ch/2 + in_ch/2), units × ShuffleUnit(in_ch) →
    ShuffleUnit(in_ch → in_ch/2); + time; ShuffleUnit(in_ch/2 → out_ch/2)."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, units: int, norm: str):
        super().__init__()
        self.units = nn.Sequential(*[ShuffleUnit(in_ch, in_ch, norm) for _ in range(units)],
                                   ShuffleUnit(in_ch, in_ch // 2, norm))
        self.time = _AddTime(emb_dim, in_ch // 2)
        self.out = ShuffleUnit(in_ch // 2, out_ch // 2, norm)

    def forward(self, x: Tensor, skip: Tensor, emb: Tensor) -> Tensor:
        x = F.interpolate(x, size=skip.shape[2:], mode="bilinear", align_corners=False)
        h = self.units(torch.cat([x, skip], dim=1))
        return self.out(self.time(h, emb))


class ShuffleNetUNet(TimeAndClassConditioned, nn.Module):
    """Encoder blocks at widths base·channel_mult (each halves the size), a middle of ShuffleUnits, and
    mirrored decoder blocks; the MNIST ShuffleNet setup is base_channels=64, channel_mult=(2, 4): 28 → 14 → 7 → 14 → 28.

    units: basic units per block before its channel-changing unit (3 in the MNIST ShuffleNet setup).
    time_emb_dim: width of the sinusoidal time embedding (the MLP keeps it).
    """

    supported_dims = (2,)
    config_rules = {"base_channels": Int(1), "channel_mult": Ints(1), "units": Int(1), "time_emb_dim": Int(2),
                    "norm": Choice("group", "batch")}

    def __init__(self, dim: int = 2, in_channels: int = 1, out_channels: int | None = None,
                 base_channels: int = 64, channel_mult: Sequence[int] = (2, 4), units: int = 3,
                 time_emb_dim: int = 256, num_classes: int = 0, norm: str = "group"):
        super().__init__()
        if dim != 2:
            raise ValueError(f"ShuffleNetUNet is 2-D only (dim=2); got dim={dim}: use model=msnat or model=unet "
                             "for 1-D and 3-D data")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {', '.join(NORMS)}; got {norm!r}")
        if base_channels % 4:
            raise ValueError(f"base_channels must be a multiple of 4; got {base_channels}")
        self.dim = dim
        self.num_classes = num_classes
        out_channels = out_channels or in_channels
        self.time_embed = TimeMLP(SinusoidalTimeEmbedding(time_emb_dim), time_emb_dim, time_emb_dim)
        self.class_embed = ClassEmbedding(num_classes, time_emb_dim) if num_classes > 0 else None

        widths = [base_channels] + [base_channels * m for m in channel_mult]
        pairs = list(zip(widths[:-1], widths[1:]))  # (in, out) of each encoder block
        self.stem = _conv_norm_act(in_channels, base_channels, norm, kernel=3)
        self.encoder = nn.ModuleList([EncoderBlock(i, o, time_emb_dim, units, norm) for i, o in pairs])
        deepest = widths[-1]
        self.mid = nn.Sequential(*[ShuffleUnit(deepest, deepest, norm) for _ in range(2)],
                                 ShuffleUnit(deepest, deepest // 2, norm))
        self.decoder = nn.ModuleList([DecoderBlock(o, i, time_emb_dim, units, norm) for i, o in reversed(pairs)])
        self.head = nn.Conv2d(base_channels // 2, out_channels, 1)
        nn.init.zeros_(self.head.weight)  # start as the zero predictor: a stable first step
        nn.init.zeros_(self.head.bias)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        if x.ndim != 4:
            raise ValueError(f"ShuffleNetUNet takes [B, C, H, W]; got {tuple(x.shape)}")
        emb = self.condition(t, y, x)
        h = self.stem(x)
        skips = []
        for block in self.encoder:
            h, skip = block(h, emb)
            skips.append(skip)
        h = self.mid(h)
        for block in self.decoder:
            h = block(h, skips.pop(), emb)
        return self.head(h)

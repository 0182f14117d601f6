"""The plain pixel-space UNet (DDPM/ADM style), N-dimensional, with optional class conditioning.

forward(x [B, C, *spatial], t [B] in [0, 1], y [B] | None) → [B, out_channels, *spatial]
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from diffuse.dims import check_dim
from diffuse.rules import Float, Int, Ints
from diffuse.models.attention import SpatialSelfAttention
from diffuse.models.blocks import Downsample, ResBlock, Upsample, conv_nd, output_head
from diffuse.models.embeddings import ClassEmbedding, SinusoidalTimeEmbedding, TimeAndClassConditioned, TimeMLP


class UNet(TimeAndClassConditioned, nn.Module):
    """Encoder of `len(channel_mult)` levels (ResBlocks, attention at `attn_levels`), a middle block, and a
    mirrored decoder fed by skip connections. Each level but the last halves the spatial size.

    time_emb_dim: width of the sinusoidal embedding (the MLP widens it to 4·base_channels).
    num_classes > 0 adds a class embedding (plus a null class for guidance) to the time embedding.
    """

    config_rules = {"base_channels": Int(1), "channel_mult": Ints(1), "num_res_blocks": Int(1),
                    "attn_levels": Ints(0), "attn_heads": Int(1), "time_emb_dim": Int(2, nullable=True),
                    "dropout": Float(0, 1, open_hi=True)}

    def __init__(self, dim: int = 2, in_channels: int = 1, out_channels: int | None = None,
                 base_channels: int = 32, channel_mult: Sequence[int] = (1, 2, 2), num_res_blocks: int = 1,
                 attn_levels: Sequence[int] = (), attn_heads: int = 1, time_emb_dim: int | None = None,
                 num_classes: int = 0, dropout: float = 0.0):
        super().__init__()
        self.dim = check_dim(dim)
        self.num_classes = num_classes
        self.num_levels = len(channel_mult)
        out_channels = out_channels or in_channels
        emb_dim = 4 * base_channels
        time_emb_dim = time_emb_dim or base_channels
        self.time_embed = TimeMLP(SinusoidalTimeEmbedding(time_emb_dim), time_emb_dim, emb_dim)
        self.class_embed = ClassEmbedding(num_classes, emb_dim) if num_classes > 0 else None

        self.stem = conv_nd(dim, in_channels, base_channels, 3, padding=1)
        self.down = nn.ModuleList()
        skips = [base_channels]
        ch = base_channels
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                out = base_channels * mult
                attn = SpatialSelfAttention(out, attn_heads) if level in attn_levels else nn.Identity()
                self.down.append(nn.ModuleList([ResBlock(dim, ch, out, emb_dim, dropout), attn]))
                ch = out
                skips.append(ch)
            if level < self.num_levels - 1:
                self.down.append(Downsample(dim, ch))
                skips.append(ch)

        self.mid1 = ResBlock(dim, ch, ch, emb_dim, dropout)
        self.mid_attn = SpatialSelfAttention(ch, attn_heads) if attn_levels else nn.Identity()
        self.mid2 = ResBlock(dim, ch, ch, emb_dim, dropout)

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(num_res_blocks + 1):
                out = base_channels * mult
                attn = SpatialSelfAttention(out, attn_heads) if level in attn_levels else nn.Identity()
                self.up.append(nn.ModuleList([ResBlock(dim, ch + skips.pop(), out, emb_dim, dropout), attn]))
                ch = out
            if level > 0:
                self.up.append(Upsample(dim, ch))

        self.head = output_head(dim, ch, out_channels)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        factor = 2 ** (self.num_levels - 1)
        if any(s % factor for s in x.shape[2:]):
            raise ValueError(f"UNet with {self.num_levels} levels needs spatial sizes divisible by {factor}; "
                             f"got {tuple(x.shape[2:])}")
        emb = self.condition(t, y, x)
        h = self.stem(x)
        hs = [h]
        for layer in self.down:
            if isinstance(layer, Downsample):
                h = layer(h)
            else:
                res, attn = layer
                h = attn(res(h, emb))
            hs.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        for layer in self.up:
            if isinstance(layer, Upsample):
                h = layer(h)
            else:
                res, attn = layer
                h = attn(res(torch.cat([h, hs.pop()], dim=1), emb))
        return self.head(h)

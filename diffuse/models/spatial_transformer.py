"""A class-conditional UNet with spatial transformers (the score-SDE tutorial setup), after the UNet of Song's
score-SDE tutorial extended with cross-attention to a class embedding, as in latent diffusion.

forward(x [B, C, *spatial], t [B] in [0, 1], y [B] | None) → [B, out_channels, *spatial]

- Time: Gaussian random Fourier features of the continuous t (Tancik et al. 2020), then Linear; every
  encoder/decoder conv gets a Dense projection of it added per channel.
- Class: `nn.Embedding` of the label (plus one null label for classifier-free guidance) used as the
  cross-attention context, one token per sample.
- Encoder: Conv (3×3, stride 1 then 2, 2, 2, no padding: 28 → 26 → 12 → 5 → 2) → + Dense(time) →
  GroupNorm → SiLU ("swish" in the tutorial; the score-SDE tutorial setup's README says GELU for the transformer MLP, which is
  what the MLP uses); SpatialTransformer blocks at the two coarsest levels.
- SpatialTransformer: flatten [B, C, *spatial] to tokens [B, N, C], then self-attention, cross-attention on
  the class embedding, MLP (GELU), each pre-norm with a residual, and reshape back, plus an outer residual.
- Decoder: ConvTranspose back up, concatenating the encoder's maps (skips). Each transposed conv is given
  the skip's size, so odd sizes work (28 and 32 alike) without hand-set output_padding.

What it outputs: the tutorial divides the last layer by σ(t) to return a score and trains ‖score·σ + z‖²,
i.e. the last layer itself learns score·σ = −ε. Here the last layer is returned as it is and trained by the
project's objective (ε-prediction by default), so it learns +ε: the same network up to the sign of its
last layer, and sampling is the same through score = −ε̂/σ.

Dimension-agnostic like the rest (N-d convs; tokens are all positions), though the score-SDE tutorial setup is 2-D.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffuse.dims import check_dim
from diffuse.rules import POSITIVE, Int, Ints
from diffuse.models.attention import MultiHeadAttention
from diffuse.models.blocks import broadcast_channels, conv_nd, conv_transpose_nd
from diffuse.models.embeddings import ClassEmbedding, GaussianFourierProjection, TimeAndClassConditioned


class TransformerBlock(nn.Module):
    """Tokens [B, N, C] → self-attention, cross-attention on `context` [B, M, context_dim] (skipped when
    context_dim is None), MLP; each pre-LayerNorm with a residual (the tutorial's TransformerBlock)."""

    def __init__(self, channels: int, context_dim: int | None, heads: int = 1, mlp_ratio: int = 3):
        super().__init__()
        self.norm1 = nn.LayerNorm(channels)
        self.self_attn = MultiHeadAttention(channels, heads)
        self.cross_attn = MultiHeadAttention(channels, heads, context_dim=context_dim) if context_dim else None
        self.norm2 = nn.LayerNorm(channels) if context_dim else None
        self.norm3 = nn.LayerNorm(channels)
        self.mlp = nn.Sequential(nn.Linear(channels, mlp_ratio * channels), nn.GELU(),
                                 nn.Linear(mlp_ratio * channels, channels))

    def forward(self, x: Tensor, context: Tensor | None) -> Tensor:
        x = x + self.self_attn(self.norm1(x))
        if self.cross_attn is not None:
            x = x + self.cross_attn(self.norm2(x), context)
        return x + self.mlp(self.norm3(x))


class SpatialTransformer(nn.Module):
    """[B, C, *spatial] → tokens [B, N, C] → TransformerBlock → back to [B, C, *spatial], plus x."""

    def __init__(self, channels: int, context_dim: int | None, heads: int = 1):
        super().__init__()
        self.block = TransformerBlock(channels, context_dim, heads)

    def forward(self, x: Tensor, context: Tensor | None) -> Tensor:
        tokens = x.flatten(2).transpose(1, 2)
        return x + self.block(tokens, context).transpose(1, 2).reshape(x.shape)


class _ConvLevel(nn.Module):
    """conv (or transposed conv) → + Dense(time) → GroupNorm → SiLU."""

    def __init__(self, conv: nn.Module, channels: int, emb_dim: int, groups: int):
        super().__init__()
        self.conv = conv
        self.dense = nn.Linear(emb_dim, channels)
        self.norm = nn.GroupNorm(math.gcd(groups, channels), channels)  # the tutorial's groups when they divide

    def forward(self, x: Tensor, emb: Tensor, output_size: Sequence[int] | None = None) -> Tensor:
        h = self.conv(x) if output_size is None else self.conv(x, output_size=list(output_size))
        return F.silu(self.norm(h + broadcast_channels(self.dense(emb), h.ndim)))


class SpatialTransformerUNet(TimeAndClassConditioned, nn.Module):
    """Four levels of widths `channels` (the tutorial's [32, 64, 128, 256]); spatial transformers at the
    levels in `attn_levels` (0-based, encoder and decoder alike; default the two coarsest).

    num_classes > 0: class embedding of width context_dim as cross-attention context (null class included);
    num_classes = 0: no cross-attention, an unconditional score UNet.
    """

    zero_init_output = False  # the tutorial's final conv, initialised as published
    # Cross-attention over one context token (the class embedding): the softmax over one key is 1 whatever the
    # query, so the query projection and norm2, which feeds only the query, cannot change the output.
    inert_parameters = ("cross_attn.to_q", ".norm2.")
    config_rules = {"channels": Ints(1), "embed_dim": Int(2), "context_dim": Int(1), "heads": Int(1),
                    "attn_levels": Ints(0), "fourier_scale": POSITIVE}

    def __init__(self, dim: int = 2, in_channels: int = 1, out_channels: int | None = None,
                 channels: Sequence[int] = (32, 64, 128, 256), embed_dim: int = 256, context_dim: int = 256,
                 num_classes: int = 0, heads: int = 1, attn_levels: Sequence[int] = (2, 3),
                 fourier_scale: float = 30.0):
        super().__init__()
        self.dim = check_dim(dim)
        self.num_classes = num_classes
        if len(channels) != 4:
            raise ValueError(f"channels must list 4 widths (one per level); got {list(channels)}")
        out_channels = out_channels or in_channels
        c = list(channels)
        self.time_embed = nn.Sequential(GaussianFourierProjection(embed_dim, fourier_scale),
                                        nn.Linear(embed_dim, embed_dim))
        self.class_embed = ClassEmbedding(num_classes, context_dim) if num_classes > 0 else None
        ctx = context_dim if num_classes > 0 else None

        def conv(i, o, stride):
            return conv_nd(dim, i, o, 3, stride=stride, bias=False)

        def tconv(i, o, stride):
            return conv_transpose_nd(dim, i, o, 3, stride=stride, bias=False)

        def attn(level, width):
            return SpatialTransformer(width, ctx, heads) if level in attn_levels else None

        self.enc = nn.ModuleList([_ConvLevel(conv(in_channels, c[0], 1), c[0], embed_dim, 4),
                                  _ConvLevel(conv(c[0], c[1], 2), c[1], embed_dim, 32),
                                  _ConvLevel(conv(c[1], c[2], 2), c[2], embed_dim, 32),
                                  _ConvLevel(conv(c[2], c[3], 2), c[3], embed_dim, 32)])
        self.enc_attn = nn.ModuleList([attn(i, w) or nn.Identity() for i, w in enumerate(c)])
        self.dec = nn.ModuleList([_ConvLevel(tconv(c[3], c[2], 2), c[2], embed_dim, 32),
                                  _ConvLevel(tconv(2 * c[2], c[1], 2), c[1], embed_dim, 32),
                                  _ConvLevel(tconv(2 * c[1], c[0], 2), c[0], embed_dim, 32)])
        self.dec_attn = nn.ModuleList([attn(i, c[i]) or nn.Identity() for i in (2, 1, 0)])
        self.head = conv_transpose_nd(dim, 2 * c[0], out_channels, 3, stride=1)

    @staticmethod
    def min_size() -> int:
        return 17  # 3-conv then three stride-2 3-convs without padding: 17 → 15 → 7 → 3 → 1

    def _attend(self, layer: nn.Module, h: Tensor, context: Tensor | None) -> Tensor:
        return h if isinstance(layer, nn.Identity) else layer(h, context)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        if x.ndim != self.dim + 2 or min(x.shape[2:]) < self.min_size():
            raise ValueError(f"SpatialTransformerUNet(dim={self.dim}) takes [B, C, *spatial] with "
                             f"{self.dim} sizes ≥ {self.min_size()}; got {tuple(x.shape)}")
        emb = F.silu(self.time_embed(t))
        context = self.class_embed(y, x.shape[0], x.device)[:, None] if self.class_embed is not None else None
        skips, h = [], x
        for level, attn in zip(self.enc, self.enc_attn):
            h = self._attend(attn, level(h, emb), context)
            skips.append(h)
        h = skips.pop()
        for level, attn in zip(self.dec, self.dec_attn):
            skip = skips.pop()
            h = self._attend(attn, level(h, emb, output_size=skip.shape[2:]), context)
            h = torch.cat([h, skip], dim=1)
        return self.head(h, output_size=list(x.shape[2:]))

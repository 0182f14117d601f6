"""Attention layers on token sequences and on N-d feature maps. All use F.scaled_dot_product_attention."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from diffuse.models.blocks import group_norm


class MultiHeadAttention(nn.Module):
    """Multi-head (self- or cross-) attention on tokens.

    x: [B, N, C]; context: [B, M, context_dim] or None (self-attention); causal masks key j > query i.
    """

    def __init__(self, dim: int, heads: int = 1, context_dim: int | None = None, bias: bool = True,
                 causal: bool = False):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by heads={heads}")
        self.heads = heads
        self.causal = causal
        self.to_q = nn.Linear(dim, dim, bias=bias)
        self.to_kv = nn.Linear(context_dim or dim, 2 * dim, bias=bias)
        self.out = nn.Linear(dim, dim, bias=bias)

    def forward(self, x: Tensor, context: Tensor | None = None, causal: bool | None = None) -> Tensor:
        b, n, c = x.shape
        ctx = x if context is None else context
        q = self.to_q(x)
        k, v = self.to_kv(ctx).chunk(2, dim=-1)
        split = lambda t: t.view(b, t.shape[1], self.heads, c // self.heads).transpose(1, 2)  # noqa: E731
        causal = self.causal if causal is None else causal
        h = F.scaled_dot_product_attention(split(q), split(k), split(v), is_causal=causal)
        return self.out(h.transpose(1, 2).reshape(b, n, c))


class SpatialSelfAttention(nn.Module):
    """Residual self-attention over all positions of a [B, C, *spatial] map (GroupNorm first)."""

    def __init__(self, channels: int, heads: int = 1):
        super().__init__()
        self.norm = group_norm(channels)
        self.attn = MultiHeadAttention(channels, heads)

    def forward(self, x: Tensor) -> Tensor:
        b, c = x.shape[:2]
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # [B, N, C]
        return x + self.attn(tokens).transpose(1, 2).reshape(x.shape)

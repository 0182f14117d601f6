"""Time and class embeddings shared by the models. Times are continuous t ∈ [0, 1] (t = 1 is noise)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from diffuse.rules import Choice, Int


class SinusoidalTimeEmbedding(nn.Module):
    """Transformer-style sinusoids of `scale·t` (Ho et al. 2020 use the step index: scale = T = 1000).

    t: [B] → [B, dim]
    """

    def __init__(self, dim: int, scale: float = 1000.0, max_period: float = 10000.0):
        super().__init__()
        if dim % 2:
            raise ValueError(f"time embedding dim must be even, got {dim}")
        self.dim, self.scale = dim, scale
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, t: Tensor) -> Tensor:
        args = (t.float() * self.scale)[:, None] * self.freqs[None]
        return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)


class GaussianFourierProjection(nn.Module):
    """Random Fourier features of t (Tancik et al. 2020; Song's score-SDE tutorial): fixed W ~ N(0, scale²).

    t: [B] → [B, dim] = [sin(2π t W), cos(2π t W)]
    """

    def __init__(self, dim: int, scale: float = 30.0):
        super().__init__()
        if dim % 2:
            raise ValueError(f"Fourier embedding dim must be even, got {dim}")
        # A buffer, not a parameter: the features are fixed, and persistent so checkpoints keep them.
        self.register_buffer("W", torch.randn(dim // 2) * scale)

    def forward(self, t: Tensor) -> Tensor:
        proj = t.float()[:, None] * self.W[None] * 2 * math.pi
        return torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1)


class TimeMLP(nn.Module):
    """Embedding → Linear → SiLU → Linear, as in DDPM/ADM."""

    def __init__(self, embedding: nn.Module, in_dim: int, out_dim: int):
        super().__init__()
        self.embedding = embedding
        self.mlp = nn.Sequential(nn.Linear(in_dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(self.embedding(t))


class ClassEmbedding(nn.Module):
    """Labels 0…num_classes−1 plus one extra "null" label (index num_classes) for classifier-free guidance.

    y: [B] int64 → [B, dim]; y = None gives the null embedding.
    """

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding = nn.Embedding(num_classes + 1, dim)

    @property
    def null_class(self) -> int:
        return self.num_classes

    def forward(self, y: Tensor | None, batch: int, device: torch.device) -> Tensor:
        if y is None:
            y = torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
        return self.embedding(y)


class TimeAndClassConditioned:
    """Mixin for networks with a `time_embed` (t → emb) and an optional `class_embed` (a ClassEmbedding, None
    when unconditional): the embedding their blocks add, and the null class guidance reads."""

    time_embed: nn.Module
    class_embed: ClassEmbedding | None
    supported_dims: tuple[int, ...] = (1, 2, 3)  # spatial dims the network takes (the model contract tests each)
    zero_init_output: bool = True  # the output head starts at zero, so a fresh network predicts 0
    # names (substrings) of parameters that get no gradient by construction; the model contract exempts them
    inert_parameters: tuple[str, ...] = ()
    config_rules = {"dim": Choice(1, 2, 3), "in_channels": Int(1), "out_channels": Int(1, nullable=True),
                    "num_classes": Int(0)}

    @property
    def null_class(self) -> int | None:
        return self.class_embed.null_class if self.class_embed is not None else None

    def condition(self, t: Tensor, y: Tensor | None, x: Tensor) -> Tensor:
        """[B] times (and [B] labels, None = the null class) of the batch x → [B, emb]."""
        emb = self.time_embed(t)
        if self.class_embed is not None:
            emb = emb + self.class_embed(y, x.shape[0], x.device)
        return emb

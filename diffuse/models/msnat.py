"""MSNAT: a Multi-Scale Neighborhood Attention Transformer UNet. One class serves 1-D, 2-D and 3-D data.

forward(x [B, C, *spatial], t [B] in [0, 1], y [B] | None) → [B, out_channels, *spatial]

A UNet (N-d conv stem, ResBlocks, strided-conv downsampling, nearest+conv upsampling, skip connections)
whose levels also hold transformer blocks with neighborhood attention (Hassani et al. 2023, NAT): each
position attends to its k^d nearest neighbours, so attention costs grow linearly with the number of
positions and run at full resolution, in 3-D too. Multi-scale, twice over:
  - per level its own kernel size and dilation(s): the same window covers ever more of the data deeper down;
  - within a block the heads split into groups with different dilations (Hassani & Shi 2022, DiNAT, mix
    dilated and local windows across layers; here inside one layer), so near and far context together.
The time (+ class) embedding enters every ResBlock (added) and every transformer block (scale and shift of
both pre-norms, adaLN as in DiT). A depthwise 3-conv before each block's attention gives it positions
(a conditional positional encoding, Chu et al. 2021), which neighborhood attention alone does not have.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffuse.dims import check_dim
from diffuse.rules import POSITIVE, Float, Int
from diffuse.models.attention import NeighborhoodAttention
from diffuse.models.blocks import Downsample, ResBlock, Upsample, conv_nd, output_head
from diffuse.models.embeddings import ClassEmbedding, SinusoidalTimeEmbedding, TimeAndClassConditioned, TimeMLP


@dataclass(frozen=True)
class LevelSpec:
    """One UNet level: channels = base_channels·mult; `depth` transformer blocks in the encoder and in the
    decoder (0 = convolutions only); `heads` split evenly over `dilations`; `kernel` per axis or one int."""

    mult: int = 1
    depth: int = 1
    heads: int = 4
    kernel: int | tuple[int, ...] = 7
    dilations: tuple[int, ...] = (1,)

    @classmethod
    def parse(cls, spec: Mapping, level: int) -> "LevelSpec":
        unknown = set(spec) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"level {level}: unknown keys {sorted(unknown)}; allowed: "
                             f"{', '.join(cls.__dataclass_fields__)}")
        values = dict(spec)
        if "kernel" in values and not isinstance(values["kernel"], int):
            values["kernel"] = tuple(int(k) for k in values["kernel"])
        if "dilations" in values:
            d = values["dilations"]
            values["dilations"] = (int(d),) if isinstance(d, int) else tuple(int(x) for x in d)
        return cls(**values)


# Used when no `levels` are given; conf/model/msnat.yaml holds the same, to be overridden per dim.
DEFAULT_LEVELS = {
    1: [dict(mult=1, depth=1, heads=2, kernel=15, dilations=[1, 4]),
        dict(mult=2, depth=1, heads=4, kernel=15, dilations=[1, 2]),
        dict(mult=2, depth=1, heads=4, kernel=15, dilations=[1])],
    2: [dict(mult=1, depth=1, heads=2, kernel=7, dilations=[1, 2]),
        dict(mult=2, depth=1, heads=4, kernel=7, dilations=[1, 2]),
        dict(mult=2, depth=1, heads=4, kernel=7, dilations=[1])],
    3: [dict(mult=1, depth=0, heads=2, kernel=5, dilations=[1, 2]),   # depth 0: see conf/model/msnat.yaml
        dict(mult=2, depth=1, heads=4, kernel=5, dilations=[1, 2]),
        dict(mult=2, depth=1, heads=4, kernel=5, dilations=[1])],
}


def levels_for_dim(levels: Sequence[Mapping] | Mapping | None, dim: int) -> list[LevelSpec]:
    """`levels` is a list of level specs, or a mapping {dim1: [...], dim2: [...], dim3: [...]} (YAML can't
    branch on dim, so the model config carries one list per dim and the model picks its own)."""
    if levels is None:
        levels = DEFAULT_LEVELS[dim]
    elif isinstance(levels, Mapping):
        key = next((k for k in (f"dim{dim}", dim, str(dim)) if k in levels), None)
        if key is None:
            raise ValueError(f"levels has no entry dim{dim} for dim={dim}; it has {sorted(map(str, levels))}")
        levels = levels[key]
    if not levels:
        raise ValueError("levels must list at least one level")
    return [LevelSpec.parse(spec, i) for i, spec in enumerate(levels)]


class NATBlock(nn.Module):
    """Pre-norm transformer block with neighborhood attention on a [B, C, *spatial] map.

    x += DWConv(x);  x += NA(LN(x)·(1 + s₁) + b₁);  x += MLP(LN(x)·(1 + s₂) + b₂),  (s, b) = Linear(emb)
    """

    def __init__(self, dim: int, channels: int, emb_dim: int, heads: int, kernel: int | Sequence[int],
                 dilations: Sequence[int], mlp_ratio: float = 2.0, backend: str = "auto",
                 tile: int | Sequence[int] | None = None):
        super().__init__()
        self.pos = conv_nd(dim, channels, channels, 3, padding=1, groups=channels)
        self.norm1 = nn.LayerNorm(channels, elementwise_affine=False)
        self.attn = NeighborhoodAttention(channels, heads, kernel, dilations, backend=backend, tile=tile)
        self.norm2 = nn.LayerNorm(channels, elementwise_affine=False)
        hidden = int(mlp_ratio * channels)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.GELU(), nn.Linear(hidden, channels))
        self.modulation = nn.Linear(emb_dim, 4 * channels)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        x = x + self.pos(x)
        h = x.movedim(1, -1)  # [B, *spatial, C]: attention and MLP work channels-last
        mod = self.modulation(F.silu(emb)).view(h.shape[0], *([1] * (h.ndim - 2)), -1)
        shift1, scale1, shift2, scale2 = mod.chunk(4, dim=-1)
        h = h + self.attn(self.norm1(h) * (1 + scale1) + shift1)
        h = h + self.mlp(self.norm2(h) * (1 + scale2) + shift2)
        return h.movedim(-1, 1)


class _Stage(nn.Module):
    """ResBlock(s) then `depth` NATBlocks, all at one resolution."""

    def __init__(self, dim: int, in_ch: int, out_ch: int, emb_dim: int, spec: LevelSpec, num_res_blocks: int,
                 mlp_ratio: float, dropout: float, attention: Mapping):
        super().__init__()
        self.res = nn.ModuleList([ResBlock(dim, in_ch if i == 0 else out_ch, out_ch, emb_dim, dropout)
                                  for i in range(num_res_blocks)])
        self.blocks = nn.ModuleList([NATBlock(dim, out_ch, emb_dim, spec.heads, spec.kernel, spec.dilations,
                                              mlp_ratio, **attention) for _ in range(spec.depth)])

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        for block in (*self.res, *self.blocks):
            h = block(h, emb)
        return h


class MSNATUNet(TimeAndClassConditioned, nn.Module):
    """Multi-scale neighborhood-attention UNet; levels as in `LevelSpec`, each but the last halving sizes.

    levels: list of level specs, or {dim1: [...], dim2: [...], dim3: [...]} (picked by `dim`); None = defaults.
    attention: {backend: auto|torch|flex|natten, tile: null|int|list} for every neighborhood attention.
    num_classes > 0 adds a class embedding (plus a null class for guidance) to the time embedding.
    """

    # precision=auto keeps fp32 on a CPU even where it has AMX: the default 2-D MSNAT's training step was 0.78×
    # as fast under bf16 autocast there (its neighborhood attention's gathers and small matmuls gain nothing)
    bf16_pays_on_cpu = False
    config_rules = {"base_channels": Int(1), "num_res_blocks": Int(1), "mid_depth": Int(0), "mlp_ratio": POSITIVE,
                    "time_emb_dim": Int(2, nullable=True), "dropout": Float(0, 1, open_hi=True),
                    "levels": None, "attention": None}  # None: the constructor checks those (levels_for_dim)

    def __init__(self, dim: int = 2, in_channels: int = 1, out_channels: int | None = None,
                 base_channels: int = 32, levels: Sequence[Mapping] | Mapping | None = None,
                 num_res_blocks: int = 1, mid_depth: int = 1, mlp_ratio: float = 2.0,
                 time_emb_dim: int | None = None, num_classes: int = 0, dropout: float = 0.0,
                 attention: Mapping | None = None):
        super().__init__()
        self.dim = check_dim(dim)
        self.num_classes = num_classes
        self.levels = levels_for_dim(levels, dim)
        attention = dict(attention or {})
        unknown = set(attention) - {"backend", "tile"}
        if unknown:
            raise ValueError(f"attention: unknown keys {sorted(unknown)}; allowed: backend, tile")
        out_channels = out_channels or in_channels
        emb_dim = 4 * base_channels
        time_emb_dim = time_emb_dim or base_channels
        self.time_embed = TimeMLP(SinusoidalTimeEmbedding(time_emb_dim), time_emb_dim, emb_dim)
        self.class_embed = ClassEmbedding(num_classes, emb_dim) if num_classes > 0 else None

        widths = [base_channels * spec.mult for spec in self.levels]
        self.stem = conv_nd(dim, in_channels, base_channels, 3, padding=1)
        self.encoder, self.down = nn.ModuleList(), nn.ModuleList()
        ch = base_channels
        for i, (spec, width) in enumerate(zip(self.levels, widths)):
            self.encoder.append(_Stage(dim, ch, width, emb_dim, spec, num_res_blocks, mlp_ratio, dropout, attention))
            ch = width
            if i < len(self.levels) - 1:
                self.down.append(Downsample(dim, ch))

        bottom = self.levels[-1]
        self.mid1 = ResBlock(dim, ch, ch, emb_dim, dropout)
        self.mid_blocks = nn.ModuleList([NATBlock(dim, ch, emb_dim, bottom.heads, bottom.kernel, bottom.dilations,
                                                  mlp_ratio, **attention) for _ in range(mid_depth)])
        self.mid2 = ResBlock(dim, ch, ch, emb_dim, dropout)

        self.decoder, self.up = nn.ModuleList(), nn.ModuleList()
        for i in reversed(range(len(self.levels))):
            self.decoder.append(_Stage(dim, ch + widths[i], widths[i], emb_dim, self.levels[i], num_res_blocks,
                                       mlp_ratio, dropout, attention))
            ch = widths[i]
            if i > 0:
                self.up.append(Upsample(dim, ch))

        self.head = output_head(dim, ch, out_channels)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        factor = 2 ** (len(self.levels) - 1)
        if x.ndim != self.dim + 2 or any(s % factor for s in x.shape[2:]):
            raise ValueError(f"MSNATUNet(dim={self.dim}, {len(self.levels)} levels) takes [B, C, *spatial] with "
                             f"{self.dim} spatial sizes divisible by {factor}; got {tuple(x.shape)}")
        emb = self.condition(t, y, x)
        h = self.stem(x)
        skips = []
        for i, stage in enumerate(self.encoder):
            h = stage(h, emb)
            skips.append(h)
            if i < len(self.down):
                h = self.down[i](h)
        h = self.mid1(h, emb)
        for block in self.mid_blocks:
            h = block(h, emb)
        h = self.mid2(h, emb)
        for i, stage in enumerate(self.decoder):
            h = stage(torch.cat([h, skips.pop()], dim=1), emb)
            if i < len(self.up):
                h = self.up[i](h)
        return self.head(h)

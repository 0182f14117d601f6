"""Attention layers: full attention on token sequences and N-d feature maps (F.scaled_dot_product_attention),
and neighborhood attention in 1-D, 2-D and 3-D with NATTEN's semantics, linear in the number of positions."""

from __future__ import annotations

import functools
import itertools
import math
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffuse.errors import DiffuseError
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


# ─────────────────────────────────────────────────────────────────────────────────────────────────────────────
# Neighborhood attention (Hassani et al. 2023, "Neighborhood Attention Transformer"; dilation: Hassani & Shi
# 2022, "Dilated Neighborhood Attention Transformer"), in 1-D, 2-D and 3-D with NATTEN's window rules.
#
# Along one axis of length L, with kernel k and dilation d, query i belongs to the dilation group g = i mod d,
# whose positions g, g+d, g+2d, … form a sub-grid of L_g = ⌈(L − g)/d⌉ points; i is point m = i // d of it.
# Its window is the k consecutive sub-grid points starting at clamp(m − ⌊k/2⌋, 0, L_g − k): centred where it
# fits and shifted inward at the borders, so every query sees exactly k keys per axis (needs L ≥ k·d, as
# in NATTEN). In N-d the window is the product of the per-axis windows: k₁·k₂·… keys.
# ─────────────────────────────────────────────────────────────────────────────────────────────────────────────

BACKENDS = ("auto", "torch", "flex", "natten")
# Query tile per axis of the torch backend, by number of spatial dims: the fastest of 2…128 measured on
# this CPU (fwd+bwd, k = 5…15). A tile's keys are its halo, tile + k − 1 per axis.
DEFAULT_TILE = {1: 32, 2: 8, 3: 4}
# The CPU path gathers at most max(N, CHUNK_MIN_KEYS) halo keys at a time (bounds its extra memory).
CHUNK_MIN_KEYS = 8192


def _per_axis(value: int | Sequence[int], n: int, name: str) -> tuple[int, ...]:
    values = (value,) * n if isinstance(value, int) else tuple(int(v) for v in value)
    if len(values) != n or any(v < 1 for v in values):
        raise ValueError(f"{name} must be a positive int or {n} positive ints; got {value!r}")
    return values


def fit_window(size: int, kernel: int, dilation: int) -> tuple[int, int]:
    """(kernel, dilation) that fit an axis of `size` points (NATTEN needs size ≥ kernel·dilation):
    the dilation is lowered first, and a kernel longer than the axis becomes the whole axis."""
    kernel = min(kernel, size)
    return kernel, max(1, min(dilation, size // kernel))


def _check_window(spatial: Sequence[int], kernel: Sequence[int], dilation: Sequence[int]) -> None:
    for axis, (size, k, d) in enumerate(zip(spatial, kernel, dilation)):
        if size < k * d:
            raise ValueError(f"neighborhood attention needs kernel·dilation ≤ size on every axis; axis {axis} "
                             f"has size {size} < {k}·{d} (use fit_window to shrink the window)")


def neighborhood_attention(q: Tensor, k: Tensor, v: Tensor, kernel_size: int | Sequence[int],
                           dilation: int | Sequence[int] = 1, backend: str = "auto",
                           tile: int | Sequence[int] | None = None, scale: float | None = None) -> Tensor:
    """Each query attends to its k^d nearest keys (NATTEN's windows, see above).

    q, k, v: [B, H, *spatial, D] with 1–3 spatial dims → [B, H, *spatial, D].
    backend: torch (tiled SDPA, any device, forward and backward) | flex (torch flex_attention with a
    neighborhood block mask; compiled on CUDA) | natten (NATTEN's kernels) | auto (CUDA: natten if installed,
    else flex; elsewhere torch). flex and natten have no backward on CPU.
    tile: query tile per axis of the torch backend; None = DEFAULT_TILE[dim], or on maps so small that
    tiles would save less than half the scores, one SDPA call over all positions with the [N, N] window mask.
    """
    n = q.ndim - 3
    if n not in (1, 2, 3) or k.shape != q.shape or v.shape[:-1] != q.shape[:-1]:
        raise ValueError(f"neighborhood attention takes q, k, v of shape [B, H, *spatial, D] with 1–3 spatial "
                         f"dims; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    spatial = tuple(q.shape[2:-1])
    kernel = _per_axis(kernel_size, n, "kernel_size")
    dil = _per_axis(dilation, n, "dilation")
    _check_window(spatial, kernel, dil)
    requested, backend = backend, resolve_backend(backend, q.device)
    if backend == "flex" and q.device.type == "cuda" and min(q.shape[-1], v.shape[-1]) < FLEX_MIN_HEAD_DIM:
        if requested != "auto":
            raise DiffuseError(f"attention backend 'flex' needs a head width of at least {FLEX_MIN_HEAD_DIM} "
                               f"(got {q.shape[-1]}); use fewer heads, backend=torch or auto")
        backend = "torch"
    if backend == "torch":
        if tile is None and dense_is_cheaper(spatial, kernel, dil):
            return _na_dense(q, k, v, _dense_mask(spatial, kernel, dil, q.device, q.dtype), scale)
        tiles = _per_axis(tile if tile is not None else DEFAULT_TILE[n], n, "tile")
        return _na_tiled(q, k, v, _tiled_plan(spatial, kernel, dil, tiles, q.device), scale)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if needs_grad and q.device.type == "cpu":
        raise DiffuseError(f"attention backend {backend!r} has no backward pass on CPU; "
                           "use backend=torch (or auto) to train on CPU")
    if backend == "flex":
        return _na_flex(q, k, v, kernel, dil, scale)
    return _na_natten(q, k, v, kernel, dil, scale)


# flex_attention's compiled (CUDA) kernels take heads at least this wide (inductor raises NYI below it);
# `auto` then takes the torch backend for that call.
FLEX_MIN_HEAD_DIM = 16


def natten_available() -> bool:
    try:
        import natten  # noqa: F401
    except ImportError:
        return False
    return True


def flex_available() -> bool:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """auto → natten or flex on CUDA, torch elsewhere; an unavailable explicit choice is a clear error."""
    device = torch.device(device)
    if backend not in BACKENDS:
        raise DiffuseError(f"attention backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    if backend == "auto":
        if device.type == "cuda":
            return "natten" if natten_available() else "flex" if flex_available() else "torch"
        return "torch"
    if backend == "natten" and not natten_available():
        raise DiffuseError("attention backend 'natten' needs the natten package (pip install natten); "
                           "use backend=torch or auto")
    if backend == "flex" and not flex_available():
        raise DiffuseError(f"attention backend 'flex' needs torch.nn.attention.flex_attention "
                           f"(torch ≥ 2.5; this is {torch.__version__}); use backend=torch or auto")
    return backend


# ── torch backend: query tiles, each with the halo of keys its queries' windows cover, one SDPA per tile ──
#
# Queries are cut into tiles of T points per axis (within each dilation group, so a tile's keys are again
# contiguous on the group's sub-grid); a tile's halo is the T + k − 1 sub-grid points that hold all its
# queries' windows. F.scaled_dot_product_attention then runs on all tiles as a batch, with a boolean mask
# that keeps each query's own k^d window inside the halo. Work per query is (T + k − 1)^d instead of N,
# memory per query (T + k − 1)^d / T^d key copies instead of N scores, and the fused SDPA kernel does the
# rest. Interior tiles all share one mask pattern, border tiles a few more, so tiles are grouped by pattern
# (per axis, then their products in N-d) and each group runs with one broadcast [Tq, Tk] mask.

@dataclass
class _AxisTiles:
    """One axis cut into tiles (all dilation groups): n tiles of Tq queries and Tk halo keys each."""

    q_pos: Tensor     # [n, Tq] axis position of each query slot (past the group's end: its last point again)
    q_valid: Tensor   # [n, Tq] False for those repeated slots
    k_pos: Tensor     # [n, Tk] axis position of each halo key (clamped into the group)
    pattern: Tensor   # [n_classes, Tq, Tk] bool: key j in the window of query i
    cls: Tensor       # [n] which pattern each tile uses


def _axis_tiles(size: int, kernel: int, dilation: int, tile: int) -> _AxisTiles:
    d, half = dilation, kernel // 2
    longest = -(-size // d)                                   # points in the longest dilation group
    tq = min(tile, longest)
    tk = min(tq + kernel - 1, longest)
    n_t = -(-longest // tq)
    g = torch.arange(d)[:, None, None]                        # [d, 1, 1]
    group_len = (size - g + d - 1) // d                       # L_g
    m = torch.arange(n_t)[None, :, None] * tq + torch.arange(tq)  # [1, n_t, Tq] query point on the sub-grid
    valid = m < group_len
    m = torch.minimum(m, group_len - 1)
    start = (m - half).clamp(min=0).minimum(group_len - kernel)   # window start on the sub-grid
    halo = torch.minimum(start[..., :1], (group_len - tk).clamp(min=0))  # [d, n_t, 1]
    key = halo + torch.arange(tk)                              # [d, n_t, Tk]
    inside = (key[..., None, :] >= start[..., None]) & (key[..., None, :] < start[..., None] + kernel)  # [d,n_t,Tq,Tk]
    key = torch.minimum(key, group_len - 1)
    pattern, cls = torch.unique(inside.flatten(0, 1).flatten(1).to(torch.uint8), dim=0, return_inverse=True)
    return _AxisTiles(q_pos=(g + d * m).flatten(0, 1), q_valid=valid.expand(d, n_t, tq).flatten(0, 1),
                      k_pos=(g + d * key).flatten(0, 1), pattern=pattern.view(-1, tq, tk).bool(), cls=cls)


@dataclass
class _TileGroup:
    """Tiles that share one mask: SDPA on [B·H, n, Tq, D] queries and [B·H, n, Tk, D] keys."""

    q_index: Tensor   # [n·Tq] flat spatial index of each query slot
    k_index: Tensor   # [n·Tk]
    q_owner: Tensor   # [n·Tq] q_index, but N (a zero row) for repeated slots: where output gradients come from
    mask: Tensor      # [Tq, Tk] bool
    n: int

    def chunks(self, max_keys: int):
        """Runs of tiles with at most max_keys halo keys in all (at least one tile)."""
        tq, tk = self.q_index.numel() // self.n, self.k_index.numel() // self.n
        step = max(1, max_keys // tk)
        for start in range(0, self.n, step):
            stop = min(self.n, start + step)
            yield (stop - start, self.q_index[start * tq:stop * tq], self.k_index[start * tk:stop * tk],
                   self.q_owner[start * tq:stop * tq])


@dataclass
class _TiledPlan:
    groups: list[_TileGroup]
    q_index: Tensor   # all groups' q_index, concatenated: one gather (and one scatter in backward) per tensor
    k_index: Tensor
    inverse: Tensor   # [N] row of each spatial position in the concatenated group outputs
    masks: dict = field(default_factory=dict)  # dtype → additive float masks, built on first use


def _outer(parts: Sequence[Tensor], op) -> Tensor:
    """Combine per-axis [n_a, T_a] tables into [Πn_a, ΠT_a] (axis-major, like a row-major flat index)."""
    n = len(parts)
    out = None
    for a, part in enumerate(parts):
        shape = [1] * (2 * n)
        shape[a], shape[n + a] = part.shape
        view = part.view(shape)
        out = view if out is None else op(out, view)
    lead = out.shape[:n]
    return out.reshape(math.prod(lead), -1)


@functools.lru_cache(maxsize=64)
def _tiled_plan(spatial: tuple[int, ...], kernel: tuple[int, ...], dilation: tuple[int, ...],
                tile: tuple[int, ...], device: torch.device) -> _TiledPlan:
    axes = [_axis_tiles(*args) for args in zip(spatial, kernel, dilation, tile)]
    strides = [math.prod(spatial[a + 1:]) for a in range(len(spatial))]
    groups, rows, positions, offset = [], [], [], 0
    for classes in itertools.product(*[range(len(ax.pattern)) for ax in axes]):
        picks = [torch.nonzero(ax.cls == c).squeeze(1) for ax, c in zip(axes, classes)]
        q_index = _outer([ax.q_pos[p] * s for ax, p, s in zip(axes, picks, strides)], torch.add)
        k_index = _outer([ax.k_pos[p] * s for ax, p, s in zip(axes, picks, strides)], torch.add)
        valid = _outer([ax.q_valid[p] for ax, p in zip(axes, picks)], torch.logical_and)
        mask = _outer([ax.pattern[c] for ax, c in zip(axes, classes)], torch.logical_and)  # [ΠTq, ΠTk]
        n = q_index.shape[0]
        owner = q_index.masked_fill(~valid, math.prod(spatial))
        groups.append(_TileGroup(q_index.flatten().to(device), k_index.flatten().to(device),
                                 owner.flatten().to(device), mask.view(q_index.shape[1], -1).to(device), n))
        slot = torch.arange(offset, offset + q_index.numel()).view_as(q_index)
        rows.append(slot[valid])
        positions.append(q_index[valid])
        offset += q_index.numel()
    inverse = torch.empty(math.prod(spatial), dtype=torch.long)
    inverse[torch.cat(positions)] = torch.cat(rows)  # each position is a valid slot exactly once
    return _TiledPlan(groups, torch.cat([g.q_index for g in groups]), torch.cat([g.k_index for g in groups]),
                      inverse.to(device))


def dense_is_cheaper(spatial: Sequence[int], kernel: Sequence[int], dilation: Sequence[int],
                     max_positions: int = 4096) -> bool:
    """True on small maps, where the default tiles' halos would cover at least half of all N² scores:
    there one fused SDPA call with an [N, N] mask beats many small tiled calls."""
    n = math.prod(spatial)
    if n > max_positions:
        return False
    tiled = 1  # scores the tiled path computes: Π over axes of tiles·Tq·Tk
    tiles = _per_axis(DEFAULT_TILE[len(spatial)], len(spatial), "tile")
    for size, k, d, t in zip(spatial, kernel, dilation, tiles):
        longest = -(-size // d)
        tq = min(t, longest)
        tiled *= d * -(-longest // tq) * tq * min(tq + k - 1, longest)
    return 2 * tiled >= n * n


@functools.lru_cache(maxsize=32)
def _dense_mask(spatial: tuple[int, ...], kernel: tuple[int, ...], dilation: tuple[int, ...], device: torch.device,
                dtype: torch.dtype) -> Tensor:
    """[1, 1, N, N] additive window mask (0 inside, −inf outside), from one [L, L] bool mask per axis."""
    parts = []
    for size, k, d in zip(spatial, kernel, dilation):
        i = torch.arange(size)
        g = i % d
        group_len = (size - g + d - 1) // d
        start = (i // d - k // 2).clamp(min=0).minimum(group_len - k)  # window start on the group's sub-grid
        j = i[None, :]
        parts.append((j % d == g[:, None]) & (j // d >= start[:, None]) & (j // d < start[:, None] + k))
    inside = _outer(parts, torch.logical_and).view(math.prod(spatial), -1).to(device)
    return torch.zeros(inside.shape, dtype=dtype, device=device).masked_fill(~inside, -math.inf)[None, None]


def _na_dense(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float | None) -> Tensor:
    b, h, *spatial, _ = q.shape
    out = F.scaled_dot_product_attention(*(t.reshape(b, h, -1, t.shape[-1]) for t in (q, k, v)),
                                         attn_mask=mask, scale=scale)
    return out.view(b, h, *spatial, out.shape[-1])


def _na_tiled(q: Tensor, k: Tensor, v: Tensor, plan: _TiledPlan, scale: float | None) -> Tensor:
    b, h, *spatial, dh = q.shape
    masks = plan.masks.get(q.dtype)
    if masks is None:  # additive masks: 0 inside the window, −inf outside, [1, 1, Tq, Tk] for SDPA
        masks = [torch.zeros(g.mask.shape, dtype=q.dtype, device=q.device).masked_fill(~g.mask, -math.inf)[None, None]
                 for g in plan.groups]
        plan.masks[q.dtype] = masks
    q, k, v = (t.reshape(b * h, -1, t.shape[-1]) for t in (q, k, v))
    if (q.device.type == "cpu" and _FLASH_CPU is not None and _FLASH_CPU_BACKWARD is not None
            and v.shape[-1] == dh):  # the flash kernel wants one head width for q, k and v
        out = _TiledFlashCPU.apply(q, k, v, plan, masks, scale)
    else:
        out = _tiled_sdpa(q, k, v, plan, masks, scale)
    return out.view(b, h, *spatial, out.shape[-1])


def _tiled_sdpa(q: Tensor, k: Tensor, v: Tensor, plan: _TiledPlan, masks: list[Tensor], scale) -> Tensor:
    """q, k, v: [B·H, N, D]. All tiles gathered at once, SDPA per mask group, autograd does the rest."""
    bh = q.shape[0]
    q_tiles, k_tiles, v_tiles = (t.contiguous().index_select(1, index)
                                 for t, index in ((q, plan.q_index), (k, plan.k_index), (v, plan.k_index)))
    q_sizes = [g.q_index.numel() for g in plan.groups]
    k_sizes = [g.k_index.numel() for g in plan.groups]
    outs = []
    for group, mask, qt, kt, vt in zip(plan.groups, masks, q_tiles.split(q_sizes, 1), k_tiles.split(k_sizes, 1),
                                       v_tiles.split(k_sizes, 1)):
        qt, kt, vt = (t.view(bh, group.n, -1, t.shape[-1]) for t in (qt, kt, vt))
        outs.append(F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale).flatten(1, 2))
    return torch.cat(outs, 1).index_select(1, plan.inverse)


def _aten_op(name: str):
    try:
        return getattr(torch.ops.aten, name)
    except (AttributeError, RuntimeError):
        return None


# torch's fused CPU flash-attention kernels (what F.scaled_dot_product_attention runs on CPU).
_FLASH_CPU = _aten_op("_scaled_dot_product_flash_attention_for_cpu")
_FLASH_CPU_BACKWARD = _aten_op("_scaled_dot_product_flash_attention_for_cpu_backward")


def _gather_tiles(rows: Tensor, index: Tensor, n: int) -> Tensor:
    """rows [N, B·H, D], index [n·T] → tiles as a [B·H, n, T, D] view of one [n, T, B·H, D] gather."""
    return rows.index_select(0, index).view(n, -1, *rows.shape[1:]).permute(2, 0, 1, 3)


class _TiledFlashCPU(torch.autograd.Function):
    """The tiled attention on CPU with memory linear in N at a small constant: tiles are gathered a chunk
    at a time (≤ max(N, CHUNK_MIN_KEYS) halo keys) and run through the flash kernels directly; backward keeps
    only each tile's output and log-sum-exp (as flash attention itself does) and gathers the halos again,
    instead of autograd holding every gathered halo, (T + k − 1)^d / T^d copies of k and v."""

    @staticmethod
    def forward(ctx, q, k, v, plan: _TiledPlan, masks: list[Tensor], scale: float | None):
        max_keys = max(q.shape[1], CHUNK_MIN_KEYS)
        # Position-major copies [N, B·H, D]: gathering whole rows along dim 0 is a fast memcpy (along dim 1,
        # or from a strided view, index_select copies element runs one by one). The flash kernel takes the
        # gathered [n·T, B·H, D] tiles as strided [B·H, n, T, D] views, no further copy.
        qp, kp, vp = (t.transpose(0, 1).contiguous() for t in (q, k, v))
        outs, lses = [], []
        for group, mask in zip(plan.groups, masks):
            for n, q_index, k_index, _ in group.chunks(max_keys):
                qt, kt, vt = (_gather_tiles(t, i, n) for t, i in ((qp, q_index), (kp, k_index), (vp, k_index)))
                out, lse = _FLASH_CPU(qt, kt, vt, attn_mask=mask, scale=scale)  # [B·H, n, T, D], [B·H, n, T]
                outs.append(out)
                lses.append(lse)
        ctx.save_for_backward(qp, kp, vp, *outs, *lses)
        ctx.plan, ctx.masks, ctx.scale, ctx.max_keys = plan, masks, scale, max_keys
        return torch.cat([o.flatten(1, 2) for o in outs], 1).index_select(1, plan.inverse)

    @staticmethod
    def backward(ctx, grad):
        qp, kp, vp, *saved = ctx.saved_tensors
        outs, lses = saved[:len(saved) // 2], saved[len(saved) // 2:]
        n_pos, bh = qp.shape[:2]
        grad = torch.cat([grad, grad.new_zeros(bh, 1, grad.shape[-1])], 1)  # row N: repeated slots get 0
        dq = qp.new_zeros(bh, n_pos, qp.shape[-1])
        dk = kp.new_zeros(bh, n_pos, kp.shape[-1])
        dv = vp.new_zeros(bh, n_pos, vp.shape[-1])
        chunks = ((mask, c) for group, mask in zip(ctx.plan.groups, ctx.masks) for c in group.chunks(ctx.max_keys))
        for (mask, (n, q_index, k_index, q_owner)), out, lse in zip(chunks, outs, lses):
            qt, kt, vt = (_gather_tiles(t, i, n) for t, i in ((qp, q_index), (kp, k_index), (vp, k_index)))
            gt = grad.index_select(1, q_owner).view(out.shape)
            gq, gk, gv = _FLASH_CPU_BACKWARD(gt, qt, kt, vt, out, lse, 0.0, False, attn_mask=mask, scale=ctx.scale)
            dq.index_add_(1, q_index, gq.flatten(1, 2))
            dk.index_add_(1, k_index, gk.flatten(1, 2))
            dv.index_add_(1, k_index, gv.flatten(1, 2))
        return dq, dk, dv, None, None, None


# ── flex backend: torch's flex_attention with a block mask from the same window rule ──────────────────────
# Tokens are reordered tile by tile (128 per tile, e.g. 8×16 in 2-D) so a 128-query block of flex's mask
# touches few key blocks; sizes are padded to whole tiles (padded keys are masked, padded queries dropped).

_FLEX_TILE = {1: (128,), 2: (8, 16), 3: (4, 4, 8)}


@dataclass
class _FlexPlan:
    spatial: tuple[int, ...]
    tile: tuple[int, ...]
    padded: tuple[int, ...]
    block_mask: object


def _unravel(index: Tensor, sizes: Sequence[int]) -> list[Tensor]:
    coords = []
    for size in reversed(sizes):
        coords.append(index % size)
        index = index // size
    return coords[::-1]


@functools.lru_cache(maxsize=32)
def _flex_plan(spatial: tuple[int, ...], kernel: tuple[int, ...], dilation: tuple[int, ...],
               device: torch.device) -> _FlexPlan:
    from torch.nn.attention.flex_attention import create_block_mask

    n = len(spatial)
    tile = tuple(min(t, s) for t, s in zip(_FLEX_TILE[n], spatial))
    padded = tuple(-(-s // t) * t for s, t in zip(spatial, tile))
    counts = [p // t for p, t in zip(padded, tile)]
    per_tile = math.prod(tile)

    def position(index):  # index in tile order → position on each axis
        outer, inner = _unravel(index // per_tile, counts), _unravel(index % per_tile, tile)
        return [o * t + i for o, t, i in zip(outer, tile, inner)]

    def mask_mod(b, h, q_index, kv_index):
        inside = None
        for qa, ka, size, kk, d in zip(position(q_index), position(kv_index), spatial, kernel, dilation):
            qa = torch.clamp(qa, max=size - 1)  # a padded query takes the last one's window (it is dropped)
            g = qa % d
            group_len = (size - g + d - 1) // d
            start = torch.minimum(torch.clamp(qa // d - kk // 2, min=0), group_len - kk)
            km = ka // d
            ok = (ka < size) & (ka % d == g) & (km >= start) & (km < start + kk)
            inside = ok if inside is None else inside & ok
        return inside

    length = math.prod(padded)
    block_mask = create_block_mask(mask_mod, None, None, length, length, device=device)
    return _FlexPlan(spatial, tile, padded, block_mask)


def _to_tile_order(x: Tensor, plan: _FlexPlan) -> Tensor:
    """[B, H, *spatial, D] → [B, H, N_padded, D] in tile order."""
    b, h, *spatial, dh = x.shape
    n = len(spatial)
    pad = [0, 0]
    for size, full in zip(reversed(spatial), reversed(plan.padded)):
        pad += [0, full - size]
    x = F.pad(x, pad)
    split = [v for p, t in zip(plan.padded, plan.tile) for v in (p // t, t)]
    x = x.reshape(b, h, *split, dh)
    order = [0, 1, *[2 + 2 * a for a in range(n)], *[3 + 2 * a for a in range(n)], 2 + 2 * n]
    return x.permute(order).reshape(b, h, -1, dh)


def _from_tile_order(x: Tensor, plan: _FlexPlan) -> Tensor:
    b, h, _, dh = x.shape
    n = len(plan.spatial)
    counts = [p // t for p, t in zip(plan.padded, plan.tile)]
    x = x.reshape(b, h, *counts, *plan.tile, dh)
    order = [0, 1, *[v for a in range(n) for v in (2 + a, 2 + n + a)], 2 + 2 * n]
    x = x.permute(order).reshape(b, h, *plan.padded, dh)
    return x[(slice(None), slice(None), *[slice(0, s) for s in plan.spatial])]


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention, dynamic=False)


def _na_flex(q: Tensor, k: Tensor, v: Tensor, kernel, dilation, scale) -> Tensor:
    from torch.nn.attention.flex_attention import flex_attention

    plan = _flex_plan(tuple(q.shape[2:-1]), kernel, dilation, q.device)
    # Compiled on CUDA (fused kernel, backward included); eager elsewhere, which materialises the scores.
    attend = _compiled_flex() if q.device.type == "cuda" else flex_attention
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        out = attend(*(_to_tile_order(t, plan) for t in (q, k, v)), block_mask=plan.block_mask, scale=scale)
    return _from_tile_order(out, plan)


# ── natten backend: NATTEN's own kernels (heads-last layout [B, *spatial, H, D]) ──────────────────────────

def _na_natten(q: Tensor, k: Tensor, v: Tensor, kernel, dilation, scale) -> Tensor:
    import natten

    attend = (natten.na1d, natten.na2d, natten.na3d)[q.ndim - 4]
    try:
        with warnings.catch_warnings():  # natten 0.21 calls flex_attention with a deprecated argument
            warnings.filterwarnings("ignore", message=".*return_lse is deprecated.*")
            out = attend(q.movedim(1, -2), k.movedim(1, -2), v.movedim(1, -2), kernel_size=kernel,
                         dilation=dilation, scale=scale)
    except NotImplementedError as e:
        raise DiffuseError(f"natten cannot run this case (shape {tuple(q.shape)}, kernel {kernel}, dilation "
                           f"{dilation}, {q.device.type}): {str(e).splitlines()[0]}") from None
    return out.movedim(-2, 1)


class NeighborhoodAttention(nn.Module):
    """Multi-head neighborhood self-attention on a channels-last map: x [B, *spatial, C] → [B, *spatial, C].

    Heads are split into len(dilations) equal groups and group i attends with dilation dilations[i], so one
    layer sees near and far context at linear cost (DiNAT alternates dilations across layers instead).
    A window that does not fit an axis is shrunk there by `fit_window` (at coarse UNet levels a kernel as
    large as the map is plain full attention along that axis).
    """

    def __init__(self, channels: int, heads: int = 4, kernel_size: int | Sequence[int] = 7,
                 dilations: Sequence[int] = (1,), backend: str = "auto", qkv_bias: bool = True,
                 tile: int | Sequence[int] | None = None):
        super().__init__()
        dilations = tuple(int(d) for d in dilations)
        if channels % heads:
            raise ValueError(f"attention width {channels} is not divisible by heads={heads}")
        if not dilations or heads % len(dilations) or min(dilations) < 1:
            raise ValueError(f"heads={heads} must split evenly into one group per dilation; got {dilations}")
        if backend != "auto":
            resolve_backend(backend, "cpu")  # unknown or uninstalled backends fail now, not mid-training
        elif backend not in BACKENDS:
            raise DiffuseError(f"attention backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
        self.heads, self.kernel_size, self.dilations = heads, kernel_size, dilations
        self.backend, self.tile = backend, tile
        self.qkv = nn.Linear(channels, 3 * channels, bias=qkv_bias)
        self.proj = nn.Linear(channels, channels)

    def windows(self, spatial: Sequence[int]) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        """(kernel, dilation) per head group, fitted to this map."""
        kernel = _per_axis(self.kernel_size, len(spatial), "kernel_size")
        out = []
        for d in self.dilations:
            fitted = [fit_window(s, k, d) for s, k in zip(spatial, kernel)]
            out.append((tuple(k for k, _ in fitted), tuple(dd for _, dd in fitted)))
        return out

    def forward(self, x: Tensor) -> Tensor:
        b, *spatial, c = x.shape
        qkv = self.qkv(x).view(b, *spatial, 3, self.heads, c // self.heads).movedim(-2, 1)  # [B,H,*sp,3,Dh]
        q, k, v = qkv.unbind(-2)
        windows = self.windows(spatial)
        if len(set(windows)) == 1:  # all groups got the same window (e.g. on a small map): one call
            out = neighborhood_attention(q, k, v, *windows[0], backend=self.backend, tile=self.tile)
        else:
            per = self.heads // len(windows)
            out = torch.cat([neighborhood_attention(q[:, i * per:(i + 1) * per], k[:, i * per:(i + 1) * per],
                                                    v[:, i * per:(i + 1) * per], kern, dil,
                                                    backend=self.backend, tile=self.tile)
                             for i, (kern, dil) in enumerate(windows)], dim=1)
        return self.proj(out.movedim(1, -2).reshape(b, *spatial, c))

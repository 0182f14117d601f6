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
# Query tile per axis of the torch backend, by number of spatial dims: the fastest measured on this CPU
# (fwd+bwd, k = 5…15; in 3-D 2×4×4 against 4×4×4: 0.82–0.92× at kernel 5 on 16³ and 32³, even at 7 on 32³).
# A tile's keys are its halo, tile + k − 1 per axis; `default_tile` fits these to small maps.
DEFAULT_TILE = {1: (32,), 2: (8, 8), 3: (2, 4, 4)}
# The CPU path gathers at most max(N, CHUNK_MIN_KEYS) halo keys at a time (bounds its extra memory).
CHUNK_MIN_KEYS = 8192


def _chunk_keys(n_positions: int) -> int:
    return max(n_positions, CHUNK_MIN_KEYS)


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
    tile: query tile per axis of the torch backend; None = default_tile(...), or on maps so small that
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
        tiles = _per_axis(tile, n, "tile") if tile is not None else default_tile(spatial, kernel, dil)
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


# ── torch backend: query tiles whose key halos slide along the first axis, fused SDPA on strided views ──────
#
# The axes after the first (none in 1-D) are cut into tiles of T_a queries, each with the halo of T_a + k − 1
# keys its queries' windows cover (within each dilation group, so a halo is contiguous on the group's
# sub-grid). One such tile on those axes, across the whole first axis, is a column: its keys are gathered
# once into a buffer, plane by plane along the first axis (R = Π_a (T_a + k − 1) rows per plane). The first
# axis is cut into tiles of T_0 planes whose halos of T_0 + k − 1 planes start T_0 planes apart inside the
# axis and stay put at its borders (where windows stop sliding); each run of tiles with a constant step is
# therefore one strided view of the buffer, overlapping halos included, and the fused SDPA flash kernel takes
# such views as they are. A boolean mask keeps each query's own window inside its tile's halo; tiles that
# share a mask pattern on every axis (interior tiles all share one) run as one batch. For 2×4×4 tiles (the
# 3-D default) and k = 7, keys are copied R / (T_1·T_2) = 100/16 ≈ 6 times instead of once per tile halo
# (800/32 = 25 times), and in 1-D not at all beyond one reordering pass.

@dataclass
class _AxisTiles:
    """One axis cut into tiles (all dilation groups): n tiles of Tq queries and Tk halo keys each."""

    q_pos: Tensor     # [n, Tq] axis position of each query slot (past the group's end: its last point again)
    q_valid: Tensor   # [n, Tq] False for those repeated slots
    k_pos: Tensor     # [n, Tk] axis position of each halo key (clamped into the group)
    k_start: Tensor   # [n] first halo key on its group's sub-grid
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
                      k_pos=(g + d * key).flatten(0, 1), k_start=halo.flatten(),
                      pattern=pattern.view(-1, tq, tk).bool(), cls=cls)


@dataclass
class _Run:
    """First-axis tiles whose halos start a constant number of key planes apart: one strided view."""

    q_plane: int   # first query plane in the column's query buffer (tiles are Tq planes apart there)
    k_plane: int   # first key plane of the first tile's halo in the column's key buffer
    k_step: int    # key planes from one tile's halo to the next: Tq inside the axis, 0 at its borders
    n: int         # tiles
    cls: int       # their mask pattern along the first axis


@dataclass
class _ColumnGroup:
    """Columns whose tiles share one mask pattern on every axis after the first."""

    q_index: Tensor      # [n_cols, Pq·Rq] flat spatial index of each query slot, plane by plane
    q_owner: Tensor      # q_index, but N (a spare row) for repeated slots: where outputs go, gradients come from
    k_index: Tensor      # [n_cols, Pk·Rk] flat spatial index of each key of the column's buffer
    masks: list[Tensor]  # per first-axis pattern: [Tq·Rq, Tk·Rk] bool, query slot × halo key

    def chunks(self, max_keys: int):
        """Column ranges whose key buffers hold at most max_keys keys in all (at least one column)."""
        n_cols, keys = self.k_index.shape
        step = max(1, max_keys // keys)
        return [slice(start, min(n_cols, start + step)) for start in range(0, n_cols, step)]


@dataclass
class _TiledPlan:
    runs: list[_Run]
    groups: list[_ColumnGroup]
    tq: int          # query planes per first-axis tile
    tk: int          # key planes per halo
    q_rows: int      # Rq: query slots per plane of a column
    k_rows: int      # Rk: keys per plane of a column's buffer
    inverse: Tensor | None = None  # [N] row of each position among the generic path's concatenated outputs
    masks: dict = field(default_factory=dict)  # dtype → per group, per pattern: additive [1, 1, Tq, Tk] masks


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


def _runs(first: _AxisTiles, key_plane: Tensor, tq: int) -> list[_Run]:
    """Cut the first axis' tiles, in order, into maximal runs of one pattern and a constant halo step."""
    runs: list[_Run] = []
    for i, (plane, cls) in enumerate(zip(key_plane.tolist(), first.cls.tolist())):
        last = runs[-1] if runs else None
        if last is not None and last.cls == cls:
            step = plane - (last.k_plane + (last.n - 1) * last.k_step)
            if step >= 0 and (last.n == 1 or step == last.k_step):
                last.k_step, last.n = step, last.n + 1
                continue
        runs.append(_Run(q_plane=i * tq, k_plane=plane, k_step=0, n=1, cls=cls))
    return runs


@functools.lru_cache(maxsize=64)
def _tiled_plan(spatial: tuple[int, ...], kernel: tuple[int, ...], dilation: tuple[int, ...],
                tile: tuple[int, ...], device: torch.device) -> _TiledPlan:
    first, *rest = [_axis_tiles(*args) for args in zip(spatial, kernel, dilation, tile)]
    n_pos, d, plane_stride = math.prod(spatial), dilation[0], math.prod(spatial[1:])
    tq, tk = first.q_pos.shape[1], first.k_pos.shape[1]
    # Key buffer planes: every dilation group gets `longest` planes (its last point repeated past its end),
    # so each tile's halo lies inside its group's planes.
    longest = -(-spatial[0] // d)
    g = torch.arange(d)[:, None]
    key_planes = (g + d * torch.minimum(torch.arange(longest), (spatial[0] - g + d - 1) // d - 1)).flatten()
    tile_group = torch.arange(len(first.cls)) // (len(first.cls) // d)
    runs = _runs(first, tile_group * longest + first.k_start, tq)

    strides = [math.prod(spatial[a + 1:]) for a in range(1, len(spatial))]
    groups = []
    for classes in itertools.product(*[range(len(ax.pattern)) for ax in rest]):
        if rest:  # the columns of this pattern combination: [n_cols, Rq] / [n_cols, Rk] tables
            picks = [torch.nonzero(ax.cls == c).squeeze(1) for ax, c in zip(rest, classes)]
            col_q = _outer([ax.q_pos[p] * s for ax, p, s in zip(rest, picks, strides)], torch.add)
            col_k = _outer([ax.k_pos[p] * s for ax, p, s in zip(rest, picks, strides)], torch.add)
            col_valid = _outer([ax.q_valid[p] for ax, p in zip(rest, picks)], torch.logical_and)
            col_mask = _outer([ax.pattern[c] for ax, c in zip(rest, classes)], torch.logical_and)  # [ΠTq, ΠTk]
            col_mask = col_mask.view(col_q.shape[1], col_k.shape[1])
        else:  # 1-D: one column of one row per plane
            col_q = col_k = torch.zeros(1, 1, dtype=torch.long)
            col_valid, col_mask = torch.ones(1, 1, dtype=torch.bool), torch.ones(1, 1, dtype=torch.bool)
        q_index = first.q_pos.flatten()[None, :, None] * plane_stride + col_q[:, None, :]  # [n_cols, Pq, Rq]
        valid = first.q_valid.flatten()[None, :, None] & col_valid[:, None, :]
        k_index = key_planes[None, :, None] * plane_stride + col_k[:, None, :]            # [n_cols, Pk, Rk]
        masks = [(p[:, None, :, None] & col_mask[None, :, None, :]).reshape(tq * col_mask.shape[0], -1)
                 for p in first.pattern]
        groups.append(_ColumnGroup(q_index.flatten(1).to(device), q_index.masked_fill(~valid, n_pos).flatten(1)
                                   .to(device), k_index.flatten(1).to(device), [m.to(device) for m in masks]))
    q_rows, k_rows = (math.prod(ax.q_pos.shape[1] for ax in rest), math.prod(ax.k_pos.shape[1] for ax in rest))
    plan = _TiledPlan(runs, groups, tq, tk, q_rows, k_rows)
    # the generic path concatenates every group's runs in order: each position's row is its one valid slot
    # there (a gather, deterministic on every device, where index_copy into a spare row is not on CUDA)
    owners = torch.cat([_run_index(g.q_owner, plan, run, keys=False) for g in groups for run in runs])
    valid = owners < n_pos
    plan.inverse = torch.empty(n_pos, dtype=torch.long, device=device)
    plan.inverse[owners[valid]] = torch.arange(owners.numel(), device=device)[valid]
    return plan


def _run_view(buffer: Tensor, plane: int, step: int, n: int, planes: int, rows: int) -> Tensor:
    """[B, P·rows, D] contiguous → [B, n, planes·rows, D]: n windows of `planes` planes, `step` planes apart,
    the first at `plane`. Windows may overlap (step < planes) or coincide (step 0): a view, no copy."""
    b, length, width = buffer.shape
    return buffer.as_strided((b, n, planes * rows, width), (length * width, step * rows * width, width, 1),
                             buffer.storage_offset() + plane * rows * width)


def _run_index(index: Tensor, plan: _TiledPlan, run: _Run, keys: bool) -> Tensor:
    """Flat spatial index of each query slot (keys=False) or halo key of a run's tiles, column by column."""
    if keys:
        view = _run_view(index.unsqueeze(-1), run.k_plane, run.k_step, run.n, plan.tk, plan.k_rows)
    else:
        view = _run_view(index.unsqueeze(-1), run.q_plane, plan.tq, run.n, plan.tq, plan.q_rows)
    return view.reshape(-1)


def default_tile(spatial: Sequence[int], kernel: Sequence[int], dilation: Sequence[int]) -> tuple[int, ...]:
    """DEFAULT_TILE, except that on an axis after the first, a tile whose halo would span its whole dilation
    group takes the whole group: every query sees the same keys, in fewer and larger tiles (16³, kernel 5,
    dilation 2: 2×8×8 instead of 2×4×4, 0.78× the time). The first axis keeps its small tile, since there a
    halo only T_0 + k − 1 planes deep costs less than the whole group."""
    tiles = list(DEFAULT_TILE[len(spatial)])
    for a in range(1, len(spatial)):
        longest = -(-spatial[a] // dilation[a])
        if tiles[a] + kernel[a] - 1 >= longest:
            tiles[a] = longest
    return tuple(tiles)


def dense_is_cheaper(spatial: Sequence[int], kernel: Sequence[int], dilation: Sequence[int],
                     max_positions: int = 4096) -> bool:
    """True on small maps, where the default tiles' halos would cover at least half of all N² scores:
    there one fused SDPA call with an [N, N] mask beats many small tiled calls."""
    n = math.prod(spatial)
    if n > max_positions:
        return False
    tiled = 1  # scores the tiled path computes: Π over axes of tiles·Tq·Tk
    tiles = default_tile(spatial, kernel, dilation)
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
        masks = [[torch.zeros(m.shape, dtype=q.dtype, device=q.device).masked_fill(~m, -math.inf)[None, None]
                  for m in group.masks] for group in plan.groups]
        plan.masks[q.dtype] = masks
    q, k, v = (t.reshape(b * h, -1, t.shape[-1]) for t in (q, k, v))
    if (q.device.type == "cpu" and _FLASH_CPU is not None and _FLASH_CPU_BACKWARD is not None
            and v.shape[-1] == dh):  # the flash kernel wants one head width for q, k and v
        out = _TiledFlashCPU.apply(q, k, v, plan, masks, scale)
    else:
        out = _tiled_sdpa(q, k, v, plan, masks, scale)
    return out.view(b, h, *spatial, out.shape[-1])


def _tiled_sdpa(q: Tensor, k: Tensor, v: Tensor, plan: _TiledPlan, masks: list, scale) -> Tensor:
    """q, k, v: [B·H, N, D]. Every run's tiles gathered explicitly, SDPA per run, autograd does the rest."""
    bh = q.shape[0]
    outs = []
    for group, group_masks in zip(plan.groups, masks):
        for run in plan.runs:
            qt = q.index_select(1, _run_index(group.q_index, plan, run, keys=False))
            kt, vt = (t.index_select(1, _run_index(group.k_index, plan, run, keys=True)) for t in (k, v))
            qt, kt, vt = (t.view(bh, -1, n_rows, t.shape[-1]) for t, n_rows in
                          ((qt, plan.tq * plan.q_rows), (kt, plan.tk * plan.k_rows), (vt, plan.tk * plan.k_rows)))
            outs.append(F.scaled_dot_product_attention(qt, kt, vt, attn_mask=group_masks[run.cls], scale=scale)
                        .flatten(1, 2))
    return torch.cat(outs, 1).index_select(1, plan.inverse)


def _aten_op(name: str):
    try:
        return getattr(torch.ops.aten, name)
    except (AttributeError, RuntimeError):
        return None


# torch's fused CPU flash-attention kernels (what F.scaled_dot_product_attention runs on CPU).
_FLASH_CPU = _aten_op("_scaled_dot_product_flash_attention_for_cpu")
_FLASH_CPU_BACKWARD = _aten_op("_scaled_dot_product_flash_attention_for_cpu_backward")


class _Scratch:
    """Scratch tensors reused from chunk to chunk: filling memory the process already touched costs half of
    filling fresh pages (measured: a 33 MB gather, 6 ms vs 12 ms; 31 ms where every large block is mmapped)."""

    def __init__(self, like: Tensor):
        self.like, self.flat = like, {}

    def get(self, name: str, shape: Sequence[int]) -> Tensor:
        size = math.prod(shape)
        flat = self.flat.get(name)
        if flat is None or flat.numel() < size:
            flat = self.flat[name] = self.like.new_empty(size)
        return flat[:size].view(shape)

    def gather(self, name: str, x: Tensor, index: Tensor) -> Tensor:
        """x [B·H, N, D], index [c, P·R] → column buffers [B·H·c, P·R, D] (batch-major)."""
        out = self.get(name, (x.shape[0], index.numel(), x.shape[-1]))
        return torch.index_select(x, 1, index.flatten(), out=out).view(-1, index.shape[1], x.shape[-1])


def _column_chunks(q: Tensor, k: Tensor, v: Tensor, plan: _TiledPlan, masks: list, max_keys: int, scratch: _Scratch):
    """Each chunk of columns in order, its q, k, v buffers gathered into `scratch`:
    (group, the group's masks, the chunk's column slice, qb, kb, vb)."""
    for group, group_masks in zip(plan.groups, masks):
        for cols in group.chunks(max_keys):
            qb = scratch.gather("q", q, group.q_index[cols])
            kb, vb = (scratch.gather(name, t, group.k_index[cols]) for name, t in (("k", k), ("v", v)))
            yield group, group_masks, cols, qb, kb, vb


def _run_views(plan: _TiledPlan, run: _Run, qb: Tensor, kb: Tensor, vb: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """A run's tiles as strided views of a chunk's buffers: [B', n, Tq, D] queries, [B', n, Tk, D] keys/values."""
    qt = _run_view(qb, run.q_plane, plan.tq, run.n, plan.tq, plan.q_rows)
    kt, vt = (_run_view(t, run.k_plane, run.k_step, run.n, plan.tk, plan.k_rows) for t in (kb, vb))
    return qt, kt, vt


# Below this many elements per add, the per-op cost outweighs the data moved: one copy and index_add_ instead.
_MIN_ADD_ELEMENTS = 65536


def _add_halos(buffer_grad: Tensor, halo_grad: Tensor, plan: _TiledPlan, run: _Run) -> None:
    """Add a run's per-tile key gradients [B', n, Tk·Rk, D] back onto its column buffer [B', Pk·Rk, D], where
    halos overlap (step < Tk) or coincide (step 0). Large runs go in min(n, Tk) strided adds that read the
    kernel's output where it lies; small ones in one index_add_ over a contiguous copy."""
    planes = buffer_grad.view(buffer_grad.shape[0], -1, plan.k_rows, buffer_grad.shape[-1])  # [B', Pk, Rk, D]
    halo = halo_grad.unflatten(2, (plan.tk, plan.k_rows))                                     # [B', n, Tk, Rk, D]
    n, tk, first, step = run.n, plan.tk, run.k_plane, run.k_step
    if step == 0:  # every tile's halo is the same planes
        planes[:, first:first + tk] += halo[:, 0] if n == 1 else halo.sum(1)
    elif min(n, tk) * _MIN_ADD_ELEMENTS <= halo.numel():
        if n <= tk:  # tile by tile: Tk consecutive planes each
            for i in range(n):
                planes[:, first + i * step:first + i * step + tk] += halo[:, i]
        else:  # plane by plane: the j-th plane of every tile, `step` planes apart
            for j in range(tk):
                planes[:, first + j:first + j + step * (n - 1) + 1:step] += halo[:, :, j]
    else:
        index = ((first + step * torch.arange(n, device=halo.device))[:, None]
                 + torch.arange(tk, device=halo.device)).flatten()
        planes.flatten(2).index_add_(1, index, halo.reshape(halo.shape[0], n * tk, -1))


class _TiledFlashCPU(torch.autograd.Function):
    """The tiled attention on CPU, memory linear in N at a small constant: column buffers are gathered a
    chunk at a time (≤ max(N, CHUNK_MIN_KEYS) keys) and every run goes through the flash kernels as strided
    views of them; backward keeps only each tile's output and log-sum-exp (as flash attention itself does)
    and gathers the buffers again, instead of autograd holding every gathered key."""

    @staticmethod
    def forward(ctx, q, k, v, plan: _TiledPlan, masks: list, scale: float | None):
        bh, n_pos, width = q.shape
        max_keys = _chunk_keys(n_pos)
        out = q.new_empty(bh, n_pos + 1, width)  # row N takes the repeated slots' outputs, then is dropped
        outs, lses = [], []
        for group, group_masks, cols, qb, kb, vb in _column_chunks(q, k, v, plan, masks, max_keys, _Scratch(q)):
            for run in plan.runs:
                o, lse = _FLASH_CPU(*_run_views(plan, run, qb, kb, vb), attn_mask=group_masks[run.cls], scale=scale)
                out.index_copy_(1, _run_index(group.q_owner[cols], plan, run, keys=False), o.view(bh, -1, width))
                outs.append(o)
                lses.append(lse)
        ctx.save_for_backward(q, k, v, *outs, *lses)
        ctx.plan, ctx.masks, ctx.scale, ctx.max_keys = plan, masks, scale, max_keys
        return out[:, :n_pos]

    @staticmethod
    def backward(ctx, grad):
        q, k, v, *saved = ctx.saved_tensors
        outs, lses = iter(saved[:len(saved) // 2]), iter(saved[len(saved) // 2:])
        plan = ctx.plan
        bh, n_pos, width = q.shape
        grad = torch.cat([grad, grad.new_zeros(bh, 1, width)], 1)  # row N: repeated slots get 0
        dq = q.new_zeros(bh, n_pos + 1, width)
        dk, dv = k.new_zeros(k.shape), v.new_zeros(v.shape)
        scratch = _Scratch(q)
        for group, group_masks, cols, qb, kb, vb in _column_chunks(q, k, v, plan, ctx.masks, ctx.max_keys, scratch):
            dkb, dvb = scratch.get("dk", kb.shape).zero_(), scratch.get("dv", vb.shape).zero_()
            for run in plan.runs:
                out, lse = next(outs), next(lses)
                owner = _run_index(group.q_owner[cols], plan, run, keys=False)
                gt = torch.index_select(grad, 1, owner, out=scratch.get("grad", (bh, owner.numel(), width)))
                gq, gk, gv = _FLASH_CPU_BACKWARD(gt.view(out.shape), *_run_views(plan, run, qb, kb, vb), out, lse,
                                                 0.0, False, attn_mask=group_masks[run.cls], scale=ctx.scale)
                dq.index_add_(1, owner, gq.reshape(bh, -1, width))
                _add_halos(dkb, gk, plan, run)
                _add_halos(dvb, gv, plan, run)
            index = group.k_index[cols].flatten()
            dk.index_add_(1, index, dkb.view(bh, -1, width))
            dv.index_add_(1, index, dvb.view(bh, -1, width))
        return dq[:, :n_pos], dk, dv, None, None, None


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

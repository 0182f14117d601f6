"""Neighborhood attention (models/attention.py) against brute force: full attention with an explicit k^d
window mask built here from NATTEN's rules, in 1-D, 2-D and 3-D, with and without dilation, forward and
backward, for every backend that runs on this machine; on a GPU, the flex and torch backends in fp32 and bf16
(forward and gradients), the fused backend `auto` picks, and its fallback for narrow heads."""

from __future__ import annotations

import functools
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import diffuse.models.attention as attention
from diffuse.errors import DiffuseError
from diffuse.models.attention import (NeighborhoodAttention, dense_is_cheaper, fit_window, neighborhood_attention,
                                      resolve_backend)

from conftest import rel_err, requires_cuda


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest's


# ----- the reference: NATTEN's window rule, written out twice, independently of the implementation -----

def natten_window_start(index: int, length: int, kernel: int, dilation: int) -> int:
    """First key of query `index`'s window on one axis: a transcription of NATTEN's `get_window_start`
    (its original CPU/CUDA kernels), for odd kernels."""
    half = kernel // 2
    if dilation <= 1:
        return max(index - half, 0) + (index + half >= length) * (length - index - half - 1)
    ni = index - half * dilation
    if ni < 0:
        return index % dilation
    if index + half * dilation >= length:
        imodd = index % dilation
        a = (length // dilation) * dilation
        b = length - a
        if imodd < b:
            return length - b + imodd - 2 * half * dilation
        return a + imodd - kernel * dilation
    return ni


def nearest_run(index: int, length: int, kernel: int, dilation: int) -> list[int]:
    """The same window by its definition: among the keys of the query's dilation group (same index mod d),
    the run of `kernel` consecutive ones whose centre slot (kernel // 2 from its start) is nearest the query."""
    group = list(range(index % dilation, length, dilation))
    runs = [group[s:s + kernel] for s in range(len(group) - kernel + 1)]
    return min(runs, key=lambda run: abs(run[kernel // 2] - index))


@functools.lru_cache(maxsize=None)
def window_mask(spatial: tuple, kernel: tuple, dilation: tuple) -> torch.Tensor:
    """[N, N] bool: query (row, row-major flat index) may see key (column). Cached: do not modify."""
    axes = []
    for size, k, d in zip(spatial, kernel, dilation):
        axes.append([nearest_run(i, size, k, d) for i in range(size)])
    n = math.prod(spatial)
    mask = torch.zeros(n, n, dtype=torch.bool)
    strides = [math.prod(spatial[a + 1:]) for a in range(len(spatial))]
    for q_pos in itertools.product(*[range(s) for s in spatial]):
        q_flat = sum(p * s for p, s in zip(q_pos, strides))
        for k_pos in itertools.product(*[axes[a][p] for a, p in enumerate(q_pos)]):
            mask[q_flat, sum(p * s for p, s in zip(k_pos, strides))] = True
    return mask


def brute_force(q, k, v, kernel, dilation):
    """Full attention over all N positions with the window mask: [B, H, *spatial, D]."""
    b, h, *spatial, _ = q.shape
    mask = window_mask(tuple(spatial), tuple(kernel), tuple(dilation))
    flat = [t.reshape(b, h, -1, t.shape[-1]) for t in (q, k, v)]
    return F.scaled_dot_product_attention(*flat, attn_mask=mask).view(*q.shape[:-1], v.shape[-1])


# (spatial, kernel, dilation, tile): 1/2/3-D, odd and even sizes, sizes that tiles do not divide, even
# kernels, dilations that do and do not divide the size, a kernel as large as the axis.
CASES = [
    ((13,), (3,), (1,), (4,)),
    ((16,), (5,), (1,), (32,)),
    ((13,), (3,), (2,), (4,)),
    ((17,), (4,), (3,), (5,)),
    ((9, 11), (3, 5), (2, 1), (4, 4)),
    ((8, 8), (7, 7), (1, 1), (8, 8)),
    ((10, 9), (3, 3), (3, 2), (3, 4)),
    ((6, 7), (6, 2), (1, 3), (4, 2)),
    ((5, 6, 7), (3, 3, 3), (1, 2, 2), (2, 2, 3)),
    ((6, 6, 6), (3, 5, 2), (2, 1, 1), (4, 4, 4)),
]
IDS = ["x".join(map(str, c[0])) + f"-k{'.'.join(map(str, c[1]))}-d{'.'.join(map(str, c[2]))}" for c in CASES]


def qkv(spatial, dtype=torch.float64, head_dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, *spatial, head_dim, generator=g, dtype=dtype).requires_grad_() for _ in range(3)]


# ----- the reference itself -----

@pytest.mark.parametrize("length,kernel,dilation", [(13, 3, 1), (13, 5, 2), (17, 3, 3), (20, 7, 2), (9, 9, 1),
                                                    (23, 5, 4), (7, 1, 1)])
def test_reference_window_matches_nattens_formula(length, kernel, dilation):
    for i in range(length):
        run = nearest_run(i, length, kernel, dilation)
        start = natten_window_start(i, length, kernel, dilation)
        assert run == list(range(start, start + kernel * dilation, dilation)), i


@pytest.mark.parametrize("spatial,kernel,dilation,tile", CASES, ids=IDS)
def test_every_query_sees_exactly_k_to_the_d_keys_itself_included(spatial, kernel, dilation, tile):
    mask = window_mask(spatial, kernel, dilation)
    assert (mask.sum(1) == math.prod(kernel)).all()
    assert mask.diagonal().all()
    # each key is in the same dilation group as its query on every axis
    coords = torch.stack(torch.meshgrid(*[torch.arange(s) for s in spatial], indexing="ij")).flatten(1)  # [d, N]
    for a, d in enumerate(dilation):
        same_group = (coords[a][:, None] % d) == (coords[a][None, :] % d)
        assert not (mask & ~same_group).any()


# ----- the torch backend (tiled SDPA): forward and backward -----

def _check_forward_backward(q, k, v, kernel, dilation, tol=1e-10, **kw):
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(*q.shape[:-1], v.shape[-1], generator=g, dtype=q.dtype)  # weighs every output
    ref = brute_force(q, k, v, kernel, dilation)
    ref_grads = torch.autograd.grad((ref * weight).sum(), (q, k, v))
    out = neighborhood_attention(q, k, v, kernel, dilation, **kw)
    grads = torch.autograd.grad((out * weight).sum(), (q, k, v))
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    for name, got, want in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(got, want, atol=tol, rtol=tol, msg=f"grad of {name}")


@pytest.mark.parametrize("spatial,kernel,dilation,tile", CASES, ids=IDS)
def test_torch_backend_cpu_flash_path(spatial, kernel, dilation, tile):
    """The CPU path: chunks of tiles through the fused flash kernels, custom backward."""
    assert attention._FLASH_CPU is not None and attention._FLASH_CPU_BACKWARD is not None
    _check_forward_backward(*qkv(spatial), kernel, dilation, backend="torch", tile=tile)


@pytest.mark.parametrize("spatial,kernel,dilation,tile", CASES[::2], ids=IDS[::2])
def test_torch_backend_generic_sdpa_path(spatial, kernel, dilation, tile, monkeypatch):
    """The path other devices take (all tiles gathered, F.scaled_dot_product_attention, autograd)."""
    monkeypatch.setattr(attention, "_FLASH_CPU", None)
    _check_forward_backward(*qkv(spatial), kernel, dilation, backend="torch", tile=tile)


@pytest.mark.parametrize("spatial,kernel,dilation", [((40,), (5,), (3,)), ((12, 11), (3, 5), (2, 1)),
                                                     ((7, 6, 8), (3, 3, 3), (2, 1, 2))])
def test_torch_backend_in_many_chunks(spatial, kernel, dilation, monkeypatch):
    """Force a chunk to hold a single column, so every column group runs in several chunks."""
    monkeypatch.setattr(attention, "_chunk_keys", lambda n_positions: 1)
    _check_forward_backward(*qkv(spatial), kernel, dilation, backend="torch", tile=2)


@pytest.mark.parametrize("min_add_elements", [1, 10**12], ids=["strided-adds", "one-index-add"])
@pytest.mark.parametrize("spatial,kernel,dilation,tile", [((60,), (5,), (3,), (2,)), ((30, 10), (3, 5), (1, 2), (3, 4)),
                                                          ((9, 7, 8), (3, 3, 5), (1, 2, 1), (2, 3, 4))])
def test_halo_gradients_added_back_either_way(spatial, kernel, dilation, tile, min_add_elements, monkeypatch):
    """Key gradients go back to the column buffers by strided adds (plane by plane when a run has more tiles
    than halo planes, as in 1-D; tile by tile otherwise) or by one index_add_: the same gradients."""
    monkeypatch.setattr(attention, "_MIN_ADD_ELEMENTS", min_add_elements)
    _check_forward_backward(*qkv(spatial), kernel, dilation, backend="torch", tile=tile)


def test_key_halos_are_views_of_column_buffers_sliding_along_the_first_axis():
    """32³, kernel 7, 4×4×4 tiles: each column (a 4×4 tile on the last two axes) gathers its 10×10 key halo
    once per plane, 6.25 keys per position in all, where a gather per tile would copy 10³/4³ = 15.6; along
    the first axis the halos are three strided runs: the first tile's, the six interior ones 4 planes apart,
    the last one's."""
    plan = attention._tiled_plan((32, 32, 32), (7, 7, 7), (1, 1, 1), (4, 4, 4), torch.device("cpu"))
    assert (plan.tq, plan.tk, plan.q_rows, plan.k_rows) == (4, 10, 16, 100)
    assert sum(g.k_index.numel() for g in plan.groups) == 8 * 8 * 32 * 100 == 6.25 * 32 ** 3
    assert [(r.q_plane, r.k_plane, r.k_step, r.n) for r in plan.runs] == [(0, 0, 0, 1), (4, 1, 4, 6), (28, 22, 0, 1)]
    # every position is exactly one valid query slot
    owners = torch.cat([g.q_owner.flatten() for g in plan.groups])
    assert torch.equal(owners[owners < 32 ** 3].sort().values, torch.arange(32 ** 3))


def test_default_tiles_and_auto_backend_match_brute_force():
    for spatial, kernel in [((200,), 7), ((40, 36), 5), ((13, 12, 11), 3)]:
        kernel, dilation = (kernel,) * len(spatial), (1,) * len(spatial)
        assert not dense_is_cheaper(spatial, kernel, dilation)  # these take the tiled path
        _check_forward_backward(*qkv(spatial), kernel, dilation, backend="auto")


@pytest.mark.parametrize("spatial,kernel,dilation", [((30,), (7,), (2,)), ((9, 10), (5, 3), (1, 3)),
                                                     ((5, 7, 8), (5, 3, 3), (1, 2, 1))])
def test_small_maps_take_one_dense_masked_call(spatial, kernel, dilation):
    """Where tiles would not save half the scores, one SDPA call with the [N, N] window mask."""
    assert dense_is_cheaper(spatial, kernel, dilation)
    _check_forward_backward(*qkv(spatial), kernel, dilation, backend="torch")


def test_default_tile_takes_a_whole_group_where_the_halo_would():
    assert attention.default_tile((32, 32, 32), (7, 7, 7), (1, 1, 1)) == (2, 4, 4)
    # dilation 2 on 16³: groups of 8 points, a 4-tile's halo (4 + 5 − 1 = 8) is already the whole group
    assert attention.default_tile((16, 16, 16), (5, 5, 5), (2, 2, 2)) == (2, 8, 8)
    assert attention.default_tile((16, 16, 16), (5, 5, 5), (1, 2, 1)) == (2, 8, 4)
    assert attention.default_tile((40, 36), (5, 5), (1, 1)) == (8, 8)
    assert attention.default_tile((200,), (7,), (1,)) == (32,)
    _check_forward_backward(*qkv((6, 16, 10)), (3, 5, 3), (2, 2, 1), backend="torch")  # (2, 8, 4) tiles


def test_dense_choice_follows_the_saving():
    assert dense_is_cheaper((8, 8, 8), (5, 5, 5), (1, 1, 1))
    assert not dense_is_cheaper((16, 16, 16), (5, 5, 5), (1, 1, 1))
    assert not dense_is_cheaper((64, 64), (7, 7), (1, 1))
    assert not dense_is_cheaper((5000,), (4999,), (1,))  # never beyond max_positions


def test_float32_and_separate_value_width():
    q, k, _ = qkv((9, 10), dtype=torch.float32)
    v = torch.randn(2, 3, 9, 10, 4, requires_grad=True)  # value head width may differ from q/k's
    _check_forward_backward(q, k, v, (3, 5), (2, 1), tol=1e-5, backend="torch", tile=4)


def test_kernel_covering_the_whole_map_is_full_attention():
    q, k, v = qkv((6, 5))
    out = neighborhood_attention(q, k, v, (6, 5))
    flat = [t.flatten(2, 3) for t in (q, k, v)]
    torch.testing.assert_close(out, F.scaled_dot_product_attention(*flat).view(q.shape))


# ----- flex and natten: forward here (neither has a backward on CPU) -----

@pytest.mark.parametrize("spatial,kernel,dilation,tile", CASES, ids=IDS)
def test_flex_backend_forward(spatial, kernel, dilation, tile):
    q, k, v = (t.detach() for t in qkv(spatial))
    out = neighborhood_attention(q, k, v, kernel, dilation, backend="flex")
    torch.testing.assert_close(out, brute_force(q, k, v, kernel, dilation), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("spatial,kernel,dilation,tile", CASES, ids=IDS)
def test_natten_backend_forward(spatial, kernel, dilation, tile):
    pytest.importorskip("natten")
    q, k, v = (t.detach() for t in qkv(spatial, dtype=torch.float32))  # natten: fp32, head_dim multiple of 8
    out = neighborhood_attention(q, k, v, kernel, dilation, backend="natten")
    torch.testing.assert_close(out, brute_force(q, k, v, kernel, dilation), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["flex", "natten"])
def test_backends_without_cpu_backward_say_so(backend):
    if backend == "natten":
        pytest.importorskip("natten")
    q, k, v = qkv((8, 8), dtype=torch.float32)
    with pytest.raises(DiffuseError, match="no backward pass on CPU"):
        neighborhood_attention(q, k, v, 3, backend=backend)


# ----- errors and backend choice -----

def test_backend_choice_and_errors(monkeypatch):
    assert resolve_backend("auto", "cpu") == "torch"
    assert resolve_backend("torch", "cuda") == "torch"
    monkeypatch.setattr(attention, "natten_available", lambda: False)
    assert resolve_backend("auto", "cuda") == "flex"
    with pytest.raises(DiffuseError, match="pip install natten"):
        resolve_backend("natten", "cpu")
    with pytest.raises(DiffuseError, match="auto, torch, flex, natten"):
        resolve_backend("cutlass", "cpu")
    with pytest.raises(DiffuseError, match="natten"):
        NeighborhoodAttention(8, 2, backend="natten")  # at build time, not mid-training
    monkeypatch.setattr(attention, "natten_available", lambda: True)
    assert resolve_backend("auto", "cuda") == "natten"


def test_window_larger_than_the_map_is_an_error():
    q, k, v = qkv((9,))
    with pytest.raises(ValueError, match="kernel·dilation ≤ size"):
        neighborhood_attention(q, k, v, 5, dilation=2)  # 5·2 > 9
    with pytest.raises(ValueError, match="shape"):
        neighborhood_attention(q, k[:, :, :8], v, 3)


def test_fit_window_shrinks_dilation_then_kernel():
    assert fit_window(32, 7, 2) == (7, 2)
    assert fit_window(13, 7, 2) == (7, 1)   # 7·2 > 13: dilation first
    assert fit_window(30, 7, 4) == (7, 4)
    assert fit_window(27, 7, 4) == (7, 3)
    assert fit_window(4, 7, 2) == (4, 1)    # the whole axis


# ----- the module: heads split over dilations -----

def test_module_head_groups_use_their_own_dilation():
    torch.manual_seed(0)
    layer = NeighborhoodAttention(channels=16, heads=4, kernel_size=3, dilations=(1, 3)).double()
    x = torch.randn(2, 10, 9, 16, dtype=torch.float64)  # channels-last [B, *spatial, C]
    qkv_ = layer.qkv(x).view(2, 10, 9, 3, 4, 4).movedim(-2, 1)
    q, k, v = qkv_.unbind(-2)
    expected = torch.cat([brute_force(q[:, :2], k[:, :2], v[:, :2], (3, 3), (1, 1)),
                          brute_force(q[:, 2:], k[:, 2:], v[:, 2:], (3, 3), (3, 3))], dim=1)
    expected = layer.proj(expected.movedim(1, -2).reshape(2, 10, 9, 16))
    torch.testing.assert_close(layer(x), expected)


def test_module_fits_windows_to_small_maps():
    layer = NeighborhoodAttention(channels=8, heads=2, kernel_size=7, dilations=(1, 2))
    assert layer.windows((32, 16)) == [((7, 7), (1, 1)), ((7, 7), (2, 2))]
    assert layer.windows((8, 4)) == [((7, 4), (1, 1)), ((7, 4), (1, 1))]
    assert layer(torch.randn(1, 8, 4, 8)).shape == (1, 8, 4, 8)


def test_module_rejects_uneven_head_groups():
    with pytest.raises(ValueError, match="one group per dilation"):
        NeighborhoodAttention(12, heads=3, dilations=(1, 2))


# ----- on a GPU: flex neighborhood attention, the CUDA backend `auto` picks without natten -----

FLEX_CASES = [((64,), (7,), (2,)), ((16, 20), (5, 7), (1, 2)), ((8, 9, 10), (3, 3, 5), (2, 1, 1))]


@requires_cuda
@pytest.mark.parametrize("spatial,kernel,dilation", FLEX_CASES, ids=["1d", "2d", "3d"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-3), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", ["flex", "torch"])
def test_neighborhood_attention_on_cuda_matches_brute_force(spatial, kernel, dilation, dtype, tol, backend):
    """Forward and all three gradients against the masked full attention in float64 on the CPU; tolerances
    are relative norms (fp32 on tensor cores lands near 3e-4, bf16 operands near 5e-3)."""
    g = torch.Generator().manual_seed(len(spatial))
    ref_in = [torch.randn(2, 4, *spatial, 16, generator=g, dtype=torch.float64).requires_grad_() for _ in range(3)]
    weight = torch.randn(2, 4, *spatial, 16, generator=g, dtype=torch.float64)
    ref = brute_force(*ref_in, kernel, dilation)
    ref_grads = torch.autograd.grad((ref * weight).sum(), ref_in)

    inputs = [t.detach().to("cuda", dtype).requires_grad_() for t in ref_in]
    out = neighborhood_attention(*inputs, kernel, dilation, backend=backend)
    grads = torch.autograd.grad((out * weight.to("cuda", dtype)).sum(), inputs)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert rel_err(out, ref) < tol
    for name, got, want in zip("qkv", grads, ref_grads):
        assert rel_err(got, want) < tol, name


@requires_cuda
def test_auto_backend_on_cuda_is_a_fused_one():
    assert resolve_backend("auto", "cuda") in ("natten", "flex")


@requires_cuda
def test_narrow_heads_fall_back_from_flex_under_auto():
    """flex's compiled kernels need heads ≥ 16 wide: auto takes the torch backend, an explicit flex says why."""
    q, k, v = (torch.randn(2, 2, 12, 12, 4, device="cuda", requires_grad=True) for _ in range(3))
    out = neighborhood_attention(q, k, v, 3, backend="auto")
    out.sum().backward()
    ref = brute_force(*(t.detach().double().cpu() for t in (q, k, v)), (3, 3), (1, 1))
    assert rel_err(out, ref) < 2e-3
    with pytest.raises(DiffuseError, match="head width of at least 16"):
        neighborhood_attention(q, k, v, 3, backend="flex")

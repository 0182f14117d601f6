"""Neighborhood attention (models/attention.py, torch backend) against full attention and against peers,
fwd+bwd time and peak memory, for growing sizes in 1-D, 2-D and 3-D; then one MSNAT training step at 32³.

    python benchmarks/attention.py [--quick] [--threads N] [--out attention.json]

Attention cases: batch 4, 4 heads of width 16 (64 channels), kernel 7 on every axis, dilation 1, fp32.
  na      ours: query tiles with their key halos through the fused CPU flash kernels
  full    F.scaled_dot_product_attention over all N positions (flash kernel: O(N) memory, O(N²) time)
  naive   gather each query's k^d keys ([B, H, N, k^d, D]), einsum, softmax: the plain implementation
  natten  natten.na{1,2,3}d, where it runs: on CPU it is forward only (eager flex_attention, which
          materialises all N² scores), so it is timed forward-only against our forward, up to N = 4096
          (N = 2304 with --quick)
Model case: MSNATUNet(dim=3) at 32³, batch 2, one AdamW step, with neighborhood attention (experiment=msnat_3d's
levels: a transformer block at every level)
and with the same blocks doing full attention (SDPA over all positions) instead.

Time: the best of up to 3 runs (fewer when a run is slow), after a warm-up at a small size.
Memory: each case runs in its own process; peak memory is the process's resident-set high-water mark
(VmHWM, reset through /proc/self/clear_refs just before the measured run) minus its resident size at that
moment, i.e. what the fwd+bwd adds on top of the inputs. glibc is told to serve every allocation above
64 KiB with mmap (MALLOC_MMAP_THRESHOLD_), so freed memory leaves the process and the high-water mark is that
of live memory, not of allocator caches. Linux only. The N×N column is what materialising the scores would
take (B·H·N²·4 bytes), for scale.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

B, H, D, KERNEL = 4, 4, 16, 7
SIZES = {1: [1024, 4096, 16384], 2: [32, 64, 96], 3: [16, 24, 32]}
QUICK_SIZES = {1: [1024, 4096], 2: [32, 48], 3: [12, 16]}
NATTEN_MAX_N = 4096           # natten's CPU forward materialises the N² scores: ~10 s at N = 4096
NAIVE_MAX_BYTES = 2**30       # naive gathers 2·B·H·N·k^d·D floats: beyond 1 GiB it is left out


# ----- one case, in its own process -----

def _status_mib(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size


def naive_neighborhood_attention(q, k, v, kernel):
    """Gather every query's window (NATTEN's rule, dilation 1) and attend: [B, H, *spatial, D]."""
    spatial = q.shape[2:-1]
    index = None
    for size in spatial:  # flat key index of each query's window, built axis by axis
        start = (torch.arange(size) - kernel // 2).clamp(0, size - kernel)
        axis = start[:, None] + torch.arange(kernel)  # [size, k]
        if index is None:
            index = axis
        else:  # [N_prev, K_prev] × [size, k] → [N_prev·size, K_prev·k], row-major
            index = (index[:, None, :, None] * size + axis[None, :, None, :]).flatten(0, 1).flatten(1)
    qf, kf, vf = (t.flatten(2, -2) for t in (q, k, v))
    scores = torch.einsum("bhnd,bhnkd->bhnk", qf, kf[:, :, index]) * qf.shape[-1] ** -0.5
    out = torch.einsum("bhnk,bhnkd->bhnd", scores.softmax(-1), vf[:, :, index])
    return out.view(q.shape)


def _attention(method: str):
    from diffuse.models.attention import neighborhood_attention

    if method == "na":
        return lambda q, k, v: neighborhood_attention(q, k, v, KERNEL, backend="torch")
    if method == "full":
        return lambda q, k, v: F.scaled_dot_product_attention(
            *(t.flatten(2, -2) for t in (q, k, v))).view(q.shape)
    if method == "naive":
        return lambda q, k, v: naive_neighborhood_attention(q, k, v, KERNEL)
    if method == "natten":
        return lambda q, k, v: neighborhood_attention(q, k, v, KERNEL, backend="natten")
    raise ValueError(method)


def _measure(fn, warmup, repeats: int = 3, budget_s: float = 20.0) -> dict:
    warmup()
    _reset_peak()
    base = _status_mib("VmRSS")
    times = []
    while len(times) < repeats:
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        if len(times) == 1:
            peak = _status_mib("VmHWM") - base
        if sum(times) > budget_s:
            break
    return {"time_s": min(times), "runs": len(times), "peak_mib": peak}


def run_attention_case(method: str, dim: int, size: int, backward: bool) -> dict:
    attend = _attention(method)

    def inputs(s):
        return [torch.randn(B, H, *([s] * dim), D, requires_grad=backward) for _ in range(3)]

    def step(q, k, v):
        out = attend(q, k, v)
        if backward:
            out.sum().backward()

    small = inputs(max(KERNEL, {1: 256, 2: 16, 3: 8}[dim]))
    q, k, v = inputs(size)
    return _measure(lambda: step(q, k, v), lambda: step(*small))


def run_model_case(attention: str, size: int) -> dict:
    """One MSNAT-3D training step (batch 2) with neighborhood or full attention in its blocks."""
    from diffuse.models import attention as attn_module
    from diffuse.models.msnat import MSNATUNet

    if attention == "full":
        def full_forward(self, x):
            b, *spatial, c = x.shape
            qkv = self.qkv(x).view(b, -1, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
            out = F.scaled_dot_product_attention(*qkv)  # [B, heads, N, Dh] over all positions
            return self.proj(out.transpose(1, 2).reshape(b, *spatial, c))
        attn_module.NeighborhoodAttention.forward = full_forward

    torch.manual_seed(0)
    # a transformer block at every level, the 32³ one included (the CPU-sized 3-D default leaves that one out)
    model = MSNATUNet(dim=3, num_classes=4, levels=[dict(mult=1, depth=1, heads=2, kernel=5, dilations=[1, 2]),
                                                    dict(mult=2, depth=1, heads=4, kernel=5, dilations=[1, 2]),
                                                    dict(mult=2, depth=1, heads=4, kernel=5, dilations=[1])])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(s):
        x, t, y = torch.randn(2, 1, s, s, s), torch.rand(2), torch.randint(0, 4, (2,))
        F.mse_loss(model(x, t, y), torch.randn_like(x)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    result = _measure(lambda: step(size), lambda: step(8), repeats=2, budget_s=30.0)
    result["parameters"] = sum(p.numel() for p in model.parameters())
    return result


# ----- the driver -----

def _subprocess(args: list[str], threads: int | None) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, __file__, *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _fmt(value, unit="") -> str:
    if value is None:
        return "—"
    if isinstance(value, str):
        return value
    return f"{value:.3g}{unit}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes only (a smoke run)")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for every case")
    p.add_argument("--out", default="attention.json")
    p.add_argument("--skip-model", action="store_true", help="leave out the MSNAT-3D training step")
    p.add_argument("--case", nargs="+", help=argparse.SUPPRESS)  # internal: one measurement
    args = p.parse_args()

    if args.case:
        kind, *rest = args.case
        if kind == "attention":
            method, dim, size, backward = rest
            result = run_attention_case(method, int(dim), int(size), backward == "1")
        else:
            result = run_model_case(rest[0], int(rest[1]))
        print(json.dumps(result))
        return

    from diffuse.models.attention import natten_available

    sizes = QUICK_SIZES if args.quick else SIZES
    has_natten = natten_available()
    rows = []
    header = (f"{'dim':>3} {'size':>6} {'N':>6} | {'na s':>7} {'full s':>7} {'full/na':>7} {'naive s':>7} "
              f"{'naive/na':>8} | {'na MiB':>7} {'full MiB':>8} {'naive MiB':>9} {'N×N MiB':>8} | "
              f"{'natten fwd s':>12} {'na fwd s':>8} {'natten/na':>9}")
    print(f"fwd+bwd, batch {B}, {H} heads × {D}, kernel {KERNEL}; threads: {args.threads or torch.get_num_threads()}")
    print(header)
    print("-" * len(header))
    for dim in (1, 2, 3):
        for size in sizes[dim]:
            n = size ** dim
            row = {"dim": dim, "size": size, "positions": n, "scores_nxn_mib": B * H * n * n * 4 / 2**20}
            for method in ("na", "full", "naive"):
                gathered = 2 * B * H * n * KERNEL ** dim * D * 4
                if method == "naive" and gathered > NAIVE_MAX_BYTES:
                    row[method] = {"skipped": f"gathers {gathered / 2**30:.1f} GiB"}
                    continue
                row[method] = _subprocess(["--case", "attention", method, str(dim), str(size), "1"], args.threads)
            if has_natten and n <= (2304 if args.quick else NATTEN_MAX_N):
                row["natten_fwd"] = _subprocess(["--case", "attention", "natten", str(dim), str(size), "0"],
                                                args.threads)
                row["na_fwd"] = _subprocess(["--case", "attention", "na", str(dim), str(size), "0"], args.threads)
            rows.append(row)

            def t(key, row=row):
                return row.get(key, {}).get("time_s")

            def m(key, row=row):
                return row.get(key, {}).get("peak_mib")

            def ratio(a, b):
                return t(a) / t(b) if t(a) and t(b) else None

            print(f"{dim:>3} {size:>6} {n:>6} | {_fmt(t('na')):>7} {_fmt(t('full')):>7} "
                  f"{_fmt(ratio('full', 'na'), '×'):>7} {_fmt(t('naive')):>7} {_fmt(ratio('naive', 'na'), '×'):>8} | "
                  f"{_fmt(m('na')):>7} {_fmt(m('full')):>8} {_fmt(m('naive')):>9} {_fmt(row['scores_nxn_mib']):>8} | "
                  f"{_fmt(t('natten_fwd')):>12} {_fmt(t('na_fwd')):>8} {_fmt(ratio('natten_fwd', 'na_fwd'), '×'):>9}",
                  flush=True)
            for key in ("na", "full", "naive", "natten_fwd", "na_fwd"):
                if "error" in row.get(key, {}):
                    print(f"    {key}: {row[key]['error']}")

    result = {"config": {"batch": B, "heads": H, "head_dim": D, "kernel": KERNEL, "dtype": "float32",
                         "threads": args.threads or torch.get_num_threads(), "torch": torch.__version__,
                         "natten": has_natten},
              "attention": rows}
    if not args.skip_model:
        size = 16 if args.quick else 32
        print(f"\nMSNATUNet(dim=3) one training step at {size}³, batch 2 (AdamW):")
        model = {}
        for attention in ("neighborhood", "full"):
            model[attention] = r = _subprocess(["--case", "model", attention, str(size)], args.threads)
            print(f"  {attention:>12} attention: " + (r.get("error") or
                  f"{r['time_s']:.2f} s/step, peak +{r['peak_mib']:.0f} MiB, {r['parameters'] / 1e6:.2f}M parameters"))
        n = size ** 3
        print(f"  (N×N scores of one top-level attention, batch 2 × 2 heads: {2 * 2 * n * n * 4 / 2**30:.1f} GiB)")
        result["msnat3d_step"] = {"size": size, "batch": 2, **model}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()

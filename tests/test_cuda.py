"""The CUDA path, run on a machine with a GPU: flex neighborhood attention against brute force (forward and
backward, fp32 and bf16), bf16 training steps of every model family, a CUDA training run resumed against an
uninterrupted one, and train → sample from the CLI. Skipped where no CUDA device is present (CI has none)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from diffuse.jobs import train as train_job
from diffuse.models.attention import neighborhood_attention, resolve_backend
from diffuse.training.checkpoint import load_checkpoint

from conftest import TINY, compose_cfg, run_cli
from test_models_cli import COMMON, MSNAT, SHUFFLENET, SPATIAL_TRANSFORMER
from test_neighborhood_attention import brute_force

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA_TINY = [o for o in TINY if not o.startswith("device=")] + ["device=cuda"]


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double().cpu(), want.double().cpu()
    return ((got - want).norm() / want.norm()).item()


# ----- flex neighborhood attention: the CUDA backend `auto` picks without natten --------------------------------

FLEX_CASES = [((64,), (7,), (2,)), ((16, 20), (5, 7), (1, 2)), ((8, 9, 10), (3, 3, 5), (2, 1, 1))]


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


def test_auto_backend_on_cuda_is_a_fused_one():
    assert resolve_backend("auto", "cuda") in ("natten", "flex")


# ----- every model family: one bf16 training step on CUDA agrees with fp32 ------------------------------------

@pytest.mark.parametrize("model_args", [CUDA_TINY, [*MSNAT, "dim=2"], [*MSNAT, "dim=3"], SHUFFLENET,
                                        SPATIAL_TRANSFORMER], ids=["unet", "msnat2d", "msnat3d", "shufflenet",
                                                                   "spatial_transformer"])
def test_bf16_training_step_on_cuda_agrees_with_fp32(model_args):
    from diffuse.jobs.common import build, build_dataset

    cfg = compose_cfg("train", [o for o in COMMON if not o.startswith("device=")] + model_args)
    dataset = build_dataset(cfg)
    model = build(cfg.model, "model").to("cuda")
    for p in model.parameters():  # the zero-initialised output heads would hide every other layer's gradient
        if p.dim() > 1 and not p.any():
            torch.nn.init.normal_(p, std=0.02)
    x, y = dataset.get_batch(torch.arange(4))
    x, y = x.to("cuda"), y.to("cuda")
    t = torch.rand(4, device="cuda")
    losses, grads = {}, {}
    for precision, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
            out = model(x, t, y)
        loss = out.float().pow(2).mean()
        loss.backward()
        losses[precision] = loss.item()
        grads[precision] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert abs(losses["bf16"] - losses["fp32"]) <= 0.03 * losses["fp32"] + 1e-6
    assert rel_err(grads["bf16"], grads["fp32"]) < 0.1


# ----- the trainer on CUDA --------------------------------------------------------------------------------------

def _losses(run_dir):
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def test_resume_on_cuda_matches_the_uninterrupted_run(tmp_path):
    """8 steps straight against 4 + resume + 4, on the GPU: same data order, RNG and optimizer state; equal up
    to the non-determinism of CUDA kernels (atomics in convolution backward), so compared with a tolerance."""
    common = [*CUDA_TINY, "trainer.max_steps=8", "trainer.checkpoint_every=4", "model.dropout=0.1"]
    train_job.run(compose_cfg("train", common), tmp_path / "straight", [])
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    (interrupted / "checkpoints").mkdir(parents=True)
    shutil.copy(straight / "checkpoints" / "step_4.ckpt", interrupted / "checkpoints" / "last.ckpt")
    train_job.run(compose_cfg("train", common + [f"resume={interrupted}"]), tmp_path / "ignored",
                  [f"resume={interrupted}"])
    a = load_checkpoint(straight / "checkpoints" / "last.ckpt")
    b = load_checkpoint(interrupted / "checkpoints" / "last.ckpt")
    assert a["step"] == b["step"] == 8
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], atol=1e-5, rtol=1e-4, msg=key)
    la, lb = _losses(straight), _losses(interrupted)
    for step in (5, 6, 7, 8):
        assert la[step] == pytest.approx(lb[step], rel=1e-4), step


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_train_then_sample_from_the_cli_on_cuda(tmp_path, precision):
    proc = run_cli(["train", *CUDA_TINY, "trainer.max_steps=6", f"trainer.precision={precision}",
                    "trainer.sample_every=6", "trainer.sample_steps=5", "trainer.num_sample_images=4"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = next((tmp_path / "outputs").glob("*/*"))
    assert (run / "samples" / "step_6.png").is_file()
    assert all(map(lambda loss: loss == loss and loss < 10, _losses(run).values()))
    proc = run_cli(["sample", f"checkpoint={run}", "device=cuda", "sampler=dpm_solver", "sampler.steps=8",
                    "num_samples=8", "--animation"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "samples: " in proc.stdout


def test_narrow_heads_fall_back_from_flex_under_auto():
    """flex's compiled kernels need heads ≥ 16 wide: auto takes the torch backend, an explicit flex says why."""
    from diffuse.errors import DiffuseError

    q, k, v = (torch.randn(2, 2, 12, 12, 4, device="cuda", requires_grad=True) for _ in range(3))
    out = neighborhood_attention(q, k, v, 3, backend="auto")
    out.sum().backward()
    ref = brute_force(*(t.detach().double().cpu() for t in (q, k, v)), (3, 3), (1, 1))
    assert rel_err(out, ref) < 2e-3
    with pytest.raises(DiffuseError, match="head width of at least 16"):
        neighborhood_attention(q, k, v, 3, backend="flex")


def test_shapes_render_on_cuda_like_on_cpu():
    """The trainer moves `shapes` to the GPU (no host time per batch): the same batches, to rounding."""
    from diffuse.data.shapes import ShapesDataset

    for dim in (1, 2, 3):
        cpu = ShapesDataset(dim=dim, resolution=16, channels=3, size=256)
        gpu = ShapesDataset(dim=dim, resolution=16, channels=3, size=256).to("cuda")
        idx = torch.randperm(256)[:32]
        (xc, yc), (xg, yg) = cpu.get_batch(idx), gpu.get_batch(idx)
        assert xg.is_cuda and yg.is_cuda and torch.equal(yg.cpu(), yc)
        torch.testing.assert_close(xg.cpu(), xc, atol=1e-4, rtol=0)

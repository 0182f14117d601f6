"""The training machinery: exact resume (and on a GPU, resume within CUDA's non-determinism), NaN handling,
checkpoints, EMA, LR schedules, data stream."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from diffuse.data.loader import BatchStream
from diffuse.data.shapes import ShapesDataset
from diffuse.errors import DiffuseError
from diffuse.jobs import train as train_job
from diffuse.storage.checkpoint import latest_run, load_checkpoint, mark_run, save_checkpoint
from diffuse.training.ema import EMA
from diffuse.training.loop import build_lr_scheduler

from conftest import CUDA_TINY, TINY, compose_cfg, requires_cuda, straight_and_resumed


def _train(tmp_path, name, overrides, extra_cli=()):
    cfg = compose_cfg("train", TINY + overrides)
    return train_job.run(cfg, tmp_path / name, list(extra_cli))


def _losses(run_dir):
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def test_resume_is_exact(tmp_path):
    """N steps straight == N/2 steps, stop, resume, N/2 steps: same losses, weights, EMA, optimizer."""
    common = ["trainer.max_steps=8", "trainer.checkpoint_every=4", "model.dropout=0.1"]
    _train(tmp_path, "straight", common)
    straight = tmp_path / "straight"
    # what an interrupted run leaves behind: its run marker and its checkpoint at step 4
    interrupted = tmp_path / "interrupted"
    (interrupted / "checkpoints").mkdir(parents=True)
    shutil.copy(straight / "run.json", interrupted / "run.json")
    shutil.copy(straight / "checkpoints" / "step_4.ckpt", interrupted / "checkpoints" / "last.ckpt")
    cfg = compose_cfg("train", TINY + common + [f"resume={interrupted}"])
    summary = train_job.run(cfg, tmp_path / "ignored", [f"resume={interrupted}"])
    assert summary["step"] == 8 and summary["run_dir"] == str(interrupted)

    a = load_checkpoint(straight / "checkpoints" / "last.ckpt")
    b = load_checkpoint(interrupted / "checkpoints" / "last.ckpt")
    assert a["step"] == b["step"] == 8
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for key in a["ema"]["model"]:
        assert torch.equal(a["ema"]["model"][key], b["ema"]["model"][key]), key
    assert a["ema"]["num_updates"] == b["ema"]["num_updates"] == 8
    assert a["lr_scheduler"]["last_epoch"] == b["lr_scheduler"]["last_epoch"] == 8
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"])
    losses_a, losses_b = _losses(straight), _losses(interrupted)
    for step in (5, 6, 7, 8):
        assert losses_a[step] == losses_b[step], step


@requires_cuda
def test_resume_on_cuda_matches_the_uninterrupted_run(tmp_path):
    """8 steps straight against 4 + resume + 4, on the GPU: same data order, RNG and optimizer state; equal up
    to the non-determinism of CUDA kernels (atomics in convolution backward), so compared with a tolerance."""
    straight, interrupted = straight_and_resumed(
        tmp_path, [*CUDA_TINY, "trainer.max_steps=8", "trainer.checkpoint_every=4", "model.dropout=0.1"], at_step=4)
    a = load_checkpoint(straight / "checkpoints" / "last.ckpt")
    b = load_checkpoint(interrupted / "checkpoints" / "last.ckpt")
    assert a["step"] == b["step"] == 8
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], atol=1e-5, rtol=1e-4, msg=key)
    la, lb = _losses(straight), _losses(interrupted)
    for step in (5, 6, 7, 8):
        assert la[step] == pytest.approx(lb[step], rel=1e-4), step


def test_resume_cannot_change_the_model(tmp_path):
    _train(tmp_path, "run", ["trainer.max_steps=2"])
    cfg = compose_cfg("train", TINY + ["trainer.max_steps=4", f"resume={tmp_path / 'run'}", "model.base_channels=16"])
    with pytest.raises(DiffuseError, match="cannot change 'model.base_channels'"):
        train_job.run(cfg, tmp_path / "x", [f"resume={tmp_path / 'run'}", "model.base_channels=16"])


def test_nan_loss_stops_cleanly_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    original = train_job.DiffusionLoss.__call__
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        calls["n"] += 1
        loss = original(self, *args, **kwargs)
        return loss * float("nan") if calls["n"] >= 4 else loss

    monkeypatch.setattr(train_job.DiffusionLoss, "__call__", poisoned)
    # steps 4, 5, 6 are skipped on the device; the host learns of it at step 6 (every max_nonfinite_steps)
    with pytest.raises(DiffuseError, match=r"loss became nan at step 4, 3 steps in a row.*last good checkpoint kept"):
        _train(tmp_path, "run", ["trainer.max_steps=10", "trainer.checkpoint_every=2", "trainer.log_every=5",
                                 "trainer.max_nonfinite_steps=3"])
    folder = tmp_path / "run" / "checkpoints"
    last, step_2 = load_checkpoint(folder / "last.ckpt"), load_checkpoint(folder / "step_2.ckpt")
    assert last["step"] == 4 and last["skipped_steps"] == 1 and not (folder / "step_6.ckpt").exists()
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())
    assert last["ema"]["num_updates"] == 3  # the skipped step 4 moved neither the weights nor the EMA
    assert not all(torch.equal(last["model"][k], step_2["model"][k]) for k in last["model"])


def test_checkpoint_errors_are_one_line(tmp_path):
    missing = tmp_path / "nope.ckpt"
    with pytest.raises(DiffuseError, match="checkpoint not found"):
        load_checkpoint(missing)
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(DiffuseError, match="corrupt or not a PyTorch file"):
        load_checkpoint(corrupt)
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    with pytest.raises(DiffuseError, match="not a diffuse checkpoint"):
        load_checkpoint(foreign)

    class Evil:  # a pickle that would run code: weights_only refuses it
        def __reduce__(self):
            return (print, ("pwned",))

    evil = tmp_path / "evil.ckpt"
    torch.save({"format": "diffuse-checkpoint", "x": Evil()}, evil)
    with pytest.raises(DiffuseError, match="cannot read checkpoint"):
        load_checkpoint(evil)


def test_checkpoint_is_written_atomically(tmp_path):
    path = tmp_path / "checkpoints" / "last.ckpt"
    config = {"model": {"_target_": "diffuse.models.unet.UNet"}, "dim": 2,  # the least a checkpoint holds
              "schedule": {"_target_": "diffuse.diffusion.schedules.LinearSchedule"},
              "dataset": {"_target_": "diffuse.data.shapes.ShapesDataset"}}
    save_checkpoint({"step": 1, "config": config, "model": {"w": torch.ones(3)}}, path)
    save_checkpoint({"step": 2, "config": config, "model": {"w": torch.ones(3)}}, path)
    assert load_checkpoint(path)["step"] == 2
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no temp files left behind
    mark_run(tmp_path, "diffusion")
    assert latest_run("diffusion", [tmp_path], with_checkpoint=True) == tmp_path


def test_ema_warmup_and_average():
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    ema = EMA(model, decay=0.9)
    decays = []
    value = 0.0
    for step in range(1, 101):
        with torch.no_grad():
            model.weight.fill_(float(step))
        d = ema.current_decay()
        decays.append(d)
        ema.update(model)
        value = d * value + (1 - d) * step
        assert ema.model.weight.item() == pytest.approx(value, rel=1e-5)
    assert decays[0] == pytest.approx(0.1) and decays[1] == pytest.approx(2 / 11)
    assert max(decays) == pytest.approx(0.9) and decays[79] < max(decays) and ema.num_updates == 100
    restored = EMA(model, decay=0.9)
    restored.load_state_dict(ema.state_dict())
    assert restored.num_updates == 100 and restored.current_decay() == ema.current_decay()


def test_an_ema_update_masked_by_a_device_flag_changes_nothing():
    """The trainer passes the step's `taken` flag as a tensor: a skipped step moves neither the average nor
    the warm-up counter, and a taken one is the plain update."""
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, decay=0.99)
    with torch.no_grad():
        model.weight.add_(1.0)
    before = [p.clone() for p in ema.model.parameters()]
    ema.update(model, torch.tensor(False))
    assert ema.num_updates == 0 and all(torch.equal(a, b) for a, b in zip(before, ema.model.parameters()))
    plain = EMA(model, decay=0.99)
    plain.model.load_state_dict(ema.model.state_dict())
    ema.update(model, torch.tensor(True))
    plain.update(model)
    assert ema.num_updates == plain.num_updates == 1
    assert all(torch.equal(a, b) for a, b in zip(plain.model.parameters(), ema.model.parameters()))
    assert not torch.equal(before[0], ema.model.weight)


@pytest.mark.parametrize("name", ["onecycle", "cosine", "constant"])
def test_lr_schedules(name):
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_lr_scheduler(opt, name, max_steps=100, lr=1.0, warmup_steps=10, pct_start=0.3)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    if name == "onecycle":
        assert max(lrs) == pytest.approx(1.0, rel=1e-3) and lrs.index(max(lrs)) in (29, 30)
        assert lrs[0] == pytest.approx(1.0 / 25) and lrs[-1] < 1e-3
    elif name == "cosine":
        assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
        assert lrs[55] == pytest.approx(0.5 * (1 + math.cos(math.pi * 45 / 90)))
    else:
        assert lrs[0] == pytest.approx(0.1) and all(v == 1.0 for v in lrs[9:])


def test_unknown_lr_schedule(tmp_path):
    with pytest.raises(DiffuseError, match="lr_schedule must be one of onecycle, cosine, constant"):
        _train(tmp_path, "r", ["trainer.max_steps=2", "trainer.lr_schedule=step"])


def test_batch_stream_resumes_and_shards():
    ds = ShapesDataset(dim=1, resolution=8, size=40)
    a = BatchStream(ds, batch_size=4, seed=3)
    seen = [next(a)[0] for _ in range(13)]  # crosses an epoch boundary (10 batches per epoch)
    b = BatchStream(ds, batch_size=4, seed=3)
    for _ in range(6):
        next(b)
    c = BatchStream(ds, batch_size=4, seed=3)
    c.load_state_dict(b.state_dict())
    for i in range(6, 13):
        assert torch.equal(next(c)[0], seen[i])
    r0 = BatchStream(ds, batch_size=4, seed=3, rank=0, world_size=2)
    r1 = BatchStream(ds, batch_size=4, seed=3, rank=1, world_size=2)
    assert set(r0._epoch_order().tolist()).isdisjoint(r1._epoch_order().tolist())


def test_bf16_training_runs_on_cpu(tmp_path):
    summary = _train(tmp_path, "bf16", ["trainer.max_steps=3", "trainer.precision=bf16"])
    assert math.isfinite(summary["loss"])


def test_bad_precision_and_dims(tmp_path):
    with pytest.raises(DiffuseError, match="precision must be one of fp32, bf16, fp16"):
        _train(tmp_path, "p", ["trainer.max_steps=2", "trainer.precision=fp8"])
    with pytest.raises(DiffuseError, match="dim must be 1, 2 or 3; got 4"):
        _train(tmp_path, "d", ["dim=4"])


def test_channels_last_choice_and_same_training(tmp_path):
    from diffuse.models.unet import UNet
    from diffuse.devices import use_channels_last

    planar, volume = UNet(dim=2, base_channels=8, channel_mult=(1,)), UNet(dim=3, base_channels=8, channel_mult=(1,))
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert use_channels_last("auto", planar, cpu) and not use_channels_last("auto", planar, cuda)
    assert not use_channels_last("auto", volume, cpu) and not use_channels_last(False, planar, cpu)
    assert use_channels_last(True, planar, cuda)
    with pytest.raises(DiffuseError, match="2-D convolutions only"):
        use_channels_last(True, volume, cpu)
    with pytest.raises(DiffuseError, match="auto, true or false"):
        use_channels_last("yes", planar, cpu)
    # the same fp32 run with NHWC and NCHW weights: the same losses and weights up to float rounding (fp32 pinned:
    # precision=auto is bf16 on an AMX CPU, whose rounding is not what this compares)
    runs = {}
    for flag in ("true", "false"):
        _train(tmp_path, flag, ["trainer.max_steps=4", f"trainer.channels_last={flag}", "trainer.precision=fp32"])
        runs[flag] = load_checkpoint(tmp_path / flag / "checkpoints" / "last.ckpt")
    conv = next(v for v in runs["true"]["model"].values() if v.dim() == 4 and v.shape[1] > 1 and v.shape[-1] > 1)
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    for key, value in runs["false"]["model"].items():
        torch.testing.assert_close(runs["true"]["model"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    losses = [_losses(tmp_path / flag) for flag in ("true", "false")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)


def test_precision_auto_is_bf16_where_the_device_computes_it_natively(monkeypatch):
    from diffuse.models.msnat import MSNATUNet
    from diffuse.devices import resolve_precision, use_channels_last
    from diffuse.training.loop import build_optimizer
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("fp16", torch.device("cpu")) == "fp16"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)  # an AMX CPU
    assert resolve_precision("auto", torch.device("cpu")) == "bf16"
    assert resolve_precision("fp32", torch.device("cpu")) == "fp32"
    msnat = MSNATUNet(dim=2, base_channels=8, levels=[{"depth": 0}, {"depth": 1, "heads": 1, "kernel": 3}])
    assert resolve_precision("auto", torch.device("cpu"), msnat) == "fp32"  # measured slower under bf16 there
    # channels-last weights pay on the CPU in fp32 only (NHWC under bf16 autocast was 1.5x slower)
    conv = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3))
    assert use_channels_last("auto", conv, torch.device("cpu"))
    assert not use_channels_last("auto", conv, torch.device("cpu"), torch.bfloat16)
    assert use_channels_last(True, conv, torch.device("cpu"), torch.bfloat16)  # asked for: kept
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto", torch.device("cuda")) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_precision("auto", torch.device("cuda")) == "fp32"
    opt = build_optimizer(torch.nn.Linear(2, 2), 1e-3, 0.0, (0.9, 0.999))
    assert opt.defaults.get("fused")  # the fused kernel on the CPU too: it skips a step without a host sync


def test_compile_setting_names_a_torch_compile_mode(monkeypatch):
    from diffuse.training import loop
    calls = []
    monkeypatch.setattr(loop.torch, "compile", lambda model, **kw: calls.append(kw) or model)
    model = torch.nn.Linear(2, 2)
    for setting in (False, "false", None):
        assert loop.compile_model(model, setting) is model
    for setting in (True, "true", "reduce-overhead", "max-autotune-no-cudagraphs"):
        loop.compile_model(model, setting)
    assert calls == [{}, {}, {"mode": "reduce-overhead"}, {"mode": "max-autotune-no-cudagraphs"}]
    with pytest.raises(DiffuseError, match="trainer.compile must be true, false or one of default, reduce-overhead"):
        loop.compile_model(model, "fast")

"""Bad values on the command line: one line naming the key, the value and what is allowed, before any work.

Run through the real CLI entry (`diffuse.cli.main`) in this process: the same argv → Hydra → validation path
as the console script, without paying a Python start-up per case.
"""

from __future__ import annotations

import contextlib
import io
import re

import pytest

from diffuse.cli import main
from diffuse.errors import DiffuseError
from diffuse.validation import Choice, Float, Int, Rule, check_guidance, validate

from conftest import TINY, compose_cfg

BAD = [  # (argv, the one line it must print)
    (["train", "trainer.batch_size=0"], r"trainer.batch_size must be an integer ≥ 1; got 0"),
    (["train", "trainer.lr=-1"], r"trainer.lr must be a number > 0; got -1"),
    (["train", "trainer.lr=abc"], r"trainer.lr must be a number > 0; got abc"),
    (["train", "trainer.max_steps=0"], r"trainer.max_steps must be an integer ≥ 1, or null; got 0"),
    (["train", "trainer.ema_decay=1.5"], r"trainer.ema_decay must be a number in \[0, 1\); got 1.5"),
    (["train", "trainer.betas=[0.9]"], r"trainer.betas must be two numbers \[a, b\] with a < b, each in \[0, 1\)"),
    (["train", "trainer.lr_schedule=step"], r"trainer.lr_schedule must be one of onecycle, cosine, constant; got step"),
    (["train", "trainer.keep_checkpoints=-1"], r"trainer.keep_checkpoints must be an integer ≥ 0, or null; got -1"),
    (["train", "trainer.channels_last=maybe"], r"trainer.channels_last must be one of auto, true, false; got maybe"),
    (["train", "sampler.steps=0"], r"sampler.steps must be an integer ≥ 1, or auto; got 0"),
    (["train", "sampler=ddim", "sampler.eta=2"], r"sampler.eta must be a number in \[0, 1\]; got 2"),
    (["train", "sampler.spacing=random"], r"sampler.spacing must be one of auto, linspace, leading, trailing"),
    (["train", "objective.prediction=score"], r"objective.prediction must be one of eps, x0, v; got score"),
    (["train", "logger.mode=loud"], r"logger.mode must be one of auto, online, offline, disabled; got loud"),
    (["train", "schedule.beta_start=0.5"], r"schedule.beta_start=0.5 must be below schedule.beta_end=0.02"),
    (["train", "model.channel_mult=[]"], r"model.channel_mult must be a non-empty list of integers"),
    (["train", "dim=4"], r"dim must be 1, 2 or 3; got 4"),
    (["train", "device=tpu"], r"device must be auto, cpu, cuda\[:N\] or mps; got 'tpu'"),
    (["train", "trainer.precision=fp8"], r"trainer.precision must be one of fp32, bf16, fp16, auto; got fp8"),
    (["train", *TINY, "dataset.resolution=9"], r"data of shape \(1, 9, 9\) .* does not fit model UNet: .*divisible by 2"),
    (["train", *TINY, "trainer.batch_size=100", "trainer.max_steps=1"],
     r"trainer.batch_size=100 is more than the dataset's 64 items"),
    (["train", "model=shufflenet", "dim=3"], r"cannot build model: ShuffleNetUNet is 2-D only"),
    (["train", "dataset=mnist", "dim=1"], r"dataset mnist is 2-D only; got dim=1"),
    (["train", "trainer.cond_drop_prob=0", "guidance.scale=3"],
     r"guidance.scale=3.0 needs a model trained with trainer.cond_drop_prob > 0"),
    (["train", "conditional=false", "guidance.scale=3"], r"needs a class-conditional model"),
    (["sample", "guidance.scale=-1"], r"guidance.scale must be a number ≥ 0, or auto; got -1"),
    (["sample", "num_samples=0"], r"num_samples must be an integer ≥ 1; got 0"),
    (["sample", "batch_size=-4"], r"batch_size must be an integer ≥ 1; got -4"),
    (["sample", "animation.format=avi"], r"animation.format must be one of gif, mp4; got avi"),
    (["sample", "sampler.steps=0"], r"sampler.steps must be an integer ≥ 1, or auto; got 0"),
    (["evaluate", "num_samples=1"], r"num_samples must be an integer ≥ 2; got 1"),
    (["train-vae", "loss.reconstruction=l3"], r"loss.reconstruction must be one of l1, l2; got l3"),
    (["train-vae", "trainer.lr=0"], r"trainer.lr must be a number > 0; got 0"),
]


def run_inprocess(argv: list[str]) -> tuple[int, str]:
    """`diffuse ARGV` in this process: (exit code, stderr)."""
    err = io.StringIO()
    code = 0
    with contextlib.redirect_stderr(err):
        try:
            main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return code, err.getvalue()


@pytest.mark.parametrize("argv,message", BAD, ids=[" ".join(a[1:])[-60:] for a, _ in BAD])
def test_bad_value_is_one_line_before_any_work(argv, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if argv[0] in ("train", "train-vae") and "logger=none" not in argv:
        argv = argv + ["logger=none"]
    code, err = run_inprocess(argv)
    assert code == 1, err[-2000:]
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and re.search(message, lines[0]), err[-2000:]
    assert "Traceback" not in err
    assert not list(tmp_path.rglob("*.ckpt")) and not list(tmp_path.rglob("metrics.jsonl"))  # nothing trained


def test_rules_render_what_is_allowed():
    assert Int(1).allowed() == "an integer ≥ 1"
    assert Float(0, 1, open_hi=True, nullable=True).allowed() == "a number in [0, 1), or null"
    assert Choice(1, 2, 3).allowed() == "1, 2 or 3"
    assert Rule("pair").allowed() == "two numbers [a, b] with a < b"
    assert not Int(1).ok(True) and not Int(1).ok(1.5) and Float(0).ok(3) and not Float(0).ok(float("nan"))
    assert Choice("auto", True).ok(True) and not Choice("auto", True).ok("true") and not Choice(1, 2).ok(True)


def test_guidance_needs_a_learned_null_class():
    check_guidance(0.0, False, 0.0, "r")  # off: fine whatever the model
    check_guidance(1.0, True, 0.0, "r")   # plain conditional: fine
    check_guidance(3.0, True, 0.1, "r")
    with pytest.raises(Exception, match="cond_drop_prob > 0"):
        check_guidance(3.0, True, 0.0, "r")


def test_guidance_on_the_sampler_points_to_the_guidance_node():
    cfg = compose_cfg("sample", ["++sampler.guidance_scale=3"])
    with pytest.raises(DiffuseError, match="is now guidance.scale"):
        validate(cfg, "sample")
    validate(compose_cfg("sample", ["guidance.scale=3", "++sampler.steps=5"]), "sample")

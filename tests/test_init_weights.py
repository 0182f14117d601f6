"""`init_from=PATH`: a new run from another run's weights (a checkpoint, a run folder or an export), with
mismatched layers named in one line, or skipped with init_skip_mismatched=true; not with resume."""

from __future__ import annotations

import re

import pytest
import torch

from diffuse.building import build
from diffuse.errors import DiffuseError
from diffuse.storage.checkpoint import load_checkpoint
from diffuse.storage.export import write_export
from diffuse.training.init_weights import load_initial_weights

from conftest import TINY, compose_cfg
from inproc_cli import one_error_line, run_inproc


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny conditional run (4 classes) and its export."""
    cwd = tmp_path_factory.mktemp("init")
    res = run_inproc(["train", *TINY, "trainer.max_steps=3"], cwd)
    assert res.returncode == 0, res.stderr[-3000:]
    (ckpt,) = (cwd / "outputs").glob("*/*/checkpoints/last.ckpt")
    state = load_checkpoint(ckpt)
    write_export(cwd / "exp", state)
    return cwd, ckpt, state


def _model(*overrides):
    return build(compose_cfg("train", TINY + list(overrides)).model, "model")


def test_ema_or_raw_weights_are_copied(source):
    _, ckpt, state = source
    for which, weights in (("ema", state["ema"]["model"]), ("raw", state["model"])):
        model = _model()
        report = load_initial_weights(model, ckpt.parent.parent, which)  # a run folder: its last.ckpt
        assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())
        assert (report["source"], report["weights"], report["step"], report["skipped"]) == ("checkpoint", which, 3, [])


def test_mismatched_layers_are_named_in_one_line_or_skipped(source):
    _, ckpt, state = source
    model = _model("dataset.num_classes=6")  # more classes: the class embedding grows from 4+1 to 6+1 rows
    key = next(k for k, v in model.state_dict().items() if v.shape[0] == 7)
    with pytest.raises(DiffuseError) as err:
        load_initial_weights(model, ckpt)
    line = str(err.value)
    assert "\n" not in line and f"{key} (saved [5, " in line and "vs model [7, " in line
    assert "init_skip_mismatched=true" in line
    fresh = model.state_dict()[key].clone()
    report = load_initial_weights(model, ckpt, skip_mismatched=True)
    assert report["skipped"] == [key]
    assert torch.equal(model.state_dict()[key], fresh)  # left as initialised
    loaded = {k: v for k, v in state["ema"]["model"].items() if k != key}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in loaded.items())


def test_many_mismatches_are_counted_and_nothing_matching_is_an_error(source, tmp_path):
    _, ckpt, _ = source
    with pytest.raises(DiffuseError, match=r"tensor\(s\) do not match the model: .* … and \d+ more; "
                                           r"init_skip_mismatched=true") as err:
        load_initial_weights(_model("model.channel_mult=[1,2,2]"), ckpt)
    assert str(err.value).count(" (saved ") + str(err.value).count(" (not in the ") == 8  # 8 named, the rest counted
    from safetensors.torch import save_file
    save_file({"other.weight": torch.zeros(3)}, tmp_path / "w.safetensors")
    with pytest.raises(DiffuseError, match="none of its 1 tensors matches the model UNet"):
        load_initial_weights(_model(), tmp_path / "w.safetensors", skip_mismatched=True)


def test_bad_paths_are_one_line(source, tmp_path):
    _, ckpt, _ = source
    with pytest.raises(DiffuseError, match="init_from=.*: not found"):
        load_initial_weights(_model(), tmp_path / "missing.ckpt")
    with pytest.raises(DiffuseError, match="holds neither checkpoints/last.ckpt"):
        load_initial_weights(_model(), tmp_path)
    (tmp_path / "junk.ckpt").write_text("junk")
    with pytest.raises(DiffuseError, match="init_from: cannot read checkpoint .* corrupt"):
        load_initial_weights(_model(), tmp_path / "junk.ckpt")
    with pytest.raises(DiffuseError, match="init_weights must be one of ema, raw"):
        load_initial_weights(_model(), ckpt, "best")


def test_train_init_from_starts_a_new_run_from_the_weights(source):
    cwd, ckpt, state = source
    before = set((cwd / "outputs").glob("*/*"))
    # a near-zero learning rate: after one step the weights are still the source's EMA weights
    res = run_inproc(["train", *TINY, f"init_from={ckpt}", "trainer.max_steps=1", "trainer.lr=1e-12"], cwd)
    assert res.returncode == 0, res.stderr[-3000:]
    assert re.search(r"init_from .*last\.ckpt \(step 3\): loaded \d+ tensors \(ema weights\)", res.stdout)
    (run,) = set((cwd / "outputs").glob("*/*")) - before
    new = load_checkpoint(run / "checkpoints" / "last.ckpt")
    assert new["step"] == 1  # step, optimizer, EMA: fresh
    assert len(new["optimizer"]["state"]) and all(s["step"] == 1 for s in new["optimizer"]["state"].values())
    for k, v in state["ema"]["model"].items():
        torch.testing.assert_close(new["model"][k], v, atol=1e-8, rtol=0)
        torch.testing.assert_close(new["ema"]["model"][k], v, atol=1e-8, rtol=0)  # the EMA starts from them
    assert new["config"]["init_from"] is None  # so that resuming continues this run
    assert new["config"]["initialized_from"]["path"] == str(ckpt.resolve())
    # … which resumes as any run does
    res = run_inproc(["train", f"resume={run}", "trainer.max_steps=2"], cwd)
    assert res.returncode == 0, res.stderr[-3000:]
    assert load_checkpoint(run / "checkpoints" / "last.ckpt")["step"] == 2


def test_train_init_from_an_export_with_other_classes(source):
    """A new dataset with 3 classes from a 4-class run: the class embedding (5 rows vs 4) is the mismatch."""
    cwd, _, state = source
    res = run_inproc(["train", *TINY, f"init_from={cwd / 'exp'}", "dataset.num_classes=3", "trainer.max_steps=1"], cwd)
    line = one_error_line(res, "train")
    assert "tensor(s) do not match the model" in line and "init_skip_mismatched=true" in line
    res = run_inproc(["train", *TINY, f"init_from={cwd / 'exp'}", "dataset.num_classes=3", "trainer.max_steps=1",
                      "init_skip_mismatched=true"], cwd)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "1 mismatched tensor(s) left as initialised" in res.stdout


@pytest.mark.parametrize("args,message", [
    (["init_from=x", "resume=auto"], "init_from=x starts a new run from another run's weights, resume=auto"),
    (["init_weights=best", "init_from=x"], "init_weights must be one of ema, raw; got best"),
    (["init_from=nowhere.ckpt"], "init_from=nowhere.ckpt: not found"),
])
def test_train_init_errors_are_one_line(source, args, message):
    cwd, _, _ = source
    line = one_error_line(run_inproc(["train", *TINY, *args], cwd), "train")
    assert message in line, line


def test_init_from_with_resume_self_or_in_a_resumed_run_is_no_conflict():
    from omegaconf import OmegaConf

    from diffuse.validation import validate

    validate(OmegaConf.create({"init_from": "a.ckpt", "resume": "self"}), "train")  # a requeued job's first start
    validate(OmegaConf.create({"init_from": "a.ckpt", "resume": "/r/checkpoints/last.ckpt",  # its restart, merged
                               "initialized_from": {"path": "/a.ckpt"}}), "train")
    with pytest.raises(DiffuseError, match="give one of them"):
        validate(OmegaConf.create({"init_from": "a.ckpt", "resume": "/r/checkpoints/last.ckpt"}), "train")

"""`diffuse export`: a checkpoint's weights as model.safetensors + config.json, loadable with safetensors and
the model class alone; `diffuse sample/evaluate checkpoint=FOLDER` take the folder, whose config.json is
untrusted input exactly like a checkpoint's stored config."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from diffuse.jobs import train as train_job
from diffuse.jobs import train_vae as train_vae_job
from diffuse.jobs.common import load_run
from diffuse.storage.checkpoint import load_checkpoint

from conftest import TINY, compose_cfg, run_cli
from inproc_cli import one_error_line, run_inproc

SAMPLE = ["sampler.steps=3", "num_samples=8", "device=cpu"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny conditional run, exported (EMA) by the CLI."""
    cwd = tmp_path_factory.mktemp("export")
    res = run_inproc(["train", *TINY, "trainer.max_steps=3"], cwd)
    assert res.returncode == 0, res.stderr[-3000:]
    (ckpt,) = (cwd / "outputs").glob("*/*/checkpoints/last.ckpt")
    res = run_inproc(["export", f"out={cwd / 'exp'}"], cwd)  # no checkpoint=: the newest run's
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"export: {cwd / 'exp'}" in res.stdout
    return cwd, ckpt, cwd / "exp"


def test_export_loads_with_safetensors_and_the_model_class_alone(exported):
    _, ckpt, folder = exported
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "README.md"} <= names <= {"config.json", "model.safetensors",
                                                                         "README.md", "samples.png"}
    card = (folder / "README.md").read_text()  # the model card: what it is, how to load it
    assert "step 3" in card and "diffuse sample checkpoint=FOLDER" in card and "LinearSchedule" in card
    # the README's snippet: no diffuse checkpoint code involved
    from diffuse.models.unet import UNet
    cfg = json.loads((folder / "config.json").read_text())
    model = UNet(**{k: v for k, v in cfg["model"].items() if k != "_target_"}).eval()
    model.load_state_dict(load_file(folder / "model.safetensors"))
    state = load_checkpoint(ckpt)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state["ema"]["model"][name]), name
    assert (cfg["format"], cfg["version"], cfg["kind"], cfg["weights"], cfg["step"]) == \
        ("diffuse-export", 1, "diffusion", "ema", 3)
    assert cfg["data_shape"] == [1, 8, 8] and cfg["dim"] == 2 and cfg["conditional"] is True
    assert cfg["class_names"] == ["ball", "box", "diamond", "cross"] and cfg["cond_drop_prob"] == 0.1
    assert cfg["schedule"]["_target_"] == "diffuse.diffusion.schedules.LinearSchedule"
    assert cfg["sampler"]["_target_"].endswith(".DPMSolverPP") and cfg["sampler"]["steps"] == 10  # the run's (default)
    assert cfg["guidance"] == {"scale": 1.1}  # auto, resolved: the run learned a null class (steps=auto: 10 guided)
    assert cfg["objective"]["prediction"] == "v" and cfg["vae"] is None  # the run's (the default objective)
    out = model(torch.zeros(2, *cfg["data_shape"]), torch.full((2,), 0.5), torch.tensor([0, 3]))
    assert out.shape == (2, 1, 8, 8)


def test_export_raw_weights(exported, tmp_path):
    cwd, ckpt, _ = exported
    res = run_inproc(["export", f"checkpoint={ckpt.parent.parent}", f"out={tmp_path}", "use_ema=false"], cwd)
    assert res.returncode == 0, res.stderr[-3000:]
    raw = load_file(tmp_path / "model.safetensors")
    state = load_checkpoint(ckpt)
    assert all(torch.equal(raw[k], v) for k, v in state["model"].items())
    assert json.loads((tmp_path / "config.json").read_text())["weights"] == "raw"


def test_sample_and_evaluate_take_the_export(exported):
    cwd, ckpt, folder = exported
    xs = []
    for spec in (ckpt, folder, folder / "model.safetensors"):
        res = run_inproc(["sample", f"checkpoint={spec}", *SAMPLE], cwd)
        assert res.returncode == 0, res.stderr[-3000:]
        data = np.load(re.search(r"^samples: (.+)$", res.stdout, re.M).group(1))
        xs.append(data["x"])
        assert data["y"].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    np.testing.assert_array_equal(xs[0], xs[1])  # the same weights, the same samples
    np.testing.assert_array_equal(xs[1], xs[2])
    res = run_inproc(["evaluate", f"checkpoint={folder}", "num_samples=8", "sampler.steps=2", "device=cpu"], cwd)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(open(re.search(r"^metrics: (.+)$", res.stdout, re.M).group(1)).read())["fd"] > 0


def _tamper(folder, dest, edit):
    shutil.copytree(folder, dest)
    cfg = json.loads((dest / "config.json").read_text())
    edit(cfg)
    (dest / "config.json").write_text(json.dumps(cfg))
    return dest


@pytest.mark.slow
def test_a_tampered_config_json_builds_nothing(exported, tmp_path):
    """Through a real process: the one line, no traceback, and the named callable never called."""
    cwd, _, folder = exported
    marker = tmp_path / "pwned"
    evil = _tamper(folder, tmp_path / "evil", lambda c: c.update(model={"_target_": "pathlib.Path.touch",
                                                                        "self": str(marker)}))
    proc = run_cli(["sample", f"checkpoint={evil}", "device=cpu"], cwd)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "refusing to build model._target_='pathlib.Path.touch'" in proc.stderr
    assert not marker.exists()


@pytest.mark.parametrize("case,message", [
    ("interpolation", "a stored config holds no interpolations"),
    ("vae_target", "refusing to build vae.config._target_='os.system'"),
    ("not_json", "config.json: Expecting"),
    ("no_marker", "is not a diffuse export (no \"format\": \"diffuse-export\")"),
    ("version", "has export version 99; this diffuse reads ≤ 1"),
    ("corrupt_weights", "model.safetensors: not a safetensors file"),
    ("other_weights", "model.safetensors does not match its config.json's model"),
    ("missing_model", "lacks model: not a complete diffuse export"),
])
def test_bad_exports_are_one_line(exported, tmp_path, case, message):
    cwd, _, folder = exported
    bad = tmp_path / "bad"
    edits = {
        "interpolation": lambda c: c["schedule"].update(beta_end="${oc.env:HOME}"),
        "vae_target": lambda c: c.update(vae={"config": {"_target_": "os.system", "command": "true"}}),
        "no_marker": lambda c: c.pop("format"),
        "version": lambda c: c.update(version=99),
        "missing_model": lambda c: c.update(model=None),
    }
    _tamper(folder, bad, edits.get(case, lambda c: None))
    if case == "not_json":
        (bad / "config.json").write_text("{oops")
    elif case == "corrupt_weights":
        (bad / "model.safetensors").write_bytes(b"\x00" * 64)
    elif case == "other_weights":
        save_file({"conv.weight": torch.zeros(2, 2)}, bad / "model.safetensors")
    line = one_error_line(run_inproc(["sample", f"checkpoint={bad}", *SAMPLE], cwd), "sample")
    assert message in line, line


def test_export_errors_are_one_line(exported, tmp_path):
    cwd, ckpt, folder = exported
    line = one_error_line(run_inproc(["export", f"checkpoint={tmp_path / 'none.ckpt'}"], cwd), "export")
    assert "checkpoint not found" in line
    line = one_error_line(run_inproc(["export", f"checkpoint={folder}"], cwd), "export")
    assert "is already a `diffuse export` folder" in line
    line = one_error_line(run_inproc(["train", *TINY, f"resume={folder}"], cwd), "train")
    assert "is a `diffuse export` folder (weights only): it cannot be resumed" in line and "init_from=" in line
    line = one_error_line(run_inproc(["sample", f"checkpoint={tmp_path}"], cwd), "sample")
    assert "nor config.json + model.safetensors" in line


def test_a_latent_run_exports_its_vae_and_samples_from_the_folder(tmp_path):
    data = ["dataset.resolution=8", "dataset.size=64", "logger=none", "device=cpu", "trainer.log_every=1",
            "trainer.sample_every=0"]
    train_vae_job.run(compose_cfg("train_vae", data + ["vae.channels=8", "vae.channel_mult=[1,2]",
                                                        "trainer.max_steps=2", "trainer.batch_size=8",
                                                        "scale_batches=2"]), tmp_path / "vae", [])
    cfg = compose_cfg("train", data + [f"latent.vae={tmp_path / 'vae/checkpoints/last.ckpt'}",
                                       "model.base_channels=8", "model.channel_mult=[1]", "model.time_emb_dim=8",
                                       "trainer.batch_size=8", "trainer.max_steps=2"])
    train_job.run(cfg, tmp_path / "ldm", [])
    res = run_inproc(["export", f"checkpoint={tmp_path / 'ldm'}", f"out={tmp_path / 'exp'}"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    meta = json.loads((tmp_path / "exp" / "config.json").read_text())
    assert meta["files"]["vae"] == "vae.safetensors" and meta["vae"]["config"]["_target_"].endswith("VAE")
    state = load_checkpoint(tmp_path / "ldm/checkpoints/last.ckpt")
    vae = load_file(tmp_path / "exp" / "vae.safetensors")
    assert all(torch.equal(vae[k], v) for k, v in state["latent_vae"]["weights"].items())
    res = run_inproc(["sample", f"checkpoint={tmp_path / 'exp'}", *SAMPLE], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    x = np.load(re.search(r"^samples: (.+)$", res.stdout, re.M).group(1))["x"]
    assert x.shape == (8, 1, 8, 8)  # decoded to data space by the exported VAE (latents are 4×4)
    run = load_run(str(tmp_path / "exp"), torch.device("cpu"))
    assert run.state["latent_vae"]["config"] == meta["vae"]["config"] and run.step == 2

"""A checkpoint is untrusted input: its stored config may build only our own part classes, at every entry
point (sample, evaluate, train resume=…, train latent.vae=…), and a file of the wrong kind is one line."""

from __future__ import annotations

import collections

import pytest
import torch

from diffuse.building import check_targets
from diffuse.errors import DiffuseError
from diffuse.jobs import train as train_job
from diffuse.storage.checkpoint import load_checkpoint, save_checkpoint

from conftest import TINY, compose_cfg, run_cli


@pytest.fixture(scope="module")
def real_checkpoint(tmp_path_factory):
    """A genuine tiny diffusion checkpoint to tamper with."""
    root = tmp_path_factory.mktemp("trust")
    train_job.run(compose_cfg("train", TINY + ["trainer.max_steps=2"]), root / "run", [])
    return root / "run" / "checkpoints" / "last.ckpt"


def _tampered(real: str, out, marker, where: str = "model", target: str = "pathlib.Path.touch", kind=None):
    state = load_checkpoint(real)
    node = {"_target_": target, "self": str(marker)}
    if where == "latent_vae":
        state["latent_vae"] = {"path": "x", "step": 1, "config": node, "weights": {}}
    else:
        state["config"][where] = node
    if kind:
        state["kind"] = kind
    save_checkpoint({k: v for k, v in state.items() if k not in ("format", "version")}, out)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("job", ["sample", "evaluate", "resume", "latent"])
def test_no_entry_point_calls_what_a_checkpoint_names(real_checkpoint, tmp_path, job):
    marker = tmp_path / "pwned"
    if job == "latent":  # a VAE checkpoint whose VAE config names the callable
        evil = _tampered(real_checkpoint, tmp_path / "evil.ckpt", marker, where="vae", kind="vae")
        args = ["train", *TINY, f"latent.vae={evil}"]
        key = "vae._target_"
    else:
        evil = _tampered(real_checkpoint, tmp_path / "evil.ckpt", marker)
        args = {"sample": ["sample", f"checkpoint={evil}", "device=cpu"],
                "evaluate": ["evaluate", f"checkpoint={evil}", "device=cpu", "num_samples=4"],
                "resume": ["train", *TINY, f"resume={evil}", "trainer.max_steps=4"]}[job]
        key = "model._target_"
    proc = run_cli(args, tmp_path)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert f"refusing to build {key}='pathlib.Path.touch'" in proc.stderr and "Traceback" not in proc.stderr
    assert not marker.exists()  # the callable was never called


@pytest.mark.parametrize("where,target", [
    ("model", "diffuse.storage.checkpoint.os.remove"),    # an attribute path through an imported module
    ("model", "diffuse.jobs.common.Tracker"),               # our class, but not a part: it writes files
    ("model", "diffuse.models.unet.torch.save"),            # a callable re-exported into a model module
    ("schedule", "builtins.exec"),
    ("latent_vae", "os.system"),                             # the VAE record a latent checkpoint embeds
])
def test_only_part_classes_pass(real_checkpoint, tmp_path, where, target):
    marker = tmp_path / "pwned"
    evil = _tampered(real_checkpoint, tmp_path / "evil.ckpt", marker, where=where, target=target)
    with pytest.raises(DiffuseError, match="refusing to build"):
        load_checkpoint(evil)
    assert not marker.exists()


@pytest.mark.parametrize("where", ["model.norm", "logger.name", "schedule"])
def test_interpolations_in_a_stored_config_are_refused(real_checkpoint, tmp_path, where):
    """The tool stores configs escaped: a live `${…}` in a file was put there by someone else."""
    state = load_checkpoint(real_checkpoint)
    group, _, key = where.partition(".")
    payload = "${oc.create:{_target_: os.system, command: touch x}}"
    if key:
        state["config"][group][key] = payload
    else:
        state["config"][group] = payload
    save_checkpoint({k: v for k, v in state.items() if k not in ("format", "version")}, tmp_path / "e.ckpt")
    with pytest.raises(DiffuseError, match="holds no interpolations|must be a mapping"):
        load_checkpoint(tmp_path / "e.ckpt")


def test_genuine_targets_pass_and_allow_targets_extends_the_list(real_checkpoint):
    load_checkpoint(real_checkpoint)  # a real checkpoint is accepted
    node = {"model": {"_target_": "collections.OrderedDict"}}
    with pytest.raises(DiffuseError, match="allow its package with allow_targets"):
        check_targets(node, "f")
    check_targets(node, "f", allow=["collections."])
    assert collections.OrderedDict.__module__ == "collections"


@pytest.mark.slow
def test_wrong_kind_is_one_line(real_checkpoint, tmp_path):
    """A diffusion checkpoint as latent.vae, a VAE checkpoint to `sample`."""
    vae = tmp_path / "vae.ckpt"
    state = load_checkpoint(real_checkpoint)
    state["kind"] = "vae"
    save_checkpoint({k: v for k, v in state.items() if k not in ("format", "version")}, vae)
    proc = run_cli(["sample", f"checkpoint={vae}", "device=cpu"], tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "is a VAE (`diffuse train-vae`) checkpoint, but this needs a diffusion model" in proc.stderr
    proc = run_cli(["train", *TINY, f"latent.vae={real_checkpoint}"], tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "latent.vae: " in proc.stderr and "is a diffusion model (`diffuse train`) checkpoint, but this needs a VAE" \
        in proc.stderr
    assert torch.load(real_checkpoint, weights_only=True)["step"] == 2  # untouched

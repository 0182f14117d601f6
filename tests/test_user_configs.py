"""A project of the user's own: configs in ./conf (searched before the packaged ones, no flag) and a model
class of their own package, which trains, samples and animates; its checkpoints build it only where the user
allows that package (allow_targets=[mypkg.]): by default a checkpoint builds only diffuse's part classes."""

from __future__ import annotations

import re
import sys

import numpy as np
import pytest

from diffuse.building import check_targets
from diffuse.errors import DiffuseError

from conftest import run_cli
from inproc_cli import one_error_line, run_inproc

MYPKG = '''
"""A model of the user's own: any nn.Module taking (x, t, y); num_classes / null_class are optional."""
import os
from pathlib import Path

import torch
from torch import nn

Path(os.environ["MYPKG_MARKER"]).write_text("imported")  # what the tests check: was this package imported?


class MyNet(nn.Module):
    def __init__(self, dim: int, channels: int, hidden: int = 8, num_classes: int = 0):
        super().__init__()
        assert dim == 2
        self.num_classes = num_classes
        self.null_class = num_classes if num_classes else None
        self.inp = nn.Conv2d(channels, hidden, 3, padding=1)
        self.time = nn.Linear(1, hidden)
        self.label = nn.Embedding(num_classes + 1, hidden) if num_classes else None
        self.out = nn.Conv2d(hidden, channels, 3, padding=1)

    def forward(self, x, t, y=None):
        h = self.inp(x) + self.time(t.float().view(-1, 1))[:, :, None, None]
        if self.label is not None and y is not None:
            h = h + self.label(y)[:, :, None, None]
        return self.out(torch.nn.functional.silu(h))
'''

MYNET_YAML = """\
_target_: mypkg.MyNet
dim: ${dim}
channels: ${dataset.channels}   # an int where diffuse's own models take a list: a class of yours means its own
hidden: 8
num_classes: ${if:${conditional},${dataset.num_classes},0}
"""

MINE_YAML = """\
# @package _global_
defaults:
  - override /model: mynet
dataset:
  resolution: 8
  size: 64
trainer:
  max_steps: 3
  batch_size: 4
  log_every: 1
  sample_every: 0
logger:
  mode: disabled
device: cpu
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """proj/conf/{model/mynet.yaml, experiment/mine.yaml}, and lib/mypkg on PYTHONPATH, as a user has them."""
    root = tmp_path_factory.mktemp("user")
    (root / "lib" / "mypkg").mkdir(parents=True)
    (root / "lib" / "mypkg" / "__init__.py").write_text(MYPKG)
    proj = root / "proj"
    (proj / "conf" / "model").mkdir(parents=True)
    (proj / "conf" / "experiment").mkdir()
    (proj / "conf" / "model" / "mynet.yaml").write_text(MYNET_YAML)
    (proj / "conf" / "experiment" / "mine.yaml").write_text(MINE_YAML)
    marker = root / "imported"
    env = {"PYTHONPATH": str(root / "lib"), "MYPKG_MARKER": str(marker)}
    proc = run_cli(["train", "experiment=mine"], proj, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    (ckpt,) = (proj / "outputs").glob("*/*/checkpoints/last.ckpt")
    assert marker.read_text() == "imported"
    return proj, ckpt, env, marker


@pytest.mark.slow
def test_a_checkpoint_of_a_user_model_builds_it_only_where_allowed(project, monkeypatch):
    proj, ckpt, env, marker = project
    marker.unlink()
    proc = run_cli(["sample", "sampler.steps=2", "num_samples=4"], proj, env=env)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("diffuse sample: error: ")]
    assert "refusing to build model._target_='mypkg.MyNet'" in line and "allow_targets=[yourpkg.]" in line
    assert not marker.exists()  # refused before mypkg was even imported (importing a module runs its code)
    # allowed: sample and animate (in this process, mypkg importable as PYTHONPATH made it above)
    monkeypatch.syspath_prepend(env["PYTHONPATH"])
    monkeypatch.setenv("MYPKG_MARKER", env["MYPKG_MARKER"])
    try:
        res = run_inproc(["sample", "allow_targets=[mypkg.]", "sampler.steps=2", "num_samples=4", "device=cpu"],
                         proj)
        assert res.returncode == 0, res.stderr[-3000:]
        x = np.load(re.search(r"^samples: (.+)$", res.stdout, re.M).group(1))["x"]
        assert x.shape == (4, 1, 8, 8) and marker.exists()
        res = run_inproc(["animate", "allow_targets=[mypkg.]", "sampler.steps=3", "num_samples=4",
                          "animation.frames=3", "device=cpu"], proj)
        assert res.returncode == 0, res.stderr[-3000:]
        assert {"animation", "steps", "sample", "grid"} <= set(re.findall(r"^(\w+): ", res.stdout, re.M))
    finally:
        sys.modules.pop("mypkg", None)  # other tests see a process where mypkg was never importable


@pytest.mark.slow
def test_project_configs_come_first_and_config_dir_still_works(project, tmp_path):
    proj, _, _, _ = project
    res = run_inproc(["train", "--help"], proj)
    assert re.search(r"model: .*mynet", res.stdout) and re.search(r"experiment: .*mine", res.stdout)
    (proj / "conf" / "model" / "unet.yaml").write_text("_target_: diffuse.models.unet.UNet\nbase_channels: 12\n")
    try:
        res = run_inproc(["train", "--cfg", "job"], proj)  # ./conf/model/unet.yaml wins over the packaged one
        assert "base_channels: 12" in res.stdout and "channel_mult" not in res.stdout
    finally:
        (proj / "conf" / "model" / "unet.yaml").unlink()
    extra = tmp_path / "more"
    (extra / "model").mkdir(parents=True)
    (extra / "model" / "other.yaml").write_text("_target_: diffuse.models.unet.UNet\nbase_channels: 5\n")
    res = run_inproc(["train", "model=other", "--config-dir", str(extra), "--cfg", "job"], proj)
    assert res.returncode == 0 and "base_channels: 5" in res.stdout, res.stderr[-2000:]
    res = run_inproc(["train", "--cfg", "job", "--resolve"], tmp_path)  # no ./conf: the packaged configs alone
    assert "base_channels: 32" in res.stdout


@pytest.mark.slow
def test_a_user_model_that_cannot_be_imported_is_one_line(project):
    proj, _, _, _ = project  # this process has no PYTHONPATH to mypkg
    line = one_error_line(run_inproc(["train", "experiment=mine"], proj), "train")
    assert "cannot build model: No module named 'mypkg' (_target_: mypkg.MyNet: install its package, or put" \
        in line and "PYTHONPATH" in line, line


def test_allow_targets_prefixes():
    node = {"model": {"_target_": "pathlib.PurePath"}}
    with pytest.raises(DiffuseError, match="refusing to build model._target_='pathlib.PurePath'"):
        check_targets(node, "f", allow="mypkg.")  # one prefix, not its letters m, y, p, …
    with pytest.raises(DiffuseError, match="name a class by its defining module, e.g. mypkg.net.MyNet"):
        check_targets({"model": {"_target_": "json.JSONDecoder"}}, "f", allow=["json."])  # defined in json.decoder
    check_targets({"model": {"_target_": "json.decoder.JSONDecoder"}}, "f", allow=["json."])

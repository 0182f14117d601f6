"""Parts declare their own config rules (diffuse/rules.py): validation checks a part's node against the class its
`_target_` names, refuses a key its constructor does not take, and no rule table elsewhere lists the parts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

import diffuse
from diffuse.diffusion.samplers import DDIM, DPMSolverPP, EulerAncestral, Sampler
from diffuse.errors import DiffuseError
from diffuse.jobs.sampling_setup import resolved_sampler
from diffuse.models.msnat import MSNATUNet
from diffuse.models.shufflenet import ShuffleNetUNet
from diffuse.rules import accepted_keys, declared_rules
from diffuse.validation import validate

from conftest import compose_cfg

CONF = Path(diffuse.__file__).parent / "conf"
PART_GROUPS = ("model", "schedule", "dataset", "sampler")


def choices(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml") if not p.stem.startswith("_"))


def test_rules_merge_along_the_bases_and_keys_follow_the_constructors():
    rules = declared_rules(DDIM)
    assert {"steps", "spacing", "clip_x0", "clip_range", "dynamic_threshold", "eta"} <= set(rules)
    assert "eta" not in declared_rules(Sampler) and "eta" not in declared_rules(DPMSolverPP)
    assert accepted_keys(DDIM) == {"steps", "spacing", "eta", "clip_x0", "clip_range", "dynamic_threshold"}
    assert accepted_keys(EulerAncestral) >= {"eta", "s_noise", "clip_x0"}
    assert {"levels", "attention", "dim", "num_classes"} <= accepted_keys(MSNATUNet)
    assert declared_rules(ShuffleNetUNet)["norm"].ok("batch") and not declared_rules(ShuffleNetUNet)["norm"].ok("layer")


@pytest.fixture
def image_folder(tmp_path):
    for i in range(2):
        Image.fromarray((np.random.default_rng(i).random((8, 8, 3)) * 255).astype(np.uint8)).save(
            tmp_path / f"{i}.png")
    return tmp_path


@pytest.mark.parametrize("group", PART_GROUPS)
def test_every_choice_of_every_group_passes_its_own_rules(group, image_folder):
    """Every key each YAML sets is one its class takes and within its rule (the shipped defaults are valid)."""
    for name in choices(group):
        extra = ["conditional=false", f"dataset.path={image_folder}"] if name == "folder" else []
        cfg = compose_cfg("train", [f"{group}={name}", *extra])
        validate(cfg, "train")


@pytest.mark.parametrize("argv, message", [
    (["+sampler.etta=1", "sampler=ddim"], r"sampler.etta is not a setting of DDIM: it takes clip_range, clip_x0, "),
    (["+model.widht=3"], r"model.widht is not a setting of UNet"),
    (["+schedule.beta_mid=0.1"], r"schedule.beta_mid is not a setting of LinearSchedule"),
    (["sampler=euler_ancestral", "sampler.eta=2"], r"sampler.eta must be a number in \[0, 1\]; got 2"),
    (["model=shufflenet", "model.norm=layer"], r"model.norm must be one of group, batch; got layer"),
    (["model=msnat", "model.mlp_ratio=0"], r"model.mlp_ratio must be a number > 0; got 0"),
])
def test_a_parts_own_rules_and_keys(argv, message):
    import re
    with pytest.raises(DiffuseError) as err:
        validate(compose_cfg("train", argv), "train")
    assert re.search(message, str(err.value)), str(err.value)


def test_values_over_the_runs_own_sampler_are_checked_against_its_class():
    """`diffuse sample sampler.eta=…` has no _target_ until the run's own sampler is read: the merged node is
    then checked against that class."""
    run = OmegaConf.create({"sampler": {"_target_": "diffuse.diffusion.samplers.DDIM", "steps": 5, "eta": 0.0}})
    assert resolved_sampler(run, OmegaConf.create({"eta": 0.5})).eta == 0.5
    with pytest.raises(DiffuseError, match="sampler.eta must be a number in"):
        resolved_sampler(run, OmegaConf.create({"eta": 3}))
    with pytest.raises(DiffuseError, match="sampler.s_churn is not a setting of DDIM"):
        resolved_sampler(run, OmegaConf.create({"s_churn": 1.0}))


def test_group_base_files_are_not_choices():
    """`_common.yaml` holds what a group's members share; the members pull it in, and it is no choice."""
    for group in ("model", "sampler", "dataset"):
        assert (CONF / group / "_common.yaml").is_file()
        assert "_common" not in choices(group)
        for name in choices(group):
            defaults = OmegaConf.load(CONF / group / f"{name}.yaml").get("defaults", [])
            assert "_common" in defaults, f"{group}/{name}.yaml does not pull in _common"

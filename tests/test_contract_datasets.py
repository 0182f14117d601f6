"""The dataset contract, run on every conf/dataset/*.yaml (no list of datasets here: a new dataset is tested by
adding its YAML), on the tiny copy of its files its class writes (`write_example`; procedural data needs none).
Each dataset, as `diffuse train dataset=NAME` builds it, says what an item is (dim, resolution, channels,
num_classes, class names), gives get_batch(indices, generator) → x [B, C, *spatial] float32 in [−1, 1] and
y [B] int64 in 0…num_classes−1 (zeros when unlabelled), the same batch for the same indices and generator, and
answers for its held-out items: items training never sees, or None when it declares no splits."""

from __future__ import annotations

import hashlib

import pytest
import torch

from diffuse.building import part_class
from diffuse.jobs.common import build_dataset

from conftest import compose_cfg, conf_choices

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest's

SMALL = {"size": 64}  # keys that make a dataset small where it has them (shapes draws `size` items)


def _config(name: str, root):
    cls = part_class(compose_cfg("train", [f"dataset={name}"]).dataset._target_)
    keys = {**cls.write_example(root), **{k: v for k, v in SMALL.items() if k in cls.config_rules}}
    return compose_cfg("train", [f"dataset={name}", *[f"dataset.{k}={v}" for k, v in keys.items()]])


def _fingerprints(dataset) -> set[str]:
    x, _ = dataset.get_batch(torch.arange(len(dataset)), torch.Generator().manual_seed(0))
    return {hashlib.sha256(item.numpy().tobytes()).hexdigest() for item in x}


@pytest.mark.parametrize("name", conf_choices("dataset"))
def test_dataset_contract(name, tmp_path):
    cfg = _config(name, tmp_path)
    dataset = build_dataset(cfg)
    assert (dataset.dim, dataset.resolution, dataset.channels) == (cfg.dim, cfg.dataset.resolution,
                                                                    cfg.dataset.channels)
    assert len(dataset) > 0
    classes = int(dataset.num_classes or 0)
    names = getattr(dataset, "class_names", None)
    assert names is None or len(names) == classes

    indices = torch.arange(min(len(dataset), 6)).flip(0)
    x, y = dataset.get_batch(indices, torch.Generator().manual_seed(3))
    assert x.shape == (len(indices), dataset.channels, *[dataset.resolution] * dataset.dim)
    assert x.dtype == torch.float32 and torch.isfinite(x).all()
    assert x.min() >= -1 and x.max() <= 1 and x.std() > 0
    assert y.shape == (len(indices),) and y.dtype == torch.int64
    assert ((0 <= y) & (y < max(classes, 1))).all()
    if classes == 0:
        assert (y == 0).all()
    again = dataset.get_batch(indices, torch.Generator().manual_seed(3))
    assert torch.equal(again[0], x) and torch.equal(again[1], y)  # same indices and generator: same batch
    one, _ = dataset.get_batch(indices[:1], torch.Generator().manual_seed(3))
    assert one.shape[0] == 1

    heldout = dataset.heldout(4)
    if not type(dataset).splits and heldout is None:  # one set of files (a folder): the jobs say so
        return
    assert heldout is not None, f"dataset {name} declares splits {type(dataset).splits} but no held-out items"
    assert (heldout.dim, heldout.resolution, heldout.channels) == (dataset.dim, dataset.resolution, dataset.channels)
    assert heldout.num_classes == dataset.num_classes and len(heldout) > 0
    hx, hy = heldout.get_batch(torch.arange(min(len(heldout), 4)), torch.Generator().manual_seed(0))
    assert hx.shape[1:] == x.shape[1:] and ((0 <= hy) & (hy < max(classes, 1))).all()
    assert not _fingerprints(heldout) & _fingerprints(dataset), "held-out items that training also draws"

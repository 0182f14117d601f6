"""`dataset=cifar10` on a tiny folder in torchvision's format (written here: a few images per batch file).

Checked against torchvision's own CIFAR10 reading of the same files, plus the failure paths: missing files,
an offline download, and a tampered pickle, which must be refused without running anything.
"""

from __future__ import annotations

import os
import pickle
import socket

import numpy as np
import pytest
import torch
import torchvision
from omegaconf import OmegaConf

from diffuse.data.vision import LUMA, CIFAR10Dataset
from diffuse.errors import DiffuseError

from conftest import compose_cfg

TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _batch(n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)  # rows: the R, G, B planes, 32×32 each
    return {"batch_label": f"batch {seed}", "labels": rng.integers(0, 10, n).tolist(), "data": data,
            "filenames": [f"img_{seed}_{i}.png" for i in range(n)]}


def _write(path, obj, py2_names: bool = False) -> None:
    blob = pickle.dumps(obj, protocol=2)
    if py2_names:  # the original files name numpy's module as numpy 1 did
        blob = blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    path.write_bytes(blob)


@pytest.fixture
def tiny_cifar(tmp_path):
    """2 images in each of the 5 train batches (the first written with numpy 1's module names), 3 in test."""
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    for i, name in enumerate(TRAIN_FILES):
        _write(base / name, _batch(2, i), py2_names=i == 0)
    _write(base / "test_batch", _batch(3, 99))
    _write(base / "batches.meta", {"label_names": NAMES, "num_cases_per_batch": 2, "num_vis": 3072})
    return tmp_path


class _CIFAR10NoMD5(torchvision.datasets.CIFAR10):
    """torchvision's reader, with its MD5 check off: the reference for a hand-made folder."""

    def _check_integrity(self) -> bool:
        return True

    def _load_meta(self) -> None:  # torchvision's, less its MD5 check (our own file: plain pickle is fine here)
        with open(os.path.join(self.root, self.base_folder, self.meta["filename"]), "rb") as f:
            self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]


def test_matches_torchvision_reading(tiny_cifar):
    with pytest.raises(RuntimeError, match="not found or corrupted"):  # why CIFAR10Dataset skips the MD5s
        torchvision.datasets.CIFAR10(str(tiny_cifar), train=True)
    for split, n in (("train", 10), ("test", 3)):
        ds = CIFAR10Dataset(root=tiny_cifar, split=split)
        ref = _CIFAR10NoMD5(str(tiny_cifar), train=split == "train")
        assert len(ds) == n and (ds.dim, ds.resolution, ds.channels, ds.num_classes) == (2, 32, 3, 10)
        assert ds.class_names == tuple(ref.classes) == tuple(NAMES) and ds.hflip == (split == "train")
        ds.hflip = False
        x, y = ds.get_batch(torch.arange(n))
        expected = torch.from_numpy(ref.data).permute(0, 3, 1, 2).float() / 127.5 - 1  # HWC → CHW
        assert x.shape == (n, 3, 32, 32) and torch.equal(x, expected)
        assert y.tolist() == ref.targets


def test_flips_resolution_and_grey(tiny_cifar):
    ds = CIFAR10Dataset(root=tiny_cifar)  # train: flips on by default
    plain = CIFAR10Dataset(root=tiny_cifar, hflip=False)
    idx = torch.arange(10)
    a, _ = ds.get_batch(idx, torch.Generator().manual_seed(2))
    drawn = torch.rand(10, generator=torch.Generator().manual_seed(2)) < 0.5
    ref, _ = plain.get_batch(idx)
    assert 0 < drawn.sum() < 10
    assert all(torch.equal(a[i], ref[i].flip(-1) if drawn[i] else ref[i]) for i in range(10))
    rgb = CIFAR10Dataset(root=tiny_cifar, split="test").images.float()
    small = CIFAR10Dataset(root=tiny_cifar, split="test", resolution=16)  # resized once: antialiased bilinear
    expected = torch.nn.functional.interpolate(rgb, size=(16, 16), mode="bilinear", antialias=True,
                                               align_corners=False).round()
    assert small.images.shape == (3, 3, 16, 16) and torch.equal(small.images.float(), expected)
    grey = CIFAR10Dataset(root=tiny_cifar, split="test", channels=1)
    luma = (rgb * torch.tensor(LUMA).view(1, 3, 1, 1)).sum(1, keepdim=True).round()
    assert grey.images.shape == (3, 1, 32, 32) and torch.equal(grey.images.float(), luma)
    three = CIFAR10Dataset(root=tiny_cifar, num_classes=3)
    assert three.class_names == ("airplane", "automobile", "bird") and three.labels.lt(3).all()


def test_missing_files_one_line_without_network(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the network was touched")

    monkeypatch.setattr(socket, "create_connection", refuse)
    with pytest.raises(DiffuseError) as e:
        CIFAR10Dataset(root=tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / "cifar-10-batches-py") in msg and "dataset.download=true" in msg
    assert all(f in msg for f in [*TRAIN_FILES, "test_batch", "batches.meta"])


def test_download_offline_fails_at_the_probe(tmp_path, monkeypatch):
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    monkeypatch.setattr(CIFAR10Dataset, "download_urls", (f"http://127.0.0.1:{port}/cifar-10-python.tar.gz",))
    monkeypatch.setattr(CIFAR10Dataset, "_download", lambda self: pytest.fail("download attempted while offline"))
    with pytest.raises(DiffuseError, match="cannot reach 127.0.0.1 to download"):
        CIFAR10Dataset(root=tmp_path, download=True)


class _Payload:
    """Unpickling this would create a folder: what a tampered file could do with plain pickle.load."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_tampered_pickle_is_refused_without_running_it(tiny_cifar):
    marker = tiny_cifar / "pwned"
    _write(tiny_cifar / "cifar-10-batches-py" / "test_batch", {"data": _Payload(str(marker)), "labels": [0]})
    with pytest.raises(DiffuseError) as e:
        CIFAR10Dataset(root=tiny_cifar, split="test")
    assert "test_batch" in str(e.value) and "refusing to load posix.mkdir" in str(e.value)
    assert not marker.exists()


def test_truncated_batch_is_named(tiny_cifar):
    path = tiny_cifar / "cifar-10-batches-py" / "data_batch_3"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DiffuseError, match="cannot read .*data_batch_3"):
        CIFAR10Dataset(root=tiny_cifar)


def test_config(tiny_cifar):
    cfg = compose_cfg("train", ["dataset=cifar10", f"dataset.root={tiny_cifar}"])
    node = OmegaConf.to_container(cfg.dataset, resolve=True)
    assert node["_target_"] == "diffuse.data.vision.CIFAR10Dataset" and cfg.model.num_classes == 10
    assert (node["resolution"], node["channels"], node["hflip"], node["split"]) == (32, 3, None, "train")
    assert len(CIFAR10Dataset(**{k: v for k, v in node.items() if k != "_target_"})) == 10

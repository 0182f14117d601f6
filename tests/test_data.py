"""Real datasets: MNIST/Fashion-MNIST on the shared files, Flowers102 on a tiny folder in its format.

The loaders are checked against torchvision's own reading of the same files (values, labels, sizes), the
Flowers102 crop/flip against images whose content says where each pixel came from, and the failure
paths (missing files, offline download, wrong dim) for a clear one-line DiffuseError.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torchvision

from diffuse.data import vision
from diffuse.data.loader import BatchStream
from diffuse.data.vision import FashionMNISTDataset, Flowers102Dataset, MNISTDataset, default_root
from diffuse.network import reachable
from diffuse.errors import DiffuseError

from conftest import FLOWERS_SPLITS as SPLITS, compose_cfg, flowers_label as _label, requires_cuda, run_cli

IDX_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


# -- MNIST / Fashion-MNIST on the shared files --------------------------------------------------------------
@pytest.mark.parametrize("cls, tv_cls", [(MNISTDataset, torchvision.datasets.MNIST),
                                         (FashionMNISTDataset, torchvision.datasets.FashionMNIST)])
def test_idx_sets_match_torchvision(shared_data, cls, tv_cls):
    for split, size in (("train", 60000), ("test", 10000)):
        ds = cls(root=shared_data, split=split)
        ref = tv_cls(str(shared_data), train=split == "train", download=False)
        assert len(ds) == size and (ds.dim, ds.resolution, ds.channels, ds.num_classes) == (2, 28, 1, 10)
        assert len(ds.class_names) == 10
        idx = torch.tensor([0, 1, 7, size - 1])
        x, y = ds.get_batch(idx, torch.Generator().manual_seed(0))
        assert x.dtype == torch.float32 and x.shape == (4, 1, 28, 28) and y.dtype == torch.int64
        torch.testing.assert_close(x[:, 0], ref.data[idx].float() / 127.5 - 1, rtol=0, atol=1e-6)
        assert torch.equal(y, ref.targets[idx])
        # the whole set spans [−1, 1] exactly and every label 0…9 occurs
        assert ds.images.min() == 0 and ds.images.max() == 255
        assert torch.equal(torch.unique(ds.labels), torch.arange(10))


def test_resolution_channels_and_class_subset(shared_data):
    ref = torchvision.datasets.MNIST(str(shared_data), train=False, download=False)
    ds = MNISTDataset(root=shared_data, split="test", resolution=32, channels=3, num_classes=3)
    keep = ref.targets < 3
    assert len(ds) == int(keep.sum()) and ds.class_names == ("0", "1", "2")
    x, y = ds.get_batch(torch.arange(5))
    assert x.shape == (5, 3, 32, 32) and x.min() >= -1 and x.max() <= 1
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])  # grey replicated
    assert torch.equal(y, ref.targets[keep][:5])
    # resized once at load: antialiased bilinear of the 28×28 originals, rounded to 8 bits
    expected = torch.nn.functional.interpolate(ref.data[keep][:5, None].float(), size=(32, 32), mode="bilinear",
                                               antialias=True, align_corners=False).round() / 127.5 - 1
    torch.testing.assert_close(x[:, :1], expected, rtol=0, atol=1e-6)


def test_to_device_indexes_there(shared_data):
    ds = MNISTDataset(root=shared_data, split="test", hflip=True, channels=3)
    cpu_x, _ = ds.get_batch(torch.tensor([4, 2]), torch.Generator().manual_seed(3))
    assert ds.to("meta") is ds and ds.images.device.type == "meta"
    x, y = ds.get_batch(torch.tensor([4, 2]), torch.Generator().manual_seed(3))  # CPU indices and generator
    assert x.device.type == y.device.type == "meta" and x.shape == cpu_x.shape


@requires_cuda
def test_on_cuda_same_batch_as_cpu(shared_data):
    ds = MNISTDataset(root=shared_data, split="test", hflip=True)
    idx = torch.tensor([3, 1, 4, 1, 5])
    cpu = ds.get_batch(idx, torch.Generator().manual_seed(9))
    gpu = ds.to("cuda").get_batch(idx, torch.Generator().manual_seed(9))
    assert gpu[0].is_cuda and torch.equal(gpu[0].cpu(), cpu[0]) and torch.equal(gpu[1].cpu(), cpu[1])


def test_batch_stream_over_mnist(shared_data):
    ds = MNISTDataset(root=shared_data, split="test")
    x, y = next(BatchStream(ds, batch_size=16, seed=0))
    assert x.shape == (16, 1, 28, 28) and y.shape == (16,)


# -- missing files, offline, bad arguments: one clear line -------------------------------------------------
def _no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the network was touched")
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.mark.parametrize("cls, folder", [(MNISTDataset, "MNIST/raw"), (FashionMNISTDataset, "FashionMNIST/raw")])
def test_missing_files_name_folder_and_files_without_network(tmp_path, monkeypatch, cls, folder):
    _no_network(monkeypatch)
    with pytest.raises(DiffuseError) as e:
        cls(root=tmp_path / "nothing")
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / "nothing" / folder) in msg
    assert all(name in msg for name in IDX_FILES) and "dataset.download=true" in msg


def test_missing_flowers_names_its_files(tmp_path, monkeypatch):
    _no_network(monkeypatch)
    with pytest.raises(DiffuseError) as e:
        Flowers102Dataset(root=tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "flowers-102") in msg and all(f in msg for f in ("jpg/", "imagelabels.mat", "setid.mat"))


def test_download_offline_fails_at_the_probe(tmp_path, monkeypatch):
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there: connection refused
    monkeypatch.setattr(MNISTDataset, "download_urls", (f"http://127.0.0.1:{port}/mnist/",))
    monkeypatch.setattr(MNISTDataset, "_download", lambda self: pytest.fail("download attempted while offline"))
    with pytest.raises(DiffuseError, match="cannot reach 127.0.0.1 to download"):
        MNISTDataset(root=tmp_path, download=True)


def test_reachable_probe():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    try:
        assert reachable([f"http://127.0.0.1:{port}/"], timeout=2)
    finally:
        server.close()
    assert not reachable([f"http://127.0.0.1:{port}/"], timeout=2)


@pytest.mark.parametrize("kwargs, match", [({"dim": 3}, "dataset mnist is 2-D only; got dim=3"),
                                           ({"dim": 1}, "dataset mnist is 2-D only; got dim=1"),
                                           ({"split": "val"}, "split must be one of train, test"),
                                           ({"channels": 2}, "channels must be 1"),
                                           ({"num_classes": 11}, "num_classes must be 1…10")])
def test_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(DiffuseError, match=match):
        MNISTDataset(root=tmp_path, **kwargs)


def test_default_root_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DIFFUSE_DATA", str(tmp_path))
    assert default_root() == tmp_path
    assert compose_cfg("train", ["dataset=mnist"]).dataset.root == str(tmp_path)
    monkeypatch.delenv("DIFFUSE_DATA")
    assert default_root() == Path("~/.cache/diffuse/data").expanduser()
    assert compose_cfg("train", ["dataset=fashion"]).dataset.root == "~/.cache/diffuse/data"


# -- Flowers102 on a tiny folder in its format (conftest's tiny_flowers) ----------------------------------------


def test_flowers_sizes_labels_splits(tiny_flowers):
    for split, key in (("train", "trnid"), ("val", "valid"), ("test", "tstid")):
        ds = Flowers102Dataset(root=tiny_flowers, split=split, resolution=16)
        assert len(ds) == len(SPLITS[key]) and ds.hflip == (split == "train")
        assert (ds.channels, ds.num_classes, len(ds.class_names)) == (3, 102, 102)
        x, y = ds.get_batch(torch.arange(len(ds)), torch.Generator().manual_seed(0))
        assert x.shape == (len(ds), 3, 16, 16) and x.min() >= -1 and x.max() <= 1
        assert y.tolist() == [_label(i) - 1 for i in SPLITS[key]]
        assert (tiny_flowers / "flowers-102" / f"diffuse-{split}-16px.pt").is_file()


def test_flowers_resize_center_crop(tiny_flowers):
    """Shorter side → 16, then the central 16×16: landscape keeps the middle columns (red | blue halves,
    the green stripe on top); portrait keeps the middle rows (the stripe is cropped away)."""
    x, _ = Flowers102Dataset(root=tiny_flowers, split="val", resolution=16).get_batch(torch.arange(3))
    rgb = (x + 1) / 2
    for i, image_id in enumerate(SPLITS["valid"]):
        img = rgb[i]
        mid = img[:, 6:]  # below any stripe
        assert mid[0, :, :6].mean() > 0.8 and mid[2, :, :6].mean() < 0.2    # left: red
        assert mid[2, :, 10:].mean() > 0.8 and mid[0, :, 10:].mean() < 0.2  # right: blue
        stripe_green = img[1, 0, :].mean()
        assert (stripe_green > 0.8) if image_id % 2 else (stripe_green < 0.2)


def test_flowers_flips_are_reproducible_and_exact(tiny_flowers):
    train = Flowers102Dataset(root=tiny_flowers, split="train", resolution=16)
    plain = Flowers102Dataset(root=tiny_flowers, split="train", resolution=16, hflip=False)
    idx = torch.arange(len(train))
    a, _ = train.get_batch(idx, torch.Generator().manual_seed(5))
    b, _ = train.get_batch(idx, torch.Generator().manual_seed(5))
    ref, _ = plain.get_batch(idx)
    assert torch.equal(a, b)
    flipped = torch.rand(len(idx), generator=torch.Generator().manual_seed(5)) < 0.5
    assert 0 < flipped.sum() < len(idx)  # this seed flips some and keeps some
    for i in range(len(idx)):
        assert torch.equal(a[i], ref[i].flip(-1) if flipped[i] else ref[i])


def test_flowers_second_load_reads_the_cache(tiny_flowers, monkeypatch):
    first = Flowers102Dataset(root=tiny_flowers, split="test", resolution=16)
    monkeypatch.setattr(torch.utils.data, "DataLoader", lambda *a, **k: pytest.fail("decoded again"))
    second = Flowers102Dataset(root=tiny_flowers, split="test", resolution=16)
    assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)


def test_flowers_grey_and_worker_decoding(tiny_flowers):
    """channels=1: ITU-R 601 luma of the RGB images; decoding with 2 workers gives the same pixels."""
    rgb = Flowers102Dataset(root=tiny_flowers, split="val", resolution=16, num_workers=0)
    grey = Flowers102Dataset(root=tiny_flowers, split="val", resolution=16, channels=1)
    w = torch.tensor(vision.LUMA).view(1, 3, 1, 1)
    expected = (rgb.images.float() * w).sum(1, keepdim=True).round()
    assert grey.images.shape == (3, 1, 16, 16) and torch.equal(grey.images.float(), expected)
    (tiny_flowers / "flowers-102" / "diffuse-val-16px.pt").unlink()
    workers = Flowers102Dataset(root=tiny_flowers, split="val", resolution=16, num_workers=2)
    assert torch.equal(workers.images, rgb.images)


# -- the CLI on the real files ------------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_trains_on_mnist(shared_data, tmp_path):
    proc = run_cli(["train", "dataset=mnist", f"dataset.root={shared_data}", "dataset.split=test",
                    "trainer.max_steps=2", "trainer.batch_size=8", "model.base_channels=8", "model.channel_mult=[1,2]",
                    "model.time_emb_dim=8", "trainer.sample_every=0", "logger=none", "device=cpu"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert list(tmp_path.glob("outputs/*/*/checkpoints/last.ckpt"))


@pytest.mark.slow
def test_cli_missing_data_is_one_clear_line(tmp_path):
    proc = run_cli(["train", "dataset=fashion", "dataset.root=/nonexistent", "logger=none"], cwd=tmp_path)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "Traceback" not in proc.stderr
    assert "/nonexistent/FashionMNIST/raw" in errors[0] and "train-images-idx3-ubyte" in errors[0]

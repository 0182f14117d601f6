"""`dataset=folder`: image and .npy folders, flat or one sub-folder per class, on small folders written here.

Labels and file order are checked against torchvision's ImageFolder, the resize/crop against
torchvision.transforms.functional on the source pixels, the cache by making decoding impossible, the
memory-mapped path against the in-memory one, every bad folder for a one-line error naming the file or
folder, and one `diffuse train dataset=folder` + `diffuse sample` through the CLI.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torchvision
import torchvision.transforms.functional as TF
from omegaconf import OmegaConf
from PIL import Image

from diffuse.app import _register_resolvers
from diffuse.data import folder as folder_mod
from diffuse.data.folder import FolderDataset, count_classes
from diffuse.data.loader import BatchStream
from diffuse.data.vision import LUMA
from diffuse.errors import DiffuseError

from conftest import TINY, compose_cfg, requires_cuda, run_cli

LEVEL = 1 / 127.5  # one grey level in [−1, 1] units


@pytest.fixture(autouse=True)
def resolver():
    """${folder_classes:…}, registered by the CLI's app._register_resolvers (idempotent)."""
    _register_resolvers()


def _pattern(h: int, w: int, seed: int, channels: int = 3) -> np.ndarray:
    """Smooth, distinct per seed: gradients across and down, a seed-dependent wave. uint8 [h, w, channels]."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    planes = [xx * 255 / (w - 1), yy * 255 / (h - 1), 128 + 100 * np.sin(xx / (2 + seed) + seed) * np.cos(yy / 4)]
    img = np.stack(planes[:channels], -1).round().clip(0, 255).astype(np.uint8)
    return img[..., 0] if channels == 1 else img


def _save(path, img: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path, **({"quality": 95} if path.suffix == ".jpg" else {}))


@pytest.fixture
def classes(tmp_path):
    """root/cat: 2 png (one landscape 40×24, one portrait 24×40) + a nested jpg; root/dog: a grey png and a
    jpg; root/owl: a png. 6 images, 3 classes."""
    root = tmp_path / "pets"
    _save(root / "cat" / "a.png", _pattern(24, 40, 0))
    _save(root / "cat" / "b.png", _pattern(40, 24, 1))
    _save(root / "cat" / "more" / "c.jpg", _pattern(30, 30, 2))
    _save(root / "dog" / "d.png", _pattern(20, 36, 3, channels=1))
    _save(root / "dog" / "e.jpg", _pattern(32, 32, 4))
    _save(root / "owl" / "f.png", _pattern(16, 16, 5))
    return root


@pytest.fixture
def flat(tmp_path):
    root = tmp_path / "flat"
    for i in range(8):
        _save(root / f"img_{i}.png", _pattern(12 + i, 20 - i, i))
    return root


def _no_decoding(monkeypatch):
    monkeypatch.setattr(folder_mod._Decode, "read", lambda self, i: pytest.fail("decoded again"))


# -- layout and labels --------------------------------------------------------------------------------------
def test_labels_from_class_folders_as_imagefolder(classes):
    ds = FolderDataset(classes, resolution=8, conditional=True)
    ref = torchvision.datasets.ImageFolder(str(classes))
    assert ds.class_names == tuple(ref.classes) == ("cat", "dog", "owl") and ds.num_classes == 3
    assert [(str(classes / f), int(y)) for f, y in zip(ds.files, ds.labels)] == ref.samples
    assert count_classes(classes) == 3 and count_classes(classes, ["npy"]) == 0
    x, y = ds.get_batch(torch.arange(len(ds)), torch.Generator().manual_seed(0))
    assert x.shape == (6, 3, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert y.tolist() == [0, 0, 0, 1, 1, 2] and x.min() >= -1 and x.max() <= 1
    assert (ds.dim, ds.resolution, ds.channels) == (2, 8, 3)


def test_hidden_and_empty_folders_are_skipped(classes):
    (classes / "empty").mkdir()
    (classes / "notes").mkdir()
    (classes / "notes" / "readme.txt").write_text("not an image")
    _save(classes / ".thumbs" / "t.png", _pattern(8, 8, 9))
    _save(classes / "cat" / ".hidden.png", _pattern(8, 8, 9))
    ds = FolderDataset(classes, resolution=8)
    assert ds.class_names == ("cat", "dog", "owl") and len(ds) == 6 and count_classes(classes) == 3


def test_flat_folder_is_unconditional(flat):
    ds = FolderDataset(flat, resolution=8, conditional=True)
    assert (ds.num_classes, ds.class_names, len(ds)) == (0, (), 8) and count_classes(flat) == 0
    _, y = ds.get_batch(torch.arange(8))
    assert torch.equal(y, torch.zeros(8, dtype=torch.long))
    x, y = next(BatchStream(ds, batch_size=4, seed=0))
    assert x.shape == (4, 3, 8, 8) and y.tolist() == [0] * 4


def test_num_classes_keeps_the_first_classes_or_none(classes):
    two = FolderDataset(classes, resolution=8, num_classes=2)
    assert two.class_names == ("cat", "dog") and len(two) == 5
    none = FolderDataset(classes, resolution=8, num_classes=0, conditional=True)
    assert none.num_classes == 0 and len(none) == 6 and none.labels.eq(0).all()


# -- pixels: resize + center crop, channels ----------------------------------------------------------------
@pytest.mark.parametrize("name, h, w, seed", [("a.png", 24, 40, 0), ("b.png", 40, 24, 1)])
def test_resize_center_crop_matches_reference(classes, name, h, w, seed):
    """Shorter side → 16 (the longer one → ⌊16·long/short⌋, as torchvision's Resize), antialiased bilinear, the
    central 16×16; reference: torchvision.transforms.functional on the float source pixels (the dataset
    resizes with PIL), within one grey level (measured: 0.85)."""
    ds = FolderDataset(classes, resolution=16)
    i = ds.files.index(f"cat/{name}")
    x, _ = ds.get_batch(torch.tensor([i]))
    src = torch.from_numpy(_pattern(h, w, seed)).permute(2, 0, 1).float()
    size = [16, 16 * w // h] if w > h else [16 * h // w, 16]
    ref = TF.center_crop(TF.resize(src, size, antialias=True), [16, 16]) / 127.5 - 1
    torch.testing.assert_close(x[0], ref, rtol=0, atol=LEVEL)


def test_channels_grey_and_rgb(classes):
    rgb = FolderDataset(classes, resolution=16, channels=3)
    grey = FolderDataset(classes, resolution=16, channels=1)
    assert grey.images.shape == (6, 1, 16, 16) and rgb.images.shape == (6, 3, 16, 16)
    # RGB files → ITU-R 601-2 luma (PIL's "L" rounds at 8 bits, then resizes: within a level or two)
    w = torch.tensor(LUMA).view(1, 3, 1, 1)
    luma = (rgb.images.float() * w).sum(1, keepdim=True)
    assert (grey.images.float() - luma).abs().max() <= 2
    # the grey file (dog/d.png) → three equal channels
    i = rgb.files.index("dog/d.png")
    assert torch.equal(rgb.images[i, 0], rgb.images[i, 1]) and torch.equal(rgb.images[i, 0], rgb.images[i, 2])
    assert grey.cache_path != rgb.cache_path  # one cache per (resolution, channels)


def test_16bit_grey_and_palette_images(tmp_path):
    """16-bit grey is scaled to 8 bits (PIL's own conversion would clip it at 255); a palette with
    transparency goes through RGBA."""
    root = tmp_path / "modes"
    root.mkdir()
    a16 = np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000
    Image.fromarray(a16).save(root / "g16.png")
    Image.fromarray(_pattern(8, 8, 0)).convert("P").save(root / "pal.png", transparency=0)
    ds = FolderDataset(root, resolution=8, channels=1)
    assert ds.files == ["g16.png", "pal.png"]
    assert torch.equal(ds.images[0, 0], torch.from_numpy((a16 / 257).round().astype(np.uint8)))


def test_flips_reproducible_and_exact(flat):
    flip = FolderDataset(flat, resolution=8, hflip=True)
    plain = FolderDataset(flat, resolution=8)
    idx = torch.arange(8)
    a, _ = flip.get_batch(idx, torch.Generator().manual_seed(5))
    b, _ = flip.get_batch(idx, torch.Generator().manual_seed(5))
    ref, _ = plain.get_batch(idx)
    drawn = torch.rand(8, generator=torch.Generator().manual_seed(5)) < 0.5
    assert torch.equal(a, b) and 0 < drawn.sum() < 8
    for i in range(8):
        assert torch.equal(a[i], ref[i].flip(-1) if drawn[i] else ref[i])


def test_decoding_with_workers(flat):
    """Two DataLoader workers decode the same pixels, and a bad file in a worker is still named in one line."""
    ref = FolderDataset(flat, resolution=8, num_workers=0, cache_dir=flat.parent / "cache0")
    two = FolderDataset(flat, resolution=8, num_workers=2, cache_dir=flat.parent / "cache2")
    assert torch.equal(ref.images, two.images) and two.cache_path.parent == flat.parent / "cache2"
    (flat / "img_6.png").write_bytes(b"not an image")
    msg = _error(path=flat, resolution=8, num_workers=2, cache_dir=flat.parent / "cache2")
    assert str(flat / "img_6.png") in msg and "cannot be read as an image" in msg


# -- the cache ---------------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """The user's cache folder ($XDG_CACHE_HOME) in tmp_path, for every test here."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    return tmp_path / "xdg-cache" / "diffuse" / "folder-cache"


def test_cache_written_in_the_users_cache_and_reused(classes, own_cache, monkeypatch):
    def listing():  # everything beside and inside the data's folder, the cache folder of this test aside
        return sorted(str(p) for p in classes.parent.rglob("*") if "xdg-cache" not in p.parts)

    before = listing()
    first = FolderDataset(classes, resolution=8)
    assert first.cache_path.is_relative_to(own_cache) and first.cache_path.is_file()
    assert listing() == before  # nothing written beside (or in) the data
    _no_decoding(monkeypatch)
    second = FolderDataset(classes, resolution=8)
    assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)


def test_cache_invalidated_when_a_file_changes(flat, monkeypatch):
    first = FolderDataset(flat, resolution=8)
    path = flat / "img_3.png"
    _save(path, 255 - _pattern(15, 17, 3))
    second = FolderDataset(flat, resolution=8)
    assert not torch.equal(first.images[3], second.images[3]) and torch.equal(first.images[4], second.images[4])
    _save(flat / "img_8.png", _pattern(10, 10, 8))  # a new file
    assert len(FolderDataset(flat, resolution=8)) == 9
    _no_decoding(monkeypatch)
    assert len(FolderDataset(flat, resolution=8)) == 9  # and that state is cached in turn


def test_content_change_that_keeps_size_and_mtime_is_seen(flat):
    """`cp -p`, `rsync -a` and tar keep a file's size and mtime: the cache key is its content."""
    first = FolderDataset(flat, resolution=8)
    path = flat / "img_2.png"
    st, data = path.stat(), bytearray(path.read_bytes())
    other = flat.parent / "other.png"
    _save(other, 255 - _pattern(14, 18, 2))  # another image, padded to the same size as the old file
    new = other.read_bytes()
    assert len(new) <= len(data)
    path.write_bytes(new + b"\0" * (len(data) - len(new)))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns
    second = FolderDataset(flat, resolution=8)
    assert not torch.equal(first.images[2], second.images[2])
    assert torch.equal(first.images[3], second.images[3])


def test_a_cache_planted_beside_the_folder_is_never_read(flat, monkeypatch):
    """Older versions cached in <parent>/<name>.diffuse-cache/, which anyone who can write the parent can fill."""
    honest = FolderDataset(flat, resolution=8)
    planted = flat.parent / "flat.diffuse-cache"
    planted.mkdir()
    torch.save({"key": honest.cache_key(), "images": torch.zeros_like(honest.images)},
               planted / honest.cache_path.name)
    honest.cache_path.unlink()
    again = FolderDataset(flat, resolution=8)
    assert torch.equal(again.images, honest.images) and not again.cache_path.is_relative_to(planted)


def test_an_unwritable_cache_folder_decodes_and_goes_on(flat, tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder would go")
    ds = FolderDataset(flat, resolution=8, cache_dir=blocker / "cache")
    assert ds.cache_path is None and len(ds) == 8
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_old_cache_folders_inside_the_data_are_not_classes(classes):
    """A class folder's own memory-mapped cache (pets/cat.diffuse-cache/*.npy, as older versions wrote for
    dataset.path=pets/cat) must not make the parent `pets` a mix of arrays and images."""
    (classes / "cat.diffuse-cache").mkdir()
    np.save(classes / "cat.diffuse-cache" / "images-3x8x8-mmap.npy", np.zeros((3, 3, 8, 8), np.uint8))
    ds = FolderDataset(classes, resolution=8)
    assert ds.class_names == ("cat", "dog", "owl") and len(ds) == 6
    assert count_classes(classes) == 3


def test_symlink_loops_and_second_links_are_read_once(tmp_path):
    root = tmp_path / "loop"
    for c in ("a", "b"):
        for i in range(3):
            _save(root / c / f"{c}{i}.png", _pattern(10, 10, i))
    (root / "b" / "up").symlink_to("..")            # a loop back to the top
    (root / "b" / "also_a").symlink_to("../a")      # a's images again, under class b
    (root / "a" / "self").symlink_to(".")           # a loop onto itself
    ds = FolderDataset(root, resolution=8)
    assert len(ds) == 6 and ds.class_names == ("a", "b")
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 1]


def test_only_the_promised_image_formats_are_decoded(flat):
    """A .png holding PostScript (which PIL would hand to Ghostscript) or a GIF is refused, named."""
    (flat / "img_5.png").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    msg = _error(path=flat, resolution=8)
    assert "img_5.png cannot be read as an image" in msg
    Image.fromarray(_pattern(10, 10, 1)).save(flat / "img_5.png", format="GIF")
    assert "img_5.png cannot be read as an image" in _error(path=flat, resolution=8)


def test_streaming_from_memmap_equals_in_memory(classes, monkeypatch):
    """max_memory_mb below the decoded size: decoded into a memory-mapped .npy, batches read from it."""
    memory = FolderDataset(classes, resolution=8, hflip=True)
    stream = FolderDataset(classes, resolution=8, hflip=True, max_memory_mb=1e-4)  # 6·3·8·8 B > 105 B
    assert not memory.streaming and memory.images is not None
    assert stream.streaming and stream.images is None and stream.cache_path.suffix == ".npy"
    idx = torch.tensor([5, 0, 3, 3, 1])
    for seed in range(3):
        a = memory.get_batch(idx, torch.Generator().manual_seed(seed))
        b = stream.get_batch(idx, torch.Generator().manual_seed(seed))
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    _no_decoding(monkeypatch)
    again = FolderDataset(classes, resolution=8, max_memory_mb=1e-4)  # the memory map, not decoded again
    in_memory = FolderDataset(classes, resolution=8)
    assert again.streaming and torch.equal(again.get_batch(idx)[0], in_memory.get_batch(idx)[0])
    x, y = stream.to("meta").get_batch(idx)  # streaming: labels move, batches are read and then moved
    assert x.device.type == y.device.type == "meta" and x.shape == (5, 3, 8, 8)


@requires_cuda
@pytest.mark.parametrize("max_memory_mb", [4096, 1e-4])  # in memory (moved to the GPU) and streaming
def test_on_cuda_same_batches_as_cpu(classes, max_memory_mb):
    ds = FolderDataset(classes, resolution=8, hflip=True, max_memory_mb=max_memory_mb)
    idx = torch.tensor([3, 1, 4, 1, 5])
    cpu = ds.get_batch(idx, torch.Generator().manual_seed(9))
    gpu = ds.to("cuda").get_batch(idx, torch.Generator().manual_seed(9))
    assert gpu[0].is_cuda and gpu[1].is_cuda
    assert torch.equal(gpu[0].cpu(), cpu[0]) and torch.equal(gpu[1].cpu(), cpu[1])


# -- .npy arrays in 1-D and 3-D ----------------------------------------------------------------------------
def _arrays(root, shape, n, seed=0, classes=None):
    rng = np.random.default_rng(seed)
    written = {}
    for i in range(n):
        a = rng.uniform(-1, 1, shape).astype(np.float32)
        rel = f"{classes[i % len(classes)]}/x{i}.npy" if classes else f"x{i}.npy"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        np.save(root / rel, a)
        written[rel] = a
    return written


def test_npy_1d_class_folders(tmp_path):
    written = _arrays(tmp_path / "sig", (2, 16), 6, classes=["lo", "hi"])
    ds = FolderDataset(tmp_path / "sig", dim=1, resolution=16, channels=2, conditional=True)
    assert (ds.kind, ds.dim, ds.class_names, len(ds)) == ("arrays", 1, ("hi", "lo"), 6)
    x, y = ds.get_batch(torch.arange(6))
    assert x.shape == (6, 2, 16) and x.dtype == torch.float32
    for i, f in enumerate(ds.files):
        assert torch.equal(x[i], torch.from_numpy(written[f])) and y[i] == ds.class_names.index(f.split("/")[0])
    flips = FolderDataset(tmp_path / "sig", dim=1, resolution=16, channels=2, hflip=True)
    xf, _ = flips.get_batch(torch.arange(6), torch.Generator().manual_seed(1))
    drawn = torch.rand(6, generator=torch.Generator().manual_seed(1)) < 0.5
    assert all(torch.equal(xf[i], x[i].flip(-1) if drawn[i] else x[i]) for i in range(6))


def test_npy_3d_flat_and_streaming(tmp_path, monkeypatch):
    written = _arrays(tmp_path / "vol", (1, 4, 4, 4), 5, seed=1)
    memory = FolderDataset(tmp_path / "vol", dim=3, resolution=4, channels=1)
    stream = FolderDataset(tmp_path / "vol", dim=3, resolution=4, channels=1, max_memory_mb=0)
    assert memory.num_classes == 0 and stream.streaming and stream.cache_path.name.endswith("-mmap.npy")
    x, y = memory.get_batch(torch.arange(5))
    assert x.shape == (5, 1, 4, 4, 4) and y.eq(0).all()
    assert torch.equal(x, torch.stack([torch.from_numpy(written[f]) for f in memory.files]))
    assert torch.equal(stream.get_batch(torch.arange(5))[0], x)
    _no_decoding(monkeypatch)
    assert torch.equal(FolderDataset(tmp_path / "vol", dim=3, resolution=4, channels=1).images, memory.images)


# -- bad input: one line naming the folder or the file -----------------------------------------------------
def _error(**kwargs) -> str:
    with pytest.raises(DiffuseError) as e:
        FolderDataset(**kwargs)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_missing_and_empty_folders(tmp_path):
    assert f"{tmp_path / 'nope'} does not exist" in _error(path=tmp_path / "nope")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("")
    assert f"no png, jpg, jpeg, webp, bmp, npy files in {tmp_path / 'empty'}" in _error(path=tmp_path / "empty")
    assert "set dataset.path" in _error(path=None)


def test_corrupt_image_is_named(flat):
    (flat / "img_5.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    msg = _error(path=flat, resolution=8)
    assert str(flat / "img_5.png") in msg and "cannot be read as an image" in msg


def test_truncated_jpeg_is_named(flat):
    _save(flat / "z.jpg", _pattern(64, 64, 2))
    data = (flat / "z.jpg").read_bytes()
    (flat / "z.jpg").write_bytes(data[: len(data) // 2])
    assert str(flat / "z.jpg") in _error(path=flat, resolution=8)


def test_npy_mixed_shapes_name_the_first_that_differs(tmp_path):
    _arrays(tmp_path / "a", (1, 8), 3)
    np.save(tmp_path / "a" / "x1.npy", np.zeros((2, 8), np.float32))
    np.save(tmp_path / "a" / "x2.npy", np.zeros((1, 4), np.float32))
    msg = _error(path=tmp_path / "a", dim=1, resolution=8, channels=1)
    assert str(tmp_path / "a" / "x1.npy") in msg and "(2, 8)" in msg and "x0.npy has (1, 8)" in msg


def test_npy_out_of_range_suggests_normalising(tmp_path):
    (tmp_path / "a").mkdir()
    np.save(tmp_path / "a" / "x0.npy", np.full((1, 8), 3.0, np.float32))
    msg = _error(path=tmp_path / "a", dim=1, resolution=8, channels=1)
    assert str(tmp_path / "a" / "x0.npy") in msg and "[-1, 1]" in msg and "normalise" in msg
    np.save(tmp_path / "a" / "x0.npy", np.full((1, 8), 1.0005, np.float32))  # within the tolerance
    assert len(FolderDataset(tmp_path / "a", dim=1, resolution=8, channels=1)) == 1


def test_npy_shape_must_match_dim_resolution_channels(tmp_path):
    _arrays(tmp_path / "a", (2, 8, 8), 2)
    assert "are 2-D (x0.npy: (2, 8, 8)) but dim=3" in _error(path=tmp_path / "a", dim=3, resolution=8, channels=2)
    msg = _error(path=tmp_path / "a", dim=2, resolution=16, channels=3)
    assert "dataset.resolution=8 dataset.channels=2" in msg and str(tmp_path / "a") in msg
    _arrays(tmp_path / "b", (1, 8, 4), 1)
    assert "same size on every spatial axis" in _error(path=tmp_path / "b", dim=2, resolution=8, channels=1)


def test_one_class_folder_with_conditional(tmp_path):
    _save(tmp_path / "one" / "cats" / "a.png", _pattern(8, 8, 0))
    _save(tmp_path / "one" / "cats" / "b.png", _pattern(8, 8, 1))
    msg = _error(path=tmp_path / "one", resolution=8, conditional=True)
    assert str(tmp_path / "one") in msg
    assert "has one class folder (cats); set conditional=false or add class folders" in msg
    assert FolderDataset(tmp_path / "one", resolution=8, conditional=False).num_classes == 1


def test_files_and_class_folders_mixed(classes):
    _save(classes / "stray.png", _pattern(8, 8, 0))
    msg = _error(path=classes, resolution=8)
    assert str(classes) in msg and "first: stray.png" in msg and "cat, dog, owl" in msg


def test_images_and_arrays_mixed_and_images_not_2d(flat):
    np.save(flat / "x.npy", np.zeros((3, 8, 8), np.float32))
    assert "mixes .npy arrays (x.npy) and images (img_0.png)" in _error(path=flat)
    (flat / "x.npy").unlink()
    assert "holds images, which are 2-D, but dim=3" in _error(path=flat, dim=3)
    assert "channels must be 1 (grey) or 3 (RGB)" in _error(path=flat, channels=2)


def test_flat_folder_with_num_classes(flat):
    assert "has no class folders" in _error(path=flat, num_classes=3)


# -- the config: num_classes counted at compose time --------------------------------------------------------
def test_config_counts_the_class_folders(classes, flat):
    _register_resolvers()
    cfg = compose_cfg("train", ["dataset=folder", f"dataset.path={classes}"])
    assert cfg.dataset.num_classes == 3 and cfg.model.num_classes == 3 and cfg.dataset.conditional is True
    cfg = compose_cfg("train", ["dataset=folder", f"dataset.path={flat}"])
    assert cfg.dataset.num_classes == 0 and cfg.model.num_classes == 0  # a flat folder trains unconditionally
    cfg = compose_cfg("train", ["dataset=folder", f"dataset.path={classes}", "conditional=false"])
    assert cfg.dataset.num_classes == 3 and cfg.model.num_classes == 0 and cfg.dataset.conditional is False
    cfg = compose_cfg("train_vae", ["dataset=folder", f"dataset.path={classes}"])  # no top-level `conditional`
    assert cfg.dataset.conditional is False
    cfg = compose_cfg("train", ["dataset=folder"])  # no path: the dataset says what to set, not the resolver
    assert cfg.dataset.num_classes == 0 and cfg.dataset.path is None
    assert OmegaConf.to_container(cfg.dataset, resolve=True)["num_classes"] == 0


# -- end to end through the CLI ----------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_trains_and_samples_on_a_folder(classes, tmp_path):
    """`diffuse train dataset=folder dataset.path=…` then `diffuse sample`."""
    tiny = [a for a in TINY if not a.startswith(("dataset.size=", "dataset.resolution="))]
    proc = run_cli(["train", "dataset=folder", f"dataset.path={classes}", "dataset.resolution=8", *tiny,
                    "trainer.max_steps=2"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_cli(["sample", "sampler.steps=3", "num_samples=3", "device=cpu"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    samples = list(tmp_path.glob("outputs/*/*/samples.npz"))
    assert len(samples) == 1
    data = np.load(samples[0])
    assert data["x"].shape == (3, 3, 8, 8) and data["y"].tolist() == [0, 1, 2]  # a sample per class

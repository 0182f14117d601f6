"""`mnist`, `fashion`, `cifar10`, `flowers102`: torchvision's datasets, held in memory as one uint8 tensor.

Each set is read once in torchvision's file layout, brought to `resolution` once (MNIST/Fashion/CIFAR-10:
antialiased bilinear resize; Flowers102: shorter side resized, then center crop, decoded by a DataLoader
with workers and cached as a .pt file next to the JPEGs), and kept as uint8 [N, C, R, R] (60000 MNIST
images at 28×28 = 47 MB). `to(device)` moves that tensor to the GPU, so a batch is one index + one
conversion to [−1, 1] on the device and data loading is never the bottleneck.

Files that are missing give a one-line DiffuseError at once, naming the folder and the files expected
there. The network is touched only with `download=true`, and then only after a short connection probe,
so an offline machine fails in seconds instead of hanging.
"""

from __future__ import annotations

import importlib
import logging
import os
import pickle
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import ClassVar
from urllib.parse import urlparse

import numpy as np
import torch
import torchvision
from torch import Tensor

from diffuse.data.base import Dataset
from diffuse.devices import to_device
from diffuse.errors import DiffuseError
from diffuse.network import reachable

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 5.0      # connection probe before any download
DOWNLOAD_TIMEOUT_S = 60.0  # per blocking socket operation during a download (a stalled transfer fails)
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, as torchvision's rgb_to_grayscale


def default_root() -> Path:
    """$DIFFUSE_DATA, else ~/.cache/diffuse/data."""
    return Path(os.environ.get("DIFFUSE_DATA") or "~/.cache/diffuse/data").expanduser()


@contextmanager
def _socket_timeout(seconds: float):
    """torchvision's urllib downloads have no timeout of their own; bound every blocking read."""
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def resize_uint8(images: Tensor, size: int, chunk: int = 8192) -> Tensor:
    """[N, C, H, W] uint8 → [N, C, size, size] uint8, antialiased bilinear (done once, at load)."""
    out = torch.empty((images.shape[0], images.shape[1], size, size), dtype=torch.uint8)
    for i in range(0, len(images), chunk):
        x = torch.nn.functional.interpolate(images[i:i + chunk].float(), size=(size, size), mode="bilinear",
                                            antialias=True, align_corners=False)
        out[i:i + chunk] = x.round().clamp(0, 255).to(torch.uint8)
    return out


class InMemoryImages(Dataset):
    """A labelled image set as one uint8 tensor; the dataset interface of `diffuse.data`.

    images: uint8 [N, C_stored, R, R] (C_stored is 1 or 3; grey is replicated per batch when channels=3)
    labels: int64 [N]
    """

    name = "images"
    splits: ClassVar[tuple[str, ...]] = ("train", "test")
    CLASS_NAMES: ClassVar[tuple[str, ...]] = ()
    download_urls: ClassVar[tuple[str, ...]] = ()  # probed before any download

    def __init__(self, root: str | os.PathLike | None = None, download: bool = False, split: str = "train",
                 resolution: int = 28, channels: int = 1, num_classes: int | None = None, dim: int = 2,
                 hflip: bool | None = None):
        if dim != 2:
            raise DiffuseError(f"dataset {self.name} is 2-D only; got dim={dim}")
        if split not in self.splits:
            raise DiffuseError(f"dataset {self.name}: split must be one of {', '.join(self.splits)}; got {split!r}")
        if channels not in (1, 3):
            raise DiffuseError(f"dataset {self.name}: channels must be 1 (grey) or 3 (RGB); got {channels}")
        total = len(self.CLASS_NAMES)
        num_classes = total if num_classes is None else int(num_classes)
        if not 1 <= num_classes <= total:
            raise DiffuseError(f"dataset {self.name} has {total} classes; num_classes must be 1…{total}, "
                               f"got {num_classes}")
        if int(resolution) < 1:
            raise DiffuseError(f"dataset {self.name}: resolution must be positive; got {resolution}")
        self.dim, self.resolution, self.channels = 2, int(resolution), int(channels)
        self.num_classes, self.split = num_classes, split
        self.class_names = tuple(self.CLASS_NAMES[:num_classes])
        self.hflip = bool(self.default_hflip(split) if hflip is None else hflip)
        self.root = Path(root).expanduser() if root not in (None, "") else default_root()
        self.settings = dict(root=root, resolution=resolution, channels=channels, num_classes=num_classes, dim=dim,
                             hflip=hflip)  # what heldout() builds the test split with

        self._ensure_files(bool(download))
        images, labels = self._read()                      # uint8 [N, C, R, R], int64 [N]
        if images.shape[1] == 3 and self.channels == 1:    # RGB → grey once; grey → RGB per batch (a view)
            w = torch.tensor(LUMA).view(1, 3, 1, 1)
            images = (images.float() * w).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
        if num_classes < total:                            # the first num_classes classes only
            keep = labels < num_classes
            images, labels = images[keep], labels[keep]
        self.images, self.labels = images.contiguous(), labels.long()

    def heldout(self, n: int) -> "InMemoryImages | None":
        """The test split (all of it; n is only a lower bound the caller checks), read from the same root."""
        if "test" not in self.splits:
            return None
        return type(self)(**{**self.settings, "split": "test", "download": False})

    # -- what each dataset says about itself -----------------------------------------------------------
    def default_hflip(self, split: str) -> bool:
        return False

    def folder(self) -> Path:
        """Where the files are expected."""
        raise NotImplementedError

    def expected_files(self) -> list[str]:
        raise NotImplementedError

    def _read(self) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _download(self) -> None:
        raise NotImplementedError

    # -- files: present, or downloaded with a bounded wait, or a clear error -----------------------------
    def _missing(self) -> list[str]:
        return [f for f in self.expected_files() if not (self.folder() / f).exists()]

    def _ensure_files(self, download: bool) -> None:
        missing = self._missing()
        if not missing:
            return
        expected = self.expected_files()
        where = (f"{self.folder()} (expected {', '.join(expected)}"
                 f"{'' if len(missing) == len(expected) else '; missing ' + ', '.join(missing)})")
        if not download:
            raise DiffuseError(f"dataset {self.name}: files not found in {where}: set dataset.download=true "
                               f"to fetch them (needs internet), or copy them there, or point dataset.root "
                               f"(default $DIFFUSE_DATA, else ~/.cache/diffuse/data) at a folder that has them")
        hosts = ", ".join(sorted({urlparse(u).hostname or u for u in self.download_urls}))
        if not reachable(self.download_urls, PROBE_TIMEOUT_S):
            raise DiffuseError(f"dataset {self.name}: cannot reach {hosts} to download (offline?): copy the "
                               f"files into {where} instead")
        log.info("downloading %s into %s", self.name, self.root)
        try:
            with _socket_timeout(DOWNLOAD_TIMEOUT_S):
                self._download()
        except Exception as e:  # noqa: BLE001 - any failure of the download is the user's one-line error
            msg = " ".join(str(e).split()) or type(e).__name__
            raise DiffuseError(f"dataset {self.name}: download from {hosts} failed ({msg}); copy the files "
                               f"into {where} instead") from None
        if self._missing():
            raise DiffuseError(f"dataset {self.name}: download finished but files are still missing in {where}")

    # -- the dataset interface --------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.labels)

    @property
    def device(self) -> torch.device:
        return self.images.device

    def to(self, device: torch.device | str) -> InMemoryImages:
        """Move the uint8 images and labels to `device`; get_batch then indexes and converts there."""
        self.images, self.labels = self.images.to(device), self.labels.to(device)
        return self

    def get_batch(self, indices: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """indices: [B] int64 → x float32 [B, channels, R, R] in [−1, 1], y int64 [B], on self.device.

        Random horizontal flips (hflip) are drawn from `generator` (a CPU generator is fine), so a batch
        is a function of (indices, generator state) only, wherever the data lives.
        """
        labels = self.labels[to_device(indices, self.labels.device)]  # no host sync on CUDA (see to_device)
        return self._convert(self._gather(indices), generator), labels

    def _gather(self, indices: Tensor) -> Tensor:
        """The stored items at `indices`, on self.device (subclasses may read them from elsewhere, e.g. a memmap)."""
        return self.images[to_device(indices, self.images.device)]

    def _convert(self, items: Tensor, generator: torch.Generator | None) -> Tensor:
        """Stored items [B, C_stored, *S] (uint8, or float already in [−1, 1]) → float32 [B, channels, *S] in
        [−1, 1], flipped along the last axis where drawn (any dim), grey replicated when RGB is asked."""
        x = items.float().div_(127.5).sub_(1.0) if items.dtype == torch.uint8 else items.float()
        if self.hflip:
            flip = torch.rand(len(x), generator=generator) < 0.5
            flip = to_device(flip, x.device).view(-1, *([1] * (x.ndim - 1)))
            x = torch.where(flip, x.flip(-1), x)
        if x.shape[1] != self.channels:  # grey stored, RGB asked: replicate
            x = x.expand(-1, self.channels, *x.shape[2:]).contiguous()
        return x

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(split={self.split}, n={len(self)}, resolution={self.resolution}, "
                f"channels={self.channels}, num_classes={self.num_classes}, hflip={self.hflip}, "
                f"device={self.device})")


class _IdxImages(InMemoryImages):
    """MNIST-format sets: four uncompressed IDX files in <root>/<Name>/raw (torchvision's layout)."""

    tv_class = torchvision.datasets.MNIST

    def folder(self) -> Path:
        return self.root / self.tv_class.__name__ / "raw"

    def expected_files(self) -> list[str]:
        return [name.removesuffix(".gz") for name, _ in self.tv_class.resources]

    def _download(self) -> None:
        self.tv_class(str(self.root), train=True, download=True)

    @classmethod
    def write_example(cls, root) -> dict:
        """The four IDX files (uint8 images [N, 28, 28], labels [N]; big-endian headers) with 20 train and 10
        test items of random pixels, labels 0…9 in turn."""
        raw = Path(root) / cls.tv_class.__name__ / "raw"
        raw.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        for prefix, n in (("train", 20), ("t10k", 10)):
            images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
            labels = (np.arange(n) % 10).astype(np.uint8)
            (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
                np.array([0x803, n, 28, 28], ">i4").tobytes() + images.tobytes())
            (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(np.array([0x801, n], ">i4").tobytes() + labels.tobytes())
        return {"root": str(root)}

    def _read(self) -> tuple[Tensor, Tensor]:
        try:
            tv = self.tv_class(str(self.root), train=self.split == "train", download=False)
        except Exception as e:  # noqa: BLE001 - e.g. a truncated file
            raise DiffuseError(f"dataset {self.name}: cannot read the files in {self.folder()}: "
                               f"{' '.join(str(e).split())}") from None
        images = tv.data.unsqueeze(1)  # uint8 [N, 1, 28, 28]
        if self.resolution != images.shape[-1]:
            images = resize_uint8(images, self.resolution)
        return images, tv.targets.long()


class MNISTDataset(_IdxImages):
    """MNIST (LeCun et al. 1998): 60000 train + 10000 test grey digits, 28×28, 10 classes."""

    name = "mnist"
    tv_class = torchvision.datasets.MNIST
    CLASS_NAMES = tuple(str(d) for d in range(10))
    download_urls = tuple(torchvision.datasets.MNIST.mirrors)


class FashionMNISTDataset(_IdxImages):
    """Fashion-MNIST (Xiao et al. 2017): 60000 + 10000 grey clothing images, 28×28, 10 classes."""

    name = "fashion"
    tv_class = torchvision.datasets.FashionMNIST
    CLASS_NAMES = tuple(torchvision.datasets.FashionMNIST.classes)
    download_urls = tuple(torchvision.datasets.FashionMNIST.mirrors)


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """CIFAR's files are pickles, and pickle.load runs whatever a file names. Files are untrusted input here
    (a checkpoint may never call code, nor may a data file) and the CIFAR folder is not MD5-checked (see
    CIFAR10Dataset), so only what the format holds may be built: dicts, lists, strings, numbers and numpy
    arrays (by any numpy's name for them)."""

    ALLOWED: ClassVar[dict[tuple[str, str], tuple[str, str]]] = {
        ("numpy", "ndarray"): ("numpy", "ndarray"),
        ("numpy", "dtype"): ("numpy", "dtype"),
        ("_codecs", "encode"): ("_codecs", "encode"),  # bytes written by Python 3 at protocol 2
        **{(f"numpy.{core}.multiarray", "_reconstruct"): ("multiarray", "_reconstruct") for core in ("core", "_core")},
        **{(f"numpy.{core}.numeric", "_frombuffer"): ("numeric", "_frombuffer") for core in ("core", "_core")},
    }

    def find_class(self, module: str, name: str):
        target = self.ALLOWED.get((module, name))
        if target is None:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only numpy arrays are expected)")
        where, attr = target
        if where in ("multiarray", "numeric"):  # numpy ≥ 2 moved numpy.core to numpy._core
            try:
                return getattr(importlib.import_module(f"numpy._core.{where}"), attr)
            except ImportError:
                where = f"numpy.core.{where}"
        return getattr(importlib.import_module(where), attr)


def load_array_pickle(path: Path) -> dict:
    """A CIFAR-format pickle (a dict of arrays, lists and strings), built by _ArraysOnlyUnpickler."""
    with open(path, "rb") as f:
        return _ArraysOnlyUnpickler(f, encoding="latin1").load()  # latin1: the original files are Python 2's


class CIFAR10Dataset(InMemoryImages):
    """CIFAR-10 (Krizhevsky 2009): 50000 train + 10000 test RGB images, 32×32, 10 classes; random horizontal
    flips on train. torchvision's layout (<root>/cifar-10-batches-py: data_batch_1…5, test_batch,
    batches.meta); torchvision downloads it, but the files are read here with _ArraysOnlyUnpickler rather
    than torchvision's pickle.load, and without torchvision's MD5 check: a copied or hand-made folder in the
    same format loads too (the download itself is MD5-checked by torchvision)."""

    name = "cifar10"
    tv_class = torchvision.datasets.CIFAR10
    CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
    download_urls = (torchvision.datasets.CIFAR10.url,)

    def __init__(self, root=None, download: bool = False, split: str = "train", resolution: int = 32,
                 channels: int = 3, num_classes: int | None = None, dim: int = 2, hflip: bool | None = None):
        super().__init__(root=root, download=download, split=split, resolution=resolution, channels=channels,
                         num_classes=num_classes, dim=dim, hflip=hflip)

    def default_hflip(self, split: str) -> bool:
        return split == "train"

    def folder(self) -> Path:
        return self.root / self.tv_class.base_folder

    def expected_files(self) -> list[str]:
        tv = self.tv_class
        return [name for name, _ in tv.train_list + tv.test_list] + [tv.meta["filename"]]

    def _download(self) -> None:
        self.tv_class(str(self.root), train=True, download=True)

    @classmethod
    def write_example(cls, root) -> dict:
        """torchvision's layout: five train batches of 4 random images and a test batch of 10 (protocol-2
        pickles of {"data": uint8 [N, 3072] as R, G, B planes, "labels": [N]}), and batches.meta."""
        base = Path(root) / cls.tv_class.base_folder
        base.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        files = [(name, 4) for name, _ in cls.tv_class.train_list] + [(cls.tv_class.test_list[0][0], 10)]
        for name, n in files:
            batch = {"batch_label": name, "labels": (np.arange(n) % 10).tolist(),
                     "data": rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8),
                     "filenames": [f"{name}_{i}.png" for i in range(n)]}
            (base / name).write_bytes(pickle.dumps(batch, protocol=2))
        meta = {"label_names": list(cls.CLASS_NAMES), "num_cases_per_batch": 4, "num_vis": 3072}
        (base / cls.tv_class.meta["filename"]).write_bytes(pickle.dumps(meta, protocol=2))
        return {"root": str(root)}

    def _read(self) -> tuple[Tensor, Tensor]:
        files = self.tv_class.train_list if self.split == "train" else self.tv_class.test_list
        images, labels = [], []
        for name, _ in files:
            path = self.folder() / name
            try:
                entry = {k.decode("latin1") if isinstance(k, bytes) else k: v
                         for k, v in load_array_pickle(path).items()}
                data = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
                targets = np.asarray(entry["labels"], dtype=np.int64)
                if len(targets) != len(data):
                    raise ValueError(f"{len(data)} images but {len(targets)} labels")
            except Exception as e:  # noqa: BLE001 - a truncated, foreign or tampered file
                raise DiffuseError(f"dataset {self.name}: cannot read {path}: {' '.join(str(e).split())}") from None
            images.append(torch.from_numpy(data))
            labels.append(torch.from_numpy(targets))
        images = torch.cat(images)  # uint8 [N, 3, 32, 32] (the files store planes: R, G, B)
        if self.resolution != images.shape[-1]:
            images = resize_uint8(images, self.resolution)
        return images, torch.cat(labels)


class _Flowers102Folder(torchvision.datasets.Flowers102):
    """torchvision's Flowers102 on a folder whose files exist (the .mat MD5s are checked on download only,
    so a copied or hand-made folder in the same format loads too)."""

    def _check_integrity(self) -> bool:
        return self._images_folder.is_dir() and all(
            (self._base_folder / self._file_dict[k][0]).is_file() for k in ("label", "setid"))


class Flowers102Dataset(InMemoryImages):
    """Oxford 102 Flowers (Nilsback & Zisserman 2008): RGB photos, 102 classes; splits train (1020),
    val (1020), test (6149). Decoded once to resolution×resolution (shorter side resized, center crop)
    and cached next to the images as `diffuse-<split>-<R>px.pt`; random horizontal flips on train."""

    name = "flowers102"
    splits = ("train", "val", "test")
    CLASS_NAMES = tuple(torchvision.datasets.Flowers102.classes)
    download_urls = (torchvision.datasets.Flowers102._download_url_prefix,)

    def __init__(self, root=None, download: bool = False, split: str = "train", resolution: int = 64,
                 channels: int = 3, num_classes: int | None = None, dim: int = 2, hflip: bool | None = None,
                 num_workers: int | None = None):
        self.num_workers = num_workers
        super().__init__(root=root, download=download, split=split, resolution=resolution, channels=channels,
                         num_classes=num_classes, dim=dim, hflip=hflip)
        self.settings["num_workers"] = num_workers

    def default_hflip(self, split: str) -> bool:
        return split == "train"

    def folder(self) -> Path:
        return self.root / "flowers-102"

    def expected_files(self) -> list[str]:
        return ["jpg/", "imagelabels.mat", "setid.mat"]

    def _download(self) -> None:
        _Flowers102Folder(str(self.root), split=self.split, download=True)

    @classmethod
    def write_example(cls, root) -> dict:
        """Oxford's layout: 12 JPEGs of random pixels (landscape and portrait), imagelabels.mat (labels 1…102)
        and setid.mat (trnid 1–4, valid 5–8, tstid 9–12); needs scipy, as reading does."""
        from PIL import Image
        from scipy.io import savemat

        base = Path(root) / "flowers-102"
        (base / "jpg").mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        for i in range(1, 13):
            h, w = (48, 64) if i % 2 else (64, 48)
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(base / "jpg" / f"image_{i:05d}.jpg")
        savemat(base / "imagelabels.mat", {"labels": np.array([[(i % 3) + 1 for i in range(1, 13)]])})
        savemat(base / "setid.mat", {"trnid": np.array([[1, 2, 3, 4]]), "valid": np.array([[5, 6, 7, 8]]),
                                     "tstid": np.array([[9, 10, 11, 12]])})
        return {"root": str(root)}

    def cache_path(self) -> Path:
        return self.folder() / f"diffuse-{self.split}-{self.resolution}px.pt"

    def _read(self) -> tuple[Tensor, Tensor]:
        from torch.utils.data import DataLoader
        from torchvision.transforms import v2

        try:
            import scipy.io  # noqa: F401 - torchvision reads the .mat label files with it
        except ImportError:
            raise DiffuseError("dataset flowers102 needs scipy to read its .mat files: pip install scipy") from None
        r = self.resolution
        transform = v2.Compose([v2.Resize(r, antialias=True), v2.CenterCrop(r), v2.PILToTensor()])
        try:
            tv = _Flowers102Folder(str(self.root), split=self.split, transform=transform)
        except Exception as e:  # noqa: BLE001 - unreadable .mat files
            raise DiffuseError(f"dataset flowers102: cannot read the files in {self.folder()}: "
                               f"{' '.join(str(e).split())}") from None
        files = [p.name for p in tv._image_files]
        cached = self._load_cache(files)
        if cached is not None:
            return cached
        absent = [f for f in files if not (tv._images_folder / f).is_file()]
        if absent:
            raise DiffuseError(f"dataset flowers102: {len(absent)} images of split {self.split} missing in "
                               f"{tv._images_folder} (first: {absent[0]})")
        workers = self.num_workers
        if workers is None:  # worker start-up costs more than it saves on a few hundred images
            workers = min(8, os.cpu_count() or 1) if len(tv) >= 512 else 0
        log.info("decoding %d Flowers102 %s images to %d×%d (%d workers, once)", len(tv), self.split, r, r, workers)
        loader = DataLoader(tv, batch_size=64, shuffle=False, num_workers=workers)
        xs, ys = zip(*loader)
        images, labels = torch.cat(xs).contiguous(), torch.cat(ys).long()
        self._save_cache(images, labels, files)
        return images, labels

    def _load_cache(self, files: list[str]) -> tuple[Tensor, Tensor] | None:
        path = self.cache_path()
        if not path.is_file():
            return None
        try:
            state = torch.load(path, weights_only=True)
        except Exception:  # noqa: BLE001 - a damaged cache is just decoded again
            return None
        if state.get("files") != files or tuple(state["images"].shape[-2:]) != (self.resolution,) * 2:
            return None
        return state["images"], state["labels"]

    def _save_cache(self, images: Tensor, labels: Tensor, files: list[str]) -> None:
        path = self.cache_path()
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        try:
            torch.save({"images": images, "labels": labels, "files": files}, tmp)
            os.replace(tmp, path)
        except OSError as e:  # a read-only data folder: decode again next time
            log.warning("could not cache decoded Flowers102 at %s: %s", path, e)
            tmp.unlink(missing_ok=True)

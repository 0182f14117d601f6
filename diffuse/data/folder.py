"""`folder`: any folder of images or of .npy arrays, flat (unlabelled) or one sub-folder per class.

Layouts, as torchvision's ImageFolder reads them: `path/<class>/**/<file>` labels each file with its class
folder (classes numbered in sorted name order); `path/<file>` (files directly in the folder) is unlabelled:
num_classes 0 and y all zeros, so a flat folder trains an unconditional model. Files and folders whose name
starts with a dot are skipped. Both at once (files at the top and class folders) is an error.

Images (png, jpg, jpeg, webp, bmp; EXIF rotation applied; 16-bit grey scaled to 8 bits) are converted to
grey (channels=1: PIL's "L", ITU-R 601-2 luma) or RGB (channels=3), their shorter side resized to
`resolution` (antialiased), center-cropped to a square and kept as uint8 [N, C, R, R]. Arrays (.npy, one
item per file: [C, L], [C, H, W] or [C, D, H, W], the same shape in every file and the same size on every
spatial axis) are kept as float32 as they are: their values must already lie in [−1, 1].

Only the formats promised are decoded (PIL is told PNG, JPEG, WEBP, BMP: a `.png` that holds PostScript is
refused, never handed to Ghostscript). Symbolic links are followed, but each real folder is read once: a
link back up the tree (`b/up -> ..`) or into another class is skipped with a warning, so no file is
counted twice or under another class.

The files are decoded once (a DataLoader with workers, as Flowers102) into a cache keyed by the SHA-256 of
every file's content (with its path), the resolution and the channels, so a later run reads the files
(hashing is far cheaper than decoding) and one cache file instead; a file whose content changed is decoded
again whatever its size and mtime say (`cp -p`, `rsync -a` and tar keep those). The cache lives in the
user's own cache folder, $XDG_CACHE_HOME/diffuse/folder-cache/ (default ~/.cache/…), one sub-folder per
dataset folder, or in `dataset.cache_dir`: never beside or inside the data, where whoever can write the data's
folder could plant one and where a class folder's cache would look like data to its parent. Folders named
`*.diffuse-cache` (written there by older versions) are skipped when scanning. A set whose decoded size
exceeds `max_memory_mb` is cached as a memory-mapped .npy instead and each batch is read from it (the OS
keeps what fits in its page cache), so folders larger than RAM train too, at the cost of disk reads per batch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from diffuse.data.vision import InMemoryImages
from diffuse.devices import to_device
from diffuse.errors import DiffuseError
from diffuse.files import atomic_write, user_cache

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
ARRAY_EXTENSION = ".npy"
DEFAULT_EXTENSIONS = (*IMAGE_EXTENSIONS, ARRAY_EXTENSION)
DEFAULT_MAX_MEMORY_MB = 4096  # decoded sets above this are memory-mapped from disk instead of held in RAM
RANGE_TOLERANCE = 1e-3        # arrays: |value| ≤ 1 + this
RESOLVER = "folder_classes"   # ${folder_classes:PATH,EXTENSIONS} in conf/dataset/folder.yaml
CACHE_VERSION = 2             # part of the cache key: bump when decoding changes
OLD_CACHE_SUFFIX = ".diffuse-cache"        # the cache folders older versions wrote beside the data: never data
PIL_FORMATS = ("PNG", "JPEG", "WEBP", "BMP")  # what IMAGE_EXTENSIONS promise; PIL tries no other decoder


def home_cache() -> Path:
    """$XDG_CACHE_HOME/diffuse/folder-cache, else ~/.cache/diffuse/folder-cache."""
    return user_cache("folder-cache")


# -- the folder's layout ----------------------------------------------------------------------------------
def _extensions(extensions: Iterable[str] | None) -> tuple[str, ...]:
    """['png', '.JPG'] → ('.jpg', '.png'); .npy means arrays, anything else an image PIL can open."""
    exts = tuple(dict.fromkeys("." + str(e).lower().lstrip(".") for e in (extensions or DEFAULT_EXTENSIONS)))
    if not exts or exts == (".",):
        raise DiffuseError("dataset folder: dataset.extensions is empty")
    return exts


def _is_data(name: str, exts: tuple[str, ...]) -> bool:
    return not name.startswith(".") and name.lower().endswith(exts)


def _is_folder_to_read(name: str) -> bool:
    return not name.startswith(".") and not name.endswith(OLD_CACHE_SUFFIX)


def _identity(path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _walk(folder: Path, exts: tuple[str, ...], seen: set[tuple[int, int]]):
    """Relative posix paths of the data files under `folder` (any depth, hidden entries skipped), lazily.
    Links are followed, but a real folder already in `seen` (read before, or an ancestor: a loop) is
    skipped with a warning; `seen` is shared across the scan, so no folder is read twice."""
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        keep = []
        for d in sorted(d for d in dirnames if _is_folder_to_read(d)):
            try:
                identity = _identity(os.path.join(dirpath, d))
            except OSError:
                continue
            if identity in seen:
                log.warning("dataset folder: skipping %s: it leads to a folder already read (a link loop or a "
                            "second link to it)", os.path.join(dirpath, d))
                continue
            seen.add(identity)
            keep.append(d)
        dirnames[:] = keep
        rel = Path(dirpath).relative_to(folder)
        for name in sorted(filenames):
            if _is_data(name, exts):
                yield (rel / name).as_posix()


@dataclass
class FolderLayout:
    root: Path
    files: list[str]              # relative posix paths: sorted, class by class
    labels: list[int]             # class index per file (0 everywhere in a flat folder)
    class_names: tuple[str, ...]  # the class folders in sorted order; () for a flat folder

    @property
    def kind(self) -> str:
        return "arrays" if self.files[0].lower().endswith(ARRAY_EXTENSION) else "images"


def scan_folder(path: str | os.PathLike, extensions: Iterable[str] | None = None) -> FolderLayout:
    """The files and labels of a flat or class-per-folder folder; every bad layout is a one-line DiffuseError."""
    root = Path(path).expanduser()
    exts = _extensions(extensions)
    if not root.exists():
        raise DiffuseError(f"dataset folder: {root} does not exist (dataset.path)")
    if not root.is_dir():
        raise DiffuseError(f"dataset folder: {root} is not a folder (dataset.path)")
    with os.scandir(root) as it:
        entries = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
    top = [e.name for e in entries if not e.is_dir() and _is_data(e.name, exts)]
    classes: dict[str, list[str]] = {}
    seen = {_identity(root)}
    for e in entries:
        if e.is_dir() and _is_folder_to_read(e.name):
            identity = _identity(e.path)
            if identity in seen:
                log.warning("dataset folder: skipping %s: it leads to a folder already read", e.path)
                continue
            seen.add(identity)
            files = list(_walk(Path(e.path), exts, seen))
            if files:
                classes[e.name] = files
            else:
                log.info("dataset folder: skipping %s (no %s files)", e.path, "/".join(exts))
    if top and classes:
        raise DiffuseError(f"dataset folder: {root} has both files at its top level ({len(top)}, first: {top[0]}) "
                           f"and class folders ({', '.join(list(classes)[:5])}{', …' if len(classes) > 5 else ''}): "
                           f"move the files into class folders, or the class folders out")
    if not top and not classes:
        raise DiffuseError(f"dataset folder: no {', '.join(e.lstrip('.') for e in exts)} files in {root} "
                           f"(dataset.path, dataset.extensions)")
    if top:
        layout = FolderLayout(root, top, [0] * len(top), ())
    else:
        files, labels = [], []
        for i, (name, found) in enumerate(classes.items()):
            files += [f"{name}/{f}" for f in found]
            labels += [i] * len(found)
        layout = FolderLayout(root, files, labels, tuple(classes))
    arrays = [f for f in layout.files if f.lower().endswith(ARRAY_EXTENSION)]
    if arrays and len(arrays) != len(layout.files):
        image = next(f for f in layout.files if not f.lower().endswith(ARRAY_EXTENSION))
        raise DiffuseError(f"dataset folder: {root} mixes .npy arrays ({arrays[0]}) and images ({image}): "
                           f"use one kind per folder")
    return layout


def _has_data(folder: str, exts: tuple[str, ...], depth: int = 0) -> bool:
    """Whether any data file lies under `folder`, stopping at the first one found."""
    subdirs = []
    with os.scandir(folder) as it:
        for e in it:
            if e.name.startswith("."):
                continue
            if e.is_dir():
                if _is_folder_to_read(e.name):
                    subdirs.append(e.path)
            elif _is_data(e.name, exts):
                return True
    return any(_has_data(d, exts, depth + 1) for d in subdirs) if depth < 64 else False


def count_classes(path, extensions=None) -> int:
    """The resolver behind `num_classes: ${folder_classes:${.path},${.extensions}}`: how many class folders
    `path` has (0 for a flat folder), counted as scan_folder counts them but stopping at each folder's first
    file (it runs each time the config reads the value). Never raises: on a missing or odd folder it says 0
    and FolderDataset reports the problem in its own words."""
    try:
        exts = _extensions(extensions)
        with os.scandir(Path(str(path)).expanduser()) as it:
            entries = [e for e in it if not e.name.startswith(".")]
        if any(not e.is_dir() and _is_data(e.name, exts) for e in entries):
            return 0
        return sum(1 for e in entries if e.is_dir() and _is_folder_to_read(e.name) and _has_data(e.path, exts))
    except Exception:  # noqa: BLE001 - composing must not fail here; the dataset's own checks name the problem
        return 0


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# -- decoding one file (in DataLoader workers) --------------------------------------------------------------
def _one_line(e: Exception) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _pil_convert(img, channels: int):
    from PIL import Image, ImageOps

    img = ImageOps.exif_transpose(img)  # photos: the orientation they are shown in
    if img.mode.startswith("I;16"):     # 16-bit grey: PIL's convert("L") would clip, not scale
        img = Image.fromarray((np.asarray(img, dtype=np.float32) / 257).round().clip(0, 255).astype(np.uint8))
    elif img.mode in ("P", "PA"):       # palettes (with transparency) go through RGBA, as PIL asks
        img = img.convert("RGBA")
    return img.convert("L" if channels == 1 else "RGB")


class _Decode(torch.utils.data.Dataset):
    """files[i] → (item, "") or (zeros, why it failed). Failures come back as values so that the first bad
    file can be named in one line (an exception in a worker arrives as a multi-line traceback)."""

    def __init__(self, root: Path, files: list[str], kind: str, shape: tuple[int, ...], resolution: int):
        self.root, self.files, self.kind, self.shape = root, files, kind, shape
        if kind == "images":
            from torchvision.transforms import v2

            self.transform = v2.Compose([v2.Resize(resolution, antialias=True), v2.CenterCrop(resolution),
                                         v2.PILToTensor()])

    def __len__(self) -> int:
        return len(self.files)

    def read(self, i: int) -> Tensor:
        path = self.root / self.files[i]
        if self.kind == "images":
            from PIL import Image

            try:
                with Image.open(path, formats=PIL_FORMATS) as img:
                    img = _pil_convert(img, self.shape[0])  # decodes: a truncated file fails here
            except Exception as e:  # noqa: BLE001 - any decoder error is the file's
                raise ValueError(f"cannot be read as an image ({_one_line(e)})") from None
            return self.transform(img)
        try:
            a = np.load(path, allow_pickle=False)  # never pickles: files are untrusted input
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"cannot be read as a .npy array ({_one_line(e)})") from None
        if a.shape != self.shape:
            raise ValueError(f"has shape {tuple(a.shape)} but {self.files[0]} has {self.shape}: every array "
                             f"must have the same shape")
        if not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
            raise ValueError(f"holds {a.dtype}, not real numbers")
        a = a.astype(np.float32)
        if not np.isfinite(a).all():
            raise ValueError("holds NaN or infinite values")
        peak = float(np.abs(a).max()) if a.size else 0.0
        if peak > 1 + RANGE_TOLERANCE:
            raise ValueError(f"has values up to ±{peak:.4g}, but arrays must already lie in [-1, 1]: normalise "
                             f"them first, e.g. 2·(a − min)/(max − min) − 1 over the whole set")
        return torch.from_numpy(a)

    def __getitem__(self, i: int) -> tuple[Tensor, str]:
        try:
            return self.read(i), ""
        except ValueError as e:
            dtype = torch.uint8 if self.kind == "images" else torch.float32
            return torch.zeros(self.shape, dtype=dtype), str(e)


# -- the dataset ----------------------------------------------------------------------------------------
class FolderDataset(InMemoryImages):
    """A folder of images or .npy arrays (see the module docstring) with the interface of diffuse.data.

    images: uint8 [N, C, R, R] (image files) or float32 [N, C, *S] in [−1, 1] (.npy files); None when
    streaming from the memory-mapped cache. labels: int64 [N]. get_batch → x float32 [B, C, *S] in [−1, 1],
    y int64 [B] (zeros when unlabelled).

    InMemoryImages.__init__ is not called (it reads torchvision's files): this class shares its batch side
    (get_batch, to, __len__), which reads only images/labels/channels/hflip, and reads memmapped items in
    _gather.
    """

    name = "folder"

    def __init__(self, path: str | os.PathLike | None = None, dim: int = 2, resolution: int = 64, channels: int = 3,
                 num_classes: int | None = None, conditional: bool = False, hflip: bool = False,
                 num_workers: int | None = None, max_memory_mb: float = DEFAULT_MAX_MEMORY_MB,
                 extensions: Iterable[str] | None = DEFAULT_EXTENSIONS, cache_dir: str | os.PathLike | None = None):
        if path in (None, ""):
            raise DiffuseError("dataset folder: set dataset.path to a folder of images or .npy arrays")
        if dim not in (1, 2, 3):
            raise DiffuseError(f"dataset folder: dim must be 1, 2 or 3; got {dim}")
        if int(resolution) < 1 or int(channels) < 1:
            raise DiffuseError(f"dataset folder: resolution and channels must be positive; got {resolution}, "
                               f"{channels}")
        if float(max_memory_mb) < 0:
            raise DiffuseError(f"dataset folder: max_memory_mb must be ≥ 0; got {max_memory_mb}")
        self.root = Path(path).expanduser().absolute()
        layout = scan_folder(self.root, extensions)
        self.kind, self.split = layout.kind, "train"
        self.dim, self.resolution, self.channels = int(dim), int(resolution), int(channels)
        self.hflip, self.num_workers, self.max_memory_mb = bool(hflip), num_workers, float(max_memory_mb)
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir not in (None, "") else None
        self.item_shape = self._item_shape(layout)
        files, labels, self.class_names = self._classes(layout, num_classes, bool(conditional))
        self.num_classes = len(self.class_names)
        self.files, self.labels = files, torch.tensor(labels, dtype=torch.long)
        self.images: Tensor | None = None
        self._memmap: np.ndarray | None = None
        self.cache_path: Path | None = None  # the cache file read or written (None: none could be written)
        self._load_or_decode()

    splits = ()  # one set of files: no named splits

    @classmethod
    def write_example(cls, root) -> dict:
        """root/images: two class folders (torchvision's ImageFolder layout) of 4 random-pixel PNGs each."""
        from PIL import Image

        rng = np.random.default_rng(0)
        for label in ("a", "b"):
            folder = Path(root) / "images" / label
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        return {"path": str(Path(root) / "images"), "cache_dir": str(Path(root) / "cache")}

    def heldout(self, n: int) -> None:
        """A folder has no held-out split: the jobs say so and use training items."""
        return None

    # -- checks ------------------------------------------------------------------------------------------
    def _item_shape(self, layout: FolderLayout) -> tuple[int, ...]:
        """[C, *S] of one stored item; for arrays read from the first file's header and checked against
        the config (the model and `diffuse sample` read dim/resolution/channels from it, not from the data)."""
        if self.kind == "images":
            if self.dim != 2:
                raise DiffuseError(f"dataset folder: {self.root} holds images, which are 2-D, but dim={self.dim}")
            if self.channels not in (1, 3):
                raise DiffuseError(f"dataset folder: channels must be 1 (grey) or 3 (RGB) for images; "
                                   f"got {self.channels}")
            return (self.channels, self.resolution, self.resolution)
        first = self.root / layout.files[0]
        try:
            shape = tuple(np.load(first, mmap_mode="r", allow_pickle=False).shape)  # the header only
        except Exception as e:  # noqa: BLE001
            raise DiffuseError(f"dataset folder: {first} cannot be read as a .npy array ({_one_line(e)})") from None
        spatial = shape[1:]
        if not 1 <= len(spatial) <= 3 or len(set(spatial)) != 1:
            raise DiffuseError(f"dataset folder: {first} has shape {shape}; expected [C, L], [C, H, W] or "
                               f"[C, D, H, W] with the same size on every spatial axis")
        if len(spatial) != self.dim:
            raise DiffuseError(f"dataset folder: the arrays in {self.root} are {len(spatial)}-D "
                               f"({first.name}: {shape}) but dim={self.dim}")
        if spatial[0] != self.resolution or shape[0] != self.channels:
            raise DiffuseError(f"dataset folder: the arrays in {self.root} are {shape} ([C, *spatial]) but "
                               f"dataset.resolution={self.resolution}, dataset.channels={self.channels}: set "
                               f"dataset.resolution={spatial[0]} dataset.channels={shape[0]}")
        return shape

    def _classes(self, layout: FolderLayout, num_classes: int | None, conditional: bool):
        """(files, labels, class_names) after dataset.num_classes: all classes (None), the first N, or none (0)."""
        found = len(layout.class_names)
        n = found if num_classes is None else int(num_classes)
        if not found and n:
            raise DiffuseError(f"dataset folder: {self.root} has no class folders (its files lie directly in it) "
                               f"but dataset.num_classes={n}")
        if not 0 <= n <= found:
            raise DiffuseError(f"dataset folder: {self.root} has {found} class folders; num_classes must be "
                               f"0…{found}, got {n}")
        if n == 1 and conditional:
            where = "has one class folder" if found == 1 else "keeps one class folder (dataset.num_classes=1)"
            raise DiffuseError(f"dataset folder: {self.root} {where} ({layout.class_names[0]}); set "
                               f"conditional=false or add class folders")
        if n == 0:  # unlabelled: every file, y = 0
            return layout.files, [0] * len(layout.files), ()
        keep = [i for i, y in enumerate(layout.labels) if y < n]
        return [layout.files[i] for i in keep], [layout.labels[i] for i in keep], layout.class_names[:n]

    # -- the cache -----------------------------------------------------------------------------------------
    @property
    def streaming(self) -> bool:
        """Whether batches are read from the memory-mapped cache (the decoded set exceeds max_memory_mb)."""
        itemsize = 1 if self.kind == "images" else 4
        return len(self.files) * int(np.prod(self.item_shape)) * itemsize > self.max_memory_mb * 2**20

    def cache_dirs(self) -> list[Path]:
        """Where the cache is looked for and written: dataset.cache_dir if set, else the user's own cache folder
        (home_cache()/<name>-<hash of the folder's absolute path>), never a folder beside the data."""
        if self.cache_dir is not None:
            return [self.cache_dir]
        digest = hashlib.sha1(str(self.root).encode()).hexdigest()[:12]
        return [home_cache() / f"{self.root.name or 'root'}-{digest}"]

    def cache_stem(self) -> str:
        shape = "x".join(map(str, self.item_shape))
        return f"{self.kind}-{shape}{'-mmap' if self.streaming else ''}"

    def cache_key(self) -> str:
        """A hash of everything the decoded set depends on: every file's path and content (SHA-256), the item
        shape (resolution, channels) and the decoding itself (CACHE_VERSION)."""
        digests = []
        for f in self.files:
            try:
                digests.append((f, _sha256(self.root / f)))
            except OSError as e:
                raise DiffuseError(f"dataset folder: cannot read {self.root / f}: {e.strerror}") from None
        blob = json.dumps([CACHE_VERSION, self.kind, list(self.item_shape), digests]).encode()
        return hashlib.sha256(blob).hexdigest()

    def _load_or_decode(self) -> None:
        key, stem, n = self.cache_key(), self.cache_stem(), len(self.files)
        for folder in self.cache_dirs():
            if self.streaming:
                data, key_file = folder / f"{stem}.npy", folder / f"{stem}.key"
                try:
                    if key_file.read_text().strip() == key:
                        mm = np.load(data, mmap_mode="r", allow_pickle=False)
                        if mm.shape == (n, *self.item_shape):
                            self._memmap, self.cache_path = mm, data
                            log.info("dataset folder: reading %d items from the memory-mapped cache %s", n, data)
                            return
                except (OSError, ValueError):
                    pass
            else:
                path = folder / f"{stem}.pt"
                try:  # mmap: a stale cache is rejected without reading its images
                    state = torch.load(path, weights_only=True, mmap=True)
                except Exception:  # noqa: BLE001 - absent or damaged: decode again
                    continue
                if state.get("key") == key and tuple(state["images"].shape) == (n, *self.item_shape):
                    self.images, self.cache_path = state["images"], path
                    return
        if self.streaming:
            self._decode_to_memmap(key, stem)
        else:
            self.images = self._decode(torch.empty((n, *self.item_shape), dtype=self._dtype))
            self._save(key, stem)

    @property
    def _dtype(self) -> torch.dtype:
        return torch.uint8 if self.kind == "images" else torch.float32

    def _save(self, key: str, stem: str) -> None:
        for folder in self.cache_dirs():
            path = folder / f"{stem}.pt"
            try:
                atomic_write(path, lambda tmp: torch.save({"key": key, "images": self.images}, tmp), "the cache")
            except DiffuseError as e:  # not writable here (or a full disk): decoded again next time
                log.info("dataset folder: %s", e)
                continue
            self.cache_path = path
            log.info("dataset folder: cached %d decoded items at %s", len(self.files), path)
            return
        self.cache_path = None
        log.warning("dataset folder: could not cache the decoded set anywhere (%s): it is decoded again next time",
                    ", ".join(map(str, self.cache_dirs())))

    def _decode_to_memmap(self, key: str, stem: str) -> None:
        """Decode straight into a .npy on disk (never the whole set in memory), then map it read-only."""
        shape, dtype = (len(self.files), *self.item_shape), np.dtype(np.uint8 if self.kind == "images" else np.float32)
        errors = []
        for folder in self.cache_dirs():
            data, key_file = folder / f"{stem}.npy", folder / f"{stem}.key"
            tmp = data.with_suffix(f".tmp{os.getpid()}.npy")
            try:
                folder.mkdir(parents=True, exist_ok=True)
                key_file.unlink(missing_ok=True)  # the key goes last: a half-written cache never matches
                out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
            except OSError as e:
                errors.append(f"{folder}: {e.strerror or e}")
                continue
            try:
                self._decode(out)
                out.flush()
                del out
                os.replace(tmp, data)
                key_file.write_text(key + "\n")
            except BaseException as e:
                tmp.unlink(missing_ok=True)
                if isinstance(e, OSError):
                    errors.append(f"{folder}: {e.strerror or e}")
                    continue
                raise
            self._memmap, self.cache_path = np.load(data, mmap_mode="r", allow_pickle=False), data
            log.info("dataset folder: cached %d decoded items as a memory map at %s", shape[0], data)
            return
        raise DiffuseError(f"dataset folder: the decoded set ({np.prod(shape) * dtype.itemsize / 2**20:.0f} MB) "
                           f"exceeds max_memory_mb={self.max_memory_mb:g} and must be cached on disk, but no cache "
                           f"folder is writable ({'; '.join(errors)}): set dataset.cache_dir")

    def _decode(self, out):
        """Decode every file into `out` ([N, C, *S]: a tensor, or a writable memmap) with a DataLoader."""
        from torch.utils.data import DataLoader
        from tqdm import tqdm

        decoder = _Decode(self.root, self.files, self.kind, self.item_shape, self.resolution)
        try:  # the first file in this process: a bad folder fails at once, not after spawning workers
            decoder.read(0)
        except ValueError as e:
            raise DiffuseError(f"dataset folder: {self.root / self.files[0]} {e}") from None
        n, workers = len(self.files), self.num_workers
        if workers is None:  # worker start-up costs more than it saves on a few hundred files
            workers = min(8, os.cpu_count() or 1) if n >= 512 else 0
        log.info("dataset folder: decoding %d %s from %s to %s (%d workers, once)", n, self.kind, self.root,
                 "×".join(map(str, self.item_shape)), workers)
        loader = DataLoader(decoder, batch_size=64, shuffle=False, num_workers=int(workers))
        bar = tqdm(total=n, desc=f"decoding {self.root.name}", unit=self.kind[:-1], dynamic_ncols=True,
                   disable=int(os.environ.get("RANK", "0")) != 0 or n < 512)
        pos = 0
        try:
            for x, why in loader:
                bad = next((i for i, w in enumerate(why) if w), None)
                if bad is not None:
                    raise DiffuseError(f"dataset folder: {self.root / self.files[pos + bad]} {why[bad]}")
                out[pos:pos + len(x)] = x if isinstance(out, Tensor) else x.numpy()
                pos += len(x)
                bar.update(len(x))
        finally:
            bar.close()
        return out

    # -- the batch side: memmapped items are read per batch ------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.labels.device

    def to(self, device: torch.device | str) -> FolderDataset:
        """In memory: as InMemoryImages (the whole set moves). Streaming: the labels move, and each batch
        read from the memory map is moved to `device`."""
        if self._memmap is None:
            return super().to(device)
        self.labels = self.labels.to(device)
        return self

    def _gather(self, indices: Tensor) -> Tensor:
        if self._memmap is None:
            return super()._gather(indices)
        rows = np.asarray(self._memmap[indices.cpu().numpy()])  # reads these items only (a copy); CPU indices
        return to_device(torch.from_numpy(rows), self.labels.device)

    def __repr__(self) -> str:
        return (f"FolderDataset(path={self.root}, {self.kind}, n={len(self)}, item={list(self.item_shape)}, "
                f"num_classes={self.num_classes}, hflip={self.hflip}, streaming={self._memmap is not None}, "
                f"device={self.device})")

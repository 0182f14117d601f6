"""Inception metrics (FID, KID, precision/recall) through torch-fidelity: `diffuse evaluate metrics=[fid,…]`.

The feature pipeline (TF-compatible bilinear resize to 299², the 2015-12-05 InceptionV3, its pool3 features) and
the metric formulas are torch-fidelity's own; this module only feeds it and guards the edges:
- images: our float [-1, 1] `[N, C, H, W]` → uint8 `[N, 3, H, W]`, grey replicated to RGB, the same conversion
  for generated and real images (torch-fidelity then resizes both the same way);
- weights: `inception_weights=PATH`, else the file in torch hub's cache where torch-fidelity would have downloaded
  it; with neither, a one-line error before any sampling, never a download (runs may have no network). The file
  is checked with `weights_only=True` first, because torch-fidelity itself unpickles it without that guard;
- one feature pass per set for all three metrics: precision/recall use Inception pool3 too (torch-fidelity's
  default for them would be a second network, VGG16, and a second download).
`compute` takes tensors, so a training callback can call it as evaluate does. torch-fidelity is an optional
dependency (`pip install -e ".[fid]"`), imported only when these metrics are asked for.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

from diffuse.errors import DiffuseError

METRICS = ("fid", "kid", "prc")
WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"  # the name torch-fidelity downloads it under
FEATURE_EXTRACTOR = "inception-v3-compat"
_KEYS = {"frechet_inception_distance": "fid", "kernel_inception_distance_mean": "kid_mean",
         "kernel_inception_distance_std": "kid_std", "precision": "precision", "recall": "recall"}


def _library():
    try:
        import torch_fidelity
    except ImportError:
        raise DiffuseError("metrics fid/kid/prc need torch-fidelity: pip install torch-fidelity "
                           "(or pip install -e \".[fid]\")") from None
    return torch_fidelity


def weights_url() -> str:
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
    return URL_INCEPTION_V3


def cache_path() -> Path:
    """Where torch-fidelity's `load_state_dict_from_url` keeps the file: $TORCH_HOME/hub/checkpoints/ (TORCH_HOME
    defaults to $XDG_CACHE_HOME/torch, i.e. ~/.cache/torch)."""
    return (Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILE).absolute()


@dataclass(frozen=True)
class Weights:
    """A vetted Inception weights file and its SHA-256 (recorded with every number: which network made it)."""

    path: Path
    sha256: str


def find_weights(path: str | Path | None = None) -> Weights:
    """`path`, else torch-fidelity's cached download; a one-line DiffuseError when neither is there or the file
    is not a plain InceptionV3 state dict. Never downloads."""
    _library()
    if path is None:
        found = cache_path()
        if not found.is_file():
            raise DiffuseError(f"Inception weights not found and not downloaded (offline-safe): put {weights_url()} "
                               f"at {found}, or pass inception_weights=PATH")
    else:
        found = Path(path).expanduser()
        if not found.is_file():
            raise DiffuseError(f"inception_weights={path}: no such file (download {weights_url()})")
    try:  # torch-fidelity loads it with weights_only=False: refuse anything that is more than tensors
        state = torch.load(found, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        raise DiffuseError(f"inception_weights {found}: not a plain state dict of tensors, refused "
                           f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    fc = state.get("fc.weight") if isinstance(state, Mapping) else None
    if not isinstance(fc, Tensor) or tuple(fc.shape) != (1008, 2048):
        raise DiffuseError(f"inception_weights {found}: not torch-fidelity's InceptionV3 state dict "
                           f"(expected fc.weight of shape (1008, 2048)); the right file: {weights_url()}")
    digest = hashlib.sha256()
    with open(found, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return Weights(found.resolve(), digest.hexdigest())


def check_images(shape: Iterable[int]) -> None:
    """Refuse, in one line, images Inception cannot see: it takes 2-D pictures with 1 (replicated) or 3 channels."""
    channels, *spatial = (int(s) for s in shape)
    if len(spatial) != 2:
        raise DiffuseError(f"metrics fid/kid/prc need 2-D images, but this data is {len(spatial)}-D "
                           f"([C, *spatial] = {[channels, *spatial]}); Inception sees only pictures: use metrics=[fd]")
    if channels not in (1, 3):
        raise DiffuseError(f"metrics fid/kid/prc need grey or RGB images, but this data has {channels} channels; "
                           f"use metrics=[fd]")


def check_settings(n: int, metrics: Iterable[str], kid_subset_size: int, prc_neighborhood: int) -> None:
    """Settings that would fail inside torch-fidelity with n images a side, as one line before any work."""
    metrics = tuple(metrics)
    unknown = sorted(set(metrics) - set(METRICS))
    if unknown or not metrics:
        raise DiffuseError(f"Inception metrics must be some of {list(METRICS)}; got {list(metrics)}")
    if n < 2:
        raise DiffuseError(f"Inception metrics need at least 2 images a side; got {n}")
    if "kid" in metrics and kid_subset_size < 2:
        raise DiffuseError(f"kid_subset_size must be at least 2 (KID is unbiased over pairs); got {kid_subset_size}")
    if "prc" in metrics and not 1 <= prc_neighborhood < n:
        raise DiffuseError(f"prc_neighborhood must be 1 … {n - 1} with {n} images a side; got {prc_neighborhood}")


def to_uint8_rgb(x: Tensor) -> Tensor:
    """Float [-1, 1] `[N, C, H, W]` → uint8 `[N, 3, H, W]`, what torch-fidelity takes (it resizes to 299 itself).
    Rounds to the nearest level, so 8-bit data read as v/127.5 − 1 comes back exactly; grey → 3 equal channels."""
    check_images(x.shape[1:])
    u = ((x.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return u.expand(-1, 3, -1, -1).contiguous() if u.shape[1] == 1 else u


class _Images(Dataset):
    """uint8 images in memory as torch-fidelity's input; counts the images its loader fetches, for a bar."""

    def __init__(self, images: Tensor, progress: Callable[[int], object] | None = None):
        self.images, self.progress = images, progress

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Tensor:
        return self.images[i]

    def __getitems__(self, indices: list[int]) -> list[Tensor]:  # one call per batch (the loader's own check of
        if self.progress is not None:                              # item 0 goes through __getitem__, uncounted)
            self.progress(len(indices))
        return [self.images[i] for i in indices]


def compute(samples: Tensor, reference: Tensor, metrics: Iterable[str] = METRICS,
            weights: Weights | str | Path | None = None, device: torch.device | str = "cpu", batch_size: int = 64,
            kid_subset_size: int = 1000, kid_subsets: int = 100, prc_neighborhood: int = 3,
            progress: Callable[[int], object] | None = None) -> dict:
    """FID / KID / precision-recall of `samples` against `reference` (float [-1, 1] `[N, C, H, W]` each) with
    torch-fidelity, in one feature pass per set. Returns the asked ones of fid, kid_mean, kid_std (and the
    kid_subset_size used: capped at the set sizes), precision, recall, with num_samples, num_reference, the
    weights (path, SHA-256) and torch-fidelity's version. Pass a `find_weights` result when calling it repeatedly
    (a training callback): a path is vetted and hashed on every call. The network runs on `device` when that is
    CUDA, else on the CPU (torch-fidelity knows no other)."""
    metrics = tuple(metrics)
    check_settings(min(len(samples), len(reference)), metrics, kid_subset_size, prc_neighborhood)
    lib = _library()
    weights = weights if isinstance(weights, Weights) else find_weights(weights)
    if samples.shape[1:] != reference.shape[1:]:
        raise DiffuseError(f"samples are {tuple(samples.shape[1:])} but the reference is {tuple(reference.shape[1:])}")
    fake, real = to_uint8_rgb(samples), to_uint8_rgb(reference)
    subset = min(int(kid_subset_size), len(fake), len(real))
    device = torch.device(device)
    cuda = device.type == "cuda"
    with torch.cuda.device(device) if cuda else nullcontext():  # torch-fidelity calls .cuda(): the current device
        raw = lib.calculate_metrics(
            input1=_Images(fake, progress), input2=_Images(real, progress),  # input1 = generated: precision's side
            fid="fid" in metrics, kid="kid" in metrics, prc="prc" in metrics,
            feature_extractor=FEATURE_EXTRACTOR, feature_extractor_weights_path=str(weights.path),
            cuda=cuda, batch_size=int(batch_size), kid_subsets=int(kid_subsets), kid_subset_size=subset,
            prc_neighborhood=int(prc_neighborhood),
            cache=False, save_cpu_ram=True, verbose=False)  # save_cpu_ram: no loader workers for in-memory tensors
    out = {ours: float(raw[theirs]) for theirs, ours in _KEYS.items() if theirs in raw}
    if "kid" in metrics:
        out["kid_subset_size"] = subset
    out.update(num_samples=len(fake), num_reference=len(real),
               inception_weights=str(weights.path), inception_weights_sha256=weights.sha256,
               torch_fidelity_version=lib.__version__)
    return out

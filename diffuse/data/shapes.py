"""`shapes`: a labelled procedural dataset in 1-D, 2-D and 3-D that needs no download.

Each item is one anti-aliased shape on a −1 background, drawn from parameters fixed by (seed, index),
so the dataset is deterministic and never held in memory as pixels: a batch is rendered on demand
(vectorised; ~1 ms for 64 images at 32×32), so data is never the bottleneck.

Classes (2-D / 3-D): 0 ball (L2), 1 box (L∞), 2 diamond / octahedron (L1), 3 cross (axis bars).
Classes (1-D):       0 Gaussian bump, 1 box pulse, 2 tent, 3 sine wave.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from diffuse.data.base import Dataset
from diffuse.devices import to_device
from diffuse.rules import Int

CLASS_NAMES = {1: ("bump", "box", "tent", "sine"), 2: ("ball", "box", "diamond", "cross"),
               3: ("ball", "box", "octahedron", "cross")}


class ShapesDataset(Dataset):
    """dim: 1, 2 or 3; resolution: pixels per side; channels: 1 (grey) or more (random per-sample colour)."""

    config_rules = {"size": Int(1), "seed": Int(0)}
    HELDOUT_SEED_OFFSET = 1_000_003  # held-out shapes come from seed + this: parameters training never draws

    def __init__(self, dim: int = 2, resolution: int = 32, channels: int = 1, num_classes: int = 4,
                 size: int = 60000, seed: int = 0):
        if dim not in (1, 2, 3):
            raise ValueError(f"shapes supports dim 1, 2 or 3; got {dim}")
        if not 1 <= num_classes <= 4:
            raise ValueError(f"shapes has 4 classes; num_classes must be 1…4, got {num_classes}")
        self.dim, self.resolution, self.channels = dim, resolution, channels
        self.num_classes, self.size, self.seed = num_classes, size, seed
        self.class_names = CLASS_NAMES[dim][:num_classes]
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, num_classes, (size,), generator=g)
        self.centers = (torch.rand(size, dim, generator=g) - 0.5) * 0.7          # in [−0.35, 0.35]
        self.radii = 0.35 + 0.25 * torch.rand(size, generator=g)                  # in [0.35, 0.60]
        self.extra = torch.rand(size, 2, generator=g)                             # width / frequency, phase
        self.colors = 0.5 + 0.5 * torch.rand(size, channels, generator=g) if channels > 1 else None
        axis = torch.linspace(-1 + 1 / resolution, 1 - 1 / resolution, resolution)
        self.coords = torch.stack(torch.meshgrid(*([axis] * dim), indexing="ij"))  # [dim, *spatial]
        self.pixel = 2.0 / resolution

    def __len__(self) -> int:
        return self.size

    def heldout(self, n: int) -> "ShapesDataset":
        """n shapes of another seed range (the same classes, sizes and colours' law)."""
        return ShapesDataset(self.dim, self.resolution, self.channels, self.num_classes, size=int(n),
                             seed=self.seed + self.HELDOUT_SEED_OFFSET)

    def to(self, device: torch.device | str) -> "ShapesDataset":
        """Render on `device`: the trainer calls this, so a GPU run draws its batches there instead of
        spending host time on them every step."""
        for name in ("labels", "centers", "radii", "extra", "colors", "coords"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(device))
        return self

    def get_batch(self, indices: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """indices: [B] int64 → x [B, channels, *spatial] in [−1, 1], y [B] int64, on the dataset's device."""
        indices = to_device(indices, self.labels.device)
        y = self.labels[indices]
        view = (-1, *([1] * self.dim))
        rel = self.coords[None] - self.centers[indices].view(-1, self.dim, *([1] * self.dim))  # [B, dim, *sp]
        r = self.radii[indices].view(view)
        if self.dim == 1:
            sdf = self._profiles_1d(rel[:, 0], r, self.extra[indices], y)
        else:
            sdf = self._sdf_nd(rel, r, self.extra[indices], y)
        fill = (0.5 - sdf / self.pixel).clamp(0, 1)  # anti-aliased coverage in [0, 1]
        x = (2 * fill - 1).unsqueeze(1)
        if self.colors is not None:
            x = -1 + (x + 1) * self.colors[indices].view(-1, self.channels, *([1] * self.dim))
        else:
            x = x.expand(-1, self.channels, *x.shape[2:])
        return x.contiguous(), y

    def _sdf_nd(self, rel: Tensor, r: Tensor, extra: Tensor, y: Tensor) -> Tensor:
        a = rel.abs()
        l2 = rel.norm(dim=1) - r
        linf = a.amax(dim=1) - 0.8 * r
        l1 = a.sum(dim=1) - 1.2 * r
        width = (0.25 + 0.15 * extra[:, 0]).view(r.shape) * r
        bars = [torch.maximum(torch.cat([a[:, :i], a[:, i + 1:]], 1).amax(1) - width, a[:, i] - r)
                for i in range(self.dim)]
        cross = torch.stack(bars).amin(0)
        out = torch.stack([l2, linf, l1, cross])  # [4, B, *spatial]
        return out.gather(0, y.view(1, -1, *([1] * self.dim)).expand(1, *l2.shape))[0]

    def _profiles_1d(self, u: Tensor, r: Tensor, extra: Tensor, y: Tensor) -> Tensor:
        """Signed 'distance' < 0 inside; profiles are turned into it so they share the anti-aliasing."""
        height = lambda h: (0.5 - h) * self.pixel * 2  # noqa: E731  height h∈[0,1] ↦ level −1+2h after fill
        bump = height(torch.exp(-0.5 * (u / (0.4 * r)) ** 2))
        box = u.abs() - r
        tent = height((1 - u.abs() / r).clamp(0, 1))
        freq = (2 + 3 * extra[:, 0]).view(-1, 1)
        phase = 2 * math.pi * extra[:, 1].view(-1, 1)
        sine = height(0.5 + 0.5 * torch.sin(math.pi * freq * u + phase))
        out = torch.stack([bump, box, tent, sine])
        return out.gather(0, y.view(1, -1, 1).expand(1, *u.shape))[0]

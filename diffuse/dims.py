"""Spatial dimensionality and the shape of one data item: the same rule for models, data and jobs."""

from __future__ import annotations

from diffuse.errors import DiffuseError


def check_dim(dim) -> int:
    """1, 2 or 3 spatial dimensions."""
    if dim not in (1, 2, 3):
        raise DiffuseError(f"dim must be 1, 2 or 3; got {dim!r}")
    return int(dim)


def item_shape(channels: int, resolution: int, dim: int) -> tuple[int, ...]:
    """[C, *spatial] of one item: `resolution` along each of the `dim` spatial axes."""
    return (int(channels), *[int(resolution)] * check_dim(int(dim)))


def config_item_shape(config) -> tuple[int, ...]:
    """[C, *spatial] of a run's items from its config (composed, or stored in a checkpoint): dataset.channels,
    dataset.resolution and dim (a latent run's dataset node describes its latents)."""
    return item_shape(config["dataset"]["channels"], config["dataset"]["resolution"], config["dim"])


def by_dim(dim, *values):
    """`${by_dim:${dim},a,b,c}` in a YAML: a for 1-D, b for 2-D, c for 3-D data (defaults sized per dim, e.g.
    3-D shapes at 16³ so that a CPU trains them in minutes). A dim outside 1–3 gets the 3-D value here and is
    reported by the config check, in one line naming `dim`."""
    if len(values) != 3:
        raise ValueError(f"by_dim takes the dim and three values (1-D, 2-D, 3-D); got {len(values)} values")
    try:
        return values[min(max(int(dim), 1), 3) - 1]
    except (TypeError, ValueError):
        return values[-1]

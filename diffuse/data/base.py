"""The dataset contract every part of diffuse relies on, and the rules of the keys datasets share.

A dataset (ours, or a class of your own named by `dataset._target_`) has
  dim, resolution, channels, num_classes     what one item is: [channels, resolution^dim], labels 0…num_classes−1
  class_names                                 (optional) one name per class, for grids and logs
  __len__()                                   the number of items
  get_batch(indices [B] int64, generator)     → (x [B, channels, *spatial] float in [−1, 1], y [B] int64)
  heldout(n)                                  (optional) items the run never trains on, as a dataset of the same
                                              kind (a test split, another seed range), or None where it has none
  splits                                      (optional, a class attribute) the names its `split` key takes; ()
                                              when it has no named splits (evaluate's reference_split, train-vae's
                                              evaluate.split apply to datasets that have them)
  to(device)                                  (optional) where get_batch returns its tensors
  write_example(root)                         (optional, a classmethod) writes a tiny copy of the files the class
                                              reads under root and returns the config keys that read it; the
                                              dataset contract test runs every conf/dataset/*.yaml on it
Subclassing `Dataset` gives the shared rules, `heldout` = None and an example that needs no files.
"""

from __future__ import annotations

from diffuse.building import part_class
from diffuse.rules import BOOL, Choice, Float, Int, Rule


class Dataset:
    """Base of diffuse's datasets: the rules of the keys they share (see diffuse/rules.py) and no held-out items."""

    config_rules = {"dim": Choice(1, 2, 3), "resolution": Int(2), "channels": Int(1),
                    "num_classes": Int(0, nullable=True), "download": BOOL, "hflip": Rule("bool", nullable=True),
                    "num_workers": Int(0, nullable=True), "max_memory_mb": Float(0, open_lo=True)}

    splits: tuple[str, ...] = ()

    @classmethod
    def write_example(cls, root) -> dict:
        """Writes a few items in the on-disk layout this class reads under root (a Path) and returns the
        config keys that read them (e.g. {"root": ...}). Procedural data needs no files: {}."""
        return {}

    def heldout(self, n: int) -> "Dataset | None":
        """At least n items this dataset's training never sees (the validation loss and in-training FD use
        the first n), or None when it has no such items (the jobs then say so and use training items)."""
        return None


def split_config(node: dict, split: str | None) -> dict | None:
    """The config `node` (a plain dict) of the same dataset on `split`, when its class (one of ours) has named
    splits; None when it has none or no split is asked for."""
    cls = part_class(node.get("_target_"))
    if not split or not getattr(cls, "splits", ()):
        return None
    return {**node, "split": split}


def heldout_of(dataset, n: int):
    """dataset.heldout(n) for a dataset that defines it (classes of your own may not), else None."""
    method = getattr(dataset, "heldout", None)
    return method(n) if callable(method) else None

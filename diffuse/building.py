"""Building parts from config nodes (`_target_`), and the allow-list for configs that come from files.

A config composed from our own `conf/` plus the command line is the user's own: `build` instantiates it.
A config read from a file (a checkpoint's stored config, the VAE record a latent checkpoint embeds) is
untrusted input: Hydra's `instantiate` would call whatever `_target_` it names (`pathlib.Path.touch`,
`os.system`, or `diffuse.training.checkpoint.os.remove`, which a plain "starts with diffuse." test lets
through). `check_targets` walks such a config before anything is built and accepts only classes defined
in the packages that hold our parts (models, schedules, samplers, datasets), plus prefixes the user
allowed explicitly (`allow_targets: [mypkg.]`), each named by its defining module and class name.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping, Sequence

from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from diffuse.errors import DiffuseError

# Where the classes that a stored config may build live: the parts, not the jobs, trackers or trainers.
PART_PACKAGES = ("diffuse.models.", "diffuse.diffusion.schedules.", "diffuse.diffusion.samplers.",
                 "diffuse.data.")


def build(node: DictConfig | dict, what: str, **kwargs):
    """hydra.utils.instantiate with a one-line error naming the config group on bad values."""
    try:
        return instantiate(node, **kwargs)
    except DiffuseError:
        raise
    except Exception as e:  # noqa: BLE001 - Hydra wraps the constructor's error; show its root cause
        root = e
        while root.__cause__ is not None:
            root = root.__cause__
        msg = str(root).strip().splitlines()[-1] if str(root).strip() else type(root).__name__
        target = node.get("_target_") if isinstance(node, (dict, DictConfig)) else None
        if isinstance(root, ImportError) and target and not str(target).startswith("diffuse."):
            msg += (f" (_target_: {target}: install its package, or put the folder that holds it on "
                    "PYTHONPATH; the `diffuse` command does not import from the current folder)")
        raise DiffuseError(f"cannot build {what}: {msg}") from None


# Classes that moved since checkpoints were first written: old stored name → its home now.
MOVED_TARGETS = {"diffuse.latent.LatentDataset": "diffuse.data.latent.LatentDataset"}


def upgrade_targets(config):
    """Rename moved classes (MOVED_TARGETS) in a stored config, in place, so that older files still load;
    returns it. Only exact `_target_` strings are renamed: nothing is imported or called."""
    if isinstance(config, dict):
        for key, value in config.items():
            if key == "_target_" and isinstance(value, str) and value in MOVED_TARGETS:
                config[key] = MOVED_TARGETS[value]
            else:
                upgrade_targets(value)
    elif isinstance(config, list):
        for value in config:
            upgrade_targets(value)
    return config


def upgrade_stored_config(config):
    """A stored config written by an older diffuse, brought up to date in place (and returned), before it is
    vetted and used: moved classes renamed (upgrade_targets), and the sampler's `guidance_scale`, now the
    `guidance` node's `scale`, moved there (samplers no longer take it; a resumed run keeps its value).
    Nothing is imported or called."""
    upgrade_targets(config)
    sampler = config.get("sampler") if isinstance(config, dict) else None
    if isinstance(sampler, dict) and "guidance_scale" in sampler:
        scale = sampler.pop("guidance_scale")
        config.setdefault("guidance", {"scale": scale})
    return config


def _walk(node, path: str):
    """(dotted key, value) of every leaf and every `_target_` in a nested dict/list config."""
    if isinstance(node, (Mapping, DictConfig)):
        for key, value in node.items():
            yield from _walk(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, (Sequence, ListConfig)) and not isinstance(node, (str, bytes)):
        for i, value in enumerate(node):
            yield from _walk(value, f"{path}[{i}]")
    else:
        yield path, node


def _allowed_class(target: str, prefixes: tuple[str, ...]) -> bool:
    """Whether `target` names, by its defining module and qualified name, a class under one of `prefixes`.

    The prefix is checked on the string before anything is imported (importing a module runs its code);
    then the named module is imported and the attribute must be a class defined right there, so an
    attribute path through an imported module (`diffuse.x.os.remove`) or a re-exported callable fails."""
    if not target.startswith(prefixes) or "." not in target:
        return False
    module_name, _, attr = target.rpartition(".")
    if not attr.isidentifier():
        return False
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return False
    obj = getattr(module, attr, None)
    return isinstance(obj, type) and obj.__module__ == module_name and obj.__qualname__ == attr


def check_targets(config, source: str, allow: Iterable[str] = ()) -> None:
    """Refuse a file's config that would build anything but our parts (or classes under `allow`).

    Raises a one-line DiffuseError naming the key and target; builds nothing, calls nothing."""
    if isinstance(allow, str):  # allow_targets=mypkg. (no brackets): one prefix, not its letters
        allow = [allow]
    prefixes = PART_PACKAGES + tuple(str(p) for p in allow or () if p)
    if isinstance(config, (DictConfig, ListConfig)):
        config = OmegaConf.to_container(config, resolve=False)
    for key, value in _walk(config, ""):
        if isinstance(value, str) and "${" in value:
            # stored configs are saved resolved: an interpolation could build a node (oc.create) unchecked
            raise DiffuseError(f"{source}: refusing {key}={value!r}: a stored config holds no interpolations")
        if key.rpartition(".")[2] != "_target_":
            continue
        target = value
        if not isinstance(target, str) or not _allowed_class(target, prefixes):
            extra = "" if len(prefixes) > len(PART_PACKAGES) else \
                " (a model class of your own: allow its package with allow_targets=[yourpkg.])"
            if isinstance(target, str) and target.startswith(prefixes[len(PART_PACKAGES):] or ("\0",)):
                # allowed prefix, but not a class defined in the module named (re-exported, or a function)
                extra = (" or classes defined in the module the target names (name a class by its defining "
                         "module, e.g. mypkg.net.MyNet, not a re-export)")
            raise DiffuseError(f"{source}: refusing to build {key}={target!r}: a stored config may only build "
                               f"diffuse's own model/schedule/sampler/dataset classes{extra}")

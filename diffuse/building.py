"""Building parts from config nodes (`_target_`), and the allow-list for configs that come from files.

A config composed from our own `conf/` plus the command line is the user's own: `build` instantiates it.
A config read from a file (a checkpoint's stored config, the VAE record a latent checkpoint embeds) is
untrusted input: Hydra's `instantiate` would call whatever `_target_` it names (`pathlib.Path.touch`,
`os.system`, or `diffuse.storage.checkpoint.os.remove`, which a plain "starts with diffuse." test lets
through). `check_targets` walks such a config before anything is built and accepts only classes defined
in the packages that hold our parts (models, schedules, samplers, datasets), plus prefixes the user
allowed explicitly (`allow_targets: [mypkg.]`), each named by its defining module and class name.
"""

from __future__ import annotations

import importlib
import re
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


def part_class(target) -> type | None:
    """The class a `_target_` names when it is one of our parts (PART_PACKAGES), imported; None for any other
    target (a class of the user's, a function), or one that does not import (build reports that)."""
    if not isinstance(target, str) or not target.startswith(PART_PACKAGES) or "." not in target:
        return None
    module, _, name = target.rpartition(".")
    try:
        found = getattr(importlib.import_module(module), name, None)
    except ImportError:
        return None
    return found if isinstance(found, type) else None


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


# ----- a stored config's shape: what the tool writes, nothing else -------------------------------------------
MAX_DEPTH = 24  # our configs nest 4–6 levels; deeper is not a file we wrote (and would exhaust recursion)
HYDRA_SPECIAL_KEYS = ("_partial_", "_args_", "_recursive_", "_convert_")  # instantiate would act on them
# A live interpolation: `${` after an even number (0, 2, …) of backslashes. Configs are stored escaped
# (escape_interpolations), so a file that holds one was not written by diffuse.
_LIVE_INTERPOLATION = re.compile(r"(?<!\\)(?:\\\\)*\$\{")


def check_structure(node, source: str, path: str = "", depth: int = 0) -> None:
    """Refuse a stored config that is not plain data as the tool writes it: nested mappings with string keys,
    lists, and None/bool/int/float/str leaves; at most MAX_DEPTH levels; no Hydra special key but `_target_`;
    no live interpolation (`${…}`, which OmegaConf would resolve: `oc.create` builds nodes unchecked)."""
    if depth > MAX_DEPTH:
        raise DiffuseError(f"{source}: {path or 'the config'} nests deeper than {MAX_DEPTH} levels: not a config "
                           "diffuse writes")
    if isinstance(node, Mapping):
        for key, value in node.items():
            if not isinstance(key, str):
                raise DiffuseError(f"{source}: {path or 'the config'} has a key {key!r} that is not a string")
            where = f"{path}.{key}" if path else key
            if key in HYDRA_SPECIAL_KEYS:
                raise DiffuseError(f"{source}: refusing {where}: a stored config may not use Hydra's {key}")
            check_structure(value, source, where, depth + 1)
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            check_structure(value, source, f"{path}[{i}]", depth + 1)
    elif isinstance(node, str):
        if _LIVE_INTERPOLATION.search(node):
            raise DiffuseError(f"{source}: refusing {path}={node[:80]!r}: a stored config holds no interpolations")
    elif node is not None and not isinstance(node, (bool, int, float)):
        raise DiffuseError(f"{source}: {path} holds a {type(node).__name__}, not a config value")


def _escape(text: str) -> str:
    """OmegaConf's escape: `${` → `\\${` and each backslash right before it doubled, so that OmegaConf reads the
    string back as exactly `text`."""
    return re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", text)


def escape_interpolations(node):
    """A resolved config (plain containers) with every string escaped for OmegaConf: a value that holds `${`
    (`logger.name='exp\\${1}'` on the command line) is stored, and read back, as the literal it was."""
    if isinstance(node, dict):
        return {k: escape_interpolations(v) for k, v in node.items()}
    if isinstance(node, list):
        return [escape_interpolations(v) for v in node]
    return _escape(node) if isinstance(node, str) and "${" in node else node


# ----- the places a stored config may not choose ------------------------------------------------------------
# Dataset keys that say where the tool reads, writes or downloads. A stored config's values for them are
# never used: `diffuse evaluate` takes them from its own config (data_root, download), a resumed run from the
# command line (dataset.root=…, dataset.path=…) or the defaults.
LOCATION_KEYS = ("root", "path", "cache_dir", "download")
LOCATION_DEFAULTS = {"root": None, "cache_dir": None, "download": False}


def without_locations(node: dict, given: Mapping | None = None) -> dict:
    """A dataset node (plain dict; a latent one's inner `data` too) with its LOCATION_KEYS replaced by `given`'s
    values where `given` names them, else by the defaults (no root: the default data folder; no cache_dir;
    no download; no path: the folder dataset then asks for one). Returns a new dict."""
    given = given or {}
    out = dict(node)
    for key in LOCATION_KEYS:
        if key in out or key in given:
            out[key] = given.get(key, LOCATION_DEFAULTS.get(key))
    if isinstance(out.get("data"), dict):
        out["data"] = without_locations(out["data"], given)
    return out


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
    check_structure(config, source)
    for key, value in _walk(config, ""):
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

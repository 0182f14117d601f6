"""The package's layers: every import under diffuse/ points down (cli → app → jobs → parts → math and
networks → foundations), and no two packages import each other."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import diffuse

ROOT = Path(diffuse.__file__).parent

# Rank of each top-level module or package of diffuse; a module may import only ranks ≤ its own.
LAYERS = {
    0: ("errors", "building", "rules", "devices", "dims", "network", "files"),  # foundations: no parts
    1: ("models", "diffusion", "metrics", "memorization", "digit_classifier", "media", "tracking", "fidelity",
        "storage"),                                                          # networks, math, judges, files
    2: ("data",),                                                           # datasets (below training)
    3: ("training", "validation"),                                          # parts built on those
    4: ("jobs",),                                                           # one module per command
    5: ("app",),                                                            # Hydra: config → job
    6: ("cli", "__main__"),                                                 # the command line
}
RANK = {name: rank for rank, names in LAYERS.items() for name in names}


def unit(module: str) -> str:
    """diffuse.jobs.train → jobs; diffuse.media → media."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def imports() -> dict[str, set[str]]:
    """Module file (relative path) → the diffuse modules it imports (diffuse.x.y, or diffuse.x for
    `from diffuse import x`)."""
    found = {}
    for path in ROOT.rglob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module == "diffuse":
                    names |= {f"diffuse.{a.name}" for a in node.names}
                elif node.module.startswith("diffuse."):
                    names.add(node.module)
            elif isinstance(node, ast.Import):
                names |= {a.name for a in node.names if a.name.startswith("diffuse.")}
        found[str(path.relative_to(ROOT.parent))] = names
    return found


def test_every_module_has_a_layer():
    units = {path.split("/")[1].removesuffix(".py") for path in imports()} - {"__init__"}
    assert units <= set(RANK), f"modules with no layer in LAYERS: {sorted(units - set(RANK))}"


def test_imports_point_down():
    upward = []
    for path, names in imports().items():
        own = path.split("/")[1].removesuffix(".py")
        if own == "__init__":
            continue
        for name in names:
            if RANK[unit(name)] > RANK[own]:
                upward.append(f"{path} imports {name} (layer {RANK[unit(name)]} > {RANK[own]})")
    assert not upward, "\n".join(upward)


def test_no_two_packages_import_each_other():
    graph = defaultdict(set)
    for path, names in imports().items():
        own = path.split("/")[1].removesuffix(".py")
        graph[own] |= {unit(n) for n in names} - {own}

    def reaches(start, goal, seen=()):
        return any(n == goal or (n not in seen and reaches(n, goal, (*seen, n))) for n in graph[start])

    cycles = sorted(f"{a} ⇄ {b}" for a in graph for b in graph[a] if reaches(b, a))
    assert not cycles, cycles

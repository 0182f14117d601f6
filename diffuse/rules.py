"""Rules for config values, and how a part declares its own: a class lists the rules of its constructor's
arguments in `config_rules` (merged along its bases, a subclass's rule winning), and `validation` checks a
config node against the rules of the class its `_target_` names, and refuses a key its constructor does not
take. So a new sampler, model, schedule or dataset brings its own rules; no table elsewhere lists them.

    class DDIM(Sampler):
        config_rules = {"eta": PROBABILITY}
        def __init__(self, steps=50, spacing="auto", eta=0.0, **kwargs): ...
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

from omegaconf import ListConfig


@dataclass(frozen=True)
class Rule:
    """kind: int | float | bool | choice | pair | ints; lo/hi bounds (inclusive unless open_lo/open_hi);
    auto: the string "auto" is allowed too (a value the job works out, e.g. trainer.num_sample_images)."""

    kind: str
    lo: float | None = None
    hi: float | None = None
    open_lo: bool = False
    open_hi: bool = False
    choices: tuple = ()
    nullable: bool = False
    auto: bool = False
    infinite: bool = False  # float: ±inf allowed (sampler.s_tmax: .inf); NaN never is

    def allowed(self) -> str:
        if self.kind == "bool":
            text = "true or false"
        elif self.kind == "choice" and all(isinstance(c, int) for c in self.choices):
            text = ", ".join(map(str, self.choices[:-1])) + f" or {self.choices[-1]}"  # "1, 2 or 3"
        elif self.kind == "choice":
            text = "one of " + ", ".join(_show(c) for c in self.choices)
        else:
            noun = {"int": "an integer", "float": "a number", "pair": "two numbers [a, b] with a < b",
                    "ints": "a non-empty list of integers"}[self.kind]
            if self.lo is not None and self.hi is not None:
                bounds = [f"in {'(' if self.open_lo else '['}{_fmt(self.lo)}, {_fmt(self.hi)}{')' if self.open_hi else ']'}"]
            elif self.lo is not None:
                bounds = [f"{'>' if self.open_lo else '≥'} {_fmt(self.lo)}"]
            elif self.hi is not None:
                bounds = [f"{'<' if self.open_hi else '≤'} {_fmt(self.hi)}"]
            else:
                bounds = []
            sep = ", each " if self.kind in ("pair", "ints") else " "
            text = noun + (sep + bounds[0] if bounds else "")
        return text + (", auto" if self.auto and self.nullable else ", or auto" if self.auto else "") \
            + (" or null" if self.nullable and self.auto else ", or null" if self.nullable else "")

    def _in_range(self, v: float) -> bool:
        if isinstance(v, float) and (math.isnan(v) or (math.isinf(v) and not self.infinite)):
            return False
        if self.lo is not None and (v < self.lo or (self.open_lo and v == self.lo)):
            return False
        return not (self.hi is not None and (v > self.hi or (self.open_hi and v == self.hi)))

    def ok(self, v) -> bool:
        if v is None:
            return self.nullable
        if self.auto and v == "auto":
            return True
        if self.kind == "bool":
            return isinstance(v, bool)
        if self.kind == "choice":
            return any(v == c and type(v) is type(c) for c in self.choices)
        if self.kind == "int":
            return isinstance(v, int) and not isinstance(v, bool) and self._in_range(v)
        if self.kind == "float":
            return isinstance(v, (int, float)) and not isinstance(v, bool) and self._in_range(float(v))
        if self.kind in ("pair", "ints"):
            if not isinstance(v, (list, tuple, ListConfig)) or not len(v):
                return False
            want = int if self.kind == "ints" else (int, float)
            if not all(isinstance(x, want) and not isinstance(x, bool) and self._in_range(x) for x in v):
                return False
            return self.kind == "ints" or (len(v) == 2 and v[0] < v[1])
        raise ValueError(self.kind)


def _show(value) -> str:
    """A plain config value as the command line writes it (null, true, false)."""
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def Int(lo=None, hi=None, nullable=False, auto=False):  # noqa: N802 - reads as a type in the tables below
    return Rule("int", lo, hi, nullable=nullable, auto=auto)


def Float(lo=None, hi=None, open_lo=False, open_hi=False, nullable=False, auto=False, infinite=False):  # noqa: N802
    """A finite number (infinite=True: ±inf too) within the bounds."""
    return Rule("float", lo, hi, open_lo, open_hi, nullable=nullable, auto=auto, infinite=infinite)


def Choice(*choices, nullable=False):  # noqa: N802
    return Rule("choice", choices=choices, nullable=nullable)


BOOL = Rule("bool")
POSITIVE = Float(0, open_lo=True)
PROBABILITY = Float(0, 1)

def Pair(lo=None, hi=None, open_lo=False, open_hi=False):  # noqa: N802
    """Two numbers [a, b] with a < b, each within the bounds."""
    return Rule("pair", lo, hi, open_lo, open_hi)


def Ints(lo=None, hi=None):  # noqa: N802
    """A non-empty list of integers, each within the bounds."""
    return Rule("ints", lo, hi)


def declared_rules(cls: type) -> dict[str, Rule | None]:
    """The `config_rules` of cls and its bases, a subclass's entry winning (None: checked by the class itself)."""
    rules: dict = {}
    for klass in reversed(cls.__mro__):
        rules.update(vars(klass).get("config_rules", {}))
    return rules


def accepted_keys(cls: type) -> set[str] | None:
    """The keyword arguments cls(...) takes: its constructor's named parameters, and while a constructor passes
    **kwargs on, those of the next base's; None when some constructor takes **kwargs no base defines."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        if klass is object:
            return names
        try:
            params = inspect.signature(vars(klass)["__init__"]).parameters.values()
        except (TypeError, ValueError):
            return None
        names |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - {"self"}
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            return names
        if klass.__module__.startswith("torch."):  # nn.Module's own **kwargs: the model's list is complete
            return names
    return None

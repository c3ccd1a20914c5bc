"""Every probe `run_all` knows, found from the probes' own declarations.

A probe module defines a `Probe` subclass with an `order`; nothing else lists it, so adding a
probe touches its own module (and its test) only.

`probe_classes` imports the probe modules (and with them torch). `declared` reads the same
class-level facts from the source without importing anything, for the places that must stay
light: `check` validates a config before torch is loaded. So the facts it reads (name, order,
title, split, needs_labels, headlines, headline_rank, check_metrics) are written as literals;
tests/test_probe_declarations.py checks that both readings agree.
"""

from __future__ import annotations

import ast
import functools
import importlib
import pkgutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitdiag.errors import VitdiagError

if TYPE_CHECKING:
    from vitdiag.probes.base import Probe


@functools.cache
def probe_classes() -> dict[str, type[Probe]]:
    """name -> probe class, in report order."""
    import vitdiag.probes as package
    from vitdiag.probes.base import Probe

    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{info.name}")
    # A probe is a declared class living in a loaded module of this package (not, say, a test's
    # subclass): so dropping its module from sys.modules is enough to forget it.
    inside = f"{package.__name__}."
    found = [
        c
        for c in _subclasses(Probe)
        if c.order is not None and c.__module__.startswith(inside) and c.__module__ in sys.modules
    ]
    return {c.name: c for c in sorted(found, key=lambda c: c.order)}


def _subclasses(cls: type) -> list[type]:
    out = []
    for sub in cls.__subclasses__():
        out += [sub, *_subclasses(sub)]
    return out


def probe_names() -> tuple[str, ...]:
    return tuple(probe_classes())


def probe_class(name: str) -> type[Probe]:
    classes = probe_classes()
    if name not in classes:
        raise VitdiagError(f"unknown probe {name!r}; choose from {', '.join(classes)}.")
    return classes[name]


def is_pattern(headline: str) -> bool:
    """Whether a declared headline is a pattern rather than one fixed metric key."""
    import re

    return re.escape(headline) != headline


def fixed_headlines() -> tuple[str, ...]:
    """The comparison's fixed rows (``probe.key``), in the order the declarations rank them."""
    ranked = [
        (c.headline_rank, i, f"{c.name}.{h}")
        for c in probe_classes().values()
        for i, h in enumerate(c.headlines)
        if not is_pattern(h)
    ]
    return tuple(name for *_, name in sorted(ranked))


def headline_patterns() -> dict[str, str]:
    """probe -> one regular expression of its pattern headlines (fullmatch on the key)."""
    out = {}
    for c in probe_classes().values():
        patterns = [h for h in c.headlines if is_pattern(h)]
        if patterns:
            out[c.name] = "|".join(f"(?:{p})" for p in patterns)
    return out


_STATIC = (
    "name",
    "order",
    "title",
    "split",
    "needs_labels",
    "headlines",
    "headline_rank",
    "check_metrics",
)


@functools.cache
def declared() -> dict[str, dict[str, Any]]:
    """name -> the literal facts of each probe class with an `order`, read without importing
    the probe modules, in report order."""
    here = Path(__file__).parent
    splits = _split_constants(here / "base.py")
    found = []
    for path in sorted(here.glob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef):
                facts = _class_facts(node, splits)
                if facts.get("order") is not None:
                    found.append(facts)
    return {f["name"]: f for f in sorted(found, key=lambda f: f["order"])}


def _split_constants(base: Path) -> dict[str, str]:
    """TRAIN, EVAL, NO_DATA as base.py assigns them (importing base would import torch)."""
    for node in ast.parse(base.read_text()).body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Tuple):
            names = [t.id for t in node.targets[0].elts if isinstance(t, ast.Name)]
            if "NO_DATA" in names:
                return dict(zip(names, ast.literal_eval(node.value), strict=True))
    raise RuntimeError("vitdiag/probes/base.py no longer assigns TRAIN, EVAL, NO_DATA")


def _class_facts(node: ast.ClassDef, splits: dict[str, str]) -> dict[str, Any]:
    facts: dict[str, Any] = {}
    for stmt in node.body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1:
            target, value = stmt.targets[0], stmt.value
        elif isinstance(stmt, ast.AnnAssign) and stmt.value is not None:
            target, value = stmt.target, stmt.value
        else:
            continue
        if isinstance(target, ast.Name) and target.id in _STATIC:
            if isinstance(value, ast.Name) and value.id in splits:
                facts[target.id] = splits[value.id]
            else:
                facts[target.id] = ast.literal_eval(value)
    return facts

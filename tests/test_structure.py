"""The shape of the package, checked: imports run one way, family facts live in one table,
and no module grows past the size a newcomer can read.

These read the source with `ast`; they import nothing from vitdiag but the family table.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "vitdiag"
MAX_LINES = 700


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """Every vitdiag module `name` imports, at module level or inside functions (lazy imports
    create cycles just the same, only later)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from vitdiag.probes import collapse` imports the submodule when there is one.
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for t in targets:
            while t and t not in modules:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {name: _imports(path, name, modules) for name, path in modules.items()}
    # A package's __init__ re-exporting its children is not a dependency of the children on it.
    for name in graph:
        graph[name] = {t for t in graph[name] if not name.startswith(t + ".")}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m) :] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_cycle_finder_finds_a_planted_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a"}}) is None


def test_the_package_has_no_import_cycle():
    cycle = _cycle(_graph())
    assert cycle is None, " -> ".join(cycle)


def test_cli_does_not_import_torch_at_module_level():
    tree = ast.parse((PACKAGE / "cli.py").read_text())
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = {a.name for n in top for a in n.names} | {getattr(n, "module", "") or "" for n in top}
    assert not any(n.split(".")[0] in {"torch", "timm"} for n in names)


def _family_names() -> set[str]:
    from vitdiag.families import FAMILIES

    return {f.name for f in FAMILIES}


def _family_comparisons(path: Path, names: set[str]) -> list[str]:
    """`x == "swin"`, `x != "vit"`, `x in ("beit", ...)` and `"swin" in x` with a family name."""
    hits = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Compare):
            continue
        consts = []
        for side in [node.left, *node.comparators]:
            if isinstance(side, ast.Constant) and isinstance(side.value, str):
                consts.append(side.value)
            elif isinstance(side, (ast.Tuple, ast.List, ast.Set)):
                consts += [
                    e.value
                    for e in side.elts
                    if isinstance(e, ast.Constant) and isinstance(e.value, str)
                ]
        bad = sorted(set(consts) & names)
        if bad:
            hits.append(f"{path.name}:{node.lineno} compares with {', '.join(bad)}")
    return hits


def test_no_family_name_is_compared_outside_the_family_table():
    names = _family_names()
    hits = [
        h
        for name, path in _modules().items()
        if name != "vitdiag.families"
        for h in _family_comparisons(path, names)
    ]
    assert not hits, "\n".join(hits)


def test_the_family_check_sees_a_planted_comparison(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text('def f(fam):\n    return fam.name == "swin" or fam.name in ("beit",)\n')
    assert len(_family_comparisons(planted, {"swin", "beit", "vit"})) == 2


def test_no_module_is_over_the_line_budget():
    sizes = {n: len(p.read_text().splitlines()) for n, p in _modules().items()}
    big = {n: s for n, s in sizes.items() if s > MAX_LINES}
    assert not big, big


# -- layers: the import direction the README states ------------------------------------------

README = PACKAGE.parent / "README.md"
MAX_FUNCTION_LINES = 80
LAYERS_START, LAYERS_END = "<!-- layers -->", "<!-- /layers -->"


def _readme_layers() -> list[list[str]]:
    """The README's layer table, lowest first: each line `N name  module, module, ...`, module
    names relative to the package; a name ending in `.*` stands for a whole package."""
    text = README.read_text()
    block = text[text.index(LAYERS_START) : text.index(LAYERS_END)]
    layers = []
    for line in block.splitlines():
        parts = line.split(None, 2)
        if len(parts) == 3 and parts[0].isdigit():
            layers.append([m.strip() for m in parts[2].split(",") if m.strip()])
    return layers


def _layer_of(module: str, layers: list[list[str]]) -> int | None:
    rel = module.removeprefix("vitdiag").removeprefix(".")
    for i, names in enumerate(layers):
        for name in names:
            if rel == name or name.endswith(".*") and (rel + ".").startswith(name[:-1]):
                return i
    return None


def _upward_imports(graph: dict[str, set[str]], layers: list[list[str]]) -> list[str]:
    bad = []
    for module, targets in graph.items():
        here = _layer_of(module, layers)
        for t in sorted(targets):
            there = _layer_of(t, layers)
            if here is not None and there is not None and there > here:
                bad.append(f"{module} (layer {here}) imports {t} (layer {there})")
    return bad


def test_every_module_has_a_layer_in_the_readme():
    layers = _readme_layers()
    assert len(layers) >= 8
    homeless = [m for m in _modules() if m != "vitdiag" and _layer_of(m, layers) is None]
    assert not homeless, f"add these to the README's layer table: {homeless}"


def test_imports_run_down_the_readme_layers():
    bad = _upward_imports(_graph(), _readme_layers())
    assert not bad, "\n".join(bad)


def test_the_layer_check_sees_a_planted_upward_import():
    layers = [["errors"], ["probes.*"], ["runner"], ["studies.*"]]
    graph = {"vitdiag.runner": {"vitdiag.studies.variance", "vitdiag.errors"}}
    graph["vitdiag.probes.base"] = {"vitdiag.errors"}
    assert _upward_imports(graph, layers) == [
        "vitdiag.runner (layer 2) imports vitdiag.studies.variance (layer 3)"
    ]


# -- functions, private names ----------------------------------------------------------------


def _long_functions(path: Path, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            if length > limit:
                out.append(f"{path.name}:{node.lineno} {node.name} has {length} lines")
    return out


def _private_imports(path: Path) -> list[str]:
    """`from vitdiag.x import _name`: a helper another module needs is part of x's interface."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.level or "vitdiag" in (node.module or "")):
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    out.append(f"{path.name}:{node.lineno} imports {alias.name}")
    return out


def test_no_function_is_over_80_lines():
    long = [f for p in _modules().values() for f in _long_functions(p)]
    assert not long, "\n".join(long)


def test_no_module_imports_another_modules_private_name():
    hits = [h for p in _modules().values() for h in _private_imports(p)]
    assert not hits, "\n".join(hits)


def test_the_function_and_private_checks_see_planted_faults(tmp_path):
    planted = tmp_path / "planted.py"
    body = "\n".join(f"    x{i} = {i}" for i in range(80))
    planted.write_text(f"from vitdiag.data.sources import _decode\n\ndef f():\n{body}\n")
    assert _long_functions(planted) == ["planted.py:3 f has 81 lines"]
    assert _private_imports(planted) == ["planted.py:1 imports _decode"]


# -- the second pass of the house (issue 19) ---------------------------------------------------


def test_the_runner_is_typed():
    source = (PACKAGE / "runner.py").read_text()
    assert len(re.findall(r"\bAny\b", source)) <= 5


def test_a_probe_option_is_written_in_at_most_three_modules():
    files = [n for n, p in _modules().items() if re.search(r"erank.every", p.read_text())]
    assert 1 <= len(files) <= 3, files

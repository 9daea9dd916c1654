"""The package's house rules, read from its source with ast (no tool, nothing imported):

- stages, in the order data flows: core, inputs, hooks, vectors, generation, model, runs, scoring,
  reporting, pipeline; the
  public API (`api/`) on top, then the package's own `__init__` and `__main__`. A module imports only
  from its own stage or an earlier one (a function-level or TYPE_CHECKING import counts the same);
- no import circles, counting every import wherever it is written, so no function-level import can be
  hiding one;
- no module over 400 lines, and each says what it owns in a docstring;
- tests: each tests/test_X.py is named for a stage or module (or one of the whole-product checks in
  WHOLE), and tests share code only through tests/helpers/ and conftest's fixtures, never by importing
  each other.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "steersweep"
STAGES = [
    "core",
    "inputs",
    "hooks",
    "vectors",
    "generation",
    "model",
    "runs",
    "scoring",
    "reporting",
    "pipeline",
    "api",
]
MAX_LINES = 400
TESTS = Path(__file__).resolve().parent
# whole-product checks, named for what they exercise rather than for one module
WHOLE = {"bench", "e2e", "gpu", "gpukit", "layout", "security", "slurm", "wheel"}


def module_name(path: Path) -> str:
    parts = ["steersweep", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that `name` imports, anywhere in its source."""
    is_pkg = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")[: len(name.split(".")) - node.level + is_pkg]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in known}
    return found


def stage(name: str) -> int:
    parts = name.split(".")
    if len(parts) > 1 and parts[1] in STAGES:
        return STAGES.index(parts[1])
    return len(STAGES)  # steersweep/__init__, __main__: the top


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(name, path, set(mods)) - {name} for name, path in mods.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(g[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_every_module_sits_in_a_stage():
    loose = [m for m in modules() if m.count(".") == 1 and m not in ("steersweep.__main__",)]
    loose = [m for m in loose if m.split(".")[1] not in STAGES]
    assert loose == [], f"modules outside the stages: {loose}"


def test_no_module_imports_itself():
    mods = modules()
    assert [name for name, path in mods.items() if name in imports_of(name, path, set(mods))] == []


def test_no_import_circles():
    assert cycles(graph()) == []


def test_no_import_against_the_flow():
    upward = [
        f"{src} ({STAGES[stage(src)] if stage(src) < len(STAGES) else 'top'}) imports {dst} ({STAGES[stage(dst)]})"
        for src, dsts in graph().items()
        for dst in sorted(dsts)
        if stage(dst) > stage(src) and dst != "steersweep"
    ]
    assert upward == []


def test_nothing_below_the_top_imports_the_package_root():
    assert [m for m, deps in graph().items() if "steersweep" in deps and stage(m) < len(STAGES)] == []


def test_modules_are_small_and_say_what_they_own():
    sizes = {m: len(p.read_text().splitlines()) for m, p in modules().items()}
    assert {m: n for m, n in sizes.items() if n > MAX_LINES} == {}
    undocumented = [m for m, p in modules().items() if not ast.get_docstring(ast.parse(p.read_text()))]
    assert undocumented == []
    todo = [m for m, p in modules().items() if (ast.get_docstring(ast.parse(p.read_text())) or "") == "TODO"]
    assert todo == []


def test_the_checker_sees_a_circle_and_an_upward_import():
    g = {"steersweep.core.a": {"steersweep.runs.b"}, "steersweep.runs.b": {"steersweep.core.a"}}
    assert cycles(g) == [["steersweep.core.a", "steersweep.runs.b"]]
    assert stage("steersweep.runs.b") > stage("steersweep.core.a")


def test_each_test_module_is_named_for_what_it_tests():
    owners = {part for name in modules() for part in name.split(".")[1:]}
    strays = [p.name for p in sorted(TESTS.glob("test_*.py")) if p.stem[5:] not in owners | WHOLE]
    assert not strays, f"name these after the stage or module they test: {strays}"


def test_tests_share_code_through_helpers_only():
    bad = []
    for path in sorted([*TESTS.glob("*.py"), *(TESTS / "helpers").glob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            bad += [f"{path.name} imports {n}" for n in names if n.split(".")[0] == "conftest" or n.startswith("test_")]
    assert not bad, bad

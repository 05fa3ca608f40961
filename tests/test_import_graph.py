"""The import graph keeps the layers of docs/design.md: no cycles, no arrow pointing up, the pure
core importable without torch, and no module growing past ~400 lines unreviewed."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lossguard"

# Bottom to top, as in docs/design.md. A module may import its own package and the layers below
# its own, never a layer above or a sibling package of its own layer.
LAYERS: list[tuple[str, set[str]]] = [
    ("numbers and errors", {"numbers", "errors"}),
    ("records", {"records"}),
    ("config", {"config"}),
    ("status", {"status"}),
    ("core", {"signals", "recovery", "probes", "gpu", "telemetry", "preflight", "inspection"}),
    ("engine", {"guard", "analysis", "testing"}),
    ("watch", {"watch"}),
    ("presentation", {"presentation"}),
    ("integrations", {"integrations"}),
    ("public API", {"__init__"}),
    ("cli", {"cli"}),
    ("python -m lossguard", {"__main__"}),
]

# Modules over MAX_LINES, each reviewed as doing one job; a module that grows past the limit
# joins this list with its job, or is split.
MAX_LINES = 400
REVIEWED_LONG: dict[str, str] = {
    "gpu/diagnosis.py": "diagnoses of a GPU timeline, one function per diagnosis",
    "inspection.py": "what a checkpoint or run folder holds, from headers and JSON only",
    "probes/hessian.py": "the Hessian probe: plan, micro-batches, Lanczos, verdict",
    "recovery/policy.py": "the recovery state machine",
    "recovery/snapshot.py": "snapshots: capture, ring, spill to disk",
    "signals/plateau.py": "the early-convergence detector",
    "signals/spike.py": "the spike detector",
    "testing/peers.py": "the peer rules the benchmarks compare against, one class each",
}

FRAMEWORKS = ("torch", "transformers", "peft", "accelerate", "datasets", "pynvml", "rich", "plotly", "pandas",
              "typer")
PURE = [
    "lossguard.numbers", "lossguard.errors", "lossguard.records", "lossguard.config", "lossguard.status",
    "lossguard.signals",
    "lossguard.recovery.policy", "lossguard.recovery.verdict", "lossguard.telemetry", "lossguard.guard",
    "lossguard.analysis", "lossguard.gpu.timeline", "lossguard.gpu.stats", "lossguard.gpu.diagnosis", "lossguard.gpu.nvml",
    "lossguard.gpu.replay", "lossguard.preflight", "lossguard.inspection", "lossguard.watch",
]


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def _imports(modules: dict[str, Path]) -> list[tuple[str, str, bool]]:
    """(importer, imported, only for type checking) for every import of a lossguard module,
    at module level or inside a function."""
    edges = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        typing_only = _type_checking_lines(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("lossguard"):
                base = node.module or ""
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("lossguard")]
            else:
                continue
            edges += [(name, t, node.lineno in typing_only) for t in targets if t in modules]
    return edges


def _unit(module: str) -> str:
    """The top-level part of lossguard a module belongs to (``__init__`` for the package itself)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _layer(module: str) -> int:
    unit = _unit(module)
    for rank, (_, units) in enumerate(LAYERS):
        if unit in units:
            return rank
    raise AssertionError(f"{module}: lossguard/{unit} is in no layer; add it to LAYERS and docs/design.md")


def _cycles(edges: list[tuple[str, str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    graph: dict[str, list[str]] = {}
    for a, b in edges:
        graph.setdefault(a, []).append(b)
        graph.setdefault(b, [])
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_is_read_whole():
    modules = _modules()
    edges = _imports(modules)
    assert len(modules) > 80 and len(edges) > 200
    assert ("lossguard.guard", "lossguard.signals.suite", False) in edges
    assert ("lossguard.cli.watch", "lossguard.cli.watch_daemon", False) in edges  # an import inside a function
    assert _cycles([("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")]) == [["a", "b", "c"]]


def test_no_import_cycles():
    """Imports made at run time (at module level or inside a function) form no cycle; an import
    for type annotations only may point back at the module that uses the importer."""
    edges = [(a, b) for a, b, typing_only in _imports(_modules()) if not typing_only]
    assert _cycles(edges) == []


def test_no_import_points_to_a_higher_layer_or_a_sibling():
    wrong = []
    for a, b, _ in _imports(_modules()):
        if _unit(a) == _unit(b):
            continue
        if _layer(b) >= _layer(a):
            wrong.append(f"{a} ({LAYERS[_layer(a)][0]}) imports {b} ({LAYERS[_layer(b)][0]})")
    assert wrong == []


def test_the_pure_core_imports_without_any_framework():
    """Detectors, policy, telemetry, the engine, the watcher and the GPU analysis import with torch,
    transformers, NVML, rich and pandas all missing."""
    script = (
        "import importlib.abc, sys\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {FRAMEWORKS!r}:\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        f"for m in {PURE!r}:\n"
        "    importlib.import_module(m)\n"
        f"loaded = sorted({{n.split('.')[0] for n in sys.modules}} & set({FRAMEWORKS!r}))\n"
        "print('loaded', loaded)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={"PYTHONPATH": str(ROOT), "PATH": ""})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "loaded []"


def test_long_modules_are_reviewed():
    lengths = {str(p.relative_to(PACKAGE)): len(p.read_text(encoding="utf-8").splitlines())
               for p in PACKAGE.rglob("*.py")}
    long = {name for name, n in lengths.items() if n > MAX_LINES}
    unreviewed = sorted(f"{name} ({lengths[name]} lines)" for name in long - set(REVIEWED_LONG))
    assert unreviewed == [], f"over {MAX_LINES} lines: split it, or add it to REVIEWED_LONG with its one job"
    shrunk = sorted(set(REVIEWED_LONG) - long)
    assert shrunk == [], f"now at most {MAX_LINES} lines: remove from REVIEWED_LONG"

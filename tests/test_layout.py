"""The package's layering, read from the source with `ast` (nothing is imported).

Every `import` / `from ... import` statement of every module under src/iqpir, at module level
or inside a function, that names an iqpir module is an edge. The arrows must point one way:

    cli, app, demo  ->  inference.photos  ->  inference.restorer  ->  inference.engines
                    ->  inference.files  ->  official, checkpoint, models, io, config, devices

and export.py (which writes graphs) reads models through inference.files only.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "iqpir"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The iqpir modules `name` (a module at `path`) imports anywhere in its body.

    `from A import b` is an edge to A.b when that is a module, else to A; relative imports are
    resolved against the module's package.
    """
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                       for alias in node.names]
        else:
            continue
        for target in targets:
            # `import iqpir.a.b` binds iqpir but runs iqpir.a.b: the edge is to the longest module named.
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target.startswith("iqpir") and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = all_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a], or None (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def test_the_walker_sees_function_level_and_relative_imports(tmp_path):
    pkg = tmp_path / "iqpir"
    (pkg / "sub").mkdir(parents=True)
    for f in ("__init__.py", "a.py", "b.py", "sub/__init__.py", "sub/d.py"):
        (pkg / f).write_text("")
    (pkg / "sub" / "c.py").write_text("import torch\n\ndef f():\n    from iqpir import a\n    from ..b import x\n"
                                      "    from . import d\n    import iqpir.sub\n")
    modules = {".".join(p.relative_to(tmp_path).with_suffix("").parts).removesuffix(".__init__"): p
               for p in pkg.rglob("*.py")}
    assert imports_of("iqpir.sub.c", modules["iqpir.sub.c"], modules) == {
        "iqpir.a", "iqpir.b", "iqpir.sub.d", "iqpir.sub"}
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_in_the_package():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_inference_imports_nothing_above_it():
    above = ("iqpir.training", "iqpir.cli", "iqpir.app", "iqpir.demo", "iqpir.export")
    bad = [f"{name} imports {target}" for name, targets in sorted(import_graph().items())
           if _under(name, "iqpir.inference") for target in sorted(targets)
           if any(_under(target, a) for a in above)]
    assert not bad, "; ".join(bad)


def test_export_reads_models_through_inference_files_only():
    allowed = ("iqpir.inference.files", "iqpir.models", "iqpir.official",
               "iqpir.checkpoint", "iqpir.io", "iqpir.config", "iqpir.devices")
    bad = sorted(t for t in import_graph()["iqpir.export"] if not any(_under(t, a) for a in allowed))
    assert not bad, f"iqpir.export imports {bad}"


def test_checkpoint_to_engine_goes_down_once():
    """`iqpir restore --checkpoint` passes each layer once, top to bottom."""
    graph = import_graph()
    order = ["iqpir.cli", "iqpir.inference.photos", "iqpir.inference.restorer", "iqpir.inference.engines",
             "iqpir.inference.files"]
    rank = {name: i for i, name in enumerate(order)}
    for name in order:
        for target in graph[name]:
            if target in rank:
                assert rank[target] > rank[name], f"{name} imports {target}, which is above it"
    # plugin: the quality-conditioned U-Net of the packaged default model; weights: where it lies
    low = ("iqpir.official", "iqpir.checkpoint", "iqpir.models", "iqpir.io", "iqpir.config", "iqpir.devices",
           "iqpir.plugin", "iqpir.weights")
    for name, allowed in (("iqpir.inference.files", low), ("iqpir.inference.engines", low + ("iqpir.inference.files",))):
        bad = sorted(t for t in graph[name] if not any(_under(t, a) for a in allowed))
        assert not bad, f"{name} imports {bad}"

"""Import direction is one way: flows -> tasks -> merging, and flows -> zoo / evaluation -> merging;
merging never imports prefect or dvc, nor transformers or peft outside its GGUF reader; no module
of ours reaches itself through imports (function-level ones included: a lazy import may keep the
CLI fast, it may not hide a circle); merging's io layer never reaches up into merging's core."""

import ast
from pathlib import Path

from merging import fingerprint

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "merging": {"flows", "tasks", "zoo", "evaluation", "prefect", "dvc", "lm_eval", "transformers", "peft"},
    "tasks": {"flows", "zoo"},
    "zoo": {"flows", "tasks", "evaluation", "prefect", "dvc"},
    "evaluation": {"flows", "tasks", "zoo", "prefect", "dvc"},
}
# reading GGUF is transformers' job (a lazy import inside import_gguf)
ALLOWED = {"merging/io/gguf.py": {"transformers"}}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def test_layers_import_one_way():
    offenders = []
    for package, forbidden in FORBIDDEN.items():
        for path in (ROOT / package).rglob("*.py"):
            name = path.relative_to(ROOT).as_posix()
            bad = _imports(path) & (forbidden - ALLOWED.get(name, set()))
            if bad:
                offenders.append(f"{name} imports {sorted(bad)}")
    assert not offenders, offenders


def test_the_gguf_reader_is_the_only_exception():
    """The exception stays needed (the rule would pass vacuously if the reader moved)."""
    for name, allowed in ALLOWED.items():
        assert allowed <= _imports(ROOT / name), name


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """module -> the modules of ours it imports anywhere in its source (``merging.fingerprint``'s
    resolution: ``from pkg import name`` is ``pkg.name`` when that is a module, else ``pkg``).
    A module's parent packages run before it but are not its imports: no edge for them."""
    graph = {}
    for package in fingerprint.OWN_PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            module = _module_name(path)
            graph[module] = set(fingerprint.imports_of(module)) - {module}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[str]:
    """One ``a -> b -> a`` chain per edge that closes a circle in a depth-first walk."""
    found, done, path = [], set(), []

    def walk(module: str) -> None:
        path.append(module)
        for name in sorted(graph.get(module, ())):
            if name in path:
                found.append(" -> ".join([*path[path.index(name):], name]))
            elif name not in done:
                walk(name)
        path.pop()
        done.add(module)

    for module in sorted(graph):
        if module not in done:
            walk(module)
    return found


def test_no_import_circles():
    graph = _import_graph()
    assert {"merging", "merging.io.writer", "flows.cli", "tasks.stage", "zoo.build", "evaluation.harness"} <= set(graph)
    cycles = _cycles(graph)
    assert not cycles, "import circles:\n" + "\n".join(cycles)


def test_circles_are_reported_as_chains():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"d"}, "e": {"a"}}
    assert _cycles(graph) == ["a -> b -> c -> a", "d -> d"]


IO_MAY_IMPORT = ("merging.io", "merging.errors", "merging.digests")


def test_io_does_not_reach_into_the_core():
    """``merging/io/*`` reads and writes files; config, plan, spec, registry and the methods use it."""
    offenders = []
    for module, imported in _import_graph().items():
        if module == "merging.io" or module.startswith("merging.io."):
            bad = {n for n in imported if not any(n == ok or n.startswith(ok + ".") for ok in IO_MAY_IMPORT)}
            if bad:
                offenders.append(f"{module} imports {sorted(bad)}")
    assert not offenders, offenders

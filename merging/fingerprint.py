"""Code fingerprints: what a stage key knows about the code that made an artifact.

The fingerprint of a set of modules is the sha256 over the source files of their import
closure inside this distribution (static ``import``/``from`` statements anywhere in a module,
function-level ones included; package ``__init__`` files count, their re-exports are not
followed), plus the versions of the libraries whose numerics the stage depends on. Editing a
file a stage runs changes its key; editing a file it does not run does not.

The method registry is a lookup table, not code a stage runs: closures stop at
``merging.registry`` and ``merging.methods``. A stage that calls a method names the method's
own modules as roots, so editing ``methods/ties.py`` recomputes the stages that run TIES code
and nothing upstream of them.
"""

from __future__ import annotations

import ast
import hashlib
import threading
from collections.abc import Iterable
from functools import cache
from pathlib import Path

from merging.digests import file_digest

__all__ = ["module_closure", "closure_files", "fingerprint", "imports_of", "OWN_PACKAGES"]

OWN_PACKAGES = ("merging", "tasks", "flows", "evaluation", "zoo")
_REGISTRY = ("merging.registry", "merging.methods")
ROOT = Path(__file__).resolve().parents[1]
_PARSE_LOCK = threading.Lock()


def _is_registry(name: str) -> bool:
    return any(name == r or name.startswith(r + ".") for r in _REGISTRY)


@cache
def _path_of(module: str) -> Path | None:
    """The source file of one of our modules (found beside this package, nothing imported)."""
    if module.split(".")[0] not in OWN_PACKAGES:
        return None
    base = ROOT.joinpath(*module.split("."))
    return next((p for p in (base.with_suffix(".py"), base / "__init__.py") if p.is_file()), None)


def imports_of(module: str) -> frozenset[str]:
    """Our modules that ``module`` imports anywhere in its source (``from pkg import mod`` is
    ``pkg.mod``; ``from mod import name`` is ``mod``)."""
    path = _path_of(module)
    return _parse_imports(module, path, path.stat().st_mtime_ns) if path else frozenset()


@cache
def _parse_imports(module: str, path: Path, mtime_ns: int) -> frozenset[str]:
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    with _PARSE_LOCK:  # CPython 3.11's ast.parse is not thread-safe (gh-106905: "recursion depth mismatch")
        tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            prefix = node.module or ""
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                prefix = f"{base}.{prefix}" if prefix else base
            candidates = [f"{prefix}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in candidates:
            found.update(next(([c] for c in (name, name.rpartition(".")[0]) if c and _path_of(c)), []))
    return frozenset(found)


def module_closure(roots: Iterable[str]) -> frozenset[str]:
    """Our modules reachable from ``roots`` (always included) by imports, plus their packages."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        module = todo.pop()
        if module in seen or _path_of(module) is None:
            continue
        seen.add(module)
        parts = module.split(".")
        seen.update(".".join(parts[:i]) for i in range(1, len(parts)))  # package __init__ files run too
        todo += [n for n in imports_of(module) if not (_is_registry(n) and not _is_registry(module))]
    return frozenset(seen)


def closure_files(roots: Iterable[str]) -> list[str]:
    """Source files (relative to the project root) of ``module_closure``."""
    return sorted(_path_of(m).relative_to(ROOT).as_posix() for m in module_closure(roots) if _path_of(m))


def fingerprint(roots: Iterable[str], versions: dict[str, str] | None = None) -> str:
    """sha256 over (module, content digest) of the closure of ``roots`` and the given versions."""
    h = hashlib.sha256()
    for module in sorted(module_closure(roots)):
        if path := _path_of(module):
            h.update(module.encode() + b"\0" + file_digest(path).encode())
    for name, version in sorted((versions or {}).items()):
        h.update(f"{name}={version}".encode())
    return h.hexdigest()

"""Code fingerprints: what a stage key knows about the code that made an artifact.

The fingerprint of a set of modules is the sha256 over the source files of their import
closure inside this distribution (static ``import``/``from`` statements anywhere in a module,
function-level ones included), plus the versions of the third-party libraries whose numerics
the stage depends on. Editing any file a stage runs changes its key; editing a file it does
not run does not.

The method registry is a lookup table, not code a stage runs: closures stop at
``merging.registry`` and ``merging.methods``. A stage that calls a method names the method's
own functions explicitly (``modules_of``), so editing ``methods/ties.py`` recomputes the
stages that run TIES code and nothing upstream of them.
"""

from __future__ import annotations

import ast
import hashlib
from collections.abc import Callable, Iterable
from functools import cache
from pathlib import Path

from merging.digests import file_digest

__all__ = ["module_closure", "closure_files", "fingerprint", "modules_of", "OWN_PACKAGES", "REGISTRY_MODULES"]

OWN_PACKAGES = ("merging", "tasks", "flows", "evaluation", "zoo")
REGISTRY_MODULES = ("merging.registry", "merging.methods")
ROOT = Path(__file__).resolve().parents[1]


def _is_own(name: str) -> bool:
    return name.split(".")[0] in OWN_PACKAGES


def _is_registry(name: str) -> bool:
    return any(name == r or name.startswith(r + ".") for r in REGISTRY_MODULES)


@cache
def _path_of(module: str) -> Path | None:
    """The source file of one of our modules (found beside this package, nothing imported)."""
    if not _is_own(module):
        return None
    base = ROOT.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _module_or_parent(name: str) -> str | None:
    """``name`` if it is a module of ours, else its parent (``from pkg.mod import function``)."""
    for candidate in (name, name.rpartition(".")[0]):
        if candidate and _path_of(candidate) is not None:
            return candidate
    return None


def _imports(module: str, path: Path) -> frozenset[str]:
    return _imports_cached(module, path, path.stat().st_mtime_ns)


@cache
def _imports_cached(module: str, path: Path, mtime_ns: int) -> frozenset[str]:
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                prefix = f"{base}.{node.module}" if node.module else base
            else:
                prefix = node.module or ""
            # ``from pkg import mod`` imports pkg.mod; ``from mod import name`` imports mod
            candidates = [f"{prefix}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in candidates:
            resolved = _module_or_parent(name)
            if resolved is not None:
                found.add(resolved)
    return frozenset(found)


def module_closure(roots: Iterable[str], stop_at_registry: bool = True) -> frozenset[str]:
    """Our modules reachable from ``roots`` by imports (roots always included)."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        path = _path_of(module)
        if path is None:
            continue
        seen.update(_parents(module))  # package __init__ files run too; their re-exports are not followed
        for name in _imports(module, path):
            if name not in seen and not (stop_at_registry and _is_registry(name) and not _is_registry(module)):
                todo.append(name)
    return frozenset(seen)


def _parents(module: str) -> list[str]:
    """Package ``__init__`` modules run on import of ``module``."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def closure_files(roots: Iterable[str], stop_at_registry: bool = True) -> list[str]:
    """Source files (relative to the project root when inside it) of ``module_closure``."""
    files = []
    for module in module_closure(roots, stop_at_registry):
        path = _path_of(module)
        if path is not None:
            try:
                files.append(path.relative_to(ROOT).as_posix())
            except ValueError:
                files.append(str(path))
    return sorted(files)


def modules_of(*functions: Callable | None) -> tuple[str, ...]:
    """The modules defining ``functions`` (e.g. a method's stage functions)."""
    return tuple(sorted({f.__module__ for f in functions if f is not None}))


def fingerprint(roots: Iterable[str], versions: dict[str, str] | None = None, stop_at_registry: bool = True) -> str:
    """sha256 over (file, content digest) of the closure of ``roots`` and the given versions."""
    h = hashlib.sha256()
    for module in sorted(module_closure(roots, stop_at_registry)):
        path = _path_of(module)
        if path is not None:
            h.update(module.encode() + b"\0" + file_digest(path).encode())
    for name, version in sorted((versions or {}).items()):
        h.update(f"{name}={version}".encode())
    return h.hexdigest()

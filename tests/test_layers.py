"""Import direction is one way: flows -> tasks -> merging, and flows -> zoo / evaluation -> merging;
merging never imports prefect or dvc, nor transformers or peft outside its GGUF reader."""

import ast
from pathlib import Path

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

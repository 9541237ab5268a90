"""Multi-step merges (mergekit 0.1.5's ``mergekit-multi``): several merges in one file, later
ones using earlier ones' outputs by name.

The file holds merge configs as YAML documents (``---``) or as one list; each has a ``name:``
(its output is ``<intermediate_dir>/<name>``) except at most one unnamed final merge, written to
``out_path``. A ``model``, ``base_model`` or ``tokenizer_source`` value equal to a step's name
(also as ``name+adapter``, ``model:name``, a plain string item of ``models:``, or the ``source`` of
the ``tokenizer:`` section and its ``tokens``) is that step's output; as in mergekit, the name
wins over a local folder of the same name. This module only parses and orders: ``parse_multi`` returns the steps
in dependency order (a cycle is an error naming it), and ``step_key`` is the identity of a
step's output: its config, its dependencies' keys and its external models' files, and the code.
``flows/multi.py`` runs the steps as cached Prefect tasks.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from merging.config import parse_merge_config
from merging.digests import content_key
from merging.errors import MergeConfigError
from merging.registry import get_method

__all__ = ["Step", "parse_multi", "step_key", "is_step_output", "mark_step_output", "MARKER"]

MODEL_KEYS = ("model", "base_model", "tokenizer_source", "source")
_TOKENIZER_KEYWORDS = ("union", "base")  # tokenizer sources that are not models
MARKER = ".mergeflow-step.json"
"""Written into a step's output after it is complete: the key of the config that made it."""


@dataclass(frozen=True)
class Step:
    """One merge of a multi-step file.

    Attributes:
        name: the step's name; None for the unnamed final merge.
        config: its merge config (a plain mapping) with step names replaced by output folders.
        needs: the names of the steps whose outputs it reads, in file order.
        out: its output folder.
        external: its other model references (folders, files, hub ids).
    """

    name: str | None
    config: dict[str, Any]
    needs: tuple[str, ...]
    out: Path
    external: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return self.name or "final"


def _documents(text: str, source: str) -> list[dict[str, Any]]:
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as err:
        raise MergeConfigError(f"{source}: not valid YAML: {str(err).splitlines()[0]}") from None
    if len(docs) == 1 and isinstance(docs[0], list):
        docs = docs[0]
    if not docs:
        raise MergeConfigError(f"{source}: no merge configs; give one YAML document (or list item) per merge")
    for i, doc in enumerate(docs):
        if not isinstance(doc, dict):
            raise MergeConfigError(f"{source}: merge #{i + 1} is a {type(doc).__name__}, not a mapping")
    return docs


def _check_name(name: Any, source: str) -> str:
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name or "+" in name:
        raise MergeConfigError(f"{source}: step name {name!r} must be a plain folder name (no '/', '\\' or '+')")
    return name


def _patch(value: Any, outputs: Mapping[str, Path], used: list[str], external: list[str], key: str | None = None) -> Any:
    """``value`` with every step name under a model key replaced by the step's output folder
    (the names go to ``used``, the other model references to ``external``)."""
    if isinstance(value, dict):
        return {k: _patch(v, outputs, used, external, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_patch(v, outputs, used, external, key) for v in value]
    if isinstance(value, str) and (key in MODEL_KEYS or key == "models"):  # models: [name, ...] too
        if key in ("tokenizer_source", "source") and value in _TOKENIZER_KEYWORDS:
            return value
        prefix = "model:" if key in ("tokenizer_source", "source") and value.startswith("model:") else ""
        head, plus, tail = value.removeprefix(prefix).partition("+")
        if head in outputs:
            used.append(head)
            return prefix + str(outputs[head]) + plus + tail
        external.append(value.removeprefix(prefix))
    return value


def _ordered(steps: dict[str | None, Step], source: str) -> list[Step]:
    """Depth-first topological order, file order among independent steps; a cycle is an error."""
    order: list[Step] = []
    state: dict[str | None, str] = {}

    def visit(name: str | None, path: tuple[str | None, ...]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "open":
            cycle = [*path[path.index(name):], name]
            raise MergeConfigError(f"{source}: circular dependency between steps: "
                                   + " -> ".join(n or "final" for n in cycle))
        state[name] = "open"
        for need in steps[name].needs:
            visit(need, (*path, name))
        state[name] = "done"
        order.append(steps[name])

    for name in steps:
        visit(name, ())
    return order


def parse_multi(text: str, intermediate_dir: str | Path, out_path: str | Path | None = None,
                source: str = "<multi>") -> list[Step]:
    """The steps of a multi-step merge file, each after the steps it reads.

    Raises:
        MergeConfigError: not YAML or not mappings, a bad or duplicate name, several unnamed
            merges, an unnamed one without ``out_path``, a cycle, or an invalid merge config.
    """
    intermediate = Path(intermediate_dir).absolute()
    raw: dict[str | None, dict[str, Any]] = {}
    for doc in _documents(text, source):
        doc = dict(doc)
        name = _check_name(doc.pop("name"), source) if "name" in doc else None
        if name in raw:
            raise MergeConfigError(f"{source}: two merges are named {name!r}; names must be unique"
                                   if name else f"{source}: more than one merge has no name; name all but the final one")
        raw[name] = doc
    if None in raw and out_path is None:
        raise MergeConfigError(f"{source}: the unnamed final merge needs an output folder; pass --out-path DIR")
    outputs = {name: intermediate / name for name in raw if name is not None}
    steps: dict[str | None, Step] = {}
    for name, doc in raw.items():
        label = f"{source}: step {name or 'final'!r}"
        used: list[str] = []
        external: list[str] = []
        config = _patch(doc, outputs, used, external)
        try:  # every step is checked before any runs
            get_method(parse_merge_config(config, label).merge_method)
        except MergeConfigError as err:
            raise MergeConfigError(str(err) if str(err).startswith(label) else f"{label}: {err}") from None
        out = outputs[name] if name is not None else Path(out_path).absolute()
        steps[name] = Step(name, config, tuple(dict.fromkeys(used)), out, tuple(dict.fromkeys(external)))
    return _ordered(steps, source)


def _files_state(ref: str) -> list[Any]:
    """(name, size, mtime) of a local model's files: changes when the model is rewritten."""
    path = Path(ref.partition("+")[0] if not Path(ref).exists() else ref).expanduser()
    if not path.exists():
        return [ref]  # a hub id: its reference is its identity
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name != MARKER) if path.is_dir() else [path]
    return [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def step_key(step: Step, dep_keys: Mapping[str, str], code: str) -> str:
    """The identity of a step's output: its config, the keys of the steps it reads (``dep_keys``:
    name -> key), the files of its other models (name, size, mtime) and the code fingerprint."""
    external = {ref: _files_state(ref) for ref in step.external if ref not in ("base", "union")}
    return content_key([step.config, {n: dep_keys[n] for n in step.needs}, external, str(step.out), code])


def is_step_output(out: Path, key: str) -> bool:
    """Whether ``out`` is a complete output of the step with ``key``."""
    try:
        return json.loads((Path(out) / MARKER).read_text()).get("key") == key
    except (OSError, ValueError):
        return False


def mark_step_output(out: Path, key: str) -> None:
    """Record (atomically) that the complete folder ``out`` was made by the step with ``key``."""
    tmp = Path(out) / f"{MARKER}.tmp"
    tmp.write_text(json.dumps({"key": key}) + "\n")
    os.replace(tmp, Path(out) / MARKER)

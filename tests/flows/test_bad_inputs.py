"""Hostile inputs to ``mergeflow merge`` (issue 15), table-driven.

Every case starts from a fresh copy of tiny Llama-shaped models (a base with a tokenizer,
three fine-tunes, a LoRA adapter), breaks one thing, runs the command line and asserts: exit
code 2, exactly one line on stderr starting with ``error:`` that names what is wrong, no
traceback, nothing at the target (no temporary or set-aside sibling either) and every input
file byte-unchanged. Cases that could hang or need process limits run in a subprocess.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file
from typer.testing import CliRunner

from flows.cli import app
from tests.conftest import save_tiny_model, save_tokenizer

runner = CliRunner()
REPO = Path(__file__).resolve().parents[2]
Q_PROJ = "model.layers.0.self_attn.q_proj.weight"


# ---- the workspace every case starts from ---------------------------------------------------

@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hostile")
    inputs = root / "in"
    base = save_tiny_model(inputs / "base", seed=0)
    save_tokenizer(base)
    for i, name in enumerate(["ft_a", "ft_b", "ft_c"], start=1):
        save_tiny_model(inputs / name, seed=i, base=base)
    _save_adapter(inputs / "lora")
    (root / "outside").mkdir()
    (root / "outside" / "secret.txt").write_text("not for the merged model\n")
    return root


def _save_adapter(folder: Path, **config) -> None:
    """A plain LoRA adapter on both q_proj of the tiny base, written as peft writes it."""
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(7)
    tensors = {}
    for layer in range(2):
        prefix = f"base_model.model.model.layers.{layer}.self_attn.q_proj"
        tensors[f"{prefix}.lora_A.weight"] = torch.randn(4, 16, generator=g) * 0.1
        tensors[f"{prefix}.lora_B.weight"] = torch.randn(16, 4, generator=g) * 0.1
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    settings = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"],
                "base_model_name_or_path": "base", **config}
    (folder / "adapter_config.json").write_text(json.dumps(settings))


@dataclass
class Workspace:
    root: Path
    config: dict
    extra: list[str] = field(default_factory=list)
    command: list[str] | None = None  # replaces "merge CONFIG OUT" when set
    target: Path | None = None  # what must be absent after the failure (default: out)

    @property
    def inputs(self) -> Path:
        return self.root / "in"

    def model(self, name: str) -> Path:
        return self.inputs / name

    @property
    def out(self) -> Path:
        return self.root / "out" / "merged"

    def set_models(self, *names: str, method: str = "ties", **global_params) -> None:
        self.config["merge_method"] = method
        self.config["models"] = [{"model": str(self.model(n)), "parameters": {}} for n in names]
        self.config["parameters"] = global_params


def _fresh(template: Path, tmp_path: Path) -> Workspace:
    root = tmp_path / "ws"
    shutil.copytree(template, root, symlinks=True)
    config = {"merge_method": "ties", "base_model": str(root / "in" / "base"),
              "models": [{"model": str(root / "in" / n), "parameters": {"weight": 1.0}} for n in ("ft_a", "ft_b", "ft_c")],
              "parameters": {"density": 0.5}}
    return Workspace(root=root, config=config)


def _snapshot(folder: Path) -> dict[str, str]:
    """Every entry under ``folder``: file contents, link targets, special files by kind."""
    seen = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        if path.is_symlink():
            seen[rel] = "link:" + os.readlink(path)
        elif path.is_fifo():
            seen[rel] = "fifo"
        elif path.is_file():
            seen[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            seen[rel] = "dir"
    return seen


# ---- file surgery ---------------------------------------------------------------------------

def _weights(folder: Path) -> Path:
    return folder / "model.safetensors"


def _split(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + length]), data[8 + length:]


def _join(path: Path, header: dict | bytes, body: bytes) -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)


def _edit_header(path: Path, edit: Callable[[dict], None]) -> None:
    header, body = _split(path)
    edit(header)
    _join(path, header, body)


def _first_tensor(header: dict) -> str:
    return next(k for k in header if k != "__metadata__")


def _by_offset(header: dict) -> list[str]:
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def _shard(folder: Path) -> None:
    """model.safetensors -> two shards and an index (weights unchanged)."""
    from safetensors.torch import load_file

    tensors = load_file(_weights(folder))
    names = sorted(tensors)
    half = len(names) // 2
    parts = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for file, keys in parts.items():
        save_file({k: tensors[k] for k in keys}, str(folder / file), metadata={"format": "pt"})
    _weights(folder).unlink()
    index = {"metadata": {}, "weight_map": {k: f for f, keys in parts.items() for k in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def _edit_index(folder: Path, edit: Callable[[dict], object]) -> None:
    _shard(folder)
    path = folder / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    result = edit(index)
    path.write_text(json.dumps(index if result is None else result))


# ---- the cases ------------------------------------------------------------------------------

CASES: dict[str, tuple[Callable[[Workspace], None], str]] = {}


def case(name: str, needle: str):
    def register(build: Callable[[Workspace], None]):
        assert name not in CASES
        CASES[name] = (build, needle)
        return build
    return register


def _param(ws: Workspace, key: str, value, model: int | None = None) -> None:
    target = ws.config["parameters"] if model is None else ws.config["models"][model]["parameters"]
    target[key] = value


# 1. non-finite parameters and outputs
case("weight-nan", "finite number")(lambda ws: _param(ws, "weight", float("nan"), 0))
case("weight-inf", "finite number")(lambda ws: _param(ws, "weight", float("inf"), 1))
case("lambda-nan", "finite number")(lambda ws: _param(ws, "lambda", float("nan")))
case("lambda-minus-inf", "finite number")(lambda ws: _param(ws, "lambda", float("-inf")))
case("density-nan", "finite number")(lambda ws: _param(ws, "density", float("nan")))
case("weight-nan-in-filter", "finite number")(
    lambda ws: _param(ws, "weight", [{"filter": "mlp", "value": float("nan")}, {"value": 1.0}], 0))
case("weight-nan-in-gradient", "finite number")(lambda ws: _param(ws, "weight", [1.0, float("nan")], 2))


@case("drm-coefficient-nan", "finite number")
def _(ws):
    ws.set_models("ft_a", "ft_b", method="drm")
    ws.config["models"][0]["parameters"]["coefficient"] = float("nan")


@case("lambda-overflows-float16", "overflow out_dtype float16")
def _(ws):
    ws.config["out_dtype"] = "float16"
    _param(ws, "lambda", 1e30)


@case("weight-overflows-compute-dtype", "a parameter is too large")
def _(ws):
    _param(ws, "weight", 1e300, 0)


@case("nan-in-a-fine-tune", "NaN or Inf")
def _(ws):
    header, body = _split(_weights(ws.model("ft_b")))
    begin = header[Q_PROJ]["data_offsets"][0]
    body = body[:begin] + struct.pack("<f", float("nan")) + body[begin + 4:]
    _join(_weights(ws.model("ft_b")), header, body)


# 2. headers that lie
@case("dtype-relabelled-f32-as-i32", "stored as int32 where the base has float32")
def _(ws):
    _edit_header(_weights(ws.model("ft_a")), lambda h: h[Q_PROJ].update(dtype="I32"))


@case("dtype-relabelled-f32-as-u32", "stored as uint32")
def _(ws):
    _edit_header(_weights(ws.model("ft_c")), lambda h: h[Q_PROJ].update(dtype="U32"))


@case("dtype-relabelled-with-shape", "shape")
def _(ws):
    _edit_header(_weights(ws.model("ft_a")), lambda h: h[Q_PROJ].update(dtype="BF16", shape=[16, 32]))


@case("base-relabelled-as-integers", "where the base has int32")
def _(ws):
    _edit_header(_weights(ws.model("base")), lambda h: h[Q_PROJ].update(dtype="I32"))


# 3. the output on an input
@case("overwrite-onto-fine-tune", "is the input model")
def _(ws):
    ws.command = ["merge", "CONFIG", str(ws.model("ft_a")), "--overwrite"]


@case("overwrite-onto-base", "is the input base")
def _(ws):
    ws.command = ["merge", "CONFIG", str(ws.model("base")), "--overwrite"]


@case("overwrite-onto-folder-of-inputs", "contains the input")
def _(ws):
    ws.command = ["merge", "CONFIG", str(ws.inputs), "--overwrite"]


@case("out-inside-an-input", "lies inside the input")
def _(ws):
    ws.command = ["merge", "CONFIG", str(ws.model("ft_b") / "merged")]
    ws.target = ws.model("ft_b") / "merged"


@case("out-symlink-to-an-input", "is the input model")
def _(ws):
    ws.out.parent.mkdir()
    ws.out.symlink_to(ws.model("ft_c"))
    ws.extra = ["--overwrite"]
    ws.target = None


@case("overwrite-onto-tokenizer-source", "tokenizer source")
def _(ws):
    shutil.copytree(ws.model("base"), ws.model("tok"))
    ws.config["tokenizer_source"] = str(ws.model("tok"))
    ws.command = ["merge", "CONFIG", str(ws.model("tok")), "--overwrite"]


@case("out-inside-the-adapter", "lies inside the input")
def _(ws):
    ws.config["models"][2] = {"model": str(ws.model("lora")), "parameters": {}}
    ws.command = ["merge", "CONFIG", str(ws.model("lora") / "x")]
    ws.target = ws.model("lora") / "x"


# 5. malformed checkpoints and configs
@case("truncated-data", "outside the")
def _(ws):
    path = _weights(ws.model("ft_a"))
    path.write_bytes(path.read_bytes()[:-100])


@case("truncated-header", "header claims")
def _(ws):
    path = _weights(ws.model("ft_b"))
    path.write_bytes(path.read_bytes()[:40])


@case("file-shorter-than-length-field", "too short for a header")
def _(ws):
    _weights(ws.model("ft_b")).write_bytes(b"\x01\x02\x03")


@case("header-length-2-to-the-62", "header claims")
def _(ws):
    path = _weights(ws.model("ft_c"))
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 2**62) + data[8:])


@case("header-not-json", "not valid JSON")
def _(ws):
    _join(_weights(ws.model("ft_a")), b"{not json", _split(_weights(ws.model("ft_a")))[1])


@case("header-a-list", "not a JSON object")
def _(ws):
    _join(_weights(ws.model("ft_a")), b"[1, 2]", _split(_weights(ws.model("ft_a")))[1])


@case("header-not-utf8", "not valid JSON")
def _(ws):
    _join(_weights(ws.model("ft_a")), b'{"\xff\xfe": 1}', _split(_weights(ws.model("ft_a")))[1])


@case("offsets-out-of-range", "outside the")
def _(ws):
    def edit(h):
        last = _by_offset(h)[-1]
        begin, end = h[last]["data_offsets"]
        h[last]["data_offsets"] = [begin + 64, end + 64]
    _edit_header(_weights(ws.model("ft_b")), edit)


@case("offsets-overlap", "overlap")
def _(ws):
    def edit(h):
        first, second = _by_offset(h)[:2]
        h[second]["data_offsets"] = list(h[first]["data_offsets"])
        h[second].update(dtype=h[first]["dtype"], shape=h[first]["shape"])
    _edit_header(_weights(ws.model("ft_c")), edit)


@case("offsets-span-wrong-size", "needs")
def _(ws):
    _edit_header(_weights(ws.model("ft_a")), lambda h: h[Q_PROJ].update(shape=[16, 8]))


@case("unknown-dtype", "unknown dtype 'F17'")
def _(ws):
    _edit_header(_weights(ws.model("ft_a")), lambda h: h[Q_PROJ].update(dtype="F17"))


@case("negative-shape", "invalid shape")
def _(ws):
    _edit_header(_weights(ws.model("ft_a")), lambda h: h[Q_PROJ].update(shape=[-16, -16]))


@case("tensor-entry-missing-offsets", "exactly dtype, shape and data_offsets")
def _(ws):
    _edit_header(_weights(ws.model("ft_a")), lambda h: h[Q_PROJ].pop("data_offsets"))


@case("weights-are-dev-urandom", "not a regular file")
def _(ws):
    _weights(ws.model("ft_a")).unlink()
    _weights(ws.model("ft_a")).symlink_to("/dev/urandom")


@case("weights-are-a-folder", "is a folder")
def _(ws):
    _weights(ws.model("ft_b")).unlink()
    _weights(ws.model("ft_b")).mkdir()


@case("weights-symlink-loop", "cannot open")
def _(ws):
    weights = _weights(ws.model("ft_c"))
    weights.unlink()
    loop = ws.model("ft_c") / "loop.safetensors"
    weights.symlink_to(loop)
    loop.symlink_to(weights)


@case("weights-dangling-symlink", "dangling symlink")
def _(ws):
    _weights(ws.model("ft_a")).unlink()
    _weights(ws.model("ft_a")).symlink_to(ws.root / "gone.safetensors")


@case("random-bytes-as-weights", "not a valid safetensors file")
def _(ws):
    _weights(ws.model("ft_a")).write_bytes(bytes(range(256)) * 40)


@case("index-weight-map-a-list", "'weight_map' object")
def _(ws):
    _edit_index(ws.model("ft_a"), lambda i: i.update(weight_map=[1, 2]))


@case("index-weight-map-null", "'weight_map' object")
def _(ws):
    _edit_index(ws.model("ft_b"), lambda i: i.update(weight_map=None))


@case("index-points-at-wrong-shard", "which does not contain it")
def _(ws):
    def edit(index):
        name = next(iter(index["weight_map"]))
        index["weight_map"][name] = ("model-00002-of-00002.safetensors"
                                     if index["weight_map"][name].startswith("model-00001") else "model-00001-of-00002.safetensors")
    _edit_index(ws.model("ft_c"), edit)


@case("index-not-json", "not valid JSON")
def _(ws):
    _shard(ws.model("ft_a"))
    (ws.model("ft_a") / "model.safetensors.index.json").write_text("{weight_map:")


@case("index-a-list", "must hold a JSON object")
def _(ws):
    _edit_index(ws.model("ft_a"), lambda i: [i])


@case("index-shard-missing", "does not exist")
def _(ws):
    _shard(ws.model("ft_b"))
    (ws.model("ft_b") / "model-00002-of-00002.safetensors").unlink()


@case("corrupt-base", "model '")
def _(ws):
    _weights(ws.model("base")).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!")


@case("circuit-merge-corrupt-variant", "not a valid safetensors file")
def _(ws):
    _weights(ws.model("ft_b")).write_bytes(_weights(ws.model("ft_b")).read_bytes()[:30])
    ws.command = ["circuit-merge", str(ws.model("base")), str(ws.model("ft_a")), str(ws.model("ft_b")), "OUT"]


case("shard-size-inf", "shard_size")(lambda ws: ws.config.update(shard_size=float("inf")))
case("shard-size-inf-string", "shard_size")(lambda ws: ws.config.update(shard_size="inf"))
case("shard-size-negative", "shard_size")(lambda ws: ws.config.update(shard_size=-5))
case("shard-size-words", "shard_size")(lambda ws: ws.config.update(shard_size="lots"))


@case("config-not-utf8", "not UTF-8")
def _(ws):
    ws.config = b"merge_method: ties\nbase_model: \xff\xfe\n"  # type: ignore[assignment]


@case("config-nested-100000-deep", "nested too deeply")
def _(ws):
    ws.config = ("models: " + "[" * 100_000 + "]" * 100_000 + "\n").encode()  # type: ignore[assignment]


@case("config-a-list", "must be a YAML mapping")
def _(ws):
    ws.config = b"- merge_method: ties\n"  # type: ignore[assignment]


@case("base-config-json-a-list", "must hold a JSON object")
def _(ws):
    (ws.model("base") / "config.json").write_text("[1, 2, 3]")


@case("base-config-json-not-json", "not valid JSON")
def _(ws):
    (ws.model("base") / "config.json").write_text("{\"num_hidden_layers\": ")


@case("base-config-layer-count-disagrees", "says the model has 1 layers")
def _(ws):
    config = json.loads((ws.model("base") / "config.json").read_text())
    (ws.model("base") / "config.json").write_text(json.dumps(config | {"num_hidden_layers": 1}))
    _param(ws, "weight", [0.5, 1.0, 1.5], 0)


@case("adapter-rank-pattern-zero", "rank_pattern")
def _(ws):
    shutil.rmtree(ws.model("lora"))
    _save_adapter(ws.model("lora"), rank_pattern={"q_proj": 0})
    ws.config["models"][2] = {"model": str(ws.model("lora")), "parameters": {}}


@case("adapter-rank-pattern-bad-regex", "rank_pattern")
def _(ws):
    shutil.rmtree(ws.model("lora"))
    _save_adapter(ws.model("lora"), rank_pattern={"q_proj[": 4})
    ws.config["models"][2] = {"model": str(ws.model("lora")), "parameters": {}}


@case("adapter-alpha-nan", "lora_alpha")
def _(ws):
    shutil.rmtree(ws.model("lora"))
    _save_adapter(ws.model("lora"), lora_alpha=float("nan"))
    ws.config["models"][2] = {"model": str(ws.model("lora")), "parameters": {}}


@case("adapter-dora", "DoRA")
def _(ws):
    shutil.rmtree(ws.model("lora"))
    _save_adapter(ws.model("lora"), use_dora=True)
    ws.config["models"][2] = {"model": str(ws.model("lora")), "parameters": {}}


@case("adapter-config-a-list", "JSON object")
def _(ws):
    (ws.model("lora") / "adapter_config.json").write_text("[]")
    ws.config["models"][2] = {"model": str(ws.model("lora")), "parameters": {}}


class _Evil:
    def __init__(self, mark: Path) -> None:
        self.mark = mark

    def __reduce__(self):
        return (os.system, (f"touch {self.mark}",))


@case("malicious-pickle-allowed", "cannot be loaded as plain weights")
def _(ws):
    folder = ws.model("ft_b")
    _weights(folder).unlink()
    torch.save({Q_PROJ: _Evil(ws.root / "PWNED")}, folder / "pytorch_model.bin")
    ws.config["allow_pickle"] = True


@case("pickle-not-allowed", "allow_pickle")
def _(ws):
    folder = ws.model("ft_b")
    _weights(folder).unlink()
    torch.save({Q_PROJ: torch.zeros(16, 16)}, folder / "pytorch_model.bin")


@case("out-dangling-symlink", "a symlink to")
def _(ws):
    ws.out.parent.mkdir()
    ws.out.symlink_to(ws.root / "nowhere")
    ws.target = None


# 6. YAML bombs and size
@case("yaml-alias-bomb-in-filter", "expands to more than")
def _(ws):
    lines = ["merge_method: ties", f"base_model: {ws.model('base')}", 'a: &a ["x","x","x","x","x","x","x","x","x"]']
    for prev, name in zip("abcdef", "bcdefg"):
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    lines += ["models:", f"  - model: {ws.model('ft_a')}", "    parameters:",
              "      weight: [{filter: *g, value: 1.0}]"]
    ws.config = ("\n".join(lines) + "\n").encode()  # type: ignore[assignment]


@case("yaml-recursive-alias", "recursive")
def _(ws):
    ws.config = b"merge_method: ties\nmodels: &m [*m]\n"  # type: ignore[assignment]


@case("config-over-1-MiB", "at most 1048576")
def _(ws):
    ws.config = (yaml.safe_dump(ws.config) + "#" * (2**20 + 10) + "\n").encode()  # type: ignore[assignment]


# 7. escapes
@case("index-entry-escapes-folder", "no absolute paths, no '..'")
def _(ws):
    outside = ws.root / "outside" / "model.safetensors"
    def edit(index):
        _weights_file = ws.model("ft_a") / "model-00001-of-00002.safetensors"
        shutil.copy(_weights_file, outside)
        for name, file in index["weight_map"].items():
            if file == "model-00001-of-00002.safetensors":
                index["weight_map"][name] = "../../outside/model.safetensors"
    _edit_index(ws.model("ft_a"), edit)


@case("index-entry-absolute", "no absolute paths")
def _(ws):
    def edit(index):
        shutil.copy(ws.model("ft_b") / "model-00002-of-00002.safetensors", ws.root / "outside" / "abs.safetensors")
        for name, file in index["weight_map"].items():
            if file == "model-00002-of-00002.safetensors":
                index["weight_map"][name] = str(ws.root / "outside" / "abs.safetensors")
    _edit_index(ws.model("ft_b"), edit)


@case("shard-symlinked-outside", "outside the model folder")
def _(ws):
    _shard(ws.model("ft_c"))
    shard = ws.model("ft_c") / "model-00001-of-00002.safetensors"
    shutil.move(shard, ws.root / "outside" / shard.name)
    shard.symlink_to(ws.root / "outside" / shard.name)


@case("tokenizer-file-symlinked-to-a-secret", "outside the model folder")
def _(ws):
    target = ws.model("base") / "tokenizer.json"
    target.unlink()
    target.symlink_to(ws.root / "outside" / "secret.txt")


@case("config-json-symlinked-outside", "outside the model folder")
def _(ws):
    config = ws.model("base") / "config.json"
    shutil.move(config, ws.root / "outside" / "config.json")
    config.symlink_to(ws.root / "outside" / "config.json")


@case("collect-stats-on-a-pickle", "pickle checkpoint")
def _(ws):
    folder = ws.model("base")
    _weights(folder).unlink()
    torch.save({Q_PROJ: _Evil(ws.root / "PWNED")}, folder / "pytorch_model.bin")
    (ws.root / "calib.txt").write_text("w1 w2 w3\n")
    ws.command = ["collect-stats", str(folder), str(ws.root / "calib.txt"), "--out", "OUT"]


# 10. hub ids and local paths
@case("missing-path-with-one-slash", "read as a Hugging Face id because no local path")
def _(ws):
    ws.config["models"][0]["model"] = "nosuchfolder/ft_zzz"


@case("missing-path-under-existing-folder", "its first folder exists")
def _(ws):
    ws.config["models"][0]["model"] = "in/ft_zzz"  # relative to the workspace, where the command runs


@case("missing-dot-slash-path", "does not exist")
def _(ws):
    ws.config["models"][1]["model"] = "./no/such/model"


# everything else a user gets wrong
case("unknown-method", "unknown")(lambda ws: ws.config.update(merge_method="tie"))
case("no-models", "model list is empty")(lambda ws: ws.config.update(models=[]))
case("unknown-top-level-key", "Extra inputs are not permitted")(lambda ws: ws.config.update(modles=[]))
case("bad-include-regex", "invalid regex")(lambda ws: ws.config.update(include=["(["]))
case("bad-out-dtype", "out_dtype")(lambda ws: ws.config.update(out_dtype="float8"))
case("seed-not-a-number", "seed")(lambda ws: ws.config.update(seed="abc"))
case("density-out-of-range", "density")(lambda ws: _param(ws, "density", 1.5))
case("weight-a-string", "weight")(lambda ws: _param(ws, "weight", "heavy", 1))
case("unknown-parameter", "unknown parameter")(lambda ws: _param(ws, "densty", 0.5))


@case("stats-file-missing", "stats file")
def _(ws):
    ws.set_models("ft_a", "ft_b", method="scale_svd")
    ws.config["stats"] = str(ws.root / "nostats.safetensors")

case("config-file-missing", "does not exist")(lambda ws: setattr(ws, "command", ["merge", str(ws.root / "none.yml"), "OUT"]))


@case("fine-tune-lacks-a-tensor", "lacks tensor")
def _(ws):
    _edit_header(_weights(ws.model("ft_a")), lambda h: h.pop(_by_offset(h)[-1]))


@case("fine-tune-has-an-extra-tensor", "that the base lacks")
def _(ws):
    from safetensors.torch import load_file

    tensors = load_file(_weights(ws.model("ft_b"))) | {"extra.weight": torch.zeros(2)}
    save_file(tensors, str(_weights(ws.model("ft_b"))), metadata={"format": "pt"})


@case("fine-tune-of-another-shape", "does not match the base")
def _(ws):
    from safetensors.torch import load_file

    tensors = load_file(_weights(ws.model("ft_c")))
    tensors[Q_PROJ] = torch.zeros(8, 16)
    save_file(tensors, str(_weights(ws.model("ft_c"))), metadata={"format": "pt"})


@case("slerp-with-three-models", "slerp")
def _(ws):
    ws.set_models("ft_a", "ft_b", "ft_c", method="slerp", t=0.5)


@case("output-parent-is-a-file", "cannot create its parent folder")
def _(ws):
    (ws.root / "afile").write_text("x")
    ws.command = ["merge", "CONFIG", str(ws.root / "afile" / "merged")]
    ws.target = ws.root / "afile" / "merged"


def _run(ws: Workspace) -> tuple[int, str]:
    config_path = ws.root / "config.yml"
    config_path.write_bytes(ws.config if isinstance(ws.config, bytes) else yaml.safe_dump(ws.config).encode())
    command = ws.command or ["merge", "CONFIG", "OUT"]
    command = [str(config_path) if a == "CONFIG" else str(ws.out) if a == "OUT" else a for a in command]
    cwd = Path.cwd()
    os.chdir(ws.root)
    try:
        result = runner.invoke(app, [*command, *ws.extra, "-q"] if command[0] != "collect-stats" else command)
    finally:
        os.chdir(cwd)
    assert isinstance(result.exception, SystemExit), f"not a clean exit: {result.exception!r}\n{result.output}"
    return result.exit_code, result.stderr


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_clean_error(name, template, tmp_path):
    build, needle = CASES[name]
    ws = _fresh(template, tmp_path)
    build(ws)
    inputs_before = _snapshot(ws.inputs)
    out_before = _snapshot(ws.out.parent) if ws.out.parent.exists() else None
    code, stderr = _run(ws)
    lines = stderr.strip().splitlines()
    assert code == 2, stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    assert needle in lines[0], (needle, lines[0])
    assert _snapshot(ws.inputs) == inputs_before, "an input changed"
    if out_before is None:
        assert not ws.out.parent.exists() or not any(ws.out.parent.iterdir()), list(ws.out.parent.iterdir())
    else:
        assert _snapshot(ws.out.parent) == out_before
    if ws.target is not None:
        assert not os.path.lexists(ws.target)
    assert not (ws.root / "PWNED").exists(), "the pickle ran code"
    leftovers = [p for p in ws.root.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name]
    assert not leftovers, leftovers


def test_table_covers_at_least_sixty_cases():
    assert len(CASES) >= 60, len(CASES)


# ---- cases that could hang or need limits of their own process ----------------------------------

def _subprocess_merge(ws: Workspace, *extra: str, timeout: float = 120, preexec=None) -> subprocess.CompletedProcess:
    config_path = ws.root / "config.yml"
    config_path.write_text(yaml.safe_dump(ws.config))
    return subprocess.run([sys.executable, "-m", "flows.cli", "merge", str(config_path), str(ws.out), "-q", *extra],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout, preexec_fn=preexec)


def test_fifo_weights_are_refused_not_read(template, tmp_path):
    ws = _fresh(template, tmp_path)
    _weights(ws.model("ft_b")).unlink()
    os.mkfifo(_weights(ws.model("ft_b")))
    result = _subprocess_merge(ws, timeout=60)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().startswith("error: ") and "FIFO, not a regular file" in result.stderr
    assert not ws.out.exists()


def test_disk_full_is_one_line_and_leaves_nothing(template, tmp_path):
    """A file-size limit makes every write past 20 kB fail as a full disk would (EFBIG)."""
    ws = _fresh(template, tmp_path)

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    result = _subprocess_merge(ws, preexec=limit)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot write" in lines[0] and "File too large" in lines[0], result.stderr
    assert not ws.out.parent.exists() or not any(ws.out.parent.iterdir())


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_signal_mid_merge_leaves_no_temporary_folder(template, tmp_path, signum, code):
    """SIGTERM and SIGINT clean up as an error does: no target, no ``.OUT.tmp-*``."""
    ws = _fresh(template, tmp_path)
    # the merge is held after its tensors are written into the temporary folder (a patched
    # support-file step signals and sleeps), and stopped from outside there
    config_path = ws.root / "config.yml"
    config_path.write_text(yaml.safe_dump(ws.config))
    script = ("import sys, signal, os, time\n"
            # as in an interactive shell: a parent started in the background (no job control) passes SIGINT ignored
            "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
            "import merging.stages as s\n"
            "ready = sys.argv[1]\n"
            "def slow(ctx, out):\n"
            "    open(ready, 'w').close()\n"
            "    time.sleep(60)\n"
            "s.write_model_files = slow\n"
            "from flows.cli import main\n"
            "sys.argv = ['mergeflow', 'merge', sys.argv[2], sys.argv[3], '-q']\n"
            "main()\n")
    ready = tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-c", script, str(ready), str(config_path), str(ws.out)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        import time

        deadline = time.monotonic() + 120
        while not ready.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert list(ws.out.parent.glob(".merged.tmp-*")), "the temporary folder should exist mid-merge"
        proc.send_signal(signum)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code
    assert not ws.out.exists()
    assert not list(ws.out.parent.glob(".merged.*")), list(ws.out.parent.iterdir())


def test_overwrite_onto_a_file_leaves_nothing_aside(template, tmp_path):
    ws = _fresh(template, tmp_path)
    ws.out.parent.mkdir()
    ws.out.write_text("an old file\n")
    config_path = ws.root / "config.yml"
    config_path.write_text(yaml.safe_dump(ws.config))
    result = runner.invoke(app, ["merge", str(config_path), str(ws.out), "--overwrite", "-q"])
    assert result.exit_code == 0, result.stderr
    assert (ws.out / "model.safetensors").is_file()
    assert sorted(p.name for p in ws.out.parent.iterdir()) == ["merged"]


def test_allow_nonfinite_writes_what_was_refused(template, tmp_path):
    ws = _fresh(template, tmp_path)
    ws.config["out_dtype"] = "float16"
    ws.config["parameters"]["lambda"] = 1e30
    config_path = ws.root / "config.yml"
    config_path.write_text(yaml.safe_dump(ws.config))
    result = runner.invoke(app, ["merge", str(config_path), str(ws.out), "-q", "--allow-nonfinite"])
    assert result.exit_code == 0, result.stderr
    from safetensors.torch import load_file

    merged = load_file(ws.out / "model.safetensors")
    assert not torch.isfinite(merged[Q_PROJ]).all()


def test_immutable_target_with_overwrite_is_one_line_and_untouched(template, tmp_path):
    """A target the file system will not let anyone move (``chattr +i``): the rename fails,
    the error is one line, and the old target and its parent are as they were."""
    ws = _fresh(template, tmp_path)
    ws.out.mkdir(parents=True)
    (ws.out / "old.txt").write_text("old\n")
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(ws.out)], capture_output=True).returncode:
        pytest.skip("chattr +i is not available here (needs CAP_LINUX_IMMUTABLE)")
    try:
        config_path = ws.root / "config.yml"
        config_path.write_text(yaml.safe_dump(ws.config))
        result = runner.invoke(app, ["merge", str(config_path), str(ws.out), "--overwrite", "-q"])
    finally:
        subprocess.run(["chattr", "-i", str(ws.out)], check=True)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and "cannot write" in lines[0], result.stderr
    assert sorted(p.name for p in ws.out.iterdir()) == ["old.txt"]
    assert sorted(p.name for p in ws.out.parent.iterdir()) == ["merged"]

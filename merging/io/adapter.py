"""PEFT LoRA adapter folders read as dense deltas per base tensor key, one tensor at a time.

A folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` (as peft's
``save_pretrained`` writes them; pickle ``adapter_model.bin`` is refused). Tensor keys are
``base_model.model.<module>.<part>``; the base key is ``<module>.weight`` and:

* ``lora_A.weight`` [r, in] and ``lora_B.weight`` [out, r]: delta = s * B @ A, transposed when
  ``fan_in_fan_out`` (GPT-2 ``Conv1D`` stores [in, out]);
* ``lora_embedding_A`` [r, vocab] and ``lora_embedding_B`` [hidden, r]: delta = s * (B @ A)^T;
* any other tensor is a full tensor (``modules_to_save``, trained biases, the embedding that
  peft saves beside an embedding LoRA): delta = saved - base. ``.modules_to_save[.<adapter>]``
  and ``.base_layer`` are dropped from the key, so ``lm_head.weight`` and
  ``lm_head.modules_to_save.default.weight`` both map to ``lm_head.weight``.

Scaling s = alpha / r, or alpha / sqrt(r) with ``use_rslora``; r and alpha come per module from
``rank_pattern`` / ``alpha_pattern`` by peft 0.21's rule (``get_pattern_key``: the first
pattern, in config order, that matches the end of the module name as a regex,
``(.*\\.)?(<pattern>)$``), else from ``r`` / ``lora_alpha``. DoRA, ``lora_bias`` and the other
variants that are not a plain additive ``s B A`` are refused. See
``../shared/specs/circuit-della-peft.md`` §3.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from merging.errors import AdapterError, CheckpointMismatchError, CheckpointNotFoundError, UnsafeCheckpointError
from merging.io.files import model_file, read_json_object
from merging.io.safetensors_header import read_header

__all__ = ["LoraAdapter", "ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "pattern_key"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLE_WEIGHTS = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."

# Config fields whose adapters are not a plain additive s * B @ A (truthy value -> refused).
_UNSUPPORTED = {
    "use_dora": "DoRA (weight-decomposed LoRA) rescales whole columns, so its delta is not s * B @ A",
    "lora_bias": "lora_bias adds a trained bias to lora_B",
    "target_parameters": "LoRA on nn.Parameter targets (target_parameters) is not a module LoRA",
    "trainable_token_indices": "trainable tokens store sparse embedding rows",
    "layer_replication": "layer_replication changes the model's layer layout",
    "alora_invocation_tokens": "activated LoRA (aLoRA) only applies after its invocation tokens",
    "use_qalora": "QA-LoRA pools the input, its lora_A does not span the full input",
    "use_bdlora": "block-diagonal LoRA stores its factors in blocks",
    "kasa_config": "KaSA modifies the base weight's singular values",
    "velora_config": "VeLoRA is not a plain LoRA",
    "monteclora_config": "MonteCLoRA samples its factors",
    "arrow_config": "Arrow routes between several LoRA experts",
}
_FACTOR = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)$")
_MODULES_TO_SAVE = re.compile(r"\.modules_to_save(\.[^.]+)?(?=\.[^.]+$)")
_CONVERT_HINT = (
    "convert it once in a trusted environment: load it with PeftModel.from_pretrained(base, folder) and call "
    "save_pretrained(folder, safe_serialization=True), or run python -c \"import torch; from safetensors.torch "
    "import save_file; save_file(torch.load('adapter_model.bin', weights_only=True), "
    "'adapter_model.safetensors', metadata={'format': 'pt'})\" in the folder"
)


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def pattern_key(pattern_keys: list[str], module: str) -> str | None:
    """peft 0.21's ``get_pattern_key``: the first key matching the end of ``module`` (as a regex)."""
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


@dataclass(frozen=True)
class _Factors:
    """One LoRA module: its factor keys in the file, scaling and the dense delta's shape."""

    module: str
    a_key: str
    b_key: str
    embedding: bool
    transpose: bool
    scaling: float
    shape: tuple[int, int]


class LoraAdapter:
    """A PEFT LoRA adapter folder, giving dense deltas per base checkpoint key on demand.

    Args:
        path: the adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``).
        name: how the adapter is named in messages (defaults to the path).

    Attributes:
        path, name: as given.
        config: the parsed ``adapter_config.json``.
        base_model_name_or_path: the base the adapter records (advisory; shapes are what
            ``check_against`` checks).

    Raises:
        CheckpointNotFoundError: the folder does not exist.
        UnsafeCheckpointError: only ``adapter_model.bin`` (pickle) is there.
        AdapterError: a file is missing or malformed, the adapter is not a plain LoRA, or its
            tensors do not agree with its config.
    """

    def __init__(self, path: str | Path, name: str | None = None) -> None:
        self.path = Path(path)
        self.name = name or str(path)
        if not self.path.is_dir():
            raise CheckpointNotFoundError(f"adapter {self.name!r}: folder {self.path} does not exist")
        self.config = self._read_config()
        self.base_model_name_or_path: str | None = self.config.get("base_model_name_or_path")
        self._weights = self._weights_file()
        self._full: dict[str, str] = {}  # base key -> file key of a saved full tensor
        self._lora: dict[str, _Factors] = {}  # base key -> factors
        self._index()

    # ---- parsing -------------------------------------------------------------------------

    def _fail(self, what: str) -> AdapterError:
        return AdapterError(f"adapter {self.name!r} ({self.path}): {what}")

    def _read_config(self) -> dict[str, Any]:
        file = model_file(self.path, ADAPTER_CONFIG, f"adapter {self.name!r}", required=False)
        if file is None:
            raise self._fail(f"no {ADAPTER_CONFIG}; give a folder written by peft's save_pretrained")
        try:
            config = read_json_object(file, f"adapter {self.name!r}")
        except CheckpointMismatchError as err:
            raise AdapterError(f"{err}; re-save the adapter or fix the file") from None
        peft_type = config.get("peft_type")
        if peft_type != "LORA":
            raise self._fail(
                f"peft_type {peft_type!r} is not supported, only 'LORA'; merge it into its base with peft's "
                "merge_and_unload() and give the saved full model instead"
            )
        used = [f"{key} ({why})" for key, why in _UNSUPPORTED.items() if config.get(key)]
        if used:
            raise self._fail(
                f"{'; '.join(used)}: not a plain additive LoRA. Merge it into its base with peft's "
                "merge_and_unload(), save_pretrained the full model and give that folder as a model"
            )
        for key in ("r", "lora_alpha"):
            if not _positive(config.get(key)):
                raise self._fail(f"{ADAPTER_CONFIG} key {key!r} must be a positive number, got {config.get(key)!r}")
        for key in ("rank_pattern", "alpha_pattern"):
            patterns = config.get(key) or {}
            if not isinstance(patterns, dict):
                raise self._fail(f"{ADAPTER_CONFIG} key {key!r} must be a mapping, got {config[key]!r}")
            for pattern, value in patterns.items():
                if not _positive(value) or (key == "rank_pattern" and not isinstance(value, int)):
                    kind = "a positive integer" if key == "rank_pattern" else "a positive number"
                    raise self._fail(f"{ADAPTER_CONFIG} {key}[{pattern!r}] must be {kind}, got {value!r}")
                try:
                    re.compile(pattern)
                except re.error as err:
                    raise self._fail(f"{ADAPTER_CONFIG} {key} key {pattern!r} is not a valid regex ({err})") from None
        return config

    def _weights_file(self) -> Path:
        file = model_file(self.path, ADAPTER_WEIGHTS, f"adapter {self.name!r}", required=False)
        if file is not None:
            try:
                read_header(file, f"adapter {self.name!r}")
            except CheckpointMismatchError as err:
                raise AdapterError(f"{err} ({ADAPTER_WEIGHTS} cannot be read)") from None
            return file
        if (self.path / PICKLE_WEIGHTS).is_file():
            raise UnsafeCheckpointError(
                f"adapter {self.name!r}: {self.path} holds only {PICKLE_WEIGHTS}, a pickle file that can run "
                f"arbitrary code when loaded, so it is never read; {_CONVERT_HINT}"
            )
        raise self._fail(f"no {ADAPTER_WEIGHTS}; give a folder written by peft's save_pretrained")

    def _resolve(self, module: str) -> tuple[int, float]:
        """(rank, scaling) of one module from r / lora_alpha and the patterns."""
        ranks, alphas = self.config.get("rank_pattern") or {}, self.config.get("alpha_pattern") or {}
        r_key, alpha_key = pattern_key(list(ranks), module), pattern_key(list(alphas), module)
        rank = ranks[r_key] if r_key is not None else self.config["r"]
        alpha = alphas[alpha_key] if alpha_key is not None else self.config["lora_alpha"]
        return rank, alpha / math.sqrt(rank) if self.config.get("use_rslora") else alpha / rank

    def _index(self) -> None:
        try:
            with safe_open(self._weights, framework="pt") as handle:
                shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
        except (SafetensorError, OSError) as err:
            raise self._fail(f"{ADAPTER_WEIGHTS} cannot be read ({err}); re-save the adapter") from None
        parts: dict[str, dict[str, str]] = {}
        for key in shapes:
            rel = key.removeprefix(PEFT_PREFIX)
            if ".lora_" in rel or rel.startswith("lora_"):
                found = _FACTOR.match(rel)
                if found is None:
                    if "lora_magnitude_vector" in rel:
                        raise self._fail(f"tensor {key!r} is a DoRA magnitude; DoRA adapters are not plain LoRA")
                    if rel.endswith("lora_B.bias"):
                        raise self._fail(f"tensor {key!r} is a lora_bias; such adapters are not plain LoRA")
                    raise self._fail(f"tensor {key!r} is not a LoRA factor this reader knows (lora_A/lora_B/lora_embedding_A/B)")
                parts.setdefault(found["module"], {})[found["part"]] = key
                continue
            base_key = _MODULES_TO_SAVE.sub("", rel).replace(".base_layer.", ".")
            if base_key in self._full:
                raise self._fail(f"tensors {self._full[base_key]!r} and {key!r} both set base tensor {base_key!r}")
            self._full[base_key] = key
        for module, found in parts.items():
            self._lora[f"{module}.weight"] = self._factors(module, found, shapes)

    def _factors(self, module: str, found: dict[str, str], shapes: dict[str, tuple[int, ...]]) -> _Factors:
        embedding = "lora_embedding_A" in found or "lora_embedding_B" in found
        a_part, b_part = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A.weight", "lora_B.weight")
        if a_part not in found or b_part not in found:
            raise self._fail(f"module {module!r} has {sorted(found)} but needs both {a_part} and {b_part}")
        a_shape, b_shape = shapes[found[a_part]], shapes[found[b_part]]
        if len(a_shape) != 2 or len(b_shape) != 2:
            raise self._fail(
                f"module {module!r}: factors {a_part} {a_shape} and {b_part} {b_shape} are not matrices "
                "(convolution LoRA is not supported)"
            )
        rank, scaling = self._resolve(module)
        if a_shape[0] != rank or b_shape[1] != rank:
            raise self._fail(
                f"module {module!r}: {a_part} {a_shape} and {b_part} {b_shape} do not have rank {rank} as "
                f"{ADAPTER_CONFIG} (r / rank_pattern) says; the config and the weights do not belong together"
            )
        transpose = embedding or bool(self.config.get("fan_in_fan_out"))
        shape = (a_shape[1], b_shape[0]) if transpose else (b_shape[0], a_shape[1])
        return _Factors(module, found[a_part], found[b_part], embedding, transpose, scaling, shape)

    def _expected_shapes(self) -> dict[str, tuple[int, ...]]:
        with safe_open(self._weights, framework="pt") as handle:
            expected = {key: tuple(handle.get_slice(file_key).get_shape()) for key, file_key in self._full.items()}
        for key, factors in self._lora.items():
            if key in expected and expected[key] != factors.shape:
                raise self._fail(
                    f"module {factors.module!r}: the saved full tensor {self._full[key]!r} has shape {expected[key]} "
                    f"but its LoRA delta has shape {factors.shape}"
                )
            expected[key] = factors.shape
        return expected

    # ---- public --------------------------------------------------------------------------

    def check_against(self, base_shapes: Mapping[str, tuple[int, ...]]) -> None:
        """Check every touched key exists in the base with the adapter's shape.

        Args:
            base_shapes: base checkpoint key -> shape.

        Raises:
            AdapterError: naming each module that is missing or whose shapes disagree.
        """
        problems = []
        for key, shape in sorted(self._expected_shapes().items()):
            module = key.rsplit(".", 1)[0]
            if key not in base_shapes:
                problems.append(f"module {module!r}: base has no tensor {key!r}")
            elif tuple(base_shapes[key]) != shape:
                hint = " (check fan_in_fan_out)" if tuple(base_shapes[key]) == shape[::-1] else ""
                problems.append(f"module {module!r}: adapter shape {shape} vs base {tuple(base_shapes[key])}{hint}")
        if problems:
            shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
            raise self._fail(
                f"does not fit the base: {shown}. This LoRA adapter was made for another base "
                f"(it records base_model_name_or_path={self.base_model_name_or_path!r}); merge it with that base"
            )

    def delta(self, key: str, base: torch.Tensor) -> torch.Tensor | None:
        """The dense delta of base tensor ``key``, or None when the adapter does not touch it.

        Args:
            key: base checkpoint key, e.g. ``model.layers.0.self_attn.q_proj.weight``.
            base: the base tensor of that key (full tensors' deltas are taken against it).

        Returns:
            ``base + delta`` is the weight peft's ``merge_and_unload()`` gives; float64 when
            ``base`` is float64, else float32; on ``base``'s device.

        Raises:
            AdapterError: the shapes of the adapter and ``base`` disagree.
        """
        if key not in self._lora and key not in self._full:
            return None
        dtype = torch.float64 if base.dtype == torch.float64 else torch.float32
        delta = torch.zeros(base.shape, dtype=dtype)
        with safe_open(self._weights, framework="pt") as handle:
            if key in self._full:
                saved = handle.get_tensor(self._full[key])
                if saved.shape != base.shape:
                    raise self._fail(f"tensor {self._full[key]!r} has shape {tuple(saved.shape)}, base {key!r} has {tuple(base.shape)}")
                delta += saved.to(dtype) - base.detach().to("cpu", dtype)
            factors = self._lora.get(key)
            if factors is not None:
                if factors.shape != tuple(base.shape):
                    raise self._fail(
                        f"module {factors.module!r}: adapter shape {factors.shape} vs base {tuple(base.shape)}; "
                        "this LoRA adapter was made for another base"
                    )
                a = handle.get_tensor(factors.a_key).to(dtype)  # (r, in) or (r, vocab)
                b = handle.get_tensor(factors.b_key).to(dtype)  # (out, r) or (hidden, r)
                product = b @ a
                delta += (product.T if factors.transpose else product) * factors.scaling
        return delta.to(base.device)

    def is_lora_product(self, key: str) -> bool:
        """Whether the adapter changes ``key`` by a LoRA product alone (no saved tensor)."""
        return key in self._lora and key not in self._full

    def touches(self, key: str) -> bool:
        """Whether the adapter changes base tensor ``key`` (a LoRA module or a saved tensor)."""
        return key in self._lora or key in self._full

    def factors(self, key: str, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """``(B, A, s)`` with ``delta = s * B @ A`` in the base tensor's layout (``(out, r)``,
        ``(r, in)``), or None when the adapter does not touch ``key`` as a pure LoRA product
        (untouched, or a saved full tensor, alone or beside the factors)."""
        found = self._lora.get(key)
        if found is None or key in self._full:
            return None
        with safe_open(self._weights, framework="pt") as handle:
            a = handle.get_tensor(found.a_key).to(dtype)  # (r, in) or (r, vocab)
            b = handle.get_tensor(found.b_key).to(dtype)  # (out, r) or (hidden, r)
        if found.transpose:  # (B A)^T = A^T B^T
            return a.T.contiguous(), b.T.contiguous(), found.scaling
        return b, a, found.scaling

    def __repr__(self) -> str:
        return f"LoraAdapter({str(self.path)!r}, lora={len(self._lora)}, full={len(self._full)})"

"""Support files of a merged model: config, generation config, tokenizer, model card.

Everything is copied from local folders; nothing here touches the network (mergekit's card
step calls the Hub and can crash offline after the weights are written).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path

from merging.digests import TOKENIZER_FILES
from merging.io.files import model_file, read_json_object

__all__ = ["write_support_files", "model_card"]


_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def _write_config(base_folder: Path, out: Path, out_dtype: str | None, num_layers: int | Mapping[str, int] | None = None,
                  vocab_size: int | None = None) -> None:
    owner = f"base model {str(base_folder)!r}"
    source = model_file(base_folder, "config.json", owner, required=False)
    if source is None:
        return
    config = read_json_object(source, owner)
    if out_dtype:
        config["dtype"] = out_dtype
        if "torch_dtype" in config:
            config["torch_dtype"] = out_dtype
    if isinstance(num_layers, Mapping):  # modules: dotted keys, e.g. text_config.num_hidden_layers
        for dotted, count in num_layers.items():
            *parents, key = dotted.split(".")
            place = config
            for parent in parents:
                place = place[parent]
            place[key] = count
    elif num_layers is not None:
        for key in [k for k in _LAYER_KEYS if k in config][:1] or ["num_hidden_layers"]:
            config[key] = num_layers
    if vocab_size is not None:
        text = config.get("text_config")
        if isinstance(text, dict) and "vocab_size" in text:  # multi-modal: the text decoder's vocabulary
            text["vocab_size"] = vocab_size
        if "vocab_size" in config or not (isinstance(text, dict) and "vocab_size" in text):
            config["vocab_size"] = vocab_size
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def model_card(method: str, paper: str, base_model: str | None, model_names: list[str], recipe_yaml: str) -> str:
    """The README.md of a merged model: what was merged, how, and the recipe."""
    lines = [
        "---",
        "library_name: transformers",
        "tags:",
        "- mergeflow",
        "- merge",
        "---",
        "# Merged model",
        "",
        f"Merged with mergeflow using **{method}**" + (f" ({paper})." if paper else "."),
        "",
        f"- base model: `{base_model}`" if base_model else "- base model: none (reference: first model)",
        *[f"- model: `{name}`" for name in model_names],
        "",
        "## Recipe",
        "",
        "```yaml",
        recipe_yaml.rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def write_support_files(
    *,
    base_folder: Path,
    tokenizer_folder: Path | None,
    out: Path,
    out_dtype: str | None,
    card: str | None,
    recipe_yaml: str,
    num_layers: int | Mapping[str, int] | None = None,
    vocab_size: int | None = None,
) -> None:
    """Write config.json (dtype updated), generation_config.json, tokenizer files (unless
    ``tokenizer_folder`` is None), the model card README.md (unless ``card`` is None) and the
    recipe ``mergeflow_config.yml`` into ``out``; ``num_layers`` replaces config.json's layer
    count (sliced merges), ``vocab_size`` its vocabulary size (tokenizer merges)."""
    _write_config(base_folder, out, out_dtype, num_layers, vocab_size)
    generation = model_file(base_folder, "generation_config.json", f"base model {str(base_folder)!r}", required=False)
    if generation is not None:
        shutil.copyfile(generation, out / generation.name)
    if tokenizer_folder is not None:
        for name in TOKENIZER_FILES:
            source = model_file(tokenizer_folder, name, f"tokenizer source {str(tokenizer_folder)!r}", required=False)
            if source is not None:
                shutil.copyfile(source, out / name)
    if card is not None:
        (out / "README.md").write_text(card)
    (out / "mergeflow_config.yml").write_text(recipe_yaml)

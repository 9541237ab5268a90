"""DRM-H over LoRA adapters: the factor route against task arithmetic (its peer) and against the
dense route, measured in the same run.

Builds a SmolLM2-135M-shaped base (random weights, bf16: hidden 576, 30 layers, vocab 49152) and
N rank-r PEFT adapters on every attention and MLP projection (the demo zoo's shape), then times
``mergeflow merge`` (separate processes, median of ``--repeat`` alternating runs, wall time and
peak RSS) for: task_arithmetic of the adapters (the peer), DRM-H of the adapters (factor route),
and DRM-H of the same adapters merged into full fine-tunes (the dense route's SVDs). Not part of
the test suite; ratios only mean something on an otherwise idle machine.

    .venv/bin/python benchmarks/bench_lora.py --repeat 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parent))
from bench_merge import BIN, alternate, median_range  # noqa: E402

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build(root: Path, hidden: int, layers: int, vocab: int, n_adapters: int, rank: int,
          dtype: torch.dtype = torch.bfloat16) -> dict[str, Path]:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3), num_hidden_layers=layers,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(dtype).save_pretrained(root / "base")
    base = load_file(root / "base" / "model.safetensors")
    paths = {"base": root / "base"}
    for i in range(n_adapters):
        g = torch.Generator().manual_seed(i + 1)
        tensors, full = {}, dict(base)
        for layer in range(layers):
            for module in MODULES:
                part = "self_attn" if module.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
                key = f"model.layers.{layer}.{part}.{module}.weight"
                out_dim, in_dim = base[key].shape
                a = torch.randn(rank, in_dim, generator=g) / in_dim ** 0.5
                b = torch.randn(out_dim, rank, generator=g) * 0.01
                prefix = f"base_model.model.model.layers.{layer}.{part}.{module}"
                tensors[f"{prefix}.lora_A.weight"], tensors[f"{prefix}.lora_B.weight"] = a, b
                full[key] = (base[key].float() + 2.0 * b @ a).to(dtype)
        folder = root / f"lora{i}"
        folder.mkdir()
        save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
        (folder / "adapter_config.json").write_text(json.dumps(
            {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(MODULES)}))
        dense = root / f"full{i}"
        dense.mkdir()
        save_file(full, str(dense / "model.safetensors"), metadata={"format": "pt"})
        (dense / "config.json").write_text((root / "base" / "config.json").read_text())
        paths[f"lora{i}"], paths[f"full{i}"] = folder, dense
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-dense", action="store_true", help="Skip the dense-route DRM run (the slow one).")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = build(root, args.hidden, args.layers, args.vocab, args.adapters, args.rank)
        runs = {"task_arithmetic (adapters)": ("task_arithmetic", "lora"), "drm horizontal (adapters, factor route)": ("drm", "lora")}
        if not args.no_dense:
            runs["drm horizontal (full fine-tunes, dense route)"] = ("drm", "full")
        commands = {}
        for label, (method, kind) in runs.items():
            config = {"merge_method": method, "base_model": str(paths["base"]),
                      "models": [{"model": str(paths[f"{kind}{i}"])} for i in range(args.adapters)]}
            if method == "drm":
                config["parameters"] = {"direction": "horizontal", "singular_matrices_drop_rate": 0.8}
            cfg = root / f"{method}-{kind}.yml"
            cfg.write_text(yaml.safe_dump(config))
            commands[label] = [str(BIN / "mergeflow"), "merge", str(cfg), str(root / f"out-{method}-{kind}"), "-q",
                               "--overwrite", "--device", "cpu"]
        results = alternate(commands, args.repeat)
        print(f"base: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab} (bf16); {args.adapters} rank-{args.rank} "
              f"adapters on {', '.join(MODULES)}; median (min-max) of {args.repeat} runs")
        peer = statistics.median(results["task_arithmetic (adapters)"][0])
        for label, (times, rss) in results.items():
            print(f"{label:48s} {median_range(times)}  x{statistics.median(times) / peer:5.2f} of task arithmetic   "
                  f"peak RSS {statistics.median(rss):6.0f} MB")


if __name__ == "__main__":
    main()

"""Four rank-16 LoRA adapters on a Llama-3-8B-shaped base, merged with DRM-H into one PEFT
adapter (issue 11's target: <= 60 s and <= 4 GB peak RSS on 2 CPU cores).

The base is config.json plus a header-only safetensors file (shapes, no data: an adapter output
never reads base values); the adapters are synthetic (random factors, peft's layout). Times the
whole ``mergeflow merge`` process (wall, peak RSS) and, as its peer in the same run, a task
arithmetic merge of the same adapters into a PEFT adapter. Not part of the test suite.

    .venv/bin/python benchmarks/bench_lora_8b.py --repeat 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import struct
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from bench_lora import alternate, median_range  # noqa: E402
from bench_merge import BIN  # noqa: E402

HIDDEN, INTER, LAYERS, VOCAB, HEADS, KV = 4096, 14336, 32, 128256, 32, 8
SHAPES = {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (KV * 128, HIDDEN), "self_attn.v_proj": (KV * 128, HIDDEN),
          "self_attn.o_proj": (HIDDEN, HIDDEN), "mlp.gate_proj": (INTER, HIDDEN), "mlp.up_proj": (INTER, HIDDEN),
          "mlp.down_proj": (HIDDEN, INTER)}


def header_only_base(folder: Path) -> None:
    """config.json and a safetensors header listing every bf16 tensor of the model, no data."""
    folder.mkdir()
    tensors = {"model.embed_tokens.weight": [VOCAB, HIDDEN], "model.norm.weight": [HIDDEN], "lm_head.weight": [VOCAB, HIDDEN]}
    for layer in range(LAYERS):
        for module, shape in SHAPES.items():
            tensors[f"model.layers.{layer}.{module}.weight"] = list(shape)
        tensors[f"model.layers.{layer}.input_layernorm.weight"] = [HIDDEN]
        tensors[f"model.layers.{layer}.post_attention_layernorm.weight"] = [HIDDEN]
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name in sorted(tensors):
        size = 2 * int(torch.tensor(tensors[name]).prod())
        header[name] = {"dtype": "BF16", "shape": tensors[name], "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN, "intermediate_size": INTER,
              "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "num_key_value_heads": KV, "vocab_size": VOCAB,
              "torch_dtype": "bfloat16"}
    (folder / "config.json").write_text(json.dumps(config))


def adapter(folder: Path, seed: int, rank: int) -> None:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(LAYERS):
        for module, (out_dim, in_dim) in SHAPES.items():
            prefix = f"base_model.model.model.layers.{layer}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, in_dim, generator=g) / in_dim ** 0.5
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_dim, rank, generator=g) * 0.01
    folder.mkdir()
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank,
                                                            "target_modules": [m.split(".")[1] for m in SHAPES]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        header_only_base(root / "base")
        for i in range(args.adapters):
            adapter(root / f"lora{i}", i + 1, args.rank)
        commands = {}
        for label, method, params in (("task_arithmetic -> peft", "task_arithmetic", {}),
                                      ("drm horizontal -> peft", "drm", {"direction": "horizontal"})):
            cfg = root / f"{method}.yml"
            cfg.write_text(yaml.safe_dump({"merge_method": method, "base_model": str(root / "base"), "parameters": params,
                                           "models": [{"model": str(root / f"lora{i}")} for i in range(args.adapters)]}))
            commands[label] = [str(BIN / "mergeflow"), "merge", str(cfg), str(root / f"out-{method}"), "-q", "--overwrite",
                               "--device", "cpu", "--out-format", "peft"]
        results = alternate(commands, args.repeat)
        print(f"Llama-3-8B-shaped base (header only), {args.adapters} rank-{args.rank} adapters on 7 projections x "
              f"{LAYERS} layers; median (min-max) of {args.repeat} runs")
        for label, (times, rss) in results.items():
            print(f"{label:28s} {median_range(times)}   peak RSS {statistics.median(rss):6.0f} MB")


if __name__ == "__main__":
    main()

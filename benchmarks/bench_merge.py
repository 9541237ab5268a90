"""Speed and memory of ``mergeflow merge`` against mergekit 0.1.5, measured in the same run.

Builds a base and N fine-tunes of a mid-sized Llama (default ~120M parameters, bf16), runs
the same mergekit YAML through ``mergekit-yaml`` and ``mergeflow merge`` (separate
processes, best of ``--repeat``), and prints wall time, peak RSS and the ratios
mergeflow / mergekit. Not part of the test suite.

    .venv/bin/python benchmarks/bench_merge.py --methods ties dare_ties linear --hidden 768 --layers 12
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

BIN = Path(sys.executable).parent


def build(root: Path, hidden: int, layers: int, vocab: int, n_models: int) -> dict[str, Path]:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 2.75), num_hidden_layers=layers,
                         num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 256))
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).to(torch.bfloat16)
    paths = {"base": root / "base"}
    base.save_pretrained(paths["base"])
    for i in range(n_models):
        g = torch.Generator().manual_seed(i + 1)
        with torch.no_grad():
            for p in base.parameters():
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.01)
        paths[f"ft{i}"] = root / f"ft{i}"
        base.save_pretrained(paths[f"ft{i}"])
        with torch.no_grad():
            for p in base.parameters():
                p.sub_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i + 1)).to(p.dtype) * 0.01)
    return paths


def timed(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of one child process, via GNU time."""
    start = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-f", "MAXRSS %M", *cmd], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(done.stderr[-2000:])
    peak_kb = int(done.stderr.rsplit("MAXRSS", 1)[1].split()[0])
    return wall, peak_kb / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["linear", "ties", "dare_ties"])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--models", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = build(root, args.hidden, args.layers, args.vocab, args.models)
        size = sum(f.stat().st_size for f in paths["base"].glob("*.safetensors")) / 1e6
        print(f"model: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}: {size:.0f} MB per checkpoint (bf16), {args.models} fine-tunes")
        print(f"{'method':12s} {'mergekit s':>10s} {'mergeflow s':>11s} {'ratio':>6s} {'mergekit MB':>11s} {'mergeflow MB':>12s} {'ratio':>6s}")
        for method in args.methods:
            config = {"merge_method": method, "dtype": "bfloat16",
                      "models": [{"model": str(paths[f"ft{i}"]), "parameters": {"weight": 1.0, "density": 0.5}} for i in range(args.models)]}
            if method != "linear":
                config["base_model"] = str(paths["base"])
            else:
                for m in config["models"]:
                    m["parameters"].pop("density")
            cfg = root / f"{method}.yml"
            cfg.write_text(yaml.safe_dump(config))
            results = {}
            for tool, cmd in (("mergekit", [str(BIN / "mergekit-yaml"), str(cfg), str(root / f"mk-{method}"), "--quiet", "--no-write-model-card"]),
                              ("mergeflow", [str(BIN / "mergeflow"), "merge", str(cfg), str(root / f"mf-{method}"), "-q", "--overwrite", "--device", "cpu"])):
                runs = []
                for _ in range(args.repeat):
                    subprocess.run(["rm", "-rf", str(root / f"mk-{method}"), str(root / f"mf-{method}")])
                    runs.append(timed(cmd))
                results[tool] = min(runs)
            (mk_t, mk_m), (mf_t, mf_m) = results["mergekit"], results["mergeflow"]
            print(f"{method:12s} {mk_t:10.1f} {mf_t:11.1f} {mf_t / mk_t:6.2f} {mk_m:11.0f} {mf_m:12.0f} {mf_m / mk_m:6.2f}")
        print("peak RSS includes memory-mapped input pages, which the kernel can reclaim")


if __name__ == "__main__":
    main()

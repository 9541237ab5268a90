"""The built-in demo: build small Llama-shaped models locally, merge them with
``mergeflow merge`` for several methods, load each result with transformers and print a
summary. Nothing is downloaded.

The three "fine-tunes" are the base plus task vectors made of a shared low-rank component
(so they partly agree in sign) and a task-specific one (so they partly conflict).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path("demo")
TASKS = ("math", "code", "chat")
METHODS = {
    "task_arithmetic": {"parameters": {"lambda": 0.5}},
    "ties": {"model": {"density": 0.3}, "parameters": {"lambda": 1.0}},
    "dare_ties": {"model": {"density": 0.3}, "parameters": {"lambda": 0.5}},
    "drm": {"parameters": {"direction": "horizontal", "singular_matrices_drop_rate": 0.8}},
    "tsv_m": {"parameters": {"lambda": 1.0}},
    "iso_cts": {"parameters": {"lambda": 1.0}},
}


def build_models(root: Path) -> dict[str, Path]:
    """base + three task variants; rebuilt only when missing."""
    from transformers import LlamaConfig, LlamaForCausalLM

    paths = {"base": root / "models" / "base", **{t: root / "models" / t for t in TASKS}}
    if all((p / "model.safetensors").is_file() for p in paths.values()):
        return paths
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=172, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    base = LlamaForCausalLM(config)
    base.save_pretrained(paths["base"])
    g = torch.Generator().manual_seed(1)
    shared = {n: _low_rank(p.shape, g) for n, p in base.named_parameters()}
    for i, task in enumerate(TASKS):
        model = LlamaForCausalLM.from_pretrained(paths["base"])
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.add_(0.5 * shared[name] + _low_rank(p.shape, g))
        model.save_pretrained(paths[task])
    return paths


def _low_rank(shape: torch.Size, g: torch.Generator, rank: int = 4, scale: float = 0.004) -> torch.Tensor:
    if len(shape) == 1:
        return torch.randn(shape, generator=g) * scale
    left = torch.randn(shape[0], rank, generator=g)
    right = torch.randn(rank, shape[1], generator=g)
    return left @ right * (scale / rank**0.5)


def run_merge(method: str, paths: dict[str, Path], root: Path) -> tuple[Path, float]:
    spec = METHODS[method]
    config = {
        "merge_method": method,
        "base_model": str(paths["base"]),
        "models": [{"model": str(paths[t]), "parameters": dict(spec.get("model", {}))} for t in TASKS],
        "parameters": spec.get("parameters", {}),
        "seed": 0,
    }
    cfg = root / "configs" / f"{method}.yml"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text(yaml.safe_dump(config, sort_keys=False))
    out = root / "merged" / method
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "flows.cli", "merge", str(cfg), str(out), "--overwrite", "-q"], check=True)
    return out, time.perf_counter() - started


def summarize(out: Path, paths: dict[str, Path], tokens: torch.Tensor) -> dict[str, float]:
    """Per specialist t: 1 - ||logits_merged - logits_t|| / ||logits_base - logits_t|| on the
    same tokens: 1 means the merge behaves like specialist t, 0 no closer than the base."""
    from transformers import AutoModelForCausalLM

    def logits(folder: Path) -> torch.Tensor:
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        with torch.no_grad():
            return model(tokens).logits

    merged, base = logits(out), logits(paths["base"])
    scores = {}
    for task in TASKS:
        target = logits(paths[task])
        scores[task] = float(1 - (merged - target).norm() / (base - target).norm())
    return scores


def main() -> None:
    from merging.registry import METHODS as REGISTRY

    paths = build_models(ROOT)
    tokens = torch.randint(0, 256, (8, 48), generator=torch.Generator().manual_seed(7))
    rows = []
    for method in METHODS:
        if method not in REGISTRY:
            continue
        out, seconds = run_merge(method, paths, ROOT)
        agreement = summarize(out, paths, tokens)
        rows.append((method, seconds, agreement))
    base_agreement = summarize(paths["base"], paths, tokens)
    header = f"{'method':18s} {'seconds':>8s} " + " ".join(f"{t:>6s}" for t in TASKS) + f" {'mean':>6s}"
    print("\nCloseness to each specialist's logits, 1 - |merged - specialist| / |base - specialist|:")
    print(header)
    print("-" * len(header))
    for method, seconds, agreement in [("(base model)", 0.0, base_agreement), *rows]:
        mean = sum(agreement.values()) / len(agreement)
        print(f"{method:18s} {seconds:8.1f} " + " ".join(f"{agreement[t]:6.2f}" for t in TASKS) + f" {mean:6.2f}")
    (ROOT / "summary.json").write_text(json.dumps({m: a for m, _, a in rows}, indent=2))
    print(f"\nmerged models in {ROOT / 'merged'}; configs in {ROOT / 'configs'}")


if __name__ == "__main__":
    main()

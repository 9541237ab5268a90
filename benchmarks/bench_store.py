"""Artifacts on disk: what one staged DRM-H run stores beside the model it saves.

Builds the demo's shape (``bench_lora.build``: a SmolLM2-135M-shaped base with random weights,
four rank-8 LoRA adapters on every projection) twice: with a float32 base, as the demo's
(SmolLM2-135M converted from GGUF is saved in float32), and with a bf16 base; each time it runs the merge stages fetch -> save through the
stage table (``run_stage``, the route ``dvc repro`` and the Prefect flows take, materialized),
and prints each stage's folder size, the intermediates (deltas, decompose, sparsify, combine;
hard links counted once) against the saved model (issue 10's target: <= 1.5x), and whether the
staged model is byte for byte the fused one (``merge_checkpoints``). No timing: sizes do not
depend on the load of the machine.

    .venv/bin/python benchmarks/bench_store.py [--results benchmarks/results.md]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_lora import build  # noqa: E402

STAGES = ("fetch", "collect_stats", "deltas", "decompose", "sparsify", "combine", "save")
INTERMEDIATE = ("deltas", "decompose", "sparsify", "combine")


def folder_bytes(folder: Path, seen: set[tuple[int, int]]) -> int:
    """Bytes on disk under ``folder`` (``du``): each inode counted once over every call sharing ``seen``."""
    total = 0
    for path in [folder, *folder.rglob("*")]:
        stat = path.lstat()
        if (stat.st_dev, stat.st_ino) not in seen:
            seen.add((stat.st_dev, stat.st_ino))
            total += stat.st_blocks * 512
    return total


def run(root: Path, models: dict[str, Path]) -> dict:
    from merging import pipeline
    from merging.pipeline_params import merge_config, parse_params

    params = parse_params({
        "models": {"base": {"name": "base", "source": str(models["base"])},
                   "inputs": [{"name": n, "source": str(models[n])} for n in sorted(models) if n.startswith("lora")]},
        "merge": {"method": "drm", "decompose": {"direction": "horizontal"},
                  "sparsify": {"singular_matrices_drop_rate": 0.8}, "combine": {"lambda": 1.0}},
        "pipeline": {"device": "cpu", "artifacts": str(root / "art")},
    }, "bench_store")
    store = root / "art"
    for name in STAGES:
        stage = pipeline.get_stage(name)
        pipeline.run_stage(name, params, {n: store / n for n in pipeline.stage_inputs(stage)}, store / name, store / "store")
    seen: set[tuple[int, int]] = set()
    sizes = {name: folder_bytes(store / name, seen) for name in STAGES}
    fused = pipeline.merge_checkpoints(merge_config(params), root / "fused")
    same = (fused / "model.safetensors").read_bytes() == (store / "save" / "model.safetensors").read_bytes()
    return {"sizes": sizes, "intermediates": sum(sizes[n] for n in INTERMEDIATE), "model": sizes["save"], "same": same}


def table(results: dict[str, dict]) -> str:
    mb = 1e6
    dtypes = list(results)
    rows = [f"| {name} | " + " | ".join(f"{results[d]['sizes'][name] / mb:.1f} MB" for d in dtypes) + " |" for name in STAGES]
    lines = ["### Artifacts on disk: one staged DRM-H run (SmolLM2-135M shape, 4 rank-8 LoRA adapters, `benchmarks/bench_store.py`)",
             "", "| stage folder | " + " | ".join(f"{d} base" for d in dtypes) + " |", "|---|" + "---|" * len(dtypes), *rows, ""]
    for dtype, result in results.items():
        ratio = result["intermediates"] / result["model"]
        lines.append(f"- {dtype} base: intermediates (deltas + decompose + sparsify + combine) {result['intermediates'] / mb:.1f} MB"
                     f" = {ratio:.2f}x the saved model ({result['model'] / mb:.1f} MB); target <= 1.5x: "
                     f"{'met' if ratio <= 1.5 else 'NOT met'}; staged model byte for byte the fused one: {result['same']}.")
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, help="append the table to this markdown file")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    results = {}
    for dtype in ("float32", "bfloat16"):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            models = build(root, hidden=576, layers=30, vocab=49152, n_adapters=4, rank=8, dtype=getattr(torch, dtype))
            results[dtype] = run(root, models)
    text = table(results)
    print(text)
    if args.results:
        with args.results.open("a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()

"""Decomposition reuse: a DRM sweep of five drop rates against one DRM merge, in the same run.

Builds a base and three dense full fine-tunes of a Llama-shaped model (bf16), then, alternating
``--repeat`` times with a fresh artifact store each time:

* one DRM merge, fused (``merge_checkpoints``: deltas -> decompose -> sparsify -> combine -> save
  in memory), and
* the merge stages of a sweep over five drop rates through the stage table (``run_stage``, the
  route ``dvc repro`` and the Prefect flows take): deltas and decompose keyed on what they read,
  so they run once, then sparsify -> combine -> save per rate.

Prints the median (min-max) wall time of each, their ratio (issue 10's target: <= 1.5) and how
many times each stage really ran (a stage whose artifact is current returns at once). Not part of
the test suite.

    .venv/bin/python benchmarks/bench_drm_sweep.py --repeat 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_merge import build  # noqa: E402

RATES = (0.5, 0.6, 0.7, 0.8, 0.9)


def _params(models: dict[str, Path], artifacts: Path, rate: float):
    from merging.pipeline_params import parse_params

    return parse_params({
        "models": {"base": {"name": "base", "source": str(models["base"])},
                   "inputs": [{"name": f"ft{i}", "source": str(models[f"ft{i}"])} for i in range(3)]},
        "merge": {"method": "drm", "seed": 0, "decompose": {"direction": "horizontal"},
                  "sparsify": {"singular_matrices_drop_rate": rate}, "combine": {}},
        "pipeline": {"device": "cpu", "artifacts": str(artifacts), "shard_size": "5GB"},
        "eval": {"tasks": ["unused"]},
    })


def single(models: dict[str, Path], root: Path) -> float:
    from merging.pipeline import merge_checkpoints
    from merging.pipeline_params import merge_config

    start = time.perf_counter()
    merge_checkpoints(merge_config(_params(models, root / "art", 0.8)), root / "single")
    return time.perf_counter() - start


def sweep(models: dict[str, Path], root: Path, ran: dict[str, int]) -> float:
    from merging import pipeline
    from merging.io.artifacts import is_current

    store = root / "store"
    start = time.perf_counter()
    for rate in RATES:
        params = _params(models, root / "art", rate)
        shared = {n: root / n for n in ("fetch", "collect_stats", "deltas", "decompose")}
        folders = {**shared, **{s: root / f"{s}-{rate}" for s in ("sparsify", "combine", "save")}}
        for name in pipeline.stages_through("save"):
            stage = pipeline.get_stage(name)
            inputs = {n: folders[n] for n in pipeline.stage_inputs(stage)}
            current = is_current(folders[name], pipeline.stage_key(name, params, inputs)) if folders[name].exists() else False
            pipeline.run_stage(name, params, inputs, folders[name], store)
            ran[name] = ran.get(name, 0) + (not current)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--results", type=Path, help="append the result to this markdown file")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        built = build(root / "models", args.hidden, args.layers, args.vocab, 3)
        models = {"base": built["base"], **{f"ft{i}": built[f"ft{i}"] for i in range(3)}}
        times: dict[str, list[float]] = {"one DRM merge (fused)": [], f"sweep of {len(RATES)} drop rates (staged)": []}
        ran: dict[str, int] = {}
        for attempt in range(args.repeat):
            for label in (list(times) if attempt % 2 == 0 else list(reversed(times))):
                run = root / f"run-{attempt}-{label.split()[0]}"
                run.mkdir()
                if label.startswith("one"):
                    times[label].append(single(models, run))
                else:
                    times[label].append(sweep(models, run, ran))
                shutil.rmtree(run)
        lines = [f"DRM-H, 3 dense fine-tunes, hidden {args.hidden}, {args.layers} layers, vocab {args.vocab} (bf16); "
                 f"median (min-max) of {args.repeat}; load average {os.getloadavg()[0]:.2f}"]
        for label, values in times.items():
            lines.append(f"  {label:34s} {statistics.median(values):7.2f} s ({min(values):.2f}-{max(values):.2f})")
        ratio = statistics.median(times[list(times)[1]]) / statistics.median(times[list(times)[0]])
        lines.append(f"  sweep / one merge: {ratio:.2f} (target <= 1.5)")
        lines.append("  stage runs per sweep: " + ", ".join(f"{k} {v / args.repeat:g}" for k, v in ran.items()))
    print("\n".join(lines))
    if args.results:
        with args.results.open("a") as f:
            f.write("\n### Decomposition reuse (`benchmarks/bench_drm_sweep.py`)\n\n```\n" + "\n".join(lines) + "\n```\n")

if __name__ == "__main__":
    main()

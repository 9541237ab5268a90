"""The merge leaderboard over several zoo seeds (``mergeflow leaderboard --seeds 0 1``).

For each seed: the demo zoo of that seed is built or reused (the ``zoo`` section of
params.yaml; the params' own seed keeps ``zoo.out``, another seed S goes to
``<zoo.out>-s<S>``), a copy of params.yaml is pointed at it (input models, lm-eval include
folder, an artifact store per seed) and the sweep flow runs the grid (select on validation,
report on test); a seed's rows are kept in ``sweep-s<seed>-<key>.json``, keyed by the sweep
file, the derived params and the zoo's ``zoo.json``, so seeds can run in separate processes
and a rerun only aggregates; a leaderboard killed mid-seed reruns only that seed's unfinished
points (the sweep records each finished point). Given a tune file (``methods:``, ``flows/tune.py``)
instead of a grid, each seed's rows come from the tuner's studies (which resume likewise). The rows of all seeds are then aggregated per method: mean and range over
seeds of test normalized accuracy, gain recovery, 4-task mean and the margin of the 4-task
mean over the best single specialist's.

Beside each mean over seeds stands the paired bootstrap interval of that mean
(``eval.bootstrap_*``): each seed's test items are resampled on their own stream (paired across
the merged model, the specialists and the base of that seed), each replicate's number is
computed per seed and averaged over the seeds, and the interval is taken over those averaged
replicates. It is the uncertainty from the finite test items given these zoos, not from the
choice of zoo seed (the range over seeds shows that). The seeds' test splits share their
held-out words, so treating them as independent makes the interval a little narrow.

Writes ``<artifacts>/leaderboard/leaderboard.{json,md}`` and ``per_task/<method>.png``: each
task's merged score against its specialist's and the base's (means over seeds) with their
intervals as error bars.
"""

from __future__ import annotations

import json
from pathlib import Path
from statistics import fmean
from typing import Any

import yaml

from evaluation.report import vs_specialist_chart, with_interval
from flows.sweep import row_replicates
from merging.bootstrap import decode_values, mean_of_runs, percentile_interval
from merging.config import read_yaml
from merging.digests import content_key
from merging.errors import MergeConfigError
from merging.io.writer import atomic_write_text
from merging.pipeline import pipeline_fingerprint
from merging.pipeline_params import PipelineParams

COLUMNS = (("normalized_accuracy", "norm. acc"), ("gain_recovery", "gain rec."), ("test_mean", "4-task mean"),
           ("margin", "margin vs best specialist"))


def seed_params(raw: dict[str, Any], seed: int) -> dict[str, Any]:
    """params.yaml (as loaded YAML) re-pointed at the zoo of ``seed``."""
    from merging.pipeline_params import parse_params

    params = parse_params(raw)
    old_out = params.zoo.out.rstrip("/")
    new_out = old_out if seed == params.zoo.seed else f"{old_out}-s{seed}"
    out = json.loads(json.dumps(raw))  # a deep copy
    out["zoo"] = params.zoo.model_dump() | {"seed": seed, "out": new_out}
    for ref in out["models"]["inputs"]:
        source = str(ref["source"])
        if not source.startswith(old_out + "/"):
            raise MergeConfigError(f"models.inputs[{ref['name']}].source {source} is not inside zoo.out {old_out}: "
                                   "the leaderboard re-points the zoo's specialists per seed")
        ref["source"] = new_out + source[len(old_out):]
        data = ref.get("data")
        if isinstance(data, str) and data.startswith(old_out + "/"):  # its own task data (collect_stats)
            ref["data"] = new_out + data[len(old_out):]
    out["eval"]["include_path"] = f"{new_out}/evals"
    if not out["eval"].get("validation_tasks"):
        raise MergeConfigError("eval.validation_tasks is empty: the leaderboard selects on validation and reports test")
    artifacts = params.pipeline.artifacts
    out.setdefault("pipeline", {})["artifacts"] = artifacts if new_out == old_out else f"{artifacts}-s{seed}"
    return out


def aggregate(per_seed: dict[int, list[dict]], params: PipelineParams | None = None) -> list[dict]:
    """One row per method: mean and (min, max) over seeds of each column; the setting picked
    per seed. With ``params`` (its ``eval.bootstrap_*``) and per-item scores in every seed's
    row: ``intervals`` (column -> the interval of its mean over seeds) and ``per_task`` (the
    chart's numbers, ``over_seeds``)."""
    methods: dict[str, dict[int, dict]] = {}
    for seed, rows in per_seed.items():
        for row in rows:
            entry = dict(row)
            if row.get("test_mean") is not None and row.get("best_specialist_mean") is not None:
                entry["margin"] = row["test_mean"] - row["best_specialist_mean"]
            methods.setdefault(row["method"], {})[seed] = entry
    out = []
    for method, by_seed in methods.items():
        row: dict[str, Any] = {"method": method, "seeds": sorted(by_seed),
                               "settings": {str(s): r["setting"] for s, r in sorted(by_seed.items())}}
        for key, _ in COLUMNS:
            values = [r[key] for r in by_seed.values() if r.get(key) is not None]
            row[key] = {"mean": fmean(values), "min": min(values), "max": max(values)} if values else None
        if params is not None:
            row |= over_seeds(by_seed, params, row["normalized_accuracy"])
        out.append(row)
    out.sort(key=lambda r: -(r["normalized_accuracy"]["mean"] if r["normalized_accuracy"] else -1.0))
    return out


def over_seeds(by_seed: dict[int, dict], params: PipelineParams, normalized: dict | None) -> dict[str, Any]:
    """A method's bootstrap over seeds: each seed's replicates (``flows.sweep.row_replicates``,
    on that seed's stream) averaged replicate by replicate. Returns ``intervals`` (column ->
    [low, high] of the mean over seeds) and ``per_task``: a metrics-shaped dict for
    ``vs_specialist_chart`` (per task, the merged model's, its specialist's and the base's
    accuracy averaged over seeds, with intervals); nothing when a seed's row has no per-item
    scores (rows from before they were recorded)."""
    runs, seeds = [], sorted(by_seed)
    for seed in seeds:
        row = by_seed[seed]
        items = row.get("items") or {}
        inputs = [name for name in items if name not in ("merged", "base")]
        replicates = row_replicates(items, row.get("specialists") or {}, inputs, params, seed)
        if not replicates:
            return {}
        runs.append(replicates)
    combined = mean_of_runs(runs)
    level = params.eval.bootstrap_level
    found = {k: percentile_interval(v, level) for k, v in combined.items() if isinstance(k, str)}
    first = by_seed[seeds[0]]
    tasks = sorted(first["items"]["merged"])
    specialists = {t: m for t, m in (first.get("specialists") or {}).items() if t in tasks}
    models = {"merged", "base", *specialists.values()}
    accuracy = {m: {t: fmean(fmean(decode_values(by_seed[s]["items"][m][t])) for s in seeds) for t in tasks}
                for m in models if all(t in by_seed[s]["items"].get(m, {}) for s in seeds for t in tasks)}
    per_task = {"tasks": tasks, "specialists": specialists, "accuracy": accuracy, "method": first["method"],
                "normalized_accuracy": {"mean": normalized["mean"] if normalized else None},
                "intervals": {"level": level, "normalized_accuracy": {"mean": found.get("normalized_accuracy")},
                              "accuracy": {m: {t: percentile_interval(combined["accuracy", m, t], level) for t in tasks}
                                           for m in accuracy}}}
    return {"intervals": found, "interval_level": level, "per_task": per_task}


def format_markdown(rows: list[dict], seeds: list[int]) -> str:
    """The leaderboard as a markdown table: each column's mean over seeds, its bootstrap
    interval in brackets and, over several seeds, the range over seeds in parentheses."""
    def cell(row, key):
        stat = row[key]
        if stat is None:
            return "-"
        spread = f" ({stat['min']:.3f}-{stat['max']:.3f})" if len(seeds) > 1 else ""
        return f"{with_interval(stat['mean'], (row.get('intervals') or {}).get(key))}{spread}"

    header = "| method | " + " | ".join(title for _, title in COLUMNS) + " | setting per seed (picked on validation) |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 2)]
    for r in rows:
        settings = "; ".join(f"s{s}: {v.split(' ', 1)[1] if ' ' in v else '-'}" for s, v in r["settings"].items())
        lines.append(f"| {r['method']} | " + " | ".join(cell(r, k) for k, _ in COLUMNS) + f" | {settings} |")
    level = next((r["interval_level"] for r in rows if r.get("intervals")), None)
    if level:
        over = " of the mean over seeds" if len(seeds) > 1 else ""
        lines += ["", f"[low, high]: {level:.0%} paired bootstrap interval over the test items{over}"
                      + ("; (min-max): range over seeds" if len(seeds) > 1 else "")]
    return "\n".join(lines)


def run(params_file: str, sweep_file: str, seeds: list[int], refresh: bool = False,
        methods: list[str] | None = None) -> list[dict]:
    """Build each seed's zoo, sweep it (or tune it: only ``methods`` of a tune file, when
    given), aggregate; returns the aggregated rows."""
    import zoo
    from flows.sweep import sweep
    from flows.tune import tune
    from merging.pipeline_params import parse_params

    if not seeds:
        raise MergeConfigError("--seeds: give at least one zoo seed")
    tuned = "methods" in read_yaml(sweep_file)
    if methods and not tuned:
        raise MergeConfigError(f"--method picks entries of a tune file (methods:); {sweep_file} is a sweep grid")
    raw = read_yaml(params_file)
    folder = Path(parse_params(raw, params_file).pipeline.artifacts) / "leaderboard"
    folder.mkdir(parents=True, exist_ok=True)
    per_seed: dict[int, list[dict]] = {}
    for seed in seeds:
        derived = seed_params(raw, seed)
        settings = parse_params(derived, f"{params_file} (seed {seed})").zoo
        zoo.fetch_base(Path(settings.base))
        zoo.build(Path(settings.base), Path(settings.out), tasks=settings.tasks, steps=settings.steps, seed=seed,
                  full_finetune=settings.full_finetune, lr=settings.lr)
        path = folder / f"params-s{seed}.yaml"
        path.write_text(yaml.safe_dump(derived, sort_keys=False))
        key = content_key({"sweep": Path(sweep_file).read_text(), "params": derived, "code": pipeline_fingerprint(),
                           "zoo": (Path(settings.out) / "zoo.json").read_text(), **({"methods": methods} if methods else {})})
        done = folder / f"sweep-s{seed}-{key[:16]}.json"
        if done.is_file() and not refresh:
            per_seed[seed] = json.loads(done.read_text())
            continue
        if tuned:  # a tune file: Optuna studies instead of a fixed grid
            per_seed[seed] = tune.with_options(flow_run_name=f"tune-seed-{seed}")(sweep_file, str(path), refresh, methods)
        else:
            per_seed[seed] = sweep.with_options(flow_run_name=f"sweep-seed-{seed}")(sweep_file, str(path), refresh)
        atomic_write_text(done, json.dumps(per_seed[seed], indent=2) + "\n")  # killed while writing: no half file
    rows = aggregate(per_seed, parse_params(raw, params_file))
    (folder / "leaderboard.json").write_text(json.dumps({"seeds": seeds, "rows": rows, "per_seed": per_seed}, indent=2) + "\n")
    (folder / "leaderboard.md").write_text(format_markdown(rows, seeds) + "\n")
    (folder / "per_task").mkdir(exist_ok=True)
    for row in rows:
        if row.get("per_task"):
            over = f"mean over seeds {', '.join(map(str, seeds))}"
            vs_specialist_chart(row["per_task"], folder / "per_task" / f"{row['method']}.png", f"{row['method']} ({over})")
    return rows

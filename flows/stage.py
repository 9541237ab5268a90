"""DVC's entry point: ``python -m flows.stage NAME [--params params.yaml]`` runs one pipeline
stage with fixed artifact folders ``artifacts/<stage>`` (DVC decides what is stale).

The same task functions as the Prefect flow run here through ``.fn`` (no Prefect engine,
no server). With ``pipeline.materialize: false`` the deltas, decompose and sparsify stages
write a small "fused" marker and ``combine`` streams all merge stages in memory.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from merging.errors import MergeflowError
from merging.io.artifacts import ArtifactWriter
from tasks import combine, decompose, deltas, evaluate, fetch, report, save, sparsify
from tasks.params import load_params

STAGE_NAMES = ("fetch", "deltas", "decompose", "sparsify", "combine", "save", "evaluate", "report", "show")


def _fused_marker(out: Path, stage: str) -> str:
    return str(ArtifactWriter(out, {"stage": stage, "fused": True, "cache_key": "fused"}).commit())


def run_stage(name: str, params_file: str = "params.yaml", root: str = "artifacts") -> str:
    params = load_params(params_file)
    p = params.model_dump(mode="json")
    a = Path(root)
    f = str(a / "fetch")
    fused = not params.pipeline.materialize
    if name == "fetch":
        return fetch.fetch.fn(p, f)
    if name in ("deltas", "decompose", "sparsify") and fused:
        return _fused_marker(a / name, name)
    if name == "deltas":
        return deltas.deltas.fn(p, f, str(a / "deltas"))
    if name == "decompose":
        return decompose.decompose.fn(p, f, str(a / "deltas"), str(a / "decompose"))
    if name == "sparsify":
        return sparsify.sparsify.fn(p, f, str(a / "decompose"), str(a / "deltas"), str(a / "sparsify"))
    if name == "combine":
        if fused:
            return combine.fused_combine.fn(p, f, str(a / "combine"))
        return combine.combine.fn(p, f, str(a / "sparsify"), str(a / "deltas"), str(a / "combine"))
    if name == "save":
        return save.save.fn(p, f, str(a / "combine"), str(a / "save"))
    if name == "evaluate":
        targets = evaluate.eval_targets(p, f, str(a / "save"))
        base_folder = targets["base"][0]
        results = {n: evaluate.evaluate_folder(p["eval"], folder, digest, str(a / "store"), base_folder)
                   for n, (folder, digest) in targets.items()}
        merged = {n: json.loads(Path(r).read_text()) for n, r in results.items()}
        manifest = {"stage": "evaluate", "params": p["eval"], "inputs": {n: digest for n, (_, digest) in targets.items()}}
        writer = ArtifactWriter(a / "evaluate", manifest)  # a new folder: never rewrites files DVC hardlinked
        (writer.folder / "results.json").write_text(json.dumps(merged, indent=2, sort_keys=True) + "\n")
        return str(writer.commit(extra_files=["results.json"]))
    if name == "report":
        results = json.loads((a / "evaluate" / "results.json").read_text())
        metrics = report.write_report(p, results, ".", metrics_file="metrics.json")
        print(report.format_table(metrics))
        return "metrics.json"
    if name == "show":
        metrics = json.loads(Path("metrics.json").read_text())
        print(report.format_table(metrics))
        return ""
    raise SystemExit(f"unknown stage {name!r}; stages: {', '.join(STAGE_NAMES)}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.stage", description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=STAGE_NAMES)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--artifacts", default="artifacts")
    args = parser.parse_args(argv)
    try:
        print(run_stage(args.name, args.params, args.artifacts))
    except MergeflowError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()

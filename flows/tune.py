"""The tune flow (``mergeflow tune TUNE.yaml``): one Optuna study per method over its
parameters, each trial a ``merge-and-eval`` subflow on the validation tasks, the best trial
re-evaluated on the test tasks; rows shaped like the sweep's, so the leaderboard takes either.

Tune file (YAML)::

    select: normalized_accuracy   # or mean, gain_recovery (as the sweep)
    trials: 8                     # per method (a method's own 'trials' wins)
    seed: 0                       # the samplers' seed
    startup_trials: 3             # random trials before TPE models the history (default trials // 3, >= 1)
    prune: true                   # delete each trial's sparsify/combine/save artifacts once scored (default)
    methods:
      - method: drm
        name: drm_h               # tells apart studies of one method
        decompose: {direction: horizontal}                        # a plain value: fixed
        sparsify: {singular_matrices_drop_rate: {low: 0.2, high: 0.9}}
        combine: {lambda: {low: 0.5, high: 3.0}}                   # {low, high[, log, step]}: a range
      - method: ties
        sparsify: {density: {low: 0.1, high: 0.9}, sign_tie_rule: [positive, majority]}  # a list: a choice

A range whose bounds are both integers (and no ``float: true``) is an integer range. Samplers
are TPE (Optuna), seeded per trial from (seed, trial number), so a tune interrupted and resumed
suggests what an uninterrupted one would. Studies persist in SQLite,
``<store>/tune/studies.db``, named by the method entry and everything a score depends on (the
params without the merge section, the models' files, the eval task files, the code), so a rerun
resumes its study: finished trials are kept, a trial a killed run left running is tried again
with the same parameters, and only the missing trials run. Trials share the store's cached
artifacts: trials with the same decomposition parameters reuse one decompose artifact, and a
trial whose full recipe ran before (a point record, ``flows.sweep.run_point``) is not rerun.

Each study's history is written to ``<artifacts>/tune/history/<name>.csv`` (trial, value, best so far,
parameters; a DVC plot, ``dvc plots show``) and published as a Prefect table; the rows go to
``<artifacts>/tune/leaderboard.json`` and a markdown artifact.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from evaluation.harness import include_digest
from flows.merge_and_eval import store_of
from flows.sweep import (
    SECTIONS,
    format_leaderboard,
    label,
    prunable,
    prune_created,
    report_row,
    run_point,
    score,
    store_names,
    validation_overrides,
)
from merging.config import read_yaml
from merging.digests import content_key
from merging.errors import MergeConfigError, MergeflowError
from merging.fetch import local_state
from merging.pipeline import pipeline_fingerprint
from merging.pipeline_params import REPLACE, load_params, require_evaluation

__all__ = ["tune", "Space", "parse_tune_file", "study_name", "HISTORY_FIELDS"]

SELECTS = ("normalized_accuracy", "gain_recovery", "mean")
HISTORY_FIELDS = ("trial", "value", "best", "params")


class Space:
    """One method's search space: fixed values, choices and ranges per pipeline section."""

    def __init__(self, entry: dict[str, Any], where: str) -> None:
        if not isinstance(entry, dict) or "method" not in entry:
            raise MergeConfigError(f"{where}: each entry of 'methods' needs a 'method'")
        unknown = set(entry) - {"method", "name", "trials", *SECTIONS}
        if unknown:
            raise MergeConfigError(f"{where}: unknown key(s) {sorted(unknown)}; use method, name, trials, "
                                   f"{', '.join(SECTIONS)}")
        self.method = str(entry["method"])
        self.name = str(entry.get("name", self.method))
        self.trials = entry.get("trials")
        self.entry = entry
        self.axes: list[tuple[str, str, Any]] = []  # (section, key, fixed value | list | range mapping)
        for section in SECTIONS:
            values = entry.get(section) or {}
            if not isinstance(values, dict):
                raise MergeConfigError(f"{where}.{section}: must be a mapping of parameter to value, list or range")
            for key, value in values.items():
                if isinstance(value, dict):
                    self._check_range(value, f"{where}.{section}.{key}")
                elif isinstance(value, list) and not value:
                    raise MergeConfigError(f"{where}.{section}.{key}: an empty list of choices")
                self.axes.append((section, key, value))

    @staticmethod
    def _check_range(value: dict, where: str) -> None:
        unknown = set(value) - {"low", "high", "log", "step", "float"}
        if unknown or "low" not in value or "high" not in value:
            raise MergeConfigError(f"{where}: a range is {{low, high}} with optional log, step, float; got {value}")
        low, high = value["low"], value["high"]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (low, high)):
            raise MergeConfigError(f"{where}: low and high must be finite numbers, got {low!r} and {high!r}")
        if low > high or (value.get("log") and low <= 0):
            raise MergeConfigError(f"{where}: need low <= high{' and low > 0 for log' if value.get('log') else ''}, "
                                   f"got {low} and {high}")

    def suggest(self, trial) -> dict[str, Any]:
        """The override of one trial: ``merge.method``, ``name`` and one ``merge.<section>!`` per section."""
        override: dict[str, Any] = {"merge.method": self.method, "name": self.name}
        for section in SECTIONS:
            override[f"merge.{section}{REPLACE}"] = {}
        for section, key, value in self.axes:
            param = f"{section}.{key}"
            if isinstance(value, list):
                picked = value[trial.suggest_categorical(param, list(range(len(value))))]  # any YAML values
            elif isinstance(value, dict):
                integer = isinstance(value["low"], int) and isinstance(value["high"], int) and not value.get("float")
                suggest = trial.suggest_int if integer else trial.suggest_float
                kwargs = {"log": bool(value.get("log"))}
                if value.get("step") is not None:
                    kwargs["step"] = value["step"]
                picked = suggest(param, value["low"], value["high"], **kwargs)
            else:
                picked = value
            override[f"merge.{section}{REPLACE}"][key] = picked
        return override


def parse_tune_file(path: str) -> tuple[dict[str, Any], list[Space]]:
    """(settings: select, trials, seed, startup_trials, prune; the spaces), validated."""
    raw = read_yaml(path)
    if not isinstance(raw, dict) or not isinstance(raw.get("methods"), list) or not raw["methods"]:
        raise MergeConfigError(f"{path}: a tune file needs a non-empty 'methods' list")
    unknown = set(raw) - {"methods", "select", "trials", "seed", "startup_trials", "prune"}
    if unknown:
        raise MergeConfigError(f"{path}: unknown key(s) {sorted(unknown)}; use methods, select, trials, seed, "
                               "startup_trials, prune")
    settings = {"select": raw.get("select", "normalized_accuracy"), "trials": raw.get("trials", 8),
                "seed": raw.get("seed", 0), "startup_trials": raw.get("startup_trials"), "prune": raw.get("prune", True)}
    if not isinstance(settings["prune"], bool):
        raise MergeConfigError(f"{path}: prune must be true or false, got {settings['prune']!r}")
    if settings["select"] not in SELECTS:
        raise MergeConfigError(f"{path}: select must be one of {', '.join(SELECTS)}, got {settings['select']!r}")
    spaces = [Space(entry, f"{path}: methods[{i}]") for i, entry in enumerate(raw["methods"])]
    names = [s.name for s in spaces]
    if len(set(names)) != len(names):
        raise MergeConfigError(f"{path}: two methods are named {next(n for n in names if names.count(n) > 1)!r}; "
                               "give each a distinct 'name'")
    for space in spaces:
        trials = space.trials if space.trials is not None else settings["trials"]
        if not isinstance(trials, int) or isinstance(trials, bool) or trials < 1:
            raise MergeConfigError(f"{path}: trials for {space.name!r} must be a positive integer, got {trials!r}")
        space.trials = trials
    return settings, spaces


def select_spaces(spaces: list[Space], methods: list[str] | None, tune_file: str) -> list[Space]:
    """The entries named in ``methods`` (their ``name``), in the file's order; all for None."""
    if not methods:
        return spaces
    names = [s.name for s in spaces]
    unknown = sorted(set(methods) - set(names))
    if unknown:
        raise MergeConfigError(f"--method {unknown[0]!r}: {tune_file} has no such entry; its entries are {names}")
    return [s for s in spaces if s.name in methods]


def study_name(space: Space, settings: dict[str, Any], params) -> str | None:
    """The study's name: the method entry and everything its scores depend on (None when a
    model may change unseen, an unpinned hub source: nothing to resume safely)."""
    models = local_state(params)
    if models is None:
        return None
    recipe = params.model_dump(mode="json")
    recipe.pop("merge", None)
    key = content_key({"space": space.entry, "select": settings["select"], "params": recipe, "models": models,
                       "code": pipeline_fingerprint(), "evals": include_digest(params.eval.include_path)})
    return f"{space.name}-{key[:16]}"


def _sampler(settings: dict[str, Any], space: Space, trial_number: int):
    import optuna

    startup = settings["startup_trials"] if settings["startup_trials"] is not None else max(1, space.trials // 3)
    seed = int(content_key({"seed": settings["seed"], "study": space.name, "trial": trial_number})[:8], 16)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup)


def _open_study(store: Path, name: str | None, sampler):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    (store / "tune").mkdir(parents=True, exist_ok=True)
    storage = f"sqlite:///{store / 'tune' / 'studies.db'}" if name is not None else None
    return optuna.create_study(study_name=name, storage=storage, direction="maximize", sampler=sampler,
                               load_if_exists=True)


def run_study(params_file: str, space: Space, settings: dict[str, Any], refresh: bool = False) -> tuple[dict, dict, Any]:
    """Run the study of ``space`` to ``space.trials`` finished trials; returns (the best trial's
    override, its validation metrics, the study)."""
    import optuna
    from optuna.trial import TrialState

    logger = _logger()
    params = require_evaluation(load_params(params_file), params_file)
    on_validation = validation_overrides(params)
    name = study_name(space, settings, params)
    store = store_of(params)
    existing = store_names(store)  # never pruned: not this study's
    study = _open_study(store, name, _sampler(settings, space, 0))
    for stale in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):  # left by a killed run: retry it
        study.enqueue_trial(stale.params, skip_if_exists=False)
        study.tell(stale.number, state=TrialState.FAIL)
    failed = 0
    while (done := len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))) < space.trials:
        if failed > space.trials:
            raise MergeflowError(f"tune {space.name!r}: {failed} trials scored no {settings['select']} (undefined for "
                                 "every setting tried); check the space and the eval tasks")
        study.sampler = _sampler(settings, space, done)
        trial = study.ask()
        override = space.suggest(trial)
        params_override = {k: v for k, v in override.items() if k != "name"}
        require_evaluation(load_params(params_file, {**params_override, **on_validation}),
                           f"{params_file} ({label(override)})")
        metrics, computed = run_point(params_file, {**params_override, **on_validation},
                                      f"{label(override)} (trial {done})", refresh)
        if settings["prune"] and computed:  # a trial's model is scored: its point record keeps the metrics
            prune_created(prunable(metrics), existing)
        value = score(metrics, settings["select"])
        trial.set_user_attr("setting", label(override))
        study.tell(trial, value if math.isfinite(value) else None,
                   state=TrialState.COMPLETE if math.isfinite(value) else TrialState.FAIL)
        failed += not math.isfinite(value)
        logger.info("%s trial %d: %s -> %.4f", space.name, done, label(override), value)
    best = study.best_trial
    override = space.suggest(optuna.trial.FixedTrial(best.params))
    metrics, _ = run_point(params_file, {**{k: v for k, v in override.items() if k != "name"}, **on_validation},
                           f"{label(override)} (best)", refresh)  # a point record: not rerun
    return override, metrics, study


def _logger():
    """The flow run's logger inside a flow, else this module's."""
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)


def history_rows(study) -> list[dict[str, Any]]:
    """A study's finished trials in order: value and best so far (the DVC plot's data)."""
    from optuna.trial import TrialState

    rows, best = [], -math.inf
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        best = max(best, trial.value)
        rows.append({"trial": len(rows), "value": round(trial.value, 6), "best": round(best, 6),
                     "params": trial.user_attrs.get("setting", json.dumps(trial.params, sort_keys=True))})
    return rows


@flow(name="tune")
def tune(tune_file: str = "tune.yaml", params_file: str = "params.yaml", refresh: bool = False,
         methods: list[str] | None = None) -> list[dict]:
    """Tune every method of ``tune_file`` (or those named in ``methods``) on the validation
    tasks; report the best on test."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    settings, spaces = parse_tune_file(tune_file)
    spaces = select_spaces(spaces, methods, tune_file)
    params = require_evaluation(load_params(params_file), params_file)
    folder = Path(params.pipeline.artifacts) / "tune"
    (folder / "history").mkdir(parents=True, exist_ok=True)
    validation = bool(params.eval.validation_tasks)
    rows = []
    for space in spaces:
        override, val_metrics, study = run_study(params_file, space, settings, refresh)
        history = history_rows(study)
        with open(folder / "history" / f"{space.name}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=HISTORY_FIELDS)
            writer.writeheader()
            writer.writerows(history)
        create_table_artifact(key=f"tune-{space.name.replace('_', '-').lower()}", table=history,
                              description=f"{space.name}: {settings['select']} per trial on validation")
        rows.append(report_row(params_file, params, override, val_metrics, settings["select"], validation, refresh)
                    | {"trials": len(history)})
    rows.sort(key=lambda r: -(r["normalized_accuracy"] or r["test_mean"] or 0))
    (folder / "leaderboard.json").write_text(json.dumps(rows, indent=2) + "\n")
    create_markdown_artifact(key="tune-leaderboard", markdown=f"```\n{format_leaderboard(rows)}\n```")
    get_run_logger().info("\n%s", format_leaderboard(rows))
    return rows

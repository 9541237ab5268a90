"""Multi-step merges (mergekit-multi files): parsing and ordering, and the Prefect flow whose
steps are cached like stages: editing a step reruns it and the steps that read it, nothing else."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from merging.errors import MergeConfigError
from merging.multi import parse_multi


def _steps_text(models: dict[str, Path], weight: float = 0.5) -> str:
    base, a, b = (str(models[k]) for k in ("base", "ft_a", "ft_b"))
    docs = [  # out of order on purpose: the final merge first
        {"merge_method": "linear", "models": [{"model": "soup", "parameters": {"weight": 1.0}},
                                              {"model": "tuned", "parameters": {"weight": 1.0}}]},
        {"name": "soup", "merge_method": "linear", "models": [{"model": a, "parameters": {"weight": 1.0}},
                                                             {"model": b, "parameters": {"weight": 1.0}}]},
        {"name": "tuned", "merge_method": "task_arithmetic", "base_model": base,
         "models": [{"model": "soup", "parameters": {"weight": weight}}]},
    ]
    return yaml.safe_dump_all(docs, sort_keys=False)


def test_steps_are_ordered_and_names_become_folders(tmp_path, tiny_models):
    steps = parse_multi(_steps_text(tiny_models), tmp_path / "mid", tmp_path / "final")
    assert [s.label for s in steps] == ["soup", "tuned", "final"]
    assert steps[1].needs == ("soup",) and steps[2].needs == ("soup", "tuned")
    assert steps[1].config["models"][0]["model"] == str((tmp_path / "mid" / "soup").absolute())
    assert steps[2].out == (tmp_path / "final").absolute()
    as_list = yaml.safe_dump(list(yaml.safe_load_all(_steps_text(tiny_models))))
    assert [s.label for s in parse_multi(as_list, tmp_path / "mid", tmp_path / "final")] == ["soup", "tuned", "final"]


def test_tokenizer_sources_naming_a_step_read_its_output(tmp_path):
    text = yaml.safe_dump_all([
        {"name": "soup", "merge_method": "linear", "models": ["/x", "/y"]},
        {"name": "one", "merge_method": "linear", "models": ["soup", "/z"], "tokenizer_source": "model:soup"},
        {"name": "two", "merge_method": "linear", "models": ["/z"], "tokenizer": {
            "source": "soup", "tokens": {"<t>": {"source": "soup"}, "<u>": {"source": {"kind": "model_token",
                                                                                    "model": "soup", "token": "a"}}}}},
        {"merge_method": "linear", "models": ["/z"], "tokenizer_source": "union"},
    ], sort_keys=False)
    steps = {s.label: s for s in parse_multi(text, tmp_path / "mid", tmp_path / "final")}
    soup = str((tmp_path / "mid" / "soup").absolute())
    assert steps["one"].config["tokenizer_source"] == f"model:{soup}" and steps["one"].needs == ("soup",)
    tokenizer = steps["two"].config["tokenizer"]
    assert (tokenizer["source"], tokenizer["tokens"]["<t>"]["source"], tokenizer["tokens"]["<u>"]["source"]["model"]) \
        == (soup, soup, soup)
    assert steps["two"].needs == ("soup",) and steps["final"].config["tokenizer_source"] == "union"
    assert steps["final"].needs == ()


@pytest.mark.parametrize(("text", "match"), [
    ("name: a\nmerge_method: linear\nmodels: [b]\n---\nname: b\nmerge_method: linear\nmodels: [a]\n",
     r"circular dependency between steps: a -> b -> a"),
    ("name: a\nmerge_method: linear\nmodels: [x]\n---\nname: a\nmerge_method: linear\nmodels: [y]\n", r"two merges are named 'a'"),
    ("merge_method: linear\nmodels: [x]\n", r"needs an output folder; pass --out-path"),
    ("name: a/b\nmerge_method: linear\nmodels: [x]\n", r"plain folder name"),
    ("- 3\n", r"not a mapping"),
    ("name: a\nmerge_method: nope\nmodels: [x]\n", r"step 'a'"),
])
def test_bad_files_are_one_line_errors(tmp_path, text, match):
    with pytest.raises(MergeConfigError, match=match) as err:
        parse_multi(text, tmp_path, None)
    assert "\n" not in str(err.value)


def _task_states(flow_state) -> dict[str, str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_state.state_details.flow_run_id])))
    return {run.name: run.state.name for run in runs}


def test_editing_a_step_reruns_it_and_its_dependents_only(prefect_harness, tiny_models, tmp_path):
    from flows.multi import multi_merge

    file, mid, final = tmp_path / "multi.yaml", tmp_path / "mid", tmp_path / "final"
    file.write_text(_steps_text(tiny_models, weight=0.5))
    first = multi_merge(str(file), str(mid), str(final), return_state=True)
    assert first.is_completed()
    assert set(_task_states(first).values()) == {"Completed"}
    soup_mtime = (mid / "soup" / "model.safetensors").stat().st_mtime_ns

    file.write_text(_steps_text(tiny_models, weight=0.7))  # edit the second step
    second = multi_merge(str(file), str(mid), str(final), return_state=True)
    assert _task_states(second) == {"step:soup": "Cached", "step:tuned": "Completed", "step:final": "Completed"}
    assert (mid / "soup" / "model.safetensors").stat().st_mtime_ns == soup_mtime
    soup, tuned = load_file(mid / "soup" / "model.safetensors"), load_file(mid / "tuned" / "model.safetensors")
    base = load_file(Path(tiny_models["base"]) / "model.safetensors")
    key = "model.layers.0.mlp.up_proj.weight"
    assert (tuned[key] - (base[key] + 0.7 * (soup[key] - base[key]))).abs().max() < 1e-6

    third = multi_merge(str(file), str(mid), str(final), return_state=True)
    assert set(_task_states(third).values()) == {"Cached"}


def test_multi_command(prefect_harness, tiny_models, tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app

    file = tmp_path / "multi.yaml"
    file.write_text(_steps_text(tiny_models))
    runner = CliRunner()
    result = runner.invoke(app, ["multi", str(file), "--intermediate-dir", str(tmp_path / "mid")])
    assert result.exit_code == 2 and "--out-path" in result.output, result.output
    result = runner.invoke(app, ["multi", str(file), "--intermediate-dir", str(tmp_path / "mid"), "--out-path", str(tmp_path / "out"), "--lazy"])
    assert result.exit_code == 0, result.output
    assert f"final: {(tmp_path / 'out').absolute()}" in result.output and (tmp_path / "out" / "model.safetensors").is_file()

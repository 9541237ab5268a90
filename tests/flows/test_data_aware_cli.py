"""`mergeflow collect-stats` then `mergeflow merge` with regmean and fisher on tiny Llama models:
each model's statistics on its own data reach the method through its 'stats' parameter, and a
missing or wrong statistics file is a one-line error naming the model (and the tensor)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from flows.cli import app
from merging.api import merge_tensors

runner = CliRunner()
DATA = {"ft_a": ["w1 w2 w3 w4", "w5 w6 w7 w8 w9", "w1 w3"], "ft_b": ["w20 w21 w22", "w30 w31 w32 w33 w34 w35", "w40"]}


@pytest.fixture(scope="module")
def stats(tiny_models, tmp_path_factory):
    """Each fine-tuned model (a copy with the base's tokenizer) with its gram and fisher files."""
    root = tmp_path_factory.mktemp("data-aware")
    found = {}
    for name, texts in DATA.items():
        model = root / name
        model.mkdir()
        for f in [*tiny_models[name].iterdir(), *tiny_models["base"].glob("*tokenizer*")]:
            (model / f.name).write_bytes(f.read_bytes())
        data = root / f"{name}.txt"
        data.write_text("\n".join(texts) + "\n")
        found[name] = {"model": model}
        for kind in ("gram", "fisher"):
            out = root / f"{name}.{kind}.safetensors"
            result = runner.invoke(app, ["collect-stats", str(model), str(data), "--kind", kind, "-o", str(out)])
            assert result.exit_code == 0, result.output
            found[name][kind] = out
    return found


def _merge(tiny_models, stats, tmp_path, method: str, kind: str, parameters: dict, out: str = "merged") -> dict:
    config = {"merge_method": method, "base_model": str(tiny_models["base"]), "parameters": parameters,
              "models": [{"model": str(stats[n]["model"]), "parameters": {"stats": str(stats[n][kind])}} for n in DATA]}
    path = tmp_path / f"{out}.yml"
    path.write_text(yaml.safe_dump(config))
    result = runner.invoke(app, ["merge", str(path), str(tmp_path / out), "-q"])
    assert result.exit_code == 0, result.output
    return load_file(tmp_path / out / "model.safetensors")


def test_regmean_merge_end_to_end(tiny_models, stats, tmp_path):
    merged = _merge(tiny_models, stats, tmp_path, "regmean", "gram", {"alpha": 0.7})
    base, a, b = (load_file(tiny_models[n] / "model.safetensors") for n in ("base", "ft_a", "ft_b"))
    grams = [load_file(stats[n]["gram"]) for n in DATA]
    key = "model.layers.1.mlp.down_proj.weight"
    by_hand = merge_tensors("regmean", base[key], [a[key], b[key]], {"alpha": 0.7}, stats=[g[key] for g in grams], name=key)
    assert torch.allclose(merged[key], by_hand, atol=1e-6)
    mean = (a[key] + b[key]) / 2
    assert not torch.allclose(merged[key], mean, atol=1e-4)  # the Grams matter
    v = "model.layers.0.self_attn.v_proj.weight"  # k/v read q's Gram (one input, stored once)
    q_gram = [g["model.layers.0.self_attn.q_proj.weight"] for g in grams]
    assert torch.allclose(merged[v], merge_tensors("regmean", base[v], [a[v], b[v]], {"alpha": 0.7}, stats=q_gram), atol=1e-6)
    for other in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.allclose(merged[other], (a[other] + b[other]) / 2, atol=1e-6)


def test_fisher_merge_end_to_end(tiny_models, stats, tmp_path):
    merged = _merge(tiny_models, stats, tmp_path, "fisher", "fisher", {"eps": 1e-8})
    base, a, b = (load_file(tiny_models[n] / "model.safetensors") for n in ("base", "ft_a", "ft_b"))
    fishers = [load_file(stats[n]["fisher"]) for n in DATA]
    norms = [float(sum(f[k].double().square().sum() for k in base) ** 0.5) for f in fishers]  # over every merged tensor
    for key in ("model.layers.0.mlp.up_proj.weight", "model.norm.weight", "model.embed_tokens.weight"):
        w = [fishers[i][key].double() / norms[i] + 1e-8 / norms[i] for i in range(2)]
        expected = (w[0] * a[key].double() + w[1] * b[key].double()) / (w[0] + w[1])
        assert torch.allclose(merged[key].double(), expected, atol=1e-5), key


def test_missing_or_wrong_statistics_are_one_line_errors(tiny_models, stats, tmp_path):
    def run(models, method="regmean"):
        config = tmp_path / "bad.yml"
        config.write_text(yaml.safe_dump({"merge_method": method, "base_model": str(tiny_models["base"]), "models": models}))
        return runner.invoke(app, ["merge", str(config), str(tmp_path / "bad"), "-q"])

    a, b = (str(stats[n]["model"]) for n in DATA)
    result = run([{"model": a, "parameters": {"stats": str(stats["ft_a"]["gram"])}}, {"model": b}])
    assert result.exit_code == 2 and repr(b) in result.output and "stats" in result.output
    result = run([{"model": a, "parameters": {"stats": str(stats["ft_a"]["fisher"])}},
                  {"model": b, "parameters": {"stats": str(stats["ft_b"]["gram"])}}])
    assert result.exit_code == 2 and repr(a) in result.output and "'fisher'" in result.output and "gram" in result.output
    partial = load_file(stats["ft_b"]["fisher"])
    del partial["model.layers.1.mlp.down_proj.weight"]
    save_file(partial, tmp_path / "partial.safetensors", metadata={"mergeflow_stats": '{"kind": "fisher"}'})
    result = run([{"model": a, "parameters": {"stats": str(stats["ft_a"]["fisher"])}},
                  {"model": b, "parameters": {"stats": str(tmp_path / "partial.safetensors")}}], method="fisher")
    assert result.exit_code == 2 and repr(b) in result.output and "model.layers.1.mlp.down_proj.weight" in result.output
    assert not (tmp_path / "bad").exists()


def test_an_output_over_a_statistics_file_is_refused_and_the_file_kept(tiny_models, stats, tmp_path):
    folder = tmp_path / "grams"
    folder.mkdir()
    copies = {}
    for name in DATA:
        copies[name] = folder / f"{name}.safetensors"
        copies[name].write_bytes(stats[name]["gram"].read_bytes())
    config = {"merge_method": "regmean", "base_model": str(tiny_models["base"]),
              "models": [{"model": str(stats[n]["model"]), "parameters": {"stats": str(copies[n])}} for n in DATA]}
    path = tmp_path / "over.yml"
    path.write_text(yaml.safe_dump(config))
    result = runner.invoke(app, ["merge", str(path), str(folder), "-q", "--overwrite"])
    assert result.exit_code != 0 and "stats file" in result.output and "ft_a.safetensors" in result.output, result.output
    assert all(p.is_file() for p in copies.values())


def test_the_pipeline_collects_each_inputs_statistics_and_merges_with_them(tiny_models, stats, tmp_path):
    """params.yaml names each input's own data (models.inputs[].data): the collect_stats stage
    writes its Grams, the merge stages read them, and the model is the one `mergeflow merge`
    gives with the same statistics collected by `mergeflow collect-stats`."""
    from merging import pipeline
    from merging.io.artifacts import read_manifest
    from merging.pipeline_params import parse_params

    params = parse_params({
        "models": {"base": {"name": "base", "source": str(tiny_models["base"])},
                   "inputs": [{"name": n, "source": str(stats[n]["model"]), "data": str(stats[n]["model"].parent / f"{n}.txt")}
                              for n in DATA]},
        "merge": {"method": "regmean", "combine": {"alpha": 0.7}},
        "pipeline": {"device": "cpu", "artifacts": str(tmp_path / "art")},
        "eval": {"tasks": ["unused"]},
    })
    root = tmp_path / "run"
    for name in pipeline.stages_through("save"):
        stage = pipeline.get_stage(name)
        pipeline.run_stage(name, params, {n: root / n for n in pipeline.stage_inputs(stage)}, root / name, root / "store")
    collected = json.loads((root / "collect_stats" / "stats.json").read_text())
    assert sorted(collected) == sorted(DATA) and read_manifest(root / "collect_stats")["stage"] == "collect_stats"
    staged = load_file(root / "save" / "model.safetensors")
    by_cli = _merge(tiny_models, stats, tmp_path, "regmean", "gram", {"alpha": 0.7})
    assert staged.keys() == by_cli.keys()
    for key in staged:
        assert torch.allclose(staged[key], by_cli[key], atol=1e-6), key


def test_the_pipeline_asks_for_an_inputs_data_by_name(tiny_models, stats, tmp_path):
    from merging import pipeline
    from merging.errors import MergeConfigError
    from merging.pipeline_params import parse_params

    params = parse_params({
        "models": {"base": {"name": "base", "source": str(tiny_models["base"])},
                   "inputs": [{"name": n, "source": str(stats[n]["model"])} for n in DATA]},
        "merge": {"method": "fisher"}, "pipeline": {"device": "cpu"}, "eval": {"tasks": ["unused"]}})
    pipeline.run_stage("fetch", params, {}, tmp_path / "fetch", tmp_path / "store")
    with pytest.raises(MergeConfigError, match=r"models.inputs\[ft_a\].data: method 'fisher' reads each model's fisher"):
        pipeline.run_stage("collect_stats", params, {"fetch": tmp_path / "fetch"}, tmp_path / "cs", tmp_path / "store")
    assert not (tmp_path / "cs").exists()


def test_the_pipeline_wants_every_regmean_plusplus_statistic_named_or_none(tiny_models, stats, tmp_path):
    """RegMean++'s Grams come from every model at once, through the partially merged model: one
    model's file named and another's collected would mix two recipes, so collect_stats refuses."""
    from merging import pipeline
    from merging.errors import MergeConfigError
    from merging.pipeline_params import parse_params

    params = parse_params({
        "models": {"base": {"name": "base", "source": str(tiny_models["base"])},
                   "inputs": [{"name": n, "source": str(stats[n]["model"]), "data": str(stats[n]["model"].parent / f"{n}.txt")}
                              for n in DATA]},
        "merge": {"method": "regmean_plusplus", "combine": {"stats": {"ft_a": str(stats["ft_a"]["gram"])}}},
        "pipeline": {"device": "cpu"}, "eval": {"tasks": ["unused"]}})
    pipeline.run_stage("fetch", params, {}, tmp_path / "fetch", tmp_path / "store")
    with pytest.raises(MergeConfigError, match="partially merged model.*every model's statistics file.*or none.*'ft_a'"):
        pipeline.run_stage("collect_stats", params, {"fetch": tmp_path / "fetch"}, tmp_path / "cs", tmp_path / "store")
    assert not (tmp_path / "cs").exists()

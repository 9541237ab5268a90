"""`mergeflow regmean-plusplus` on tiny Llama models, against an independent RegMean++ made of
whole-model forwards: for each block l, candidate i's block l placed into the partially merged
model, run on model i's texts one at a time (no padding), Grams hooked at block l's Linears."""

from __future__ import annotations

import copy

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from flows.cli import app
from merging.methods.regmean import regmean_delta

TEXTS = {"ft_a": ["w1 w2 w3 w4", "w5 w6 w7 w8 w9 w10", "w1 w3"], "ft_b": ["w20 w21 w22", "w30 w31 w32 w33 w34", "w40"]}
ALPHA = 0.3


def _reference(base_dir, model_dirs, texts):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    load = lambda d: AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()  # noqa: E731
    merged, cands = load(base_dir), [load(d) for d in model_dirs]
    tok = AutoTokenizer.from_pretrained(base_dir)
    with torch.no_grad():
        merged.model.embed_tokens.weight.copy_(torch.stack([c.model.embed_tokens.weight for c in cands]).mean(dim=0))
    for layer in range(len(merged.model.layers)):
        grams = []
        for cand, lines in zip(cands, texts):
            hybrid = copy.deepcopy(merged)
            hybrid.model.layers[layer] = copy.deepcopy(cand.model.layers[layer])
            sums, counts = {}, {}

            def hook(module, args, name, sums=sums, counts=counts):
                x = args[0][0]  # (tokens, in): one text, no padding
                sums[name] = sums.get(name, 0) + x.T @ x
                counts[name] = counts.get(name, 0) + x.shape[0]

            hooks = [m.register_forward_pre_hook(lambda m, a, n=n: hook(m, a, n))
                     for n, m in hybrid.model.layers[layer].named_modules() if isinstance(m, torch.nn.Linear)]
            with torch.no_grad():
                for line in lines:
                    hybrid(**tok(line, return_tensors="pt"))
            for h in hooks:
                h.remove()
            grams.append({n: sums[n] / counts[n] for n in sums})
        block = merged.model.layers[layer]
        with torch.no_grad():
            for name, p in block.named_parameters():
                deltas = torch.stack([dict(c.model.layers[layer].named_parameters())[name] - p for c in cands])
                module = name.removesuffix(".weight")
                if module in grams[0]:
                    delta = regmean_delta(deltas, torch.stack([g[module] for g in grams]), torch.ones(2), ALPHA)
                else:
                    delta = deltas.mean(dim=0)
                p.add_(delta)
    return {k: v for k, v in merged.state_dict().items() if ".layers." in k}


def test_regmean_plusplus_cli_matches_whole_model_reference(tiny_models, tmp_path):
    models = []
    for name, lines in TEXTS.items():
        folder = tmp_path / name
        folder.mkdir()
        for f in [*tiny_models[name].iterdir(), *tiny_models["base"].glob("*tokenizer*")]:
            (folder / f.name).write_bytes(f.read_bytes())
        data = tmp_path / f"{name}.txt"
        data.write_text("\n".join(lines) + "\n")
        models.append({"model": str(folder), "parameters": {"data": str(data)}})
    config = tmp_path / "rpp.yml"
    config.write_text(yaml.safe_dump({"merge_method": "regmean_plusplus", "base_model": str(tiny_models["base"]),
                                      "parameters": {"alpha": ALPHA}, "models": models}))
    result = CliRunner().invoke(app, ["regmean-plusplus", str(config), str(tmp_path / "out"), "--batch-size", "2", "-q"])
    assert result.exit_code == 0, result.output
    merged = load_file(tmp_path / "out" / "model.safetensors")
    expected = _reference(tiny_models["base"], [tmp_path / n for n in TEXTS], list(TEXTS.values()))
    for key, value in expected.items():
        assert torch.allclose(merged[key], value, atol=2e-5), key
    a, b = (load_file(tiny_models[n] / "model.safetensors") for n in TEXTS)
    key = "model.layers.1.mlp.down_proj.weight"
    assert not torch.allclose(merged[key], (a[key] + b[key]) / 2, atol=1e-4)  # the Grams matter
    assert torch.allclose(merged["lm_head.weight"], (a["lm_head.weight"] + b["lm_head.weight"]) / 2, atol=1e-6)

    plain = tmp_path / "plain.yml"  # without the command: the one-line error says how
    plain.write_text(config.read_text())
    result = CliRunner().invoke(app, ["merge", str(plain), str(tmp_path / "nope"), "-q"])
    assert result.exit_code == 2 and "mergeflow regmean-plusplus" in result.output


def _pipeline_params(tiny_models, tmp_path, alpha: float, **extra):
    """Params naming each fine-tune (with the base's tokenizer) and its own texts."""
    from merging.pipeline_params import parse_params

    inputs = []
    for name, lines in TEXTS.items():
        folder = tmp_path / name
        if not folder.exists():
            folder.mkdir()
            for f in [*tiny_models[name].iterdir(), *tiny_models["base"].glob("*tokenizer*")]:
                (folder / f.name).write_bytes(f.read_bytes())
            (tmp_path / f"{name}.txt").write_text("\n".join(lines) + "\n")
        inputs.append({"name": name, "source": str(folder), "data": str(tmp_path / f"{name}.txt")})
    return parse_params({"models": {"base": {"name": "base", "source": str(tiny_models["base"])}, "inputs": inputs},
                         "merge": {"method": "regmean_plusplus", "combine": {"alpha": alpha}, **extra},
                         "stats": {"batch_size": 2}, "pipeline": {"device": "cpu"}, "eval": {"tasks": ["unused"]}})


def _run_through(name: str, params, root):
    from merging import pipeline

    for stage_name in pipeline.stages_through(name):
        stage = pipeline.get_stage(stage_name)
        pipeline.run_stage(stage_name, params, {n: root / n for n in pipeline.stage_inputs(stage)}, root / stage_name,
                           root / "store")


def test_the_pipeline_collects_regmean_plusplus_grams_for_its_recipe(tiny_models, tmp_path):
    """params.yaml with merge.method regmean_plusplus and each input's data: collect_stats runs
    RegMean++'s block-by-block collection, and the staged model is the whole-model reference's."""
    params = _pipeline_params(tiny_models, tmp_path, ALPHA)
    root = tmp_path / "run"
    _run_through("save", params, root)
    merged = load_file(root / "save" / "model.safetensors")
    expected = _reference(tiny_models["base"], [tmp_path / n for n in TEXTS], list(TEXTS.values()))
    for key, value in expected.items():
        assert torch.allclose(merged[key], value, atol=2e-5), key


def test_regmean_plusplus_statistics_are_cached_per_recipe_and_a_stale_artifact_is_refused(tiny_models, tmp_path):
    """collect_stats's key holds the merge settings for RegMean++ (not for RegMean, whose Grams
    are per model); a merge stage given Grams collected for other settings refuses them."""
    from merging import pipeline
    from merging.errors import ArtifactError
    from merging.pipeline_params import parse_params

    params = _pipeline_params(tiny_models, tmp_path, ALPHA)
    other = _pipeline_params(tiny_models, tmp_path, 0.9)
    root = tmp_path / "run"
    _run_through("fetch", params, root)
    fetched = {"fetch": root / "fetch"}
    assert pipeline.stage_key("collect_stats", params, fetched) != pipeline.stage_key("collect_stats", other, fetched)
    as_regmean = [parse_params({**p.model_dump(mode="json"), "merge": {"method": "regmean", "combine": {"alpha": a}}})
                  for p, a in ((params, ALPHA), (other, 0.9))]
    assert pipeline.stage_key("collect_stats", as_regmean[0], fetched) == pipeline.stage_key("collect_stats", as_regmean[1], fetched)

    pipeline.run_stage("collect_stats", params, fetched, root / "collect_stats", root / "store")
    inputs = {"fetch": root / "fetch", "collect_stats": root / "collect_stats"}
    pipeline.stage_key("deltas", params, inputs)  # its own recipe: accepted
    with pytest.raises(ArtifactError, match=r"collect_stats artifact .* merge\.combine .*mergeflow dvc-yaml"):
        pipeline.stage_key("deltas", other, inputs)

"""Stage tasks through ``.fn`` on temporary folders: artifacts, manifests, cache keys that
change only downstream of a changed parameter, passthrough, fused == materialized."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from merging.errors import ArtifactError
from merging.io.artifacts import ArtifactReader, read_manifest
from merging.stages import key_for
from tasks import combine, decompose, deltas, fetch, save, sparsify
from tasks.caching import config_for
from tasks.params import load_params
from tests.pipeline_helpers import write_params


def _run_all(params_file, root, materialize=True):
    p = load_params(params_file).model_dump(mode="json")
    f = fetch.fetch.fn(p, str(root / "fetch"))
    if materialize:
        d = deltas.deltas.fn(p, f, str(root / "deltas"))
        de = decompose.decompose.fn(p, f, d, str(root / "decompose"))
        s = sparsify.sparsify.fn(p, f, de, d, str(root / "sparsify"))
        c = combine.combine.fn(p, f, s, d, str(root / "combine"))
    else:
        c = combine.fused_combine.fn(p, f, str(root / "combine"))
    return p, f, save.save.fn(p, f, c, str(root / "save"))


def test_artifacts_and_manifests(tiny_models, tmp_path):
    params_file = write_params(tmp_path / "params.yaml", tiny_models, tmp_path / "art")
    p, f, model = _run_all(params_file, tmp_path / "a")
    manifest = read_manifest(tmp_path / "a" / "sparsify")
    assert manifest["stage"] == "sparsify" and manifest["params"]["parameters"] == {"density": 0.4}
    assert manifest["params"]["models"][0] == {}  # the weight is read by combine, not sparsify
    assert set(manifest["inputs"]) == {"decompose", "deltas"} and manifest["versions"]["mergeflow"]
    assert read_manifest(tmp_path / "a" / "decompose")["passthrough"]  # ties has no decomposition
    reader = ArtifactReader(tmp_path / "a" / "decompose")
    assert reader.folder == (tmp_path / "a" / "deltas").resolve()
    group = reader.read_group("model.layers.0.self_attn.q_proj.weight")["deltas"]
    assert group.shape[0] == 3
    assert (tmp_path / "a" / "save" / "config.json").is_file()
    shutil.copytree(tmp_path / "a", tmp_path / "moved")  # links between artifacts are relative
    shutil.rmtree(tmp_path / "a" / "deltas")
    assert ArtifactReader(tmp_path / "moved" / "decompose").folder == (tmp_path / "moved" / "deltas").resolve()
    models = json.loads((tmp_path / "a" / "fetch" / "models.json").read_text())
    assert Path(models["a"]["folder"]).resolve() == tiny_models["ft_a"].resolve() and len(models["a"]["digest"]) == 64


def test_changed_param_changes_only_downstream_keys(tiny_models, tmp_path):
    base_file = write_params(tmp_path / "p1.yaml", tiny_models, tmp_path / "art")
    changed_file = write_params(tmp_path / "p2.yaml", tiny_models, tmp_path / "art", sparsify={"density": 0.6})
    p1, f, _ = _run_all(base_file, tmp_path / "one")
    p2 = load_params(changed_file).model_dump(mode="json")
    root = tmp_path / "one"
    c1, c2 = config_for(p1, f), config_for(p2, f)
    dirs = {"deltas": {"fetch": f}, "decompose": {"deltas": root / "deltas"},
            "sparsify": {"decompose": root / "decompose", "deltas": root / "deltas"}}
    for stage in ("deltas", "decompose"):
        assert key_for(stage, c1, dirs[stage]) == key_for(stage, c2, dirs[stage])
    assert key_for("sparsify", c1, dirs["sparsify"]) != key_for("sparsify", c2, dirs["sparsify"])


def test_fused_equals_materialized_bit_for_bit(tiny_models, tmp_path):
    params_file = write_params(tmp_path / "params.yaml", tiny_models, tmp_path / "art", method="dare_ties",
                               sparsify={"density": 0.5}, combine={"lambda": 0.8})
    _, _, a = _run_all(params_file, tmp_path / "m")
    _, _, b = _run_all(params_file, tmp_path / "f", materialize=False)
    x, y = load_file(f"{a}/model.safetensors"), load_file(f"{b}/model.safetensors")
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    assert read_manifest(a)["output_digest"] == read_manifest(b)["output_digest"]


def test_missing_input_artifact_is_a_clear_error(tiny_models, tmp_path):
    params_file = write_params(tmp_path / "params.yaml", tiny_models, tmp_path / "art")
    p = load_params(params_file).model_dump(mode="json")
    f = fetch.fetch.fn(p, str(tmp_path / "fetch"))
    with pytest.raises(ArtifactError, match="missing or incomplete"):
        decompose.decompose.fn(p, f, str(tmp_path / "nowhere"), str(tmp_path / "decompose"))
    assert not (tmp_path / "decompose").exists()

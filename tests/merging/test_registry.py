"""Registry: one table, unknown names list the known ones, duplicates rejected, params models frozen."""

import pytest
from pydantic import BaseModel

from merging.errors import UnknownMethodError
from merging.registry import METHODS, _build, get_method


def test_unknown_method_suggests_closest():
    with pytest.raises(UnknownMethodError, match="Did you mean 'dare_ties'"):
        get_method("dare-ties")


def test_duplicates_rejected():
    spec = get_method("ties")
    with pytest.raises(ValueError, match="twice"):
        _build((spec, spec))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_has_frozen_strict_params_and_a_paper(name):
    spec = METHODS[name]
    for model in (spec.params, spec.model_params):
        assert issubclass(model, BaseModel)
        assert model.model_config.get("frozen") and model.model_config.get("extra") == "forbid"
    assert "lambda" in {f.alias for f in spec.params.model_fields.values()}
    assert spec.paper
    module = __import__(spec.params.__module__, fromlist=["__doc__"])
    assert module.__doc__ and any(cite in module.__doc__ for cite in ("arXiv", "Shoemake", "github"))

"""Shared bases of the method parameter models.

A method has two pydantic models, both frozen with ``extra="forbid"``:

* ``MethodParams`` subclasses hold the settings shared by every input model (mergekit's
  global ``parameters``), always including ``lambda``, the global scale on the merged delta;
* ``ModelParams`` subclasses hold per-input settings (``weight``, ``density``, ...), given in
  ``models[].parameters`` or, as defaults for every model, in the global ``parameters``.

Defaults live here and in the method files, nowhere else.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["MethodParams", "ModelParams", "WeightedModelParams"]


class MethodParams(BaseModel):
    """Parameters shared by all models of one merge."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True, allow_inf_nan=False)

    lambda_: float = Field(
        1.0,
        alias="lambda",
        description="Global scale on the merged delta: result = base + lambda * merged_delta.",
    )


class ModelParams(BaseModel):
    """Per-model parameters; methods without any use this empty model."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True, allow_inf_nan=False)


class WeightedModelParams(ModelParams):
    """Per-model weight, as in mergekit's task-arithmetic family."""

    weight: float = Field(1.0, description="Weight of this model's delta.")

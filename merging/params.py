"""Shared bases of the method parameter models.

A method has two pydantic models, both frozen with ``extra="forbid"``:

* ``MethodParams`` subclasses hold the settings shared by every input model (mergekit's
  global ``parameters``), always including ``lambda``, the global scale on the merged delta;
* ``ModelParams`` subclasses hold per-input settings (``weight``, ``density``, ...), given in
  ``models[].parameters`` or, as defaults for every model, in the global ``parameters``.

Defaults live here and in the method files, nowhere else.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["MethodParams", "ModelParams", "WeightedModelParams", "CoreSpaceParams", "KnotsSpaceParams"]


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


class CoreSpaceParams(MethodParams):
    """Methods that can also merge LoRA inputs in their Core Space."""

    merge_space: Literal["full", "core"] = Field(
        "full",
        description="full: merge the dense deltas. core: merge LoRA-adapted matrices in Core Space (Panariello et "
                    "al. 2025, arXiv 2509.17786): the method runs on the cores M_t = s_t U^T B_t A_t V (U, V bases "
                    "of the stacked factors), the result is mapped back; every input must be a LoRA adapter.",
    )


class KnotsSpaceParams(MethodParams):
    """TIES-family methods, which can also merge in Core Space or in KnOTS space."""

    merge_space: Literal["full", "core", "knots"] = Field(
        "full",
        description="full: the dense deltas. core: Core Space (Panariello et al. 2025) of LoRA inputs. knots: KnOTS "
                    "(Stoica et al. 2025, arXiv 2410.19735): per matrix the SVD of the task stack [D_1 | ... | D_T] "
                    "= U diag(s) V^T, the method runs on X_t = diag(s) V_t^T with one trim budget per task over "
                    "every matrix of the model, and the result is U merged.",
    )

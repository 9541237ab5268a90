"""RegMean — the regression mean of each Linear layer, from every model's input Gram matrix.

Paper: Jin, Ren, Preotiuc-Pietro & Cheng, ICLR 2023, "Dataless Knowledge Fusion by Merging
Weights of Language Models", arXiv 2212.09849. RegMean++ (Nguyen et al., TMLR 2026, arXiv
2508.03121) merges with the same formula and Grams collected through the partially merged
model (``merging.regmean_plusplus``). Follows ``../shared/specs/data-aware.md`` §1-3.

Per Linear weight W (out x in), model i with delta D_i = W_i - W0 and input Gram
G_i = (1/N_i) sum_t x_t x_t^T (model i on its own task data: ``mergeflow collect-stats --kind gram``):
    G~_i = a G_i + (1 - a) Diag(G_i)            (a = ``alpha``: off-diagonals shrunk, diagonal kept)
    S = sum_i c_i G~_i,    D* = (sum_i c_i D_i G~_i) S^-1,    W* = W0 + lambda D*
the minimiser of sum_i c_i [a ||(W - W_i) X_i||^2 / N_i + (1 - a) ||(W - W_i) Diag(G_i)^1/2||^2].
Mean (not summed) Grams: each model weighs the same whatever its N_i (c_i proportional to N_i
gives the summed form). Deltas, not weights: the same W* when S is invertible, and a direction
no Gram sees falls back to W0. S^-1 by a float64 Cholesky solve; when S does not factor,
r mean(diag S) I is added, r = 1e-6, x10 until it does (logged); ``ridge`` adds one up front.
LoRA inputs (D_i = s_i B_i A_i) merge in factored form: D* = [B_1|..|B_K] [M_1; ..; M_K],
M_i = c_i s_i A_i G~_i S^-1 (exact, rank <= sum r_i). Every other tensor (embeddings, LM
head, norms, biases, excluded matrices) takes the c-weighted mean of the deltas (RegMean with
G_i = I); ``embed_policy: base`` keeps embeddings and LM head at the base.
Defaults: alpha 0.5 (MergeBench's Llama RegMean; the references use 0.1-1), 0.1 for RegMean++
(MergeBench); c_i = 1; ridge 0. One model, no ridge: its delta.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
from pydantic import Field

from merging.errors import StatisticsError
from merging.params import MethodParams, ModelParams
from merging.spec import Factors, MethodSpec, ModelStatsNeed, TensorGroup
from merging.tokenizer_merge import VOCAB_TENSOR

__all__ = ["RegmeanParams", "RegmeanModelParams", "RegmeanPlusPlusParams", "RegmeanPlusPlusModelParams",
           "shrink_off_diagonal", "regmean_delta", "regmean_lora", "solve_right", "combine", "SPEC", "PLUSPLUS_SPEC"]

log = logging.getLogger(__name__)

RIDGE_START = 1e-6
"""First relative ridge tried when S does not factor; multiplied by 10 until it does (spec §1)."""


class RegmeanParams(MethodParams):
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="a: off-diagonals of each Gram times a (1: full Gram, 0: its diagonal).")
    ridge: float = Field(0.0, ge=0.0, description="Adds ridge * mean(diag S) * I to S before the solve.")
    embed_policy: Literal["mean", "base"] = Field("mean", description="Embeddings and LM head: the weighted mean, or the base.")


class RegmeanModelParams(ModelParams):
    weight: float = Field(1.0, gt=0.0, description="c_i: this model's weight in the regression.")
    stats: str | None = Field(None, description="This model's Gram file ('mergeflow collect-stats MODEL DATA --kind gram').")


class RegmeanPlusPlusParams(RegmeanParams):
    alpha: float = Field(0.1, ge=0.0, le=1.0, description="a: off-diagonals of each Gram times a (MergeBench's RegMean++: 0.1).")


class RegmeanPlusPlusModelParams(RegmeanModelParams):
    data: str | None = Field(None, description="This model's task data (.txt or .jsonl), run through the partially merged model.")


def shrink_off_diagonal(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """G~ = a G + (1 - a) Diag(G), for one (in, in) Gram or a stack (T, in, in)."""
    shrunk = gram * alpha
    shrunk.diagonal(dim1=-2, dim2=-1).copy_(gram.diagonal(dim1=-2, dim2=-1))
    return shrunk


def solve_right(numerator: torch.Tensor, s: torch.Tensor, name: str, ridge: float = 0.0) -> torch.Tensor:
    """``numerator @ S^-1`` for symmetric S (in, in) by a Cholesky solve (float64 in and out).

    Raises:
        StatisticsError: S does not factor even with a ridge of mean(diag S) (NaN in a Gram).
    """
    diag_mean = float(s.diagonal().mean())
    scale = diag_mean if diag_mean > 0 else 1.0  # all Grams zero: any ridge gives D* = 0, the base
    eye = torch.eye(s.shape[0], dtype=s.dtype, device=s.device)
    if ridge:
        s = s + ridge * scale * eye
    factor, info = torch.linalg.cholesky_ex(s)
    r = RIDGE_START
    while int(info) != 0:
        if r > 1.0:
            raise StatisticsError(f"regmean: tensor {name!r}: the Gram sum S is not positive definite even with a ridge "
                                  "of mean(diag S); a statistics file holds NaN or Inf, recollect it")
        factor, info = torch.linalg.cholesky_ex(s + r * scale * eye)
        if int(info) == 0:
            log.warning("regmean: tensor %r: S is not positive definite; solved with ridge %.0e * mean(diag S)", name, r)
        r *= 10
    return torch.cholesky_solve(numerator.T, factor).T


def regmean_delta(deltas: torch.Tensor, grams: torch.Tensor, weights: torch.Tensor, alpha: float, name: str = "tensor",
                  ridge: float = 0.0) -> torch.Tensor:
    """D* = (sum_i c_i D_i G~_i) S^-1 of deltas (T, out, in) and Grams (T, in, in); in deltas' dtype."""
    shrunk = shrink_off_diagonal(grams.to(torch.float64), alpha)  # (T, in, in)
    c = weights.to(torch.float64).reshape(-1, 1, 1)
    s = (c * shrunk).sum(dim=0)
    numerator = (c * (deltas.to(torch.float64) @ shrunk)).sum(dim=0)  # (out, in)
    return solve_right(numerator, s, name, ridge).to(deltas.dtype)


def regmean_lora(b: tuple[torch.Tensor, ...], a: tuple[torch.Tensor, ...], scales: tuple[float, ...], grams: torch.Tensor,
                 weights: torch.Tensor, alpha: float, name: str = "tensor", ridge: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """RegMean of LoRA deltas s_i B_i A_i as factors (B_cat (out, R), A_new (R, in)), R = sum r_i, float64."""
    shrunk = shrink_off_diagonal(grams.to(torch.float64), alpha)
    c = weights.to(torch.float64)
    s = (c.reshape(-1, 1, 1) * shrunk).sum(dim=0)
    rows = torch.cat([float(c[i]) * scales[i] * (a[i].to(torch.float64) @ shrunk[i]) for i in range(len(a))])  # (R, in)
    return torch.cat([x.to(torch.float64) for x in b], dim=1), solve_right(rows, s, name, ridge)


def _weights(group: TensorGroup, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor([p.weight for p in group.model_params], dtype=dtype, device=group.deltas.device)


def combine(group: TensorGroup, factors: Factors, params: RegmeanParams) -> torch.Tensor:
    deltas = factors["deltas"]
    if group.kind != "matrix":
        if params.embed_policy == "base" and VOCAB_TENSOR.match(group.name):
            return torch.zeros_like(deltas[0])
        c = _weights(group, deltas.dtype).reshape((-1,) + (1,) * (deltas.dim() - 1))
        return (c * deltas).sum(dim=0) / c.sum()
    if group.model_stats is None:
        raise StatisticsError(f"regmean: matrix {group.name!r} has no Grams; give every model's 'stats' file")
    grams = torch.stack([s.value for s in group.model_stats]).to(deltas.device)  # (T, in, in)
    weights = _weights(group, torch.float64)
    if group.lora is not None:
        b_cat, a_new = regmean_lora(group.lora.b, group.lora.a, group.lora.scales, grams, weights, params.alpha,
                                    group.name, params.ridge)
        return (b_cat @ a_new).to(deltas.dtype)
    return regmean_delta(deltas, grams, weights, params.alpha, group.name, params.ridge)


_PAPER = "Jin et al. 2023, Dataless Knowledge Fusion by Merging Weights of Language Models (RegMean), arXiv 2212.09849"

SPEC = MethodSpec(
    name="regmean", params=RegmeanParams, model_params=RegmeanModelParams, combine=combine, paper=_PAPER,
    model_stats=ModelStatsNeed(kind="gram", tensor_kinds=frozenset({"matrix"})), lora_span=True,
)

PLUSPLUS_SPEC = MethodSpec(
    name="regmean_plusplus", params=RegmeanPlusPlusParams, model_params=RegmeanPlusPlusModelParams, combine=combine,
    paper="Nguyen et al. 2025, RegMean++, arXiv 2508.03121 (after " + _PAPER + ")",
    model_stats=ModelStatsNeed(kind="gram", tensor_kinds=frozenset({"matrix"}),
                               how="RegMean++ collects its Grams through the partially merged model: give each model's "
                                   "task data as models[i].parameters.data and run 'mergeflow regmean-plusplus CONFIG OUT' "
                                   "(in the pipeline, collect_stats does it from models.inputs[].data)",
                               per_model=False),
    lora_span=True,
)

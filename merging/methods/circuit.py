"""Circuit-Merge! — priority-ordered magnitude drop, then sign-overwrite accumulation.

Source: J. S. Greenawalt, 2024, ``circuit-merge.py`` in github.com/jsgreenawalt/ml-model-mergetools (MIT
licence; no paper). Follows ``../shared/specs/circuit-della-peft.md`` §1.1-1.2.

Math, per tensor. Models V_1..V_n are listed by priority (V_1 highest) and processed in
reverse: processing index i = 1 for V_n (processed first) .. i = n for V_1 (processed last).
T = temperature, b = base_droprate, eps = 0.1 (fixed, as the reference), d = V - theta_0.
  1. threshold:  d_j := 0 where |d_j| < meaningful_change_threshold;
  2. drop rate:  p_i = 1 - [(1 - T) 0.5^k 2(1 - b) + T (1 - b)],  k = n - max(i, 2) + 1
                 (V_1 gets b, each step down halves the keep rate, the last two share it);
  3. MAGPRUNE, magnitude-linear over the whole tensor, m = |d|:
                 q_j = p - eps/2 + eps (1 - (m_j - min m) / (max m - min m)),  clamped to [0, 1];
                 drop where u_j < q_j (u ~ U[0, 1)), survivors d_j / (1 - q_j) unless skip_rescaling;
                 p <= 0 skips the step;
  4. accumulate, in processing order, each non-zero x: first contribution or sign(acc) != sign(x)
     -> acc = x, c = 1; same sign -> c += 1, acc = (1 - T)(acc + x)/2 + T (acc (c - 1) + x)/c.
     So the sign at each entry is that of the highest-priority model that kept it.
  theta = theta_0 + lambda * acc.
Defaults: T = 0, b = 0.5, threshold 2e-6, rescaling on (the reference CLI's defaults).
Randomness: one generator per tensor; one U[0, 1) draw of the tensor's shape per model, in
processing order, whether or not the model is pruned (so a model's mask depends only on
seed, tensor name and its position).

Fixes of the reference's defects (spec §1.6):
  * pruning statistics (min/max) and draws cover the whole tensor, not GPU row-chunks whose size
    depends on free memory, so results do not depend on the device;
  * n = 1: the reference gives p = 2b (1.0 at the default, ~100 % dropped and the survivors
    blown up 20x or more); refused unless ``single_model_drop`` is ``reference`` (that broken
    behaviour) or ``formula`` (the n >= 2 formula at k = 0, keep rates summing to 2(1 - b):
    p = (1 - T)(2b - 1) + T b, i.e. 0 at the default: the delta is kept whole);
  * max |d| == min |d| (reference: NaN probabilities): every entry gets q = p;
  * q >= 1 is always dropped; q <= 0 is never dropped and not rescaled (the reference shrank it);
  * output dtype is the engine's (the base's), not always float32; deltas are taken in the
    compute dtype, not bf16; the counter cannot overflow at 127 models;
  * YAML ``1e-6`` (a string for PyYAML) is accepted for the float parameters (pydantic coerces).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from merging.errors import MergeConfigError
from merging.kernels.sparsify import trim_below
from merging.params import MethodParams
from merging.rng import uniform
from merging.spec import Factors, MethodSpec, TensorGroup

__all__ = ["CircuitParams", "SPEC", "WINDOW", "accumulate", "calculate_p", "drop_rates", "magprune_linear"]

WINDOW = 0.1  # MAGPRUNE window eps, hard-coded in the reference


class CircuitParams(MethodParams):
    temperature: float = Field(0.0, ge=0.0, le=1.0, description="Spread of drop rates and agreement averaging: 0 geometric, 1 equal/mean.")
    base_droprate: float = Field(0.5, ge=0.0, lt=1.0, description="Drop rate b of the highest-priority (first-listed) model.")
    meaningful_change_threshold: float = Field(2e-6, ge=0.0, description="|delta| below this counts as no change.")
    skip_rescaling: bool = Field(False, description="Do not divide survivors by their keep probability 1 - q.")
    single_model_drop: Literal["error", "reference", "formula"] = Field(
        "error", description="One model: refuse, reference p = 2b (broken), or formula p = (1-T)(2b-1) + T b."
    )


def calculate_p(i: int, count: int, temperature: float, base_droprate: float) -> float:
    """The reference's drop rate of processing index ``i`` (1 = lowest priority) of ``count``.

    Same expression order as the reference, so the floats are bit-identical; ``count == 1``
    returns the reference's ``2 b``.
    """
    if count == 1:
        return base_droprate * 2
    divisions = count - max(i, 2) + 1
    keep = 0.5**divisions * ((1 - base_droprate) * 2)
    keep = (1 - temperature) * keep + temperature * (1 - base_droprate)
    return 1.0 - keep


def drop_rates(count: int, params: CircuitParams, tensor: str = "") -> list[float]:
    """Drop rate per model in listed order (first = highest priority), n = 1 per ``single_model_drop``."""
    t, b = params.temperature, params.base_droprate
    if count == 1:
        if params.single_model_drop == "error":
            raise MergeConfigError(
                f"circuit_merge got one model for tensor {tensor!r}: the reference drop rate p = 2 * base_droprate "
                f"= {2 * b:g} drops (nearly) everything and inflates the survivors. Add models, or set "
                "single_model_drop: formula (p = (1-T)(2b-1) + T*b; keeps the delta whole at the defaults) "
                "or single_model_drop: reference (the original, broken behaviour)"
            )
        if params.single_model_drop == "formula":
            return [1.0 - ((1 - t) * ((1 - b) * 2) + t * (1 - b))]
    return [calculate_p(count - listed, count, t, b) for listed in range(count)]


def magprune_linear(delta: torch.Tensor, p: float, uniforms: torch.Tensor, rescale: bool = True) -> torch.Tensor:
    """Magnitude-linear random drop over the whole tensor (the reference's MAGPRUNE as run).

    Args:
        delta: one model's (thresholded) delta, any shape.
        p: drop rate; entries get q in [p - eps/2, p + eps/2], the largest magnitude the lowest.
        uniforms: U[0, 1) draws of ``delta``'s shape; an entry is dropped where ``u < q``.
        rescale: divide survivors by ``1 - q``.

    Returns:
        The pruned delta (a new tensor).
    """
    magnitude = delta.abs()
    low, span = magnitude.min(), magnitude.max() - magnitude.min()
    ranks = 1 - (magnitude - low) / torch.where(span > 0, span, torch.ones_like(span))
    q = torch.where(span > 0, p - WINDOW / 2 + WINDOW * ranks, torch.full_like(ranks, p))
    q = q.clamp(0.0, 1.0)  # q >= 1 always dropped; q <= 0 never dropped, never shrunk
    keep = uniforms >= q
    kept = delta / torch.where(keep, 1 - q, torch.ones_like(q)) if rescale else delta
    return torch.where(keep, kept, torch.zeros_like(delta))


def sparsify(group: TensorGroup, factors: Factors, params: CircuitParams, rng: torch.Generator) -> Factors:
    """Threshold and MAGPRUNE each delta; ``deltas`` (n, *shape) stay in listed order."""
    deltas = factors["deltas"]
    rates = drop_rates(deltas.shape[0], params, group.name)
    pruned = torch.empty_like(deltas)
    for listed in reversed(range(deltas.shape[0])):  # processing order: last listed first
        delta = trim_below(deltas[listed], params.meaningful_change_threshold)
        uniforms = uniform(delta.shape, rng, delta)
        p = rates[listed]
        pruned[listed] = delta if p <= 0 else magprune_linear(delta, p, uniforms, not params.skip_rescaling)
    return {"deltas": pruned}


def accumulate(deltas: torch.Tensor, temperature: float) -> torch.Tensor:
    """Priority accumulation of ``deltas`` (n, *shape) given in processing order (lowest priority first)."""
    acc = torch.zeros_like(deltas[0])
    count = torch.zeros(deltas.shape[1:], dtype=torch.int64, device=deltas.device)
    for x in deltas:
        nonzero = x != 0
        agree = nonzero & (count > 0) & (torch.sign(acc) == torch.sign(x))
        restart = nonzero & ~agree  # first contribution, or a sign overwrite
        count = torch.where(agree, count + 1, torch.where(restart, torch.ones_like(count), count))
        c = count.clamp_min(1).to(acc.dtype)
        blended = (1 - temperature) * ((acc + x) / 2) + temperature * ((acc * (c - 1) + x) / c)
        acc = torch.where(agree, blended, torch.where(restart, x, acc))
    return acc


def combine(group: TensorGroup, factors: Factors, params: CircuitParams) -> torch.Tensor:
    return accumulate(factors["deltas"].flip(0), params.temperature)


PAPER = "J. S. Greenawalt 2024, Circuit-Merge! (github.com/jsgreenawalt/ml-model-mergetools, MIT)"
SPEC = MethodSpec(name="circuit_merge", params=CircuitParams, sparsify=sparsify, combine=combine,
                  random=True, paper=PAPER,
                  param_stages={k: "sparsify" for k in ("temperature", "base_droprate", "meaningful_change_threshold",
                                                        "skip_rescaling", "single_model_drop")})

"""RegMean++: RegMean whose Grams are collected through the partially merged model, block by block.

Paper: Nguyen et al., arXiv 2508.03121 (TMLR 2026); follows ``../shared/specs/data-aware.md`` §3.
The merge formula is RegMean's (``merging.methods.regmean``); only the Grams change:
    M := base (non-block tensors already merged by the caller); H_i^0 = input of block 0 under M on data_i
    for l = 0 .. L-1:
        G_i^(l,j) = Gram at Linear j of *candidate i's* block l run on H_i^l   (intra-layer)
        block l of M := RegMean of the candidates' block l with those Grams (mean for non-Linear tensors)
        H_i^(l+1) = M.block_l(H_i^l)                                             (cross-layer)
The Grams of block l depend on every merged block before it, i.e. on all models, data, a and c:
they are kept only inside one run. This module is the loop over plain ``torch.nn`` blocks; the
transformers glue (loading, block-0 inputs and kwargs) is ``evaluation.regmean_plusplus``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from merging.methods.regmean import RegmeanParams, regmean_delta

__all__ = ["BlockGrams", "RunBlock", "linear_weights", "block_grams", "merge_block", "regmean_plusplus"]

RunBlock = Callable[[nn.Module, torch.Tensor, int, int], torch.Tensor]
"""(block, hidden states of one batch, task i, batch b) -> the block's output hidden states."""

ParamsFor = Callable[[int, str], tuple[RegmeanParams, Sequence[float]]]
"""(block l, parameter name in the block) -> (method params, per-model weights c)."""


@dataclass(frozen=True)
class BlockGrams:
    """One model's Grams of one block: ``grams[name]`` (in, in) mean over ``tokens`` tokens,
    keyed by the Linear weight's name in the block; ``aliases`` maps Linears fed the same input."""

    grams: dict[str, torch.Tensor]
    tokens: dict[str, int]
    aliases: dict[str, str]


def linear_weights(block: nn.Module) -> dict[str, nn.Linear]:
    """The block's nn.Linear modules by their weight's name in the block (``self_attn.q_proj.weight``)."""
    return {f"{name}.weight" if name else "weight": m for name, m in block.named_modules() if isinstance(m, nn.Linear)}


def _call(block: nn.Module, hidden: torch.Tensor, task: int, batch: int) -> torch.Tensor:
    out = block(hidden)
    return out[0] if isinstance(out, tuple) else out


def block_grams(block: nn.Module, hidden: Sequence[torch.Tensor], masks: Sequence[torch.Tensor | None], task: int,
                run_block: RunBlock = _call) -> BlockGrams:
    """Grams (fp32 or wider sums, then means) at every Linear input of ``block`` run on each batch of ``hidden``
    (masked tokens excluded); a Linear fed the tensor an earlier one got is an alias."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    aliases: dict[str, str] = {}
    seen: dict[int, tuple[torch.Tensor, str]] = {}
    mask: list[torch.Tensor | None] = [None]

    def hook(key: str, x: torch.Tensor) -> None:
        if key in aliases:
            return
        if id(x) in seen:
            aliases[key] = seen[id(x)][1]
            return
        seen[id(x)] = (x, key)  # the reference keeps the id from being reused within the forward
        flat = x.detach()[mask[0]] if mask[0] is not None else x.detach().reshape(-1, x.shape[-1])
        flat = flat.to(torch.promote_types(flat.dtype, torch.float32))  # (n, in): fp32 at least
        sums[key] = sums.get(key, 0) + flat.T @ flat
        counts[key] = counts.get(key, 0) + flat.shape[0]

    handles = [m.register_forward_pre_hook(lambda _, args, key=key: hook(key, args[0]))
               for key, m in linear_weights(block).items()]
    try:
        with torch.no_grad():
            for b, (h, m) in enumerate(zip(hidden, masks)):
                mask[0] = m
                run_block(block, h, task, b)
                seen.clear()
    finally:
        for handle in handles:
            handle.remove()
    return BlockGrams({k: s / max(counts[k], 1) for k, s in sums.items()}, counts, aliases)


def merge_block(merged: nn.Module, candidates: Sequence[nn.Module], grams: Sequence[BlockGrams], layer: int,
                params_for: ParamsFor) -> None:
    """Set ``merged``'s parameters (holding the base) to base + lambda RegMean(deltas): Linear weights
    with the candidates' Grams, every other parameter the weighted mean of the deltas."""
    linears = set(linear_weights(merged))
    others = [dict(c.named_parameters()) for c in candidates]
    with torch.no_grad():
        for name, param in merged.named_parameters():
            params, weights = params_for(layer, name)
            base = param.detach().to(torch.float32)
            deltas = torch.stack([o[name].detach().to(torch.float32) - base for o in others])  # (T, *shape)
            c = torch.tensor(list(weights), dtype=torch.float64)
            if name in linears:
                stack = torch.stack([g.grams[g.aliases.get(name, name)] for g in grams])  # (T, in, in)
                delta = regmean_delta(deltas, stack, c, params.alpha, name, params.ridge)
            else:
                cw = c.to(deltas.dtype).reshape((-1,) + (1,) * (deltas.dim() - 1))
                delta = (cw * deltas).sum(dim=0) / cw.sum()
            scaled = delta * params.lambda_ if params.lambda_ != 1 else delta
            param.copy_((base + scaled).to(param.dtype))


def regmean_plusplus(merged_blocks: Sequence[nn.Module], candidate_blocks: Sequence[Sequence[nn.Module]],
                     hidden: Sequence[Sequence[torch.Tensor]], masks: Sequence[Sequence[torch.Tensor | None]],
                     params_for: ParamsFor, run_block: RunBlock = _call) -> list[list[BlockGrams]]:
    """Merge ``merged_blocks`` (holding the base's blocks; changed in place) block by block.

    Args:
        merged_blocks: M's blocks, L of them.
        candidate_blocks: per model i, its L blocks.
        hidden: per model i, the batches of block 0's input under M on data_i (each (..., d)).
        masks: per model i and batch, the tokens that count (bool, the batch's leading shape) or None.
        params_for: the method params and model weights of a block's parameter.
        run_block: calls a block on one batch of model i (the kwargs a transformer block needs).

    Returns:
        grams[l][i]: model i's Grams of block l (what RegMean++ merged with).
    """
    states = [list(h) for h in hidden]
    found = []
    for layer, block in enumerate(merged_blocks):
        cands = [blocks[layer] for blocks in candidate_blocks]
        grams = [block_grams(cands[i], states[i], masks[i], i, run_block) for i in range(len(cands))]
        merge_block(block, cands, grams, layer, params_for)
        with torch.no_grad():
            states = [[run_block(block, h, i, b) for b, h in enumerate(states[i])] for i in range(len(cands))]
        found.append(grams)
    return found

"""Exact k-th smallest magnitude over a whole model, streamed in two passes.

For non-negative float32 values the IEEE bit pattern, read as an integer, is monotonic in
the value. Pass 1 counts the high 16 bits of every |x| (65,536 bins) and finds the bin that
holds the k-th smallest; pass 2 counts the low 16 bits of the entries in that bin. The
result is the exact float32 value, with memory bounded by two histograms per model, never
by model size. Used for whole-model trims (TIES ``trim_scope: model``, DRM's non-linear
trim), where the threshold is a statistic over all tensors of a model.
"""

from __future__ import annotations

import torch

__all__ = ["StreamingKth"]

_BINS = 1 << 16


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.detach().abs().to(torch.float32).reshape(-1).cpu().view(torch.int32).to(torch.int64)


class StreamingKth:
    """Feed every chunk once with ``count_high``, call ``settle_high(k)``, feed every chunk
    again with ``count_low``, then ``value()`` is the k-th smallest |x| (1-based)."""

    def __init__(self) -> None:
        self.high = torch.zeros(_BINS, dtype=torch.int64)
        self.low = torch.zeros(_BINS, dtype=torch.int64)
        self.total = 0
        self._bin: int | None = None
        self._rank_in_bin = 0

    def count_high(self, x: torch.Tensor) -> None:
        bits = _bits(x)
        self.high += torch.bincount(bits >> 16, minlength=_BINS)
        self.total += bits.numel()

    def settle_high(self, k: int) -> None:
        if not 1 <= k <= self.total:
            raise ValueError(f"k={k} outside 1..{self.total}")
        cumulative = torch.cumsum(self.high, 0)
        b = int(torch.searchsorted(cumulative, torch.tensor(k)).item())
        self._bin = b
        self._rank_in_bin = k - (int(cumulative[b - 1]) if b > 0 else 0)

    def count_low(self, x: torch.Tensor) -> None:
        bits = _bits(x)
        in_bin = bits[(bits >> 16) == self._bin]
        self.low += torch.bincount(in_bin & 0xFFFF, minlength=_BINS)

    def value(self) -> float:
        cumulative = torch.cumsum(self.low, 0)
        lo = int(torch.searchsorted(cumulative, torch.tensor(self._rank_in_bin)).item())
        pattern = torch.tensor([(self._bin << 16) | lo], dtype=torch.int64).to(torch.int32)
        return float(pattern.view(torch.float32).item())

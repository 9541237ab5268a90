"""Exact k-th smallest magnitude over a whole model, streamed (radix select).

For non-negative IEEE floats the bit pattern, read as an integer, is monotonic in the value.
Each pass counts one 16-bit digit of every |x| whose higher digits match the prefix found so
far (65,536 bins) and fixes that digit of the k-th smallest. float32 needs 2 passes, float64
4; memory is one histogram per model, never model size. Used for whole-model trims (TIES
``trim_scope: model``, DRM's non-linear trim), where the threshold is a statistic over all
tensors of a model.
"""

from __future__ import annotations

import torch

__all__ = ["StreamingKth"]

_DIGIT = 16
_BINS = 1 << _DIGIT


class StreamingKth:
    """Usage: ``while not s.done: for x in chunks: s.feed(x); s.settle(k)``; then ``s.value``.

    Args:
        dtype: float32 or float64: the precision the magnitudes are compared in.
    """

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        self.dtype = torch.float64 if dtype == torch.float64 else torch.float32
        self.width = 64 if self.dtype == torch.float64 else 32
        self._int = torch.int64 if self.width == 64 else torch.int32
        self.prefix = 0  # the digits fixed so far, as an integer
        self.fixed = 0  # how many bits are fixed
        self.rank = 0  # the rank still sought among entries matching the prefix (1-based)
        self.total = 0  # entries seen in the first pass
        self._hist = torch.zeros(_BINS, dtype=torch.int64)

    @property
    def done(self) -> bool:
        return self.fixed == self.width

    def _bits(self, x: torch.Tensor) -> torch.Tensor:
        bits = x.detach().abs().to(self.dtype).reshape(-1).cpu().view(self._int).to(torch.int64)
        return bits & 0xFFFFFFFF if self.width == 32 else bits  # non-negative: the sign bit is 0

    def feed(self, x: torch.Tensor) -> None:
        """Count the current digit of the entries of ``x`` that match the fixed prefix."""
        bits = self._bits(x)
        if self.fixed == 0:
            self.total += bits.numel()
        else:
            bits = bits[(bits >> (self.width - self.fixed)) == self.prefix]
        shift = self.width - self.fixed - _DIGIT
        self._hist += torch.bincount((bits >> shift) & (_BINS - 1), minlength=_BINS)

    def settle(self, k: int | None = None) -> None:
        """Fix the current digit (``k``, 1-based, is given once, after the first pass)."""
        if self.fixed == 0:
            if k is None or not 1 <= k <= self.total:
                raise ValueError(f"k={k} outside 1..{self.total}")
            self.rank = k
        cumulative = torch.cumsum(self._hist, 0)
        digit = int(torch.searchsorted(cumulative, torch.tensor(self.rank)).item())
        self.rank -= int(cumulative[digit - 1]) if digit > 0 else 0
        self.prefix = (self.prefix << _DIGIT) | digit
        self.fixed += _DIGIT
        self._hist.zero_()

    @property
    def value(self) -> float:
        """The k-th smallest magnitude (exact in ``dtype``)."""
        if not self.done:
            raise RuntimeError("value is known only after every pass")
        pattern = self.prefix if self.width == 64 or self.prefix < (1 << 31) else self.prefix - (1 << 32)
        return float(torch.tensor([pattern], dtype=torch.int64).to(self._int).view(self.dtype).item())

"""Whole-model trim thresholds: the first pass of methods that declare a ``GlobalTrim``.

Per model, the ``kth_smallest(N)``-th smallest |delta| over the tensors of the declared kinds,
found exactly by a streamed radix select (``kernels.global_kth``); shared by the one-shot
merge and the pipeline stages.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

from merging.kernels.global_kth import StreamingKth
from merging.spec import MethodSpec

__all__ = ["global_thresholds"]

log = logging.getLogger(__name__)


def global_thresholds(
    spec: MethodSpec,
    params,
    model_params: Sequence,
    entries: Sequence,
    deltas_of: Callable[[object], torch.Tensor],
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[torch.Tensor | None, frozenset]:
    """(per-model thresholds or None, the tensor kinds they apply to).

    Args:
        spec / params / model_params: the method and its resolved parameters.
        entries: the plan entries (with ``name`` and ``kind``) merged by the method.
        deltas_of: reads the (T, ...) deltas of an entry; called once per pass.
    """
    trim = spec.global_trim(params) if spec.global_trim is not None else None
    members = [e for e in entries if trim is not None and e.kind in trim.kinds]
    if trim is None or not members:
        return None, frozenset()
    counters = [StreamingKth(dtype) for _ in model_params]
    ks: list[int] = []
    while True:
        for entry in members:
            deltas = deltas_of(entry)
            for t, counter in enumerate(counters):
                if not ks or ks[t] > 0:
                    counter.feed(deltas[t])
        if not ks:
            ks = [trim.kth_smallest(c.total, model_params[t]) if c.total else 0 for t, c in enumerate(counters)]
            if not any(k > 0 for k in ks):
                break
        for t, counter in enumerate(counters):
            if ks[t] > 0:
                counter.settle(ks[t] if counter.fixed == 0 else None)
        if all(c.done for k, c in zip(ks, counters) if k > 0):
            break
    values = [c.value if k > 0 else 0.0 for k, c in zip(ks, counters)]
    log.info("whole-model trim thresholds: %s", ", ".join(f"{v:.3g}" for v in values))
    return torch.tensor(values, dtype=dtype, device=device), trim.kinds

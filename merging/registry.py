"""The method registry: one table, name -> MethodSpec. Duplicate names are rejected."""

from __future__ import annotations

import difflib

from merging.errors import UnknownMethodError
from merging.methods import (
    arcee_fusion,
    breadcrumbs,
    circuit,
    dare,
    della,
    drm,
    fisher,
    iso,
    karcher,
    linear,
    model_stock,
    multislerp,
    nearswap,
    passthrough,
    ram,
    ramplus_tl,
    regmean,
    scale_svd,
    sce,
    slerp,
    tall,
    task_arithmetic,
    ties,
    tsv_m,
)
from merging.spec import MethodSpec

__all__ = ["METHODS", "get_method", "method_names"]

_SPECS: tuple[MethodSpec, ...] = (
    linear.SPEC,
    task_arithmetic.SPEC,
    ties.SPEC,
    dare.LINEAR_SPEC,
    dare.TIES_SPEC,
    breadcrumbs.LINEAR_SPEC,
    breadcrumbs.TIES_SPEC,
    della.TIES_SPEC,
    della.LINEAR_SPEC,
    slerp.SLERP_SPEC,
    slerp.NUSLERP_SPEC,
    model_stock.SPEC,
    multislerp.SPEC,
    karcher.SPEC,
    sce.SPEC,
    nearswap.SPEC,
    arcee_fusion.SPEC,
    ram.SPEC,
    ramplus_tl.SPEC,
    passthrough.SPEC,
    circuit.SPEC,
    drm.SPEC,
    tsv_m.SPEC,
    iso.ISO_C_SPEC,
    iso.ISO_CTS_SPEC,
    tall.CONSENSUS_SPEC,
    tall.TALL_SPEC,
    scale_svd.SPEC,
    regmean.SPEC,
    regmean.PLUSPLUS_SPEC,
    fisher.SPEC,
)


def _build(specs: tuple[MethodSpec, ...]) -> dict[str, MethodSpec]:
    table: dict[str, MethodSpec] = {}
    for spec in specs:
        if spec.name in table:
            raise ValueError(f"merge method {spec.name!r} is registered twice")
        table[spec.name] = spec
    return table


METHODS: dict[str, MethodSpec] = _build(_SPECS)


def method_names() -> list[str]:
    """Registered method names, sorted."""
    return sorted(METHODS)


def get_method(name: str) -> MethodSpec:
    """Look up a method; an unknown name lists the known ones and the closest match."""
    try:
        return METHODS[name]
    except KeyError:
        close = difflib.get_close_matches(name, METHODS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UnknownMethodError(
            f"unknown merge method {name!r}.{hint} Known methods: {', '.join(method_names())}"
        ) from None

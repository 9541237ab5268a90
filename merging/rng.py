"""Per-tensor random generators.

Every random draw of a method comes from a CPU ``torch.Generator`` seeded by a hash of
(seed, tensor name, stream). The same tensor therefore gets the same mask whatever the
order in which tensors are processed, the device the math runs on, or the shard layout;
draws are made on the CPU and moved to the compute device afterwards.
"""

from __future__ import annotations

import hashlib

import torch

__all__ = ["generator_for", "uniform"]


def generator_for(seed: int, tensor_name: str, stream: str = "") -> torch.Generator:
    """A CPU generator seeded deterministically from ``(seed, tensor_name, stream)``."""
    digest = hashlib.sha256(f"{seed}\x00{tensor_name}\x00{stream}".encode()).digest()
    generator = torch.Generator(device="cpu")
    generator.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return generator


def uniform(shape: torch.Size | tuple[int, ...], generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """U[0, 1) samples drawn on the CPU in float32, returned on ``like``'s device and dtype."""
    draws = torch.rand(tuple(shape), generator=generator, dtype=torch.float32)
    return draws.to(device=like.device, dtype=like.dtype)

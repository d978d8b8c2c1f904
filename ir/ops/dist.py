"""`dist.*`: collectives inserted by tensor-parallel sharding. Their references run through
torch.distributed when a process group is up and are the identity on a single process."""

from __future__ import annotations

import torch
import torch.distributed as torch_dist

from ..registry import OpError, op
from ..types import TensorType, dim_mul
from .infer import normalize_axis

_REDUCE_OPS = {"sum": "SUM", "max": "MAX", "min": "MIN"}


def _world_size() -> int:
    return torch_dist.get_world_size() if torch_dist.is_available() and torch_dist.is_initialized() else 1


def _all_reduce(x: TensorType, *, reduce: str) -> TensorType:
    if reduce not in _REDUCE_OPS:
        raise OpError(f"reduce must be one of {', '.join(_REDUCE_OPS)}, got {reduce!r}")
    return x


@op("dist.all_reduce", infer=_all_reduce, side_effects=True)
def all_reduce(x, *, reduce: str = "sum"):
    """Combine partial results of row-parallel layers across ranks."""
    y = x.clone(memory_format=torch.contiguous_format)  # collectives take dense tensors
    if _world_size() > 1:
        torch_dist.all_reduce(y, op=getattr(torch_dist.ReduceOp, _REDUCE_OPS[reduce]))
    return y


def _all_gather(x: TensorType, *, dim: int, world_size: int) -> TensorType:
    if world_size < 1:
        raise OpError(f"world_size must be positive, got {world_size}")
    d = normalize_axis(dim, x.rank)
    return x.with_shape([dim_mul(s, world_size) if i == d else s for i, s in enumerate(x.shape)])


@op("dist.all_gather", infer=_all_gather, side_effects=True)
def all_gather(x, *, dim: int, world_size: int):
    """Concatenate every rank's shard along `dim` (vocab-parallel logits)."""
    if _world_size() != world_size:
        raise RuntimeError(f"dist.all_gather expects {world_size} ranks but the process group has "
                           f"{_world_size()}; launch the graph with that many ranks")
    if world_size == 1:
        return x.clone()
    parts = [torch.empty_like(x) for _ in range(world_size)]
    torch_dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=dim)

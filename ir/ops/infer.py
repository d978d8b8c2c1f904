"""Shape and dtype rules shared by op declarations. They raise OpError with a message that says
which operand is wrong and why; the registry prefixes the op name."""

from __future__ import annotations

from typing import Sequence

from ..registry import OpError
from ..types import DType, Dim, TensorType, dim_div, dim_product


def normalize_axis(axis: int, rank: int, what: str = "dim") -> int:
    if not -rank <= axis < max(rank, 1):
        raise OpError(f"{what} {axis} is out of range for rank {rank}")
    return axis % rank if rank else 0


def same_dtype(*types: TensorType) -> DType:
    dtypes = {t.dtype for t in types}
    if len(dtypes) != 1:
        raise OpError("operands must have one dtype, got " + ", ".join(str(t) for t in types)
                      + " (insert core.cast)")
    return types[0].dtype


def broadcast_shapes(*shapes: Sequence[Dim]) -> tuple[Dim, ...]:
    """Numpy broadcasting; two different symbols are not assumed equal."""
    rank = max(len(s) for s in shapes)
    out: list[Dim] = []
    for i in range(rank):
        dims = {s[i - rank + len(s)] for s in shapes if i - rank + len(s) >= 0}
        dims.discard(1)
        if len(dims) > 1:
            raise OpError("shapes " + " and ".join("[" + ",".join(map(str, s)) + "]" for s in shapes)
                          + " do not broadcast")
        out.append(dims.pop() if dims else 1)
    return tuple(out)


def elementwise(*types: TensorType) -> TensorType:
    """Same dtype, broadcast shapes."""
    return TensorType(same_dtype(*types), broadcast_shapes(*(t.shape for t in types)))


def compare(a: TensorType, b: TensorType) -> TensorType:
    same_dtype(a, b)
    return TensorType(DType.bool, broadcast_shapes(a.shape, b.shape))


def same_as_first(x: TensorType, *_, **__) -> TensorType:
    return x


def reshape(shape: Sequence[Dim], x: TensorType) -> tuple[Dim, ...]:
    """Resolve a target shape with at most one -1 against x's element count."""
    holes = [i for i, d in enumerate(shape) if d == -1]
    if len(holes) > 1 or any(isinstance(d, int) and d < -1 for d in shape):
        raise OpError(f"shape {list(shape)} may hold a single -1 and no other negative dim")
    total = dim_product(x.shape)
    if holes:
        known = dim_product([d for d in shape if d != -1])
        try:
            missing = dim_div(total, known)
        except ValueError:
            raise OpError(f"cannot reshape {x} to {list(shape)}: {total} elements do not divide by {known}") from None
        return tuple(missing if d == -1 else d for d in shape)
    if dim_product(shape) != total:
        raise OpError(f"cannot reshape {x} to [{','.join(map(str, shape))}]: element counts differ "
                      f"({total} vs {dim_product(shape)})")
    return tuple(shape)

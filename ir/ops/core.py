"""`core.*`: the tensor algebra every frontend lowers to. Binary ops take operands of one dtype
(frontends insert `core.cast` where torch would promote) and broadcast like numpy."""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

from ..registry import Ints, OpError, Scalar, Shape, Trait, define, op
from ..types import DType, Dim, TensorType, dim_add, dim_div, dim_sub
from .infer import broadcast_shapes, compare, elementwise, normalize_axis, reshape, same_as_first, same_dtype

EW = Trait.ELEMENTWISE
VIEW = Trait.SHAPE_ONLY

# --- elementwise ------------------------------------------------------------------------------

_BINARY = {
    "add": (torch.add, EW | Trait.COMMUTATIVE),
    "mul": (torch.mul, EW | Trait.COMMUTATIVE),
    "sub": (torch.sub, EW),
    "div": (torch.div, EW),
    "pow": (torch.pow, EW),
    "maximum": (torch.maximum, EW | Trait.COMMUTATIVE),
    "minimum": (torch.minimum, EW | Trait.COMMUTATIVE),
}
_COMPARE = {
    "eq": (torch.eq, EW | Trait.COMMUTATIVE), "ne": (torch.ne, EW | Trait.COMMUTATIVE),
    "lt": (torch.lt, EW), "le": (torch.le, EW), "gt": (torch.gt, EW), "ge": (torch.ge, EW),
    "logical_and": (torch.logical_and, EW | Trait.COMMUTATIVE),
    "logical_or": (torch.logical_or, EW | Trait.COMMUTATIVE),
}
_UNARY = {
    "neg": torch.neg, "abs": torch.abs, "exp": torch.exp, "log": torch.log, "sqrt": torch.sqrt,
    "rsqrt": torch.rsqrt, "reciprocal": torch.reciprocal, "tanh": torch.tanh, "sigmoid": torch.sigmoid,
    "silu": F.silu, "relu": F.relu, "erf": torch.erf, "sin": torch.sin, "cos": torch.cos,
    "floor": torch.floor, "round": torch.round, "logical_not": torch.logical_not,
}


def _binary(fn):
    def reference(lhs, rhs):
        return fn(lhs, rhs)
    return reference


def _unary(fn):
    def reference(x):
        return fn(x)
    return reference


def _float_only(x: TensorType, **_) -> TensorType:
    if not x.dtype.is_float:
        raise OpError(f"operand must be a float tensor, got {x}")
    return x


def _float_elementwise(*types: TensorType) -> TensorType:
    return _float_only(elementwise(*types))


# torch computes these in floating point: on integer tensors it returns floats (or refuses),
# so they take float operands only; logical_not returns bool whatever it is given.
_FLOAT_ONLY = {"div", "exp", "log", "sqrt", "rsqrt", "reciprocal", "tanh", "sigmoid", "silu", "erf", "sin", "cos"}

for _name, (_fn, _traits) in _BINARY.items():
    define(f"core.{_name}", _binary(_fn), _float_elementwise if _name in _FLOAT_ONLY else elementwise,
           traits=_traits)
for _name, (_fn, _traits) in _COMPARE.items():
    define(f"core.{_name}", _binary(_fn), compare, traits=_traits)
for _name, _fn in _UNARY.items():
    define(f"core.{_name}", _unary(_fn),
           _float_only if _name in _FLOAT_ONLY else
           (lambda x: x.with_dtype(DType.bool)) if _name == "logical_not" else same_as_first, traits=EW)


@op("core.gelu", infer=_float_only, traits=EW)
def gelu(x, *, approximate: str = "none"):
    """GELU, exact (erf) or with the tanh approximation of GPT-2-style models."""
    return F.gelu(x, approximate=approximate)


@op("core.clamp", infer=_float_only, traits=EW)
def clamp(x, *, min: float | None = None, max: float | None = None):
    """Saturation, used by quantization's reference semantics."""
    return torch.clamp(x, min=min, max=max)


@op("core.cast", infer=lambda x, *, dtype: x.with_dtype(dtype), traits=EW)
def cast(x, *, dtype: DType):
    """Change the element type; explicit so that every promotion is visible in the IR."""
    return x.to(dtype.torch)


def _where(cond: TensorType, a: TensorType, b: TensorType) -> TensorType:
    if cond.dtype is not DType.bool:
        raise OpError(f"condition must be bool, got {cond}")
    return TensorType(same_dtype(a, b), broadcast_shapes(cond.shape, a.shape, b.shape))


@op("core.where", infer=_where, traits=EW)
def where(cond, a, b):
    """Select a where cond else b (masks)."""
    return torch.where(cond, a, b)


# --- constants and index generators -----------------------------------------------------------

def _free(operands, results, attrs, bindings) -> tuple[int, int]:
    return 0, 0


@op("core.constant", infer=lambda *, value, dtype, shape: TensorType(dtype, shape), cost=_free)
def constant(*, value: Scalar, dtype: DType, shape: Shape = ()):
    """A splat: every element holds `value`; larger data lives in parameters."""
    return torch.full(shape, value, dtype=dtype.torch)


def _arange(*, end: Dim, start: int, step: int, dtype: DType) -> TensorType:
    if step <= 0:
        raise OpError(f"step must be positive, got {step}")
    if isinstance(end, int):
        length: Dim = max(0, (end - start + step - 1) // step)
    else:
        length = dim_sub(end, start) if step == 1 else dim_div(dim_add(dim_sub(end, start), step - 1), step)
    return TensorType(dtype, (length,))


@op("core.arange", infer=_arange)
def arange(*, end: Dim, start: int = 0, step: int = 1, dtype: DType = DType.i64):
    """Positions and index ramps of a symbolic length."""
    return torch.arange(start, end, step, dtype=dtype.torch)


# --- shape ops --------------------------------------------------------------------------------

@op("core.reshape", infer=lambda x, *, shape: x.with_shape(reshape(shape, x)), traits=VIEW)
def reshape_(x, *, shape: Shape):
    """Change the shape, keeping row-major element order; one -1 is inferred."""
    return x.reshape(shape)


def _permute(x: TensorType, *, dims: Sequence[int]) -> TensorType:
    if sorted(dims) != list(range(x.rank)):
        raise OpError(f"dims {list(dims)} is not a permutation of 0..{x.rank - 1} for {x}")
    return x.with_shape([x.shape[d] for d in dims])


@op("core.permute", infer=_permute, traits=VIEW)
def permute(x, *, dims: Ints):
    """Reorder axes; transposes of every spelling become this."""
    return x.permute(dims)


def _expand(x: TensorType, *, shape: Sequence[Dim]) -> TensorType:
    if len(shape) < x.rank:
        raise OpError(f"cannot expand {x} to fewer dims {list(shape)}")
    lead = len(shape) - x.rank
    out = list(shape[:lead])
    for d, s in zip(x.shape, shape[lead:]):
        if s == -1:
            out.append(d)
        elif d == s or d == 1:
            out.append(s)
        else:
            raise OpError(f"cannot expand {x} to [{','.join(map(str, shape))}]: dim {d} is not 1 or {s}")
    if any(d == -1 for d in shape[:lead]):
        raise OpError("-1 is only allowed for existing dims of expand")
    return x.with_shape(out)


@op("core.expand", infer=_expand, traits=VIEW)
def expand(x, *, shape: Shape):
    """Broadcast size-1 dims (and new leading dims) to `shape`; -1 keeps a dim."""
    return x.expand(shape)


def _slice(x: TensorType, *, dim: int, start: Dim, end: Dim | None, step: int) -> TensorType:
    d = normalize_axis(dim, x.rank)
    size = x.shape[d]
    if step <= 0:
        raise OpError(f"step must be positive, got {step}")

    def clip(i: Dim) -> Dim:
        if isinstance(i, int) and i >= 2**31:  # "to the end", as exporters spell it
            return size
        if isinstance(i, int) and i < 0:
            i = dim_add(size, i)
            return max(i, 0) if isinstance(i, int) else i
        return min(i, size) if isinstance(i, int) and isinstance(size, int) else i

    lo, hi = clip(start), size if end is None else clip(end)
    if isinstance(lo, int) and isinstance(hi, int):
        length = max(0, (hi - lo + step - 1) // step)
    else:
        length = dim_sub(hi, lo) if step == 1 else dim_div(dim_add(dim_sub(hi, lo), step - 1), step)
        if isinstance(length, int):  # T-2 to T-3: the symbols cancel, an empty range
            length = max(0, length)
    shape = list(x.shape)
    shape[d] = length
    return x.with_shape(shape)


@op("core.slice", infer=_slice, traits=VIEW)
def slice_(x, *, dim: int, start: Dim = 0, end: Dim | None = None, step: int = 1):
    """A strided range of one axis; negative bounds count from the end, `end` is clamped."""
    index = [slice(None)] * x.dim()
    index[dim] = slice(start, end, step)
    return x[tuple(index)]


def _concat(*xs: TensorType, dim: int) -> TensorType:
    if not xs:
        raise OpError("needs at least one operand")
    dtype = same_dtype(*xs)
    rank = xs[0].rank
    d = normalize_axis(dim, rank)
    for x in xs[1:]:
        if x.rank != rank or any(a != b for i, (a, b) in enumerate(zip(x.shape, xs[0].shape)) if i != d):
            raise OpError(f"operands {', '.join(map(str, xs))} differ outside dim {d}")
    total: Dim = 0
    for x in xs:
        total = dim_add(total, x.shape[d])
    shape = list(xs[0].shape)
    shape[d] = total
    return TensorType(dtype, shape)


@op("core.concat", infer=_concat)
def concat(*xs, dim: int):
    """Join tensors along one axis."""
    return torch.cat(xs, dim=dim)


def _gather(x: TensorType, indices: TensorType, *, dim: int) -> TensorType:
    if indices.dtype not in (DType.i64, DType.i32):
        raise OpError(f"indices must be i64 or i32, got {indices}")
    d = normalize_axis(dim, x.rank)
    return x.with_shape([*x.shape[:d], *indices.shape, *x.shape[d + 1:]])


@op("core.gather", infer=_gather)
def gather(x, indices, *, dim: int):
    """Take slices of x at `indices` along `dim` (ONNX Gather): rows of logits, table lookups."""
    d = dim % x.dim()
    out = torch.index_select(x, d, indices.reshape(-1).long())
    return out.reshape(*x.shape[:d], *indices.shape, *x.shape[d + 1:])


# --- contractions and reductions --------------------------------------------------------------

def _matmul(a: TensorType, b: TensorType) -> TensorType:
    dtype = same_dtype(a, b)
    if a.rank < 2 or b.rank < 2:
        raise OpError(f"operands need rank >= 2, got {a} and {b} (reshape vectors first)")
    if a.shape[-1] != b.shape[-2]:
        raise OpError(f"contracted dims differ: {a} @ {b}")
    batch = broadcast_shapes(a.shape[:-2], b.shape[:-2])
    return TensorType(dtype, (*batch, a.shape[-2], b.shape[-1]))


def _matmul_cost(operands: Sequence[TensorType], results: Sequence[TensorType], attrs: Mapping,
                 bindings: Mapping[str, int]) -> tuple[int, int]:
    a, b = operands
    out = results[0]
    k = TensorType(a.dtype, a.shape[-1:]).numel(bindings)
    return 2 * out.numel(bindings) * k, sum(t.nbytes(bindings) for t in (a, b, out))


@op("core.matmul", infer=_matmul, cost=_matmul_cost)
def matmul(a, b):
    """Batched matrix product with broadcast batch dims (torch.matmul for rank >= 2)."""
    return torch.matmul(a, b)


def _reduce(x: TensorType, *, dims: Sequence[int], keepdim: bool) -> TensorType:
    axes = {normalize_axis(d, x.rank) for d in dims} if dims else set(range(x.rank))
    shape = [1 if i in axes else s for i, s in enumerate(x.shape) if keepdim or i not in axes]
    return x.with_shape(shape)


def _reduction(fn):
    def reference(x, *, dims: Ints = (), keepdim: bool = False):
        # torch.sum widens integers to int64; the IR keeps the operand's dtype
        return fn(x, dim=tuple(dims) if dims else tuple(range(x.dim())), keepdim=keepdim).to(x.dtype)
    return reference


for _name, _fn in {"sum": torch.sum, "mean": torch.mean, "amax": torch.amax, "amin": torch.amin}.items():
    define(f"core.{_name}", _reduction(_fn),
           (lambda x, **attrs: _reduce(_float_only(x), **attrs)) if _name == "mean" else _reduce)


def _argmax(x: TensorType, *, dim: int, keepdim: bool) -> TensorType:
    return _reduce(x, dims=(dim,), keepdim=keepdim).with_dtype(DType.i64)


@op("core.argmax", infer=_argmax)
def argmax(x, *, dim: int, keepdim: bool = False):
    """Index of the largest element (greedy decoding)."""
    return torch.argmax(x, dim=dim, keepdim=keepdim)


def _softmax(x: TensorType, *, dim: int) -> TensorType:
    normalize_axis(dim, x.rank)
    return _float_only(x)


@op("core.softmax", infer=_softmax)
def softmax(x, *, dim: int):
    """Softmax computed in f32 and returned in x's dtype."""
    return torch.softmax(x.float(), dim=dim).to(x.dtype)


@op("core.log_softmax", infer=_softmax)
def log_softmax(x, *, dim: int):
    """Log-softmax computed in f32 and returned in x's dtype (logprobs)."""
    return torch.log_softmax(x.float(), dim=dim).to(x.dtype)


del _name, _fn, _traits


# --- ops first needed by the ONNX frontend ---------------------------------------------------

@op("core.dims", infer=lambda *, dims, dtype: TensorType(dtype, (len(dims),)), cost=_free)
def dims_(*, dims: Shape, dtype: DType = DType.i64):
    """(Symbolic) dims as a 1-D tensor, for shape arithmetic that reaches data (ONNX Shape -> Mul -> Range)."""
    return torch.tensor(dims, dtype=dtype.torch)


@op("core.isnan", infer=lambda x: _float_only(x).with_dtype(DType.bool), traits=EW)
def isnan(x):
    """NaN test: the guard exporters put after a softmax over fully masked rows."""
    return torch.isnan(x)


def _matrix(x: TensorType, *, k: int) -> TensorType:
    if x.rank < 2:
        raise OpError(f"operand must have rank >= 2, got {x}")
    return x


@op("core.tril", infer=_matrix)
def tril(x, *, k: int = 0):
    """Zero (False) above diagonal k of the last two dims: causal masks built from ones."""
    return torch.tril(x, k)


@op("core.triu", infer=_matrix)
def triu(x, *, k: int = 0):
    """Zero (False) below diagonal k of the last two dims."""
    return torch.triu(x, k)


def _cumsum(x: TensorType, *, dim: int) -> TensorType:
    normalize_axis(dim, x.rank)
    if x.dtype is DType.bool:
        raise OpError(f"operand must be numeric, got {x} (cast it first)")
    return x


@op("core.cumsum", infer=_cumsum)
def cumsum(x, *, dim: int):
    """Running sum along one axis (sequence ids of packed inputs, positions from a mask)."""
    return torch.cumsum(x, dim).to(x.dtype)


def _wrap(indices, sizes):
    """Negative indices count from the end, as in ONNX."""
    return torch.where(indices < 0, indices + sizes, indices)


def _gather_elements(x: TensorType, indices: TensorType, *, dim: int) -> TensorType:
    if indices.dtype not in (DType.i64, DType.i32) or indices.rank != x.rank:
        raise OpError(f"indices must be i64 or i32 of the rank of {x}, got {indices}")
    normalize_axis(dim, x.rank)
    return x.with_shape(indices.shape)


@op("core.gather_elements", infer=_gather_elements)
def gather_elements(x, indices, *, dim: int):
    """out[i][j] = x[indices[i][j]][j] along `dim` (torch.gather, ONNX GatherElements)."""
    return torch.gather(x, dim, _wrap(indices.long(), x.shape[dim]))


def _gather_nd(x: TensorType, indices: TensorType) -> TensorType:
    if indices.dtype not in (DType.i64, DType.i32) or indices.rank < 1:
        raise OpError(f"indices must be i64 or i32 of rank >= 1, got {indices}")
    k = indices.shape[-1]
    if not isinstance(k, int) or not 1 <= k <= x.rank:
        raise OpError(f"the last dim of indices {indices} must be a constant in 1..{x.rank}")
    return x.with_shape((*indices.shape[:-1], *x.shape[k:]))


@op("core.gather_nd", infer=_gather_nd)
def gather_nd(x, indices):
    """x[indices[..., 0], ..., indices[..., k-1]] (ONNX GatherND, batch_dims=0): padding masks."""
    k = indices.shape[-1]
    idx = _wrap(indices.long(), torch.tensor(x.shape[:k], device=indices.device))
    return x[tuple(idx.unbind(-1))]

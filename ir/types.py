"""Element types, symbolic dimensions and tensor types of the IR."""

from __future__ import annotations

import enum
import functools
import math
import re
from dataclasses import dataclass
from typing import Mapping, Sequence, Union

import sympy
import torch

Dim = Union[int, str]
"""A dimension: a non-negative int, or a symbolic expression in canonical text form ("T", "2*T")."""


class DType(enum.Enum):
    """The element types of the IR; values are the names used in the text format."""

    f32 = "f32"
    f16 = "f16"
    bf16 = "bf16"
    f8e4m3 = "f8e4m3"
    f8e5m2 = "f8e5m2"
    i64 = "i64"
    i32 = "i32"
    i8 = "i8"
    u8 = "u8"
    i4 = "i4"
    bool = "bool"

    def __repr__(self) -> str:
        return f"DType.{self.value}"

    def __str__(self) -> str:
        return self.value

    @property
    def bits(self) -> int:
        return _BITS[self]

    @property
    def is_float(self) -> bool:
        return self in (DType.f32, DType.f16, DType.bf16, DType.f8e4m3, DType.f8e5m2)

    @property
    def is_int(self) -> bool:
        return self in (DType.i64, DType.i32, DType.i8, DType.u8, DType.i4)

    @property
    def torch(self) -> torch.dtype:
        """The torch dtype of this type's values while a graph runs. i4 values are held
        unpacked, one per int8; in storage (safetensors, artifacts) they are packed two per byte."""
        return _TO_TORCH[self]

    @staticmethod
    def from_torch(dtype: torch.dtype) -> "DType":
        try:
            return _FROM_TORCH[dtype]
        except KeyError:
            known = ", ".join(str(d) for d in _FROM_TORCH)
            raise TypeError(f"torch dtype {dtype} has no IR element type; supported: {known}") from None

    @staticmethod
    def parse(name: str) -> "DType":
        try:
            return DType(name)
        except ValueError:
            known = " ".join(d.value for d in DType)
            raise ValueError(f"unknown dtype {name!r}; known dtypes: {known}") from None


_BITS = {
    DType.f32: 32, DType.f16: 16, DType.bf16: 16, DType.f8e4m3: 8, DType.f8e5m2: 8,
    DType.i64: 64, DType.i32: 32, DType.i8: 8, DType.u8: 8, DType.i4: 4, DType.bool: 8,
}
_TO_TORCH = {
    DType.f32: torch.float32, DType.f16: torch.float16, DType.bf16: torch.bfloat16,
    DType.f8e4m3: torch.float8_e4m3fn, DType.f8e5m2: torch.float8_e5m2,
    DType.i64: torch.int64, DType.i32: torch.int32, DType.i8: torch.int8, DType.u8: torch.uint8,
    DType.i4: torch.int8, DType.bool: torch.bool,
}
_FROM_TORCH = {t: d for d, t in _TO_TORCH.items() if d is not DType.i4}

DTYPE_NAMES = frozenset(d.value for d in DType)

# ----------------------------------------------------------------------------------------------
# Symbolic dimensions. A symbolic dim is kept as canonical text (sympy's printing of the
# expression, without spaces) so that types stay hashable, comparable and printable as-is.

_SYMBOL_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


@functools.lru_cache(maxsize=4096)
def _to_expr(dim: Dim) -> sympy.Expr:
    if isinstance(dim, int):
        return sympy.Integer(dim)
    return sympy.sympify(dim, locals={name: sympy.Symbol(name, integer=True, nonnegative=True)
                                      for name in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", dim)})


def _from_expr(expr: sympy.Expr) -> Dim:
    if expr.is_Integer:
        return int(expr)
    return str(expr).replace(" ", "")


def canonical_dim(dim: Dim) -> Dim:
    """Normalise a dim: ints stay, expressions are re-printed canonically ("T*2" -> "2*T")."""
    if isinstance(dim, bool):
        raise TypeError(f"a dimension cannot be a bool ({dim!r})")
    if isinstance(dim, int):
        if dim < 0:
            raise ValueError(f"dimension {dim} is negative")
        return dim
    if isinstance(dim, str):
        if _SYMBOL_RE.match(dim):
            if dim in DTYPE_NAMES or dim in ("true", "false", "none", "inf", "nan"):
                raise ValueError(f"{dim!r} is a reserved word and cannot name a symbolic dimension")
            return dim
        try:
            expr = _to_expr(dim)
        except (sympy.SympifyError, SyntaxError, TypeError) as e:
            raise ValueError(f"malformed symbolic dimension {dim!r}") from e
        if expr.is_number and not (expr.is_Integer and expr >= 0):
            raise ValueError(f"dimension {dim!r} is not a non-negative integer")
        return _from_expr(expr)
    raise TypeError(f"a dimension must be an int or a symbol string, got {type(dim).__name__}")


def dim_symbols(dim: Dim) -> set[str]:
    return set() if isinstance(dim, int) else {s.name for s in _to_expr(dim).free_symbols}


def dim_add(a: Dim, b: Dim) -> Dim:
    if isinstance(a, int) and isinstance(b, int):
        return a + b
    return _from_expr(_to_expr(a) + _to_expr(b))


def dim_sub(a: Dim, b: Dim) -> Dim:
    if isinstance(a, int) and isinstance(b, int):
        return a - b
    return _from_expr(_to_expr(a) - _to_expr(b))


def dim_mul(a: Dim, b: Dim) -> Dim:
    if isinstance(a, int) and isinstance(b, int):
        return a * b
    return _from_expr(_to_expr(a) * _to_expr(b))


def dim_div(a: Dim, b: Dim) -> Dim:
    """Exact division; raises when the quotient is not a whole number or expression."""
    if isinstance(a, int) and isinstance(b, int):
        if b == 0 or a % b:
            raise ValueError(f"{a} is not divisible by {b}")
        return a // b
    if b == 0:
        raise ValueError(f"{a} is not divisible by {b}")
    num, den = sympy.fraction(sympy.together(sympy.cancel(_to_expr(a) / _to_expr(b))))
    if den != 1:
        raise ValueError(f"{a} is not divisible by {b}")
    q = num
    return _from_expr(q)


def dim_product(dims: Sequence[Dim]) -> Dim:
    return functools.reduce(dim_mul, dims, 1)


def eval_dim(dim: Dim, bindings: Mapping[str, int]) -> int:
    """The concrete value of a dim under symbol bindings (KeyError names a missing symbol)."""
    if isinstance(dim, int):
        return dim
    if dim in bindings:
        return bindings[dim]
    expr = _to_expr(dim)
    missing = {s.name for s in expr.free_symbols} - set(bindings)
    if missing:
        raise KeyError(f"symbolic dimension {dim!r} needs a value for {', '.join(sorted(missing))}")
    return int(expr.subs({sympy.Symbol(k, integer=True, nonnegative=True): v for k, v in bindings.items()}))


# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorType:
    """A tensor's element type and shape; printed as `bf16[T,576]` (`f32[]` for a scalar)."""

    dtype: DType
    shape: tuple[Dim, ...]

    def __init__(self, dtype: DType | str, shape: Sequence[Dim] = ()):
        object.__setattr__(self, "dtype", dtype if isinstance(dtype, DType) else DType.parse(dtype))
        object.__setattr__(self, "shape", tuple(canonical_dim(d) for d in shape))

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def is_static(self) -> bool:
        return all(isinstance(d, int) for d in self.shape)

    @property
    def symbols(self) -> set[str]:
        return set().union(*(dim_symbols(d) for d in self.shape)) if self.shape else set()

    def numel(self, bindings: Mapping[str, int] | None = None) -> int:
        return math.prod(eval_dim(d, bindings or {}) for d in self.shape)

    def nbytes(self, bindings: Mapping[str, int] | None = None) -> int:
        return (self.numel(bindings) * self.dtype.bits + 7) // 8

    def storage_shape(self) -> tuple[Dim, ...]:
        """The shape of the torch tensor that holds this type (i4: last dim halved, packed)."""
        if self.dtype is DType.i4:
            if not self.shape:
                raise ValueError("an i4 scalar cannot be stored packed")
            return (*self.shape[:-1], dim_div(self.shape[-1], 2))
        return self.shape

    def with_shape(self, shape: Sequence[Dim]) -> "TensorType":
        return TensorType(self.dtype, shape)

    def with_dtype(self, dtype: DType) -> "TensorType":
        return TensorType(dtype, self.shape)

    def __str__(self) -> str:
        return f"{self.dtype.value}[{','.join(str(d) for d in self.shape)}]"

    def __repr__(self) -> str:
        return f"TensorType({self})"

    def concrete(self, bindings: Mapping[str, int]) -> tuple[int, ...]:
        return tuple(eval_dim(d, bindings) for d in self.shape)


class _TypeFactory:
    """`f32["T", 576]` is shorthand for `TensorType(DType.f32, ("T", 576))` in builders and tests."""

    def __init__(self, dtype: DType):
        self.dtype = dtype

    def __getitem__(self, shape) -> TensorType:
        if not isinstance(shape, tuple):
            shape = (shape,)
        return TensorType(self.dtype, shape)

    def scalar(self) -> TensorType:
        return TensorType(self.dtype, ())


f32, f16, bf16 = _TypeFactory(DType.f32), _TypeFactory(DType.f16), _TypeFactory(DType.bf16)
f8e4m3, f8e5m2 = _TypeFactory(DType.f8e4m3), _TypeFactory(DType.f8e5m2)
i64, i32, i8, u8, i4 = (_TypeFactory(DType.i64), _TypeFactory(DType.i32), _TypeFactory(DType.i8),
                        _TypeFactory(DType.u8), _TypeFactory(DType.i4))
boolean = _TypeFactory(DType.bool)

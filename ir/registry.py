"""The op registry: every op is declared once, with its schema, type inference, torch reference
implementation and traits. Backends attach lowerings to op names; nothing else knows an op.

An op is declared by decorating its torch reference implementation. The signature is the
schema: positional parameters are operands (`*xs` is variadic, a `= None` default makes a
trailing operand optional), keyword-only parameters are attributes, typed by annotation:

    @op("llm.rms_norm", infer=same_as_first)
    def rms_norm(x, weight, *, eps: float = 1e-6):
        '''Root-mean-square norm of Llama-style models, computed in f32 like transformers.'''
        ...

`infer` receives the operands' `TensorType`s in the same positions and the attributes as
keywords, and returns the result type (or a tuple of types for several results).
"""

from __future__ import annotations

import enum
import inspect
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence, Union

from .types import DType, Dim, TensorType, canonical_dim


Scalar = Union[int, float, bool]
Ints = tuple[int, ...]
Shape = tuple[Dim, ...]
"""Annotation names for attributes (with Dim, DType, int, float, bool, str; `| None` for optional)."""


class Trait(enum.Flag):
    """Properties passes may rely on without knowing the op."""

    NONE = 0
    PURE = enum.auto()          # no side effects: may be removed when unused, merged by CSE, folded
    COMMUTATIVE = enum.auto()   # binary op whose two operands may be swapped
    ELEMENTWISE = enum.auto()   # result[i] depends only on operands[i] (after broadcasting)
    SHAPE_ONLY = enum.auto()    # moves or views elements without computing (reshape, permute, ...)


class OpError(ValueError):
    """A malformed op: wrong operand count, bad attribute, or operand types that do not fit."""


# ---------------------------------------------------------------------------------------------
# Attribute kinds. Each kind checks and normalises a Python value; the text format prints and
# parses the normalised form, so `float` attributes are always floats and lists are tuples.

class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()


@dataclass(frozen=True)
class AttrKind:
    name: str
    check: Callable[[Any], Any]
    optional: bool = False

    def normalise(self, value: Any) -> Any:
        if value is None:
            if self.optional:
                return None
            raise TypeError(f"expected {self.name}, got none")
        return self.check(value)


def _check_int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"expected an int, got {v!r}")
    return int(v)


def _check_float(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"expected a float, got {v!r}")
    return float(v)


def _check_bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise TypeError(f"expected a bool, got {v!r}")
    return v


def _check_str(v: Any) -> str:
    if not isinstance(v, str):
        raise TypeError(f"expected a string, got {v!r}")
    return v


def _check_dtype(v: Any) -> DType:
    if isinstance(v, DType):
        return v
    if isinstance(v, str):
        return DType.parse(v)
    raise TypeError(f"expected a dtype, got {v!r}")


def _check_ints(v: Any) -> tuple[int, ...]:
    if not isinstance(v, (list, tuple)):
        raise TypeError(f"expected a list of ints, got {v!r}")
    return tuple(_check_int(x) for x in v)


def _check_shape(v: Any) -> tuple[Dim, ...]:
    if not isinstance(v, (list, tuple)):
        raise TypeError(f"expected a shape (list of ints and symbols), got {v!r}")
    return tuple(x if isinstance(x, int) and x < 0 else canonical_dim(x) for x in v)


def _check_dim(v: Any) -> Dim:
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    if isinstance(v, str):
        return canonical_dim(v)
    raise TypeError(f"expected an int or a symbolic dim, got {v!r}")


def _check_scalar(v: Any) -> int | float | bool:
    if not isinstance(v, (int, float, bool)):
        raise TypeError(f"expected a number or bool, got {v!r}")
    return v


_BASE_KINDS = {
    "int": _check_int, "float": _check_float, "bool": _check_bool, "str": _check_str,
    "DType": _check_dtype, "Ints": _check_ints, "Shape": _check_shape, "Dim": _check_dim, "Scalar": _check_scalar,
}


_KIND_OBJECTS = {"int": int, "float": float, "bool": bool, "str": str, "DType": DType, "Ints": Ints,
                 "Shape": Shape, "Dim": Dim, "Scalar": Scalar}


def _annotation_text(annotation: Any) -> str:
    """The annotation as written: it is already text under `from __future__ import annotations`,
    else an object (`int`, `float | None`, `Dim`) that is named back here."""
    if isinstance(annotation, str):
        return annotation
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    args = typing.get_args(annotation) if union else (annotation,)
    rest = tuple(a for a in args if a is not type(None))
    base = rest[0] if len(rest) == 1 else typing.Union[rest]
    name = next((n for n, obj in _KIND_OBJECTS.items() if obj == base), repr(annotation))
    return name + (" | None" if len(rest) < len(args) else "")


def _attr_kind(annotation: Any, where: str) -> AttrKind:
    parts = [p.strip().strip("'\"") for p in _annotation_text(annotation).split("|")]
    optional = "None" in parts
    parts = [p for p in parts if p != "None"]
    if len(parts) != 1 or parts[0] not in _BASE_KINDS:
        raise TypeError(f"{where}: attribute annotation {annotation!r} is not one of "
                        f"{', '.join(_BASE_KINDS)} (optionally '| None')")
    return AttrKind(parts[0] + (" | None" if optional else ""), _BASE_KINDS[parts[0]], optional)


# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OperandSpec:
    name: str
    variadic: bool = False
    optional: bool = False


@dataclass(frozen=True)
class AttrSpec:
    name: str
    kind: AttrKind
    default: Any = REQUIRED


@dataclass(frozen=True)
class OpDef:
    """The declaration of one op. `reference` is the numerics oracle for tests and the
    reference backend; `cost` estimates (flops, bytes moved) for `irdump --stats`."""

    name: str
    operands: tuple[OperandSpec, ...]
    attrs: Mapping[str, AttrSpec]
    infer: Callable[..., TensorType | tuple[TensorType, ...]]
    reference: Callable[..., Any]
    traits: Trait = Trait.PURE
    num_results: int = 1
    cost: "Cost | None" = None
    doc: str = ""

    @property
    def dialect(self) -> str:
        return self.name.split(".", 1)[0]

    def has(self, trait: Trait) -> bool:
        return bool(self.traits & trait)

    @property
    def is_pure(self) -> bool:
        return self.has(Trait.PURE)

    def normalise_attrs(self, attrs: Mapping[str, Any]) -> dict[str, Any]:
        """Check attributes against the schema and fill defaults (errors list the known ones)."""
        unknown = set(attrs) - set(self.attrs)
        if unknown:
            known = ", ".join(self.attrs) or "none"
            raise OpError(f"{self.name} has no attribute {', '.join(sorted(unknown))} (its attributes: {known})")
        out = {}
        for name, spec in self.attrs.items():
            if name in attrs:
                try:
                    out[name] = spec.kind.normalise(attrs[name])
                except (TypeError, ValueError) as e:
                    raise OpError(f"{self.name} attribute {name}: {e}") from None
            elif spec.default is REQUIRED:
                raise OpError(f"{self.name} needs attribute {name} ({spec.kind.name})")
            else:
                out[name] = spec.default
        return out

    def check_arity(self, n: int) -> None:
        fixed = [o for o in self.operands if not o.variadic and not o.optional]
        if any(o.variadic for o in self.operands):
            if n < len(fixed):
                raise OpError(f"{self.name} takes at least {len(fixed)} operands, got {n}")
            return
        if not len(fixed) <= n <= len(self.operands):
            want = str(len(fixed)) if len(fixed) == len(self.operands) else f"{len(fixed)} to {len(self.operands)}"
            names = ", ".join(o.name for o in self.operands)
            raise OpError(f"{self.name} takes {want} operands ({names}), got {n}")

    def infer_types(self, operand_types: Sequence[TensorType], attrs: Mapping[str, Any]) -> tuple[TensorType, ...]:
        self.check_arity(len(operand_types))
        try:
            result = self.infer(*operand_types, **attrs)
        except OpError as e:
            raise OpError(f"{self.name}: {e}") if not str(e).startswith(self.name) else e
        except (TypeError, ValueError, KeyError, IndexError) as e:
            raise OpError(f"{self.name}: {e}") from None
        results = result if isinstance(result, tuple) else (result,)
        if len(results) != self.num_results:
            raise AssertionError(f"{self.name}: infer returned {len(results)} types, declared {self.num_results}")
        return results

    def run_reference(self, *operands: Any, **attrs: Any) -> tuple[Any, ...]:
        out = self.reference(*operands, **attrs)
        return out if isinstance(out, tuple) else (out,)


_REGISTRY: dict[str, OpDef] = {}


def define(name: str, reference: Callable[..., Any], infer: Callable[..., Any], *,
           traits: Trait = Trait.NONE, side_effects: bool = False, num_results: int = 1,
           cost: "Cost | None" = None) -> OpDef:
    """Register an op whose schema is the signature of `reference`."""
    if name in _REGISTRY:
        raise ValueError(f"op {name} is already registered")
    if "." not in name:
        raise ValueError(f"op name {name!r} needs a dialect prefix such as 'core.' or 'llm.'")
    operands, attrs = [], {}
    for p in inspect.signature(reference).parameters.values():
        if p.kind is p.KEYWORD_ONLY:
            if p.annotation is p.empty:
                raise TypeError(f"{name}: attribute {p.name} needs a type annotation")
            attrs[p.name] = AttrSpec(p.name, _attr_kind(p.annotation, name),
                                     REQUIRED if p.default is p.empty else p.default)
        elif p.kind is p.VAR_POSITIONAL:
            operands.append(OperandSpec(p.name, variadic=True))
        elif p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            if p.default is not p.empty and p.default is not None:
                raise TypeError(f"{name}: operand {p.name} may only default to None (optional)")
            operands.append(OperandSpec(p.name, optional=p.default is None))
        else:
            raise TypeError(f"{name}: **{p.name} is not allowed in an op signature")
    opdef = OpDef(name, tuple(operands), attrs, infer, reference,
                  traits | (Trait.NONE if side_effects else Trait.PURE), num_results, cost,
                  inspect.getdoc(reference) or "")
    _REGISTRY[name] = opdef
    return opdef


def op(name: str, *, infer: Callable[..., Any], traits: Trait = Trait.NONE, side_effects: bool = False,
       num_results: int = 1, cost: "Cost | None" = None):
    """Decorator form of `define`: the decorated function is the op's reference implementation."""
    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        define(name, fn, infer, traits=traits, side_effects=side_effects, num_results=num_results, cost=cost)
        return fn
    return register


def get_op(name: str) -> OpDef:
    _ensure_ops_loaded()
    try:
        return _REGISTRY[name]
    except KeyError:
        close = [n for n in _REGISTRY if n.split(".")[-1] == name.split(".")[-1]]
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise KeyError(f"unknown op {name!r}{hint} ({len(_REGISTRY)} ops are registered: "
                       f"see kiln.ir.registered_ops())") from None


def registered_ops() -> dict[str, OpDef]:
    _ensure_ops_loaded()
    return dict(sorted(_REGISTRY.items()))


def _ensure_ops_loaded() -> None:
    from . import ops  # noqa: F401  (registers the built-in dialects on first use)


Cost = Callable[[Sequence[TensorType], Sequence[TensorType], Mapping[str, Any], Mapping[str, int]], tuple[int, int]]
"""cost(operand_types, result_types, attrs, bindings) -> (flops, bytes moved), for `irdump --stats`."""


def default_cost(opdef: OpDef, operands: Sequence[TensorType], results: Sequence[TensorType],
                 attrs: Mapping[str, Any], bindings: Mapping[str, int]) -> tuple[int, int]:
    """Views move nothing; every other op reads its operands and writes its results once,
    at one flop per result element, unless it declares its own cost."""
    if opdef.cost is not None:
        return opdef.cost(operands, results, attrs, bindings)
    if opdef.has(Trait.SHAPE_ONLY):
        return 0, 0
    flops = sum(r.numel(bindings) for r in results)
    return flops, sum(t.nbytes(bindings) for t in (*operands, *results))

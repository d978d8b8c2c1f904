"""Canonicalisation: bring equivalent spellings to one form so that later patterns match one
shape, then fold constants and drop what became dead. Each rule keeps the result type."""

from __future__ import annotations

from typing import Any

from ..ir.builder import Builder
from ..ir.graph import Graph, Value
from ..ir.types import DType, dim_add
from .cleanup import dce
from .fold import FOLD_RULES
from .manager import register_pass
from .pattern import Attr, Const, Match, P, Rule, RuleSet, Var, apply_greedily

x = Var("x")


def _same_type(m: Match) -> bool:
    return m.x.type == m.root.type


def _keep_x(m: Match, b: Builder) -> Value:
    return m.x


def _identity(name: str, pattern: P) -> Rule:
    """A rule that replaces the root with x wherever that keeps the type. Const(0) also
    matches 0.0 and False (Python equality), so one rule covers every dtype."""
    return Rule(name, pattern, _keep_x, where=_same_type)


IDENTITIES = RuleSet(
    _identity("add-zero", P("core.add", x, Const(0))),
    _identity("sub-zero", P("core.sub", x, Const(0))),
    _identity("mul-one", P("core.mul", x, Const(1))),
    _identity("div-one", P("core.div", x, Const(1))),
    _identity("pow-one", P("core.pow", x, Const(1.0))),
    _identity("neg-neg", P("core.neg", P("core.neg", x))),
    _identity("cast-noop", P("core.cast", x)),
    _identity("reshape-noop", P("core.reshape", x)),
    _identity("expand-noop", P("core.expand", x)),
    _identity("slice-noop", P("core.slice", x, attrs={"start": 0, "step": 1})),
    _identity("permute-noop", P("core.permute", x, where=lambda m: list(m.root.op.attrs["dims"]) == sorted(m.root.op.attrs["dims"]))),
    _identity("concat-single", P("core.concat", x)),
    _identity("where-true", P("core.where", Const(True), x, Var())),
    _identity("where-same", P("core.where", Var(), x, x)),
)


def _slice_to_end(m: Match) -> bool:
    op = m.root.op
    end, size = op.attrs["end"], m.x.type.shape[op.attrs["dim"] % m.x.type.rank]
    return end is not None and (end == size or isinstance(end, int) and isinstance(size, int) and end >= size
                                or isinstance(end, int) and end >= 2**31)


def _open_slice(m: Match, b: Builder) -> Value:
    return b.core.slice(m.x, **{**m.root.op.attrs, "end": None})


def _explicit_reshape(m: Match, b: Builder) -> Value:
    return b.core.reshape(m.x, shape=m.root.type.shape)


_AXIS_OPS = ("core.concat", "core.slice", "core.softmax", "core.log_softmax", "core.gather", "core.argmax",
             "core.cumsum", "core.gather_elements")
_REDUCTIONS = ("core.sum", "core.mean", "core.amax", "core.amin")


def _has_negative_axis(m: Match) -> bool:
    attrs = m.root.op.attrs
    return attrs.get("dim", 0) < 0 if "dim" in attrs else any(d < 0 for d in attrs.get("dims", ()))


def _non_negative_axes(m: Match, b: Builder) -> Value:
    op = m.root.op
    rank = op.operands[0].type.rank
    attrs = dict(op.attrs)
    if "dim" in attrs:
        attrs["dim"] %= max(rank, 1)
    else:
        attrs["dims"] = [d % rank for d in attrs["dims"]]
    return b.op(op.opdef, *op.operands, **attrs)


def _false_select(m: Match, b: Builder) -> Value:
    return m.y


# Casting up to a type that holds every value of the source, then back, is the identity.
_WIDENS = {
    DType.f16: {DType.f32}, DType.bf16: {DType.f32}, DType.f8e4m3: {DType.f16, DType.bf16, DType.f32},
    DType.f8e5m2: {DType.f16, DType.f32}, DType.i8: {DType.i32, DType.i64, DType.f32}, DType.i32: {DType.i64},
    DType.u8: {DType.i32, DType.i64, DType.f32}, DType.bool: {DType.i8, DType.i32, DType.i64, DType.f32},
}


def _widening_round_trip(m: Match) -> bool:
    return m.mid in _WIDENS.get(m.x.type.dtype, set()) and m.x.type == m.root.type


def _reshape_reshape(m: Match, b: Builder) -> Value:
    return b.core.reshape(m.x, shape=m.root.type.shape)


def _permute_permute(m: Match, b: Builder) -> Value:
    inner, outer = m.inner, m.outer
    return b.core.permute(m.x, dims=[inner[d] for d in outer])


def _constant_right(m: Match, b: Builder) -> Value:
    return b.op(m.root.op.opdef, m.y, m.c)


def _constant_left(m: Match) -> bool:
    lhs, rhs = m.root.op.operands
    return lhs is m.c and rhs is m.y and not (m.y.op is not None and m.y.op.name == "core.constant")


def _slice_of_slice_step1(m: Match) -> bool:
    # A negative end counts from the end of the inner slice, which the combined slice cannot say.
    return (all(isinstance(v, int) and v >= 0 for v in (m.s1, m.s2)) and m.e1 is None and m.d1 == m.d2
            and not (isinstance(m.e2, int) and m.e2 < 0))


def _slice_slice(m: Match, b: Builder) -> Value:
    e2: Any = m.e2 if m.e2 is None else dim_add(m.e2, m.s1)
    return b.core.slice(m.x, dim=m.d1, start=m.s1 + m.s2, end=e2)


STRUCTURE = RuleSet(
    Rule("non-negative-axes", P((*_AXIS_OPS, *_REDUCTIONS), variadic=True), _non_negative_axes,
         where=_has_negative_axis),
    Rule("one-over-sqrt", P("core.div", Const(1), P("core.sqrt", x)), lambda m, b: b.core.rsqrt(m.x),
         where=_same_type),  # ONNX exporters spell rsqrt as 1/sqrt
    Rule("reciprocal-sqrt", P("core.reciprocal", P("core.sqrt", x)), lambda m, b: b.core.rsqrt(m.x),
         where=_same_type),
    Rule("outer-product", P("core.matmul", Var("a"), Var("b")), lambda m, b: b.core.mul(m.a, m.b),
         where=lambda m: m.a.type.shape[-1:] == (1,) and m.b.type.shape[-2:-1] == (1,)),  # one product, no sum
    Rule("x-sigmoid-x", P("core.mul", x, P("core.sigmoid", x)), lambda m, b: b.core.silu(m.x), where=_same_type),
    Rule("slice-open-end", P("core.slice", x), _open_slice, where=_slice_to_end),
    Rule("reshape-explicit", P("core.reshape", x), _explicit_reshape,
         where=lambda m: -1 in m.root.op.attrs["shape"]),
    Rule("reshape-reshape", P("core.reshape", P("core.reshape", x)), _reshape_reshape),
    Rule("permute-permute", P("core.permute", P("core.permute", x, attrs={"dims": Attr("inner")}),
                              attrs={"dims": Attr("outer")}), _permute_permute),
    Rule("cast-round-trip", P("core.cast", P("core.cast", x, attrs={"dtype": Attr("mid")})), _keep_x,
         where=_widening_round_trip),
    Rule("slice-slice", P("core.slice", P("core.slice", x, attrs={"dim": Attr("d1"), "start": Attr("s1"),
                                                                    "end": Attr("e1"), "step": 1}),
                          attrs={"dim": Attr("d2"), "start": Attr("s2"), "end": Attr("e2"), "step": 1}),
         _slice_slice, where=_slice_of_slice_step1),
    Rule("where-false", P("core.where", Const(False), Var(), Var("y")), _false_select,
         where=lambda m: m.y.type == m.root.type),
    Rule("constant-right", P(("core.add", "core.mul", "core.maximum", "core.minimum", "core.eq", "core.ne",
                              "core.logical_and", "core.logical_or"), Const(name="c"), Var("y")),
         _constant_right, where=_constant_left),
)

CANONICALIZE_RULES = IDENTITIES + STRUCTURE + FOLD_RULES


@register_pass("canonicalize")
def canonicalize(graph: Graph, *, fold: bool = True) -> int:
    """Normalise reshape/permute/cast/slice chains, drop identities (x*1, x+0, no-op casts and
    views), put constants on the right of commutative ops, fold constants, and remove dead ops."""
    rules = CANONICALIZE_RULES if fold else IDENTITIES + STRUCTURE
    return apply_greedily(graph, rules) + dce(graph, params=False)

"""Constant folding, as rules: splat constants through elementwise and shape ops, and layout
changes of weights into new, lazily computed parameters (a transposed or concatenated weight
costs nothing until a backend loads it)."""

from __future__ import annotations

import torch

from ..ir.builder import Builder
from ..ir.graph import Graph, Op, Value
from ..ir.registry import Trait
from ..ir.storage import DerivedStorage, Storage, TensorStorage
from ..ir.types import DType
from .manager import register_pass
from .pattern import Match, P, Rule, RuleSet, apply_greedily


def _is_constant(v: Value) -> bool:
    return v.op is not None and v.op.name == "core.constant"


def _splat(v: Value) -> torch.Tensor:
    attrs = v.op.attrs
    return torch.tensor(attrs["value"], dtype=attrs["dtype"].torch)


def _fold_elementwise(m: Match, b: Builder) -> Value:
    op = m.root.op
    out = op.opdef.run_reference(*(_splat(v) for v in op.operands), **op.attrs)[0]
    t = m.root.type
    return b.constant(out.to(t.dtype.torch).item(), t.dtype, t.shape)


def _fold_view(m: Match, b: Builder) -> Value:
    src = m.root.op.operands[0].op.attrs
    return b.constant(src["value"], src["dtype"], m.root.type.shape)


def _storage_of(v: Value) -> Storage | None:
    if v.is_param:
        return v.storage
    if _is_constant(v) and v.type.is_static:
        a = v.op.attrs
        return TensorStorage(torch.full(a["shape"], a["value"], dtype=a["dtype"].torch))
    return None


def _elementwise_of_constants(m: Match) -> bool:
    op = m.root.op
    return (op.opdef.is_pure and op.opdef.has(Trait.ELEMENTWISE) and bool(op.operands)
            and all(map(_is_constant, op.operands)))


def _view_of_constant(m: Match) -> bool:
    op = m.root.op
    return op.opdef.has(Trait.SHAPE_ONLY) and len(op.operands) == 1 and _is_constant(op.operands[0])


def _foldable_over_params(m: Match) -> bool:
    """Layout changes of weights only (transposes, reshapes, slices, concatenations), and only
    where the stored weight bytes do not grow: folding must neither undo a quantization
    (dequantize, cast) nor keep a weight twice because it is also used elsewhere."""
    op = m.root.op
    if not ((op.opdef.has(Trait.SHAPE_ONLY) or op.name == "core.concat")
            and any(v.is_param for v in op.operands)
            and all(_storage_of(v) is not None for v in op.operands)
            and all(r.type.is_static for r in op.results)
            # i4 storage is packed two per byte, which op references do not read or write
            and all(v.type.dtype is not DType.i4 for v in (*op.operands, *op.results))):
        return False
    params = {id(v): v for v in op.operands if v.is_param}.values()
    kept = sum(v.type.nbytes() for v in params if any(u is not op for u in m.graph.users(v)))
    return sum(r.type.nbytes() for r in op.results) + kept <= sum(v.type.nbytes() for v in params)


def _fold_params(m: Match, b: Builder) -> tuple[Value, ...]:
    op: Op = m.root.op
    graph: Graph = b.graph
    inputs = [_storage_of(v) for v in op.operands]
    base = next(v.name for v in op.operands if v.is_param) + "." + op.name.split(".")[-1]
    results = []
    for i, r in enumerate(op.results):
        name, n = base if len(op.results) == 1 else f"{base}.{i}", 1
        while name in graph.params:
            name, n = f"{base}.{n}", n + 1
        results.append(graph.add_param(name, r.type, DerivedStorage(op.name, inputs, dict(op.attrs), r.type, i)))
    return tuple(results)


FOLD_RULES = RuleSet(
    Rule("fold-elementwise", P(None, where=_elementwise_of_constants), _fold_elementwise),
    Rule("fold-view", P(None, where=_view_of_constant), _fold_view),
    Rule("fold-params", P(None, where=_foldable_over_params), _fold_params),
)


@register_pass("fold-constants")
def fold_constants(graph: Graph) -> int:
    """Evaluate ops whose operands are all constants or parameters."""
    return apply_greedily(graph, FOLD_RULES)

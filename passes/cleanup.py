"""Dead-code elimination and common-subexpression elimination."""

from __future__ import annotations

from ..ir.graph import Graph, Op
from ..ir.registry import Trait
from .manager import register_pass


@register_pass("dce")
def dce(graph: Graph, *, params: bool = True) -> int:
    """Erase pure ops whose results are unused, then (with params) unused parameters."""
    removed = 0
    for op in reversed(list(graph.ops)):
        if op.opdef.is_pure and all(graph.num_uses(r) == 0 for r in op.results):
            graph.erase_op(op)
            removed += 1
    if params:
        for name, p in list(graph.params.items()):
            if graph.num_uses(p) == 0:
                graph.remove_param(name)
                removed += 1
    return removed


def _cse_key(op: Op) -> tuple:
    operands = tuple(id(v) for v in op.operands)
    if op.opdef.has(Trait.COMMUTATIVE):
        operands = tuple(sorted(operands))
    return op.name, operands, tuple((k, _attr_key(v)) for k, v in sorted(op.attrs.items(), key=lambda kv: kv[0]))


def _attr_key(v: object) -> object:
    # 0.0 == -0.0 (and they hash alike), but constants of the two differ (1/x); NaN != NaN.
    return (float, repr(v)) if isinstance(v, float) else v


@register_pass("cse")
def cse(graph: Graph) -> int:
    """Merge pure ops that compute the same thing from the same operands (commutative ops in
    either order); the first one stays."""
    seen: dict[tuple, Op] = {}
    merged = 0
    for op in list(graph.ops):
        if not op.opdef.is_pure:
            continue
        try:
            key = _cse_key(op)
            hash(key)
        except TypeError:
            continue
        first = seen.setdefault(key, op)
        if first is op:
            continue
        for old, new in zip(op.results, first.results):
            graph.replace_all_uses(old, new)
        graph.erase_op(op)
        merged += 1
    return merged

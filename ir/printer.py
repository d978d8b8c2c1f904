"""The text format: one line per op, exactly re-readable by `parse` (print(parse(t)) == t).

    param @model.embed_tokens.weight : bf16[49152,576]
    func @main(%tokens: i32[T]) -> (bf16[T,576]) {
      %0 = llm.embedding(@model.embed_tokens.weight, %tokens) : bf16[T,576]
      return %0
    }

Attributes equal to their declared default are not printed; `loc("...")` follows an op when
source locations are asked for.
"""

from __future__ import annotations

import json
from typing import Any

from .graph import Graph, Op, Value, _escape
from .types import DType, TensorType


def format_type(t: TensorType) -> str:
    return str(t)


def format_attr_value(v: Any, kind: str = "") -> str:
    """The text of an attribute value. Strings are quoted, except symbolic dims (kind Dim, and
    every string inside a list: lists hold ints and dims only)."""
    if isinstance(v, str) and kind.startswith("Dim"):
        return v
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, DType):
        return v.value
    if v is None:
        return "none"
    if isinstance(v, (tuple, list)):
        return "[" + ",".join(x if isinstance(x, str) else format_attr_value(x) for x in v) + "]"
    raise TypeError(f"attribute value {v!r} of type {type(v).__name__} has no text form")


def format_attrs(op: Op) -> str:
    shown = [(k, v) for k, v in op.attrs.items()
             if k not in op.opdef.attrs or not _is_default(v, op.opdef.attrs[k].default)]
    kinds = {k: spec.kind.name for k, spec in op.opdef.attrs.items()}
    return "{" + ", ".join(f"{k}={format_attr_value(v, kinds.get(k, ''))}" for k, v in shown) + "}" if shown else ""


def _is_default(value: Any, default: Any) -> bool:
    return type(value) is type(default) and value == default or (value is None and default is None)


def format_op(op: Op, *, locs: bool = False) -> str:
    results = ", ".join(r.ref for r in op.results)
    operands = ", ".join(v.ref for v in op.operands)
    attrs = format_attrs(op)
    types = ", ".join(format_type(r.type) for r in op.results)
    if len(op.results) != 1:
        types = f"({types})"
    line = f"{results} = {op.name}({operands}){' ' + attrs if attrs else ''} : {types}"
    if locs and op.loc:
        line += f' loc("{_escape(op.loc)}")'
    return line


def _layout(graph: Graph, locs: bool) -> tuple[list[str], dict[int, int]]:
    lines = [f"param {p.ref} : {format_type(p.type)}" for p in graph.params.values()]
    args = ", ".join(f"{v.ref}: {format_type(v.type)}" for v in graph.inputs)
    outs = ", ".join(format_type(v.type) for v in graph.outputs)
    name = Value(graph.name, TensorType(DType.f32), is_param=True).ref
    lines.append(f"func {name}({args}) -> ({outs}) {{")
    line_of: dict[int, int] = {}
    for op in graph.ops:
        lines.append("  " + format_op(op, locs=locs))
        line_of[id(op)] = len(lines)
    lines.append("  return" + (" " + ", ".join(v.ref for v in graph.outputs) if graph.outputs else ""))
    lines.append("}")
    return lines, line_of


def print_graph(graph: Graph, *, locs: bool = False) -> str:
    """The graph in the text format, ending in a newline."""
    return "\n".join(_layout(graph, locs)[0]) + "\n"


def op_line_numbers(graph: Graph) -> dict[int, int]:
    """The 1-based line of each op (keyed by id) in `print_graph(graph)`, for diagnostics."""
    return _layout(graph, False)[1]


def return_line_number(graph: Graph) -> int:
    return len(graph.params) + len(graph.ops) + 2

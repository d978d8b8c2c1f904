"""Graphviz drawing of a graph (`irdump --format dot | dot -Tsvg > g.svg`)."""

from __future__ import annotations

import json

from .graph import Graph, Value
from .printer import format_attrs


def _q(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)


def to_dot(graph: Graph, *, params: bool = True) -> str:
    """One node per op, input, parameter (unless `params=False`) and output; edges carry types."""
    lines = [f"digraph {_q(graph.name)} {{", "  rankdir=TB;", '  node [fontname="monospace", fontsize=10];',
             '  edge [fontname="monospace", fontsize=8];']
    node: dict[int, str] = {}
    for i, v in enumerate(graph.inputs):
        node[id(v)] = f"in{i}"
        lines.append(f"  in{i} [shape=ellipse, style=filled, fillcolor=lightblue, label={_q(f'{v.ref}: {v.type}')}];")
    if params:
        for i, v in enumerate(graph.params.values()):
            node[id(v)] = f"p{i}"
            lines.append(f"  p{i} [shape=note, style=filled, fillcolor=lightyellow, label={_q(f'{v.ref}: {v.type}')}];")
    for i, op in enumerate(graph.ops):
        label = op.name + (f"\n{format_attrs(op)}" if format_attrs(op) else "")
        lines.append(f"  op{i} [shape=box, style=rounded, label={_q(label)}];")
        for v in op.operands:
            if id(v) in node:
                lines.append(f"  {node[id(v)]} -> op{i} [label={_q(_edge(v))}];")
        for r in op.results:
            node[id(r)] = f"op{i}"
    for i, v in enumerate(graph.outputs):
        lines.append(f"  out{i} [shape=ellipse, style=filled, fillcolor=lightgreen, label={_q(f'return {i}')}];")
        if id(v) in node:
            lines.append(f"  {node[id(v)]} -> out{i} [label={_q(_edge(v))}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _edge(v: Value) -> str:
    return f"{v.ref} {v.type}" if not v.is_param else str(v.type)

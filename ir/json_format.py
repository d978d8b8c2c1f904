"""The graph as JSON, for tools and viewers. Attribute values keep their text form ("1e-05",
"bf16", "[1,T]"), which makes the JSON lossless: `from_json(to_json(g))` prints identically."""

from __future__ import annotations

import json
from typing import Any

from .graph import Graph, Value
from .printer import format_attr_value


def to_json_dict(graph: Graph) -> dict[str, Any]:
    return {
        "name": graph.name,
        "inputs": [{"name": v.name, "type": str(v.type)} for v in graph.inputs],
        "params": [{"name": v.name, "type": str(v.type),
                    **({"storage": v.storage.describe()} if v.storage is not None else {})}
                   for v in graph.params.values()],
        "ops": [{"op": op.name,
                 "operands": [v.ref for v in op.operands],
                 "attrs": {k: format_attr_value(v, op.opdef.attrs[k].kind.name) for k, v in op.attrs.items()},
                 "results": [{"name": r.name, "type": str(r.type)} for r in op.results],
                 **({"loc": op.loc} if op.loc else {})}
                for op in graph.ops],
        "outputs": [v.ref for v in graph.outputs],
    }


def to_json(graph: Graph, *, indent: int | None = 1) -> str:
    return json.dumps(to_json_dict(graph), indent=indent) + "\n"


def from_json(text: str | dict[str, Any]) -> Graph:
    """Rebuild a graph (without parameter data) from `to_json` output."""
    from .parser import _Parser, parse_type

    d = json.loads(text) if isinstance(text, str) else text
    g = Graph(d["name"])
    env: dict[str, Value] = {}
    for i in d["inputs"]:
        env["%" + i["name"]] = g.add_input(i["name"], parse_type(i["type"]))
    for p in d["params"]:
        env["@" + p["name"]] = g.add_param(p["name"], parse_type(p["type"]))
    for o in d["ops"]:
        attrs = {k: _Parser(v, None).parse_attr_value() for k, v in o["attrs"].items()}
        op = g.create_op(o["op"], [env[_key(r)] for r in o["operands"]], attrs, loc=o.get("loc"),
                         result_names=[r["name"] for r in o["results"]])
        for r, want in zip(op.results, o["results"]):
            if str(r.type) != want["type"]:
                raise ValueError(f"%{r.name}: {o['op']} infers {r.type} but the JSON says {want['type']}")
            env["%" + r.name] = r
    g.set_outputs(env[_key(r)] for r in d["outputs"])
    return g


def _key(ref: str) -> str:
    return ref[0] + json.loads(ref[1:]) if ref[1:2] == '"' else ref

"""Graphviz and JSON output."""

import json
import re

import pytest
import torch

from kiln.ir import Builder, TensorStorage, f32, from_json, i32, print_graph, to_dot, to_json, verify

_QUOTED = r'"(?:[^"\\]|\\.)*"'
_NODE = re.compile(rf"^  (\w+) \[(?:\w+=(?:\w+|{_QUOTED}), )*label=({_QUOTED})\];$")
_EDGE = re.compile(rf"^  (\w+) -> (\w+) \[label=({_QUOTED})\];$")


def _graph():
    b = Builder(name="onnx::main")
    ids = b.input("ids", i32["T"])
    x = b.input("x", f32["T", 8])
    table = b.param("embed", storage=TensorStorage(torch.randn(16, 8)))
    w = b.param('odd "w" ü', f32[8])
    e = b.llm.embedding(table, ids, loc="model.embed_tokens")
    h = b.llm.rms_norm(b.core.add(e, x), w, eps=1e-5)
    return b.build(h, e)


def _parse_dot(text):
    lines = text.splitlines()
    assert lines[0] == 'digraph "onnx::main" {' and lines[-1] == "}"
    nodes, edges = {}, []
    for line in lines[1:-1]:
        if m := _NODE.match(line):
            assert m[1] not in nodes
            nodes[m[1]] = json.loads(m[2])
        elif m := _EDGE.match(line):
            edges.append((m[1], m[2], json.loads(m[3])))
        else:
            assert re.match(r"^  (rankdir=TB|(node|edge) \[.*\]);$", line), line
    assert all(a in nodes and b in nodes for a, b, _ in edges)
    return nodes, edges


def test_dot_has_a_node_per_op_and_an_edge_per_operand():
    g = _graph()
    nodes, edges = _parse_dot(to_dot(g))
    op_nodes = {k: v for k, v in nodes.items() if k.startswith("op")}
    assert [label.split("\n")[0] for label in op_nodes.values()] == ["llm.embedding", "core.add", "llm.rms_norm"]
    assert op_nodes["op2"] == "llm.rms_norm\n{eps=1e-05}"
    for i, op in enumerate(g.ops):
        assert len([e for e in edges if e[1] == f"op{i}"]) == len(op.operands)
    assert ("p0", "op0", "f32[16,8]") in edges and ("in0", "op0", "%ids i32[T]") in edges
    assert ("op0", "op1", "%0 f32[T,8]") in edges and ("op1", "op2", "%1 f32[T,8]") in edges
    assert nodes["p1"] == '@"odd \\"w\\" ü": f32[8]'
    assert {(a, b) for a, b, _ in edges if b.startswith("out")} == {("op2", "out0"), ("op0", "out1")}


def test_dot_without_params():
    nodes, edges = _parse_dot(to_dot(_graph(), params=False))
    assert not any(k.startswith("p") for k in nodes)
    assert len([e for e in edges if e[1] == "op2"]) == 1   # only %1; the weight is left out


def test_json_round_trip():
    g = _graph()
    data = to_json(g)
    d = json.loads(data)
    assert d["name"] == "onnx::main"
    assert d["params"][0] == {"name": "embed", "type": "f32[16,8]", "storage": "tensor f32[16,8] in memory"}
    assert d["ops"][0]["loc"] == "model.embed_tokens"
    assert d["ops"][2]["attrs"] == {"eps": "1e-05"} and d["outputs"] == ["%2", "%0"]
    back = from_json(data)
    verify(back)
    assert print_graph(back, locs=True) == print_graph(g, locs=True)
    assert back.params["embed"].storage is None   # types only, no parameter data
    del d["params"][0]["storage"]
    assert json.loads(to_json(back)) == d
    assert from_json(d).ops[2].attrs["eps"] == 1e-5


def test_json_with_a_stale_type_is_rejected():
    d = json.loads(to_json(_graph()))
    d["ops"][1]["results"][0]["type"] = "f32[T,9]"
    with pytest.raises(ValueError, match=r"%1: core.add infers f32\[T,8\] but the JSON says f32\[T,9\]"):
        from_json(d)

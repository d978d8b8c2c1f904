"""The verifier on graphs broken behind the Graph API's back: each diagnostic names the op, the
value and the line of the printed graph."""

import pytest
import torch

from kiln.ir import Builder, TensorStorage, VerificationError, check, f32, i4, print_graph, verify

# Printed layout of _graph():
#   1 param @w : f32[8]
#   2 func @main(%x: f32[T,8]) -> (f32[T,8]) {
#   3   %0 = llm.rms_norm(%x, @w) {eps=1e-05} : f32[T,8]
#   4   %1 = core.exp(%0) : f32[T,8]
#   5   %2 = core.add(%1, %x) : f32[T,8]
#   6   return %2


def _graph(weight=None):
    b = Builder()
    x = b.input("x", f32["T", 8])
    w = b.param("w", f32[8], storage=TensorStorage(torch.randn(8) if weight is None else weight))
    h = b.llm.rms_norm(x, w, eps=1e-5)
    y = b.core.exp(h)
    return b.build(b.core.add(y, x), verify=weight is None)


def _error(g):
    with pytest.raises(VerificationError) as e:
        verify(g)
    return str(e.value), e.value.diagnostics


def test_well_formed_graph_passes():
    g = _graph()
    verify(g)
    assert check(g) == []
    assert print_graph(g).splitlines()[2].startswith("  %0 = llm.rms_norm")


def test_use_before_definition():
    g = _graph()
    g.ops[0], g.ops[1] = g.ops[1], g.ops[0]
    msg, diags = _error(g)
    assert diags[0].line == 3
    assert "line 3: core.exp uses %0 before its definition on line 4" in msg


def test_dangling_value_of_an_op_erased_behind_the_graphs_back():
    g = _graph()
    del g.ops[1]
    msg, diags = _error(g)
    assert [d.line for d in diags] == [4]
    assert "line 4: core.add uses %1, which no op or input of the graph defines" in msg
    assert "'%2 = core.add(%1, %x) : f32[T,8]'" in msg


def test_stale_type_after_operands_change():
    g = _graph()
    g.ops[1].operands = (g.params["w"],)  # exp(@w) is f32[8], the result still says f32[T,8]
    msg, _ = _error(g)
    assert "line 4: %1: core.exp infers f32[8] but the value has type f32[T,8] (stale type)" in msg


def test_stale_type_after_result_type_change():
    g = _graph()
    g.ops[0].results[0].type = f32["T", 4]
    msg, diags = _error(g)
    assert "line 3: %0: llm.rms_norm infers f32[T,8] but the value has type f32[T,4]" in msg
    assert diags[1].line == 4 and "core.exp infers f32[T,4]" in diags[1].message  # and the user of %0


@pytest.mark.parametrize("attrs, message", [
    ({"eps": "tiny"}, "llm.rms_norm attribute eps: expected a float, got 'tiny'"),
    ({"eps": 1e-5, "epsilon": 1e-5}, "llm.rms_norm has no attribute epsilon"),
    ({}, "llm.rms_norm attributes are not normalised"),
    ({"eps": 1}, "llm.rms_norm attributes are not normalised"),  # prints as 1, re-parses as 1.0
])
def test_bad_attribute(attrs, message):
    g = _graph()
    g.ops[0].attrs = attrs
    msg, diags = _error(g)
    assert diags[0].line == 3 and message in msg and "'%0 = llm.rms_norm(%x, @w)" in msg


def test_parameter_storage_of_the_wrong_shape():
    msg, diags = _error(_graph(weight=torch.randn(9)))
    assert [d.line for d in diags] == [1]
    assert "line 1: parameter @w: declared f32[8] but its storage holds f32[9] (tensor f32[9] in memory)" in msg


def test_parameter_storage_of_the_wrong_dtype():
    msg, _ = _error(_graph(weight=torch.randn(8, dtype=torch.bfloat16)))
    assert "parameter @w: declared f32[8] but its storage holds bf16[8]" in msg


def test_i4_parameters_take_packed_u8_or_unpacked_i8_storage():
    b = Builder()
    x = b.input("x", i4[4, 8])
    b.param("packed", i4[4, 8], storage=TensorStorage(torch.zeros(4, 4, dtype=torch.uint8)))
    b.param("unpacked", i4[4, 8], storage=TensorStorage(torch.zeros(4, 8, dtype=torch.int8)))
    g = b.build(x)
    b.param("wrong", i4[4, 8], storage=TensorStorage(torch.zeros(4, 8, dtype=torch.uint8)))
    msg, diags = _error(g)
    assert [d.line for d in diags] == [3]
    assert "@wrong: an i4 i4[4,8] needs u8[4,4] packed storage, found u8[4,8]" in msg


def test_duplicate_definition_by_name():
    g = _graph()
    g.ops[1].results[0].name = "0"
    msg, diags = _error(g)
    assert diags[0].line == 4 and "line 4: %0 is defined more than once" in msg


def test_duplicate_definition_by_inserting_an_op_twice():
    g = _graph()
    g.ops.insert(2, g.ops[1])
    msg, _ = _error(g)
    assert "%1 is defined more than once" in msg


def test_dangling_output():
    g = _graph()
    del g.ops[2]
    msg, diags = _error(g)
    assert [d.line for d in diags] == [5]
    assert "line 5: return uses %2, which the graph does not define (dangling)" in msg


def test_use_of_an_undeclared_parameter():
    g = _graph()
    del g.params["w"]
    msg, diags = _error(g)
    assert diags[0].line == 2 and "llm.rms_norm uses parameter @w, which is not declared" in msg


def test_every_problem_is_reported_in_line_order():
    g = _graph(weight=torch.randn(3))
    del g.ops[2]
    g.ops[1].attrs = {"bogus": 1}
    msg, diags = _error(g)
    assert [d.line for d in diags] == [1, 4, 5]
    assert msg.startswith("@main is malformed (3 problems):")

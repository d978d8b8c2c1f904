"""Graph mutation through the Graph API, storages, and the op registry's schema and errors."""

import pytest
import torch

from kiln.ir import (Builder, DerivedStorage, SafetensorsStorage, TensorStorage, Trait, define, f32, get_op,
                     print_graph, registered_ops, verify)
from kiln.ir import registry
from kiln.ir.registry import Ints, default_cost
from kiln.ir.types import DType  # noqa: F401  (named by a string annotation below)


def _graph():
    b = Builder()
    x = b.input("x", f32["T", 4])
    y = b.core.neg(x)
    return b.build(b.core.add(y, y)), x, y


def test_replace_all_uses_and_erase_keep_use_lists_right():
    g, x, y = _graph()
    assert g.num_uses(y) == 2 and g.users(x) == [y.op]
    assert g.replace_all_uses(y, x) == 2
    assert g.num_uses(y) == 0 and g.num_uses(x) == 3
    with pytest.raises(ValueError, match=r"cannot erase core.add defining %1: it still has 1 uses"):
        g.erase_op(g.ops[1])
    g.erase_op(y.op)
    verify(g)
    assert print_graph(g).splitlines()[1] == "  %1 = core.add(%x, %x) : f32[T,4]"


def test_clone_is_structural_and_names_stay_fresh():
    g, x, y = _graph()
    g.add_param("w", f32[4], TensorStorage(torch.randn(4)))
    c = g.clone()
    assert print_graph(c) == print_graph(g)
    assert c.params["w"].storage is g.params["w"].storage and c.ops[0] is not g.ops[0]
    new = Builder(c).core.exp(c.outputs[0])
    assert new.name not in {"x", "0", "1"}
    assert len(g.ops) == 2   # the original is untouched


def test_names_are_unique():
    g, x, y = _graph()
    assert g.fresh_name("h") == "h" and g.fresh_name("x") not in {"x", "0", "1"}
    with pytest.raises(ValueError, match=r"%0 is already defined"):
        g.create_op("core.neg", [x], result_names=["0"])
    g.add_param("w", f32[4])
    with pytest.raises(ValueError, match="@w is already declared"):
        g.add_param("w", f32[4])
    with pytest.raises(ValueError, match="needs a type or a storage"):
        g.add_param("v")


def test_storages(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    data = torch.randn(3, 4).to(torch.bfloat16)
    save_file({"w": data}, str(path))
    st = SafetensorsStorage(str(path), "w")
    assert str(st.type) == "bf16[3,4]" and st.describe() == "safetensors model.safetensors:w"
    assert torch.equal(st.load(), data)
    with pytest.raises(KeyError, match="no tensor named 'v'"):
        SafetensorsStorage(str(path), "v")
    base = TensorStorage(torch.randn(3, 4))
    derived = DerivedStorage("core.permute", [base], {"dims": (1, 0)}, f32[4, 3])
    assert torch.equal(derived.load(), base.tensor.T)
    assert derived.describe() == "core.permute of (tensor f32[3,4] in memory)"


def test_schemas_come_from_reference_signatures():
    attention = get_op("llm.attention")
    assert [(o.name, o.optional) for o in attention.operands] == [("q", False), ("k", False), ("v", False),
                                                                  ("mask", True)]
    assert attention.attrs["scale"].kind.name == "float | None" and attention.attrs["causal"].default is False
    assert get_op("core.concat").operands[0].variadic
    assert get_op("core.add").has(Trait.COMMUTATIVE | Trait.ELEMENTWISE) and get_op("core.add").is_pure
    assert not get_op("dist.all_reduce").is_pure and get_op("core.reshape").has(Trait.SHAPE_ONLY)
    assert {n.split(".")[0] for n in registered_ops()} == {"core", "dist", "llm", "quant"}
    assert "llm.rms_norm" in registered_ops() and get_op("llm.rms_norm").dialect == "llm"


def test_registry_errors():
    with pytest.raises(KeyError, match=r"unknown op 'core.rms_norm'; did you mean llm.rms_norm"):
        get_op("core.rms_norm")
    with pytest.raises(ValueError, match="core.add is already registered"):
        define("core.add", lambda lhs, rhs: lhs, lambda a, b: a)
    with pytest.raises(ValueError, match="needs a dialect prefix"):
        define("nodialect", lambda x: x, lambda x: x)

    def untyped(x, *, k):
        return x

    def listy(x, *, k: list):
        return x

    def kwargs(x, **k):
        return x

    with pytest.raises(TypeError, match="attribute k needs a type annotation"):
        define("test.untyped", untyped, lambda x, **_: x)
    with pytest.raises(TypeError, match="annotation <class 'list'> is not one of int, float"):
        define("test.listy", listy, lambda x, **_: x)
    with pytest.raises(TypeError, match=r"\*\*k is not allowed"):
        define("test.kwargs", kwargs, lambda x, **_: x)
    assert not [n for n in registered_ops() if n.startswith("test.")]


def test_costs():
    b = Builder()
    x = b.input("x", f32["T", 8])
    w = b.param("w", f32[4, 8])
    ops = [b.llm.linear(x, w).op, b.core.reshape(x, shape=[-1]).op, b.core.exp(x).op]
    costs = [default_cost(op.opdef, [v.type for v in op.operands], [r.type for r in op.results], op.attrs,
                          {"T": 3}) for op in ops]
    assert costs[0] == (2 * 3 * 4 * 8, 4 * (3 * 8 + 4 * 8 + 3 * 4))   # 2*M*N*K flops
    assert costs[1] == (0, 0)                                          # views move nothing
    assert costs[2] == (24, 4 * 48)


@pytest.fixture
def scratch_op():
    yield "test.scale"
    registry._REGISTRY.pop("test.scale", None)   # keep the registry as the other tests expect it


def test_define_reads_annotation_objects_too(scratch_op):
    # this module has no `from __future__ import annotations`: the annotations are objects
    def scale(x, bias=None, *, k: float, dims: Ints | None = None, dtype: "DType | None" = None):
        """x * k (+ bias)."""
        return x * k if bias is None else x * k + bias

    opdef = define(scratch_op, scale, lambda x, bias=None, **_: x, traits=Trait.ELEMENTWISE)
    assert {n: a.kind.name for n, a in opdef.attrs.items()} == {"k": "float", "dims": "Ints | None",
                                                                 "dtype": "DType | None"}
    assert opdef.operands[1].optional and opdef.doc == "x * k (+ bias)." and opdef.is_pure
    b = Builder()
    x = b.input("x", f32[3])
    y = b.test.scale(x, k=2)
    assert y.op.attrs == {"k": 2.0, "dims": None, "dtype": None}
    assert print_graph(b.build(y)).splitlines()[1] == "  %0 = test.scale(%x) {k=2.0} : f32[3]"

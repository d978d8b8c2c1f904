"""The text format: exact print -> parse -> print round trips, on hand-written graphs and on random
graphs built through the Builder, and parse errors that point at a line and column."""

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kiln.ir import (Builder, DType, ParseError, TensorType, from_json, parse, parse_type, print_graph, to_json,
                     verify)
from kiln.ir.printer import format_attr_value

EVERY_ATTR_KIND = '''\
param @model.norm.weight : f32[8]
param @"onnx::MatMul_1" : f32[4,8]
func @main(%x: f32[T,8], %"in put": f32[T,8], %mask: bool[T,8]) -> (f32[T,4], f32[2*T,8], i32[2*T], f32[T,2,4]) {
  %0 = llm.rms_norm(%x, @model.norm.weight) {eps=1e-05} : f32[T,8]
  %1 = core.clamp(%0) {min=-inf, max=inf} : f32[T,8]
  %2 = core.constant() {value=nan, dtype=f32} : f32[]
  %3 = core.add(%1, %2) : f32[T,8]
  %4 = core.where(%mask, %3, %"in put") : f32[T,8]
  %5 = core.gelu(%4) {approximate="tanh"} : f32[T,8]
  %6 = core.sum(%5) {dims=[0,-1], keepdim=true} : f32[1,1]
  %7 = core.cast(%6) {dtype=bf16} : bf16[1,1]
  %8 = core.permute(%5) {dims=[1,0]} : f32[8,T]
  %9 = core.reshape(%5) {shape=[T,2,-1]} : f32[T,2,4]
  %10 = core.expand(%7) {shape=[T,-1,3]} : bf16[T,1,3]
  %11 = core.arange() {end=2*T, dtype=i32} : i32[2*T]
  %12 = core.concat(%5, %"in put") {dim=0} : f32[2*T,8]
  %13 = core.slice(%12) {dim=0, start=1, end=T+1} : f32[T,8]
  %14 = llm.linear(%13, @"onnx::MatMul_1") : f32[T,4]
  %15 = core.constant() {value=true, dtype=bool, shape=[T,8]} : bool[T,8]
  %16 = quant.quantize(%14, %2) {dtype=f8e4m3} : f8e4m3[T,4]
  %"a/b" = dist.all_reduce(%14) {reduce="max"} : f32[T,4]
  return %"a/b", %12, %11, %9
}
'''


def test_hand_written_graph_round_trips_with_every_attr_kind():
    g = parse(EVERY_ATTR_KIND)
    assert print_graph(g) == EVERY_ATTR_KIND
    verify(g)
    ops = {r.name: op for op in g.ops for r in op.results}
    assert ops["0"].attrs["eps"] == 1e-05
    assert ops["1"].attrs == {"min": -math.inf, "max": math.inf}
    assert math.isnan(ops["2"].attrs["value"])
    assert ops["5"].attrs["approximate"] == "tanh"
    assert ops["6"].attrs["dims"] == (0, -1) and ops["6"].attrs["keepdim"] is True
    assert ops["7"].attrs["dtype"] is DType.bf16
    assert ops["9"].attrs["shape"] == ("T", 2, -1)
    assert ops["11"].attrs["end"] == "2*T"
    assert ops["13"].attrs["end"] == "T+1"
    assert ops["15"].attrs["value"] is True
    assert "onnx::MatMul_1" in g.params and [v.name for v in g.inputs] == ["x", "in put", "mask"]
    assert [v.name for v in g.outputs] == ["a/b", "12", "11", "9"]
    assert [str(v.type) for v in g.outputs] == ["f32[T,4]", "f32[2*T,8]", "i32[2*T]", "f32[T,2,4]"]


def test_default_and_none_attrs_are_not_printed():
    text = EVERY_ATTR_KIND.replace("{min=-inf, max=inf}", "{min=none, max=inf}").replace(
        "{eps=1e-05}", "{eps=1e-06}")
    printed = print_graph(parse(text))
    assert "{max=inf}" in printed and "min=" not in printed
    assert "llm.rms_norm(%x, @model.norm.weight) : f32[T,8]" in printed
    assert format_attr_value(None) == "none"


def test_locations_round_trip_when_asked_for():
    text = '''\
func @"onnx::graph"(%x: f32[T,4]) -> (f32[T,4]) {
  %0 = core.neg(%x) : f32[T,4] loc("model.layers.0.mlp")
  %1 = core.exp(%0) : f32[T,4] loc("weird \\"quoted\\" \\\\ path\\n")
  %2 = core.add(%0, %1) : f32[T,4]
  return %2
}
'''
    g = parse(text)
    assert g.name == "onnx::graph"
    assert [op.loc for op in g.ops] == ["model.layers.0.mlp", 'weird "quoted" \\ path\n', None]
    assert print_graph(g, locs=True) == text
    assert "loc(" not in print_graph(g)
    assert g.ops[0].results[0].loc == "model.layers.0.mlp"


def test_parse_type():
    assert parse_type("bf16[T*2,576]") == TensorType(DType.bf16, ("2*T", 576))
    assert parse_type("f32[]") == TensorType(DType.f32, ())
    with pytest.raises(ParseError, match="a dimension must be a non-negative int"):
        parse_type("f32[-2]")


# --- parse errors ---------------------------------------------------------------------------

BASE = '''\
param @w : f32[4,8]
func @main(%x: f32[T,8]) -> (f32[T,4]) {
  %0 = llm.linear(%x, @w) : f32[T,4]
  return %0
}
'''


def test_base_parses():
    assert print_graph(parse(BASE)) == BASE


@pytest.mark.parametrize("old, new, line, at, message", [
    ("@w) :", "@w) $", 3, "$", "unexpected character '$'"),
    ("llm.linear", "llm.lineer", 3, "llm.", "unknown op 'llm.lineer'"),
    ("llm.linear", "core.linear", 3, "core.", "did you mean llm.linear"),
    (": f32[T,4]\n  return", ": f33[T,4]\n  return", 3, "f33", "unknown dtype 'f33'"),
    ("(%x, @w)", "(%y, @w)", 3, "%y", "use of undefined value %y"),
    ("(%x, @w)", "(%x, @v)", 3, "@v", "parameter @v is not declared"),
    ("%0 = llm", "%x = llm", 3, "%x", "%x is defined twice"),
    (": f32[T,4]\n  return", ": f32[T,8]\n  return", 3, "f32[T,8]", "infers f32[T,4] but the text says f32[T,8]"),
    ("return %0", "return %0, %x", 4, "return", "return gives 2 values but the signature declares 1"),
    ("-> (f32[T,4])", "-> (f32[T,5])", 2, "f32[T,5]", "result %0 has type f32[T,4] but the signature declares f32[T,5]"),
    ("@w) :", "@w) {alpha=1.0} :", 3, "llm.", "llm.linear has no attribute alpha"),
    ("@w) :", "@w) {alpha=} :", 3, "}", "expected a value, found '}'"),
    ("param @w", "param w", 1, "w", "expected a parameter name"),
    ("(%x, @w)", '(%x, @"w\tx")', 3, "@", "malformed string"),
    ("(%x, @w)", '(%x, @"w\\q")', 3, "@", "malformed string"),
    ("  return %0\n", "", 4, "}", "expected an op or 'return'"),
])
def test_parse_errors_point_at_line_and_column(old, new, line, at, message):
    assert old in BASE
    text = BASE.replace(old, new)
    col = text.splitlines()[line - 1].index(at) + 1
    with pytest.raises(ParseError) as e:
        parse(text, source="g.kir")
    assert (e.value.line, e.value.col) == (line, col), str(e.value)
    assert message in e.value.bare
    assert str(e.value).startswith(f"g.kir:{line}:{col}: ")


def test_bad_attribute_values_are_parse_errors():
    text = BASE.replace("llm.linear(%x, @w) : f32[T,4]", 'core.softmax(%x) {dim="x"} : f32[T,8]').replace(
        "-> (f32[T,4])", "-> (f32[T,8])")
    with pytest.raises(ParseError, match=r"3:8: core.softmax attribute dim: expected an int"):
        parse(text)


# --- random graphs --------------------------------------------------------------------------

DIMS = st.sampled_from(["T", "S", "2*T", 1, 2, 3, 4])
FLOATS = st.floats(allow_nan=True, allow_infinity=True)
PARAM_NAMES = ["w", "model.layers.0.mlp.up_proj.weight", "onnx::MatMul_1", 'odd "name" \\ ', "ünï\tx"]
UNARY = ["neg", "exp", "tanh", "sigmoid", "silu", "abs", "relu", "rsqrt", "erf"]
BINARY = ["add", "mul", "sub", "div", "maximum", "minimum", "pow"]


def _types(dtype=None):
    return st.builds(TensorType, st.sampled_from([DType.f32, DType.bf16]) if dtype is None else st.just(dtype),
                     st.lists(DIMS, min_size=1, max_size=3))


class _RandomGraph:
    def __init__(self, draw):
        self.draw = draw
        self.b = Builder(name=draw(st.sampled_from(["main", "forward", "onnx::graph"])))
        self.values = []
        self.nparams = 0

    def param(self, type):
        self.nparams += 1
        return self.b.param(f"{self.draw(st.sampled_from(PARAM_NAMES))}{self.nparams}", type)

    def step(self, x):
        d, b, core = self.draw, self.b, self.b.core
        kind = d(st.sampled_from(["unary", "binary", "broadcast", "cast", "permute", "reshape", "slice", "reduce",
                                  "softmax", "concat", "rms_norm", "linear", "clamp", "where", "constant", "gelu",
                                  "expand", "arange"]))
        loc = d(st.none() | st.text(max_size=8))
        rank, last = x.type.rank, x.type.shape[-1]
        if kind == "unary":
            return b.op(f"core.{d(st.sampled_from(UNARY))}", x, loc=loc)
        if kind == "binary":
            same = [v for v in self.values if v.type == x.type]
            return b.op(f"core.{d(st.sampled_from(BINARY))}", x, d(st.sampled_from(same)), loc=loc)
        if kind == "broadcast":
            return core.mul(self.param(TensorType(x.type.dtype, [last])), x, loc=loc)
        if kind == "cast":
            return core.cast(x, dtype=d(st.sampled_from([DType.f32, DType.bf16, DType.f16])), loc=loc)
        if kind == "permute":
            return core.permute(x, dims=d(st.permutations(range(rank))), loc=loc)
        if kind == "reshape":
            shape = list(x.type.shape)
            merged = shape[:-2] + [-1] if rank >= 2 and 0 not in shape[:-2] else [-1] if 0 not in shape else shape
            return core.reshape(x, shape=d(st.sampled_from([merged, shape])), loc=loc)
        if kind == "slice":
            end = d(st.none() | st.integers(-3, 5) | st.sampled_from(["T", "T+1", "2*S"]))
            dim = d(st.integers(-rank, rank - 1))
            static = isinstance(x.type.shape[dim], int) and not isinstance(end, str)
            return core.slice(x, dim=dim, start=d(st.integers(-2, 3)), end=end,
                              step=d(st.sampled_from([1, 2])) if static else 1, loc=loc)
        if kind == "reduce":
            dims = d(st.lists(st.integers(0, rank - 1), unique=True, max_size=rank))
            return b.op(f"core.{d(st.sampled_from(['sum', 'mean', 'amax', 'amin']))}", x, dims=dims,
                        keepdim=d(st.booleans()), loc=loc)
        if kind == "softmax":
            return b.op(d(st.sampled_from(["core.softmax", "core.log_softmax"])), x,
                        dim=d(st.integers(-rank, rank - 1)), loc=loc)
        if kind == "concat":
            return core.concat(*[x] * d(st.integers(1, 3)), dim=d(st.integers(0, rank - 1)), loc=loc)
        if kind == "rms_norm":
            return b.llm.rms_norm(x, self.param(TensorType(x.type.dtype, [last])), eps=d(FLOATS), loc=loc)
        if kind == "linear":
            n = d(DIMS)
            bias = [self.param(TensorType(x.type.dtype, [n]))] if d(st.booleans()) else []
            return b.llm.linear(x, self.param(TensorType(x.type.dtype, [n, last])), *bias, loc=loc)
        if kind == "clamp":
            return core.clamp(x, min=d(st.none() | FLOATS), max=d(st.none() | FLOATS), loc=loc)
        if kind == "where":
            cond = b.op(f"core.{d(st.sampled_from(['lt', 'ge', 'eq']))}", x, x)
            return core.where(cond, x, core.constant(value=d(FLOATS), dtype=x.type.dtype), loc=loc)
        if kind == "constant":
            value = d(st.integers(-2**40, 2**40) | FLOATS | st.booleans())
            return core.constant(value=value, dtype=d(st.sampled_from([DType.f32, DType.bf16])),
                                 shape=d(st.lists(DIMS, max_size=3)), loc=loc)
        if kind == "gelu":
            return core.gelu(x, approximate=d(st.sampled_from(["none", "tanh"])), loc=loc)
        if kind == "expand":
            return core.expand(x, shape=[d(DIMS)] + [-1] * rank, loc=loc)
        if kind == "arange":
            return core.cast(core.arange(end=d(st.sampled_from(["T", "2*T", "T+S", "S-1", 7])),
                                         start=d(st.integers(0, 3)), dtype=DType.i32), dtype=DType.f32, loc=loc)
        raise AssertionError(kind)


@st.composite
def random_graphs(draw):
    r = _RandomGraph(draw)
    names = ["x", "in put", 'q"uote', "tokens"]
    for name in names[:draw(st.integers(1, 3))]:
        r.values.append(r.b.input(name, draw(_types())))
    for _ in range(draw(st.integers(1, 10))):
        r.values.append(r.step(draw(st.sampled_from([v for v in r.values if v.type.rank]))))
    outputs = draw(st.lists(st.sampled_from(r.values), min_size=1, max_size=3))
    return r.b.build(*outputs)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_graphs())
def test_random_graphs_round_trip_and_verify(g):
    verify(g)
    for locs in (False, True):
        text = print_graph(g, locs=locs)
        again = parse(text)
        verify(again)
        assert print_graph(again, locs=locs) == text
    text = print_graph(g, locs=True)
    data = to_json(g)
    back = from_json(data)
    verify(back)
    assert print_graph(back, locs=True) == text
    assert to_json(back) == data

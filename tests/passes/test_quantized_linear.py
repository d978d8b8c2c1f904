"""fuse-quantized-linear: Before (the quantize pass's Q/DQ) / Expected (the fused ops in the
kernels' operand layouts) for every scheme, the fused graph computing what the Q/DQ graph does,
and every linear of a decoder layer fused."""

import pytest
import torch
from kiln.ir import TensorStorage, interpreter, parse, print_graph
from kiln.ir.ops.quant import awq_unpack
from kiln.passes.calibrate import InputStats, attach_calibration, calibrate
from kiln.passes.manager import PassManager, run_pipeline

LINEAR = """param @fc.weight : f32[16,64]
param @fc.bias : f32[16]
func @main(%x: f32[1,T,64]) -> (f32[1,T,16]) {
  %0 = llm.linear(%x, @fc.weight, @fc.bias) : f32[1,T,16]
  return %0
}
"""

PER_TOKEN = """  %1 = core.reshape(%x) {{shape=[T,64]}} : f32[T,64]
  %14, %15 = quant.quantize_rows(%1) {{dtype={dtype}, eps=1e-06, bound={qmax}}} : ({dtype}[T,64], f32[T])
"""
"""The quantize pass's run-time scale (abs, amax, clamp, divide) and its quantize, folded into one op."""

EXPECTED = {
    "w8a16": """param @fc.bias : f32[16]
param @fc.weight.int8 : i8[16,64]
param @fc.weight.scale : f32[16]
func @main(%x: f32[1,T,64]) -> (f32[1,T,16]) {
  %2 = quant.linear_w8a16(%x, @fc.weight.int8, @fc.weight.scale) : f32[1,T,16]
  %3 = core.add(%2, @fc.bias) : f32[1,T,16]
  return %3
}
""",
    "fp8": """param @fc.bias : f32[16]
param @fc.weight.fp8 : f8e4m3[16,64]
param @fc.weight.scale : f32[]
param @fc.weight.input_scale : f32[]
func @main(%x: f32[1,T,64]) -> (f32[1,T,16]) {
  %1 = quant.quantize(%x, @fc.weight.input_scale) {dtype=f8e4m3} : f8e4m3[1,T,64]
  %4 = quant.linear_fp8(%1, @fc.weight.fp8, @fc.weight.input_scale, @fc.weight.scale) {out_dtype=f32} : f32[1,T,16]
  %5 = core.add(%4, @fc.bias) : f32[1,T,16]
  return %5
}
""",
    "fp8-per-channel": """param @fc.bias : f32[16]
param @fc.weight.fp8 : f8e4m3[16,64]
param @fc.weight.scale : f32[16]
func @main(%x: f32[1,T,64]) -> (f32[1,T,16]) {
""" + PER_TOKEN.format(qmax=448.0, dtype="f8e4m3") + """  %11 = quant.linear_fp8(%14, @fc.weight.fp8, %15, @fc.weight.scale) {out_dtype=f32} : f32[T,16]
  %12 = core.reshape(%11) {shape=[1,T,16]} : f32[1,T,16]
  %13 = core.add(%12, @fc.bias) : f32[1,T,16]
  return %13
}
""",
    "w8a8-sq": """param @fc.bias : f32[16]
param @fc.weight.int8 : i8[16,64]
param @fc.weight.scale : f32[16]
func @main(%x: f32[1,T,64]) -> (f32[1,T,16]) {
""" + PER_TOKEN.format(qmax=127.0, dtype="i8") + """  %11 = quant.linear_int8(%14, @fc.weight.int8, %15, @fc.weight.scale) {out_dtype=f32} : f32[T,16]
  %12 = core.reshape(%11) {shape=[1,T,16]} : f32[1,T,16]
  %13 = core.add(%12, @fc.bias) : f32[1,T,16]
  return %13
}
""",
    "w4a16,group_size=32": """param @fc.bias : f32[16]
param @fc.weight.qweight : i32[64,2]
param @fc.weight.qzeros : i32[2,2]
param @fc.weight.scales : f32[2,16]
func @main(%x: f32[1,T,64]) -> (f32[1,T,16]) {
  %2 = quant.linear_awq(%x, @fc.weight.qweight, @fc.weight.qzeros, @fc.weight.scales) : f32[1,T,16]
  %3 = core.add(%2, @fc.bias) : f32[1,T,16]
  return %3
}
""",
}


def _linear(seed=0):
    g = parse(LINEAR)
    gen = torch.Generator().manual_seed(seed)
    for v in g.params.values():
        v.storage = TensorStorage(torch.randn(*v.type.shape, generator=gen))
    attach_calibration(g, {"fc.weight": InputStats(torch.full((64,), 3.0))})
    return g


@pytest.mark.parametrize("algo", sorted(EXPECTED))
def test_fused_form_before_expected_and_numerics(algo):
    qdq = _linear()
    run_pipeline(qdq, f"quantize{{algo={algo}}}")
    fused = qdq.clone()
    pm = PassManager("fuse-quantized-linear")
    pm.run(fused)
    assert pm.records[0].changes == (2 if "quantize_rows" in EXPECTED[algo] else 1)  # the linear, the scale
    assert print_graph(fused) == EXPECTED[algo]
    x = 2 * torch.randn(1, 9, 64, generator=torch.Generator().manual_seed(3))
    want, got = interpreter.run(qdq, x)[0], interpreter.run(fused, x)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)   # the same numbers, summed in another order


def test_awq_layout_holds_the_quantized_weight():
    qdq = _linear()
    run_pipeline(qdq, "quantize{algo=w4a16,group_size=32}")
    values = qdq.params["fc.weight.int4"].storage.load()         # kiln's signed i4 [N, K]
    zero = qdq.params["fc.weight.zero"].storage.load()
    scale = qdq.params["fc.weight.scale"].storage.load()
    run_pipeline(qdq, "fuse-quantized-linear")
    assert torch.equal(awq_unpack(qdq.params["fc.weight.qweight"].storage.load()), (values.int() + 8).t())
    assert torch.equal(awq_unpack(qdq.params["fc.weight.qzeros"].storage.load()), (zero.int() + 8).t())
    assert torch.equal(qdq.params["fc.weight.scales"].storage.load(), scale.t())


def test_float_linears_stay():
    g = _linear()
    pm = PassManager("fuse-quantized-linear")
    pm.run(g)
    assert pm.records[0].changes == 0 and print_graph(g) == LINEAR
    assert pm.records[0].remarks and "none of the 1 llm.linear ops is the root of its pattern" in pm.records[0].remarks[0]


@pytest.mark.parametrize("pipeline, fused", [
    ("quantize{algo=w8a16}", "quant.linear_w8a16"),
    ("quantize{algo=fp8}", "quant.linear_fp8"),
    ("quantize{algo=fp8-per-channel}", "quant.linear_fp8"),
    ("smooth,quantize{algo=w8a8-sq}", "quant.linear_int8"),
])
def test_every_linear_of_a_decoder_layer_fuses(decoder_layer, pipeline, fused):
    g = decoder_layer.graph()
    attach_calibration(g, calibrate(g, decoder_layer.windows(), progress=False))
    run_pipeline(g, pipeline)
    qdq = g.clone()
    run_pipeline(g, "fuse-quantized-linear,dce")
    counts = g.op_counts()
    assert counts.get(fused) == 4 and "llm.linear" not in counts and "quant.dequantize" not in counts
    for w in decoder_layer.windows(2, seed=9):
        want, got = interpreter.run(qdq, w.int())[0], interpreter.run(g, w.int())[0]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


CHAIN = """func @main(%x: {dt}[T,64]) -> ({q}[T,64], {dt}[T]) {{
  %1 = core.abs(%x) : {dt}[T,64]
  %2 = core.amax(%1) {{dims=[1]}} : {dt}[T]
  %3 = core.clamp(%2) {{min=1e-06}} : {dt}[T]
  %4 = core.constant() {{value={qmax}, dtype={dt}}} : {dt}[]
  %5 = core.div(%3, %4) : {dt}[T]
  %6 = quant.quantize(%x, %5) {{dtype={q}, axis=0}} : {q}[T,64]
  return %6, %5
}}
"""


@pytest.mark.parametrize("dt", ["bf16", "f32"])
@pytest.mark.parametrize("q,qmax", [("f8e4m3", 448.0), ("i8", 127.0)])
def test_a_run_time_row_scale_and_its_quantize_become_quantize_rows_bit_for_bit(dt, q, qmax):
    chain = parse(CHAIN.format(dt=dt, q=q, qmax=qmax))
    fused = chain.clone()
    run_pipeline(fused, "fuse-quantized-linear")
    assert fused.op_counts() == {"quant.quantize_rows": 1}
    x = 3 * torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    x[1] = 0.0                      # the floor (eps) sets this row's scale
    x[2, 5] = 900.0                 # an outlier sets this one's
    x = x.to(torch.bfloat16 if dt == "bf16" else torch.float32)
    for want, got in zip(interpreter.run(chain, x), interpreter.run(fused, x)):
        assert want.dtype == got.dtype and torch.equal(want.float(), got.float())

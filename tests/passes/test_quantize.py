"""The quantize pass and calibration: Before/Expected IR, exact numerics against a hand-computed
dequantize(quantize(w)), exclude patterns, option errors, and perplexity of SmolLM2 quantized."""

import io
import textwrap

import pytest
import torch
import torch.nn.functional as F
from kiln.ir import TensorStorage, interpreter, parse, print_graph
from kiln.ir.types import DType
from kiln.passes.calibrate import (
    InputStats,
    attach_calibration,
    calib_windows,
    calibrate,
    calibrate_text,
    eval_windows,
    load_calibration,
    perplexity,
    pydoc_tokens,
    save_calibration,
)
from kiln.passes.manager import PassError, PassManager, run_pipeline
from kiln.passes.quantize import (
    QuantAlgo,
    QuantConfig,
    activation_amax,
    quantize_graph,
    quantize_with,
)


def ir(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


BEFORE = ir("""
    param @fc.weight : f32[4,8]
    param @fc.bias : f32[4]
    param @lm_head.weight : f32[6,4]
    func @main(%x: f32[T,8]) -> (f32[T,6]) {
      %0 = llm.linear(%x, @fc.weight, @fc.bias) : f32[T,4]
      %1 = llm.linear(%0, @lm_head.weight) : f32[T,6]
      return %1
    }
    """)


def _graph(text: str = BEFORE, seed: int = 0):
    g = parse(text)
    gen = torch.Generator().manual_seed(seed)
    for v in g.params.values():
        v.storage = TensorStorage(torch.randn(*v.type.shape, generator=gen))
    return g


def _run(g, x):
    return interpreter.run(g, x)[0]


def test_w8a16_before_expected_and_exact_numerics():
    before = _graph()
    w, bias, head = (before.params[n].storage.load() for n in ("fc.weight", "fc.bias", "lm_head.weight"))
    after = before.clone()
    out = io.StringIO()
    run_pipeline(after, "quantize{algo=w8a16}", print_after_all=True, stream=out)
    assert print_graph(after) == ir("""
        param @fc.bias : f32[4]
        param @lm_head.weight : f32[6,4]
        param @fc.weight.int8 : i8[4,8]
        param @fc.weight.scale : f32[4]
        func @main(%x: f32[T,8]) -> (f32[T,6]) {
          %2 = quant.dequantize(@fc.weight.int8, @fc.weight.scale) {axis=0} : f32[4,8]
          %0 = llm.linear(%x, %2, @fc.bias) : f32[T,4]
          %1 = llm.linear(%0, @lm_head.weight) : f32[T,6]
          return %1
        }
        """)
    assert "(1 changes)" in out.getvalue()
    # the hand-computed reference: symmetric int8, one scale per output row, round half to even
    scale = w.abs().amax(1) / 127
    q = torch.round(w / scale[:, None]).clamp(-128, 127)
    assert torch.equal(after.params["fc.weight.int8"].storage.load(), q.to(torch.int8))
    assert torch.equal(after.params["fc.weight.scale"].storage.load(), scale)
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    want = F.linear(F.linear(x, q * scale[:, None], bias), head)
    assert torch.equal(_run(after, x), want)
    # and close to the float graph: each weight moves by at most half a step
    assert ((q * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-7).all()
    torch.testing.assert_close(_run(after, x), _run(before, x), atol=0.05, rtol=0.02)


def test_fp8_per_tensor_before_expected_and_exact_numerics():
    before = _graph()
    w, bias, head = (before.params[n].storage.load() for n in ("fc.weight", "fc.bias", "lm_head.weight"))
    after = before.clone()
    assert quantize_with(after, "fp8", {"fc.weight": InputStats(torch.tensor([1.0, 2.0, 3.5, 0.5] * 2))}) == 1
    assert print_graph(after) == ir("""
        param @fc.bias : f32[4]
        param @lm_head.weight : f32[6,4]
        param @fc.weight.fp8 : f8e4m3[4,8]
        param @fc.weight.scale : f32[]
        param @fc.weight.input_scale : f32[]
        func @main(%x: f32[T,8]) -> (f32[T,6]) {
          %2 = quant.quantize(%x, @fc.weight.input_scale) {dtype=f8e4m3} : f8e4m3[T,8]
          %3 = quant.dequantize(%2, @fc.weight.input_scale) : f32[T,8]
          %4 = quant.dequantize(@fc.weight.fp8, @fc.weight.scale) : f32[4,8]
          %0 = llm.linear(%3, %4, @fc.bias) : f32[T,4]
          %1 = llm.linear(%0, @lm_head.weight) : f32[T,6]
          return %1
        }
        """)
    x_scale, w_scale = torch.tensor(3.5 / 448), w.abs().amax() / 448
    assert after.params["fc.weight.input_scale"].storage.load() == x_scale
    x = 3 * torch.randn(5, 8, generator=torch.Generator().manual_seed(1))   # some of it saturates at 3.5
    xq = (x / x_scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * x_scale
    wq = (w / w_scale).to(torch.float8_e4m3fn).float() * w_scale
    assert torch.equal(_run(after, x), F.linear(F.linear(xq, wq, bias), head))
    inside = x.clamp(-3.5, 3.5)                                             # e4m3 keeps 3 mantissa bits
    torch.testing.assert_close(_run(after, inside), _run(before, inside), atol=0.3, rtol=0.13)


def test_fp8_mse_amax_searches_the_activation_scale_on_calibration_rows():
    gen = torch.Generator().manual_seed(4)
    plain = torch.randn(256, 8, generator=gen)
    outlier = plain.clone()
    outlier[0, 0] = 60.0

    def error(x, bound):   # e4m3 round trip with scale bound / 448, by hand
        s = torch.tensor(bound) / 448
        return ((x / s).clamp(-448, 448).to(torch.float8_e4m3fn).float() * s - x).pow(2).mean().item()

    bounds = {}
    for name, x in (("plain", plain), ("outlier", outlier)):
        stats = InputStats(x.abs().amax(0), x.abs().mean(0), x)
        bounds[name] = activation_amax(stats, "mse", DType.f8e4m3)
        candidates = [stats.amax * (1 - i / 100) for i in range(31)]
        assert error(x, bounds[name]) <= min(error(x, b) for b in candidates) * (1 + 1e-6)
        assert activation_amax(stats, "max", DType.f8e4m3) == stats.amax
    assert bounds["plain"] < plain.abs().max().item()     # here the grid fits the rows better a little lower
    assert bounds["outlier"] == 60.0                      # clipping a lone outlier costs more than it saves
    after = _graph()
    stats = InputStats(plain.abs().amax(0), None, plain)
    assert quantize_with(after, "fp8", {"fc.weight": stats}, amax_method="mse") == 1
    assert after.params["fc.weight.input_scale"].storage.load() == torch.tensor(bounds["plain"]) / 448
    assert QuantConfig("fp8", amax_method="mse").pipeline().endswith("amax=mse}")
    assert (QuantConfig("fp8", amax_method="mse").calibration_rows, QuantConfig("fp8").calibration_rows) == (512, 0)
    with pytest.raises(ValueError, match=r"kept none: calibrate with rows > 0 \(calibrate\{rows=512\}"):
        quantize_with(_graph(), "fp8", {"fc.weight": InputStats(plain.abs().amax(0))}, amax_method="mse")
    with pytest.raises(ValueError, match="amax_method must be one of max, mse"):
        QuantConfig("fp8", amax_method="percentile")


def test_fp8_per_channel_weights_and_per_token_activations():
    before = _graph()
    w, bias, head = (before.params[n].storage.load() for n in ("fc.weight", "fc.bias", "lm_head.weight"))
    after = before.clone()
    run_pipeline(after, "quantize{algo=fp8_per_channel}")
    assert print_graph(after) == ir("""
        param @fc.bias : f32[4]
        param @lm_head.weight : f32[6,4]
        param @fc.weight.fp8 : f8e4m3[4,8]
        param @fc.weight.scale : f32[4]
        func @main(%x: f32[T,8]) -> (f32[T,6]) {
          %2 = core.abs(%x) : f32[T,8]
          %3 = core.amax(%2) {dims=[1]} : f32[T]
          %4 = core.clamp(%3) {min=1e-06} : f32[T]
          %5 = core.constant() {value=448.0, dtype=f32} : f32[]
          %6 = core.div(%4, %5) : f32[T]
          %7 = quant.quantize(%x, %6) {dtype=f8e4m3, axis=0} : f8e4m3[T,8]
          %8 = quant.dequantize(%7, %6) {axis=0} : f32[T,8]
          %9 = quant.dequantize(@fc.weight.fp8, @fc.weight.scale) {axis=0} : f32[4,8]
          %0 = llm.linear(%8, %9, @fc.bias) : f32[T,4]
          %1 = llm.linear(%0, @lm_head.weight) : f32[T,6]
          return %1
        }
        """)
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    x[2] *= 100                                                   # one loud token does not cost the others
    x[3] = 0                                                      # and a silent one stays zero
    x_scale = x.abs().amax(1, keepdim=True).clamp(min=1e-6) / 448
    w_scale = w.abs().amax(1, keepdim=True) / 448
    xq = (x / x_scale).to(torch.float8_e4m3fn).float() * x_scale
    wq = (w / w_scale).to(torch.float8_e4m3fn).float() * w_scale
    assert torch.equal(_run(after, x), F.linear(F.linear(xq, wq, bias), head))
    assert ((xq - x).abs() <= x.abs() / 16 + x_scale * 2**-9).all()    # half a step of 3 mantissa bits
    got, want = _run(after, x), _run(before, x)
    assert ((got - want).norm(dim=1) <= 0.1 * want.norm(dim=1)).all()  # every token, the quiet ones too
    # tokens in a [1, T, K] input are still rows: the same numbers through a reshape
    batched = _graph(BEFORE.replace("f32[T,", "f32[1,T,"))
    run_pipeline(batched, "quantize{algo=fp8-per-channel}")
    assert "core.reshape(%x) {shape=[T,8]} : f32[T,8]" in print_graph(batched)
    assert torch.equal(_run(batched, x[None])[0], _run(after, x))


def test_a_weight_read_by_two_linears_is_quantized_once():
    g = _graph(BEFORE.replace("llm.linear(%0, @lm_head.weight) : f32[T,6]", "llm.linear(%x, @fc.weight) : f32[T,4]")
               .replace("-> (f32[T,6])", "-> (f32[T,4], f32[T,4])").replace("return %1", "return %0, %1"))
    assert quantize_with(g, "w8a16") == 2
    assert [n for n in g.params if "fc.weight" in n] == ["fc.weight.int8", "fc.weight.scale"]


def test_shared_weight_stays_and_computed_weight_is_skipped_with_a_remark():
    text = ir("""
        param @emb.weight : f32[16,8]
        param @w.weight : f32[8,8]
        func @main(%tokens: i32[T]) -> (f32[T,16], f32[T,8]) {
          %0 = llm.embedding(@emb.weight, %tokens) : f32[T,8]
          %1 = llm.linear(%0, @emb.weight) : f32[T,16]
          %2 = core.neg(@w.weight) : f32[8,8]
          %3 = llm.linear(%0, %2) : f32[T,8]
          return %1, %3
        }
        """)
    g = _graph(text)
    pm = PassManager("quantize{embedding=none}")
    pm.run(g)
    assert (pm.records[0].changes, pm.records[0].remarks) == (
        1, ["linear at %3 is not quantized: its weight %2 is computed, not a parameter"])
    assert "@emb.weight : f32[16,8]" in print_graph(g) and "@emb.weight.int8 : i8[16,8]" in print_graph(g)
    assert "llm.embedding(@emb.weight, %tokens)" in print_graph(g)
    again = io.StringIO()
    run_pipeline(g, "quantize{embedding=none}", print_after_all=True, print_changed=True, stream=again)
    assert again.getvalue() == (
        "// quantize{embedding=none}: no change\n"
        "//   linear at %1 is not quantized: its weight %4 is computed, not a parameter\n"
        "//   linear at %3 is not quantized: its weight %2 is computed, not a parameter\n")


TABLE = ir("""
    param @emb.weight : f32[16,8]
    param @fc.weight : f32[8,8]
    param @lm_head.weight : f32[16,8]
    func @main(%tokens: i32[T]) -> (f32[T,16]) {
      %0 = llm.embedding(@emb.weight, %tokens) : f32[T,8]
      %1 = llm.linear(%0, @fc.weight) : f32[T,8]
      %2 = llm.linear(%1, @lm_head.weight) : f32[T,16]
      return %2
    }
    """)


def test_the_token_table_is_int8_per_row_and_its_lookup_reads_rows_only():
    before = _graph(TABLE)
    table = before.params["emb.weight"].storage.load()
    after = before.clone()
    run_pipeline(after, "quantize{algo=w8a16}")
    assert print_graph(after) == ir("""
        param @lm_head.weight : f32[16,8]
        param @fc.weight.int8 : i8[8,8]
        param @fc.weight.scale : f32[8]
        param @emb.weight.int8 : i8[16,8]
        param @emb.weight.scale : f32[16]
        func @main(%tokens: i32[T]) -> (f32[T,16]) {
          %4 = quant.dequantize(@emb.weight.int8, @emb.weight.scale) {axis=0} : f32[16,8]
          %0 = llm.embedding(%4, %tokens) : f32[T,8]
          %3 = quant.dequantize(@fc.weight.int8, @fc.weight.scale) {axis=0} : f32[8,8]
          %1 = llm.linear(%0, %3) : f32[T,8]
          %2 = llm.linear(%1, @lm_head.weight) : f32[T,16]
          return %2
        }
        """)
    scale = table.abs().amax(1) / 127      # symmetric int8 per row, round half to even
    assert torch.equal(after.params["emb.weight.int8"].storage.load(), torch.round(table / scale[:, None]).to(torch.int8))
    fused = after.clone()
    run_pipeline(fused, "fuse-quantized-linear,dce")
    assert "quant.embedding(@emb.weight.int8, @emb.weight.scale, %tokens) : f32[T,8]" in print_graph(fused)
    ids = torch.tensor([0, 15, 3, 3, 9], dtype=torch.int32)
    torch.testing.assert_close(_run(fused, ids), _run(after, ids), atol=1e-5, rtol=1e-5)   # f32 sums in another order
    assert (_run(after, ids) - _run(before, ids)).norm() < 0.02 * _run(before, ids).norm()
    kept = before.clone()
    run_pipeline(kept, "quantize{algo=w8a16,embedding=none}")
    assert "llm.embedding(@emb.weight, %tokens)" in print_graph(kept)


@pytest.mark.parametrize("lm_head, params", [
    ("", {"emb.weight": "f32[16,8]"}),                                        # float head: the table stays float
    ("w8a16", {"emb.weight.int8": "i8[16,8]", "emb.weight.scale": "f32[16]"}),  # one int8 tensor for both
    ("fp8-per-channel", {"emb.weight.fp8": "f8e4m3[16,8]", "emb.weight.scale": "f32[16]"}),
    ("w4a16", {"emb.weight.int4": "i4[16,8]", "emb.weight.scale": "f32[16,1]", "emb.weight.zero": "i8[16,1]",
               "emb.weight.int8": "i8[16,8]", "emb.weight.scale.1": "f32[16]"}),   # int4 rows cannot be looked up
])
def test_a_table_tied_to_the_lm_head(lm_head, params):
    tied = _graph(TABLE.replace("param @lm_head.weight : f32[16,8]\n", "")
                  .replace("@lm_head.weight) : f32[T,16]", '@emb.weight) : f32[T,16] loc("lm_head")'))
    pm = PassManager(f"quantize{{algo=w8a16,group_size=8,lm_head={lm_head}}}")
    after = pm.run(tied.clone())
    assert {n: str(p.type) for n, p in after.params.items() if n.startswith("emb")} == params
    if not lm_head:
        assert pm.records[0].remarks[-1] == (
            "lookup at %0 keeps a float table: @emb.weight is also read by llm.linear at %2 (a tied lm_head, kept "
            "float), and an int8 copy beside it would add memory; lm_head='w8a16' quantizes both as one")
    ids = torch.tensor([1, 14, 7], dtype=torch.int32)
    fused = after.clone()
    run_pipeline(fused, "fuse-quantized-linear,dce")
    torch.testing.assert_close(_run(fused, ids), _run(after, ids), atol=1e-4, rtol=1e-4)
    assert (_run(fused, ids) - _run(tied, ids)).norm() < 0.15 * _run(tied, ids).norm()   # int4 rows: ~10%


@pytest.mark.parametrize("exclude, kept", [
    ("fc", {"fc.weight"}),                          # a module name
    ("*.bias|fc.weight", {"fc.weight"}),            # the weight's own name, among others
    ("nothing", set()),                             # lm_head is quantized once it is not excluded
    ("lm_head|*.lm_head", {"lm_head.weight"}),      # the default, spelled out
])
def test_exclude_patterns(exclude, kept):
    g = _graph()
    out = io.StringIO()
    run_pipeline(g, f"quantize{{algo=w8a16,exclude={exclude}}}", print_diff=True, stream=out)
    float_weights = {n for n in ("fc.weight", "lm_head.weight") if n in g.params}
    assert float_weights == kept
    assert {n for n in g.params if n.endswith(".int8")} == {f"{n}.int8" for n in {"fc.weight", "lm_head.weight"} - kept}


def test_excluded_linear_is_remarked():
    pm = PassManager("quantize{exclude=fc|lm_head}")
    pm.run(_graph())
    assert pm.records[0].changes == 0
    assert pm.records[0].remarks == ["linear at %0 is not quantized: excluded by 'fc'",
                                     "linear at %1 is not quantized: excluded by 'lm_head'"]


def test_fp8_skips_a_linear_the_calibration_never_saw(tmp_path):
    save_calibration({"lm_head.weight": InputStats(torch.ones(4))}, tmp_path / "c.safetensors")
    pm = PassManager(f"quantize{{algo=fp8,exclude=,calib={tmp_path / 'c.safetensors'}}}")
    g = pm.run(_graph())
    assert (pm.records[0].changes, pm.records[0].remarks) == (
        1, ["linear at %0 is not quantized: the calibration has no input statistics for @fc.weight"])
    assert "@fc.weight : f32[4,8]" in print_graph(g) and "@lm_head.weight.fp8" in print_graph(g)


def test_unknown_algo_lists_the_known_ones():
    with pytest.raises(PassError, match="unknown quantization algorithm 'int3'; known: fp8, fp8-per-channel, "
                                        "w8a8-sq, w4a16-awq, w4a16, w8a16, llm.int8, fp8-kv"):
        run_pipeline(_graph(), "quantize{algo=int3}")
    with pytest.raises(ValueError, match="unknown quantization algorithm"):
        QuantConfig("fp16")


@pytest.mark.parametrize("short, algo, kv", [
    ("fp8", QuantAlgo.FP8, None), ("fp8-per-channel", QuantAlgo.FP8_PER_CHANNEL, None),
    ("int8_sq", QuantAlgo.W8A8_SQ, None), ("w8a8-sq", QuantAlgo.W8A8_SQ, None),
    ("int4_awq", QuantAlgo.W4A16_AWQ, None), ("W4A16_AWQ", QuantAlgo.W4A16_AWQ, None),
    ("int8_wo", QuantAlgo.W8A16, None), ("w8a16", QuantAlgo.W8A16, None), ("llm.int8", QuantAlgo.LLM_INT8, None),
    ("fp8_kv", None, QuantAlgo.FP8_KV), ("fp8+fp8_kv", QuantAlgo.FP8, QuantAlgo.FP8_KV),
])
def test_short_forms(short, algo, kv):
    config = QuantConfig.of(short)
    assert (config.quant_algo, config.kv_cache_quant_algo) == (algo, kv)
    assert QuantConfig.from_json(config.to_json()) == config


def test_short_forms_carry_options():
    config = QuantConfig.of("w4a16+lm_head=w8a16+embedding=none+group_size=64+zero_point=false+exclude_modules=a|b")
    assert config == QuantConfig("w4a16", lm_head=QuantAlgo.W8A16, embedding=None, group_size=64, zero_point=False,
                                 exclude_modules=("a", "b"))
    assert QuantConfig.from_json(config.to_json()) == config
    assert config.pipeline() == ("quantize{algo=w4a16,exclude=a|b,group_size=64,zero_point=false,embedding=none,"
                                 "lm_head=w8a16}")
    with pytest.raises(ValueError, match="unknown option 'lm_head_algo' in a quant short form; known: amax_method"):
        QuantConfig.of("fp8+lm-head-algo=w8a16")
    with pytest.raises(ValueError, match="group_size='big': give a number"):
        QuantConfig.of("w4a16+group_size=big")


@pytest.mark.parametrize("kwargs, message", [
    ({"quant_algo": QuantAlgo.FP8_KV}, "fp8-kv is a kv_cache_quant_algo"),
    ({"quant_algo": None}, "quantizes nothing"),
    ({"quant_algo": "w8a16", "kv_cache_quant_algo": "w8a16"}, "kv_cache_quant_algo must be fp8-kv"),
    ({"quant_algo": "int4_awq", "group_size": 96}, "group_size must be a power of two of at least 32"),
    ({"quant_algo": "w8a8-sq", "smoothquant_val": 1.5}, r"alpha\) must be in \[0, 1\]"),
    ({"quant_algo": "llm.int8", "int8_threshold": 0}, "int8_threshold must be positive"),
    ({"quant_algo": "fp8", "lm_head": "int4_awq"}, "the lm_head takes w8a16, w4a16, fp8-per-channel, fp8 "),
    ({"quant_algo": "fp8", "embedding": "fp8"}, "the token table is kept as int8"),
])
def test_configs_that_cannot_work_fail_at_once(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantConfig(**kwargs)
    with pytest.raises(ValueError, match="names two algorithms"):
        QuantConfig.of("fp8+w8a16")


def test_fp8_needs_a_gpu_with_fp8():
    for config in (QuantConfig("fp8"), QuantConfig("w8a16", "fp8-kv")):
        with pytest.raises(ValueError, match=r"needs a GPU with FP8 support \(compute capability 8.9 .* 8.0"):
            config.check_device((8, 0))
        config.check_device((9, 0))     # H100
        config.check_device((8, 9))     # L4, L40
        config.check_device(None)       # no GPU: the reference interpreter computes FP8 itself
    QuantConfig("int4_awq").check_device((7, 5))


def test_int4_group_size_that_does_not_divide_k_is_an_error_before_any_work():
    g = _graph(BEFORE.replace("f32[4,8]", "f32[8,96]").replace("f32[T,8]", "f32[T,96]")
               .replace("f32[4]", "f32[8]").replace("f32[T,4]", "f32[T,8]").replace("f32[6,4]", "f32[6,8]"))
    with pytest.raises(PassError, match=r"group_size=64 does not fit 1 linears: fc.weight is \[8, 96\] .* in_features here: "
                                        r"\[96\].*group_size=32 divides every in_features"):
        run_pipeline(g, "quantize{algo=w4a16,group_size=64}")
    with pytest.raises(ValueError, match="does not fit"):
        QuantConfig("int4_awq", group_size=64).check_graph(g)


def test_w4a16_groups_with_zero_points_round_like_autoawq():
    g = _graph(BEFORE.replace("f32[4,8]", "f32[8,64]").replace("f32[T,8]", "f32[T,64]")
               .replace("f32[4]", "f32[8]").replace("f32[T,4]", "f32[T,8]").replace("f32[6,4]", "f32[6,8]"))
    w, bias, head = (g.params[n].storage.load() for n in ("fc.weight", "fc.bias", "lm_head.weight"))
    run_pipeline(g, "quantize{algo=w4a16,group_size=32}")
    assert print_graph(g) == ir("""
        param @fc.bias : f32[8]
        param @lm_head.weight : f32[6,8]
        param @fc.weight.int4 : i4[8,64]
        param @fc.weight.scale : f32[8,2]
        param @fc.weight.zero : i8[8,2]
        func @main(%x: f32[T,64]) -> (f32[T,6]) {
          %2 = quant.dequantize(@fc.weight.int4, @fc.weight.scale, @fc.weight.zero) {axis=1, group_size=32} : f32[8,64]
          %0 = llm.linear(%x, %2, @fc.bias) : f32[T,8]
          %1 = llm.linear(%0, @lm_head.weight) : f32[T,6]
          return %1
        }
        """)
    groups = w.reshape(8, 2, 32)
    scale = (groups.amax(-1) - groups.amin(-1)) / 15                 # AutoAWQ: (max - min) / (2^4 - 1)
    zero = (-torch.round(groups.amin(-1) / scale)).clamp(0, 15)     # unsigned zero point
    q = (torch.round(groups / scale[..., None]) + zero[..., None]).clamp(0, 15)
    assert torch.equal(g.params["fc.weight.int4"].storage.load(), (q - 8).reshape(8, 64).to(torch.int8))
    assert torch.equal(g.params["fc.weight.zero"].storage.load(), (zero - 8).to(torch.int8))
    deq = ((q - zero[..., None]) * scale[..., None]).reshape(8, 64)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(_run(g, x), F.linear(F.linear(x, deq, bias), head))


def test_llm_int8_keeps_outlier_features_in_float():
    g = _graph()
    w, bias, head = (g.params[n].storage.load() for n in ("fc.weight", "fc.bias", "lm_head.weight"))
    pm = PassManager("quantize{algo=llm.int8}")
    attach_calibration(g, {"fc.weight": InputStats(torch.tensor([1.0, 9.0, 0.5, 7.0, 1, 1, 1, 1]))})
    pm.run(g)
    assert pm.records[0].remarks[0] == "fc.weight: 2 of 8 input features stay float (|x| max > 6)"
    assert print_graph(g) == ir("""
        param @fc.bias : f32[4]
        param @lm_head.weight : f32[6,4]
        param @fc.weight.inlier_columns : i64[6]
        param @fc.weight.outlier_columns : i64[2]
        param @fc.weight.outliers : f32[4,2]
        param @fc.weight.inliers.int8 : i8[4,6]
        param @fc.weight.inliers.scale : f32[4]
        func @main(%x: f32[T,8]) -> (f32[T,6]) {
          %2 = core.gather(%x, @fc.weight.inlier_columns) {dim=-1} : f32[T,6]
          %3 = core.gather(%x, @fc.weight.outlier_columns) {dim=-1} : f32[T,2]
          %7 = core.abs(%2) : f32[T,6]
          %8 = core.amax(%7) {dims=[1]} : f32[T]
          %9 = core.clamp(%8) {min=1e-06} : f32[T]
          %10 = core.constant() {value=127.0, dtype=f32} : f32[]
          %11 = core.div(%9, %10) : f32[T]
          %12 = quant.quantize(%2, %11) {dtype=i8, axis=0} : i8[T,6]
          %13 = quant.dequantize(%12, %11) {axis=0} : f32[T,6]
          %14 = quant.dequantize(@fc.weight.inliers.int8, @fc.weight.inliers.scale) {axis=0} : f32[4,6]
          %4 = llm.linear(%13, %14, @fc.bias) : f32[T,4]
          %5 = llm.linear(%3, @fc.weight.outliers) : f32[T,4]
          %6 = core.add(%4, %5) : f32[T,4]
          %1 = llm.linear(%6, @lm_head.weight) : f32[T,6]
          return %1
        }
        """)
    assert g.params["fc.weight.outlier_columns"].storage.load().tolist() == [1, 3]
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    x[:, 1] *= 40                                              # the outlier feature: it would flatten int8 rows
    inl, out = [0, 2, 4, 5, 6, 7], [1, 3]
    xs = x[:, inl].abs().amax(1, keepdim=True) / 127
    ws = w[:, inl].abs().amax(1, keepdim=True) / 127
    xq = torch.round(x[:, inl] / xs).clamp(-128, 127) * xs
    wq = torch.round(w[:, inl] / ws).clamp(-128, 127) * ws
    want = F.linear(F.linear(xq, wq, bias) + x[:, out] @ w[:, out].t(), head)
    torch.testing.assert_close(_run(g, x), want)


def test_fp8_kv_cache_rounds_k_and_v_through_e4m3(decoder_layer):
    g = decoder_layer.graph()
    calib = calibrate(g, decoder_layer.windows(), progress=False)
    q = g.clone()
    assert quantize_graph(q, QuantConfig(None, "fp8-kv"), calib) == 1
    text = print_graph(q)
    assert "param @kv.0.k_scale : f32[]\nparam @kv.0.v_scale : f32[]\n" in text
    assert ir("""
          %25 = quant.quantize(%10, @kv.0.k_scale) {dtype=f8e4m3} : f8e4m3[1,1,T,4]
          %26 = quant.dequantize(%25, @kv.0.k_scale) : f32[1,1,T,4]
          %27 = quant.quantize(%12, @kv.0.v_scale) {dtype=f8e4m3} : f8e4m3[1,1,T,4]
          %28 = quant.dequantize(%27, @kv.0.v_scale) : f32[1,1,T,4]
          %13 = llm.attention(%8, %26, %28) {causal=true} : f32[1,2,T,4]
        """).replace("\n", "").strip() in text.replace("\n  ", "")
    assert float(q.params["kv.0.k_scale"].storage.load()) == pytest.approx(calib["k_cache.0"].amax / 448)
    w = decoder_layer.windows(1, seed=4)[0].int()
    got, want = interpreter.run(q, w)[0], interpreter.run(g, w)[0]   # 3 mantissa bits in k and v, and a peaky
    assert 0 < (got - want).norm() < 0.15 * want.norm()              # softmax of random weights
    rows = calibrate(g, decoder_layer.windows(), progress=False, rows=32)   # k/v rows kept: the mse search
    searched = g.clone()
    assert quantize_graph(searched, QuantConfig(None, "fp8-kv", amax_method="mse"), rows) == 1
    for kv in ("k", "v"):
        stats = rows[f"{kv}_cache.0"]
        assert stats.rows.shape == (32, 4) and torch.equal(stats.channel_amax, calib[f"{kv}_cache.0"].channel_amax)
        assert float(searched.params[f"kv.0.{kv}_scale"].storage.load()) == pytest.approx(
            activation_amax(stats, "mse", DType.f8e4m3) / 448)


CALIB = ir("""
    param @emb : f32[16,8]
    param @up.weight : f32[12,8]
    param @down.weight : f32[8,12]
    func @main(%tokens: i32[T]) -> (f32[T,8]) {
      %0 = llm.embedding(@emb, %tokens) : f32[T,8]
      %1 = llm.linear(%0, @up.weight) : f32[T,12]
      %2 = core.silu(%1) : f32[T,12]
      %3 = llm.linear(%2, @down.weight) : f32[T,8]
      return %3
    }
    """)


def test_calibrate_records_per_channel_input_amax_and_feeds_the_pass(tmp_path):
    g = _graph(CALIB)
    emb, up = g.params["emb"].storage.load(), g.params["up.weight"].storage.load()
    windows = [torch.tensor([1, 2, 3]), torch.tensor([4, 5, 3, 9])]
    calib = calibrate(g, windows, progress=False)
    assert set(calib) == {"up.weight", "down.weight"}
    seen = emb[torch.tensor([1, 2, 3, 4, 5, 9])]
    assert torch.equal(calib["up.weight"].channel_amax, seen.abs().amax(0))
    hidden = torch.cat([F.silu(F.linear(emb[w], up)) for w in windows])   # per window, as the graph ran them
    assert torch.equal(calib["down.weight"].channel_amax, hidden.abs().amax(0))
    assert calib["up.weight"].amax == float(seen.abs().max())
    save_calibration(calib, tmp_path / "calib.safetensors")
    loaded = load_calibration(tmp_path / "calib.safetensors")
    assert loaded.keys() == calib.keys() and all(torch.equal(loaded[n].channel_amax, calib[n].channel_amax) for n in calib)
    by_pipeline, by_python = g.clone(), g.clone()
    run_pipeline(by_pipeline, f"quantize{{algo=fp8,calib={tmp_path / 'calib.safetensors'}}}")
    assert quantize_with(by_python, "fp8", calib) == 3   # two linears and the table
    assert print_graph(by_pipeline) == print_graph(by_python)
    assert torch.equal(interpreter.run(by_pipeline, windows[1].int())[0], interpreter.run(by_python, windows[1].int())[0])


def test_calibrate_text_tokenizes_user_text_and_keeps_the_second_half_out():
    g = _graph(CALIB)
    tokenizer = lambda text, add_special_tokens: {"input_ids": [ord(c) % 16 for c in text]}
    text = "abcdefgh" + "pppppppp"                     # only "abcdefgh" (ids 1..8) is for calibration
    calib = calibrate_text(g, tokenizer, text=text, samples=2, length=4, progress=False)
    emb = g.params["emb"].storage.load()
    assert torch.equal(calib["up.weight"].channel_amax, emb[1:9].abs().amax(0))
    with pytest.raises(ValueError, match="give text or tokens, not both"):
        calibrate_text(g, tokenizer, text=text, tokens=[1, 2])


def test_calibration_and_evaluation_windows_are_disjoint():
    stream = torch.arange(1000)
    cal, ev = calib_windows(stream, 4, 100), eval_windows(stream, 4, 100)
    assert not set(torch.cat(cal).tolist()) & set(torch.cat(ev).tolist())
    assert torch.equal(torch.cat(ev), stream[600:])
    with pytest.raises(ValueError, match="only half of the 1000 are for calibration"):
        calib_windows(stream, 6, 100)


# -- accuracy on the real model ------------------------------------------------------------------

def test_smollm2_perplexity_w8a16_and_fp8s(smollm2):
    graph, _, tokenizer = smollm2
    g = graph.clone()
    run_pipeline(g, "stateless")
    stream = pydoc_tokens(tokenizer)
    calib = calibrate(g, calib_windows(stream, 16, 128), progress=False)
    held_out = eval_windows(stream, 8, 128)
    figures = {"f32": perplexity(g, held_out)}
    for algo in ("w8a16", "fp8", "fp8-per-channel"):
        q = g.clone()
        assert quantize_with(q, algo, calib) == 120                       # 30 layers x (qkv, o, gate/up, down)
        assert "@model.embed_tokens.weight" in print_graph(q)             # the tied lm_head stays float
        figures[algo] = perplexity(q, held_out)
    print("\nSmolLM2-135M perplexity on pydoc_data.topics (8 x 128 held-out tokens, 16 x 128 to calibrate): "
          + ", ".join(f"{k} {v:.3f} ({100 * (v / figures['f32'] - 1):+.2f}%)" for k, v in figures.items()))
    assert 5 < figures["f32"] < 60
    assert figures["w8a16"] < figures["f32"] * 1.02
    assert figures["fp8"] < figures["f32"] * 1.10
    assert figures["fp8-per-channel"] < figures["f32"] * 1.10

"""GPTQ rounding: the lazy-block sweep equals a plain float64 GPTQ written here (the OBS form,
removing one column at a time from H^-1) on the same grid, its values lie on the grid, it lowers a
layer's output error below rounding to nearest on correlated inputs, and `quantize{rounding=gptq}`
keeps the IR, the grid and the stored format of rounding to nearest (AWQ's too) while bringing a tiny
Llama closer to its float self, through the pipeline and kiln.compile."""

import textwrap

import pytest
import torch
from kiln import api
from kiln.frontends import load
from kiln.frontends.hf import tokenizer_for
from kiln.ir import TensorStorage, interpreter, parse, print_graph
from kiln.ir.types import DType
from kiln.passes.calibrate import (
    InputStats,
    calib_windows,
    calibrate,
    eval_windows,
    pydoc_tokens,
    save_calibration,
)
from kiln.passes.gptq import expand_grid, gptq_round
from kiln.passes.manager import PassError, run_pipeline
from kiln.passes.quantize import (
    QuantConfig,
    int4_group_params,
    quantize_with,
    weight_scale,
)

E4M3 = torch.float8_e4m3fn


def _grid(w: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor | None, int | None, int | None, DType]:
    """(scale, zero, axis, group_size, dtype) as the quantize pass computes them for `kind`."""
    if kind == "int4-zero":
        scale, zero = int4_group_params(w, 16, True, torch.float32)
        return scale, zero, 1, 16, DType.i4
    if kind == "int4-symmetric":
        return int4_group_params(w, 16, False, torch.float32)[0], None, 1, 16, DType.i4
    if kind == "int8-channel":
        return weight_scale(w, 127, 0), None, 0, None, DType.i8
    if kind == "fp8-tensor":
        return weight_scale(w, 448, None), None, None, None, DType.f8e4m3
    return weight_scale(w, 448, 0), None, 0, None, DType.f8e4m3


def _per_column(p: torch.Tensor | None, axis: int | None, group: int | None, shape) -> torch.Tensor:
    """A scale or zero point as one f64 value per weight entry."""
    if p is None:
        return torch.zeros(shape, dtype=torch.float64)
    p = p.double()
    if axis is None:
        return p.expand(shape)
    return p[:, None].expand(shape) if group is None else p.repeat_interleave(group, 1)


def _round(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, dtype: DType) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, dequantized) of a column: half to even, saturated, as quant.quantize rounds."""
    if dtype is DType.f8e4m3:
        q = (w / s).clamp(-448, 448).float().to(E4M3)
        return q, q.double() * s
    lo, hi = (-8, 7) if dtype is DType.i4 else (-128, 127)
    q = (torch.round(w / s) + z).clamp(lo, hi)
    return q, (q - z) * s


def reference_gptq(w: torch.Tensor, h: torch.Tensor, scale, zero, axis, group, dtype: DType) -> torch.Tensor:
    """GPTQ in its OBS form, float64: quantize column j, spread its error over the remaining columns
    through the inverse Hessian of those columns, then remove column j from that inverse."""
    w = w.double().clone()
    s, z = _per_column(scale, axis, group, w.shape), _per_column(zero, axis, group, w.shape)
    h = h.double().clone()
    h += 0.01 * torch.diagonal(h).mean() * torch.eye(len(h), dtype=torch.float64)
    hinv = torch.linalg.inv(h)
    out = []
    for j in range(w.shape[1]):
        q, dq = _round(w[:, j], s[:, j], z[:, j], dtype)
        out.append(q)
        err = (w[:, j] - dq) / hinv[j, j]
        w[:, j + 1:] -= err[:, None] * hinv[j, j + 1:][None]
        hinv = hinv - hinv[:, j:j + 1] @ hinv[j:j + 1, :] / hinv[j, j]
    return torch.stack(out, 1)


def _correlated(n: int, k: int, seed: int, mixing: int = 0) -> torch.Tensor:
    """Rows with strongly correlated channels: a few latent factors through the random mixing numbered
    `mixing`, plus noise; `seed` draws the rows."""
    mix = torch.randn(k // 4, k, generator=torch.Generator().manual_seed(1000 + mixing))
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, k // 4, generator=gen) @ mix + 0.1 * torch.randn(n, k, generator=gen)


KINDS = ["int4-zero", "int4-symmetric", "int8-channel", "fp8-tensor", "fp8-channel"]


@pytest.mark.parametrize("kind", KINDS)
def test_blocked_gptq_matches_the_float64_reference_and_stays_on_the_grid(kind):
    gen = torch.Generator().manual_seed(KINDS.index(kind))
    w = torch.randn(8, 48, generator=gen)
    w[0, 5] = 40.0                       # a large weight: its row's scale is coarse, errors saturate at the ends
    x = _correlated(96, 48, seed=10 + KINDS.index(kind))
    h = x.t().double() @ x.double()
    scale, zero, axis, group, dtype = _grid(w, kind)
    want = reference_gptq(w, h, scale, zero, axis, group, dtype)
    got = gptq_round(w, h, expand_grid(scale, zero, axis, group, dtype), block=16)   # 3 blocks, lazy updates
    if dtype is DType.f8e4m3:
        assert got.dtype == E4M3 and torch.equal(got.view(torch.uint8), want.view(torch.uint8))
        assert torch.isfinite(got.float()).all() and got.float().abs().max() <= 448
    else:
        lo, hi = (-8, 7) if dtype is DType.i4 else (-128, 127)
        assert got.dtype == torch.int8 and torch.equal(got, want.to(torch.int8))
        assert lo <= int(got.min()) and int(got.max()) <= hi
    assert not torch.equal(got, _rtn(w, scale, zero, axis, group, dtype))    # GPTQ moved some roundings


def _rtn(w, scale, zero, axis, group, dtype):
    s, z = _per_column(scale, axis, group, w.shape), _per_column(zero, axis, group, w.shape)
    return _round(w.double(), s, z, dtype)[0].to(E4M3 if dtype is DType.f8e4m3 else torch.int8)


def _dequantized(q, scale, zero, axis, group, dtype):
    s, z = _per_column(scale, axis, group, q.shape), _per_column(zero, axis, group, q.shape)
    return (q.double() - (0 if dtype is DType.f8e4m3 else z)) * s


@pytest.mark.parametrize("kind", KINDS)
def test_gptq_lowers_the_layer_output_error_on_correlated_inputs(kind):
    gen = torch.Generator().manual_seed(20 + KINDS.index(kind))
    w = torch.randn(32, 64, generator=gen)
    x, held_out = _correlated(256, 64, seed=30), _correlated(256, 64, seed=31)
    scale, zero, axis, group, dtype = _grid(w, kind)
    gptq = gptq_round(w, x.t() @ x, expand_grid(scale, zero, axis, group, dtype))
    errors = []
    for q in (_rtn(w, scale, zero, axis, group, dtype), gptq):
        wq = _dequantized(q, scale, zero, axis, group, dtype)
        errors.append([(xs.double() @ (w.double() - wq).t()).norm() for xs in (x, held_out)])
    (rtn_fit, rtn_held), (gptq_fit, gptq_held) = errors
    assert gptq_fit < 0.7 * rtn_fit and gptq_held < 0.8 * rtn_held


def test_a_dead_input_channel_rounds_to_nearest():
    w = torch.randn(4, 32, generator=torch.Generator().manual_seed(3))
    x = _correlated(64, 32, seed=4)
    x[:, 7] = 0                          # never seen: H_77 = 0
    scale, zero, axis, group, dtype = _grid(w, "int4-zero")
    got = gptq_round(w, x.t() @ x, expand_grid(scale, zero, axis, group, dtype))
    rtn = _rtn(w, scale, zero, axis, group, dtype)
    assert torch.equal(got[:, 0], rtn[:, 0])         # the first column has no error pushed into it yet
    assert not torch.equal(got, rtn)


def ir(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


BEFORE = ir("""
    param @fc.weight : f32[8,32]
    param @lm_head.weight : f32[6,8]
    func @main(%x: f32[T,32]) -> (f32[T,6]) {
      %0 = llm.linear(%x, @fc.weight) : f32[T,8]
      %1 = llm.linear(%0, @lm_head.weight) : f32[T,6]
      return %1
    }
    """)

AFTER_W4A16 = ir("""
    param @lm_head.weight : f32[6,8]
    param @fc.weight.int4 : i4[8,32]
    param @fc.weight.scale : f32[8,1]
    param @fc.weight.zero : i8[8,1]
    func @main(%x: f32[T,32]) -> (f32[T,6]) {
      %2 = quant.dequantize(@fc.weight.int4, @fc.weight.scale, @fc.weight.zero) {axis=1, group_size=32} : f32[8,32]
      %0 = llm.linear(%x, %2) : f32[T,8]
      %1 = llm.linear(%0, @lm_head.weight) : f32[T,6]
      return %1
    }
    """)


def test_quantize_with_gptq_keeps_the_ir_and_the_grid_and_rounds_with_the_hessian(tmp_path):
    g = parse(BEFORE)
    gen = torch.Generator().manual_seed(5)
    for v in g.params.values():
        v.storage = TensorStorage(torch.randn(*v.type.shape, generator=gen))
    x = _correlated(64, 32, seed=6)
    stats = {"fc.weight": InputStats(x.abs().amax(0), gram=(x.t() @ x) / len(x))}
    save_calibration(stats, tmp_path / "calib.safetensors")
    nearest, gptq, by_python = g.clone(), g.clone(), g.clone()
    assert quantize_with(nearest, "w4a16", stats, group_size=32) == 1
    run_pipeline(gptq, f"quantize{{algo=w4a16,group_size=32,rounding=gptq,calib={tmp_path / 'calib.safetensors'}}}")
    assert quantize_with(by_python, "w4a16", stats, group_size=32, weight_rounding="gptq") == 1
    assert print_graph(nearest) == print_graph(gptq) == print_graph(by_python) == AFTER_W4A16
    for p in ("fc.weight.scale", "fc.weight.zero"):       # static groups: the grid is rounding to nearest's
        assert torch.equal(nearest.params[p].storage.load(), gptq.params[p].storage.load())
    w = g.params["fc.weight"].storage.load()
    scale, zero = int4_group_params(w, 32, True, torch.float32)
    want = gptq_round(w, x.t() @ x, expand_grid(scale, zero, 1, 32, DType.i4))
    assert torch.equal(gptq.params["fc.weight.int4"].storage.load(), want)
    assert torch.equal(by_python.params["fc.weight.int4"].storage.load(), want)
    run_pipeline(gptq, "fuse-quantized-linear")             # the AutoAWQ packing takes GPTQ's values as they are
    fc = lambda graph: interpreter.run(graph, x)[0]
    assert (fc(gptq) - fc(g)).norm() < (fc(nearest) - fc(g)).norm()


def test_rounding_options_and_their_errors():
    assert QuantConfig("w4a16", group_size=64, weight_rounding="gptq").pipeline() == (
        "quantize{algo=w4a16,exclude=lm_head|*.lm_head,group_size=64,zero_point=true,rounding=gptq}")
    assert "rounding" not in QuantConfig("fp8").pipeline()
    assert QuantConfig("w8a16", weight_rounding="gptq").needs_calibration
    assert QuantConfig.from_json(QuantConfig("fp8", weight_rounding="gptq").to_json()).weight_rounding == "gptq"
    with pytest.raises(ValueError, match="weight_rounding must be one of nearest, gptq"):
        QuantConfig("fp8", weight_rounding="stochastic")
    with pytest.raises(ValueError, match="llm.int8"):
        QuantConfig("llm.int8", weight_rounding="gptq")
    g = parse(BEFORE)
    for v in g.params.values():
        v.storage = TensorStorage(torch.randn(*v.type.shape))
    with pytest.raises(PassError, match=r"calibrate\{tokenizer=MODEL,hessian=true\}"):
        run_pipeline(g, "quantize{algo=w8a16,rounding=gptq}")


@pytest.fixture(scope="module")
def pydoc_graph(pydoc_llama):
    """The tiny pydoc Llama, stateless, and held-out windows of its pydoc text."""
    g = load(pydoc_llama)
    run_pipeline(g, "stateless")
    return g, eval_windows(pydoc_tokens(tokenizer_for(pydoc_llama)), 4, 32)


def _logit_error(quantized, graph, windows) -> float:
    run = lambda g, w: interpreter.run(g, w.int(), torch.arange(len(w), dtype=torch.int32))[0]
    return sum(float((run(quantized, w) - run(graph, w)).pow(2).mean()) for w in windows)


@pytest.mark.parametrize("algo", ["w4a16", "w4a16-awq"])
def test_gptq_through_the_pipeline_keeps_the_awq_layout_and_grid(pydoc_llama, pydoc_graph, algo):
    graph, held_out = pydoc_graph
    calibration = f"calibrate{{tokenizer={pydoc_llama},samples=8,length=32,rows=128,hessian=true}}"
    awq = "awq{group_size=32}," if algo == "w4a16-awq" else ""
    graphs = {}
    for rounding in ("nearest", "gptq"):
        g = graph.clone()
        run_pipeline(g, f"{calibration},{awq}quantize{{algo={algo},group_size=32,rounding={rounding}}},"
                        f"fuse-quantized-linear,dce", verify_each=True)
        graphs[rounding] = g
    assert print_graph(graphs["nearest"]) == print_graph(graphs["gptq"])   # same ops, params, AutoAWQ layout
    packed = [n for n in graphs["gptq"].params if n.endswith((".qweight", ".qzeros", ".scales"))]
    assert len(packed) == 3 * 8
    load_both = lambda n: [graphs[r].params[n].storage.load() for r in ("nearest", "gptq")]
    assert all(torch.equal(*load_both(n)) for n in packed if not n.endswith(".qweight"))   # static groups
    assert not any(torch.equal(*load_both(n)) for n in packed if n.endswith(".qweight"))
    if algo == "w4a16":   # after AWQ's clipping (a grid chosen for rounding to nearest) GPTQ need not win here
        assert _logit_error(graphs["gptq"], graph, held_out) < 0.5 * _logit_error(graphs["nearest"], graph, held_out)


def test_compile_with_gptq_calibrates_the_hessian(pydoc_llama, pydoc_graph):
    graph, held_out = pydoc_graph
    config = QuantConfig("w8a16", weight_rounding="gptq", calib_size=6, calib_seq_len=32)
    compiled = api.compile(pydoc_llama, target="reference", quant=config, progress=False)
    assert ",hessian=true," in compiled.pipeline and "quantize{algo=w8a16,exclude=lm_head|*.lm_head,rounding=gptq}" \
        in compiled.pipeline
    assert compiled.quant["weight_rounding"] == "gptq"
    calib = calibrate(graph, calib_windows(pydoc_tokens(tokenizer_for(pydoc_llama)), 6, 32), progress=False,
                      hessian=True)
    nearest, gptq = graph.clone(), graph.clone()
    quantize_with(nearest, "w8a16", calib)
    quantize_with(gptq, "w8a16", calib, weight_rounding="gptq")
    name = "model.layers.0.mlp.down_proj.weight.int8"
    assert torch.equal(compiled.graph.params[name].storage.load(), gptq.params[name].storage.load())
    assert _logit_error(gptq, graph, held_out) < _logit_error(nearest, graph, held_out)

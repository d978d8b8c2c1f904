"""Every registered op: a sample case run on the reference backend, numerics of the llm and quant
ops against independent plain-torch formulas, and shape-inference errors."""

import pytest
import torch
import torch.nn.functional as F

from kiln.backends import reference
from kiln.ir import Builder, DType, OpError, TensorType, bf16, boolean, f8e4m3, f32, i8, i32, i64, registered_ops
from kiln.ir.ops.quant import pack_i4, unpack_i4
from kiln.testing import random_inputs

T = 5  # the value bound to the symbolic dim "T" in the sample cases

_BINARY = ["add", "mul", "sub", "div", "pow", "maximum", "minimum"]
_COMPARE = ["eq", "ne", "lt", "le", "gt", "ge"]
_UNARY = ["neg", "abs", "exp", "log", "sqrt", "rsqrt", "reciprocal", "tanh", "sigmoid", "silu", "relu",
          "erf", "sin", "cos", "floor", "round"]

# op name -> (operand types, attributes)
CASES = {
    **{f"core.{n}": ([f32["T", 4], f32[4]], {}) for n in _BINARY},
    **{f"core.{n}": ([f32["T", 4], f32["T", 1]], {}) for n in _COMPARE},
    **{f"core.{n}": ([f32["T", 4]], {}) for n in _UNARY},
    "core.logical_and": ([boolean["T", 4], boolean[4]], {}),
    "core.logical_or": ([boolean["T", 4], boolean["T", 4]], {}),
    "core.logical_not": ([boolean["T", 4]], {}),
    "core.gelu": ([f32["T", 4]], {"approximate": "tanh"}),
    "core.clamp": ([f32["T", 4]], {"min": -0.5, "max": 0.5}),
    "core.cast": ([f32["T", 4]], {"dtype": DType.bf16}),
    "core.where": ([boolean["T", 4], f32["T", 4], f32[1]], {}),
    "core.constant": ([], {"value": 1.5, "dtype": DType.f16, "shape": (2, 3)}),
    "core.arange": ([], {"end": 11, "start": 2, "step": 3, "dtype": DType.i32}),
    "core.reshape": ([f32["T", 4, 6]], {"shape": (-1, 2, 12)}),
    "core.permute": ([f32[2, "T", 4]], {"dims": (2, 0, 1)}),
    "core.expand": ([f32["T", 1]], {"shape": (2, -1, 5)}),
    "core.slice": ([f32["T", 8]], {"dim": 1, "start": 1, "end": 7, "step": 2}),
    "core.concat": ([f32["T", 2], f32["T", 3], f32["T", 1]], {"dim": -1}),
    "core.gather": ([f32[16, 4], i64["T", 2]], {"dim": 0}),
    "core.matmul": ([f32[2, "T", 4], f32[4, 3]], {}),
    **{f"core.{n}": ([f32["T", 4, 3]], {"dims": (1,), "keepdim": True}) for n in ("sum", "mean", "amax", "amin")},
    "core.argmax": ([f32["T", 4]], {"dim": -1}),
    "core.softmax": ([f32["T", 4]], {"dim": -1}),
    "core.log_softmax": ([bf16["T", 4]], {"dim": 0}),
    "dist.all_reduce": ([f32["T", 4]], {"reduce": "max"}),
    "dist.all_gather": ([f32["T", 4]], {"dim": 0, "world_size": 1}),
    "llm.attention": ([bf16[2, 4, "T", 8], bf16[2, 2, "T", 8], bf16[2, 2, "T", 8], boolean["T", "T"]],
                      {"causal": True}),
    "llm.embedding": ([f32[16, 8], i32["T"]], {}),
    "llm.linear": ([f32["T", 8], f32[4, 8], f32[4]], {}),
    "llm.rms_norm": ([bf16["T", 8], bf16[8]], {"eps": 1e-5}),
    "llm.add_rms_norm": ([bf16["T", 8], bf16["T", 8], bf16[8]], {"eps": 1e-5}),
    "llm.layer_norm": ([f32["T", 8], f32[8], f32[8]], {"eps": 1e-5}),
    "llm.rope": ([f32["T", 2, 8], i64["T"], f32[4]], {}),
    "llm.silu_mul": ([f32["T", 8], f32["T", 8]], {}),
    "llm.paged_attention": ([f32["T", 4, 8], f32["T", 2, 8], f32["T", 2, 8], f32[16, 4, 2, 8], f32[16, 4, 2, 8],
                             i64["T"], i32[2, 4], i32[2], i32[3]], {"scale": 0.3}),
    "quant.quantize": ([f32["T", 8], f32[8], i8[8]], {"dtype": DType.i8, "axis": 1}),
    "quant.dequantize": ([i8["T", 8], f32[8]], {"axis": -1}),
    "quant.linear_fp8": ([f8e4m3["T", 16], f8e4m3[8, 16], f32["T"], f32[8]], {"out_dtype": DType.bf16}),
    "quant.linear_int8": ([i8["T", 16], i8[8, 16], f32[()], f32[8]], {"out_dtype": DType.f32}),
    "quant.linear_w8a16": ([bf16["T", 16], i8[8, 16], bf16[8]], {}),
    "quant.embedding": ([i8[16, 8], bf16[16], i32["T"]], {}),
    "quant.linear_awq": ([f32["T", 64], i32[64, 2], i32[2, 2], f32[2, 16]], {}),
    "quant.quantize_rows": ([bf16["T", 16]], {"dtype": DType.f8e4m3, "eps": 1e-6, "bound": 448.0}),
    # ops first needed by the ONNX frontend
    "core.dims": ([], {"dims": (3, 4, 9), "dtype": DType.i32}),
    "core.isnan": ([f32["T", 4]], {}),
    "core.tril": ([f32["T", 6]], {"k": 1}),
    "core.triu": ([boolean[2, 4, "T"]], {"k": -1}),
    "core.cumsum": ([f32["T", 4]], {"dim": 0}),
    "core.gather_elements": ([f32["T", 16], i64["T", 3]], {"dim": 1}),
    "core.gather_nd": ([f32[16, 16, 3], i64["T", 2]], {}),
}


def test_every_registered_op_has_a_sample_case():
    missing = sorted(set(registered_ops()) - set(CASES))
    assert not missing, f"add a sample case to CASES for {missing}"
    assert not set(CASES) - set(registered_ops())


@pytest.mark.parametrize("name", sorted(CASES))
def test_op_runs_on_reference_with_inferred_type(name):
    types, attrs = CASES[name]
    b = Builder()
    args = [b.input(f"x{i}", t) for i, t in enumerate(types)]
    op = b.create(name, *args, **attrs)
    g = b.build(*op.results)
    outs = reference.run(g, *random_inputs(g, {"T": T}, seed=len(name)))
    assert len(outs) == len(op.results) >= 1
    for out, r in zip(outs, op.results):
        assert out.dtype == r.type.dtype.torch
        assert tuple(out.shape) == r.type.concrete({"T": T})


@pytest.mark.parametrize("dtype", [DType.bf16, DType.f16, DType.i32, DType.i64, DType.i8, DType.u8])
def test_infer_accepts_only_dtypes_the_reference_computes(dtype):
    """Where inference accepts another operand dtype, the reference must produce the inferred type
    (torch silently turns ints into floats in div/exp/sum...). Bool operands are left out: several
    torch kernels refuse them loudly, which is a runtime error rather than a wrong type."""
    ran = 0
    for name, (types, attrs) in sorted(CASES.items()):
        if not types or len({t.dtype for t in types}) != 1:
            continue
        b = Builder()
        args = [b.input(f"x{i}", t.with_dtype(dtype)) for i, t in enumerate(types)]
        try:
            op = b.create(name, *args, **attrs)
        except OpError:
            continue
        g = b.build(*op.results)
        for out, r in zip(reference.run(g, *random_inputs(g, {"T": T}, seed=1)), op.results):
            assert out.dtype == r.type.dtype.torch, name
        ran += 1
    assert ran >= 20


def _run(build, inputs):
    """Build a graph with `build(b, *input_values) -> output`, run it on `inputs`."""
    b = Builder()
    values = [b.input(f"x{i}", _type_of(t)) for i, t in enumerate(inputs)]
    g = b.build(build(b, *values))
    (out,) = reference.run(g, *inputs)
    return out


def _type_of(t):
    return TensorType(DType.from_torch(t.dtype), tuple(t.shape))


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


# --- llm numerics ---------------------------------------------------------------------------

def hf_rms_norm(x, weight, eps):
    """transformers' LlamaRMSNorm.forward."""
    input_dtype = x.dtype
    hidden = x.to(torch.float32)
    variance = hidden.pow(2).mean(-1, keepdim=True)
    hidden = hidden * torch.rsqrt(variance + eps)
    return weight * hidden.to(input_dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_llama(dtype, gen):
    x = (torch.randn(3, 5, 64, generator=gen) * 3).to(dtype)
    w = (torch.rand(64, generator=gen) + 0.5).to(dtype)
    out = _run(lambda b, x, w: b.llm.rms_norm(x, w, eps=1e-5), [x, w])
    assert out.dtype == dtype
    torch.testing.assert_close(out, hf_rms_norm(x, w, 1e-5), atol=0, rtol=0)
    assert not torch.allclose(out.float(), hf_rms_norm(x, w, 1.0).float(), atol=1e-3)  # eps reaches the op


def _rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def hf_rope(x, positions, inv_freq, rotary_dim=None, interleaved=False, scale=1.0):
    """x [B,S,H,D]; HF apply_rotary_pos_emb on [B,H,S,D] (or GPT-J rotate_every_two), partial rotary."""
    q = x.transpose(1, 2)
    rd = q.shape[-1] if rotary_dim is None else rotary_dim
    q_rot, q_pass = q[..., :rd], q[..., rd:]
    freqs = positions.float()[:, :, None] @ inv_freq.float()[None, None, :]   # [B,S,rd/2]
    if interleaved:
        cos = freqs.cos().repeat_interleave(2, -1) * scale
        sin = freqs.sin().repeat_interleave(2, -1) * scale
        x1, x2 = q_rot[..., ::2], q_rot[..., 1::2]
        rotated = torch.stack((-x2, x1), dim=-1).flatten(-2)
    else:
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos() * scale, emb.sin() * scale
        rotated = _rotate_half(q_rot)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)                               # unsqueeze_dim=1
    out = torch.cat((q_rot * cos + rotated * sin, q_pass), dim=-1)
    return out.transpose(1, 2)


@pytest.mark.parametrize("rotary_dim, interleaved, scale", [
    (None, False, 1.0), (8, False, 1.0), (None, True, 1.0), (8, True, 1.0), (None, False, 1.25),
])
def test_rope_matches_hf(rotary_dim, interleaved, scale, gen):
    B, S, H, D = 2, 6, 3, 16
    rd = D if rotary_dim is None else rotary_dim
    x = torch.randn(B, S, H, D, generator=gen)
    positions = torch.randint(0, 4096, (B, S), generator=gen)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rd, 2).float() / rd))
    out = _run(lambda b, x, p, f: b.llm.rope(x, p, f, rotary_dim=rotary_dim, interleaved=interleaved,
                                              scale=scale), [x, positions, inv_freq])
    want = hf_rope(x, positions, inv_freq, rotary_dim, interleaved, scale)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    if rotary_dim is not None:
        assert torch.equal(out[..., rd:], x[..., rd:])


def sdpa_gqa(q, k, v, mask=None, causal=False, scale=None):
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    s, skv = q.shape[2], k.shape[2]
    if causal and s != skv:   # bottom-right alignment: query i sees keys j <= i + (skv - s)
        keep = torch.arange(skv)[None, :] <= torch.arange(s)[:, None] + (skv - s)
        mask = keep if mask is None else mask & keep
        causal = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)


@pytest.mark.parametrize("hq, hkv", [(8, 2), (4, 4)])
@pytest.mark.parametrize("s, skv, causal, mask, scale", [
    (7, 7, True, None, None),
    (3, 9, True, None, None),
    (1, 9, True, None, None),
    (5, 8, False, "bool", None),
    (5, 8, False, "float", None),
    (4, 4, True, "bool", 0.3),
    (6, 6, False, None, 0.05),
])
def test_attention_matches_sdpa(hq, hkv, s, skv, causal, mask, scale, gen):
    B, D = 2, 16
    q = torch.randn(B, hq, s, D, generator=gen)
    k = torch.randn(B, hkv, skv, D, generator=gen)
    v = torch.randn(B, hkv, skv, D, generator=gen)
    inputs = [q, k, v]
    m = None
    if mask == "bool":
        m = torch.rand(B, 1, s, skv, generator=gen) < 0.6
        m[..., 0] = True  # no fully masked rows
        m[..., -1] = True
        inputs.append(m)
    elif mask == "float":
        m = torch.randn(B, hq, s, skv, generator=gen) * 2
        inputs.append(m)
    out = _run(lambda b, *xs: b.llm.attention(*xs, causal=causal, scale=scale), inputs)
    want = sdpa_gqa(q, k, v, m, causal, scale)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("hq, hkv, s, skv", [(9, 3, 12, 12), (9, 3, 1, 40), (4, 4, 5, 300)])
def test_bf16_attention_rounds_as_sdpa(hq, hkv, s, skv, gen):
    # torch's SDPA kernels (CPU and flash) round the unnormalised probabilities to bf16 for P @ V and
    # divide by the f32 row sum after; computing it all in f32 and rounding once differs far more often.
    q = (torch.randn(1, hq, s, 64, generator=gen) * 2).to(torch.bfloat16)
    k = (torch.randn(1, hkv, skv, 64, generator=gen) * 2).to(torch.bfloat16)
    v = torch.randn(1, hkv, skv, 64, generator=gen).to(torch.bfloat16)
    out = _run(lambda b, *xs: b.llm.attention(*xs, causal=True), [q, k, v])
    want = sdpa_gqa(q, k, v, causal=True)
    once = sdpa_gqa(q.float(), k.float(), v.float(), causal=True).to(torch.bfloat16)
    mismatch = lambda a: (a != want).float().mean().item()
    assert mismatch(out) <= 0.05 and mismatch(out) * 3 < mismatch(once), (mismatch(out), mismatch(once))
    assert (out.float() - want.float()).abs().max() <= 2**-7


def test_attention_causal_prefix_differs_from_top_left_alignment(gen):
    q, k, v = (torch.randn(1, 2, n, 8, generator=gen) for n in (3, 6, 6))
    out = _run(lambda b, *xs: b.llm.attention(*xs, causal=True), [q, k, v])
    top_left = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert not torch.allclose(out, top_left, atol=1e-3)


def test_silu_mul_linear_embedding(gen):
    g, u = torch.randn(4, 32, generator=gen), torch.randn(4, 32, generator=gen)
    torch.testing.assert_close(_run(lambda b, g, u: b.llm.silu_mul(g, u), [g, u]), g * torch.sigmoid(g) * u)

    x, w, bias = (torch.randn(*s, generator=gen) for s in ((3, 5, 16), (8, 16), (8,)))
    torch.testing.assert_close(_run(lambda b, x, w: b.llm.linear(x, w), [x, w]), x @ w.T)
    torch.testing.assert_close(_run(lambda b, x, w, c: b.llm.linear(x, w, c), [x, w, bias]), x @ w.T + bias)

    table, ids = torch.randn(50, 8, generator=gen), torch.randint(0, 50, (3, 4), generator=gen, dtype=torch.int32)
    out = _run(lambda b, t, i: b.llm.embedding(t, i), [table, ids])
    assert torch.equal(out, table[ids.long()])


# --- quant numerics -------------------------------------------------------------------------

def test_quantize_per_tensor_fp8_e4m3(gen):
    x = torch.randn(6, 32, generator=gen) * 10
    scale = (x.abs().amax() / 448.0).reshape(())
    q = _run(lambda b, x, s: b.quant.quantize(x, s, dtype=DType.f8e4m3), [x, scale])
    assert q.dtype == torch.float8_e4m3fn
    assert torch.equal(q.view(torch.uint8), (x / scale).clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8))
    deq = _run(lambda b, q, s: b.quant.dequantize(q, s), [q, scale])
    assert deq.dtype == torch.float32
    torch.testing.assert_close(deq, q.float() * scale)
    assert ((deq - x).abs() <= x.abs() / 16 + scale).all()   # 3 mantissa bits


def test_quantize_per_channel_int8(gen):
    w = torch.randn(8, 64, generator=gen)
    scale = w.abs().amax(dim=1) / 127
    q = _run(lambda b, w, s: b.quant.quantize(w, s, dtype=DType.i8, axis=0), [w, scale])
    assert torch.equal(q, torch.round(w / scale[:, None]).clamp(-128, 127).to(torch.int8))
    assert q.abs().amax(dim=1).eq(127).all()
    deq = _run(lambda b, q, s: b.quant.dequantize(q, s, axis=0), [q, scale])
    assert ((deq - w).abs() <= scale[:, None] / 2 + 1e-6).all()


def test_quantize_groupwise_i4_with_zero_point(gen):
    rows, cols, gs = 4, 256, 128
    x = torch.randn(rows, cols, generator=gen) + 0.7
    groups = x.reshape(rows, cols // gs, gs)
    lo, hi = groups.amin(-1), groups.amax(-1)
    scale = (hi - lo) / 15
    zp = (torch.round(-lo / scale) - 8).to(torch.int8)                       # maps lo to -8
    q = _run(lambda b, x, s, z: b.quant.quantize(x, s, z, dtype=DType.i4, axis=1, group_size=gs), [x, scale, zp])
    want = (torch.round(groups / scale[..., None]) + zp[..., None].float()).clamp(-8, 7)
    assert q.dtype == torch.int8 and torch.equal(q, want.reshape(rows, cols).to(torch.int8))
    assert q.min() == -8 and q.max() >= 6
    deq = _run(lambda b, q, s, z: b.quant.dequantize(q, s, z, axis=1, group_size=gs), [q, scale, zp])
    want_deq = ((q.reshape(rows, cols // gs, gs).float() - zp[..., None].float()) * scale[..., None]).reshape(rows, cols)
    torch.testing.assert_close(deq, want_deq)
    assert ((deq - x).abs() <= scale.repeat_interleave(gs, 1) * 0.5 + 1e-5).all()


def test_pack_i4_round_trip_low_nibble_first(gen):
    v = torch.randint(-8, 8, (3, 10), generator=gen, dtype=torch.int8)
    packed = pack_i4(v)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 5)
    assert torch.equal(unpack_i4(packed), v)
    assert pack_i4(torch.tensor([1, 2, -1, 0, -8, 7], dtype=torch.int8)).tolist() == [0x21, 0x0F, 0x78]


# --- shape-inference errors -----------------------------------------------------------------

def _build_error(name, types, **attrs):
    b = Builder()
    args = [b.input(f"x{i}", t) for i, t in enumerate(types)]
    with pytest.raises(OpError) as e:
        b.create(name, *args, **attrs)
    assert str(e.value).startswith(name)
    return str(e.value)


@pytest.mark.parametrize("name, types, attrs, message", [
    ("core.add", [f32["T", 4], bf16["T", 4]], {}, r"one dtype, got f32\[T,4\], bf16\[T,4\]"),
    ("core.mul", [f32[3], f32[4]], {}, r"shapes \[3\] and \[4\] do not broadcast"),
    ("core.add", [f32["T"], f32["S"]], {}, "do not broadcast"),
    ("core.permute", [f32[2, 3, 4]], {"dims": (0, 2, 2)}, r"not a permutation of 0..2"),
    ("core.reshape", [f32["T", 6]], {"shape": ("T", 4)}, "element counts differ"),
    ("core.reshape", [f32[5, 6]], {"shape": (-1, 4)}, "do not divide by 4"),
    ("llm.attention", [f32[1, 6, 4, 8], f32[1, 4, 4, 8], f32[1, 4, 4, 8]], {}, "6 query heads are not a multiple of 4"),
    ("llm.rms_norm", [f32["T", 8]] * 2, {"eps": 1e-5, "epsilon": 1e-5}, r"no attribute epsilon \(its attributes: eps\)"),
    ("core.softmax", [f32["T", 8]], {}, r"needs attribute dim \(int\)"),
    ("core.cast", [f32[2]], {"dtype": "f33"}, "unknown dtype 'f33'"),
    ("llm.linear", [f32["T", 8], f32[4, 6]], {}, "in_features=6"),
    ("core.matmul", [f32[2, 3], f32[4, 5]], {}, "contracted dims differ"),
    ("llm.rope", [f32["T", 2, 8], i64["T"], f32[3]], {}, r"inv_freq f32\[3\] must be \[8/2\]"),
    ("quant.quantize", [f32[4, 100], f32[4, 1]], {"dtype": DType.i4, "axis": 1, "group_size": 128},
     "not a multiple of group_size 128"),
    ("core.add", [f32[2]], {}, r"takes 2 operands \(lhs, rhs\), got 1"),
])
def test_shape_inference_errors(name, types, attrs, message):
    import re
    assert re.search(message, _build_error(name, types, **attrs))

"""The quant dialect's exact semantics: quantize/dequantize against torch's own casts (e4m3
saturation at +-448, round half to even for ints, i4 packing low nibble first), AutoAWQ's int32
packing against the kernels' own, the fused quantized linears and the quantized lookup against the kernels' reference
functions, and the FP8 KV cache of llm.paged_attention against the attention kernels' reference."""

import pytest
import torch
from kiln.backends import reference
from kiln.ir import (
    Builder,
    DType,
    OpError,
    TensorStorage,
    TensorType,
    f8e4m3,
    f32,
    i4,
    i8,
    i32,
)
from kiln.ir.ops.quant import (
    AWQ_ORDER,
    AwqPackedStorage,
    AwqUnpackedStorage,
    awq_pack,
    awq_unpack,
    pack_i4,
    unpack_i4,
)


def _run(build, inputs):
    b = Builder()
    values = [b.input(f"x{i}", TensorType(DType.from_torch(t.dtype), tuple(t.shape))) for i, t in enumerate(inputs)]
    (out,) = reference.run(b.build(build(b, *values)), *inputs)
    return out


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(7)


# -- quantize / dequantize ---------------------------------------------------------------------------

def test_e4m3_saturates_at_448_and_rounds_like_torch():
    # 464 is halfway between 448 and 480 (beyond e4m3's range): saturation, not NaN or 480
    x = torch.tensor([0.0, 1.0, -1.0, 447.0, 448.0, 464.0, 1000.0, -1000.0, 1e30, -1e30, 0.0137, 2.0**-10, 17.0])
    q = _run(lambda b, x, s: b.quant.quantize(x, s, dtype=DType.f8e4m3), [x, torch.tensor(1.0)])
    assert q.dtype == torch.float8_e4m3fn
    assert q.float().tolist()[4:10] == [448.0, 448.0, 448.0, -448.0, 448.0, -448.0]
    assert torch.equal(q.view(torch.uint8), x.clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8))
    assert q.float()[12] == 16.0   # 17 lies halfway between 16 and 18: to the even mantissa
    # every e4m3 value survives the round trip exactly
    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[grid.isfinite()]
    back = _run(lambda b, x, s: b.quant.dequantize(b.quant.quantize(x, s, dtype=DType.f8e4m3), s),
                [grid, torch.tensor(1.0)])
    assert torch.equal(back, grid)


def test_int8_rounds_half_to_even_and_saturates():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, 127.5, 300.0, -128.5, -300.0])
    q = _run(lambda b, x, s: b.quant.quantize(x, s, dtype=DType.i8), [x, torch.tensor(1.0)])
    assert q.tolist() == [0, 2, 2, 0, -2, -2, 126, 127, 127, -128, -128]
    assert torch.equal(q, torch.round(x).clamp(-128, 127).to(torch.int8))


def test_int4_rounds_half_to_even_with_zero_point_and_packs_low_nibble_first():
    x = torch.tensor([[0.5, 1.5, 2.5, -3.5, 7.5, -9.0, 6.4, 0.0]])
    zp = torch.tensor([1], dtype=torch.int8)
    q = _run(lambda b, x, s, z: b.quant.quantize(x, s, z, dtype=DType.i4, axis=0), [x, torch.tensor([1.0]), zp])
    assert q.tolist() == [[1, 3, 3, -3, 7, -8, 7, 1]]      # round(x) + 1, saturated to [-8, 7]
    packed = pack_i4(q)
    assert packed.tolist() == [[0x31, 0xD3, 0x87, 0x17]]    # element 0 in the low nibble
    assert torch.equal(unpack_i4(packed), q)


def test_awq_packing_matches_the_kernels_layout(gen):
    gemm_woq = pytest.importorskip("kiln.kernels.gemm_woq")
    assert AWQ_ORDER == gemm_woq.AWQ_ORDER
    v = torch.randint(0, 16, (6, 32), generator=gen, dtype=torch.int32)
    v[0, :8] = 15                                           # a word whose top nibble is set: negative int32
    packed = awq_pack(v)
    assert packed.dtype == torch.int32 and packed.shape == (6, 4) and packed[0, 0] < 0
    assert torch.equal(packed, gemm_woq.awq_pack(v))
    assert torch.equal(awq_unpack(packed), v)
    assert torch.equal(gemm_woq.awq_unpack(packed), v)
    # nibble i of a word holds column AWQ_ORDER[i]
    one = torch.zeros(1, 8, dtype=torch.int32)
    one[0, 2] = 5
    assert awq_pack(one).item() == 5 << (4 * AWQ_ORDER.index(2))


def test_awq_storages_transpose_offset_and_hand_back_a_checkpoints_tensor(gen):
    values = torch.randint(-8, 8, (16, 64), generator=gen, dtype=torch.int8)       # kiln's i4 [N, K]
    packed = AwqPackedStorage(TensorStorage(values), TensorType(DType.i32, (64, 2)))
    words = packed.load()
    assert torch.equal(awq_unpack(words), (values.int() + 8).t())
    unpacked = AwqUnpackedStorage(TensorStorage(words), TensorType(DType.i8, (16, 64)))
    assert torch.equal(unpacked.load(), values)
    assert AwqPackedStorage(unpacked, packed.type).load() is words                   # no repacking
    zeros = AwqPackedStorage(None, TensorType(DType.i32, (2, 2))).load()              # symmetric: zero 8
    assert torch.equal(awq_unpack(zeros), torch.full((2, 16), 8, dtype=torch.int32))


# -- fused quantized linears against the kernels' references ----------------------------------------

def _fp8(x, per_row):
    amax = x.abs().amax(-1, keepdim=True) if per_row else x.abs().amax()
    scale = (amax / 448).clamp(min=1e-12)
    return (x / scale).clamp(-448, 448).to(torch.float8_e4m3fn), scale.reshape(-1) if per_row else scale.reshape(())


@pytest.mark.parametrize("per_token, per_channel", [(False, False), (True, True), (True, False)])
def test_linear_fp8_is_the_kernels_reference(gen, per_token, per_channel):
    gemm_fp8 = pytest.importorskip("kiln.kernels.gemm_fp8")
    x, w = torch.randn(7, 64, generator=gen), torch.randn(24, 64, generator=gen)
    xq, xs = _fp8(x, per_token)
    wq, ws = _fp8(w, per_channel)
    for out_dtype in (DType.bf16, DType.f32):
        got = _run(lambda b, *v, dt=out_dtype: b.quant.linear_fp8(*v, out_dtype=dt), [xq, wq, xs, ws])
        want = gemm_fp8.linear_fp8_reference(xq, wq, xs, ws, out_dtype.torch)
        assert got.dtype == out_dtype.torch and torch.equal(got, want)
    # and what it means: the dequantized product, up to f32 summation order
    torch.testing.assert_close(got, (xq.float() * xs.reshape(-1, 1) if per_token else xq.float() * xs)
                               @ (wq.float() * (ws.reshape(-1, 1) if per_channel else ws)).t())


def test_linear_int8_accumulates_exactly(gen):
    xq = torch.randint(-128, 128, (5, 4096), generator=gen, dtype=torch.int8)
    wq = torch.randint(-128, 128, (6, 4096), generator=gen, dtype=torch.int8)
    xq[0], wq[0] = -128, -128                      # 4096 * 16384 = 2^26: past f32's exact integers
    xs, ws = torch.rand(5, generator=gen) + 0.1, torch.rand(6, generator=gen) + 0.1
    got = _run(lambda b, *v: b.quant.linear_int8(*v, out_dtype=DType.f32), [xq, wq, xs, ws])
    acc = xq.long() @ wq.long().t()                # exact int64, as an int32 GEMM accumulates
    assert torch.equal(got, acc.float() * xs[:, None] * ws[None, :])
    assert acc[0, 0] == 2**26 and got[0, 0] == 2**26 * xs[0] * ws[0]


def test_linear_w8a16_is_the_kernels_reference(gen):
    gemm_woq = pytest.importorskip("kiln.kernels.gemm_woq")
    x = torch.randn(3, 5, 64, generator=gen).to(torch.bfloat16)
    wq = torch.randint(-127, 128, (40, 64), generator=gen, dtype=torch.int8)
    ws = (torch.rand(40, generator=gen) / 100).to(torch.bfloat16)
    got = _run(lambda b, *v: b.quant.linear_w8a16(*v), [x, wq, ws])
    assert got.shape == (3, 5, 40) and torch.equal(got, gemm_woq.linear_w8a16_reference(x, wq, ws))


def test_linear_awq_is_the_kernels_reference(gen):
    gemm_woq = pytest.importorskip("kiln.kernels.gemm_woq")
    k, n, g = 128, 48, 32
    qweight = awq_pack(torch.randint(0, 16, (k, n), generator=gen))
    qzeros = awq_pack(torch.randint(0, 16, (k // g, n), generator=gen))
    scales = (torch.rand(k // g, n, generator=gen) / 10).to(torch.float16)
    x = torch.randn(2, 9, k, generator=gen).to(torch.float16)
    got = _run(lambda b, *v: b.quant.linear_awq(*v), [x, qweight, qzeros, scales])
    want = gemm_woq.linear_awq_reference(x.reshape(-1, k), qweight, qzeros, scales).reshape(2, 9, n)
    assert got.dtype == torch.float16 and torch.equal(got, want)


def test_linear_awq_equals_dequantize_then_linear(gen):
    """The fused op and the Q/DQ form it replaces: kiln's signed i4 [N, K] with zero points."""
    k, n, g = 64, 16, 32
    q = torch.randint(-8, 8, (n, k), generator=gen, dtype=torch.int8)
    z = torch.randint(-8, 8, (n, k // g), generator=gen, dtype=torch.int8)
    s = torch.rand(n, k // g, generator=gen)
    x = torch.randn(4, k, generator=gen)
    qweight = AwqPackedStorage(TensorStorage(q), TensorType(DType.i32, (k, n // 8))).load()
    qzeros = AwqPackedStorage(TensorStorage(z), TensorType(DType.i32, (k // g, n // 8))).load()
    fused = _run(lambda b, *v: b.quant.linear_awq(*v), [x, qweight, qzeros, s.t().contiguous()])
    b = Builder()
    xv = b.input("x", f32[4, k])
    qv = b.param("q", TensorType(DType.i4, (n, k)), TensorStorage(q))
    sv, zv = b.param("s", storage=TensorStorage(s)), b.param("z", storage=TensorStorage(z))
    y = b.llm.linear(xv, b.quant.dequantize(qv, sv, zv, axis=1, group_size=g))
    torch.testing.assert_close(fused, reference.run(b.build(y), x)[0])


@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn])
def test_embedding_equals_dequantize_then_lookup(gen, dtype):
    """quant.embedding reads only the looked-up rows, and gives what dequantizing the whole table would."""
    vocab, hidden = 37, 24
    table = (torch.randn(vocab, hidden, generator=gen) * 40).clamp(-127, 127)
    table = table.round().to(dtype) if dtype == torch.int8 else table.to(dtype)
    scale = (torch.rand(vocab, generator=gen) / 50 + 1e-3).to(torch.bfloat16)
    ids = torch.randint(0, vocab, (3, 5), generator=gen, dtype=torch.int32)
    ids[0, 0], ids[-1, -1] = 0, vocab - 1
    fused = _run(lambda b, *v: b.quant.embedding(*v), [table, scale, ids])
    b = Builder()
    tv = b.param("t", TensorType(DType.from_torch(dtype), (vocab, hidden)), TensorStorage(table))
    sv, iv = b.param("s", storage=TensorStorage(scale)), b.input("ids", TensorType(DType.i32, (3, 5)))
    want = reference.run(b.build(b.llm.embedding(b.quant.dequantize(tv, sv, axis=0), iv)), ids)[0]
    assert fused.dtype == torch.bfloat16 and fused.shape == (3, 5, hidden) and torch.equal(fused, want)
    assert torch.equal(fused, (table.float() * scale.float()[:, None]).to(torch.bfloat16)[ids.long()])


@pytest.mark.parametrize("types, message", [
    ([i8[10, 4], f32[10], i32["T"]], None),
    ([i4[10, 4], f32[10], i32["T"]], r"table must be i8 or f8e4m3"),
    ([i8[10, 4], f32[4], i32["T"]], r"scale must be a float \[10\]"),
    ([i8[10, 4], f32[10], f32["T"]], "token ids must be i32 or i64"),
])
def test_embedding_type_inference(types, message):
    b = Builder()
    args = [b.input(f"x{i}", t) for i, t in enumerate(types)]
    if message is None:
        op = b.create("quant.embedding", *args)
        assert op.results[0].type == f32["T", 4]
        # a multiply per element; bytes: the 3 looked-up int8 rows, their f32 scales, the ids, the f32 rows
        assert op.opdef.cost([a.type for a in args], [op.results[0].type], {}, {"T": 3}) == (12, 12 + 12 + 12 + 48)
        return
    with pytest.raises(OpError, match=message):
        b.create("quant.embedding", *args)


@pytest.mark.parametrize("op, types, message", [
    ("quant.linear_fp8", [f8e4m3[4, 8], f8e4m3[3, 8], f32[4], f32[3]], None),
    ("quant.linear_fp8", [f8e4m3[4, 8], i8[3, 8], f32.scalar(), f32[3]], "one quantized dtype"),
    ("quant.linear_fp8", [f8e4m3[4, 8], f8e4m3[3, 8], f32[3], f32[3]], r"x_scale must be .* \[4\] \(per token\)"),
    ("quant.linear_int8", [i8[4, 8], i8[3, 8], f32.scalar(), f32[4]], r"w_scale must be .*\[3\]"),
    ("quant.linear_w8a16", [f32["T", 8], i8[3, 8], f32.scalar()], r"w_scale must be a float \[3\]"),
    ("quant.linear_awq", [f32["T", 64], i32[64, 2], i32[2, 2], f32[2, 16]], None),
    ("quant.linear_awq", [f32["T", 64], i32[64, 2], i32[3, 2], f32[3, 16]], "G dividing K=64"),
    ("quant.linear_awq", [f32["T", 64], i32[64, 4], i32[2, 2], f32[2, 16]], r"must be \[64,2\] and \[2,2\]"),
])
def test_quantized_linear_type_inference(op, types, message):
    b = Builder()
    args = [b.input(f"x{i}", t) for i, t in enumerate(types)]
    attrs = {"out_dtype": DType.bf16} if op in ("quant.linear_fp8", "quant.linear_int8") else {}
    if message is None:
        assert b.create(op, *args, **attrs).results[0].type.shape[-1] in (3, 16)
        return
    with pytest.raises(OpError, match=message):
        b.create(op, *args, **attrs)


# -- the FP8 KV cache ------------------------------------------------------------------------------

def test_paged_attention_fp8_cache_is_the_kernels_reference(gen):
    attention = pytest.importorskip("kiln.kernels.attention")
    heads, kv_heads, dim, block, blocks = 4, 2, 16, 4, 8
    lens = [6, 3]                                    # two sequences prefilled in one step
    q = torch.randn(sum(lens), heads, dim, generator=gen)
    k, v = 3 * torch.randn(sum(lens), kv_heads, dim, generator=gen), torch.randn(sum(lens), kv_heads, dim, generator=gen)
    k[0, 0, 0] = 1e4                                 # saturates at 448 * k_scale
    k_scale, v_scale = 0.02, 0.01
    tables = torch.tensor([[5, 2], [7, 0]], dtype=torch.int32)
    slots = torch.tensor([int(tables[s, p // block]) * block + p % block for s, n in enumerate(lens) for p in range(n)])
    starts = torch.tensor([0, 6, 9], dtype=torch.int32)
    context = torch.tensor(lens, dtype=torch.int32)
    cache = torch.zeros(blocks, block, kv_heads, dim, dtype=torch.float8_e4m3fn)
    k_cache, v_cache = cache.clone(), cache.clone()
    out = _run(lambda b, *a: b.llm.paged_attention(*a, scale=dim ** -0.5, k_scale=k_scale, v_scale=v_scale),
               [q, k, v, k_cache, v_cache, slots, tables, context, starts])
    stored = (k / k_scale).clamp(-448, 448).to(torch.float8_e4m3fn)
    assert torch.equal(k_cache.view(-1, kv_heads, dim)[slots].view(torch.uint8), stored.view(torch.uint8))
    assert k_cache.view(-1, kv_heads, dim)[slots[0], 0, 0].float() == 448
    want = attention.paged_attention_reference(q, k_cache, v_cache, tables, context, starts, dim ** -0.5,
                                               k_scale, v_scale)
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-5)


def test_paged_attention_scales_come_with_an_fp8_cache():
    b = Builder()
    args = [b.input(f"x{i}", t) for i, t in enumerate([
        f32["T", 4, 8], f32["T", 2, 8], f32["T", 2, 8], f8e4m3[16, 4, 2, 8], f8e4m3[16, 4, 2, 8],
        TensorType(DType.i64, ("T",)), i32[2, 4], i32[2], i32[3]])]
    with pytest.raises(OpError, match="k_scale and v_scale come with an fp8 cache"):
        b.create("llm.paged_attention", *args, k_scale=0.5)
    with pytest.raises(OpError, match="k_scale and v_scale come with an fp8 cache"):
        b.create("llm.paged_attention", *args)
    assert b.create("llm.paged_attention", *args, k_scale=0.5, v_scale=0.25).results[0].type == f32["T", 4, 8]

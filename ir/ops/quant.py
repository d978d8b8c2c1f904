"""`quant.*`: quantize and dequantize with ONNX/TensorRT explicit-quantization semantics
(round half to even, saturate), per tensor, per channel (`axis`) or per block of `group_size`
along `axis`; and the quantized linears that a backend's fusion pass folds Q/DQ pairs into, in
the operand layouts of kiln's GEMM kernels (FP8, W8A8 int8, W8A16, W4A16 in AutoAWQ's layout).
i4 values are signed [-8, 7], one per int8 while a graph runs, packed two per byte (low nibble
first) in storage; AutoAWQ's int32 packing is a storage layout (`AwqPackedStorage`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..registry import OpError, op
from ..storage import Storage
from ..types import DType, TensorType, dim_div

_INT_RANGE = {DType.i8: (-128, 127), DType.u8: (0, 255), DType.i4: (-8, 7), DType.i32: (-2**31, 2**31 - 1)}
_FP8_MAX = {DType.f8e4m3: 448.0, DType.f8e5m2: 57344.0}


def pack_i4(values: torch.Tensor) -> torch.Tensor:
    """Pack int values in [-8, 7] two per byte along the last dim, low nibble first."""
    v = (values.to(torch.int16) & 0xF).to(torch.uint8)
    return v[..., 0::2] | (v[..., 1::2] << 4)


def unpack_i4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_i4: int8 values in [-8, 7], last dim doubled."""
    p = packed.to(torch.int16)
    nibbles = torch.stack([p & 0xF, (p >> 4) & 0xF], -1).flatten(-2)
    return torch.where(nibbles >= 8, nibbles - 16, nibbles).to(torch.int8)


def _scale_shape(x: TensorType, axis: int | None, group_size: int | None) -> tuple:
    if axis is None:
        if group_size is not None:
            raise OpError("group_size needs an axis")
        return ()
    a = axis % x.rank
    if group_size is None:
        return (x.shape[a],)
    try:
        blocks = dim_div(x.shape[a], group_size)
    except ValueError:
        raise OpError(f"dim {x.shape[a]} of {x} is not a multiple of group_size {group_size}") from None
    return tuple(blocks if i == a else d for i, d in enumerate(x.shape))


def _check_params(x: TensorType, scale: TensorType, zero_point: TensorType | None,
                  axis: int | None, group_size: int | None) -> None:
    if axis is not None and not -x.rank <= axis < x.rank:
        raise OpError(f"axis {axis} is out of range for {x}")
    want = _scale_shape(x, axis, group_size)
    if scale.shape != want or not scale.dtype.is_float:
        raise OpError(f"scale must be a float tensor of shape [{','.join(map(str, want))}], got {scale}")
    if zero_point is not None and (zero_point.shape != want or not zero_point.dtype.is_int):
        raise OpError(f"zero_point must be an int tensor of shape [{','.join(map(str, want))}], got {zero_point}")


def _expand_param(p: torch.Tensor, x: torch.Tensor, axis: int | None, group_size: int | None) -> torch.Tensor:
    if axis is None:
        return p
    a = axis % x.dim()
    if group_size is None:
        return p.reshape([-1 if i == a else 1 for i in range(x.dim())])
    return p.repeat_interleave(group_size, dim=a)


def _quantize(x: TensorType, scale: TensorType, zero_point: TensorType | None = None, *, dtype: DType,
              axis: int | None, group_size: int | None) -> TensorType:
    if dtype not in _INT_RANGE and dtype not in _FP8_MAX:
        raise OpError(f"cannot quantize to {dtype}; use one of i8 u8 i4 f8e4m3 f8e5m2")
    if not x.dtype.is_float:
        raise OpError(f"x must be a float tensor, got {x}")
    _check_params(x, scale, zero_point, axis, group_size)
    return x.with_dtype(dtype)


@op("quant.quantize", infer=_quantize)
def quantize(x, scale, zero_point=None, *, dtype: DType, axis: int | None = None, group_size: int | None = None):
    """q = saturate(round(x / scale) + zero_point), computed in f32. i4 values are held
    unpacked, one per int8, while the graph runs (packing is a storage matter)."""
    y = x.float() / _expand_param(scale.float(), x, axis, group_size)
    if dtype in _FP8_MAX:
        return y.clamp(-_FP8_MAX[dtype], _FP8_MAX[dtype]).to(dtype.torch)
    y = torch.round(y)
    if zero_point is not None:
        y = y + _expand_param(zero_point.float(), x, axis, group_size)
    lo, hi = _INT_RANGE[dtype]
    q = y.clamp(lo, hi)
    return q.to(dtype.torch)


def _quantize_rows(x: TensorType, *, dtype: DType, eps: float, bound: float) -> tuple[TensorType, TensorType]:
    if dtype not in _INT_RANGE and dtype not in _FP8_MAX:
        raise OpError(f"cannot quantize to {dtype}; use one of i8 u8 i4 f8e4m3 f8e5m2")
    if x.rank != 2 or not x.dtype.is_float:
        raise OpError(f"x must be a 2-D float tensor (rows are tokens), got {x}")
    if not (eps > 0 and bound > 0):
        raise OpError(f"eps and bound must be positive, got eps={eps}, bound={bound}")
    return x.with_dtype(dtype), x.with_shape([x.shape[0]])


@op("quant.quantize_rows", infer=_quantize_rows, num_results=2)
def quantize_rows(x, *, dtype: DType, eps: float, bound: float):
    """Dynamic per-token quantization: scale = max(amax(|row|), eps) / bound in x's dtype, then
    quantize(x, scale){axis=0}. The quantize pass's abs/amax/clamp/div/quantize chain as one op, which
    a backend runs as one kernel (`fuse-quantized-linear` folds the chain into it)."""
    scale = x.abs().amax(dim=1).clamp(min=eps) / torch.tensor(bound, dtype=x.dtype)
    return quantize(x, scale, dtype=dtype, axis=0), scale


def _dequantize(q: TensorType, scale: TensorType, zero_point: TensorType | None = None, *,
                axis: int | None, group_size: int | None) -> TensorType:
    if q.dtype not in _INT_RANGE and q.dtype not in _FP8_MAX:
        raise OpError(f"cannot dequantize {q}")
    _check_params(q, scale, zero_point, axis, group_size)
    return q.with_dtype(scale.dtype)


@op("quant.dequantize", infer=_dequantize)
def dequantize(q, scale, zero_point=None, *, axis: int | None = None, group_size: int | None = None):
    """x = (q - zero_point) * scale, in the dtype of `scale` (ONNX DequantizeLinear)."""
    y = q.float()
    if zero_point is not None:
        y = y - _expand_param(zero_point.float(), y, axis, group_size)
    return (y * _expand_param(scale.float(), y, axis, group_size)).to(scale.dtype)



def dequantized_values(storage: Storage) -> torch.Tensor:
    """A quantized storage's values as the graph computes with them (i4 unpacked to one int8 each)."""
    t = storage.load()
    return unpack_i4(t) if storage.type.dtype is DType.i4 and t.dtype == torch.uint8 else t


# -- AutoAWQ's int32 layout -----------------------------------------------------------------------

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
"""AutoAWQ packs 8 columns per int32: nibble i (bits 4i..4i+3) holds column AWQ_ORDER[i] of the 8."""


def awq_pack(values: torch.Tensor) -> torch.Tensor:
    """[R, C] ints in [0, 15] -> int32 [R, C/8] in AutoAWQ's nibble order."""
    rows, cols = values.shape
    v = values.to(torch.int64).reshape(rows, cols // 8, 8)[:, :, list(AWQ_ORDER)]
    word = (v << torch.arange(0, 32, 4, device=v.device)).sum(-1)            # disjoint bits: sum == or
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)    # the top nibble sets the sign


def awq_unpack(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R, C/8] -> int32 [R, C] in [0, 15], undoing awq_pack."""
    nibbles = (packed.to(torch.int64)[:, :, None] >> torch.arange(0, 32, 4, device=packed.device)) & 0xF
    cols = torch.empty_like(nibbles)
    cols[:, :, list(AWQ_ORDER)] = nibbles
    return cols.reshape(packed.shape[0], -1).to(torch.int32)


_AWQ_OFFSET = 8   # AutoAWQ's nibbles are unsigned [0, 15]; kiln's i4 values are signed [-8, 7]


@dataclass(eq=False)
class AwqPackedStorage(Storage):
    """kiln's signed i4 [N, K] (a weight) or i8 [N, K/G] (zero points) as AutoAWQ's int32
    [K, N/8] or [K/G, N/8]: transposed, offset by 8, eight columns to a word; for zero points of a
    symmetric quantization (`source` None), the constant 8 of shape `type`."""

    source: Storage | None
    type: TensorType

    def load(self) -> torch.Tensor:
        if self.source is None:
            rows, words = self.type.shape
            return awq_pack(torch.full((rows, words * 8), _AWQ_OFFSET, dtype=torch.int32))
        if isinstance(self.source, AwqUnpackedStorage):  # a checkpoint's own tensor, handed back as it was
            return self.source.source.load()
        return awq_pack(dequantized_values(self.source).to(torch.int32).t() + _AWQ_OFFSET)

    def describe(self) -> str:
        return f"AutoAWQ int32 packing of ({self.source.describe() if self.source else 'zero points 8'})"


@dataclass(eq=False)
class AwqUnpackedStorage(Storage):
    """An AutoAWQ int32 tensor ([K, N/8] qweight or [K/G, N/8] qzeros) as kiln's signed values,
    [N, K] (i4) or [N, K/G] (i8): read only when something loads it, never dequantized."""

    source: Storage
    type: TensorType

    def load(self) -> torch.Tensor:
        return (awq_unpack(self.source.load()) - _AWQ_OFFSET).t().contiguous().to(torch.int8)

    def describe(self) -> str:
        return f"AutoAWQ unpacking of ({self.source.describe()})"


# -- quantized linears: the forms the backends' GEMM kernels take ----------------------------------

def _rows_scale(scale: TensorType, x: TensorType, what: str) -> None:
    if not scale.dtype.is_float or scale.shape not in ((), tuple(x.shape[:-1])):
        raise OpError(f"{what} must be a float scalar (per tensor) or [{','.join(map(str, x.shape[:-1]))}] "
                      f"(per token), got {scale}")


def _channel_scale(scale: TensorType, n, what: str, per_tensor: bool = True) -> None:
    shapes = ((), (n,)) if per_tensor else ((n,),)
    if not scale.dtype.is_float or scale.shape not in shapes:
        raise OpError(f"{what} must be a float {'scalar or ' if per_tensor else ''}[{n}] (per output channel), "
                      f"got {scale}")


def _weight_nk(x: TensorType, wq: TensorType, dtypes: tuple[DType, ...]) -> tuple:
    if wq.dtype not in dtypes or wq.rank != 2:
        raise OpError(f"wq must be {'/'.join(map(str, dtypes))}[out_features, in_features], got {wq}")
    if x.rank < 1 or x.shape[-1] != wq.shape[1]:
        raise OpError(f"x {x} does not end in in_features={wq.shape[1]} of wq {wq}")
    return wq.shape[0], wq.shape[1]


def _linear_w8a8(x: TensorType, wq: TensorType, x_scale: TensorType, w_scale: TensorType, *,
                 out_dtype: DType) -> TensorType:
    if x.dtype is not wq.dtype:
        raise OpError(f"x {x} and wq {wq} must have one quantized dtype")
    n, _ = _weight_nk(x, wq, (DType.f8e4m3, DType.i8))
    _rows_scale(x_scale, x, "x_scale")
    _channel_scale(w_scale, n, "w_scale")
    if not out_dtype.is_float or out_dtype in _FP8_MAX:
        raise OpError(f"out_dtype must be f32, f16 or bf16, got {out_dtype}")
    return TensorType(out_dtype, (*x.shape[:-1], n))


def _scaled_rows(acc: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    xs = x_scale.float().reshape(-1, 1) if x_scale.dim() else x_scale.float()
    ws = w_scale.float().reshape(1, -1) if w_scale.dim() else w_scale.float()
    return acc * xs * ws


def _linear_w8a8_cost(operands, results, attrs, bindings) -> tuple[int, int]:
    k = operands[1].shape[1]
    return 2 * results[0].numel(bindings) * k, sum(t.nbytes(bindings) for t in (*operands, *results))


@op("quant.linear_fp8", infer=_linear_w8a8, cost=_linear_w8a8_cost)
def linear_fp8(x, wq, x_scale, w_scale, *, out_dtype: DType):
    """y = (x @ wq.T) * x_scale * w_scale for e4m3 x [..., K] and wq [N, K] (nn.Linear layout);
    x_scale per tensor or per token (row of x), w_scale per tensor or per output channel. Products
    of e4m3 values are exact in f32, sums are f32, the result is rounded once to out_dtype."""
    rows = x.reshape(-1, x.shape[-1]).float()
    y = _scaled_rows(rows @ wq.float().t(), x_scale, w_scale)
    return y.to(out_dtype.torch).reshape(*x.shape[:-1], wq.shape[0])


@op("quant.linear_int8", infer=_linear_w8a8, cost=_linear_w8a8_cost)
def linear_int8(x, wq, x_scale, w_scale, *, out_dtype: DType):
    """y = (x @ wq.T) * x_scale * w_scale for int8 x [..., K] and wq [N, K] (SmoothQuant W8A8,
    LLM.int8()'s int8 part): the exact int32 accumulator converted to f32, then scaled (x per
    tensor or per token, w per tensor or per output channel), rounded once to out_dtype."""
    y = _scaled_rows(_int_matmul(x.reshape(-1, x.shape[-1]), wq).float(), x_scale, w_scale)
    return y.to(out_dtype.torch).reshape(*x.shape[:-1], wq.shape[0])


_EXACT_K = 1024   # int8 x int8 partial sums over 1024 terms stay below 2^24: exact in f32, in any order


def _int_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The exact integer product x @ w.T of int8 matrices, as f64 (f32 GEMMs over exact chunks of K)."""
    k = x.shape[-1]
    return sum((x[:, i:i + _EXACT_K].float() @ w[:, i:i + _EXACT_K].float().t()).double()
               for i in range(0, k, _EXACT_K))


def _linear_w8a16(x: TensorType, wq: TensorType, w_scale: TensorType) -> TensorType:
    if not x.dtype.is_float or x.dtype in _FP8_MAX:
        raise OpError(f"x must be f32, f16 or bf16, got {x}")
    n, _ = _weight_nk(x, wq, (DType.i8,))
    _channel_scale(w_scale, n, "w_scale", per_tensor=False)
    return TensorType(x.dtype, (*x.shape[:-1], n))


@op("quant.linear_w8a16", infer=_linear_w8a16, cost=_linear_w8a8_cost)
def linear_w8a16(x, wq, w_scale):
    """y = (x @ wq.T) * w_scale for int8 wq [N, K] with one scale per output channel and float x:
    f32 sums, rounded once to x's dtype."""
    return ((x.float() @ wq.float().t()) * w_scale.float()).to(x.dtype)


def _linear_awq(x: TensorType, qweight: TensorType, qzeros: TensorType, scales: TensorType) -> TensorType:
    if not x.dtype.is_float or x.dtype in _FP8_MAX:
        raise OpError(f"x must be f32, f16 or bf16, got {x}")
    if qweight.dtype is not DType.i32 or qweight.rank != 2 or qzeros.dtype is not DType.i32 or qzeros.rank != 2:
        raise OpError(f"qweight and qzeros must be i32 [K, N/8] and [K/G, N/8], got {qweight}, {qzeros}")
    if not scales.dtype.is_float or scales.rank != 2:
        raise OpError(f"scales must be a float [K/G, N], got {scales}")
    k, groups, n = qweight.shape[0], scales.shape[0], scales.shape[1]
    if x.rank < 1 or x.shape[-1] != k:
        raise OpError(f"x {x} does not end in K={k} of qweight {qweight}")
    if not all(isinstance(d, int) for d in (k, groups, n)) or k % groups or n % 8:
        raise OpError(f"scales {scales} must be [K/G, N] with G dividing K={k} and N a multiple of 8")
    if qweight.shape[1] * 8 != n or qzeros.shape != (groups, n // 8):
        raise OpError(f"qweight {qweight} and qzeros {qzeros} must be [{k},{n // 8}] and [{groups},{n // 8}] "
                      f"for scales {scales}")
    return TensorType(x.dtype, (*x.shape[:-1], n))


def _linear_awq_cost(operands, results, attrs, bindings) -> tuple[int, int]:
    k = operands[1].shape[0]
    return 2 * results[0].numel(bindings) * k, sum(t.nbytes(bindings) for t in (*operands, *results))


@op("quant.linear_awq", infer=_linear_awq, cost=_linear_awq_cost)
def linear_awq(x, qweight, qzeros, scales):
    """y = x @ W for W4A16 in AutoAWQ's layout: qweight int32 [K, N/8], qzeros int32 [K/G, N/8]
    (AWQ_ORDER nibbles), scales [K/G, N]; W = (q - zero) * scale per group of G rows, computed in
    f32 and rounded to x's dtype, then f32 sums rounded once to x's dtype."""
    group = qweight.shape[0] // scales.shape[0]
    q, z = awq_unpack(qweight), awq_unpack(qzeros).repeat_interleave(group, 0)
    w = ((q - z).float() * scales.float().repeat_interleave(group, 0)).to(x.dtype)
    return (x.float() @ w.float()).to(x.dtype)


def _embedding(table: TensorType, scale: TensorType, ids: TensorType) -> TensorType:
    if table.dtype not in (DType.i8, DType.f8e4m3) or table.rank != 2:
        raise OpError(f"table must be i8 or f8e4m3 [vocab, hidden], got {table}")
    if not scale.dtype.is_float or scale.dtype in _FP8_MAX or scale.shape != (table.shape[0],):
        raise OpError(f"scale must be a float [{table.shape[0]}] (one per row of the table), got {scale}")
    if ids.dtype not in (DType.i32, DType.i64):
        raise OpError(f"token ids must be i32 or i64, got {ids}")
    return TensorType(scale.dtype, (*ids.shape, table.shape[1]))


def _embedding_cost(operands, results, attrs, bindings) -> tuple[int, int]:
    table, scale, ids = operands
    read = (TensorType(table.dtype, results[0].shape).nbytes(bindings)          # the looked-up rows
            + TensorType(scale.dtype, ids.shape).nbytes(bindings) + ids.nbytes(bindings))
    return results[0].numel(bindings), read + results[0].nbytes(bindings)


@op("quant.embedding", infer=_embedding, cost=_embedding_cost)
def embedding(table, scale, ids):
    """Rows of a quantized table with one scale per row, dequantized as they are looked up:
    llm.embedding(quant.dequantize(table, scale){axis=0}, ids) without the whole table in float."""
    idx = ids.long()
    rows = table.view(torch.uint8)[idx].view(table.dtype).float()   # as bytes: not every device indexes e4m3
    return (rows * scale.float()[idx].unsqueeze(-1)).to(scale.dtype)


# -- the Q/DQ spellings of quantized activations (built by the quantize pass and the frontends) -----

TINY_AMAX = 1e-6   # the floor of a token's amax, so that an all-zero token does not divide by zero


def qmax(dtype: DType) -> float:
    """The largest magnitude a quantized dtype holds: 448 (e4m3), 127 (int8), 7 (int4)."""
    return _FP8_MAX[dtype] if dtype in _FP8_MAX else float(_INT_RANGE[dtype][1])


def per_token_qdq(b, x, dtype: DType):
    """Quantize-dequantize x with one scale per token (row of the last dim) computed at run time:
    amax(|x|) / 448 for e4m3, / 127 for int8. Tokens are rows of a 2-D view of x."""
    from ..types import dim_product

    k, dt = x.type.shape[-1], x.type.dtype
    rows = x if x.type.rank == 2 else b.core.reshape(x, shape=[dim_product(x.type.shape[:-1]), k])
    amax = b.core.clamp(b.core.amax(b.core.abs(rows), dims=[1], keepdim=False), min=TINY_AMAX)
    scale = b.core.div(amax, b.constant(qmax(dtype), dt))
    q = b.quant.quantize(rows, scale, dtype=dtype, axis=0)
    back = b.quant.dequantize(q, scale, axis=0)
    return back if rows is x else b.core.reshape(back, shape=list(x.type.shape))


def static_qdq(b, x, scale, dtype: DType):
    """Quantize-dequantize x with one fixed scale (a calibrated or checkpoint parameter)."""
    return b.quant.dequantize(b.quant.quantize(x, scale, dtype=dtype), scale)

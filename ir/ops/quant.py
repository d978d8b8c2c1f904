"""`quant.*`: quantize and dequantize with ONNX/TensorRT explicit-quantization semantics
(round half to even, saturate), per tensor, per channel (`axis`) or per block of `group_size`
along `axis`. Later passes fold Q/DQ pairs into quantized GEMMs."""

from __future__ import annotations

import torch

from ..registry import OpError, op
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


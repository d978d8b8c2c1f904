"""Activation quantization to FP8 in one kernel each: dynamic per-token (row) scales (a row's amax, its
scale and its e4m3 values, where the graph's reference takes five ops: abs, amax, clamp, divide,
quantize), and a calibrated per-tensor scale (divide, clamp and cast, three launches in torch)."""
from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl

from .hardware import pdl, pdl_wait


def quantize_rows_reference(x: torch.Tensor, dtype: torch.dtype, eps: float, bound: float,
                            round_to: Callable[[torch.Tensor, torch.dtype], torch.Tensor] = torch.Tensor.to
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """The oracle (ir/ops/quant.py's quant.quantize_rows): the scale is rounded to x's dtype, as a
    graph computes it, and x / scale is taken in f32. `round_to` does the two roundings (tests pass
    Triton's cast, which differs from torch's under the interpreter)."""
    eps_x = float(torch.tensor(eps, dtype=x.dtype))
    scale = round_to(x.float().abs().amax(dim=1).clamp(min=eps_x) / bound, x.dtype)
    q = round_to((x.float() / scale.float()[:, None]).clamp(-bound, bound), dtype)
    return q, scale


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, stride_q, eps, bound, BLOCK: tl.constexpr,
                          PDL: tl.constexpr = False):
    row = tl.program_id(0)
    pdl_wait(PDL)
    offs = tl.arange(0, BLOCK)
    x_row, q_row = x_ptr + row.to(tl.int64) * stride_x, q_ptr + row.to(tl.int64) * stride_q
    top = tl.zeros((BLOCK,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        x = tl.load(x_row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
        top = tl.maximum(top, tl.abs(x))
    scale = (tl.maximum(tl.max(top, axis=0), eps) / bound).to(s_ptr.dtype.element_ty)  # rounded as the graph's
    tl.store(s_ptr + row, scale)
    s = scale.to(tl.float32)
    for k0 in range(0, K, BLOCK):
        x = tl.load(x_row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
        y = tl.minimum(tl.maximum(x / s, -bound), bound)  # a division, as the reference's (not x * 1/s)
        tl.store(q_row + k0 + offs, y.to(q_ptr.dtype.element_ty), mask=k0 + offs < K)


def quantize_rows(x: torch.Tensor, dtype: torch.dtype, eps: float, bound: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [M, K] in `dtype`, scale [M] in x's dtype), with scale = max(amax|row|, eps) / bound."""
    if x.dim() != 2 or x.stride(-1) != 1:
        x = x.reshape(-1, x.shape[-1]).contiguous()
    M, K = x.shape
    q = torch.empty((M, K), dtype=dtype, device=x.device)
    scale = torch.empty(M, dtype=x.dtype, device=x.device)
    eps_x = float(torch.tensor(eps, dtype=x.dtype))  # the clamp's bound as x's dtype holds it
    block = min(triton.next_power_of_2(K), 4096)
    _quantize_rows_kernel[(M,)](x, q, scale, K, x.stride(0), q.stride(0), eps_x, bound, BLOCK=block,
                                num_warps=4 if block <= 1024 else 8, **pdl(x.device, M))
    return q, scale


def quantize_tensor_reference(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, bound: float,
                              round_to: Callable[[torch.Tensor, torch.dtype], torch.Tensor] = torch.Tensor.to
                              ) -> torch.Tensor:
    """The oracle (ir/ops/quant.py's quant.quantize with one scale): x / scale in f32, saturated, rounded."""
    return round_to((x.float() / scale.float().reshape(())).clamp(-bound, bound), dtype)


@triton.jit
def _quantize_tensor_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, stride_q, bound, BLOCK: tl.constexpr,
                            PDL: tl.constexpr = False):
    row, offs = tl.program_id(0), tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    pdl_wait(PDL)
    s = tl.load(s_ptr).to(tl.float32)
    x = tl.load(x_ptr + row.to(tl.int64) * stride_x + offs, mask=offs < K, other=0.0).to(tl.float32)
    y = tl.minimum(tl.maximum(x / s, -bound), bound)  # a division, as the reference's
    tl.store(q_ptr + row.to(tl.int64) * stride_q + offs, y.to(q_ptr.dtype.element_ty), mask=offs < K)


def quantize_tensor(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, bound: float) -> torch.Tensor:
    """q = saturate(x / scale) in `dtype`, one (calibrated) scale for the whole tensor; q has x's shape."""
    x2 = x.reshape(-1, x.shape[-1])
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    M, K = x2.shape
    q = torch.empty((M, K), dtype=dtype, device=x.device)
    block = min(triton.next_power_of_2(K), 2048)
    _quantize_tensor_kernel[(M, triton.cdiv(K, block))](x2, q, scale, K, x2.stride(0), q.stride(0), bound,
                                                        BLOCK=block, num_warps=4, **pdl(x.device, M))
    return q.view(x.shape)

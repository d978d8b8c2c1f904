"""RMSNorm fused with the residual add that precedes it in every decoder layer: one read of x and
the residual, one write of the new residual and of the normalised output."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .hardware import pdl, pdl_wait


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """The oracle: h = x + residual rounded to x's dtype; y = h / rms(h) * weight in f32, rounded once.
    Returns y, or (y, h) when a residual is given."""
    h = x if residual is None else (x.float() + residual.float()).to(x.dtype)
    hf = h.float()
    y = (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)
    return y if residual is None else (y, h)


@triton.jit
def _rms_norm_kernel(x_ptr, r_ptr, w_ptr, y_ptr, h_ptr, n, stride_x, stride_r, stride_y, stride_h, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    pdl_wait(PDL)
    h = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        h = (h.to(tl.float32) + tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32))
        h = h.to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + row * stride_h + cols, h, mask=mask)
    hf = h.to(tl.float32)
    inv = tl.rsqrt(tl.sum(hf * hf, 0) / n + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + cols, (hf * inv * w).to(y_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             out: torch.Tensor | None = None, residual_out: torch.Tensor | None = None):
    """RMSNorm of x (+ residual) over the last axis in one pass; returns y, or (y, x + residual).
    residual_out may alias residual (in-place update, as the decoder loop wants)."""
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    assert x2.stride(-1) == 1 and weight.is_contiguous()
    y = torch.empty_like(x2) if out is None else out.view(-1, n)
    r2 = x2 if residual is None else residual.reshape(-1, n)
    h = y if residual is None else (torch.empty_like(x2) if residual_out is None else residual_out.view(-1, n))
    block = triton.next_power_of_2(n)
    _rms_norm_kernel[(x2.shape[0],)](x2, r2, weight, y, h, n, x2.stride(0), r2.stride(0), y.stride(0), h.stride(0),
                                     eps, HAS_RESIDUAL=residual is not None, BLOCK=block,
                                     num_warps=min(16, max(1, block // 512)), **pdl(x2.device, x2.shape[0]))
    y = y.view(x.shape)
    return y if residual is None else (y, h.view(x.shape))

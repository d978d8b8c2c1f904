"""FP8 (e4m3) W8A8 GEMM for nn.Linear weights: per-tensor scales, or per-token x per-channel scales.
The kernels are gemm.py's, with the fp8 tensor-core dot and the scales applied in the epilogue."""
from __future__ import annotations

import torch

from .gemm import (
    DECODE_MAX_M,
    DecodeConfig,
    PrefillConfig,
    launch_decode,
    launch_prefill,
)

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max
_SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""Scales the kernels' epilogue reads as they are (widened to f32 in registers): no cast launched per call."""


def quantize_fp8(x: torch.Tensor, per_row: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric e4m3 quantisation; per_row gives one f32 scale per row (token or channel)."""
    amax = x.abs().amax(dim=-1, keepdim=True) if per_row else x.abs().amax()
    scale = (amax.float() / FP8_MAX).clamp(min=1e-12)
    q = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, (scale.reshape(-1) if per_row else scale.reshape(1))


def linear_fp8_reference(xq: torch.Tensor, wq: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor,
                         out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The oracle: exact products of the fp8 values, f32 sums, scaled, rounded once."""
    y = xq.float() @ wq.float().t()
    y = y * (x_scale.float().reshape(-1, 1) if x_scale.numel() > 1 else x_scale.float())
    y = y * (w_scale.float().reshape(1, -1) if w_scale.numel() > 1 else w_scale.float())
    return y.to(out_dtype)


def linear_fp8(xq: torch.Tensor, wq: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor,
               out_dtype: torch.dtype = torch.bfloat16, out: torch.Tensor | None = None,
               config: DecodeConfig | PrefillConfig | None = None) -> torch.Tensor:
    """y = (xq @ wq.T) * x_scale * w_scale: half the weight bytes of bf16 at decode, twice the MMA rate at prefill."""
    x2 = xq.reshape(-1, xq.shape[-1])
    M, N = x2.shape[0], wq.shape[0]
    y = torch.empty((M, N), dtype=out_dtype, device=xq.device) if out is None else out.view(M, N)
    xs, ws = (s.reshape(-1) if s.dtype in _SCALE_DTYPES else s.float().reshape(-1) for s in (x_scale, w_scale))
    if M <= DECODE_MAX_M and not isinstance(config, PrefillConfig):
        launch_decode(x2, wq, y, xs, ws, config)
    else:
        launch_prefill(x2, wq, y, xs, ws, config)
    return y.view(*xq.shape[:-1], N)

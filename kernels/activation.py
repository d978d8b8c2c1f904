"""silu(gate) * up over the fused gate_up projection's output, so the MLP's intermediate is written once."""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .hardware import pdl, pdl_wait


def silu_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """The oracle: gate_up [..., 2F] = [gate | up] -> silu(gate) * up in f32, rounded once."""
    gate, up = gate_up.float().chunk(2, dim=-1)
    return (F.silu(gate) * up).to(gate_up.dtype)


@triton.jit
def _silu_mul_kernel(gu_ptr, y_ptr, F_, stride_gu, stride_y, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < F_
    pdl_wait(PDL)
    g = tl.load(gu_ptr + row * stride_gu + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * stride_gu + F_ + cols, mask=mask, other=0.0).to(tl.float32)
    y = g / (1.0 + tl.exp(-g)) * u
    tl.store(y_ptr + row * stride_y + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


def silu_mul(gate_up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """silu(gate) * up, reading gate_up [..., 2F] once and writing [..., F]."""
    F_ = gate_up.shape[-1] // 2
    gu = gate_up.reshape(-1, 2 * F_)
    assert gu.stride(-1) == 1
    y = torch.empty((gu.shape[0], F_), dtype=gate_up.dtype, device=gate_up.device) if out is None else out.view(-1, F_)
    block = min(4096, triton.next_power_of_2(F_))
    _silu_mul_kernel[(gu.shape[0], triton.cdiv(F_, block))](gu, y, F_, gu.stride(0), y.stride(0), BLOCK=block,
                                                            num_warps=4, **pdl(gu.device, gu.shape[0]))
    return y.view(*gate_up.shape[:-1], F_)

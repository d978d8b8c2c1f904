"""FP8 activation quantization kernels against their oracles (the graph's quant.quantize_rows and quant.quantize)."""
import pytest
import torch
import triton
import triton.language as tl
from kiln.ir.ops.quant import quantize as quantize_op
from kiln.ir.ops.quant import quantize_rows as quantize_rows_op
from kiln.ir.types import DType
from kiln.kernels.quantize import (
    quantize_rows,
    quantize_rows_reference,
    quantize_tensor,
    quantize_tensor_reference,
)

FP8 = torch.float8_e4m3fn


@triton.jit
def _cast_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + i, tl.load(x_ptr + i, mask=i < n).to(y_ptr.dtype.element_ty), mask=i < n)


def triton_cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x rounded by Triton's own cast: the interpreter's bf16 and fp8 rounding is not torch's."""
    x = x.float().contiguous()
    y = torch.empty(x.shape, dtype=dtype, device=x.device)
    _cast_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
    return y


@pytest.mark.parametrize("M,K", [(1, 4096), (5, 333), (3, 5000)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_quantize_rows_matches_its_oracle(M, K, dtype, device):
    torch.manual_seed(M * K)
    x = (torch.randn(M, K, device=device) * 3).to(dtype)
    x[0, 7] = 100.0                       # one outlier sets its row's scale
    q, scale = quantize_rows(x, FP8, 1e-6, 448.0)
    want_q, want_scale = quantize_rows_reference(x, FP8, 1e-6, 448.0, round_to=triton_cast)
    assert torch.equal(scale, want_scale)
    assert torch.equal(q.float(), want_q.float())
    if device == "cuda":                  # the GPU rounds as torch does: the graph op's own values
        ref_q, ref_scale = quantize_rows_op(x, dtype=DType.f8e4m3, eps=1e-6, bound=448.0)
        assert torch.equal(scale, ref_scale) and torch.equal(q.float(), ref_q.float())


@pytest.mark.parametrize("shape", [(1, 4096), (5, 333), (2, 3, 5000)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_quantize_tensor_matches_its_oracle(shape, dtype, device):
    torch.manual_seed(sum(shape))
    x = (torch.randn(*shape, device=device) * 3).to(dtype)
    x.view(-1)[7] = 5000.0                # saturates at 448
    scale = torch.tensor([0.05], device=device, dtype=dtype)
    q = quantize_tensor(x, scale, FP8, 448.0)
    assert q.shape == x.shape and q.float().abs().max() == 448.0
    assert torch.equal(q.float(), quantize_tensor_reference(x, scale, FP8, 448.0, round_to=triton_cast).float())
    if device == "cuda":                  # the GPU rounds as torch does: the graph op's own values
        ref = quantize_op(x, scale, dtype=DType.f8e4m3)
        assert torch.equal(q.float(), ref.float())

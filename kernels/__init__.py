"""Triton kernels for kiln's cuda backend; each module holds one kernel family and its torch reference."""
from .activation import silu_mul
from .attention import paged_decode_attention, paged_prefill_attention
from .gemm import linear, linear_decode, linear_prefill
from .gemm_fp8 import linear_fp8, quantize_fp8
from .gemm_woq import (
    AwqKPacked,
    awq_kpack,
    linear_awq,
    linear_awq_kpacked,
    linear_w8a16,
)
from .norm import rms_norm
from .quantize import quantize_rows, quantize_tensor
from .rope import rope_cache, rope_kv_write
from .sampling import filter_logits

__all__ = ["AwqKPacked", "awq_kpack", "filter_logits", "linear", "linear_awq", "linear_awq_kpacked", "linear_decode",
           "linear_fp8", "linear_prefill", "linear_w8a16", "paged_decode_attention", "paged_prefill_attention",
           "quantize_fp8", "quantize_rows", "quantize_tensor", "rms_norm", "rope_cache", "rope_kv_write", "silu_mul"]

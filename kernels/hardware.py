"""What a kernel needs to know about where it runs: the Triton interpreter or a GPU, and its size."""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1, whose bf16/fp8 tl.dot is wrong, so kernels upcast to f32 first."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def num_sms(device_index: int = 0) -> int:
    """Multiprocessor count, to size grids that fill the chip (132 on an H100 SXM)."""
    if not torch.cuda.is_available() or interpreting():
        return 4
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@triton.jit
def mma(a, b, acc, UPCAST: tl.constexpr):
    """acc += a @ b on the tensor cores in a's dtype (b converted: int8/fp8 weights); f32 under the interpreter."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b.to(a.dtype), acc)

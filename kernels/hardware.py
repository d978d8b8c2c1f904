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


PDL = os.environ.get("KILN_PDL", "1") != "0"
"""Programmatic dependent launch for the decode-path kernels (Hopper and later; KILN_PDL=0 turns it off):
a kernel's programs start while the one before it drains and wait in pdl_wait for its results, so a
decode step's ~10 kernels per layer do not each pay a launch and a ramp."""


@functools.lru_cache(maxsize=None)
def _pdl_capable(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


PDL_MAX_ROWS = 16
"""Launches over more rows (tokens, sequences) than this go without: a 512-row decode step of the 8B
shape took 21.24 ms with it against 20.54 without (H100), where a batch-1 step gained 4%."""


def pdl(device: torch.device, rows: int) -> dict[str, bool]:
    """Launch options for a kernel that calls pdl_wait before it reads what earlier kernels wrote."""
    if PDL and rows <= PDL_MAX_ROWS and device.type == "cuda" and not interpreting() \
            and _pdl_capable(device.index or 0):
        return {"PDL": True, "launch_pdl": True}
    return {"PDL": False}


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    """Let the next kernel's programs launch, then wait until the previous kernel's writes are visible:
    nothing before this may read an activation or write anything (weights may be read)."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()


@triton.jit
def prefetch_l2(ptrs):
    """Start moving these addresses' lines into L2 (a hint: nothing waits for it); used for weights before pdl_wait."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def mma(a, b, acc, UPCAST: tl.constexpr):
    """acc += a @ b on the tensor cores in a's dtype (b converted: int8/fp8 weights); f32 under the interpreter."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b.to(a.dtype), acc)

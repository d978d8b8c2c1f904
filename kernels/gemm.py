"""GEMM y = (x @ w.T) * scales for nn.Linear weights w [N, K]: a weight-streaming decode kernel
(M <= 16) and a tiled prefill kernel, chosen by shape. bf16 here; fp8 and int8 weights reuse the
same kernels through their scale epilogue (gemm_fp8.py, gemm_woq.py)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .hardware import interpreting, mma, num_sms, pdl, pdl_wait, prefetch_l2
from .split_k import split_buffers, sum_splits_last

DECODE_MAX_M = 16


def linear_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The oracle: f32 accumulation of x @ w.T, rounded once to x's dtype."""
    return (x.float() @ w.float().t()).to(x.dtype)


@dataclass(frozen=True)
class DecodeConfig:
    block_n: int
    block_k: int
    split_k: int | None  # None: split K while the grid fits one program per SM (decode_split)
    num_warps: int = 4
    num_stages: int = 4
    block_m: int = 16
    swap_ab: bool = False  # w tile as the MMA's A operand: block_n rows (64, 128) fill a wgmma, x is not padded
    prefetch_bytes: int = 1024  # of each weight row, into L2 before the kernel waits on the one before it (PDL)


@dataclass(frozen=True)
class PrefillConfig:
    block_m: int = 256
    block_n: int = 128
    block_k: int = 64
    group_m: int = 8
    num_warps: int = 8
    num_stages: int = 3


# Scale kinds of the epilogue: none, one scalar, one per row of x (token) or per row of w (channel).
NO_SCALE, TENSOR_SCALE, ROW_SCALE = 0, 1, 2


@triton.jit
def _scale(acc, ptr, offs, n, KIND: tl.constexpr, AXIS: tl.constexpr):
    if KIND == 1:
        acc = acc * tl.load(ptr)
    if KIND == 2:
        s = tl.load(ptr + offs, mask=offs < n, other=0.0)
        acc = acc * (s[:, None] if AXIS == 0 else s[None, :])
    return acc


@triton.jit
def _decode_kernel(x_ptr, w_ptr, y_ptr, xs_ptr, ws_ptr, part_ptr, ticket_ptr, M, N, K, stride_xm, stride_wn,
                   stride_ym, k_per_split, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   SPLITS: tl.constexpr, SWAP_AB: tl.constexpr, X_SCALE: tl.constexpr, W_SCALE: tl.constexpr,
                   UPCAST: tl.constexpr, PDL: tl.constexpr = False, PREFETCH: tl.constexpr = 0,
                   LINE: tl.constexpr = 64):
    # One program streams a [BLOCK_N, k_per_split] slab of w once; BLOCK_M rows of x ride along.
    # SWAP_AB computes the transposed tile y^T = w @ x^T, accumulator [BLOCK_N, BLOCK_M].
    pid_n = tl.program_id(0)
    k_lo = tl.program_id(1) * k_per_split
    k_hi = tl.minimum(K, k_lo + k_per_split)
    offs_m = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    if PDL and PREFETCH > 0:  # the slab rows' first PREFETCH lines of LINE elements, while the last kernel drains
        lines = tl.minimum(k_lo + tl.arange(0, PREFETCH) * LINE, k_hi - 1)
        prefetch_l2(w_ptr + tl.minimum(offs_n, N - 1)[:, None] * stride_wn + lines[None, :])
    pdl_wait(PDL)
    acc = tl.zeros((BLOCK_N, BLOCK_M) if SWAP_AB else (BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k = k0 + offs_k
        if SWAP_AB:
            w = tl.load(w_ptr + offs_n[:, None] * stride_wn + k[None, :],
                        mask=(offs_n[:, None] < N) & (k[None, :] < k_hi), other=0.0)
            xt = tl.load(x_ptr + offs_m[None, :] * stride_xm + k[:, None],
                         mask=(offs_m[None, :] < M) & (k[:, None] < k_hi), other=0.0)
            if not UPCAST:  # int8 w widens to x's dtype in registers (mma converts only its b operand)
                w = w.to(xt.dtype)
            acc = mma(w, xt, acc, UPCAST)
        else:
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :],
                        mask=(offs_m[:, None] < M) & (k[None, :] < k_hi), other=0.0)
            w = tl.load(w_ptr + offs_n[None, :] * stride_wn + k[:, None],
                        mask=(offs_n[None, :] < N) & (k[:, None] < k_hi), other=0.0)
            acc = mma(x, w, acc, UPCAST)
    if SWAP_AB:
        acc = _scale(_scale(acc, xs_ptr, offs_m, M, X_SCALE, 1), ws_ptr, offs_n, N, W_SCALE, 0)
        rows, cols = offs_m[None, :], offs_n[:, None]
    else:
        acc = _scale(_scale(acc, xs_ptr, offs_m, M, X_SCALE, 0), ws_ptr, offs_n, N, W_SCALE, 1)
        rows, cols = offs_m[:, None], offs_n[None, :]
    mask = (rows < M) & (cols < N)
    if SPLITS == 1:
        tl.store(y_ptr + rows * stride_ym + cols, acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:  # the scales distribute over the K splits' partial sums
        sum_splits_last(acc, part_ptr, rows * N + cols, mask, M * N, y_ptr + rows * stride_ym + cols,
                        ticket_ptr + tl.program_id(2) * tl.num_programs(0) + pid_n, SPLITS)


@triton.jit
def _prefill_kernel(x_ptr, w_ptr, y_ptr, xs_ptr, ws_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    GROUP_M: tl.constexpr, X_SCALE: tl.constexpr, W_SCALE: tl.constexpr,
                    UPCAST: tl.constexpr):
    # Grouped tile order: GROUP_M row-tiles share each column-tile of w while it is in L2.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Wrapped rows/cols keep loads unmasked along M and N; the store mask drops them.
    rows = tl.max_contiguous(tl.multiple_of(offs_m % M, BLOCK_M), BLOCK_M)
    cols = tl.max_contiguous(tl.multiple_of(offs_n % N, BLOCK_N), BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        x = tl.load(x_ptr + rows[:, None] * stride_xm + k[None, :], mask=k[None, :] < K, other=0.0)
        w = tl.load(w_ptr + cols[None, :] * stride_wn + k[:, None], mask=k[:, None] < K, other=0.0)
        acc = mma(x, w, acc, UPCAST)
    acc = _scale(_scale(acc, xs_ptr, offs_m, M, X_SCALE, 0), ws_ptr, offs_n, N, W_SCALE, 1)
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def decode_config(M: int, N: int, K: int, w_bytes: int = 2, x_bytes: int = 2) -> DecodeConfig:
    """Slabs of 256 to 512 bytes of each weight row per step, narrow enough to give every SM work.
    bf16 and fp8 take the swap-AB form (64 weight rows fill a wgmma; 2 to 25% faster than the
    x-as-A form on every Llama-3.1-8B/3.2-1B shape but one, H100, `bench.py --only decode-sweep`)."""
    if w_bytes == 1 and x_bytes == 1:  # fp8
        if N >= 8192 and K >= 4096:  # 8B merged gate/up, lm_head: 1.09x / 1.02x over 64/256/3 (`--only served-sweep`)
            return DecodeConfig(64, 512, None, 4, 4, 16, swap_ab=True)
        if N >= 8192:
            return DecodeConfig(64, 256, None, 4, 5, 16, swap_ab=True)
        return DecodeConfig(64, 512, None, 4, 5, 16, swap_ab=True)
    if w_bytes == 1:  # int8 weights, widened in registers: the x-as-A form until a sweep says otherwise
        return DecodeConfig(32, 512, 1, 4, 3)
    if N >= 8192 and K <= 2048:
        return DecodeConfig(64, 128, None, 4, 5, 16, swap_ab=True)
    return DecodeConfig(64, 256, None, 4, 4 if N >= 8192 else 5, 16, swap_ab=True)


def decode_split(programs: int, k_steps: int) -> int:
    """Split K while the grid still fits one program per SM: a weight slab that N alone spreads over too
    few SMs (o, down, the small q/k/v) then streams from all of them (their pipelines fill one SM each)."""
    split = 1
    while 2 * split * programs <= num_sms() and 2 * split <= k_steps:
        split *= 2
    return split


def prefill_config(M: int, N: int, K: int, w_bytes: int = 2) -> PrefillConfig:
    """The biggest tiles that still give half the SMs a program (fp8: twice the K depth, same bytes)."""
    kx, half = 2 // w_bytes, num_sms() // 2
    if M >= 256 and triton.cdiv(M, 256) * triton.cdiv(N, 128) >= half:
        return PrefillConfig() if w_bytes == 2 else PrefillConfig(128, 256, 128)
    if triton.cdiv(M, 64) * triton.cdiv(N, 128) >= half:
        return PrefillConfig(64, 128, 64 * kx, 8, 4, 4)
    return PrefillConfig(64, 64, 128 * kx, 8, 4, 4)


def _flat(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _scale_kind(s: torch.Tensor | None) -> int:
    return NO_SCALE if s is None else TENSOR_SCALE if s.numel() == 1 else ROW_SCALE


def _output(out: torch.Tensor | None, M: int, N: int, dtype: torch.dtype, device) -> torch.Tensor:
    return torch.empty((M, N), dtype=dtype, device=device) if out is None else out.view(M, N)


def launch_decode(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, x_scale: torch.Tensor | None = None,
                  w_scale: torch.Tensor | None = None, config: DecodeConfig | None = None) -> torch.Tensor:
    """out[M, N] = (x @ w.T) * scales, streaming w once per BLOCK_M rows of x; shared by the bf16, fp8
    and int8-weight linears."""
    (M, K), N = x.shape, w.shape[0]
    assert w.stride(-1) == 1 and x.stride(-1) == 1 and w.shape[1] == K
    cfg = config or decode_config(M, N, K, w.element_size(), x.element_size())
    blocks = triton.cdiv(N, cfg.block_n) * triton.cdiv(M, cfg.block_m)
    k_per_split = triton.cdiv(K, cfg.split_k or decode_split(blocks, triton.cdiv(K, cfg.block_k)))
    k_per_split = triton.cdiv(k_per_split, cfg.block_k) * cfg.block_k
    split = triton.cdiv(K, k_per_split)
    partials, tickets = split_buffers(x, split, M * N, blocks) if split > 1 else (out, out)
    grid = (triton.cdiv(N, cfg.block_n), split, triton.cdiv(M, cfg.block_m))
    xs, ws = (x_scale if x_scale is not None else x), (w_scale if w_scale is not None else x)
    _decode_kernel[grid](x, w, out, xs, ws, partials, tickets, M, N, K, x.stride(0), w.stride(0), out.stride(0),
                         k_per_split, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                         SPLITS=split, SWAP_AB=cfg.swap_ab, X_SCALE=_scale_kind(x_scale),
                         W_SCALE=_scale_kind(w_scale), UPCAST=interpreting(), num_warps=cfg.num_warps,
                         num_stages=cfg.num_stages, PREFETCH=cfg.prefetch_bytes // 128,
                         LINE=128 // w.element_size(), **pdl(x.device, M))
    return out


def launch_prefill(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, x_scale: torch.Tensor | None = None,
                   w_scale: torch.Tensor | None = None, config: PrefillConfig | None = None) -> torch.Tensor:
    """out[M, N] = (x @ w.T) * scales with tensor-core tiles; shared like launch_decode."""
    (M, K), N = x.shape, w.shape[0]
    assert w.stride(-1) == 1 and x.stride(-1) == 1 and w.shape[1] == K
    cfg = config or prefill_config(M, N, K, w.element_size())
    grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n),)
    xs, ws = (x_scale if x_scale is not None else x), (w_scale if w_scale is not None else x)
    _prefill_kernel[grid](x, w, out, xs, ws, M, N, K, x.stride(0), w.stride(0), out.stride(0),
                          BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                          GROUP_M=cfg.group_m, X_SCALE=_scale_kind(x_scale), W_SCALE=_scale_kind(w_scale),
                          UPCAST=interpreting(), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


def linear_decode(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None = None,
                  config: DecodeConfig | None = None) -> torch.Tensor:
    """x [M<=16, K] @ w.T: at decode the weight read is the whole cost, so spread it over every SM."""
    x2 = _flat(x)
    y = launch_decode(x2, w, _output(out, x2.shape[0], w.shape[0], x.dtype, x.device), config=config)
    return y.view(*x.shape[:-1], w.shape[0])


def linear_prefill(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None = None,
                   config: PrefillConfig | None = None) -> torch.Tensor:
    """x [M, K] @ w.T with tensor-core tiles: at large M the GEMM is compute-bound."""
    x2 = _flat(x)
    y = launch_prefill(x2, w, _output(out, x2.shape[0], w.shape[0], x.dtype, x.device), config=config)
    return y.view(*x.shape[:-1], w.shape[0])


# cuBLAS beat the best Triton tiles at every M > 16 shape measured (BENCHMARKS.md), so linear()
# hands those to it; the Triton tiles stay available, tested and benchmarked, as linear_triton.
CUBLAS_PREFILL = True


def prefill_backend(M: int, N: int, K: int) -> str:
    """Who runs a linear of this shape in linear(): 'triton' or 'torch' (cuBLAS)."""
    return "torch" if CUBLAS_PREFILL and M > DECODE_MAX_M else "triton"


def linear_triton(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None = None,
                  config: PrefillConfig | None = None) -> torch.Tensor:
    """x @ w.T in Triton only: the weight-streaming kernel for decode batches, tiles otherwise."""
    M = x.numel() // x.shape[-1]
    if M <= DECODE_MAX_M and config is None:
        return linear_decode(x, w, out)
    return linear_prefill(x, w, out, config)


def linear(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w.T by whichever measured fastest for the shape (prefill_backend)."""
    M = x.numel() // x.shape[-1]
    if prefill_backend(M, *w.shape) == "torch":
        return torch.matmul(x, w.t(), out=out)
    return linear_triton(x, w, out)

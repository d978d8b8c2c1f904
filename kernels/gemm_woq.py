"""Weight-only quantised GEMMs with 16-bit activations: W4A16 in the AutoAWQ layout (group-wise
scales and zero points) and W8A16 with per-channel scales. At decode they stream a quarter or half
of the bf16 weight bytes."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .gemm import DECODE_MAX_M, DecodeConfig, PrefillConfig, launch_decode, launch_prefill
from .hardware import interpreting, mma, num_sms

# AutoAWQ packs 8 columns per int32 with nibble i holding column AWQ_ORDER[i].
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
# From this many rows of x up, the weight-only linears dequantise once and call cuBLAS.
DEQUANT_MIN_M = 128


def awq_pack(q: torch.Tensor) -> torch.Tensor:
    """int values in [0, 15], [R, N] -> int32 [R, N/8] in AutoAWQ's interleaved nibble order."""
    q = q.to(torch.int32).reshape(q.shape[0], -1, 8)[:, :, list(AWQ_ORDER)]
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=q.device)
    return (q << shifts).sum(-1, dtype=torch.int64).to(torch.int32)  # disjoint bits: sum == or


def awq_unpack(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R, N/8] -> int32 [R, N] with values in [0, 15], undoing awq_pack."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    nibbles = (packed[:, :, None] >> shifts) & 0xF  # nibble i holds column AWQ_ORDER[i]
    cols = torch.empty_like(nibbles)
    cols[:, :, list(AWQ_ORDER)] = nibbles
    return cols.reshape(packed.shape[0], -1)


def awq_dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """W [K, N] in f32: (q - zero) * scale per group of K rows."""
    group = qweight.shape[0] // scales.shape[0]
    q, z = awq_unpack(qweight), awq_unpack(qzeros).repeat_interleave(group, 0)
    return (q - z).float() * scales.float().repeat_interleave(group, 0)


def linear_awq_reference(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor,
                         scales: torch.Tensor) -> torch.Tensor:
    """The oracle: x @ W with W dequantised to f32 (AWQ's W is [K, N], not nn.Linear's [N, K])."""
    w = awq_dequantize(qweight, qzeros, scales).to(x.dtype).float()
    return (x.float() @ w).to(x.dtype)


def linear_w8a16_reference(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """The oracle: (x @ wq.T) * w_scale per output channel, f32 sums."""
    return ((x.float() @ wq.float().t()) * w_scale.float()).to(x.dtype)


@dataclass(frozen=True)
class AwqConfig:
    block_m: int
    block_n: int
    split_k: int
    num_warps: int = 4
    num_stages: int = 4
    block_k: int = 32  # rows per step of the M == 1 kernel (divides the group)


@triton.jit
def _nibble_to_f32(q):
    # Exact int in [0, 15] -> f32 without the quarter-rate I2F: 2^23 + q has q as its mantissa.
    return (q | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _unpack_awq(packed):
    # [R, C] int32 -> [R, 8C] nibbles in column order. Column 8c + 2i + h sits at bits 4i + 16h of
    # word c (AWQ_ORDER puts even columns in the low half-word, odd in the high), and each interleave
    # appends one lower digit of the column index: first i's high bit, then i's low bit, then h.
    b = tl.interleave(packed, packed >> 8)
    b = tl.interleave(b, b >> 4)
    return tl.interleave(b, b >> 16) & 0xF


@triton.jit
def _awq_kernel(x_ptr, qw_ptr, qz_ptr, s_ptr, y_ptr, M, N, K, stride_xm, stride_ym, groups_per_split,
                GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                SPLIT_K: tl.constexpr, UPCAST: tl.constexpr):
    # One program: BLOCK_M rows of x against BLOCK_N columns of W over a range of K groups.
    pid_n, pid_m = tl.program_id(0), tl.program_id(1)
    g_lo = tl.program_id(2) * groups_per_split
    g_hi = tl.minimum(K // GROUP, g_lo + groups_per_split)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_p = pid_n * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8)
    offs_k = tl.arange(0, GROUP)
    NP = N // 8
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g in range(g_lo, g_hi):
        k = g * GROUP + offs_k
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :], mask=offs_m[:, None] < M, other=0.0)
        qw = tl.load(qw_ptr + k[:, None] * NP + offs_p[None, :], mask=offs_p[None, :] < NP, other=0)
        qz = tl.load(qz_ptr + g * NP + offs_p, mask=offs_p < NP, other=0)
        s = tl.load(s_ptr + g * N + offs_n, mask=offs_n < N, other=0.0)
        s = s.to(tl.float32)
        zs = _nibble_to_f32(tl.reshape(_unpack_awq(qz[None, :]), (BLOCK_N,))) * s
        w = _nibble_to_f32(_unpack_awq(qw)) * s[None, :] - zs[None, :]  # (q - z) * s as one FMA
        acc = mma(x, w, acc, UPCAST)
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if SPLIT_K == 1:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(y_ptrs, acc, mask=mask)


@triton.jit
def _awq_gemv_kernel(x_ptr, qw_ptr, qz_ptr, s_ptr, y_ptr, N, NP, K, k_per_split, GROUP: tl.constexpr,
                     BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr, SPLIT_K: tl.constexpr):
    # M == 1. Nibbles stay where they are packed: a [BLOCK_K, 8, BLOCK_P] tile whose middle axis is the
    # nibble slot (column 8p + AWQ_ORDER[slot]) and whose last, fastest axis runs along packed words.
    # Scales wait for the group's rows to be summed: sum_k x_k (q_k - z) s = s (sum_k x_k q_k) - z s
    # (sum_k x_k), so the inner loop is one FMA per weight after unpacking.
    pid_p = tl.program_id(0)
    g_lo = tl.program_id(1) * (k_per_split // GROUP)
    g_hi = tl.minimum(K // GROUP, g_lo + k_per_split // GROUP)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    slot = tl.arange(0, 8)
    cols = offs_p[None, :] * 8 + ((slot % 4) * 2 + slot // 4)[:, None]  # [8, BLOCK_P]: AWQ_ORDER[slot]
    pmask = offs_p < NP
    offs_k = tl.arange(0, BLOCK_K)
    y = tl.zeros((8, BLOCK_P), dtype=tl.float32)
    for g in range(g_lo, g_hi):
        xq = tl.zeros((8, BLOCK_P), dtype=tl.float32)
        xsum = 0.0
        for kk in range(0, GROUP, BLOCK_K):
            k = g * GROUP + kk + offs_k
            x = tl.load(x_ptr + k).to(tl.float32)
            qw = tl.load(qw_ptr + k[:, None] * NP + offs_p[None, :], mask=pmask[None, :], other=0)
            # The K axis lies within each thread in this layout: the sum is register adds, and the
            # small accumulator leaves registers for more programs (and loads) in flight per SM.
            xq += tl.sum(_nibble_to_f32((qw[:, None, :] >> (slot * 4)[None, :, None]) & 0xF) * x[:, None, None], 0)
            xsum += tl.sum(x, 0)
        s = tl.load(s_ptr + g * N + cols, mask=pmask[None, :], other=0.0).to(tl.float32)
        qz = tl.load(qz_ptr + g * NP + offs_p, mask=pmask, other=0)
        z = _nibble_to_f32((qz[None, :] >> (slot * 4)[:, None]) & 0xF)
        y += s * (xq - z * xsum)
    ymask = pmask[None, :] & (slot < 8)[:, None]
    if SPLIT_K == 1:
        tl.store(y_ptr + cols, y.to(y_ptr.dtype.element_ty), mask=ymask)
    else:
        tl.atomic_add(y_ptr + cols, y, mask=ymask)


@triton.jit
def _awq_dequant_kernel(qw_ptr, qz_ptr, s_ptr, w_ptr, N, GROUP: tl.constexpr, BLOCK_N: tl.constexpr):
    # One group of rows by BLOCK_N columns of W [K, N] in the scales' dtype.
    g, pid_n = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_p = pid_n * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8)
    k = g * GROUP + tl.arange(0, GROUP)
    NP = N // 8
    qw = tl.load(qw_ptr + k[:, None] * NP + offs_p[None, :], mask=offs_p[None, :] < NP, other=0)
    qz = tl.load(qz_ptr + g * NP + offs_p, mask=offs_p < NP, other=0)
    s = tl.load(s_ptr + g * N + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
    z = tl.reshape(_unpack_awq(qz[None, :]), (BLOCK_N,))
    w = (_unpack_awq(qw) - z[None, :]).to(tl.float32) * s[None, :]
    tl.store(w_ptr + k[:, None] * N + offs_n[None, :], w.to(w_ptr.dtype.element_ty), mask=(offs_n < N)[None, :])


def awq_dequantize_triton(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """W [K, N] in the scales' dtype, one pass: for prefill, where a dense GEMM after it wins."""
    K, N = qweight.shape[0], scales.shape[1]
    group = K // scales.shape[0]
    w = torch.empty((K, N), dtype=scales.dtype, device=scales.device)
    _awq_dequant_kernel[(K // group, triton.cdiv(N, 64))](qweight, qzeros, scales, w, N, GROUP=group, BLOCK_N=64)
    return w


def awq_config(M: int, N: int, K: int, group: int, block_n: int | None = None) -> AwqConfig:
    """Decode: column blocks split over K groups until about four programs per SM; prefill: tiles.
    Block sizes from the sweeps in BENCHMARKS.md."""
    if M > DECODE_MAX_M:
        return AwqConfig(64 if M <= 64 else 128, 128, 1, 8, 3)
    big = N * K >= 32 * 2**20
    block_n = block_n or (64 if M > 1 else 256 if big else 128)
    split, groups, per_sm = 1, K // group, 4 if M == 1 else 2
    while triton.cdiv(N, block_n) * split < per_sm * num_sms() and 2 * split <= groups // (1 if M == 1 else 2):
        split *= 2
    return AwqConfig(M if M == 1 else 16, block_n, split, 4, 3 if M == 1 else 4, 16 if big else 32)


def linear_awq(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
               out: torch.Tensor | None = None, config: AwqConfig | None = None, gemv: bool = True) -> torch.Tensor:
    """x @ dequant(W) for AutoAWQ int4 (qweight int32 [K, N/8], qzeros int32 [K/G, N/8], scales [K/G, N]).

    Decode streams the packed weight once; from DEQUANT_MIN_M rows up, dequantising once and running
    cuBLAS was faster than the fused Triton tiles (BENCHMARKS.md), which stay reachable with a config."""
    x2 = x.reshape(-1, x.shape[-1])
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    (M, K), N = x2.shape, scales.shape[1]
    group = K // scales.shape[0]
    assert qweight.shape == (K, N // 8) and qzeros.shape == (K // group, N // 8) and N % 8 == 0
    if config is None and M >= DEQUANT_MIN_M:
        y = torch.matmul(x2, awq_dequantize_triton(qweight, qzeros, scales).to(x.dtype), out=out)
        return y.view(*x.shape[:-1], N)
    cfg = config or awq_config(M, N, K, group)
    y = torch.empty((M, N), dtype=x.dtype, device=x.device) if out is None else out.view(M, N)
    groups_per_split = triton.cdiv(K // group, cfg.split_k)
    split = triton.cdiv(K // group, groups_per_split)
    acc = y if split == 1 else torch.zeros((M, N), dtype=torch.float32, device=x.device)
    if M == 1 and gemv:
        _awq_gemv_kernel[(triton.cdiv(N, cfg.block_n), split)](
            x2, qweight, qzeros, scales, acc, N, N // 8, K, groups_per_split * group, GROUP=group, BLOCK_K=cfg.block_k,
            BLOCK_P=cfg.block_n // 8, SPLIT_K=split, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        if split > 1:
            y.copy_(acc)
        return y.view(*x.shape[:-1], N)
    grid = (triton.cdiv(N, cfg.block_n), triton.cdiv(M, cfg.block_m), split)
    _awq_kernel[grid](x2, qweight, qzeros, scales, acc, M, N, K, x2.stride(0), acc.stride(0),
                      groups_per_split, GROUP=group, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                      SPLIT_K=split, UPCAST=interpreting(), num_warps=cfg.num_warps,
                      num_stages=cfg.num_stages)
    if split > 1:
        y.copy_(acc)
    return y.view(*x.shape[:-1], N)


def linear_w8a16(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, out: torch.Tensor | None = None,
                 config: DecodeConfig | PrefillConfig | None = None) -> torch.Tensor:
    """(x @ wq.T) * w_scale for int8 nn.Linear weights [N, K]: gemm.py's kernels, converting w in registers."""
    x2 = x.reshape(-1, x.shape[-1])
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    M, N = x2.shape[0], wq.shape[0]
    if config is None and M >= DEQUANT_MIN_M:
        y = torch.matmul(x2, wq.to(x.dtype).t(), out=out).mul_(w_scale.to(x.dtype))
        return y.view(*x.shape[:-1], N)
    y = torch.empty((M, N), dtype=x.dtype, device=x.device) if out is None else out.view(M, N)
    if M <= DECODE_MAX_M and not isinstance(config, PrefillConfig):
        launch_decode(x2, wq, y, None, w_scale.float().reshape(-1), config)
    else:
        launch_prefill(x2, wq, y, None, w_scale.float().reshape(-1), config)
    return y.view(*x.shape[:-1], N)

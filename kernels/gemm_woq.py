"""Weight-only quantised GEMMs with 16-bit activations: W4A16 in the AutoAWQ layout (group-wise
scales and zero points) or repacked once along K (awq_kpack, for streaming), and W8A16 with
per-channel scales. At decode they stream a quarter or half of the bf16 weight bytes."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .gemm import (
    DECODE_MAX_M,
    DecodeConfig,
    PrefillConfig,
    launch_decode,
    launch_prefill,
)
from .hardware import interpreting, mma, num_sms, pdl, pdl_wait, prefetch_l2
from .split_k import fill_split, split_buffers, sum_splits_last

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


# ------------------------------------------------------------------ W4A16, K-packed
# AutoAWQ's qweight packs 8 *columns* per word, so a decode kernel reads 128-byte slivers of each K row
# with 32-bit loads. Repacked once at load, each output channel's nibbles lie along K, 8 per word in
# natural order: a program streams contiguous words of BLOCK_N weight rows with 128-bit loads.


@dataclass(frozen=True, eq=False)
class AwqKPacked:
    """AutoAWQ int4 weights repacked for streaming along K: word j of row n holds q[8j + i, n] in nibble i."""
    qweight: torch.Tensor  # int32 [N, K/8]
    zeros: torch.Tensor  # uint8 [K/G, N], unpacked
    scales: torch.Tensor  # [K/G, N] f16/bf16, as AutoAWQ stores them
    group: int

    @property
    def shape(self) -> tuple[int, int]:
        """(N, K), as nn.Linear's weight."""
        return self.qweight.shape[0], self.qweight.shape[1] * 8


def awq_kpack(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor) -> AwqKPacked:
    """The K-packed copy of AutoAWQ (qweight int32 [K, N/8], qzeros int32 [K/G, N/8], scales [K/G, N]),
    built on their device: an 8x8 nibble transpose per word block, with temporaries the size of qweight."""
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32 or qweight.dim() != 2 or qzeros.dim() != 2:
        raise ValueError(f"awq_kpack: qweight and qzeros must be int32 [K, N/8] and [K/G, N/8], got "
                         f"{qweight.dtype}{list(qweight.shape)} and {qzeros.dtype}{list(qzeros.shape)}")
    if scales.dim() != 2:
        raise ValueError(f"awq_kpack: scales must be [K/G, N], got {list(scales.shape)}")
    (K, NP), (G, N) = qweight.shape, scales.shape
    if not scales.is_floating_point() or N != NP * 8 or K % 8 or G == 0 or K % G or qzeros.shape != (G, NP):
        raise ValueError(f"awq_kpack: expected scales float [K/G, N] with N = 8 * {NP} and G dividing K = {K} "
                         f"(a multiple of 8), qzeros [K/G, N/8]; got scales {scales.dtype}{list(scales.shape)}, "
                         f"qzeros {list(qzeros.shape)}")
    if (K // G) % 8:
        raise ValueError(f"awq_kpack: group size {K // G} must be a multiple of 8 (one K-packed word)")
    words = qweight.contiguous().view(K // 8, 8, NP)  # [j, i, c]: nibble p of words[j, i, c] is q[8j+i, 8c+ORDER[p]]
    packed = torch.empty((NP, 8, K // 8), dtype=torch.int32, device=qweight.device)  # [c, column in c, j]
    for p, col in enumerate(AWQ_ORDER):
        nibbles = (words >> (4 * p)) & 0xF
        word = nibbles[:, 0]
        for i in range(1, 8):
            word = word | (nibbles[:, i] << (4 * i))
        packed[:, col] = word.t()
    return AwqKPacked(packed.view(N, K // 8), awq_unpack(qzeros).to(torch.uint8), scales.contiguous(), K // G)


def awq_kunpack(qweight: torch.Tensor) -> torch.Tensor:
    """int32 [N, K/8] K-packed -> int32 [N, K] values in [0, 15]: the oracle of the kernels' unpacking."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=qweight.device)
    return ((qweight[:, :, None] >> shifts) & 0xF).reshape(qweight.shape[0], -1)


def awq_kpacked_dequantize(w: AwqKPacked) -> torch.Tensor:
    """nn.Linear's weight [N, K] in f32: (q - zero) * scale per group of K columns."""
    z = w.zeros.t().int().repeat_interleave(w.group, 1)
    return (awq_kunpack(w.qweight) - z).float() * w.scales.t().float().repeat_interleave(w.group, 1)


@dataclass(frozen=True)
class AwqGemvConfig:
    """M == 1 on CUDA cores: block_n weight rows per program (a power of two), one group's words of each
    ([block_n, group / 8]) per step, num_stages - 1 groups' loads in flight ahead of the arithmetic (1: none)."""
    block_n: int = 256
    num_warps: int = 4
    num_stages: int = 3
    split_k: int | None = None  # None: split K until about programs_per_sm programs per SM
    programs_per_sm: int = 3
    prefetch_bytes: int = 256  # of each row's split, into L2 before the kernel waits on the one before it (PDL)


@dataclass(frozen=True)
class AwqMmaConfig:
    """2 <= M < DEQUANT_MIN_M on tensor cores, swap-AB: the weight tile [block_n, 8 * block_kw] is the MMA's A."""
    block_n: int = 64
    block_kw: int = 16  # 8 * block_kw must divide the group
    block_m: int = 16
    num_warps: int = 4
    num_stages: int = 3
    split_k: int | None = None
    programs_per_sm: int = 2


@dataclass(frozen=True)
class AwqDequantConfig:
    """Dequantise to an nn.Linear bf16/f16 weight [N, K] (block_n rows per program), then torch.matmul."""
    block_n: int = 32


AwqKPackedConfig = AwqGemvConfig | AwqMmaConfig | AwqDequantConfig


# The exponent fields of 1.0 and 16.0, passed to the GEMV as run-time arguments: as constants, ptxas
# re-materialises them (a MOV per LOP3 or two, sm_90 SASS) since each LOP3 takes one immediate.
F32_ONE, F32_SIXTEEN = 0x3F800000, 0x41800000


@triton.jit
def _mantissa_pair(w, P: tl.constexpr, ONE, SIXTEEN):
    # Nibbles 2P + 1 and 2P of w as exact floats from one shift, without an int -> float conversion: the
    # odd one at mantissa bits 19..22 under the exponent of 1 (1 + q/16), the even one at bits 15..18
    # under the exponent of 16 (16 + q/16). Then an and-or (one LOP3) per weight.
    if P < 2:
        b = w << (15 - 8 * P)
    else:
        b = w >> (8 * P - 15)
    odd = ((b & 0x780000) | ONE).to(tl.float32, bitcast=True)
    even = ((b & 0x78000) | SIXTEEN).to(tl.float32, bitcast=True)
    return odd, even


@triton.jit
def _unpack_x_pair(xp, X_BF16: tl.constexpr):
    # Two 16-bit x values loaded as one int32 -> (x[2i], x[2i + 1]) in f32.
    if X_BF16:
        return (xp << 16).to(tl.float32, bitcast=True), (xp & -65536).to(tl.float32, bitcast=True)
    return (xp.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32),
            (xp >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32))


@triton.jit
def _gemv_load_w(qw_ptr, s_ptr, z_ptr, rows, offs_w, N, g, KW: tl.constexpr, GROUP_KW: tl.constexpr):
    # Group g's [BLOCK_N, GROUP_KW] weight words (read once: evicted first) and the rows' scales and zeros.
    w = tl.load(qw_ptr + rows[:, None] * KW + (g * GROUP_KW + offs_w)[None, :], eviction_policy="evict_first")
    return w, tl.load(s_ptr + g * N + rows), tl.load(z_ptr + g * N + rows)


@triton.jit
def _gemv_load_x(x_ptr, offs_w, g, GROUP_KW: tl.constexpr):
    # x over group g as four int32 vectors along its words: pair p of each word's 8 values.
    kw = g * GROUP_KW + offs_w
    x_ptrs = x_ptr + kw * 4
    return tl.load(x_ptrs), tl.load(x_ptrs + 1), tl.load(x_ptrs + 2), tl.load(x_ptrs + 3)


@triton.jit
def _gemv_fma(acc, w, x_odd, x_even, P: tl.constexpr, ONE, SIXTEEN):
    odd, even = _mantissa_pair(w, P, ONE, SIXTEEN)
    return acc + odd * x_odd[None, :] + even * x_even[None, :]


@triton.jit
def _gemv_group(w, x0, x1, x2, x3, s, z, ONE, SIXTEEN, X_BF16: tl.constexpr):
    # sum_k x_k (q_k - z) s over one group, per row. acc collects x_k f_k over the [BLOCK_N, GROUP_KW] words with
    # f_k = 1 + q_k/16 (odd k) or 16 + q_k/16 (even k), starting from minus those offsets' share (the first FMA
    # takes it as its addend), so its row sums are sum_k x_k q_k / 16: half a shift, one LOP3 and one FMA
    # per weight. (The row sums move to the scales' layout through shared memory once per group, and Triton
    # loads a second copy of x for the sum of x: sm_90 TTGIR; neither is in the inner loop.)
    e0, o0 = _unpack_x_pair(x0, X_BF16)
    e1, o1 = _unpack_x_pair(x1, X_BF16)
    e2, o2 = _unpack_x_pair(x2, X_BF16)
    e3, o3 = _unpack_x_pair(x3, X_BF16)
    x_odd = (o0 + o1) + (o2 + o3)
    x_even = (e0 + e1) + (e2 + e3)
    acc = tl.zeros(w.shape, dtype=tl.float32) - (x_odd + 16.0 * x_even)[None, :]
    acc = _gemv_fma(acc, w, o0, e0, 0, ONE, SIXTEEN)
    acc = _gemv_fma(acc, w, o1, e1, 1, ONE, SIXTEEN)
    acc = _gemv_fma(acc, w, o2, e2, 2, ONE, SIXTEEN)
    acc = _gemv_fma(acc, w, o3, e3, 3, ONE, SIXTEEN)
    return s.to(tl.float32) * (16.0 * tl.sum(acc, 1) - z.to(tl.float32) * tl.sum(x_odd + x_even, 0))


@triton.jit
def _kpacked_gemv_kernel(x_ptr, qw_ptr, z_ptr, s_ptr, y_ptr, part_ptr, ticket_ptr, N, G, groups_per_split, ONE,
                         SIXTEEN, KW: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_KW: tl.constexpr,
                         STAGES: tl.constexpr, SPLITS: tl.constexpr, EVEN_N: tl.constexpr, X_BF16: tl.constexpr,
                         PDL: tl.constexpr = False, PREFETCH: tl.constexpr = 0):
    # M == 1, x read as int32 pairs; one program: BLOCK_N weight rows over the groups [g_lo, g_hi). KW is a
    # compile-time constant so that the rows' loads share one address register (immediate offsets, sm_90 SASS).
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    g_lo = pid_k * groups_per_split
    g_hi = tl.minimum(G, g_lo + groups_per_split)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if EVEN_N:
        rows = offs_n
    else:
        rows = offs_n % N  # wrapped: loads stay unmasked along N; the store mask drops the copies
    offs_w = tl.arange(0, GROUP_KW)
    if PDL and PREFETCH > 0:  # the rows' first PREFETCH lines (32 words) of the split while the last kernel drains
        words = tl.minimum(g_lo * GROUP_KW + tl.arange(0, PREFETCH) * 32, g_hi * GROUP_KW - 1)
        prefetch_l2(qw_ptr + rows[:, None] * KW + words[None, :])
    pdl_wait(PDL)
    y = tl.zeros((BLOCK_N,), dtype=tl.float32)
    # num_stages on the loop itself: Triton then streams the groups' loads through shared memory (cp.async),
    # STAGES - 1 groups ahead, although they feed no dot (the kernel-wide num_stages leaves them: sm_90 TTGIR).
    for g in tl.range(g_lo, g_hi, num_stages=STAGES):
        w, s, z = _gemv_load_w(qw_ptr, s_ptr, z_ptr, rows, offs_w, N, g, KW, GROUP_KW)
        x0, x1, x2, x3 = _gemv_load_x(x_ptr, offs_w, g, GROUP_KW)
        y += _gemv_group(w, x0, x1, x2, x3, s, z, ONE, SIXTEEN, X_BF16)
    nmask = offs_n < N
    if SPLITS == 1:
        tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=nmask)
    else:
        sum_splits_last(y, part_ptr, offs_n, nmask, N, y_ptr + offs_n, ticket_ptr + pid_n, SPLITS)


# 16-bit float pairs 1 + q/16 for the tensor-core kernel, by x's dtype: (mask, exponent bits of 1.0) in
# both halves of a word, and the left shift that moves nibble 0 to the top of the low half's mantissa.
HALF_PAIRS = {torch.bfloat16: (0x00780078, 0x3F803F80, 3), torch.float16: (0x03C003C0, 0x3C003C00, 6)}


@triton.jit
def _unpack_half_pairs(w, MASK, ONE, SHIFT: tl.constexpr, DTYPE: tl.constexpr):
    # [R, C] words -> [R, 8C] 16-bit floats 1 + q/16 (exact), column 8j + 2i + h holding nibble i + 4h of
    # word j: nibbles i and i + 4 lie 16 bits apart, so one LOP3 makes both halves of a register.
    t = tl.interleave(w << SHIFT, w >> (8 - SHIFT))
    t = tl.interleave(t, t >> 4)
    t = (t & MASK) | ONE
    lo = t.to(tl.int16).to(DTYPE, bitcast=True)
    hi = (t >> 16).to(tl.int16).to(DTYPE, bitcast=True)
    return tl.interleave(lo, hi)


@triton.jit
def _kpacked_mma_kernel(x_ptr, qw_ptr, z_ptr, s_ptr, y_ptr, part_ptr, ticket_ptr, M, N, KW, G, stride_xm,
                        groups_per_split, MASK, ONE, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_KW: tl.constexpr, GROUP_TILES: tl.constexpr, SHIFT: tl.constexpr, SPLITS: tl.constexpr,
                        UPCAST: tl.constexpr, PDL: tl.constexpr = False):
    # Swap-AB: the tile of 1 + q/16 [BLOCK_N, 8 BLOCK_KW] is the MMA's A, x^T (rows in the tile's k order)
    # its B. Scales and zeros wait for the group's sums, as in the GEMV: per group acc = sum_k (1 + q_k/16) x_k
    # and X = sum_k x_k (a second MMA with A = 1, which keeps the sum off the CUDA cores), so the group adds
    # s (16 (acc - X) - z X).
    pid_n, pid_k, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    g_lo = pid_k * groups_per_split
    g_hi = tl.minimum(G, g_lo + groups_per_split)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_n % N
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_w = tl.arange(0, BLOCK_KW)
    offs_k = tl.arange(0, 8 * BLOCK_KW)
    pdl_wait(PDL)
    y = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for g in range(g_lo, g_hi):
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        X = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for t in range(GROUP_TILES):
            tile = g * GROUP_TILES + t
            w = tl.load(qw_ptr + rows[:, None] * KW + (tile * BLOCK_KW + offs_w)[None, :])
            xt = tl.load(x_ptr + offs_m[None, :] * stride_xm + (tile * 8 * BLOCK_KW + offs_k)[:, None],
                         mask=offs_m[None, :] < M, other=0.0)
            # rows k = 8j + 4h + i -> 8j + 2i + h, the A tile's column order
            xt = tl.reshape(tl.permute(tl.reshape(xt, (BLOCK_KW, 2, 4, BLOCK_M)), (0, 2, 1, 3)),
                            (8 * BLOCK_KW, BLOCK_M))
            acc = mma(_unpack_half_pairs(w, MASK, ONE, SHIFT, x_ptr.dtype.element_ty), xt, acc, UPCAST)
            X = mma(tl.full((BLOCK_N, 8 * BLOCK_KW), 1.0, x_ptr.dtype.element_ty), xt, X, UPCAST)
        s = tl.load(s_ptr + g * N + rows).to(tl.float32)
        z = tl.load(z_ptr + g * N + rows).to(tl.float32)
        y += s[:, None] * (16.0 * (acc - X) - z[:, None] * X)
    offs = offs_m[None, :] * N + offs_n[:, None]
    mask = (offs_m[None, :] < M) & (offs_n[:, None] < N)
    if SPLITS == 1:
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        sum_splits_last(y, part_ptr, offs, mask, M * N, y_ptr + offs, ticket_ptr + pid_m * tl.num_programs(0) + pid_n,
                        SPLITS)


@triton.jit
def _kpacked_dequant_kernel(qw_ptr, z_ptr, s_ptr, w_ptr, N, K, KW, GROUP: tl.constexpr, BLOCK_N: tl.constexpr):
    # One group of K columns by BLOCK_N rows of nn.Linear's W [N, K]: (q - z) * s, rounded once.
    g, pid_n = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    kw = g * (GROUP // 8) + tl.arange(0, GROUP // 8)
    w = tl.load(qw_ptr + offs_n[:, None] * KW + kw[None, :], mask=nmask[:, None], other=0)
    q = tl.reshape((w[:, :, None] >> (4 * tl.arange(0, 8))[None, None, :]) & 0xF, (BLOCK_N, GROUP))
    z = tl.load(z_ptr + g * N + offs_n, mask=nmask, other=0).to(tl.int32)
    s = tl.load(s_ptr + g * N + offs_n, mask=nmask, other=0.0).to(tl.float32)
    out = (q - z[:, None]).to(tl.float32) * s[:, None]
    k = g * GROUP + tl.arange(0, GROUP)
    tl.store(w_ptr + offs_n[:, None] * K + k[None, :], out.to(w_ptr.dtype.element_ty), mask=nmask[:, None])


def awq_kpacked_dequantize_triton(w: AwqKPacked, dtype: torch.dtype | None = None,
                                  config: AwqDequantConfig = AwqDequantConfig()) -> torch.Tensor:
    """nn.Linear's weight [N, K] in dtype (default: the scales'), one pass: for prefill, where cuBLAS after it wins."""
    (N, K), group = w.shape, w.group
    out = torch.empty((N, K), dtype=dtype or w.scales.dtype, device=w.qweight.device)
    _kpacked_dequant_kernel[(K // group, triton.cdiv(N, config.block_n))](
        w.qweight, w.zeros, w.scales, out, N, K, K // 8, GROUP=group, BLOCK_N=config.block_n)
    return out


def awq_kpacked_config(M: int, N: int, K: int, group: int) -> AwqKPackedConfig:
    """The path and tiles for a shape: CUDA-core GEMV at M == 1, swap-AB tensor cores below DEQUANT_MIN_M,
    dequantise + cuBLAS above."""
    if M == 1 and group // 8 & (group // 8 - 1) == 0:  # the GEMV's tile is a group's words: a power of two
        # 256 rows per program halve x's share of the work per weight (3.7 against 4.4 instructions, sm_90 SASS)
        # where the programs still get a few groups each to stream (8B gate/up and down); 128 rows elsewhere.
        wide = triton.cdiv(N, 256) * (K // group) >= 4 * AwqGemvConfig.programs_per_sm * num_sms()
        return AwqGemvConfig(256 if wide else 128)
    if M < DEQUANT_MIN_M:
        return AwqMmaConfig(block_kw=min(16, group // 8), block_m=16 if M <= 16 else 32 if M <= 32 else 64)
    return AwqDequantConfig()


def _launch_gemv(x: torch.Tensor, w: AwqKPacked, y: torch.Tensor, cfg: AwqGemvConfig) -> None:
    (N, K), gkw = w.shape, w.group // 8
    if x.shape[0] != 1 or x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"AwqGemvConfig runs one row of f16/bf16 x, got {x.dtype} x with {x.shape[0]} rows: "
                         f"use AwqMmaConfig")
    if gkw & (gkw - 1) or cfg.block_n & (cfg.block_n - 1):
        raise ValueError(f"AwqGemvConfig: block_n={cfg.block_n} and the group's words ({w.group} / 8) must be powers "
                         f"of two: pick another block_n, or use AwqMmaConfig for this group size")
    groups, programs = K // w.group, triton.cdiv(N, cfg.block_n)
    per_split = triton.cdiv(groups, cfg.split_k or fill_split(programs, groups, cfg.programs_per_sm))
    split = triton.cdiv(groups, per_split)
    partials, tickets = split_buffers(x, split, N, programs) if split > 1 else (y, y)
    x = x if x.data_ptr() % 4 == 0 else x.clone()  # read as int32 pairs
    _kpacked_gemv_kernel[(programs, split)](
        x.view(torch.int32), w.qweight, w.zeros, w.scales, y, partials, tickets, N, groups, per_split, F32_ONE,
        F32_SIXTEEN, KW=K // 8, BLOCK_N=cfg.block_n, GROUP_KW=gkw, STAGES=cfg.num_stages, SPLITS=split,
        EVEN_N=N % cfg.block_n == 0, X_BF16=x.dtype == torch.bfloat16, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, PREFETCH=cfg.prefetch_bytes // 128, **pdl(x.device, 1))


def _launch_mma(x: torch.Tensor, w: AwqKPacked, y: torch.Tensor, cfg: AwqMmaConfig) -> None:
    (M, K), N = x.shape, w.shape[0]
    if x.dtype not in HALF_PAIRS:
        raise ValueError(f"AwqMmaConfig runs f16/bf16 x, got {x.dtype}: cast x or use AwqDequantConfig")
    block_k = 8 * cfg.block_kw
    if w.group % block_k or block_k & (block_k - 1) or block_k < 16:
        raise ValueError(f"AwqMmaConfig.block_kw={cfg.block_kw}: 8 * block_kw must be a power of two >= 16 "
                         f"dividing the group ({w.group})")
    groups = K // w.group
    programs = triton.cdiv(N, cfg.block_n) * triton.cdiv(M, cfg.block_m)
    per_split = triton.cdiv(groups, cfg.split_k or fill_split(programs, groups, cfg.programs_per_sm))
    split = triton.cdiv(groups, per_split)
    partials, tickets = split_buffers(x, split, M * N, programs) if split > 1 else (y, y)
    grid = (triton.cdiv(N, cfg.block_n), split, triton.cdiv(M, cfg.block_m))
    mask, one, shift = HALF_PAIRS[x.dtype]
    _kpacked_mma_kernel[grid](x, w.qweight, w.zeros, w.scales, y, partials, tickets, M, N, K // 8, groups,
                              x.stride(0), per_split, mask, one, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                              BLOCK_KW=cfg.block_kw, GROUP_TILES=w.group // block_k, SHIFT=shift, SPLITS=split,
                              UPCAST=interpreting(), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                              **pdl(x.device, M))


def _launch_dequant(x: torch.Tensor, w: AwqKPacked, y: torch.Tensor, cfg: AwqDequantConfig) -> None:
    torch.matmul(x, awq_kpacked_dequantize_triton(w, x.dtype, cfg).t(), out=y)


_KPACKED_LAUNCH = {AwqGemvConfig: _launch_gemv, AwqMmaConfig: _launch_mma, AwqDequantConfig: _launch_dequant}


def linear_awq_kpacked(x: torch.Tensor, w: AwqKPacked, out: torch.Tensor | None = None,
                       config: AwqKPackedConfig | None = None) -> torch.Tensor:
    """x @ W.T for K-packed AutoAWQ int4 weights (awq_kpack): the decode paths stream each weight word once."""
    x2 = x.reshape(-1, x.shape[-1])
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    (M, K), (N, KP) = x2.shape, w.shape
    if K != KP:
        raise ValueError(f"linear_awq_kpacked: x has K={K} columns, the weight K={KP}")
    cfg = config or awq_kpacked_config(M, N, K, w.group)
    y = torch.empty((M, N), dtype=x.dtype, device=x.device) if out is None else out.view(M, N)
    if M:
        _KPACKED_LAUNCH[type(cfg)](x2, w, y, cfg)
    return y.view(*x.shape[:-1], N)

"""Attention over the paged KV pool: prefill over packed variable-length sequences (causal, GQA,
earlier context read through the block table) and decode with GQA that splits long contexts across
programs. K/V may be stored in fp8 with per-tensor scales.

Pool layout: k_pool, v_pool [num_blocks, block_size, num_kv_heads, head_dim]; block_tables int32
[num_seqs, max_blocks]; seq_lens int32 [num_seqs] (whole context, new tokens included); packed
queries q [T, num_heads, head_dim] with cu_seqlens_q int32 [num_seqs + 1]."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .hardware import interpreting, mma, num_sms, pdl, pdl_wait

LOG2E = 1.4426950408889634


def gather_kv(pool: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` tokens of one sequence from the pool: [length, num_kv_heads, head_dim]."""
    t = torch.arange(length, device=pool.device)
    return pool[block_table[t // pool.shape[1]].long(), t % pool.shape[1]]


def paged_attention_reference(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                              block_tables: torch.Tensor, seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor,
                              sm_scale: float | None = None, k_scale: float = 1.0,
                              v_scale: float = 1.0) -> torch.Tensor:
    """The oracle for both kernels: each sequence's new queries attend causally to its whole context, in f32."""
    sm_scale = sm_scale or 1.0 / math.sqrt(q.shape[-1])
    out = torch.empty_like(q)
    for s in range(len(seq_lens)):
        lo, hi, ctx = int(cu_seqlens_q[s]), int(cu_seqlens_q[s + 1]), int(seq_lens[s])
        k = gather_kv(k_pool, block_tables[s], ctx).float() * k_scale
        v = gather_kv(v_pool, block_tables[s], ctx).float() * v_scale
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        scores = torch.einsum("qhd,khd->hqk", q[lo:hi].float(), k) * sm_scale
        pos = ctx - (hi - lo) + torch.arange(hi - lo, device=q.device)
        scores.masked_fill_(torch.arange(ctx, device=q.device)[None, :] > pos[:, None], float("-inf"))
        out[lo:hi] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).to(q.dtype)
    return out


@dataclass(frozen=True)
class DecodeAttnConfig:
    block_n: int = 64
    partition: int = 0  # tokens per program along the context; 0: chosen to fill the SMs
    num_warps: int = 4
    num_stages: int = 2


@dataclass(frozen=True)
class PrefillAttnConfig:
    block_m: int = 128
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 3


def _exact_dot(q: torch.Tensor) -> bool:
    """f32 attention keeps f32 products (no TF32), so that an f32 model matches its reference."""
    return interpreting() or q.dtype == torch.float32


@triton.jit
def _kv_offsets(bt_row_ptr, t, tmask, kv_head, stride_kb, stride_kt, stride_kh, BLOCK_SIZE: tl.constexpr):
    # Token t of a sequence lives at (block_table[t // BLOCK_SIZE], t % BLOCK_SIZE) in the pool.
    page = tl.load(bt_row_ptr + t // BLOCK_SIZE, mask=tmask, other=0).to(tl.int64)
    return page * stride_kb + (t % BLOCK_SIZE) * stride_kt + kv_head * stride_kh


@triton.jit
def _paged_decode_kernel(q_ptr, k_ptr, v_ptr, bt_ptr, lens_ptr, o_ptr, po_ptr, pml_ptr, qk_scale, v_scale,
                         stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_bt, stride_ot, stride_oh,
                         partition, max_splits, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
                         HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                         SPLIT: tl.constexpr, UPCAST: tl.constexpr, PDL: tl.constexpr = False):
    # One program: one sequence, one KV head with its GROUP query heads, one partition of the context.
    seq, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    pdl_wait(PDL)
    ctx = tl.load(lens_ptr + seq)
    start = split * partition
    if start < ctx:
        end = tl.minimum(ctx, start + partition)
        heads = kv_head * GROUP + tl.arange(0, GROUP_PAD)
        hmask = tl.arange(0, GROUP_PAD) < GROUP
        d = tl.arange(0, HEAD_DIM)
        q = tl.load(q_ptr + seq * stride_qt + heads[:, None] * stride_qh + d[None, :], mask=hmask[:, None],
                    other=0.0)
        if k_ptr.dtype.element_ty.is_fp8():
            q = q.to(tl.float16)  # e4m3 -> f16 is one instruction on Hopper; -> bf16 is not
        m = tl.full((GROUP_PAD,), float("-inf"), tl.float32)
        l = tl.zeros((GROUP_PAD,), tl.float32)
        acc = tl.zeros((GROUP_PAD, HEAD_DIM), tl.float32)
        for t0 in range(start, end, BLOCK_N):
            t = t0 + tl.arange(0, BLOCK_N)
            tmask = t < end
            off = _kv_offsets(bt_ptr + seq * stride_bt, t, tmask, kv_head, stride_kb, stride_kt, stride_kh,
                              BLOCK_SIZE)
            k = tl.load(k_ptr + off[None, :] + d[:, None], mask=tmask[None, :], other=0.0)
            s = mma(q, k, tl.zeros((GROUP_PAD, BLOCK_N), tl.float32), UPCAST) * qk_scale
            s = tl.where(tmask[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            p = tl.math.exp2(s - m_new[:, None])
            alpha = tl.math.exp2(m - m_new)
            l = l * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + off[:, None] + d[None, :], mask=tmask[:, None], other=0.0)
            acc = mma(p.to(q.dtype), v, acc * alpha[:, None], UPCAST)
            m = m_new
        if SPLIT:
            # Unnormalised partial output and its (max, sum) for _paged_decode_reduce_kernel.
            row = (seq * GROUP * tl.num_programs(1) + heads) * max_splits + split
            tl.store(po_ptr + row[:, None] * HEAD_DIM + d[None, :], acc, mask=hmask[:, None])
            tl.store(pml_ptr + row * 2, m, mask=hmask)
            tl.store(pml_ptr + row * 2 + 1, l, mask=hmask)
        else:
            o = acc * (v_scale / l)[:, None]
            tl.store(o_ptr + seq * stride_ot + heads[:, None] * stride_oh + d[None, :],
                     o.to(o_ptr.dtype.element_ty), mask=hmask[:, None])


@triton.jit
def _paged_decode_reduce_kernel(po_ptr, pml_ptr, lens_ptr, o_ptr, v_scale, stride_ot, stride_oh, partition,
                                max_splits, HEAD_DIM: tl.constexpr, SPLITS_PAD: tl.constexpr,
                                PDL: tl.constexpr = False):
    # Merge the partitions of one (sequence, query head) with the log-sum-exp rule.
    seq, head = tl.program_id(0), tl.program_id(1)
    pdl_wait(PDL)
    n = tl.cdiv(tl.load(lens_ptr + seq), partition)
    sp = tl.arange(0, SPLITS_PAD)
    row = (seq * tl.num_programs(1) + head) * max_splits + sp
    m = tl.load(pml_ptr + row * 2, mask=sp < n, other=float("-inf"))
    l = tl.load(pml_ptr + row * 2 + 1, mask=sp < n, other=0.0)
    w = tl.math.exp2(m - tl.max(m, 0))
    w = tl.where(sp < n, w, 0.0)
    d = tl.arange(0, HEAD_DIM)
    po = tl.load(po_ptr + row[:, None] * HEAD_DIM + d[None, :], mask=(sp < n)[:, None], other=0.0)
    o = tl.sum(po * w[:, None], 0) * (v_scale / tl.sum(l * w, 0))
    tl.store(o_ptr + seq * stride_ot + head * stride_oh + d, o.to(o_ptr.dtype.element_ty))


def decode_attention_config(kv_bytes: int) -> DecodeAttnConfig:
    """fp8 K/V: two warps a program, three stages (H100, `benchmarks/decode_attention_sweep.py --kv fp8`: 1.07x
    the 128/4/2 it had at 64 sequences of 2048, 1.21x at 512 of 128-256)."""
    return DecodeAttnConfig(block_n=64, num_warps=2, num_stages=3) if kv_bytes == 1 else DecodeAttnConfig()


def decode_partition(num_seqs: int, num_kv_heads: int, max_len: int, block_n: int) -> int:
    """Context tokens per program: split only until about two programs per SM exist."""
    programs = num_seqs * num_kv_heads
    splits = max(1, min(triton.cdiv(2 * num_sms(), programs), triton.cdiv(max_len, 4 * block_n)))
    return triton.cdiv(triton.cdiv(max_len, splits), block_n) * block_n


def paged_decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, max_seq_len: int | None = None,
                           sm_scale: float | None = None, k_scale: float = 1.0, v_scale: float = 1.0,
                           out: torch.Tensor | None = None, config: DecodeAttnConfig | None = None) -> torch.Tensor:
    """One new query per sequence (q [num_seqs, num_heads, head_dim]) against its paged context.

    Each program reads one KV head once for all its query heads; long contexts split across programs
    so that small batches still fill the GPU. Every seq_len must be >= 1 (pad a batch with a length-1
    sequence on a scratch block). Pass max_seq_len to avoid a device sync."""
    cfg = config or decode_attention_config(k_pool.element_size())
    B, H, D = q.shape
    Hkv, BS = k_pool.shape[2], k_pool.shape[1]
    assert k_pool.stride() == v_pool.stride() and k_pool.stride(-1) == 1 and q.stride(-1) == 1
    max_len = int(seq_lens.max()) if max_seq_len is None else max_seq_len
    partition = cfg.partition or decode_partition(B, Hkv, max_len, cfg.block_n)
    splits = triton.cdiv(max_len, partition)
    out = torch.empty_like(q) if out is None else out
    scale = (sm_scale or 1.0 / math.sqrt(D)) * k_scale * LOG2E
    po = pml = out
    if splits > 1:
        po = torch.empty((B, H, splits, D), dtype=torch.float32, device=q.device)
        pml = torch.empty((B, H, splits, 2), dtype=torch.float32, device=q.device)
    _paged_decode_kernel[(B, Hkv, splits)](
        q, k_pool, v_pool, block_tables, seq_lens, out, po, pml, scale, v_scale, q.stride(0), q.stride(1),
        k_pool.stride(0), k_pool.stride(1), k_pool.stride(2), block_tables.stride(0), out.stride(0),
        out.stride(1), partition, splits, GROUP=H // Hkv, GROUP_PAD=max(16, triton.next_power_of_2(H // Hkv)),
        HEAD_DIM=D, BLOCK_SIZE=BS, BLOCK_N=cfg.block_n, SPLIT=splits > 1, UPCAST=_exact_dot(q),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl(q.device, B))
    if splits > 1:
        _paged_decode_reduce_kernel[(B, H)](po, pml, seq_lens, out, v_scale, out.stride(0), out.stride(1),
                                            partition, splits, HEAD_DIM=D, SPLITS_PAD=triton.next_power_of_2(splits),
                                            **pdl(q.device, B))
    return out


@triton.jit
def _prefill_block(q, m, l, acc, k_ptr, v_ptr, bt_row, t0, hi, pos, kv_head, qk_scale, stride_kb, stride_kt,
                   stride_kh, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                   CAUSAL: tl.constexpr, UPCAST: tl.constexpr):
    # One online-softmax step over keys [t0, t0 + BLOCK_N); CAUSAL masks the diagonal and the end.
    t = t0 + tl.arange(0, BLOCK_N)
    d = tl.arange(0, HEAD_DIM)
    off = _kv_offsets(bt_row, t, t < hi, kv_head, stride_kb, stride_kt, stride_kh, BLOCK_SIZE)
    if CAUSAL:
        k = tl.load(k_ptr + off[None, :] + d[:, None], mask=(t < hi)[None, :], other=0.0)
        v = tl.load(v_ptr + off[:, None] + d[None, :], mask=(t < hi)[:, None], other=0.0)
    else:
        k = tl.load(k_ptr + off[None, :] + d[:, None])
        v = tl.load(v_ptr + off[:, None] + d[None, :])
    s = mma(q, k, tl.zeros((q.shape[0], BLOCK_N), tl.float32), UPCAST)
    if CAUSAL:
        s = tl.where((t[None, :] <= pos[:, None]) & (t < hi)[None, :], s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1) * qk_scale)
    p = tl.math.exp2(s * qk_scale - m_new[:, None])  # one FMA a score
    alpha = tl.math.exp2(m - m_new)
    l = l * alpha + tl.sum(p, 1)
    acc = mma(p.to(q.dtype), v, acc * alpha[:, None], UPCAST)
    return m_new, l, acc


@triton.jit
def _prefill_kernel(q_ptr, k_ptr, v_ptr, bt_ptr, lens_ptr, cu_ptr, o_ptr, qk_scale, v_scale,
                    stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_bt, stride_ot, stride_oh,
                    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr):
    # One program: BLOCK_M new queries of one sequence and one head. Query blocks run last-first,
    # since the late ones see the most keys.
    head, seq = tl.program_id(0), tl.program_id(2)
    mblk = tl.num_programs(1) - 1 - tl.program_id(1)
    q_lo = tl.load(cu_ptr + seq)
    q_len = tl.load(cu_ptr + seq + 1) - q_lo
    if mblk * BLOCK_M < q_len:
        ctx = tl.load(lens_ptr + seq)
        prefix = ctx - q_len  # tokens already in the pool before this chunk
        kv_head = head // GROUP
        i = mblk * BLOCK_M + tl.arange(0, BLOCK_M)
        pos = prefix + i
        d = tl.arange(0, HEAD_DIM)
        q = tl.load(q_ptr + (q_lo + i)[:, None] * stride_qt + head * stride_qh + d[None, :],
                    mask=(i < q_len)[:, None], other=0.0)
        if k_ptr.dtype.element_ty.is_fp8():
            q = q.to(tl.float16)
        m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
        bt_row = bt_ptr + seq * stride_bt
        # Keys before every row's position need no mask; the rest are the causal diagonal.
        unmasked = (prefix + mblk * BLOCK_M) // BLOCK_N * BLOCK_N
        hi = tl.minimum(ctx, prefix + (mblk + 1) * BLOCK_M)
        for t0 in range(0, unmasked, BLOCK_N):
            m, l, acc = _prefill_block(q, m, l, acc, k_ptr, v_ptr, bt_row, t0, hi, pos, kv_head, qk_scale,
                                       stride_kb, stride_kt, stride_kh, HEAD_DIM, BLOCK_SIZE, BLOCK_N, False, UPCAST)
        for t0 in range(unmasked, hi, BLOCK_N):
            m, l, acc = _prefill_block(q, m, l, acc, k_ptr, v_ptr, bt_row, t0, hi, pos, kv_head, qk_scale,
                                       stride_kb, stride_kt, stride_kh, HEAD_DIM, BLOCK_SIZE, BLOCK_N, True, UPCAST)
        o = acc * (v_scale / l)[:, None]
        tl.store(o_ptr + (q_lo + i)[:, None] * stride_ot + head * stride_oh + d[None, :],
                 o.to(o_ptr.dtype.element_ty), mask=(i < q_len)[:, None])


def paged_prefill_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                            block_tables: torch.Tensor, seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor,
                            max_seqlen_q: int | None = None, sm_scale: float | None = None,
                            k_scale: float = 1.0, v_scale: float = 1.0, out: torch.Tensor | None = None,
                            config: PrefillAttnConfig | None = None) -> torch.Tensor:
    """Causal attention of packed new tokens q [T, num_heads, head_dim] to their whole paged context.

    The new K/V must already be in the pool (rope.rope_kv_write); earlier context (chunked prefill,
    reused prefixes) is read through the same block table."""
    cfg = config or PrefillAttnConfig()
    T, H, D = q.shape
    Hkv, BS = k_pool.shape[2], k_pool.shape[1]
    assert k_pool.stride() == v_pool.stride() and k_pool.stride(-1) == 1 and q.stride(-1) == 1
    max_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max()) if max_seqlen_q is None else max_seqlen_q
    out = torch.empty_like(q) if out is None else out
    scale = (sm_scale or 1.0 / math.sqrt(D)) * k_scale * LOG2E
    grid = (H, triton.cdiv(max_q, cfg.block_m), len(seq_lens))
    _prefill_kernel[grid](
        q, k_pool, v_pool, block_tables, seq_lens, cu_seqlens_q, out, scale, v_scale, q.stride(0), q.stride(1),
        k_pool.stride(0), k_pool.stride(1), k_pool.stride(2), block_tables.stride(0), out.stride(0),
        out.stride(1), GROUP=H // Hkv, HEAD_DIM=D, BLOCK_SIZE=BS, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        UPCAST=_exact_dot(q), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out

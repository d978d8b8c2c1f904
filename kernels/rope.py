"""Rotary embedding of q and k (rotate-half form, as HF Llama) fused with writing the new K/V into
the paged pool (optionally as fp8 with per-tensor scales): q, k, v are read once and never rewritten."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .hardware import pdl, pdl_wait


def rope_cache(max_positions: int, head_dim: int, theta: float, device=None,
               inv_freq: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin f32 [max_positions, head_dim / 2]; pass inv_freq for scaled variants (Llama 3.1)."""
    if inv_freq is None:
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float64) / head_dim)
    angles = torch.arange(max_positions, device=device, dtype=torch.float64)[:, None] * inv_freq.double()[None, :]
    return angles.cos().float(), angles.sin().float()


def apply_rope_reference(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                         sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D] rotated by position, in f32: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)."""
    c, s = cos[positions][:, None, :], sin[positions][:, None, :]
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


def rope_kv_write_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                            cos: torch.Tensor, sin: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                            slot_mapping: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    """The oracle: returns rotated q; writes rotated k / k_scale and v / v_scale into the pools at
    slot_mapping (flat slot = block * block_size + offset; negative slots are skipped)."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    kf = apply_rope_reference(k, positions, cos, sin)[keep] / k_scale
    vf = v[keep].float() / v_scale
    k_pool.view(-1, *k_pool.shape[2:])[slots] = kf.to(k_pool.dtype)
    v_pool.view(-1, *v_pool.shape[2:])[slots] = vf.to(v_pool.dtype)
    return apply_rope_reference(q, positions, cos, sin).to(q.dtype)


@triton.jit
def _rotate(x_ptr, stride_h, heads, d, c, s, n_heads):
    # Load [heads, D/2] halves of one token's x and return both rotated halves in f32.
    mask = heads[:, None] < n_heads
    HALF: tl.constexpr = d.shape[0]
    x1 = tl.load(x_ptr + heads[:, None] * stride_h + d[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + heads[:, None] * stride_h + HALF + d[None, :], mask=mask, other=0.0).to(tl.float32)
    return x1 * c[None, :] - x2 * s[None, :], x2 * c[None, :] + x1 * s[None, :], mask


@triton.jit
def _rope_kv_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, cos_ptr, sin_ptr, kp_ptr, vp_ptr, slot_ptr, qo_ptr,
                    inv_k_scale, inv_v_scale, H, HKV, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt,
                    stride_vh, stride_pb, stride_pt, stride_ph, stride_ot, stride_oh,
                    HALF: tl.constexpr, H_PAD: tl.constexpr, HKV_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                    PDL: tl.constexpr = False):
    # One program per token: all of its q heads, k heads and v heads.
    t = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, HALF)
    pdl_wait(PDL)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    c = tl.load(cos_ptr + pos * HALF + d)
    s = tl.load(sin_ptr + pos * HALF + d)
    hq = tl.arange(0, H_PAD)
    q1, q2, qmask = _rotate(q_ptr + t * stride_qt, stride_qh, hq, d, c, s, H)
    o = qo_ptr + t * stride_ot + hq[:, None] * stride_oh + d[None, :]
    tl.store(o, q1.to(qo_ptr.dtype.element_ty), mask=qmask)
    tl.store(o + HALF, q2.to(qo_ptr.dtype.element_ty), mask=qmask)
    slot = tl.load(slot_ptr + t)
    if slot >= 0:
        hk = tl.arange(0, HKV_PAD)
        k1, k2, kmask = _rotate(k_ptr + t * stride_kt, stride_kh, hk, d, c, s, HKV)
        base = (slot // BLOCK_SIZE) * stride_pb + (slot % BLOCK_SIZE) * stride_pt + hk[:, None] * stride_ph + d[None, :]
        tl.store(kp_ptr + base, (k1 * inv_k_scale).to(kp_ptr.dtype.element_ty), mask=kmask)
        tl.store(kp_ptr + base + HALF, (k2 * inv_k_scale).to(kp_ptr.dtype.element_ty), mask=kmask)
        vrow = v_ptr + t * stride_vt + hk[:, None] * stride_vh + d[None, :]
        v1 = tl.load(vrow, mask=kmask, other=0.0).to(tl.float32)
        v2 = tl.load(vrow + HALF, mask=kmask, other=0.0).to(tl.float32)
        tl.store(vp_ptr + base, (v1 * inv_v_scale).to(vp_ptr.dtype.element_ty), mask=kmask)
        tl.store(vp_ptr + base + HALF, (v2 * inv_v_scale).to(vp_ptr.dtype.element_ty), mask=kmask)


def rope_kv_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, slot_mapping: torch.Tensor,
                  k_scale: float = 1.0, v_scale: float = 1.0, out: torch.Tensor | None = None) -> torch.Tensor:
    """Rotate q (returned) and k, and store k and v in the pool at slot_mapping, in one launch."""
    T, H, D = q.shape
    Hkv = k.shape[1]
    assert q.stride(-1) == k.stride(-1) == v.stride(-1) == 1 and k_pool.stride() == v_pool.stride()
    assert cos.shape[1] == D // 2 and cos.is_contiguous() and sin.is_contiguous()
    out = torch.empty_like(q) if out is None else out
    _rope_kv_kernel[(T,)](q, k, v, positions, cos, sin, k_pool, v_pool, slot_mapping, out, 1.0 / k_scale,
                          1.0 / v_scale, H, Hkv, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0),
                          v.stride(1), k_pool.stride(0), k_pool.stride(1), k_pool.stride(2), out.stride(0),
                          out.stride(1), HALF=D // 2, H_PAD=triton.next_power_of_2(H),
                          HKV_PAD=triton.next_power_of_2(Hkv), BLOCK_SIZE=k_pool.shape[1], num_warps=4,
                          **pdl(q.device, T))
    return out

"""The top-k / top-p / min-p filter over the vocabulary, without a sort: each cut is a threshold,
found by an NT-way search over the f32 bit patterns of key = max_logit - logit (>= 0, so its bits
are monotone): one pass over the row tests NT thresholds at once, and only the mass test needs exp.

Semantics (the reference below is the definition): x = logits / temperature, p = softmax(x);
top-k keeps p >= the k-th largest p (ties kept; k <= 0 is off); top-p then keeps the smallest head
of the top-k set whose mass, renormalised within that set, reaches top_p; min-p keeps
p >= min_p * max(p). Removed entries of x become -inf; sampling from the result is the caller's."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


def filter_logits_reference(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                            top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """The oracle, by sorting: [B, V] f32 tempered logits with the filtered-out entries at -inf."""
    x = logits.float() / temperature.float()[:, None]
    p = x.softmax(-1)
    srt = p.sort(-1, descending=True).values
    V = p.shape[-1]
    k = torch.where(top_k > 0, top_k.clamp(max=V), V).long()
    t_k = srt.gather(1, (k - 1)[:, None])
    mass_k = torch.where(srt >= t_k, srt, 0.0).sum(-1, keepdim=True)
    cum = torch.where(srt >= t_k, srt, 0.0).cumsum(-1)
    first = (cum < top_p.float()[:, None] * mass_k).sum(-1, keepdim=True).clamp(max=V - 1)
    t_p = torch.where(top_p[:, None] < 1.0, srt.gather(1, first), 0.0)  # top_p >= 1 is off
    t_m = min_p.float()[:, None] * srt[:, :1]
    thr = torch.maximum(torch.maximum(t_k, t_p), t_m)
    return torch.where(p >= thr, x, float("-inf"))


@triton.jit
def _search(x_ptr, V, inv_t, mx, inv_z, lo, hi, goal, MASS: tl.constexpr, NT: tl.constexpr,
            BLOCK_V: tl.constexpr):
    # The smallest u in (lo, hi] with f(u) >= goal, where f(u) = count (or prob mass) of key <= u and
    # f(lo) < goal <= f(hi). Each pass over the row evaluates f at NT points between lo and hi,
    # summing per lane and reducing across lanes once per pass.
    i = tl.arange(0, NT)
    while hi - lo > 1:
        m = (lo + (hi - lo).to(tl.int64) * (i + 1) // (NT + 1)).to(tl.int32)
        u = m.to(tl.float32, bitcast=True)
        f = tl.zeros((BLOCK_V, NT), tl.float32)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            key = mx - tl.load(x_ptr + cols, mask=cols < V, other=float("-inf")) * inv_t
            w = tl.exp(-key) * inv_z if MASS else tl.full((BLOCK_V,), 1.0, tl.float32)
            f += tl.where(key[:, None] <= u[None, :], w[:, None], 0.0)
        fails = tl.sum((tl.sum(f, 0) < goal).to(tl.int32), 0)  # f is monotone in u: the first `fails` fail
        lo = tl.maximum(lo, tl.max(tl.where(i < fails, m, -1), 0))
        hi = tl.minimum(hi, tl.min(tl.where(i >= fails, m, 2147483647), 0))
    return hi


@triton.jit
def _filter_kernel(logits_ptr, out_ptr, temp_ptr, top_k_ptr, top_p_ptr, min_p_ptr, V, stride_l, stride_o,
                   NT: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_ptr = logits_ptr + row * stride_l
    inv_t = 1.0 / tl.load(temp_ptr + row)
    # Softmax statistics: a running max and rescaled sum per lane, combined once.
    m_lane = tl.full((BLOCK_V,), float("-inf"), tl.float32)
    z_lane = tl.zeros((BLOCK_V,), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(x_ptr + cols, mask=cols < V, other=float("-inf")) * inv_t
        m_new = tl.maximum(m_lane, x)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # lanes that saw only padding stay at 0
        z_lane = z_lane * tl.exp(m_lane - m_ref) + tl.exp(x - m_ref)
        m_lane = m_new
    mx = tl.max(m_lane, 0)
    inv_z = 1.0 / tl.sum(z_lane * tl.exp(m_lane - mx), 0)
    inf_bits = tl.full((), 0x7F800000, tl.int32)  # loop-carried below: a tensor, not a constant
    none = tl.full((), -1, tl.int32)
    # Top-k: the k-th smallest key. Keys at +inf (padding) never count below it.
    k = tl.load(top_k_ptr + row)
    u_k = inf_bits
    if k > 0 and k < V:
        u_k = _search(x_ptr, V, inv_t, mx, inv_z, none, inf_bits, k.to(tl.float32), False, NT, BLOCK_V)
    # Top-p within the top-k set: the fewest smallest keys whose mass reaches top_p of the set's.
    top_p = tl.load(top_p_ptr + row)
    u = u_k
    if top_p < 1.0:
        mass_k = tl.zeros((BLOCK_V,), tl.float32)
        u_k_f = u_k.to(tl.float32, bitcast=True)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            key = mx - tl.load(x_ptr + cols, mask=cols < V, other=float("-inf")) * inv_t
            mass_k += tl.where(key <= u_k_f, tl.exp(-key) * inv_z, 0.0)
        u = _search(x_ptr, V, inv_t, mx, inv_z, none, u_k, top_p * tl.sum(mass_k, 0), True, NT, BLOCK_V)
    # Keep p >= max(p at the cut, min_p * max p), with p computed one way for cut and row alike.
    thr = tl.maximum(tl.exp(-u.to(tl.float32, bitcast=True)) * inv_z, tl.load(min_p_ptr + row) * inv_z)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(x_ptr + cols, mask=cols < V, other=float("-inf")) * inv_t
        p = tl.exp(x - mx) * inv_z
        tl.store(out_ptr + row * stride_o + cols, tl.where(p >= thr, x, float("-inf")), mask=cols < V)


def filter_logits(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  min_p: torch.Tensor, out: torch.Tensor | None = None, ways: int = 4, block_v: int = 8192,
                  num_warps: int = 16) -> torch.Tensor:
    """Tempered logits [B, V] f32 with everything outside top-k / top-p / min-p at -inf, sort-free."""
    B, V = logits.shape
    assert logits.stride(-1) == 1
    out = torch.empty((B, V), dtype=torch.float32, device=logits.device) if out is None else out
    _filter_kernel[(B,)](logits, out, temperature.float().contiguous(), top_k.to(torch.int32).contiguous(),
                         top_p.float().contiguous(), min_p.float().contiguous(), V, logits.stride(0), out.stride(0),
                         NT=ways, BLOCK_V=min(block_v, triton.next_power_of_2(V)), num_warps=num_warps)
    return out

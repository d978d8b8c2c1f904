import pytest

pytest.importorskip("triton")
import torch
import triton
import triton.language as tl

from kiln.kernels import activation, norm, rope, sampling

BF16, FP8 = torch.bfloat16, torch.float8_e4m3fn


@triton.jit
def _cast_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + i, tl.load(x_ptr + i, mask=i < n).to(y_ptr.dtype.element_ty), mask=i < n)


def triton_round(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x rounded to dtype by Triton's own cast: the interpreter's fp8 rounding is not torch's (ties go
    away from zero, and a mantissa carry can drop the exponent), so fp8 outputs are compared with this."""
    x = x.float().contiguous()
    y = torch.empty(x.shape, dtype=dtype, device=x.device)
    _cast_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
    return y


@pytest.mark.parametrize("T,H", [(1, 64), (5, 300)])
def test_rms_norm_residual(T, H, device, check, poisoned):
    x, r = torch.randn(T, H, dtype=BF16, device=device), torch.randn(T, H, dtype=BF16, device=device)
    w = torch.randn(H, dtype=BF16, device=device)
    y, h = norm.rms_norm(x, w, 1e-5, residual=r, out=poisoned((T, H), BF16, device),
                         residual_out=poisoned((T, H), BF16, device))
    y_ref, h_ref = norm.rms_norm_reference(x, w, 1e-5, residual=r)
    check(y, y_ref, 1e-2)
    check(h, h_ref, 1e-2)
    check(norm.rms_norm(x, w, 1e-5), norm.rms_norm_reference(x, w, 1e-5), 1e-2)


def test_rms_norm_residual_in_place(device, check):
    x, r = torch.randn(3, 100, dtype=BF16, device=device), torch.randn(3, 100, dtype=BF16, device=device)
    w = torch.randn(100, dtype=BF16, device=device)
    y_ref, h_ref = norm.rms_norm_reference(x, w, 1e-6, residual=r)
    y, h = norm.rms_norm(x, w, 1e-6, residual=r, residual_out=r)
    assert h.data_ptr() == r.data_ptr()
    check(y, y_ref, 1e-2)
    check(r, h_ref, 1e-2)


@pytest.mark.parametrize("shape", [(1, 2 * 77), (2, 3, 2 * 5000)])
def test_silu_mul(shape, device, check, poisoned):
    gu = torch.randn(*shape, dtype=BF16, device=device)
    out = poisoned((*shape[:-1], shape[-1] // 2), BF16, device)
    check(activation.silu_mul(gu, out=out), activation.silu_mul_reference(gu), 1e-2)


@pytest.mark.parametrize("kv_dtype", [BF16, FP8])
def test_rope_kv_write(kv_dtype, device, check, poisoned):
    T, H, Hkv, D, bs, blocks = 7, 6, 2, 16, 4, 5
    q = torch.randn(T, H, D, dtype=BF16, device=device)
    k, v = torch.randn(T, Hkv, D, dtype=BF16, device=device), torch.randn(T, Hkv, D, dtype=BF16, device=device)
    cos, sin = rope.rope_cache(64, D, 10000.0, device=device)
    pos = torch.randint(0, 64, (T,), device=device)
    slots = torch.randperm(blocks * bs, device=device)[:T]
    slots[2] = -1  # padding token: nothing written
    k_pool = torch.randn(blocks, bs, Hkv, D, device=device).to(kv_dtype)
    v_pool = torch.randn(blocks, bs, Hkv, D, device=device).to(kv_dtype)
    before = k_pool.float().clone(), v_pool.float().clone()
    q_ref = rope.apply_rope_reference(q, pos, cos, sin).to(BF16)
    q_out = rope.rope_kv_write(q, k, v, pos, cos, sin, k_pool, v_pool, slots, 0.5, 0.25,
                               out=poisoned(q.shape, BF16, device))
    check(q_out, q_ref, 1e-2)
    # The pools: untouched slots keep their bits; written ones hold the reference's f32 values
    # rounded by the same cast the kernel uses (bit-exact except where f32 noise flips a rounding).
    written = slots[slots >= 0]
    k_new = rope.apply_rope_reference(k, pos, cos, sin)[slots >= 0] / 0.5
    v_new = v[slots >= 0].float() / 0.25
    for pool, old, new in ((k_pool, before[0], k_new), (v_pool, before[1], v_new)):
        flat, old = pool.view(blocks * bs, Hkv, D).float(), old.view(blocks * bs, Hkv, D)
        untouched = torch.ones(blocks * bs, dtype=torch.bool, device=device)
        untouched[written] = False
        assert torch.equal(flat[untouched], old[untouched])
        expect = triton_round(new, kv_dtype).float()
        assert (flat[written] != expect).float().mean() <= 0.02
        assert ((flat[written] - expect).abs() <= 2**-2 * expect.abs() + 2**-9).all()
    if kv_dtype == BF16:  # the torch oracle of the GPU check agrees too (its fp8 rounding is torch's)
        k_ref, v_ref = before[0].to(kv_dtype), before[1].to(kv_dtype)
        rope.rope_kv_write_reference(q, k, v, pos, cos, sin, k_ref, v_ref, slots, 0.5, 0.25)
        check(k_pool.float(), k_ref.float(), 0.02)
        check(v_pool.float(), v_ref.float(), 0.02)


def test_rope_reference_rotates_pairs(device):
    # Position 0 is the identity; rotation preserves each (x_i, x_{i + D/2}) pair's norm.
    cos, sin = rope.rope_cache(16, 8, 10000.0, device=device)
    x = torch.randn(3, 2, 8, device=device)
    assert torch.allclose(rope.apply_rope_reference(x, torch.zeros(3, dtype=torch.long, device=device), cos, sin), x)
    y = rope.apply_rope_reference(x, torch.tensor([1, 5, 15], device=device), cos, sin)
    pair = lambda t: t[..., :4] ** 2 + t[..., 4:] ** 2
    assert torch.allclose(pair(y), pair(x), atol=1e-5)


def test_sampling_filter(device, check):
    B, V = 6, 1000
    logits = torch.randn(B, V, device=device) * 3
    temp = torch.rand(B, device=device) + 0.5
    top_k = torch.tensor([0, 1, 10, 999, 50, 0], dtype=torch.int32, device=device)
    top_p = torch.tensor([1.0, 0.9, 0.5, 0.8, 0.95, 0.3], device=device)
    min_p = torch.tensor([0.0, 0.0, 0.1, 0.0, 0.02, 0.0], device=device)
    out = sampling.filter_logits(logits, temp, top_k, top_p, min_p)
    ref = sampling.filter_logits_reference(logits, temp, top_k, top_p, min_p)
    assert torch.equal(torch.isfinite(out), torch.isfinite(ref))
    kept = torch.isfinite(ref)
    check(out[kept], ref[kept], 1e-5)
    assert kept[0].all() and kept[1].sum() == 1 and kept.sum(1).min() >= 1


def test_sampling_filter_ties_kept(device):
    # Equal logits straddling the top-k cut are all kept, as the reference defines.
    logits = torch.tensor([[5.0, 3.0, 3.0, 3.0, 1.0, 0.0]], device=device)
    one = torch.ones(1, device=device)
    out = sampling.filter_logits(logits, one, torch.tensor([2], dtype=torch.int32, device=device), one, 0 * one)
    assert torch.isfinite(out).tolist() == [[True, True, True, True, False, False]]

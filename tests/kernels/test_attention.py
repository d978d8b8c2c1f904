import pytest

pytest.importorskip("triton")
import torch

from kiln.kernels import attention
from kiln.kernels.attention import DecodeAttnConfig, PrefillAttnConfig

BF16, FP8 = torch.bfloat16, torch.float8_e4m3fn


def paged(ctxs, q_lens, device, H=4, Hkv=2, D=32, bs=8, kv_dtype=BF16):
    """A shuffled pool with spare blocks, holding each sequence's whole context, and its new queries."""
    per_seq = [-(-c // bs) for c in ctxs]
    blocks = sum(per_seq) + 3
    k_pool = torch.randn(blocks, bs, Hkv, D, device=device).to(kv_dtype)
    v_pool = torch.randn(blocks, bs, Hkv, D, device=device).to(kv_dtype)
    order = torch.randperm(blocks, device=device).int()
    tables = torch.zeros(len(ctxs), max(per_seq) + 1, dtype=torch.int32, device=device)
    used = 0
    for s, n in enumerate(per_seq):
        tables[s, :n] = order[used:used + n]
        used += n
    cu = torch.tensor([0] + q_lens, device=device).cumsum(0).int()
    q = torch.randn(int(cu[-1]), H, D, dtype=BF16, device=device)
    return dict(q=q, k_pool=k_pool, v_pool=v_pool, block_tables=tables,
                seq_lens=torch.tensor(ctxs, dtype=torch.int32, device=device), cu_seqlens_q=cu)


def decode_args(p):
    return p["q"], p["k_pool"], p["v_pool"], p["block_tables"], p["seq_lens"]


@pytest.mark.parametrize("kv_dtype", [BF16, FP8])
@pytest.mark.parametrize("config", [None, DecodeAttnConfig(16, 16), DecodeAttnConfig(16, 48)])
def test_decode(kv_dtype, config, device, check, poisoned):
    # Contexts of 1, not a multiple of the page (8), of the block (16), or of the partition.
    p = paged([1, 37, 100], [1, 1, 1], device, kv_dtype=kv_dtype)
    scales = dict(k_scale=0.5, v_scale=0.25) if kv_dtype == FP8 else {}
    ref = attention.paged_attention_reference(**p, **scales)
    out = attention.paged_decode_attention(*decode_args(p), config=config, out=poisoned(p["q"].shape, BF16, device),
                                           **scales)
    check(out, ref, 1e-2)


def test_decode_gqa_group_of_one_and_eight(device, check):
    for H, Hkv in ((3, 3), (16, 2)):
        p = paged([21, 5], [1, 1], device, H=H, Hkv=Hkv, D=16, bs=4)
        check(attention.paged_decode_attention(*decode_args(p), max_seq_len=21),
              attention.paged_attention_reference(**p), 1e-2)


@pytest.mark.parametrize("kv_dtype", [BF16, FP8])
def test_prefill_chunked_and_varlen(kv_dtype, device, check, poisoned):
    # Sequences: a single token; a chunk after a 17-token prefix; a fresh prompt; a decode-like row.
    p = paged([1, 37, 33, 20], [1, 20, 33, 1], device, kv_dtype=kv_dtype)
    scales = dict(k_scale=0.5, v_scale=0.25) if kv_dtype == FP8 else {}
    ref = attention.paged_attention_reference(**p, **scales)
    for cfg in (PrefillAttnConfig(16, 16), PrefillAttnConfig(32, 16)):
        out = attention.paged_prefill_attention(**p, config=cfg, out=poisoned(p["q"].shape, BF16, device), **scales)
        check(out, ref, 1e-2)


def test_prefill_matches_decode_for_one_token(device, check):
    p = paged([9, 30], [1, 1], device)
    dec = attention.paged_decode_attention(*decode_args(p))
    check(attention.paged_prefill_attention(**p, config=PrefillAttnConfig(16, 16)), dec, 1e-2)


def test_reference_is_sdpa_on_contiguous_kv(device):
    # The oracle itself, against torch's attention on a pool holding one sequence in order.
    p = paged([24], [24], device, H=4, Hkv=4, D=16, bs=8)
    k = attention.gather_kv(p["k_pool"], p["block_tables"][0], 24).float()
    v = attention.gather_kv(p["v_pool"], p["block_tables"][0], 24).float()
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        p["q"].float().transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True).transpose(0, 1)
    ref = attention.paged_attention_reference(**p).float()
    assert torch.allclose(ref, sdpa.to(BF16).float(), atol=1e-2, rtol=1e-2)

import pytest

pytest.importorskip("triton")
import torch

from kiln.kernels import gemm_woq, split_k
from kiln.kernels.gemm import DecodeConfig, PrefillConfig
from kiln.kernels.gemm_woq import AwqConfig

BF16 = torch.bfloat16


def awq_weights(K: int, N: int, device, dtype=BF16):
    q = gemm_woq.awq_pack(torch.randint(0, 16, (K, N), device=device))
    z = gemm_woq.awq_pack(torch.randint(0, 16, (K // 128, N), device=device))
    s = (torch.rand(K // 128, N, device=device) * 0.02 + 0.005).to(dtype)
    return q, z, s


def test_awq_packing_matches_autoawq_loop():
    # AutoAWQ's packer: for each int32, nibble i takes column order_map[i] of its 8 columns.
    q = torch.randint(0, 16, (5, 24))
    packed = torch.zeros(5, 3, dtype=torch.int32)
    for c in range(3):
        for i, col in enumerate([0, 2, 4, 6, 1, 3, 5, 7]):
            packed[:, c] |= q[:, c * 8 + col].int() << (4 * i)
    assert torch.equal(gemm_woq.awq_pack(q), packed)
    assert torch.equal(gemm_woq.awq_unpack(packed), q.int())


@pytest.mark.parametrize("M,N,K", [(1, 40, 256), (1, 200, 384), (3, 72, 384), (16, 8, 128), (37, 56, 256)])
def test_awq(M, N, K, device, check, poisoned):
    x = torch.randn(M, K, dtype=BF16, device=device)
    q, z, s = awq_weights(K, N, device)
    ref = gemm_woq.linear_awq_reference(x, q, z, s)
    check(gemm_woq.linear_awq(x, q, z, s, out=poisoned((M, N), BF16, device)), ref, 1e-2)
    check(gemm_woq.linear_awq(x, q, z, s, config=AwqConfig(16, 32, 2)), ref, 1e-2)  # split-K, N % 32 != 0
    check(gemm_woq.linear_awq(x, q, z, s, gemv=False), ref, 1e-2)
    if M == 1:  # the register-only kernel at another step and with split-K
        check(gemm_woq.linear_awq(x, q, z, s, config=AwqConfig(1, 64, 2, block_k=64)), ref, 1e-2)


def test_awq_f16_scales_and_prefill_dequant(device, check):
    x = torch.randn(130, 256, dtype=torch.float16, device=device)  # >= DEQUANT_MIN_M rows
    q, z, s = awq_weights(256, 48, device, torch.float16)
    ref = gemm_woq.linear_awq_reference(x, q, z, s)
    check(gemm_woq.linear_awq(x, q, z, s), ref, 2e-3)
    check(gemm_woq.linear_awq(x, q, z, s, config=AwqConfig(32, 32, 1)), ref, 2e-3)
    w = gemm_woq.awq_dequantize_triton(q, z, s)
    check(w, gemm_woq.awq_dequantize(q, z, s).to(torch.float16), 1e-3)


@pytest.mark.parametrize("M,N,K", [(1, 37, 300), (5, 50, 515), (37, 70, 200), (130, 20, 64)])
def test_w8a16(M, N, K, device, check, poisoned):
    x = torch.randn(M, K, dtype=BF16, device=device)
    wq = torch.randint(-127, 128, (N, K), dtype=torch.int8, device=device)
    ws = torch.rand(N, device=device) * 0.01 + 1e-3
    ref = gemm_woq.linear_w8a16_reference(x, wq, ws)
    check(gemm_woq.linear_w8a16(x, wq, ws, out=poisoned((M, N), BF16, device)), ref, 1e-2)
    check(gemm_woq.linear_w8a16(x, wq, ws, config=PrefillConfig(32, 32, 32, 2, 4, 2)), ref, 1e-2)
    if M <= 16:
        check(gemm_woq.linear_w8a16(x, wq, ws, config=DecodeConfig(16, 64, 2)), ref, 1e-2)


@pytest.mark.parametrize("M,block_m", [(1, 8), (3, 16), (11, 8)])
@pytest.mark.parametrize("split_k", [1, 2])
def test_w8a16_decode_swap_ab(M, block_m, split_k, device, check, poisoned):
    # int8 w as the MMA's A operand (widened in registers), per-channel scales along the accumulator's rows.
    N, K = 77, 200
    x = torch.randn(M, K, dtype=BF16, device=device)
    wq = torch.randint(-127, 128, (N, K), dtype=torch.int8, device=device)
    ws = torch.rand(N, device=device) * 0.01 + 1e-3
    cfg = DecodeConfig(64, 64, split_k, block_m=block_m, swap_ab=True)
    check(gemm_woq.linear_w8a16(x, wq, ws, out=poisoned((M, N), BF16, device), config=cfg),
          gemm_woq.linear_w8a16_reference(x, wq, ws), 1e-2)


# --------------------------------------------------------------- K-packed W4A16 (awq_kpack)
def awq_group_weights(K: int, N: int, group: int, device, dtype=BF16):
    q = gemm_woq.awq_pack(torch.randint(0, 16, (K, N), device=device))
    z = gemm_woq.awq_pack(torch.randint(0, 16, (K // group, N), device=device))
    s = (torch.rand(K // group, N, device=device) * 0.02 + 0.005).to(dtype)
    return q, z, s


@pytest.mark.parametrize("group", [32, 64, 128])
def test_awq_kpack_round_trip(group, device):
    q, z, s = awq_group_weights(256, 40, group, device)
    w = gemm_woq.awq_kpack(q, z, s)
    assert w.shape == (40, 256) and w.group == group and w.qweight.dtype == torch.int32
    assert torch.equal(gemm_woq.awq_kunpack(w.qweight), gemm_woq.awq_unpack(q).t())
    assert torch.equal(w.zeros, gemm_woq.awq_unpack(z).to(torch.uint8)) and torch.equal(w.scales, s)
    assert torch.equal(gemm_woq.awq_kpacked_dequantize(w), gemm_woq.awq_dequantize(q, z, s).t())
    # word j of row n holds q[8j + i, n] in nibble i
    assert (w.qweight[3, 5].item() >> 8) & 0xF == gemm_woq.awq_unpack(q)[8 * 5 + 2, 3].item()


def test_awq_kpack_rejects_bad_shapes():
    q, z, s = awq_group_weights(256, 40, 128, "cpu")
    with pytest.raises(ValueError, match="qzeros"):
        gemm_woq.awq_kpack(q, z[:1], s)
    with pytest.raises(ValueError, match="int32"):
        gemm_woq.awq_kpack(q.float(), z, s)
    with pytest.raises(ValueError, match="powers of two"):
        gemm_woq.linear_awq_kpacked(torch.randn(1, 256, dtype=BF16), gemm_woq.awq_kpack(q, z, s),
                                    config=gemm_woq.AwqGemvConfig(96))
    with pytest.raises(ValueError, match="one row"):
        gemm_woq.linear_awq_kpacked(torch.randn(2, 256, dtype=BF16), gemm_woq.awq_kpack(q, z, s),
                                    config=gemm_woq.AwqGemvConfig())


GEMV, MMA, DEQUANT = gemm_woq.AwqGemvConfig, gemm_woq.AwqMmaConfig, gemm_woq.AwqDequantConfig


@pytest.mark.parametrize("M,N,K,group,dtype,config", [
    (1, 40, 256, 128, BF16, None),  # the default GEMV: one block over 40 rows (wrapped loads), split over the 4 SMs
    (1, 40, 256, 128, BF16, GEMV(32, num_stages=1, split_k=2)),  # plain loads, split-K
    (1, 200, 384, 64, torch.float16, GEMV(64, split_k=2)),  # pipelined, N % block_n != 0, 3 groups per split
    (1, 64, 640, 128, BF16, GEMV(32, num_stages=4, split_k=1)),  # one split: 5 groups, stored directly
    (1, 64, 1152, 128, BF16, GEMV(32, num_stages=2, split_k=2)),  # 9 groups: splits of 5 and 4
    (1, 56, 96, 32, BF16, None),
    (1, 56, 96, 32, BF16, MMA(16, 4, split_k=2)),  # the tensor-core kernel at M = 1
    (3, 72, 384, 128, BF16, None),  # swap-AB MMA, split-K to fill the (4 interpreter) SMs
    (3, 72, 384, 128, BF16, MMA(32, 8, split_k=1)),
    (16, 24, 128, 32, torch.float16, None),
    (37, 56, 256, 64, BF16, None),  # block_m 64
    (5, 48, 256, 128, torch.float16, DEQUANT(16)),
    (130, 24, 128, 128, torch.float16, None),  # >= DEQUANT_MIN_M: dequantise + torch.matmul
])
def test_linear_awq_kpacked(M, N, K, group, dtype, config, device, check, poisoned):
    x = torch.randn(M, K, dtype=dtype, device=device)
    q, z, s = awq_group_weights(K, N, group, device, dtype)
    w = gemm_woq.awq_kpack(q, z, s)
    out = gemm_woq.linear_awq_kpacked(x, w, out=poisoned((M, N), dtype, device), config=config)
    check(out, gemm_woq.linear_awq_reference(x, q, z, s), 1e-2 if dtype == BF16 else 2e-3)


@pytest.mark.parametrize("stages", [1, 3])
def test_awq_kpacked_gemv_sums_at_f32_precision(stages, device, check):
    # The GEMV's offsets (1 + q/16, 16 + q/16) cancel inside its f32 sums: into an f32 output the result matches
    # the f64 product of x and the dequantised weight to f32 rounding, split K included.
    K, N = 2048, 48
    x = torch.randn(1, K, dtype=BF16, device=device)
    q, z, s = awq_group_weights(K, N, 128, device)
    y = torch.full((1, N), float("nan"), device=device)
    gemm_woq._launch_gemv(x, gemm_woq.awq_kpack(q, z, s), y, GEMV(32, num_stages=stages, split_k=4))
    check(y, x.double() @ gemm_woq.awq_dequantize(q, z, s).double(), 1e-6)


def test_awq_kpacked_split_k_counters_reset(device, check, poisoned):
    # The last program of each column block sums the K splits and puts its counter back to 0: calls that share the
    # counters (GEMV and MMA, other shapes) keep finding them at zero, and the outputs stay right.
    q, z, s = awq_group_weights(384, 72, 64, device)
    w = gemm_woq.awq_kpack(q, z, s)
    for M, config in [(1, GEMV(32, split_k=3)), (3, MMA(16, 4, split_k=2)), (1, GEMV(64, num_stages=1, split_k=6)),
                      (1, GEMV(32, split_k=3))]:
        x = torch.randn(M, 384, dtype=BF16, device=device)
        out = gemm_woq.linear_awq_kpacked(x, w, out=poisoned((M, 72), BF16, device), config=config)
        check(out, gemm_woq.linear_awq_reference(x, q, z, s), 1e-2)
        assert not split_k._TICKETS[x.device].any()

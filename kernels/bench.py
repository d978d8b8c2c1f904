"""GPU benchmark and GPU correctness check of the kernels at Llama-3.1-8B / Llama-3.2-1B shapes.

    python -m kiln.kernels.bench             # ceilings, then every kernel against torch/cuBLAS
    python -m kiln.kernels.bench --check     # correctness at real shapes, outputs poisoned with NaN
    python -m kiln.kernels.bench --check kpacked       # the K-packed W4A16 paths alone
    python -m kiln.kernels.bench --only gemm,attn --sweep
    python -m kiln.kernels.bench --only decode-sweep   # swap-AB decode GEMM configs against the defaults
    python -m kiln.kernels.bench --only served-sweep --formats fp8   # the merged 8B shapes at M = 1, K splits too
    python -m kiln.kernels.bench --only awq-sweep      # K-packed W4A16 configs (GEMV at M = 1, MMA, dequantise)
    python -m kiln.kernels.bench --only awq-sweep --awq-m 1   # the M = 1 GEMVs alone

Times are medians of triton.testing.do_bench (which clears L2 before each run); weights also rotate
over enough copies to exceed L2. Each row gives the time, the achieved rate, the fraction of the
roofline built from ceilings measured in the same run, and torch's time on the same inputs."""
from __future__ import annotations

import argparse
import itertools
import math
import sys
import traceback
from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F
import triton
from triton.compiler.errors import CompilationError
from triton.runtime.errors import OutOfResources

from . import activation, attention, gemm, gemm_fp8, gemm_woq, norm, rope, sampling, split_k

L2_BYTES = 50 * 2**20
BF16 = torch.bfloat16
# (model, layer, N, K) of nn.Linear weights [N, K].
LINEARS = [("8B", "qo", 4096, 4096), ("8B", "kv", 1024, 4096), ("8B", "gate/up", 14336, 4096),
           ("8B", "down", 4096, 14336), ("1B", "qo", 2048, 2048), ("1B", "kv", 512, 2048),
           ("1B", "gate/up", 8192, 2048), ("1B", "down", 2048, 8192)]
MS = [1, 8, 64, 256, 4096]


@dataclass
class Ceilings:
    copy_tbs: float  # device-to-device copy, bytes read + written
    bf16_tflops: float  # torch.matmul 8192^3
    fp8_tflops: float  # torch._scaled_mm 8192^3


@dataclass
class Row:
    kernel: str
    shape: str
    ms: float
    rate: str  # achieved, with unit
    roof: float  # roofline time / measured time
    torch_ms: float | None
    note: str = ""

    def line(self) -> str:
        ratio = f"{self.torch_ms / self.ms:5.2f}x" if self.torch_ms else "   n/a"
        torch_ms = f"{self.torch_ms * 1e3:9.1f}" if self.torch_ms else "      n/a"
        return (f"{self.kernel:<22} {self.shape:<28} {self.ms * 1e3:9.1f} {self.rate:>13} {self.roof:6.1%} "
                f"{torch_ms} {ratio} {self.note}")


HEADER = (f"{'kernel':<22} {'shape':<28} {'us':>9} {'rate':>13} {'roof':>6} {'torch us':>9} {'speedup':>6}")


def num_sets(bytes_each: int) -> int:
    """Input sets that together overflow L2 three times, so each run reads its bytes from DRAM."""
    return max(1, min(8, math.ceil(3 * L2_BYTES / max(bytes_each, 1))))


def timed(fn: Callable[..., object], make: Callable[[], tuple], bytes_each: int = 0, rep: int = 100) -> float:
    """Median milliseconds of one fn(*inputs), replayed from a CUDA graph (as the decode runtime does),
    over several input sets used in turn so that together they overflow L2."""
    sets = [make() for _ in range(num_sets(bytes_each))]
    fn(*sets[0])  # compile and autotune outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for s in sets:
            fn(*s)
    return triton.testing.do_bench(graph.replay, warmup=25, rep=rep, return_mode="median") / len(sets)


def measure_ceilings() -> Ceilings:
    a = torch.randn(2**28, device="cuda", dtype=BF16)  # 512 MiB
    b = torch.empty_like(a)
    # The copy, timed both ways (graph replay, and one launch at a time), keeping the faster.
    t_copy = min(timed(lambda a: b.copy_(a), lambda: (a,)),
                 triton.testing.do_bench(lambda: b.copy_(a), warmup=25, rep=200, return_mode="median"))
    copy = 2 * a.numel() * 2 / t_copy / 1e9
    x, y = torch.randn(8192, 8192, device="cuda", dtype=BF16), torch.randn(8192, 8192, device="cuda", dtype=BF16)
    mm = 2 * 8192**3 / timed(torch.matmul, lambda: (x, y)) / 1e9
    xq, yq = x.to(gemm_fp8.FP8), y.to(gemm_fp8.FP8)
    one = torch.ones(1, device="cuda")
    f8 = 2 * 8192**3 / timed(lambda a, b: torch._scaled_mm(a, b.t(), one, one, out_dtype=BF16), lambda: (xq, yq)) / 1e9
    return Ceilings(copy, mm, f8)


def gemm_row(kernel: str, shape: str, ms: float, M: int, N: int, K: int, bytes_: int, peak: float,
             ceil: Ceilings, torch_ms: float | None, weight_bytes: int, note: str = "") -> Row:
    floor = max(bytes_ / ceil.copy_tbs / 1e9, 2 * M * N * K / peak / 1e9)
    if M <= 16:
        rate = f"{weight_bytes / ms / 1e9:6.2f} TB/s w"
    else:
        rate = f"{2 * M * N * K / ms / 1e9:6.0f} TFLOP/s"
    return Row(kernel, shape, ms, rate, floor / ms, torch_ms, note)


def bf16_set(M: int, N: int, K: int) -> Callable[[], tuple]:
    return lambda: (torch.randn(M, K, device="cuda", dtype=BF16), torch.randn(N, K, device="cuda", dtype=BF16) / 64)


def fp8_set(M: int, N: int, K: int) -> Callable[[], tuple]:
    def make():
        xq, xs = gemm_fp8.quantize_fp8(torch.randn(M, K, device="cuda"), per_row=True)
        wq, ws = gemm_fp8.quantize_fp8(torch.randn(N, K, device="cuda"), per_row=True)
        return xq, wq, xs, ws
    return make


def awq_set(M: int, N: int, K: int) -> Callable[[], tuple]:
    def make():
        q = gemm_woq.awq_pack(torch.randint(0, 16, (K, N), device="cuda"))
        z = gemm_woq.awq_pack(torch.randint(0, 16, (K // 128, N), device="cuda"))
        s = (torch.rand(K // 128, N, device="cuda") * 0.01 + 0.001).to(BF16)
        return torch.randn(M, K, device="cuda", dtype=BF16), q, z, s
    return make


def kpacked_set(M: int, N: int, K: int, device: str = "cuda") -> Callable[[], tuple]:
    """x and K-packed int4 weights (group 128), repacked from random AutoAWQ tensors."""
    def make():
        q = gemm_woq.awq_pack(torch.randint(0, 16, (K, N), device=device))
        z = gemm_woq.awq_pack(torch.randint(0, 16, (K // 128, N), device=device))
        s = (torch.rand(K // 128, N, device=device) * 0.01 + 0.001).to(BF16)
        return torch.randn(M, K, device=device, dtype=BF16), gemm_woq.awq_kpack(q, z, s)
    return make


def w8_set(M: int, N: int, K: int) -> Callable[[], tuple]:
    return lambda: (torch.randn(M, K, device="cuda", dtype=BF16),
                    torch.randint(-127, 128, (N, K), device="cuda", dtype=torch.int8),
                    torch.rand(N, device="cuda") * 0.01)


def scaled_mm(xq, wq, xs, ws):
    return torch._scaled_mm(xq, wq.t(), xs[:, None], ws[None, :], out_dtype=BF16)


def bench_gemm(ceil: Ceilings, rows: list[Row]) -> None:
    for (model, layer, N, K), M in itertools.product(LINEARS, MS):
        shape = f"{model} {layer} M{M} N{N} K{K}"
        t_bf16 = timed(lambda x, w: torch.matmul(x, w.t()), bf16_set(M, N, K), N * K * 2)
        t = timed(gemm.linear, bf16_set(M, N, K), N * K * 2)
        io = M * K * 2 + N * K * 2 + M * N * 2
        note = "cuBLAS via dispatch" if gemm.prefill_backend(M, N, K) == "torch" else ""
        rows.append(gemm_row("bf16", shape, t, M, N, K, io, ceil.bf16_tflops, ceil, t_bf16, N * K * 2, note))
        if M > gemm.DECODE_MAX_M:
            t = timed(gemm.linear_triton, bf16_set(M, N, K), N * K * 2)
            rows.append(gemm_row("bf16 triton", shape, t, M, N, K, io, ceil.bf16_tflops, ceil, t_bf16, N * K * 2))
        try:
            t_torch = timed(scaled_mm, fp8_set(M, N, K), N * K)
        except RuntimeError:  # cuBLASLt wants M % 16 == 0 for fp8
            t_torch = None
        t = timed(gemm_fp8.linear_fp8, fp8_set(M, N, K), N * K)
        io = M * K + N * K + M * N * 2
        rows.append(gemm_row("fp8 row-scaled", shape, t, M, N, K, io, ceil.fp8_tflops, ceil, t_torch, N * K))
        if M in (1, 8, 256, 4096):
            # Weight-only formats against cuBLAS bf16 on the same shape: what a user would otherwise run.
            t = timed(gemm_woq.linear_awq, awq_set(M, N, K), N * K // 2)
            io = M * K * 2 + N * K // 2 + N * K // 128 * 2.5 + M * N * 2
            rows.append(gemm_row("w4a16 awq", shape, t, M, N, K, int(io), ceil.bf16_tflops, ceil, t_bf16, N * K // 2,
                                 "torch = bf16"))
            t = timed(gemm_woq.linear_awq_kpacked, kpacked_set(M, N, K), N * K // 2)
            rows.append(gemm_row("w4a16 kpacked", shape, t, M, N, K, int(io), ceil.bf16_tflops, ceil, t_bf16,
                                 N * K // 2, "torch = bf16"))
            t = timed(gemm_woq.linear_w8a16, w8_set(M, N, K), N * K)
            rows.append(gemm_row("w8a16", shape, t, M, N, K, M * K * 2 + N * K + M * N * 2, ceil.bf16_tflops,
                                 ceil, t_bf16, N * K, "torch = bf16"))


def sweep(ceil: Ceilings, rows: list[Row]) -> None:
    """Alternative configs for the M = 1 AWQ kernel and the sampling filter. (The sweeps that set the
    other defaults were run with earlier versions of this function; their results are in BENCHMARKS.md.)"""
    def add(kind: str, shape: str, fn, make, bytes_: int, rate: Callable[[float], str]) -> None:
        try:
            t = timed(fn, make, bytes_)
        except Exception as e:  # a config over the shared-memory limit, say
            print(f"{kind} {shape}: {type(e).__name__}", file=sys.stderr)
            return
        rows.append(Row(kind, shape, t, rate(t), bytes_ / ceil.copy_tbs / 1e9 / t, None))
    for (model, layer, N, K), (bn, bk, nw, more) in itertools.product(
            LINEARS[:4], [(256, 32, 4, 1), (256, 16, 4, 1), (256, 16, 8, 1), (256, 16, 4, 2), (512, 16, 8, 1),
                          (128, 16, 4, 2), (256, 8, 4, 2), (128, 32, 4, 2)]):
        cfg = gemm_woq.awq_config(1, N, K, 128, bn)
        cfg = gemm_woq.AwqConfig(1, bn, min(K // 128, cfg.split_k * more), nw, 3, bk)
        add("sweep awq M1", f"N{N} K{K} {bn}/{bk}/{cfg.split_k}/{nw}", lambda *a: gemm_woq.linear_awq(*a, config=cfg),
            awq_set(1, N, K), N * K // 2, lambda t: f"{N * K / 2 / t / 1e9:6.2f} TB/s w")
    for B, ways, bv, nw in itertools.product((1, 64), (4,), (4096, 8192), (16,)):
        make = lambda: (torch.randn(B, 128256, device="cuda") * 4, torch.full((B,), 0.8, device="cuda"),
                        torch.full((B,), 50, device="cuda", dtype=torch.int32), torch.full((B,), 0.9, device="cuda"),
                        torch.full((B,), 0.05, device="cuda"))
        add("sweep sampling", f"B{B} {ways}/{bv}/{nw}", lambda *a: sampling.filter_logits(*a, ways=ways, block_v=bv,
            num_warps=nw), make, 2 * B * 128256 * 4, lambda t: "")


@dataclass(frozen=True)
class DecodeFormat:
    """A weight format of the decode GEMM, as the sweep times it."""
    make: Callable[[int, int, int], Callable[[], tuple]]  # (M, N, K) -> input-set factory
    run: Callable[[gemm.DecodeConfig | None], Callable[..., object]]  # config (None: default) -> fn(*inputs)
    w_bytes: int
    x_bytes: int
    tiles: tuple[tuple[int, int, int], ...]  # swap-AB (block_n, block_k, num_warps) to try


DECODE_FORMATS = {
    "bf16": DecodeFormat(bf16_set, lambda cfg: lambda x, w: gemm.linear_decode(x, w, config=cfg), 2, 2,
                         ((64, 128, 4), (64, 256, 4), (128, 128, 4), (128, 256, 4))),
    "fp8": DecodeFormat(fp8_set, lambda cfg: lambda *a: gemm_fp8.linear_fp8(*a, config=cfg), 1, 1,
                        ((64, 256, 4), (64, 512, 4), (128, 256, 4), (128, 512, 4))),
    # int8 w widened in registers is the wgmma's A operand: 128x256 needs 8 warps not to spill (ptxas, sm_90a)
    "w8a16": DecodeFormat(w8_set, lambda cfg: lambda *a: gemm_woq.linear_w8a16(*a, config=cfg), 1, 2,
                          ((64, 128, 4), (128, 128, 4), (64, 256, 4), (128, 256, 8))),
}


def decode_tag(cfg: gemm.DecodeConfig) -> str:
    return f"{cfg.block_n}/{cfg.block_k}/{cfg.split_k}/{cfg.num_warps}/{cfg.num_stages}/{cfg.block_m}"


def decode_sweep_line(ceil: Ceilings, name: str, model: str, layer: str, M: int, N: int, K: int,
                      splits: tuple[int, ...] = ()) -> str:
    """The default decode config against the best swap-AB one of block_n x block_k x stages, its two
    leaders split over K to fill the SMs, and the leader with an 8-column x tile; with `splits`, the three
    leaders also at each of those K splits (a grid of a few waves ends in a partial one: splitting evens it)."""
    fmt = DECODE_FORMATS[name]
    w_bytes = N * K * fmt.w_bytes
    pool = itertools.cycle([fmt.make(M, N, K)() for _ in range(num_sets(w_bytes))])
    times: dict[gemm.DecodeConfig | None, float] = {}
    failed = 0

    def time(cfg: gemm.DecodeConfig | None) -> None:
        nonlocal failed
        try:  # the same inputs for every config
            times[cfg] = timed(fmt.run(cfg), lambda: next(pool), w_bytes, rep=60)
        except (OutOfResources, CompilationError, RuntimeError):  # over the shared-memory limit, say
            failed += 1

    def ranked() -> list[gemm.DecodeConfig]:
        return sorted((c for c in times if c is not None), key=times.__getitem__)
    smem = getattr(torch.cuda.get_device_properties(0), "shared_memory_per_block_optin", 227 * 2**10)
    time(None)
    for (bn, bk, nw), stages in itertools.product(fmt.tiles, (3, 4, 5)):
        if stages * bk * (bn * fmt.w_bytes + 16 * fmt.x_bytes) <= smem:  # Triton's pipeline buffers fit
            time(gemm.DecodeConfig(bn, bk, 1, nw, stages, 16, swap_ab=True))
    for cfg in ranked()[:2]:
        blocks = triton.cdiv(N, cfg.block_n) * triton.cdiv(M, cfg.block_m)
        split = gemm.decode_split(blocks, triton.cdiv(K, cfg.block_k))
        if split > 1:  # as the default config splits (one launch, the last program sums)
            time(replace(cfg, split_k=split))
    for cfg, split in itertools.product(ranked()[:3], splits):
        if split * cfg.block_k <= K:
            time(replace(cfg, split_k=split))
    if ranked() and M <= 8:
        time(replace(ranked()[0], block_m=8))
    head = f"{name:<5} {model} {layer:<7} M{M} N{N:<5} K{K:<5}"
    if None not in times or not ranked():
        return f"{head} no comparison: {failed} configs failed"
    best = ranked()[0]

    def rate(t: float) -> str:
        return f"{t * 1e3:6.1f} us {w_bytes / t / 1e9:4.2f} ({w_bytes / t / 1e9 / ceil.copy_tbs:4.0%})"
    default = gemm.decode_config(M, N, K, fmt.w_bytes, fmt.x_bytes)
    return (f"{head} default {rate(times[None])} {decode_tag(default):<15} swap {rate(times[best])} "
            f"{decode_tag(best):<15} {times[None] / times[best]:4.2f}x" + (f" ({failed} failed)" if failed else ""))


# The 8B linears as a decode step runs them: q/k/v and gate/up merged, and the lm_head.
SERVED_LINEARS = [("8B", "qkv", 6144, 4096), ("8B", "o", 4096, 4096), ("8B", "gate/up", 28672, 4096),
                  ("8B", "down", 4096, 14336), ("8B", "lm_head", 128256, 4096)]


def decode_sweep(ceil: Ceilings, formats: list[str], served: bool = False) -> None:
    """Swap-AB decode configs against the default, one line per (format, shape, M), printed as measured;
    `served`: the merged 8B shapes at M = 1, each leader also split 2 to 4 ways."""
    print("# decode-sweep: us, TB/s of weights (% of copy); cfg block_n/block_k/split_k/warps/stages/block_m",
          flush=True)
    shapes, ms, splits = (SERVED_LINEARS, (1,), (2, 3, 4)) if served else (LINEARS, (1, 8), ())
    for name, (model, layer, N, K), M in itertools.product(formats, shapes, ms):
        print(decode_sweep_line(ceil, name, model, layer, M, N, K, splits), flush=True)
        torch.cuda.empty_cache()


# (model, layer, N, K) of the W4A16 sweep, with q/k/v and gate/up fused as they are served.
AWQ_SWEEP_LINEARS = [("8B", "qkv", 6144, 4096), ("8B", "o", 4096, 4096), ("8B", "gate/up", 28672, 4096),
                     ("8B", "down", 4096, 14336), ("1B", "qkv", 3072, 2048), ("1B", "o", 2048, 2048),
                     ("1B", "gate/up", 16384, 2048), ("1B", "down", 2048, 8192)]
GEMV, MMA, DEQUANT = gemm_woq.AwqGemvConfig, gemm_woq.AwqMmaConfig, gemm_woq.AwqDequantConfig
# Rows per program (per thread: x reuse), warps, loop stages (groups in flight + 1; 1: plain loads), and how far
# K is split (programs per SM). Before the pipelined loop, 512 rows, 64 rows on one warp, no K split and ~1 or ~6
# programs per SM lost clearly (2026-11 H100 sweep); 2 to 3 per SM and 128 to 256 rows led.
AWQ_GEMV_SWEEP = (GEMV(128), GEMV(256), GEMV(256, num_warps=8), GEMV(128, num_stages=1), GEMV(256, num_stages=1),
                  GEMV(128, num_stages=2), GEMV(256, num_stages=2), GEMV(256, num_stages=4),
                  GEMV(128, programs_per_sm=2), GEMV(256, programs_per_sm=2), GEMV(128, programs_per_sm=5),
                  GEMV(256, programs_per_sm=5))
# M > 1: tensor-core tiles, and from M = 32 the dequantise + cuBLAS path, which decides DEQUANT_MIN_M.
AWQ_MMA_SWEEP = {8: (MMA(128, num_warps=8), MMA(64, 8, num_stages=4), MMA(programs_per_sm=4), MMA(split_k=1),
                     MMA(block_m=8)),
                 16: (MMA(128, num_warps=8), MMA(64, 8, num_stages=4), MMA(programs_per_sm=4), MMA(split_k=1)),
                 32: (MMA(block_m=32), MMA(128, block_m=32, num_warps=8), DEQUANT()),
                 64: (MMA(block_m=64), MMA(128, block_m=64, num_warps=8), DEQUANT())}


def awq_tag(cfg: gemm_woq.AwqKPackedConfig | None) -> str:
    def split(c):
        return f"split {c.split_k}" if c.split_k else f"~{c.programs_per_sm}/SM"
    if isinstance(cfg, GEMV):
        return f"gemv {cfg.block_n} {cfg.num_warps}wp {cfg.num_stages}st {split(cfg)}"
    if isinstance(cfg, MMA):
        return (f"mma {cfg.block_n}/{8 * cfg.block_kw}k/{cfg.block_m}m {cfg.num_warps}wp {cfg.num_stages}st "
                f"{split(cfg)}")
    return "dequant + cuBLAS" if isinstance(cfg, DEQUANT) else "default"


def awq_sweep_lines(ceil: Ceilings, model: str, layer: str, M: int, N: int, K: int,
                    configs: tuple, device: str = "cuda") -> list[str]:
    """The K-packed linear's default and each config on one pool of inputs, against the AutoAWQ-layout kernel
    and cuBLAS bf16; the fastest K-packed line is starred."""
    w_bytes = N * K // 2
    pool = itertools.cycle([kpacked_set(M, N, K, device)() for _ in range(num_sets(w_bytes))])
    head = f"{model} {layer:<7} M{M:<3} N{N:<5} K{K:<5}"
    times: dict[str, float] = {}
    lines: list[str] = []

    def time(tag: str, fn, make, bytes_: int) -> None:
        try:
            times[tag] = timed(fn, make, bytes_, rep=60)
        except (OutOfResources, CompilationError, RuntimeError, ValueError) as e:  # shared memory, say
            lines.append(f"{head} {tag:<44} failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}")
    time("cuBLAS bf16", lambda x, w: torch.matmul(x, w.t()), bf16_set(M, N, K), N * K * 2)
    time("linear_awq (AutoAWQ layout)", gemm_woq.linear_awq, awq_set(M, N, K), w_bytes)
    for cfg in (None, *configs):
        tag = awq_tag(cfg) if cfg else f"default = {awq_tag(gemm_woq.awq_kpacked_config(M, N, K, 128))}"
        time(tag, lambda x, w, cfg=cfg: gemm_woq.linear_awq_kpacked(x, w, config=cfg), lambda: next(pool),
             w_bytes)
    kpacked = [t for t in times if t not in ("cuBLAS bf16", "linear_awq (AutoAWQ layout)")]
    best = min(kpacked, key=times.__getitem__) if kpacked else None
    for tag, t in times.items():
        rate = w_bytes / t / 1e9
        lines.append(f"{head} {tag:<44} {t * 1e3:7.1f} us {rate:5.2f} TB/s w {rate / ceil.copy_tbs:4.0%}"
                     + (" *" if tag == best else ""))
    return lines


def awq_sweep(ceil: Ceilings, linears: list = AWQ_SWEEP_LINEARS, device: str = "cuda",
              ms: tuple[int, ...] = (1, *AWQ_MMA_SWEEP)) -> None:
    """K-packed W4A16 configs per shape: M = 1 GEMVs, then tensor-core tiles and dequantise + cuBLAS at M > 1
    (the rows of x in ms), printed as measured (TB/s of packed weight bytes, % of copy)."""
    print("# awq-sweep: gemv block_n, warps, loop stages, K split (auto: ~programs per SM); "
          "mma block_n/block_k/block_m, warps, stages", flush=True)
    for M, configs in ((1, AWQ_GEMV_SWEEP), *AWQ_MMA_SWEEP.items()):
        if M not in ms:
            continue
        for model, layer, N, K in linears:
            for line in awq_sweep_lines(ceil, model, layer, M, N, K, configs, device):
                print(line, flush=True)
            torch.cuda.empty_cache()


def make_pool(num_seqs: int, ctx: int, q_per_seq: int, H: int = 32, Hkv: int = 8, D: int = 128, bs: int = 16,
              kv_dtype: torch.dtype = BF16) -> dict:
    """A shuffled paged pool holding num_seqs contexts of ctx tokens, and q_per_seq new queries each."""
    blocks = num_seqs * triton.cdiv(ctx, bs)
    kp = torch.randn(blocks, bs, Hkv, D, device="cuda").to(kv_dtype)
    vp = torch.randn(blocks, bs, Hkv, D, device="cuda").to(kv_dtype)
    bt = torch.randperm(blocks, device="cuda", dtype=torch.int32).view(num_seqs, -1)
    lens = torch.full((num_seqs,), ctx, device="cuda", dtype=torch.int32)
    cu = torch.arange(0, num_seqs + 1, device="cuda", dtype=torch.int32) * q_per_seq
    q = torch.randn(num_seqs * q_per_seq, H, D, device="cuda", dtype=BF16)
    return dict(q=q, k_pool=kp, v_pool=vp, block_tables=bt, seq_lens=lens, cu_seqlens_q=cu)


def decode_args(B: int, ctx: int, kv_dtype: torch.dtype = BF16) -> Callable[[], tuple]:
    def make():
        p = make_pool(B, ctx, 1, kv_dtype=kv_dtype)
        return p["q"], p["k_pool"], p["v_pool"], p["block_tables"], p["seq_lens"]
    return make


def sdpa_decode_args(B: int, ctx: int) -> Callable[[], tuple]:
    return lambda: (torch.randn(B, 32, 1, 128, device="cuda", dtype=BF16),
                    torch.randn(B, 8, ctx, 128, device="cuda", dtype=BF16),
                    torch.randn(B, 8, ctx, 128, device="cuda", dtype=BF16))


def sdpa(q, k, v, causal=False):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)


def bench_attention(ceil: Ceilings, rows: list[Row], sweep: bool) -> None:
    for B, ctx in itertools.product((1, 8, 64), (512, 2048, 8192)):
        kv_bytes = B * ctx * 8 * 128 * 2 * 2
        t_torch = timed(sdpa, sdpa_decode_args(B, ctx), kv_bytes)
        configs = [None]
        if sweep and ctx == 2048:
            configs += [attention.DecodeAttnConfig(*c) for c in [(32, 0, 4, 2), (64, 0, 4, 3), (128, 0, 4, 2),
                                                                  (64, 0, 8, 2), (32, 0, 4, 4), (64, 256, 4, 3),
                                                                  (64, 1024, 4, 3)]]
        for cfg in configs:
            t = timed(lambda *a: attention.paged_decode_attention(*a, max_seq_len=ctx, config=cfg),
                      decode_args(B, ctx), kv_bytes)
            name = ("decode attn bf16" if cfg is None else
                    f"sweep decode {cfg.block_n}/{cfg.partition}/{cfg.num_warps}/{cfg.num_stages}")
            rows.append(Row(name, f"B{B} ctx{ctx}", t, f"{kv_bytes / t / 1e9:6.2f} TB/s",
                            kv_bytes / ceil.copy_tbs / 1e9 / t, t_torch, "torch = SDPA, contiguous bf16 KV"))
        if ctx == 2048:
            t8 = timed(lambda *a: attention.paged_decode_attention(*a, max_seq_len=ctx, k_scale=0.5, v_scale=0.5),
                       decode_args(B, ctx, gemm_fp8.FP8), kv_bytes // 2)
            rows.append(Row("decode attn fp8 kv", f"B{B} ctx{ctx}", t8, f"{kv_bytes / 2 / t8 / 1e9:6.2f} TB/s",
                            kv_bytes / 2 / ceil.copy_tbs / 1e9 / t8, t_torch, "torch = SDPA, contiguous bf16 KV"))
    for B, L in ((1, 4096), (8, 512), (2, 2048)):
        flops = 4 * 128 * 32 * B * (L * (L + 1) // 2)
        t_torch = timed(lambda q, k, v: sdpa(q, k, v, True),
                        lambda: (torch.randn(B, 32, L, 128, device="cuda", dtype=BF16),
                                 torch.randn(B, 8, L, 128, device="cuda", dtype=BF16),
                                 torch.randn(B, 8, L, 128, device="cuda", dtype=BF16)))
        configs = [None]
        if sweep:
            configs += [attention.PrefillAttnConfig(*c) for c in [(128, 128, 8, 3), (128, 64, 4, 3), (128, 32, 4, 4),
                                                                   (64, 64, 4, 3), (128, 128, 8, 2), (128, 64, 8, 4)]]
        for cfg in configs:
            def make():
                p = make_pool(B, L, L)
                return tuple(p[k] for k in ("q", "k_pool", "v_pool", "block_tables", "seq_lens", "cu_seqlens_q"))
            t = timed(lambda *a: attention.paged_prefill_attention(*a, max_seqlen_q=L, config=cfg), make)
            name = ("prefill attn bf16" if cfg is None else
                    f"sweep prefill {cfg.block_m}/{cfg.block_n}/{cfg.num_warps}/{cfg.num_stages}")
            rows.append(Row(name, f"{B}x{L} tokens", t, f"{flops / t / 1e9:6.0f} TFLOP/s",
                            flops / ceil.bf16_tflops / 1e9 / t, t_torch, "torch = SDPA causal, contiguous"))
        if L == 4096:
            def make8():
                p = make_pool(B, L, L, kv_dtype=gemm_fp8.FP8)
                return tuple(p[k] for k in ("q", "k_pool", "v_pool", "block_tables", "seq_lens", "cu_seqlens_q"))
            t = timed(lambda *a: attention.paged_prefill_attention(*a, max_seqlen_q=L, k_scale=0.5, v_scale=0.5),
                      make8)
            rows.append(Row("prefill attn fp8 kv", f"{B}x{L} tokens", t, f"{flops / t / 1e9:6.0f} TFLOP/s",
                            flops / ceil.bf16_tflops / 1e9 / t, t_torch, "torch = SDPA causal bf16"))


def bench_small_ops(ceil: Ceilings, rows: list[Row]) -> None:
    """Memory-bound fused ops against the same math in eager torch (the unfused form)."""
    for T, Hd in ((1, 4096), (64, 4096), (4096, 4096), (4096, 2048)):
        make = lambda: (torch.randn(T, Hd, device="cuda", dtype=BF16), torch.randn(Hd, device="cuda", dtype=BF16),
                        torch.randn(T, Hd, device="cuda", dtype=BF16))
        io = 4 * T * Hd * 2
        t = timed(lambda x, w, r: norm.rms_norm(x, w, 1e-5, residual=r), make, io)
        t_torch = timed(lambda x, w, r: norm.rms_norm_reference(x, w, 1e-5, residual=r), make, io)
        rows.append(Row("rmsnorm+residual", f"T{T} H{Hd}", t, f"{io / t / 1e9:6.2f} TB/s",
                        io / ceil.copy_tbs / 1e9 / t, t_torch, "torch = eager reference"))
    for T, F_ in ((1, 14336), (64, 14336), (4096, 14336)):
        io = 3 * T * F_ * 2
        make = lambda: (torch.randn(T, 2 * F_, device="cuda", dtype=BF16),)
        t = timed(activation.silu_mul, make, io)
        t_torch = timed(activation.silu_mul_reference, make, io)
        rows.append(Row("silu_mul", f"T{T} F{F_}", t, f"{io / t / 1e9:6.2f} TB/s", io / ceil.copy_tbs / 1e9 / t,
                        t_torch, "torch = eager reference"))
    cos, sin = rope.rope_cache(8192, 128, 500000.0, device="cuda")
    pool = make_pool(8, 8192, 1)
    for T in (1, 64, 4096):
        make = lambda: (torch.randn(T, 32, 128, device="cuda", dtype=BF16),
                        torch.randn(T, 8, 128, device="cuda", dtype=BF16),
                        torch.randn(T, 8, 128, device="cuda", dtype=BF16),
                        torch.randint(0, 8192, (T,), device="cuda"), cos, sin, pool["k_pool"], pool["v_pool"],
                        torch.randperm(8 * 8192, device="cuda")[:T])
        io = (2 * T * 32 * 128 + 4 * T * 8 * 128) * 2
        t = timed(rope.rope_kv_write, make, io)
        rows.append(Row("rope+kv write", f"T{T}", t, f"{io / t / 1e9:6.2f} TB/s", io / ceil.copy_tbs / 1e9 / t,
                        None, "torch reference syncs (not graphable)"))
    for B in (1, 8, 64):
        make = lambda: (torch.randn(B, 128256, device="cuda") * 4, torch.full((B,), 0.8, device="cuda"),
                        torch.full((B,), 50, device="cuda", dtype=torch.int32), torch.full((B,), 0.9, device="cuda"),
                        torch.full((B,), 0.05, device="cuda"))
        io = 2 * B * 128256 * 4
        t = timed(sampling.filter_logits, make, io)
        t_torch = timed(sampling.filter_logits_reference, make, io)
        rows.append(Row("sampling filter", f"B{B} V128256", t, f"{io / t / 1e9:6.2f} TB/s",
                        io / ceil.copy_tbs / 1e9 / t, t_torch, "torch = sort-based reference"))


# ---------------------------------------------------------------- correctness on the GPU
def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(out.float()).all():
        return float("inf")
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp(min=1e-30)).item()


def poisoned(shape, dtype) -> torch.Tensor:
    return torch.full(shape, float("nan"), device="cuda", dtype=dtype)


# The swap-AB decode form at the odd shape: one program row, and a K split with two 8-column x tiles at M = 16.
SWAP_CHECKS = (gemm.DecodeConfig(64, 128, 1, swap_ab=True),
               gemm.DecodeConfig(128, 256, 3, num_stages=3, block_m=8, swap_ab=True))


# K-packed W4A16 at the odd shape (N 1000, 9 groups), by M (1; 3 and 16; 200). GEMV: the pipelined loop over 3
# splits, plain loads in one split, 4 stages with a tail split (5 + 4 groups), one group per program (9 partials
# summed by the last); the tensor-core kernel at M = 1; MMA split over K, two x tiles at M = 16, 64-row x tiles.
KPACKED_CHECKS = {1: (GEMV(128, split_k=3), GEMV(64, num_warps=2, num_stages=1, split_k=1),
                      GEMV(256, num_warps=8, num_stages=4, split_k=2), GEMV(128, num_stages=2, split_k=9),
                      MMA(split_k=2)),
                  3: (MMA(128, 8, num_warps=8, split_k=3), MMA(block_m=8), MMA(64, 16, block_m=64), DEQUANT())}


def check_kpacked(results: list[tuple[str, float, float]]) -> None:
    """K-packed W4A16 at the 8B shapes and an odd one (N 1000, 9 groups), by M, into NaN-poisoned outputs: the
    default path of each, the KPACKED_CHECKS configs and f16 at the odd shape; then repeated split-K calls."""
    for (model, layer, N, K), M in itertools.product(LINEARS[:4] + [("odd", "odd", 1000, 1152)], (1, 3, 16, 200)):
        q = gemm_woq.awq_pack(torch.randint(0, 16, (K, N), device="cuda"))
        z = gemm_woq.awq_pack(torch.randint(0, 16, (K // 128, N), device="cuda"))
        s = (torch.rand(K // 128, N, device="cuda") * 0.01 + 0.001).to(BF16)
        x = torch.randn(M, K, device="cuda", dtype=BF16)
        kp, ref = gemm_woq.awq_kpack(q, z, s), gemm_woq.linear_awq_reference(x, q, z, s)
        for cfg in (None, *(KPACKED_CHECKS[min(M, 3)] if model == "odd" else ())):
            out = gemm_woq.linear_awq_kpacked(x, kp, out=poisoned((M, N), BF16), config=cfg)
            results.append((f"awq kpacked {awq_tag(cfg)} M{M} N{N} K{K}", rel_err(out, ref), 1e-2))
        if model == "odd":  # f16 activations and scales
            x16, s16 = x.half(), s.half()
            out = gemm_woq.linear_awq_kpacked(x16, gemm_woq.awq_kpack(q, z, s16), out=poisoned((M, N), torch.float16))
            results.append((f"awq kpacked f16 M{M} N{N} K{K}",
                            rel_err(out, gemm_woq.linear_awq_reference(x16, q, z, s16)), 2e-3))
    check_kpacked_split_calls(results)


def check_kpacked_split_calls(results: list[tuple[str, float, float]]) -> None:
    """Split-K K-packed launches called again and again, eagerly and replayed from a CUDA graph, each time on new x
    into a NaN-poisoned output: the last program of a column block sums the splits and zeroes its counter, so every
    later call finds the counters at zero."""
    N, K = 1000, 1152
    q = gemm_woq.awq_pack(torch.randint(0, 16, (K, N), device="cuda"))
    z = gemm_woq.awq_pack(torch.randint(0, 16, (K // 128, N), device="cuda"))
    s = (torch.rand(K // 128, N, device="cuda") * 0.01 + 0.001).to(BF16)
    w = gemm_woq.awq_kpack(q, z, s)

    def add(name: str, x: torch.Tensor, out: torch.Tensor) -> None:
        results.append((name, rel_err(out, gemm_woq.linear_awq_reference(x, q, z, s)), 1e-2))
    for M, cfg in ((1, GEMV(128, split_k=3)), (3, MMA(split_k=3))):
        for i in range(3):
            x = torch.randn(M, K, device="cuda", dtype=BF16)
            add(f"awq kpacked {awq_tag(cfg)} M{M} call {i + 1}", x,
                gemm_woq.linear_awq_kpacked(x, w, out=poisoned((M, N), BF16), config=cfg))
        x, out = torch.randn(M, K, device="cuda", dtype=BF16), poisoned((M, N), BF16)
        gemm_woq.linear_awq_kpacked(x, w, out=out, config=cfg)  # compiles outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            gemm_woq.linear_awq_kpacked(x, w, out=out, config=cfg)
        for i in range(3):
            x.copy_(torch.randn(M, K, device="cuda", dtype=BF16))
            out.fill_(float("nan"))
            graph.replay()
            add(f"awq kpacked {awq_tag(cfg)} M{M} graph replay {i + 1}", x, out)
    torch.cuda.synchronize()
    results.append(("awq kpacked split-K counters left at 0 (sum)", float(split_k._TICKETS[x.device].sum()), 0.0))


def check(results: list[tuple[str, float, float]]) -> None:
    """Each kernel at real shapes (and odd ones) into NaN-poisoned outputs, against its reference."""
    def add(name: str, out: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
        results.append((name, rel_err(out, ref), tol))
    for (model, layer, N, K), M in itertools.product(LINEARS[:4] + [("odd", "odd", 1000, 1200)], (1, 3, 16, 200)):
        x, w = torch.randn(M, K, device="cuda", dtype=BF16), torch.randn(N, K, device="cuda", dtype=BF16)
        add(f"bf16 M{M} N{N} K{K}", gemm.linear(x, w, out=poisoned((M, N), BF16)), gemm.linear_reference(x, w), 1e-2)
        if M > gemm.DECODE_MAX_M:
            add(f"bf16 prefill M{M} N{N} K{K}", gemm.linear_prefill(x, w, out=poisoned((M, N), BF16)),
                gemm.linear_reference(x, w), 1e-2)
        swaps = SWAP_CHECKS if model == "odd" and M <= gemm.DECODE_MAX_M else ()
        for cfg in swaps:
            add(f"bf16 swap-AB {decode_tag(cfg)} M{M} N{N} K{K}",
                gemm.linear_decode(x, w, out=poisoned((M, N), BF16), config=cfg), gemm.linear_reference(x, w), 1e-2)
        for per_row in (False, True):
            xq, xs = gemm_fp8.quantize_fp8(x.float(), per_row)
            wq, ws = gemm_fp8.quantize_fp8(w.float(), per_row)
            for cfg in (None, *swaps):
                add(f"fp8 {'row' if per_row else 'tensor'}{' swap-AB ' + decode_tag(cfg) if cfg else ''} M{M} N{N} K{K}",
                    gemm_fp8.linear_fp8(xq, wq, xs, ws, out=poisoned((M, N), BF16), config=cfg),
                    gemm_fp8.linear_fp8_reference(xq, wq, xs, ws), 1e-2)
        q = gemm_woq.awq_pack(torch.randint(0, 16, (K // 128 * 128, N // 8 * 8), device="cuda"))
        z = gemm_woq.awq_pack(torch.randint(0, 16, (K // 128, N // 8 * 8), device="cuda"))
        s = (torch.rand(K // 128, N // 8 * 8, device="cuda") * 0.01 + 0.001).to(BF16)
        xa = x[:, :K // 128 * 128].contiguous()
        add(f"awq M{M} N{N // 8 * 8} K{K // 128 * 128}",
            gemm_woq.linear_awq(xa, q, z, s, out=poisoned((M, N // 8 * 8), BF16)),
            gemm_woq.linear_awq_reference(xa, q, z, s), 1e-2)
        wq8 = torch.randint(-127, 128, (N, K), device="cuda", dtype=torch.int8)
        ws8 = torch.rand(N, device="cuda") * 0.01
        for cfg in (None, *swaps):
            add(f"w8a16{' swap-AB ' + decode_tag(cfg) if cfg else ''} M{M} N{N} K{K}",
                gemm_woq.linear_w8a16(x, wq8, ws8, out=poisoned((M, N), BF16), config=cfg),
                gemm_woq.linear_w8a16_reference(x, wq8, ws8), 1e-2)
    check_kpacked(results)
    for B, ctx, q_per_seq in ((1, 8192, 1), (8, 2048, 1), (64, 2048, 1), (3, 1000, 1), (2, 1500, 700), (1, 4096, 4096)):
        for kv_dtype in (BF16, gemm_fp8.FP8):
            p = make_pool(B, ctx, q_per_seq, kv_dtype=kv_dtype)
            p["seq_lens"] = torch.randint(max(q_per_seq, ctx // 2), ctx + 1, (B,), device="cuda", dtype=torch.int32)
            p["seq_lens"][0] = ctx
            ref = attention.paged_attention_reference(**p, k_scale=0.5, v_scale=0.5)
            tag = f"B{B} ctx{ctx} q{q_per_seq} {'fp8' if kv_dtype != BF16 else 'bf16'}"
            if q_per_seq == 1:
                out = attention.paged_decode_attention(p["q"], p["k_pool"], p["v_pool"], p["block_tables"],
                                                       p["seq_lens"], k_scale=0.5, v_scale=0.5,
                                                       out=poisoned(p["q"].shape, BF16))
                add(f"decode attn {tag}", out, ref, 2e-2)
            out = attention.paged_prefill_attention(**p, k_scale=0.5, v_scale=0.5, out=poisoned(p["q"].shape, BF16))
            add(f"prefill attn {tag}", out, ref, 2e-2)
    for T, Hd in ((1, 4096), (77, 2048), (4096, 4096)):
        x, res = torch.randn(T, Hd, device="cuda", dtype=BF16), torch.randn(T, Hd, device="cuda", dtype=BF16)
        w = torch.randn(Hd, device="cuda", dtype=BF16)
        y, r = norm.rms_norm(x, w, 1e-5, residual=res, out=poisoned((T, Hd), BF16),
                             residual_out=poisoned((T, Hd), BF16))
        y_ref, r_ref = norm.rms_norm_reference(x, w, 1e-5, residual=res)
        add(f"rmsnorm T{T} H{Hd}", y, y_ref, 1e-2)
        add(f"rmsnorm residual T{T} H{Hd}", r, r_ref, 1e-2)
        gu = torch.randn(T, 2 * Hd + 6, device="cuda", dtype=BF16)
        add(f"silu_mul T{T} F{Hd + 3}", activation.silu_mul(gu, out=poisoned((T, Hd + 3), BF16)),
            activation.silu_mul_reference(gu), 1e-2)
    for T in (1, 37, 4096):
        for kv_dtype in (BF16, gemm_fp8.FP8):
            p = make_pool(4, 2048, 1, kv_dtype=kv_dtype)
            q = torch.randn(T, 32, 128, device="cuda", dtype=BF16)
            k, v = torch.randn(T, 8, 128, device="cuda", dtype=BF16), torch.randn(T, 8, 128, device="cuda", dtype=BF16)
            cos, sin = rope.rope_cache(8192, 128, 500000.0, device="cuda")
            pos = torch.randint(0, 8192, (T,), device="cuda")
            slots = torch.randperm(p["k_pool"].shape[0] * 16, device="cuda")[:T]
            kp2, vp2 = p["k_pool"].clone(), p["v_pool"].clone()
            q_ref = rope.rope_kv_write_reference(q, k, v, pos, cos, sin, kp2, vp2, slots, 0.5, 0.5)
            q_out = rope.rope_kv_write(q, k, v, pos, cos, sin, p["k_pool"], p["v_pool"], slots, 0.5, 0.5,
                                       out=poisoned(q.shape, BF16))
            tag = f"T{T} {'fp8' if kv_dtype != BF16 else 'bf16'}"
            add(f"rope q {tag}", q_out, q_ref, 1e-2)
            add(f"rope k pool {tag}", p["k_pool"].float(), kp2.float(), 2e-2)
            add(f"rope v pool {tag}", p["v_pool"].float(), vp2.float(), 2e-2)
    for B, V in ((1, 128256), (8, 32000), (64, 128256)):
        logits = torch.randn(B, V, device="cuda") * 3
        temp = torch.rand(B, device="cuda") + 0.5
        top_k = torch.randint(1, 200, (B,), device="cuda", dtype=torch.int32)
        top_p = torch.rand(B, device="cuda") * 0.5 + 0.5
        min_p = torch.rand(B, device="cuda") * 0.1
        out = sampling.filter_logits(logits, temp, top_k, top_p, min_p)
        ref = sampling.filter_logits_reference(logits, temp, top_k, top_p, min_p)
        kept, kept_ref = torch.isfinite(out), torch.isfinite(ref)
        mismatch = (kept != kept_ref).sum().item() / max(kept_ref.sum().item(), 1)
        results.append((f"sampling B{B} V{V} kept-set mismatch", mismatch, 1e-2))
        add(f"sampling B{B} V{V} kept values", out[kept & kept_ref], ref[kept & kept_ref], 1e-5)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", nargs="?", const="all", choices=("all", "kpacked"),
                    help="GPU correctness at real shapes, then exit (kpacked: the K-packed W4A16 paths alone)")
    ap.add_argument("--only", default="gemm,attn,small",
                    help="comma list of gemm, sweep, decode-sweep, served-sweep, awq-sweep, attn, small")
    ap.add_argument("--formats", default=",".join(DECODE_FORMATS),
                    help="weight formats timed by decode-sweep (comma list of bf16, fp8, w8a16)")
    ap.add_argument("--sweep", action="store_true", help="also time alternative attention configs")
    ap.add_argument("--awq-m", default="1,8,16,32,64", help="rows of x that awq-sweep times (comma list)")
    args = ap.parse_args(argv)
    if unknown := set(args.formats.split(",")) - set(DECODE_FORMATS):
        ap.error(f"--formats: unknown {sorted(unknown)}; choose from {', '.join(DECODE_FORMATS)}")
    if unknown := set(args.awq_m.split(",")) - {str(m) for m in (1, *AWQ_MMA_SWEEP)}:
        ap.error(f"--awq-m: no configs for {sorted(unknown)}; choose from 1, {', '.join(map(str, AWQ_MMA_SWEEP))}")
    torch.manual_seed(0)
    print(f"# {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    if args.check:
        results: list[tuple[str, float, float]] = []
        try:
            (check if args.check == "all" else check_kpacked)(results)
        except Exception:
            traceback.print_exc()
            results.append(("check raised", float("inf"), 0.0))
        bad = [r for r in results if not r[1] <= r[2]]
        for name, err, tol in results:
            print(f"{'FAIL' if (name, err, tol) in bad else 'ok  '} {name:<48} rel err {err:.2e} (tol {tol:.0e})")
        print(f"# check: {len(results) - len(bad)}/{len(results)} passed")
        return 1 if bad else 0
    ceil = measure_ceilings()
    print(f"# ceilings: copy {ceil.copy_tbs:.2f} TB/s (read+write), bf16 matmul {ceil.bf16_tflops:.0f} TFLOP/s, "
          f"fp8 _scaled_mm {ceil.fp8_tflops:.0f} TFLOP/s")
    rows: list[Row] = []
    only = args.only.split(",")
    sections = {"gemm": lambda: bench_gemm(ceil, rows),
                "sweep": lambda: sweep(ceil, rows),
                "decode-sweep": lambda: decode_sweep(ceil, args.formats.split(",")),
                "served-sweep": lambda: decode_sweep(ceil, args.formats.split(","), served=True),
                "awq-sweep": lambda: awq_sweep(ceil, ms=tuple(int(m) for m in args.awq_m.split(","))),
                "attn": lambda: bench_attention(ceil, rows, args.sweep),
                "small": lambda: bench_small_ops(ceil, rows)}
    for name in only:
        try:
            sections[name]()
        except Exception:  # keep the rows measured so far
            traceback.print_exc()
        torch.cuda.empty_cache()
    print("# roof = roofline time (max of bytes / copy bandwidth, flops / matmul peak) over measured time;")
    print("# TB/s w = weight bytes per second; speedup = torch time / kiln time")
    print(HEADER)
    for r in rows:
        print(r.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Paged decode attention configs at the batch shapes serving runs: 512 sequences with 128 to 256 tokens
of context (the 8B shape's 128/128 maximum load) and 64 sequences of 2048 (issue 6's target shape).
Prints time, KV bytes read per second and the fraction of the copy bandwidth, per config.

    python benchmarks/decode_attention_sweep.py [--batches 512,64] [--kv fp8]
"""

import argparse
import itertools

import torch
from kiln.kernels import attention
from kiln.kernels.bench import measure_ceilings, timed

BF16 = torch.bfloat16
SHAPES = {512: (128, 256), 64: (2048, 2048)}  # sequences: (shortest, longest) context
H, HKV, D, BLOCK = 32, 8, 128, 16  # Llama-3.1-8B's heads; the engine's 16-token blocks


def make(batch: int, lo: int, hi: int, seed: int, kv_dtype: torch.dtype = BF16):
    g = torch.Generator(device="cuda").manual_seed(seed)
    lens = torch.randint(lo, hi + 1, (batch,), device="cuda", generator=g, dtype=torch.int32)
    per_seq = -(-hi // BLOCK)
    pool = [torch.randn(batch * per_seq, BLOCK, HKV, D, device="cuda", generator=g, dtype=BF16).to(kv_dtype)
            for _ in range(2)]
    tables = torch.randperm(batch * per_seq, device="cuda", generator=g).to(torch.int32).view(batch, per_seq)
    q = torch.randn(batch, H, D, device="cuda", generator=g, dtype=BF16)
    return (q, *pool, tables, lens), int(lens.sum()) * HKV * D * 2 * pool[0].element_size()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batches", default="512,64")
    p.add_argument("--kv", choices=("bf16", "fp8"), default="bf16", help="the KV pool's dtype")
    args = p.parse_args()
    kv_dtype = BF16 if args.kv == "bf16" else torch.float8_e4m3fn
    copy = measure_ceilings().copy_tbs
    print(f"# {torch.cuda.get_device_name()}, {args.kv} KV: copy {copy:.2f} TB/s; us, TB/s of KV read, % of copy; "
          f"config block_n/warps/stages")
    for batch in (int(b) for b in args.batches.split(",")):
        lo, hi = SHAPES[batch]
        sets = [make(batch, lo, hi, seed, kv_dtype) for seed in range(4)]
        kv_bytes = sum(b for _, b in sets) / len(sets)
        pool = itertools.cycle([s for s, _ in sets])
        results = []
        for bn, nw, ns in itertools.product((32, 64, 128), (2, 4, 8), (2, 3, 4)):
            cfg = attention.DecodeAttnConfig(block_n=bn, num_warps=nw, num_stages=ns)
            try:
                t = timed(lambda *a, cfg=cfg, hi=hi: attention.paged_decode_attention(*a, max_seq_len=hi, config=cfg),
                          lambda pool=pool: next(pool), int(kv_bytes))
            except Exception as e:  # noqa: BLE001  (over the shared-memory limit, say)
                print(f"B{batch} {bn}/{nw}/{ns}: {type(e).__name__}")
                continue
            results.append((t, cfg))
        default = attention.decode_attention_config(kv_dtype.itemsize)
        for t, cfg in sorted(results, key=lambda r: r[0])[:6] + [r for r in results if r[1] == default]:
            tag = " (default)" if cfg == default else ""
            print(f"B{batch} ctx {lo}-{hi}  {cfg.block_n}/{cfg.num_warps}/{cfg.num_stages}{tag:<10} {t * 1e3:7.1f} us "
                  f"{kv_bytes / t / 1e9:5.2f} TB/s {kv_bytes / t / 1e9 / copy:5.1%}", flush=True)


if __name__ == "__main__":
    main()

"""Where a decode step's GPU time goes: per-kernel times of eager decode steps (torch.profiler) and
the replay time of the captured step, for one of kiln bench's model shapes.

    python benchmarks/profile_decode.py llama-3.2-1b --batch 1 --context 256
"""

import argparse

import torch
from kiln.api import compile as kiln_compile
from kiln.backends import StepInfo
from kiln.backends import cuda as cuda_backend
from kiln.tools.bench import make_model


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args()
    model, source = make_model(args.model, "cuda", torch.bfloat16)
    compiled = kiln_compile(source, target="cuda", progress=False)
    exe = compiled.executable()
    graph = compiled.graph
    block = graph.inputs[7].type.shape[1]
    b, ctx = args.batch, args.context
    blocks_per_seq = -(-ctx // block)
    caches = [torch.randn(b * blocks_per_seq + 1, block, *v.type.shape[2:], device="cuda").to(v.type.dtype.torch)
              for v in graph.inputs[7:]]
    i32 = dict(dtype=torch.int32)
    tables = torch.arange(b * blocks_per_seq, **i32).reshape(b, blocks_per_seq)
    meta = [torch.randint(0, 1000, (b,), **i32), torch.full((b,), ctx - 1, **i32),
            (tables[:, -1].long() * block + (ctx - 1) % block), tables, torch.full((b,), ctx, **i32),
            torch.arange(b + 1, **i32), torch.arange(b, dtype=torch.int64)]
    step = StepInfo(b, b, 1, ctx)
    for _ in range(3):
        exe(*meta, *caches, step=step)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(20):
        start.record()
        exe(*meta, *caches, step=step)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    weights = sum(t.numel() * t.element_size() for t in {id(t): t for t in exe.params.values()}.values())
    print(f"captured decode step, batch {b}, context {ctx}: median {times[len(times) // 2]:.3f} ms "
          f"(weights {weights / 1e9:.2f} GB -> {weights / 1e9 / times[len(times) // 2]:.2f} TB/s); stats {exe.stats}")
    eager = cuda_backend.compile(graph, device="cuda", cuda_graphs=False, progress=False)
    dev_meta = [t.cuda() for t in meta]
    for _ in range(2):
        eager.run_program([*dev_meta, *caches], step)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            eager.run_program([*dev_meta, *caches], step)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))


if __name__ == "__main__":
    main()

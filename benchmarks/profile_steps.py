"""Where a step's time goes on the GPU: per kernel, for a prefill step and for decode steps at given
batch sizes, next to the step's wall time on the host.

    python benchmarks/profile_steps.py llama-3.1-8b --prompt 128 --batches 1,512 [--quant fp8]

Random weights made on the GPU (kiln bench's shapes); needs a CUDA GPU."""
from __future__ import annotations

import argparse
import contextlib
import time
from collections import defaultdict

import torch


def kernel_table(prof: torch.profiler.profile, steps: int, top: int) -> tuple[float, int, list[str]]:
    """(GPU kernel ms per step, kernels per step, the top kernels' lines) from a profile of `steps` steps."""
    total: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            total[e.name] += e.device_time_total / 1e3
            count[e.name] += 1
    ms = sum(total.values()) / steps
    lines = [f"  {t / steps:8.3f} ms {count[k] // steps:5d}x  {k[:90]}"
             for k, t in sorted(total.items(), key=lambda kv: -kv[1])[:top]]
    return ms, sum(count.values()) // steps, lines


def host_profile(fn, top: int) -> None:
    """The host functions that cost most while `fn` runs (own time, cProfile)."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.runcall(fn)
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    print("\n".join(line for line in out.getvalue().splitlines()[4:] if line.strip()))


def host_by_op(exe, fn, top: int) -> None:
    """Host time per op kind of the eager program while `fn` runs (the GPU is not waited on)."""
    from kiln.backends import cuda

    spent: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    original = cuda._Instr

    def timed(ins):
        def run(ctx, *a, **k):
            t0 = time.perf_counter()
            out = fn0(ctx, *a, **k)
            spent[ins.text] += time.perf_counter() - t0
            count[ins.text] += 1
            return out
        fn0 = ins.fn
        return original(run, ins.reference, ins.args, ins.attrs, ins.results, ins.free, ins.text)

    if not hasattr(exe, "program"):
        return
    program = exe.program
    exe.program = [timed(ins) for ins in program]
    t0 = time.perf_counter()
    fn()
    wall = time.perf_counter() - t0
    exe.program = program
    print(f"host by op: {1e3 * sum(spent.values()):.2f} ms in ops of {1e3 * wall:.2f} ms wall")
    for k, t in sorted(spent.items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {1e3 * t:8.3f} ms {count[k]:5d}x  {k}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--batches", default="1,512")
    p.add_argument("--quant", default=None)
    p.add_argument("--top", type=int, default=14)
    p.add_argument("--steps", type=int, default=4, help="decode steps profiled per batch size")
    p.add_argument("--decode-before", type=int, default=3,
                   help="decode steps run before the measured ones (64: contexts grow as in a 128/128 run, and "
                        "the blocks each sequence gains interleave with the other sequences' in the pool)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--seed", type=int, default=0, help="random weights and calibration token ids")
    p.add_argument("--host", type=int, default=0, help="also print the N costliest host functions (cProfile)")
    args = p.parse_args()

    from kiln.api import compile as kiln_compile
    from kiln.runtime.config import BuildConfig
    from kiln.runtime.engine import Engine
    from kiln.runtime.sampling import SamplingParams
    from kiln.tools.bench import bench_quant, make_model

    model, source = make_model(args.model, args.device, torch.bfloat16, args.seed)
    vocab = model.config.vocab_size
    target = "cuda" if args.device == "cuda" else "reference"
    compiled = kiln_compile(source, target=target, quant=bench_quant(args, vocab), progress=False)
    batches = [int(b) for b in args.batches.split(",")]
    max_tokens = max(64, args.decode_before + 2 * args.steps + 8)
    engine = Engine(compiled.graph, compiled.executable(), device=compiled.device,
                    build_config=BuildConfig(max_batch_size=max(batches), max_num_tokens=8192,
                                             max_seq_len=args.prompt + max_tokens))
    gen = torch.Generator().manual_seed(0)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)

    def add(n: int) -> None:
        for ids in torch.randint(0, vocab, (n, args.prompt), generator=gen).tolist():
            engine.add_request(f"r{engine.steps}-{len(engine.requests)}-{time.perf_counter_ns()}", ids, params)

    def sync() -> None:
        if args.device == "cuda":
            torch.cuda.synchronize()

    def drain() -> None:
        while engine.has_work:
            engine.step()

    add(1)
    drain()  # warm: Triton compiles, graphs capture
    print(f"== {args.model} quant {args.quant}: prefill of one {args.prompt}-token prompt")
    activity = [torch.profiler.ProfilerActivity.CUDA if args.device == "cuda" else torch.profiler.ProfilerActivity.CPU]
    walls = []
    for profiled in (False, False, True):  # wall time unprofiled (twice: the first warms), then the kernels
        add(1)
        sync()
        with torch.profiler.profile(activities=activity) if profiled else contextlib.nullcontext() as prof:
            t0 = time.perf_counter()
            engine.step()
            sync()
            walls.append(1e3 * (time.perf_counter() - t0))
        drain()
    ms, n, lines = kernel_table(prof, 1, args.top)
    print(f"wall {walls[1]:.2f} ms, GPU kernels {ms:.2f} ms in {n} kernels")
    print("\n".join(lines))
    if args.host:
        add(1)
        sync()
        host_profile(lambda: (engine.step(), sync()), args.host)
        drain()
        add(1)
        sync()
        host_by_op(engine.executable, lambda: (engine.step(), sync()), args.host)
        drain()
    drain()
    for b in batches:
        add(b)
        while any(s.num_computed < len(s.prompt_ids) for s in engine.scheduler.running) or engine.scheduler.waiting:
            engine.step()
        for _ in range(args.decode_before):  # decode graphs of this batch captured (and contexts grown), then measured
            engine.step()
        sync()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        sync()
        wall = 1e3 * (time.perf_counter() - t0) / args.steps
        with torch.profiler.profile(activities=activity) as prof:
            for _ in range(args.steps):
                engine.step()
            sync()
        ms, n, lines = kernel_table(prof, args.steps, args.top)
        print(f"== decode at batch {b}: wall {wall:.2f} ms/step, GPU kernels {ms:.2f} ms in {n} kernels")
        print("\n".join(lines))
        if args.host:
            host_profile(lambda: [engine.step() for _ in range(args.steps)], args.host)
        drain()


if __name__ == "__main__":
    main()

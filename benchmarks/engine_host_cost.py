"""The engine's host cost per step, without a model: how long `Engine.step` takes in Python when the
executable does no work, which is the time the GPU waits on at maximum load once it exceeds the step.

    python benchmarks/engine_host_cost.py [--requests 512] [--prompt 128] [--output 128] [--gc-freeze] [--profile 20]

The executable stands in for the cuda backend's (`host_inputs`, `step=`): it returns rows of a
preallocated random logits tensor (a small vocabulary, and torch on one thread, so that the CPU
sampling kernels cost next to nothing) and the engine runs as it does on the GPU: overlapped, greedy,
512 requests submitted at once, streamed (an output per request per step) and not (`stream=False`).
Reported: host ms per decode step at full batch (mean, and median: the mean includes the garbage
collector's pauses, counted beside) and per mixed step (prefill chunks), for the overlapped path and
the synchronous one, pooled over --repeats runs, as CPU time of the engine's thread (what a step
costs, whatever else the machine runs) and as wall time. CPU only; the numbers compare versions of
the engine on one machine."""
from __future__ import annotations

import argparse
import cProfile
import gc
import io
import pstats
import statistics
import time
from dataclasses import dataclass, field

import torch

VOCAB = 32  # the logits' width: small, as the sampling kernels run on the CPU here and on the GPU in serving
PROFILED_STEPS = 4


@dataclass
class NullExecutable:
    """Returns the logits rows the step asks for, with no model work; records each step's shape."""

    logits: torch.Tensor
    host_inputs: bool = True
    steps: list = field(default_factory=list)

    def __call__(self, tokens, positions, slots, tables, lens, starts, rows, *caches, step=None):
        self.steps.append(step)
        return [self.logits[: len(rows)]]


def serving_graph(max_len: int):
    """The serving graph of a tiny random Llama: the engine reads only its inputs (metadata, caches)."""
    import transformers
    from kiln.api import compile as kiln_compile

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1,
                                      max_position_embeddings=max_len + 16)
    return kiln_compile(transformers.LlamaForCausalLM(config).eval(), target="reference", progress=False).graph


class FullCollections:
    """The garbage collector's full (oldest generation) collections while it is on: how many, how long."""

    def __init__(self) -> None:
        self.count, self.ms, self._start = 0, 0.0, 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.count += 1
            self.ms += 1e3 * (time.perf_counter() - self._start)


def run(graph, args, overlap: bool, stream: bool, profile: int = 0) -> dict[str, list[tuple[float, float]]]:
    """Serve the workload once; per step kind (decode at full batch, mixed), each step's host ms as
    (CPU time of this thread, wall time)."""
    from kiln.runtime.config import BuildConfig, KvCacheConfig
    from kiln.runtime.engine import Engine
    from kiln.runtime.sampling import SamplingParams

    exe = NullExecutable(torch.randn(args.max_num_tokens, VOCAB, generator=torch.Generator().manual_seed(0)))
    longest = args.prompt + args.output
    engine = Engine(graph, exe, overlap=overlap,
                    kv_cache_config=KvCacheConfig(max_tokens=args.requests * (longest + 16)),
                    build_config=BuildConfig(max_batch_size=args.requests, max_num_tokens=args.max_num_tokens,
                                             max_seq_len=longest + 1))
    gen = torch.Generator().manual_seed(1)
    params = SamplingParams(max_tokens=args.output, temperature=0.0, ignore_eos=True)
    for i, ids in enumerate(torch.randint(0, VOCAB, (args.requests, args.prompt), generator=gen).tolist()):
        engine.add_request(f"r{i}", ids, params, stream=stream)
    times: dict[str, list[tuple[float, float]]] = {"decode": [], "mixed": []}
    prof = cProfile.Profile() if profile else None
    while engine.has_work:
        before = len(exe.steps)
        full = len(engine.scheduler.running) == args.requests and not engine.scheduler.waiting
        if prof is not None and full and 8 <= len(times["decode"]) < 8 + PROFILED_STEPS:
            prof.enable()
        c0, t0 = time.thread_time(), time.perf_counter()
        engine.step()
        c1, t1 = time.thread_time(), time.perf_counter()
        if prof is not None:
            prof.disable()
        if len(exe.steps) == before:
            continue  # only read the last pending tokens
        step = exe.steps[-1]
        kind = "mixed" if not step.is_decode else "decode" if step.num_seqs == args.requests else None
        if kind is not None:
            times[kind].append((1e3 * (c1 - c0), 1e3 * (t1 - t0)))
    assert not engine.requests and all(r == 0 for r in engine.pool.refs), "the workload did not finish cleanly"
    if prof is not None:
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(profile)
        print(out.getvalue())
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=512, help="requests, all submitted at once (= max batch size)")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--output", type=int, default=128)
    p.add_argument("--max-num-tokens", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=5, help="runs per case, pooled")
    p.add_argument("--gc-freeze", action="store_true",
                   help="gc.freeze() after start-up (as vLLM's engine does): full collections then skip the start-up heap")
    p.add_argument("--profile", type=int, default=0,
                   help="then cProfile 4 full-batch decode steps of the overlapped streamed run: print the N costliest "
                        "functions")
    args = p.parse_args()
    torch.set_num_threads(1)  # the engine's thread does all the work: its CPU time is the host cost
    graph = serving_graph(args.prompt + args.output)
    if args.gc_freeze:
        gc.collect()
        gc.freeze()
    full = FullCollections()
    print(f"{args.requests} requests {args.prompt}/{args.output}, greedy, max {args.max_num_tokens} tokens a step, "
          f"{args.repeats} runs a case: host ms per step, as CPU time of the engine's thread (wall time beside)")
    print(f"{'path':<12} {'outputs':<10} | {'decode':>6} {'median':>6} {'wall':>6} | {'mixed':>6} {'wall':>6} | "
          f"full GCs (ms)")
    for overlap in (True, False):
        for stream in (True, False):
            count, ms = full.count, full.ms
            runs = [run(graph, args, overlap, stream) for _ in range(args.repeats)]
            decode = [t for r in runs for t in r["decode"]]
            mixed = [t for r in runs for t in r["mixed"]]
            print(f"{'overlapped' if overlap else 'synchronous':<12} {'streamed' if stream else 'final only':<10} | "
                  f"{statistics.mean(c for c, _ in decode):6.2f} {statistics.median(c for c, _ in decode):6.2f} "
                  f"{statistics.mean(w for _, w in decode):6.2f} | {statistics.mean(c for c, _ in mixed):6.2f} "
                  f"{statistics.mean(w for _, w in mixed):6.2f} | {full.count - count} ({full.ms - ms:.0f})")
    print(f"steps a run: {len(runs[-1]['decode'])} decode at batch {args.requests}, {len(runs[-1]['mixed'])} mixed")
    if args.profile:
        run(graph, args, True, True, profile=args.profile)
    gc.unfreeze()  # (frozen objects are not freed at exit: native extensions would report leaks)


if __name__ == "__main__":
    main()

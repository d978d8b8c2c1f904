"""`kiln bench`: serving speed of a model on a target, in the spirit of trtllm-bench, with the
baselines a user has on the same GPU measured in the same process on the same weights.

    kiln bench llama-3.1-8b --compare --json bench.json --markdown bench.md
    kiln bench smollm2 --target reference --batches 1 --workloads 32/16 --requests 8   # a CPU smoke run

For each batch size: time to first token, time per output token and output tokens/s for a batch of
equal requests; for each workload IN/OUT: the output tokens/s of N requests submitted at once
(the scheduler runs as many together as fit). Peak GPU memory, compile time and the share of wall
time the GPU sat idle between decode steps are reported too. `--compare` runs transformers' eager
`generate` and `generate` with the static cache and `torch.compile` on the same weights and prompts.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

SHAPES: dict[str, dict[str, Any]] = {
    # Llama architectures with random bf16 weights made on the device (nothing to download)
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=131072,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=131072,
                         tie_word_embeddings=True,
                         rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "tiny-llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=256, max_position_embeddings=1024),
}


@dataclass
class Row:
    """One measured configuration: a system at a batch size or a workload."""

    system: str
    case: str
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    tok_s: float | None = None
    note: str = ""
    steps: dict[str, dict[str, float]] = field(default_factory=dict)  # per step kind: count, GPU busy/idle ms


@dataclass
class Report:
    model: str
    target: str
    quant: str | None
    device: str
    compile_s: dict[str, float] = field(default_factory=dict)
    peak_memory_gib: float | None = None
    weights_gib: float | None = None
    model_gib: float | None = None    # the model's parameters in --dtype, which weights_gib compares with
    gpu_idle_fraction: float | None = None
    engine: dict[str, Any] = field(default_factory=dict)
    tensor_parallel: dict[str, float] = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)

    def markdown(self) -> str:
        lines = [f"# kiln bench: {self.model}, target {self.target}, quant {self.quant or 'none'}",
                 "", f"- device: {self.device}",
                 "- compile: " + ", ".join(f"{k} {v:.1f} s" for k, v in self.compile_s.items()),
                 f"- weights in GPU memory: {_fmt(self.weights_gib, '.2f')} GiB{self._of_model()}; peak allocated: "
                 f"{_fmt(self.peak_memory_gib, '.2f')} GiB",
                 "- engine: " + ", ".join(f"{k} {v}" for k, v in self.engine.items()),
                 f"- GPU idle between decode steps: {_fmt(None if self.gpu_idle_fraction is None else 100 * self.gpu_idle_fraction, '.1f')}% of decode wall time",
                 *([f"- tensor parallel: " + ", ".join(f"{k} {v:g}" for k, v in self.tensor_parallel.items())]
                   if self.tensor_parallel else []),
                 "", "| system | case | TTFT ms | TPOT ms | output tok/s | vs kiln | note |", "|---|---|---|---|---|---|---|"]
        kiln_rate = {r.case: r.tok_s for r in self.rows if r.system == "kiln"}
        for r in self.rows:
            ratio = "" if r.system == "kiln" or not r.tok_s or not kiln_rate.get(r.case) else \
                f"kiln {kiln_rate[r.case] / r.tok_s:.2f}x"
            lines.append(f"| {r.system} | {r.case} | {_fmt(r.ttft_ms, '.1f')} | {_fmt(r.tpot_ms, '.2f')} | "
                         f"{_fmt(r.tok_s, '.0f')} | {ratio} | {r.note} |")
        return "\n".join(lines) + "\n"

    def _of_model(self) -> str:
        if not self.weights_gib or not self.model_gib:
            return ""
        return f" ({100 * self.weights_gib / self.model_gib:.1f}% of the model's {self.model_gib:.2f} GiB unquantized)"


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# -- the model ------------------------------------------------------------------------------------

def make_model(name: str, device: str, dtype: torch.dtype, seed: int = 0) -> tuple[Any, Any]:
    """(transformers model, kiln source) for a shape name (random weights made on the device) or a
    model kiln loads (its transformers twin for --compare)."""
    import transformers

    torch.manual_seed(seed)
    if name in SHAPES:
        config = transformers.LlamaConfig(**SHAPES[name], torch_dtype=dtype)
        with torch.device(device):
            model = transformers.LlamaForCausalLM(config).to(dtype).eval()
        return model, model
    import os

    from ..frontends import resolve

    path = resolve(name)
    folder, file = os.path.split(path) if str(path).endswith(".gguf") else (path, None)
    extra = {"gguf_file": file} if file else {}
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **extra).to(device).eval()
    return model, name


# -- kiln -----------------------------------------------------------------------------------------

class _StepTimer:
    """Wraps an executable to time the GPU gap between consecutive steps with CUDA events."""

    def __init__(self, exe: Any):
        self.exe, self.events = exe, []
        self.host_inputs = getattr(exe, "host_inputs", False)
        self.check_health = getattr(exe, "check_health", None)  # tensor parallelism: the engine polls it
        self.capture_decode = getattr(exe, "capture_decode", None)  # the cuda backend's decode graphs, up front

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = self.exe(*args, **kwargs)
        end.record()
        self.events.append((start, end, kwargs.get("step")))
        return out

    def breakdown(self, since: int = 0) -> dict[str, dict[str, float]]:
        """Per step kind (decode, mixed) of the steps from `since` on: how many, and the mean GPU time
        of a step and of the gap before it (host work the GPU waited on)."""
        torch.cuda.synchronize()
        out: dict[str, dict[str, float]] = {}
        for i in range(max(since, 1), len(self.events)):
            (_, prev_end, _), (start, end, step) = self.events[i - 1], self.events[i]
            kind = out.setdefault("decode" if step is not None and step.is_decode else "mixed",
                                  {"steps": 0, "gpu_ms": 0.0, "idle_ms": 0.0})
            kind["steps"] += 1
            kind["gpu_ms"] += start.elapsed_time(end)
            kind["idle_ms"] += prev_end.elapsed_time(start)
        for kind in out.values():
            kind["gpu_ms"] /= kind["steps"]
            kind["idle_ms"] /= kind["steps"]
        return out


def describe_steps(steps: dict[str, dict[str, float]]) -> str:
    return "; ".join(f"{k} {int(v['steps'])} steps, GPU {v['gpu_ms']:.2f} + idle {v['idle_ms']:.2f} ms"
                     for k, v in steps.items())


def run_requests(engine: Any, prompts: list[list[int]], out_len: int, device: str) -> tuple[float, float, float]:
    """Submit all prompts at once; (mean TTFT s, mean TPOT s, output tok/s)."""
    from ..runtime.sampling import SamplingParams

    params = SamplingParams(max_tokens=out_len, temperature=0.0, ignore_eos=True)
    _sync(device)
    start = time.perf_counter()
    first: dict[str, float] = {}
    done: dict[str, float] = {}
    for i, p in enumerate(prompts):
        engine.add_request(f"b{i}", p, params)
    while engine.has_work:
        for out in engine.step():
            now = time.perf_counter()
            first.setdefault(out.request_id, now)
            if out.finished:
                done[out.request_id] = now
    total = time.perf_counter() - start
    ttft = sum(first[k] - start for k in first) / len(first)
    tpot = sum((done[k] - first[k]) / max(1, out_len - 1) for k in done) / len(done)
    return ttft, tpot, len(prompts) * out_len / total


def model_hidden(compiled: Any) -> int:
    """The hidden size, read off the serving graph's embedding table."""
    emb = next(op for op in compiled.graph.ops if op.name in ("llm.embedding", "quant.embedding"))
    return int(emb.results[0].type.shape[-1])


CALIB_WINDOWS, CALIB_LEN = 8, 256


def bench_quant(args: argparse.Namespace, vocab: int) -> Any:
    """The quant to compile with: a random-weight shape has no tokenizer, so an algorithm that calibrates
    (fp8 activation and KV scales, AWQ, SmoothQuant) sees random token ids; its speed does not depend on them."""
    if args.quant is None or args.model not in SHAPES:
        return args.quant
    from ..passes.quantize import QuantConfig

    config = QuantConfig.of(args.quant)
    if not config.needs_calibration:
        return config
    ids = torch.randint(0, vocab, (2 * CALIB_WINDOWS * CALIB_LEN,), generator=torch.Generator().manual_seed(args.seed))
    return replace(config, calib_tokens=ids, calib_size=CALIB_WINDOWS, calib_seq_len=CALIB_LEN,
                   calib_rows=min(config.calib_rows, CALIB_WINDOWS * CALIB_LEN))


def bench_kiln(source: Any, args: argparse.Namespace, report: Report, vocab: int) -> Any:
    """Measure kiln into `report`; returns the tensor-parallel job (to close once the report is out) or None."""
    from ..api import compile as kiln_compile
    from ..runtime.config import BuildConfig, KvCacheConfig
    from ..runtime.engine import Engine

    t0 = time.perf_counter()
    compiled = kiln_compile(source, target=args.target, quant=bench_quant(args, vocab), progress=not args.quiet)
    t1 = time.perf_counter()
    graph, tp = compiled.graph, None
    if args.tp > 1:  # one process per rank, each loading its shard; this process is rank 0
        from ..runtime.distributed import launch

        tp = launch(compiled, tensor_parallel_size=args.tp)
        graph, exe = tp.graph, tp.executable
        nbytes = model_hidden(compiled) * 2  # one bf16 token row
        report.tensor_parallel = {"ranks": args.tp, "all_reduce_one_token_us": 1e6 * tp.all_reduce_seconds(nbytes)}
        for r, facts in enumerate(tp.loaded):
            report.tensor_parallel[f"rank{r}_weights_gib"] = facts["weight_bytes"] / 2**30
            report.tensor_parallel[f"rank{r}_read_from_files_gib"] = facts["bytes_read"] / 2**30
    else:
        exe = compiled.executable()
    _sync(compiled.device)
    t2 = time.perf_counter()
    report.compile_s.update({"trace+passes": t1 - t0, "weights to device": t2 - t1})
    if compiled.device.startswith("cuda"):  # kiln's own weights (a random-weight shape's twin is on the GPU too)
        report.weights_gib = getattr(exe, "weight_bytes", torch.cuda.memory_allocated()) / 2**30
    if hasattr(source, "parameters"):
        report.model_gib = sum(p.numel() * p.element_size() for p in source.parameters()) / 2**30
    timer = _StepTimer(exe) if compiled.device.startswith("cuda") else exe
    longest = max([args.input_len + args.output_len] + [int(w.split("/")[0]) + int(w.split("/")[1])
                                                        for w in args.workloads])
    build = BuildConfig(max_batch_size=args.max_batch_size, max_num_tokens=args.max_num_tokens,
                        max_seq_len=longest + 1)
    t_engine = time.perf_counter()
    engine = Engine(graph, timer, kv_cache_config=KvCacheConfig(free_gpu_memory_fraction=args.kv_fraction),
                    build_config=build, device=compiled.device, overlap=args.overlap, progress=not args.quiet)
    report.compile_s["KV pool + decode graphs"] = time.perf_counter() - t_engine
    report.engine = {"overlap": engine.overlap, "max_batch_size": build.max_batch_size,
                     "max_num_tokens": build.max_num_tokens}
    gen = torch.Generator().manual_seed(args.seed)

    def prompts(n: int, length: int) -> list[list[int]]:
        return torch.randint(0, vocab, (n, length), generator=gen).tolist()

    t3 = time.perf_counter()
    run_requests(engine, prompts(1, args.input_len), 2, compiled.device)  # first token: kernels compile here
    report.compile_s["first token"] = time.perf_counter() - t3
    report.compile_s["compile call to first token"] = time.perf_counter() - t0
    gc.collect()  # what start-up left is long-lived: out of the collector's way (full collections of
    gc.freeze()   # a large heap cost ~300 ms each under 512 streaming requests)
    for b in args.batches:  # warm (captures this batch's decode graphs), then measure
        run_requests(engine, prompts(b, args.input_len), 4, compiled.device)
        since = len(timer.events) if isinstance(timer, _StepTimer) else 0
        ttft, tpot, rate = run_requests(engine, prompts(b, args.input_len), args.output_len, compiled.device)
        steps = timer.breakdown(since) if isinstance(timer, _StepTimer) else {}
        report.rows.append(Row("kiln", f"batch {b}, {args.input_len}/{args.output_len}", 1e3 * ttft, 1e3 * tpot, rate,
                               describe_steps({k: v for k, v in steps.items() if k == "decode"}), steps))
        if b == args.batches[0] and "decode" in steps:  # of decode wall time, the GPU's waits between steps
            report.gpu_idle_fraction = steps["decode"]["idle_ms"] / (steps["decode"]["gpu_ms"] + steps["decode"]["idle_ms"])
    for w in args.workloads:
        i, o = (int(x) for x in w.split("/"))
        # warm with the same requests cut to 4 tokens: every mixed-step shape JIT-compiles here, not in the timing
        run_requests(engine, prompts(args.requests, i), 4, compiled.device)
        since = len(timer.events) if isinstance(timer, _StepTimer) else 0
        ttft, tpot, rate = run_requests(engine, prompts(args.requests, i), o, compiled.device)
        steps = timer.breakdown(since) if isinstance(timer, _StepTimer) else {}
        report.rows.append(Row("kiln", f"{args.requests} requests {w}", 1e3 * ttft, 1e3 * tpot, rate,
                               "max load" + (f": {describe_steps(steps)}" if steps else ""), steps))
    gc.unfreeze()
    if compiled.device.startswith("cuda"):
        report.peak_memory_gib = torch.cuda.max_memory_allocated() / 2**30
    if hasattr(exe, "stats"):
        print(f"kiln executable: {exe.stats}")
    if tp is not None:
        per_step = graph.op_counts().get("dist.all_reduce", 0)
        report.tensor_parallel["all_reduces_per_step"] = per_step
        decode = [r for r in report.rows if r.system == "kiln" and r.case.startswith(f"batch {args.batches[0]},")]
        if decode and decode[0].tpot_ms:  # what the step's collectives cost, against the measured step
            share = per_step * report.tensor_parallel["all_reduce_one_token_us"] / 1e3 / decode[0].tpot_ms
            report.tensor_parallel[f"all_reduce_share_batch{args.batches[0]}"] = round(share, 3)
        for r, mem in enumerate(tp.memory()):
            report.tensor_parallel[f"rank{r}_peak_gib"] = mem["peak_gib"]
        print(f"kiln all-reduce route: {getattr(getattr(tp.executable, 'all_reduce', None), 'route', '-')}")
    return tp


# -- transformers baselines -----------------------------------------------------------------------

class _FirstToken:
    """A transformers streamer that notes when the first generated token arrives (the prompt comes first)."""

    def __init__(self) -> None:
        self.start = self.first = 0.0
        self.calls = 0

    def put(self, value: Any) -> None:
        self.calls += 1
        if self.calls == 2:
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def bench_hf(model: Any, args: argparse.Namespace, report: Report, vocab: int, compiled: bool) -> None:
    system = "transformers static+compile" if compiled else "transformers eager"
    device = str(next(model.parameters()).device)
    gen = torch.Generator().manual_seed(args.seed)
    batches = args.compile_batches if compiled else args.batches
    for b in batches:
        ids = torch.randint(0, vocab, (b, args.input_len), generator=gen).to(device)
        kw: dict[str, Any] = dict(do_sample=False, min_new_tokens=args.output_len, max_new_tokens=args.output_len,
                                  pad_token_id=0, attention_mask=torch.ones_like(ids))
        if compiled:  # transformers compiles the forward itself for a static cache (generation_config.compile_config)
            kw["cache_implementation"] = "static"
        try:
            with torch.no_grad():
                model.generate(ids, **kw)  # warm: the same lengths, so a static cache compiles once here
                clock = _FirstToken()
                _sync(device)
                clock.start = time.perf_counter()
                model.generate(ids, streamer=clock, **kw)
                _sync(device)
                total = time.perf_counter() - clock.start
            ttft = clock.first - clock.start
            report.rows.append(Row(system, f"batch {b}, {args.input_len}/{args.output_len}", 1e3 * ttft,
                                   1e3 * (total - ttft) / max(1, args.output_len - 1), b * args.output_len / total))
        except Exception as e:  # a baseline that fails is reported, not fatal
            report.rows.append(Row(system, f"batch {b}, {args.input_len}/{args.output_len}",
                                   note=f"failed: {type(e).__name__}: {str(e)[:80]}"))


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return run(args)


def run(args: argparse.Namespace) -> int:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[args.dtype]
    model, source = make_model(args.model, device, dtype, args.seed)
    vocab = model.config.vocab_size
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    report = Report(args.model, args.target, args.quant, name)
    if args.compare:
        bench_hf(model, args, report, vocab, compiled=False)
        if device == "cuda":
            bench_hf(model, args, report, vocab, compiled=True)
        torch.cuda.empty_cache() if device == "cuda" else None
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    tp = bench_kiln(source, args, report, vocab)
    try:
        text = report.markdown()
        print(text)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(asdict(report), f, indent=2)
        if args.markdown:
            with open(args.markdown, "w") as f:
                f.write(text)
    finally:
        if tp is not None:
            tp.close()
    return 0


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help=f"a shape with random weights ({', '.join(SHAPES)}) or a model kiln loads")
    p.add_argument("--target", default="auto", help="kiln target (default: the fastest available)")
    p.add_argument("--quant", default=None, help="quantization mode (kiln.compile's quant=)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "f16", "f32"])
    p.add_argument("--batches", type=_ints, default=[1, 8, 64], help="batch sizes for TTFT/TPOT (default 1,8,64)")
    p.add_argument("--compile-batches", type=_ints, default=[1, 8],
                   help="batch sizes for the transformers static+compile baseline (each recompiles)")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--workloads", type=lambda s: [w for w in s.split(",") if w], default=["128/128", "2048/128"],
                   help="IN/OUT token lengths for the maximum-throughput runs")
    p.add_argument("--requests", type=int, default=512, help="requests per maximum-throughput workload")
    p.add_argument("--max-batch-size", type=int, default=512, help="sequences per step (default 512: "
                   "the 512 requests of a maximum-load workload decode as one batch)")
    p.add_argument("--max-num-tokens", type=int, default=8192)
    p.add_argument("--kv-fraction", type=float, default=0.85, help="free_gpu_memory_fraction for the KV pool")
    p.add_argument("--overlap", action=argparse.BooleanOptionalAction, default=None,
                   help="launch each step before reading the last one's greedy tokens (default: on for GPUs)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (one process each)")
    p.add_argument("--compare", action="store_true", help="also run transformers eager and static+compile")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the report as JSON here")
    p.add_argument("--markdown", help="write the report as a markdown table here")
    p.add_argument("--quiet", action="store_true")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kiln bench", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return p


if __name__ == "__main__":
    raise SystemExit(main())

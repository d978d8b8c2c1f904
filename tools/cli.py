"""The `kiln` command line.

    kiln generate "What is the capital of France?"           # the default model, best target here
    kiln compile smollm2 --out smol/ && kiln generate -m smol/ "Hello"
    kiln run examples/llama_block.ir --pipeline canonicalize,cse,dce --check
    kiln irdump examples/llama_block.ir --stats --dim T=128
    kiln bench llama-3.1-8b --compare --markdown bench.md   # speed vs transformers, on a GPU
    kiln eval-ppl smollm2 --quant fp8 --kv-cache fp8         # perplexity, float and quantized
    kiln ops            # every registered op with its schema
    kiln passes         # every registered pass with its options
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Sequence

import torch

from ..backends import reference
from ..ir.parser import ParseError
from ..ir.registry import REQUIRED, registered_ops
from ..ir.verifier import VerificationError
from ..passes.manager import PassError, PipelineError, run_pipeline
from ..testing import assert_same_function, random_inputs, random_params
from . import bench, eval_ppl, irdump


def _run(args: argparse.Namespace) -> int:
    """Compile a graph with a pipeline and run it on the reference backend with random data."""
    graph = irdump.load_graph(args.input, args.dtype)
    original = graph.clone()
    dims = irdump.parse_dims(args.dim)
    symbols = sorted(set().union(*(v.type.symbols for v in graph.inputs)) - set(dims))
    if symbols:
        print(f"// {', '.join(symbols)} not given (--dim NAME=N): using {args.default_dim}")
        dims.update({s: args.default_dim for s in symbols})
    if args.pipeline:
        start = time.perf_counter()
        run_pipeline(graph, args.pipeline)
        print(f"// {args.pipeline}: {len(original.ops)} -> {len(graph.ops)} ops "
              f"in {1e3 * (time.perf_counter() - start):.1f} ms")
    params = random_params(original, seed=args.seed)
    inputs = random_inputs(graph, dims, seed=args.seed)
    start = time.perf_counter()
    outputs = reference.run(graph, *inputs, device=args.device,
                            params={k: v for k, v in params.items() if k in graph.params})
    elapsed = time.perf_counter() - start
    for v, t in zip(graph.outputs, outputs):
        summary = f"mean {t.float().mean():+.4f}  std {t.float().std():.4f}" if t.is_floating_point() and t.numel() > 1 else ""
        print(f"{v.ref}: {v.type} = {t.dtype} {tuple(t.shape)}  {summary}")
    print(f"// ran {len(graph.ops)} ops on the reference backend ({args.device}) in {1e3 * elapsed:.1f} ms")
    if args.check:
        assert_same_function(original, graph, dims, seed=args.seed, params=params, atol=1e-4, rtol=1e-4)
        print("// check: the compiled graph computes the same function as the input on fresh random data")
    return 0


def _generate(args: argparse.Namespace) -> int:
    """Compile a model (or load an artifact) and generate, streaming the text as it comes."""
    import asyncio

    from .. import LLM, KvCacheConfig, SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                            seed=args.seed, stop=args.stop or None)
    llm = LLM(args.model, target=args.target, dtype=args.dtype, quant_config=args.quant,
              kv_cache_config=KvCacheConfig(tokens_per_block=args.tokens_per_block))
    prompts = args.prompt or ["What is the capital of France?"]
    if args.chat and getattr(llm.tokenizer, "chat_template", None):
        prompts = [llm.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                     add_generation_prompt=True) for p in prompts]

    async def stream(prompt: str) -> None:
        shown = ""
        async for out in llm.generate_async(prompt, params, streaming=True):
            text = out.outputs[0].text
            print(text[len(shown):], end="", flush=True)
            shown = text
        print(f"\n// {len(out.outputs[0].token_ids)} tokens, finish reason: {out.outputs[0].finish_reason}")

    start = time.perf_counter()
    for prompt in prompts:
        asyncio.run(stream(prompt))
    print(f"// {time.perf_counter() - start:.1f} s on {llm.model.target} ({llm.model.target_reason or llm.model.device})")
    return 0


def _compile(args: argparse.Namespace) -> int:
    """Compile once, serve many times: write an artifact folder that kiln.load / LLM(dir) read back."""
    from .. import compile as kiln_compile

    model = kiln_compile(args.model, target=args.target, quant=args.quant, dtype=args.dtype,
                         tokens_per_block=args.tokens_per_block, trust_remote_code=args.trust_remote_code)
    folder = model.save(args.out)
    print(f"// compiled {args.model} for {model.target} ({model.dtype}): {len(model.graph.ops)} ops -> {folder}")
    return 0


def _ops(args: argparse.Namespace) -> int:
    for name, opdef in registered_ops().items():
        if args.filter and args.filter not in name:
            continue
        operands = ", ".join(("*" if o.variadic else "") + o.name + ("?" if o.optional else "") for o in opdef.operands)
        attrs = ", ".join(f"{a.name}: {a.kind.name}" + ("" if a.default is REQUIRED
                                                       else f" = {a.default!r}") for a in opdef.attrs.values())
        traits = str(opdef.traits).replace("Trait.", "").lower()
        print(f"{name}({operands}){' {' + attrs + '}' if attrs else ''}  [{traits}]")
        if opdef.doc:
            print(f"    {opdef.doc.splitlines()[0]}")
    return 0


def _passes(args: argparse.Namespace) -> int:
    sys.stdout.write(irdump.list_passes())
    return 0


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", "-t", default="auto", help="auto, reference, cuda, trt, onnx")
    p.add_argument("--quant", "-q", default=None,
                   help="fp8, fp8-per-channel, int8_sq, int4_awq, w4a16, int8_wo, llm.int8, fp8_kv, or fp8+fp8_kv")
    p.add_argument("--dtype", default="auto", help="auto, f32, f16, bf16")
    p.add_argument("--tokens-per-block", type=int, default=16)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kiln", description="kiln: a compiler and runtime for LLMs.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("run", help="compile a .ir graph and run it on the reference backend")
    p.add_argument("input", metavar="INPUT", help="a .ir file or a model (folder, .gguf, .onnx, smollm2)")
    p.add_argument("--dtype", default="auto", help="float type of a model's graph: auto, f32, f16, bf16")
    p.add_argument("--pipeline", "-p", default="canonicalize,cse,dce", help="passes to run first ('' for none)")
    p.add_argument("--dim", action="append", default=[], metavar="NAME=N", help="value of a symbolic dim")
    p.add_argument("--default-dim", type=int, default=8, metavar="N", help="value of dims not given (default 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--check", action="store_true", help="compare with the uncompiled graph on random data")
    p.set_defaults(fn=_run)
    p = sub.add_parser("generate", help="generate text with the default or a given model")
    p.add_argument("prompt", nargs="*", help="prompts (default: a question for the default model)")
    p.add_argument("--model", "-m", default="smollm2", help="a model folder, .gguf, .onnx, Meta folder, artifact, or smollm2")
    _model_options(p)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True, help="apply the chat template")
    p.set_defaults(fn=_generate)
    p = sub.add_parser("compile", help="compile a model into an artifact folder")
    p.add_argument("model", help="a model folder, .gguf, .onnx, Meta folder, or smollm2")
    p.add_argument("--out", "-o", required=True, help="the artifact folder to write")
    _model_options(p)
    p.add_argument("--trust-remote-code", action="store_true")
    p.set_defaults(fn=_compile)
    p = sub.add_parser("irdump", help="print, diff, draw and count the IR around passes (see irdump --help)")
    irdump.add_arguments(p)
    p.set_defaults(fn=lambda a: irdump.run(a))
    p = sub.add_parser("bench", help="serving speed of a model against transformers (see kiln bench --help)")
    bench.add_arguments(p)
    p.set_defaults(fn=bench.run)
    p = sub.add_parser("eval-ppl", help="perplexity on held-out text, float and quantized (see kiln eval-ppl --help)")
    eval_ppl.add_arguments(p)
    p.set_defaults(fn=eval_ppl.run)
    p = sub.add_parser("ops", help="list the registered ops")
    p.add_argument("filter", nargs="?", help="only ops whose name contains this")
    p.set_defaults(fn=_ops)
    p = sub.add_parser("passes", help="list the registered passes")
    p.set_defaults(fn=_passes)
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except (irdump.CommandError, PipelineError) as e:
        parser.exit(2, f"kiln: error: {e}\n")
    except (ParseError, VerificationError, PassError, reference.ExecutionError, AssertionError, ValueError) as e:
        parser.exit(1, f"kiln: error: {e}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

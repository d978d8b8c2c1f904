"""The `kiln` command line.

    kiln run examples/llama_block.ir --pipeline canonicalize,cse,dce --check
    kiln irdump examples/llama_block.ir --stats --dim T=128
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
from . import irdump


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
    """Greedy text generation by re-running the compiled stateless forward over the whole
    sequence each step: no KV cache yet (the serving runtime replaces this)."""
    from ..frontends import load, resolve
    from ..frontends.hf import tokenizer_for

    path = resolve(args.model)
    tokenizer = tokenizer_for(path)
    graph = load(path, dtype=args.dtype)
    run_pipeline(graph, args.pipeline)
    exe = reference.compile(graph, device=args.device)
    if args.chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    else:
        ids = tokenizer(args.prompt)["input_ids"]
    ids = list(ids)
    start, new = time.perf_counter(), []
    for _ in range(args.max_new_tokens):
        tokens = torch.tensor(ids + new, dtype=torch.int32)
        logits = exe(tokens, torch.arange(len(tokens), dtype=torch.int32))[0]
        nxt = int(logits[-1].argmax())
        if nxt == tokenizer.eos_token_id:
            break
        new.append(nxt)
        print(tokenizer.decode(new[-1:]), end="", flush=True)
    elapsed = time.perf_counter() - start
    print(f"\n// {len(new)} tokens in {elapsed:.1f} s on the reference backend ({args.device}), no KV cache")
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
    p = sub.add_parser("generate", help="greedy text from a model (reference backend, no KV cache yet)")
    p.add_argument("model", nargs="?", default="smollm2", help="a model folder, .gguf, Meta folder or short name")
    p.add_argument("--prompt", default="What is the capital of France?")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True, help="apply the chat template")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--pipeline", "-p", default="canonicalize,cse,dce")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.set_defaults(fn=_generate)
    p = sub.add_parser("irdump", help="print, diff, draw and count the IR around passes (see irdump --help)")
    irdump.add_arguments(p)
    p.set_defaults(fn=lambda a: irdump.run(a))
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
    except (ParseError, VerificationError, PassError, reference.ExecutionError, AssertionError) as e:
        parser.exit(1, f"kiln: error: {e}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

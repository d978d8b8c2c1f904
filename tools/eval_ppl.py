"""`kiln eval-ppl`: perplexity of a model, float and quantized, on held-out text, and which linears
lose most when quantized alone.

    kiln eval-ppl smollm2 --quant fp8 --quant w8a8-sq --quant int4_awq --group-size 64
    kiln eval-ppl smollm2 --kv-cache fp8
    kiln eval-ppl smollm2 --quant fp8 --sensitivity --by kind
    kiln eval-ppl smollm2 --quant w4a16-awq --group-size 64 --rounding nearest --rounding gptq

The text is Python's own pydoc_data.topics (or --text FILE), tokenized once: calibration windows
come from the first half of the stream and evaluation windows from its end, so the two never
overlap. Every configuration runs the stateless graph on the reference interpreter, through the
same passes `kiln.compile` runs (calibration, smooth / awq, quantize, fuse-quantized-linear).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import re
import sys
import time
from dataclasses import dataclass, replace
from typing import Any, TextIO

import torch

from ..ir.graph import Graph
from ..passes.calibrate import (
    Calibration,
    calib_windows,
    calibrate,
    eval_windows,
    perplexity,
    token_stream,
)
from ..passes.gptq import WEIGHT_ROUNDINGS
from ..passes.manager import run_pipeline
from ..passes.quantize import LM_HEAD_PATTERNS, QuantAlgo, QuantConfig, apply_quantization


@dataclass
class Row:
    """One line of the report."""

    name: str
    perplexity: float
    seconds: float
    quantized: int = 0           # linears (and attentions) the passes quantized

    def delta(self, baseline: float) -> float:
        return 100.0 * (self.perplexity / baseline - 1.0)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a model folder, .gguf, Meta folder, or a short name such as smollm2")
    p.add_argument("--quant", "-q", action="append", default=[], metavar="Q",
                   help="a quantization to evaluate (repeatable): fp8, fp8-per-channel, w8a8-sq (int8_sq), "
                        "w4a16-awq (int4_awq), w4a16 (plain int4), w8a16 (int8_wo), llm.int8, fp8_kv (the KV "
                        "cache alone), or a linear algorithm + fp8_kv")
    p.add_argument("--kv-cache", choices=("fp8",), default=None, help="also put the KV cache in fp8")
    p.add_argument("--group-size", type=int, default=128, help="int4 group size (default 128)")
    p.add_argument("--alpha", type=float, default=0.5, help="SmoothQuant migration strength (default 0.5)")
    p.add_argument("--threshold", type=float, default=6.0, help="LLM.int8() outlier threshold (default 6.0)")
    p.add_argument("--exclude", default="lm_head|*.lm_head", help="'|'-separated fnmatch patterns kept float")
    p.add_argument("--symmetric", action="store_true", help="int4 without zero points")
    p.add_argument("--amax", choices=("max", "mse"), default="max",
                   help="calibrated e4m3 scales (fp8 activations, fp8 KV cache): the |x| max, or the bound that rounds "
                        "the calibration rows with least squared error (keeps --calib-rows rows per input)")
    p.add_argument("--rounding", action="append", choices=WEIGHT_ROUNDINGS, default=[],
                   help="how weights round onto their grid (repeatable: each --quant with each): nearest (default), "
                        "or gptq (error-compensating, on each linear input's calibrated X^T X)")
    p.add_argument("--samples", type=int, default=32, help="evaluation windows (default 32)")
    p.add_argument("--length", type=int, default=256, help="tokens per evaluation window (default 256)")
    p.add_argument("--calib-samples", type=int, default=128, help="calibration windows (default 128)")
    p.add_argument("--calib-length", type=int, default=256, help="tokens per calibration window (default 256)")
    p.add_argument("--calib-rows", type=int, default=512, help="input rows per linear kept for AWQ (default 512)")
    p.add_argument("--text", metavar="FILE", help="evaluate and calibrate on this text instead of pydoc_data.topics")
    p.add_argument("--dtype", default="f32", help="float type of the model's graph (default f32)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-baseline", action="store_true", help="skip the float model")
    p.add_argument("--sensitivity", action="store_true",
                   help="quantize one linear (or group, --by) at a time with the first --quant and rank the loss")
    p.add_argument("--by", choices=("linear", "layer", "kind"), default="linear",
                   help="sensitivity unit: each linear, each decoder layer, or each kind across layers")
    p.add_argument("--top", type=int, default=0, help="print only the N most sensitive units")
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON")


def configs(args: argparse.Namespace) -> list[QuantConfig]:
    """The configurations the arguments ask for; `-q fp8_kv` is the KV cache alone, `-q fp8+fp8_kv` both."""
    names = list(args.quant) or ([] if args.kv_cache is None else ["none"])
    out = []
    for name, rounding in ((n, r) for n in names for r in (args.rounding or ["nearest"])):
        options = dict(group_size=args.group_size, smoothquant_val=args.alpha, int8_threshold=args.threshold,
                       exclude_modules=tuple(p for p in args.exclude.split("|") if p), zero_point=not args.symmetric,
                       calib_size=args.calib_samples, calib_seq_len=args.calib_length, calib_rows=args.calib_rows,
                       amax_method=args.amax, weight_rounding=rounding)
        if args.kv_cache == "fp8":
            name = "fp8_kv" if name.strip() == "none" else f"{name}+fp8_kv"
        if QuantConfig.of(name).quant_algo is None:
            options["weight_rounding"] = "nearest"   # the KV cache alone has no weights to round
        config = QuantConfig.of(name, **options)   # kiln.compile's own short forms; their key=value parts win
        if config not in out:   # the KV cache alone has no weights to round either way
            out.append(config)
    return out


def label(config: QuantConfig) -> str:
    parts = [config.quant_algo.value] if config.quant_algo else []
    if config.quant_algo in (QuantAlgo.W4A16, QuantAlgo.W4A16_AWQ):
        parts[0] += f" g{config.group_size}"
    if config.weight_rounding != "nearest":
        parts[0] += f" {config.weight_rounding}"
    if config.lm_head is not None:
        parts.append(f"lm_head {config.lm_head.value}")
    if config.quant_algo is not None and config.embedding is None:
        parts.append("float table")
    if config.kv_cache_quant_algo is QuantAlgo.FP8_KV:
        parts.append("fp8 kv")
    return " + ".join(parts)


def quantized_graph(graph: Graph, config: QuantConfig, calibration: Calibration | None) -> tuple[Graph, int]:
    """A quantized, fused copy of a stateless graph, as kiln.compile builds it for the reference target."""
    g = graph.clone()
    pm = apply_quantization(g, config, calibration)
    count = sum(r.changes for r in pm.records if r.spec.name == "quantize")
    run_pipeline(g, "fuse-quantized-linear,dce")
    return g, count


def evaluate(graph: Graph, tokenizer: Any, quant: list[QuantConfig], *, samples: int = 32, length: int = 256,
             text: str | None = None, baseline: bool = True, device: str = "cpu", progress: bool = True,
             out: TextIO | None = None) -> tuple[list[Row], Calibration | None]:
    """Perplexity of the float graph and of each configuration on held-out windows."""
    out = out or sys.stdout
    for config in quant:   # a config that cannot fit the graph fails before calibration and the other rows
        config.check_graph(graph)
    stream = token_stream(tokenizer, text=text)
    held_out = eval_windows(stream, samples, length)
    calibration = None
    needs = [c for c in quant if c.needs_calibration]
    if needs:
        first = needs[0]
        if any((c.calib_size, c.calib_seq_len) != (first.calib_size, first.calib_seq_len) for c in needs):
            raise ValueError("the configurations to compare must share one calibration (calib_size, calib_seq_len)")
        rows = max(c.calibration_rows for c in needs)
        windows = calib_windows(stream, first.calib_size, first.calib_seq_len)
        calibration = calibrate(graph, windows, device=device, progress=progress, rows=rows,
                                hessian=any(c.needs_hessian for c in needs))
    rows_out: list[Row] = []
    if baseline:
        start = time.perf_counter()
        rows_out.append(Row(graph_dtype(graph), perplexity(graph, held_out, device=device, progress=progress),
                            time.perf_counter() - start))
        _print_row(out, rows_out[-1], rows_out[0].perplexity)
    for config in quant:
        start = time.perf_counter()
        g, count = quantized_graph(graph, config, calibration)
        ppl = perplexity(g, held_out, device=device, progress=progress, desc=label(config))
        rows_out.append(Row(label(config), ppl, time.perf_counter() - start, count))
        _print_row(out, rows_out[-1], rows_out[0].perplexity if baseline else None)
    return rows_out, calibration


def graph_dtype(graph: Graph) -> str:
    from ..api import _compute_dtype

    return _compute_dtype(graph)


def _print_row(out: TextIO, row: Row, baseline: float | None) -> None:
    delta = f"{row.delta(baseline):+.2f}%" if baseline is not None and row.perplexity != baseline else ""
    out.write(f"| {row.name} | {row.perplexity:.4f} | {delta} | {row.quantized or ''} | {row.seconds:.0f} s |\n")
    out.flush()


_LAYER = re.compile(r"\.(\d+)\.")


def sensitivity_units(graph: Graph, config: QuantConfig, by: str) -> dict[str, list[str]]:
    """Unit name -> exclude patterns naming the linears it quantizes (each linear, each layer, or each
    kind). A pattern names a linear by its op's loc, which smooth and awq keep when they replace the
    weight by a scaled one (`...weight.awq`), so that the other units stay excluded after those passes."""
    import glob

    from ..passes.quantize import _skip_reason, _table_skip_reason

    units: dict[str, list[str]] = {}
    for op in graph.ops:
        if op.name == "llm.embedding":  # the token table is a unit of its own (default: int8 rows)
            table = op.operands[0]
            if (config.quant_algo is not None and config.embedding is not None and table.is_param
                    and _table_skip_reason(graph, op, config) is None):
                units.setdefault(op.loc or table.name, []).append(glob.escape(op.loc or table.name))
            continue
        if op.name != "llm.linear" or _skip_reason(op, config, check_calibration=False) is not None:
            continue
        w = op.operands[1].name
        module = op.loc or w
        if by == "layer":
            m = _LAYER.search("." + module + ".")
            key = f"layer {m.group(1)}" if m else module
        elif by == "kind":
            key = _LAYER.sub(".*.", module, count=1)
        else:
            key = module
        units.setdefault(key, []).append(glob.escape(module))
    return units


def sensitivity(graph: Graph, config: QuantConfig, calibration: Calibration | None, windows: list[torch.Tensor],
                baseline: float, by: str = "linear", device: str = "cpu", progress: bool = True,
                out: TextIO | None = None) -> list[Row]:
    """Perplexity with one unit quantized at a time, most damaging first."""
    from tqdm.auto import tqdm

    out = out or sys.stdout
    units = sensitivity_units(graph, config, by)
    everything = [p for ps in units.values() for p in ps]
    rows = []
    for name, patterns in tqdm(units.items(), desc="sensitivity", unit=by, disable=not progress):
        keep = tuple(p for p in everything if p not in patterns)
        head = any(fnmatch.fnmatchcase(p, h) for p in patterns for h in LM_HEAD_PATTERNS)
        one = replace(config, exclude_modules=config.exclude_modules + keep, lm_head=config.lm_head if head else None)
        start = time.perf_counter()
        g, count = quantized_graph(graph, one, calibration)
        rows.append(Row(name, perplexity(g, windows, device=device), time.perf_counter() - start, count))
    rows.sort(key=lambda r: -r.perplexity)
    return rows


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    from ..frontends import load, resolve
    from ..frontends.hf import tokenizer_for

    out = out or sys.stdout
    quant = configs(args)
    if args.sensitivity and not quant:
        raise ValueError("--sensitivity needs a --quant to apply one unit at a time")
    text = None
    if args.text:
        with open(args.text) as f:
            text = f.read()
    graph = load(args.model, dtype=args.dtype)
    run_pipeline(graph, "stateless")
    tokenizer = tokenizer_for(resolve(args.model))
    source = args.text or "pydoc_data.topics"
    calib = next((c for c in quant if c.needs_calibration), None)
    out.write(f"# {args.model}: perplexity on {args.samples} x {args.length} held-out tokens of {source} (its end)"
              + (f"; calibration on {calib.calib_size} x {calib.calib_seq_len} tokens (its start)" if calib else "")
              + f"; reference interpreter on {args.device}\n")
    out.write("| model | perplexity | vs float | quantized | time |\n|---|---|---|---|---|\n")
    rows, calibration = evaluate(graph, tokenizer, quant, samples=args.samples, length=args.length, text=text,
                                 baseline=not args.no_baseline or args.sensitivity, device=args.device, out=out)
    report: dict[str, Any] = {"model": args.model, "dtype": args.dtype, "text": source, "samples": args.samples,
                              "length": args.length, "rows": [r.__dict__ for r in rows]}
    if args.sensitivity:
        held_out = eval_windows(token_stream(tokenizer, text=text), args.samples, args.length)
        base = rows[0].perplexity
        ranked = sensitivity(graph, quant[0], calibration, held_out, base, args.by, args.device, out=out)
        shown = ranked[:args.top] if args.top else ranked
        out.write(f"\n# sensitivity: {label(quant[0])} on one {args.by} at a time, the rest float\n")
        out.write(f"| {args.by} | perplexity | vs float |\n|---|---|---|\n")
        for r in shown:
            out.write(f"| {r.name} | {r.perplexity:.4f} | {r.delta(base):+.3f}% |\n")
        report["sensitivity"] = [r.__dict__ for r in ranked]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kiln eval-ppl", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))

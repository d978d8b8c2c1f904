"""irdump: print a graph before and after any pass, diff what each pass did, draw it, count it.

    irdump model.ir --pipeline canonicalize,cse,dce --print-after-all
    irdump model.ir --pipeline canonicalize --diff
    irdump model.ir --format dot | dot -Tsvg > model.svg
    irdump model.ir --stats --dim T=128

It is a thin command line over the pass manager: every option maps to one of its settings.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence, TextIO

from ..ir.dot import to_dot
from ..ir.graph import Graph
from ..ir.json_format import to_json
from ..ir.parser import ParseError, parse
from ..ir.printer import print_graph
from ..ir.stats import format_stats, graph_stats
from ..ir.verifier import VerificationError, verify
from ..passes.manager import PassError, PassManager, PipelineError, registered_passes


class CommandError(Exception):
    """A user error to print as one line, without a traceback."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", metavar="INPUT", nargs="?",
                   help="a .ir file, - for standard input, or a model: a checkpoint folder, Meta folder, "
                        ".gguf, .onnx, or a short name such as smollm2")
    p.add_argument("--dtype", default="auto", help="float type of a model's graph: auto (its config's), f32, f16, bf16")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow a checkpoint's own Python code to build its model (read it first)")
    p.add_argument("--pipeline", "-p", default="", metavar="P",
                   help='passes to run, e.g. "canonicalize,cse,dce" or "shard{tp=2}"')
    p.add_argument("--print-after-all", action="store_true", help="print the IR after every pass")
    p.add_argument("--print-before-all", action="store_true", help="print the IR before every pass")
    p.add_argument("--print-after", action="append", default=[], metavar="NAME", help="print after pass NAME")
    p.add_argument("--print-before", action="append", default=[], metavar="NAME", help="print before pass NAME")
    p.add_argument("--print-changed", action="store_true", help="with --print-*: only passes that changed the IR")
    p.add_argument("--print-after-failure", action="store_true", help="print the IR when a pass fails")
    p.add_argument("--diff", action="store_true", help="show what each pass changed as a unified diff")
    p.add_argument("--dump-dir", metavar="DIR", help="write the IR after each pass to DIR/NN-pass.ir")
    p.add_argument("--format", choices=("text", "dot", "json", "onnx", "trt"), default="text",
                   help="output format of the result; onnx: an ONNX model in standard ops (-o FILE.onnx), trt: a "
                        "TensorRT network folder with kiln's plugins (-o DIR)")
    p.add_argument("--stats", action="store_true", help="count ops, parameter bytes, FLOPs and bytes moved")
    p.add_argument("--dim", action="append", default=[], metavar="NAME=N", help="a symbolic dim's value for --stats")
    p.add_argument("--timing", action="store_true", help="time each pass")
    p.add_argument("--locs", action="store_true", help="print source locations")
    p.add_argument("--no-verify", action="store_true", help="do not verify the graph after each pass")
    p.add_argument("-o", "--output", metavar="FILE", help="write the result here instead of standard output")
    p.add_argument("--list-passes", action="store_true", help="list the registered passes and their options")


def parse_dims(items: Sequence[str]) -> dict[str, int]:
    dims = {}
    for item in items:
        name, _, value = item.partition("=")
        if not name or not value.isdigit():
            raise CommandError(f"--dim {item!r}: write NAME=N with a non-negative integer, e.g. --dim T=128")
        dims[name] = int(value)
    return dims


def load_graph(path: str, dtype: str = "auto", trust_remote_code: bool = False) -> Graph:
    """Read a .ir file, or trace / import a model with the frontends."""
    if path != "-" and not path.endswith(".ir"):
        from ..frontends import load
        from ..frontends.hf import ModelLoadError
        from ..frontends.weights import CheckpointError

        try:
            return load(path, dtype=dtype, trust_remote_code=trust_remote_code)
        except (ModelLoadError, CheckpointError, FileNotFoundError, ValueError) as e:
            raise CommandError(str(e)) from None
    if path == "-":
        text, source = sys.stdin.read(), "<stdin>"
    else:
        try:
            with open(path) as f:
                text = f.read()
        except OSError as e:
            raise CommandError(f"cannot read {path}: {e.strerror}") from None
        source = path
    graph = parse(text, source=source)
    verify(graph)
    return graph


def list_passes() -> str:
    lines = []
    for name, info in registered_passes().items():
        opts = ", ".join(f"{k}: {t.__name__} = {d!r}" for k, (t, d) in info.options.items())
        lines.append(f"{name}{'{' + opts + '}' if opts else ''}\n    {info.doc}")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    if args.list_passes:
        out.write(list_passes())
        return 0
    if args.input is None:
        raise CommandError("INPUT is required (a .ir file, or - for standard input)")
    dims = parse_dims(args.dim)
    graph = load_graph(args.input, args.dtype, args.trust_remote_code)
    instrumented = any([args.print_after_all, args.print_before_all, args.print_after, args.print_before, args.diff])
    if args.pipeline:
        pm = PassManager(args.pipeline, verify_each=not args.no_verify,
                         print_before_all=args.print_before_all, print_after_all=args.print_after_all,
                         print_before=args.print_before, print_after=args.print_after,
                         print_changed=args.print_changed, print_after_failure=args.print_after_failure,
                         print_diff=args.diff, dump_dir=args.dump_dir, timing=args.timing, locs=args.locs,
                         stream=out)
        pm.run(graph)
    elif instrumented or args.dump_dir or args.timing:
        raise CommandError("--print-*, --diff, --dump-dir and --timing need --pipeline")
    if args.format in ("onnx", "trt"):
        out.write(write_network(graph, args.format, args.output))
        if args.stats:
            out.write(format_stats(graph_stats(graph, dims)))
        return 0
    result = {"text": lambda: print_graph(graph, locs=args.locs), "dot": lambda: to_dot(graph),
              "json": lambda: to_json(graph)}[args.format]
    if args.output:
        with open(args.output, "w") as f:
            f.write(result())
    elif args.format != "text" or not (instrumented or args.stats):
        out.write(result())  # text after --print-*/--diff/--stats would repeat what they showed
    if args.stats:
        out.write(format_stats(graph_stats(graph, dims)))
    return 0


def write_network(graph: Graph, fmt: str, output: str | None) -> str:
    """--format onnx / trt: the graph at this stage as an ONNX file or a TensorRT network folder."""
    if output is None:
        raise CommandError(f"--format {fmt} writes files: name them with -o "
                           f"({'FILE.onnx' if fmt == 'onnx' else 'a folder'})")
    if fmt == "onnx":
        from ..backends.onnx import OnnxExportError, export

        try:
            written = export(graph, output)
        except OnnxExportError as e:
            raise CommandError(str(e)) from None
        return f"wrote {written.path}" + (f" and {written.external_data}" if written.external_data else "") + "\n"
    from ..backends.onnx import OnnxExportError
    from ..backends.trt import export_network

    try:
        folder = export_network(graph, output)
    except (OnnxExportError, ValueError) as e:
        raise CommandError(str(e)) from None
    plugins = ", ".join(f"{n} x{c}" for n, c in folder.plugin_nodes.items()) or "none"
    lines = [f"wrote the TensorRT network to {folder.folder} (kiln plugin nodes: {plugins})",
             f"build it with kiln: {folder.kiln_build()}"]
    if folder.trtexec() is not None:
        lines.append(f"or with trtexec: {folder.trtexec()}")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="irdump", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.split("\n")[1:]))
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (CommandError, PipelineError) as e:
        parser.exit(2, f"irdump: error: {e}\n")
    except (ParseError, VerificationError, PassError) as e:
        parser.exit(1, f"irdump: error: {e}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

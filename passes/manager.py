"""Passes, pipelines and the pass manager.

A pass is a function `(graph, **options) -> int` registered under a name; it changes the graph
in place and returns how many changes it made. Options are its keyword-only parameters, typed
by annotation. A pipeline is a string, MLIR-style:

    "canonicalize,cse,quantize{algo=fp8,group_size=128},dce"

The pass manager runs a pipeline and is where all instrumentation lives: printing before/after
a pass (every pass, named ones, only on change, after a failure), one file per pass in a dump
folder, unified diffs, timings, and verification after each pass.
"""

from __future__ import annotations

import contextvars
import difflib
import inspect
import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence, TextIO

from ..ir.graph import Graph
from ..ir.printer import print_graph
from ..ir.verifier import VerificationError, verify

PassFn = Callable[..., int]


@dataclass(frozen=True)
class PassInfo:
    name: str
    fn: PassFn
    options: dict[str, tuple[type, Any]]   # option -> (type, default)
    doc: str


_PASSES: dict[str, PassInfo] = {}
_OPTION_TYPES = {"int": int, "float": float, "bool": bool, "str": str}


def register_pass(name: str) -> Callable[[PassFn], PassFn]:
    """Register `fn(graph, *, option: type = default, ...) -> int` as pass `name`."""
    if not re.fullmatch(r"[a-z][a-z0-9-]*", name):
        raise ValueError(f"pass name {name!r} must be lower-case words joined by '-'")

    def wrap(fn: PassFn) -> PassFn:
        if name in _PASSES:
            raise ValueError(f"pass {name} is already registered")
        options = {}
        for p in list(inspect.signature(fn).parameters.values())[1:]:
            if p.kind is not p.KEYWORD_ONLY or p.default is p.empty:
                raise TypeError(f"pass {name}: option {p.name} must be keyword-only with a default")
            ann = p.annotation  # a type, or its name under `from __future__ import annotations`
            kind = _OPTION_TYPES.get(ann.__name__ if isinstance(ann, type) else str(ann).replace("'", ""))
            if kind is None:
                raise TypeError(f"pass {name}: option {p.name} must be annotated int, float, bool or str")
            options[p.name] = (kind, p.default)
        _PASSES[name] = PassInfo(name, fn, options, (inspect.getdoc(fn) or "").split("\n")[0])
        return fn

    return wrap


def registered_passes() -> dict[str, PassInfo]:
    _ensure_passes_loaded()
    return dict(sorted(_PASSES.items()))


def _ensure_passes_loaded() -> None:
    from . import (  # noqa: F401  (registers the built-in passes)
        attention, awq, canonicalize, cleanup, fold, fusions, kv_cache, quantize, quantized_linear, smooth,
        tensor_parallel)


_REMARKS: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("kiln_pass_remarks", default=None)


def remark(message: str) -> None:
    """Say why a rewrite did not apply ("attention at %57 keeps its mask: not causal"). The pass
    manager shows remarks with a pass that changed nothing under print_changed / diffs."""
    sink = _REMARKS.get()
    if sink is not None and message not in sink:
        sink.append(message)


class PipelineError(ValueError):
    """A pipeline string that names an unknown pass or option, or has a malformed option."""


@dataclass(frozen=True)
class PassSpec:
    """One pass of a pipeline with its options."""

    name: str
    options: tuple[tuple[str, Any], ...] = ()

    def __str__(self) -> str:
        if not self.options:
            return self.name
        return self.name + "{" + ",".join(f"{k}={_format_option(v)}" for k, v in self.options) + "}"


def _format_option(v: Any) -> str:
    return ("true" if v else "false") if isinstance(v, bool) else str(v)


def parse_pipeline(text: str) -> list[PassSpec]:
    """Parse "a,b{k=v,k2=v2},c" into pass specs, checking names and options against the registry."""
    from .pipelines import PIPELINES

    passes = registered_passes()
    specs = []
    for item in _split_top_level(text):
        if item.strip() in PIPELINES:
            specs.extend(parse_pipeline(PIPELINES[item.strip()]))
            continue
        m = re.fullmatch(r"\s*([A-Za-z0-9_-]+)\s*(?:\{(.*)\})?\s*", item, re.S)
        if not m:
            raise PipelineError(f"malformed pipeline element {item!r}: write name or name{{key=value,...}}")
        name, body = m.group(1), m.group(2)
        if name in PIPELINES:
            raise PipelineError(f"pipeline {name!r} takes no options; write its passes out to change them: "
                                f"{PIPELINES[name]}")
        if name not in passes:
            raise PipelineError(f"unknown pass {name!r}; known passes: {', '.join(passes)}; "
                                f"named pipelines: {', '.join(PIPELINES)}")
        info = passes[name]
        options: dict[str, Any] = {}
        for pair in (p for p in (body or "").split(",") if p.strip()):
            if "=" not in pair:
                raise PipelineError(f"{name}: option {pair.strip()!r} needs a value (key=value)")
            key, raw = (s.strip() for s in pair.split("=", 1))
            if key not in info.options:
                known = ", ".join(f"{k} ({t.__name__}, default {_format_option(d)})"
                                  for k, (t, d) in info.options.items()) or "none"
                raise PipelineError(f"pass {name} has no option {key!r}; its options: {known}")
            options[key] = _convert_option(name, key, raw, info.options[key][0])
        specs.append(PassSpec(name, tuple(options.items())))
    return specs


def _split_top_level(text: str) -> list[str]:
    items, depth, cur = [], 0, ""
    for ch in text:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth < 0:
                raise PipelineError(f"unbalanced '}}' in pipeline {text!r}")
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
        else:
            cur += ch
    if depth:
        raise PipelineError(f"unbalanced '{{' in pipeline {text!r}")
    items.append(cur)
    if any(not i.strip() for i in items) and text.strip():
        raise PipelineError(f"empty element in pipeline {text!r}")
    return [i for i in items if i.strip()]


def _convert_option(pass_name: str, key: str, raw: str, kind: type) -> Any:
    try:
        if kind is bool:
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return raw.lower() in ("true", "1")
        return kind(raw)
    except ValueError:
        raise PipelineError(f"{pass_name}: option {key}={raw!r} is not a valid {kind.__name__}") from None


class PassError(RuntimeError):
    """A pass raised, or left a malformed graph; names the pass and its place in the pipeline."""


@dataclass
class PassRecord:
    spec: PassSpec
    changes: int
    seconds: float
    changed: bool
    remarks: list[str] = field(default_factory=list)


@dataclass
class PassManager:
    """Runs a pipeline with instrumentation. Printing goes to `stream` (stderr by default)."""

    pipeline: Sequence[PassSpec] | str
    verify_each: bool = True
    print_before_all: bool = False
    print_after_all: bool = False
    print_before: Iterable[str] = ()
    print_after: Iterable[str] = ()
    print_changed: bool = False          # with print_after*/before*: only print passes that changed the IR
    print_after_failure: bool = False
    print_diff: bool = False             # print what each pass changed as a unified diff
    dump_dir: str | os.PathLike | None = None
    timing: bool = False
    locs: bool = False
    stream: TextIO | None = None
    records: list[PassRecord] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        if isinstance(self.pipeline, str):
            self.pipeline = parse_pipeline(self.pipeline)
        known = registered_passes()
        for name in (*self.print_before, *self.print_after):
            if name not in known:
                raise PipelineError(f"cannot print around unknown pass {name!r}; known passes: {', '.join(known)}")
        self.print_before, self.print_after = set(self.print_before), set(self.print_after)

    @property
    def _out(self) -> TextIO:
        return self.stream if self.stream is not None else sys.stderr

    def _needs_text(self) -> bool:
        return bool(self.print_before_all or self.print_after_all or self.print_before or self.print_after
                    or self.print_diff or self.dump_dir or self.print_after_failure)

    def _emit(self, title: str, text: str) -> None:
        self._out.write(f"// -----// IR Dump {title} //----- //\n{text}\n")

    def run(self, graph: Graph) -> Graph:
        """Run every pass on `graph` in place; returns the graph."""
        self.records = []
        text = print_graph(graph, locs=self.locs) if self._needs_text() else None
        if self.dump_dir is not None:
            os.makedirs(self.dump_dir, exist_ok=True)
            self._dump(0, "input", text)
        passes = registered_passes()
        for i, spec in enumerate(self.pipeline, start=1):
            if self.print_before_all or spec.name in self.print_before:
                if not self.print_changed:
                    self._emit(f"Before {spec}", text)
            start = time.perf_counter()
            remarks: list[str] = []
            token = _REMARKS.set(remarks)
            try:
                changes = passes[spec.name].fn(graph, **dict(spec.options))
                if self.verify_each:
                    verify(graph)
            except Exception as e:
                if self.print_after_failure:
                    self._emit(f"After {spec} Failed", print_graph(graph, locs=self.locs))
                what = "left a malformed graph" if isinstance(e, VerificationError) else f"failed: {type(e).__name__}"
                raise PassError(f"pass {i} of the pipeline, {spec}, {what}: {e}") from e
            finally:
                _REMARKS.reset(token)
            seconds = time.perf_counter() - start
            new_text = print_graph(graph, locs=self.locs) if text is not None else None
            changed = new_text != text if text is not None else bool(changes)
            self.records.append(PassRecord(spec, int(changes or 0), seconds, changed, remarks))
            why = "".join(f"\n//   {r}" for r in remarks)
            if self.print_changed and changed and (self.print_before_all or spec.name in self.print_before):
                self._emit(f"Before {spec}", text)
            if self.print_after_all or spec.name in self.print_after:
                if changed or not self.print_changed:
                    self._emit(f"After {spec} ({changes} changes)", new_text)
                else:
                    self._out.write(f"// {spec}: no change{why}\n")
            if self.print_diff:
                self._out.write(unified_diff(text, new_text, f"before {spec}", f"after {spec}")
                                or f"// {spec}: no change{why}\n")
            if self.dump_dir is not None:
                self._dump(i, spec.name, new_text)
            text = new_text
        if self.timing:
            self._out.write(self.timing_report())
        return graph

    def _dump(self, index: int, name: str, text: str | None) -> None:
        with open(os.path.join(self.dump_dir, f"{index:02d}-{name}.ir"), "w") as f:
            f.write(text or "")

    def timing_report(self) -> str:
        total = sum(r.seconds for r in self.records) or 1e-12
        rows = [f"{'pass':<40} {'ms':>10} {'%':>6} {'changes':>8}"]
        rows += [f"{str(r.spec):<40} {r.seconds * 1e3:>10.2f} {100 * r.seconds / total:>6.1f} {r.changes:>8}"
                 for r in self.records]
        rows.append(f"{'total':<40} {total * 1e3:>10.2f} {100.0:>6.1f} {sum(r.changes for r in self.records):>8}")
        return "// Pass timing\n" + "\n".join(rows) + "\n"


def unified_diff(before: str, after: str, a: str = "before", b: str = "after") -> str:
    return "".join(difflib.unified_diff(before.splitlines(True), after.splitlines(True), a, b))


def run_pipeline(graph: Graph, pipeline: str | Sequence[PassSpec], **options: Any) -> Graph:
    """Shorthand for PassManager(pipeline, **options).run(graph)."""
    return PassManager(pipeline, **options).run(graph)

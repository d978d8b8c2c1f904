"""Backends: the table of compile targets. Each target names the module that turns a serving graph
into an executable, the named pipeline that prepares its graph, and what the machine needs to run
it. `select` resolves a target name, "auto" included, to a backend or says why it cannot be used.

A backend module `kiln/backends/<module>.py` provides `compile(graph) -> executable`; a target
whose module is not in this build is listed here all the same, so that asking for it gives an
error that says what exists instead of an import failure.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import Any, Callable

from ..ir.graph import Graph


@dataclass(frozen=True)
class StepInfo:
    """The shape of one serving step, known on the host: executables that take it (`step=`)
    size their kernels without reading the device."""

    num_seqs: int
    num_tokens: int
    max_query_len: int
    max_context_len: int

    @property
    def is_decode(self) -> bool:
        return self.num_tokens == self.num_seqs

    @classmethod
    def of(cls, tokens: Any, positions: Any, slot_mapping: Any, block_tables: Any, context_lens: Any,
           query_start: Any) -> "StepInfo":
        """Read off the step's metadata tensors (a device sync where they live on the GPU)."""
        starts = query_start.tolist()
        return cls(len(context_lens), len(tokens), max(b - a for a, b in zip(starts, starts[1:])),
                   int(context_lens.max()))


class TargetUnavailableError(ValueError):
    """A known target that this build or this machine cannot run, with the way out."""


def _always() -> str | None:
    return None


def _gpu() -> str | None:
    import torch

    return None if torch.cuda.is_available() else "this machine has no CUDA GPU"


def _importable(package: str, what: str) -> Callable[[], str | None]:
    def check() -> str | None:
        return None if importlib.util.find_spec(package) is not None else f"{what} ({package}) does not import here"
    return check


@dataclass(frozen=True)
class Backend:
    """One compile target: where its lowering lives and what it needs."""

    name: str
    module: str                                   # kiln.backends.<module>.compile(graph) -> executable
    pipeline: str                                 # the named pipeline (passes.pipelines) run before lowering
    summary: str
    requires: Callable[[], str | None] = _always  # why this machine cannot run it, or None
    builds_offline: bool = False                  # its build step writes its files where `requires` fails, then stops

    @property
    def in_build(self) -> bool:
        return importlib.util.find_spec(f"{__name__}.{self.module}") is not None

    @property
    def offline(self) -> bool:
        """Whether this machine lacks what the target runs on, but its build step still writes its files."""
        return self.builds_offline and self.in_build and self.requires() is not None

    def missing(self) -> str | None:
        """Why this target cannot be used here: not in this build, or the machine lacks what it needs."""
        if not self.in_build:
            return f"this build of kiln has no {self.name} backend yet (kiln/backends/{self.module}.py)"
        return self.requires()

    def build(self, graph: Graph, **options: Any) -> dict[str, Any]:
        """Ahead-of-time work at compile time (a TensorRT engine, an ONNX file in output_dir); returns
        the options its `compile` takes later. A backend module without `build` has none."""
        why = self.missing()
        if why is not None and not self.offline:
            raise unavailable(self.name, why)
        module = importlib.import_module(f"{__name__}.{self.module}")
        if hasattr(module, "build"):
            return module.build(graph, **options)
        if options.get("output_dir") is not None:
            raise ValueError(f"target {self.name!r} writes no files ahead of serving; output_dir is for the targets "
                             f"that do: {', '.join(n for n, b in BACKENDS.items() if b.builds_files)}")
        return {}

    @property
    def builds_files(self) -> bool:
        return self.in_build and hasattr(importlib.import_module(f"{__name__}.{self.module}"), "build")

    def compile(self, graph: Graph, **options: Any) -> Any:
        """The executable of a serving graph on this backend."""
        why = self.missing()
        if why is not None:
            raise unavailable(self.name, why)
        return importlib.import_module(f"{__name__}.{self.module}").compile(graph, **options)


BACKENDS: dict[str, Backend] = {b.name: b for b in [
    Backend("reference", "reference", "serving", "kiln's IR interpreter (the ops' torch implementations), CPU or GPU"),
    Backend("cuda", "cuda", "cuda", "kiln's Triton kernels and CUDA graphs", _gpu),
    Backend("trt", "trt", "trt", "a TensorRT engine (kiln's kernels as plugins)", _importable("tensorrt", "TensorRT"),
            builds_offline=True),
    Backend("onnx", "onnx", "onnx", "an ONNX model run by onnxruntime", _importable("onnxruntime", "onnxruntime")),
]}
"""Target name -> backend."""

AUTO_ORDER = ("trt", "cuda", "reference")
"""What target="auto" tries, fastest first; the last one always runs."""


def unavailable(target: str, why: str) -> TargetUnavailableError:
    return TargetUnavailableError(
        f"target {target!r} is not available: {why}. target='reference' runs the same compiled graph on "
        f"kiln's reference interpreter (exact, slow; CPU or GPU), and target='auto' picks the fastest "
        f"target available here")


def select(target: str) -> tuple[Backend, str]:
    """The backend for a target name ("auto" resolved), and why it was chosen."""
    if target == "auto":
        skipped = []
        for name in AUTO_ORDER:
            why = BACKENDS[name].missing()
            if why is None:
                return BACKENDS[name], "; ".join([f"auto chose {name}, the fastest target available here", *skipped])
            skipped.append(f"not {name}: {why}")
        raise TargetUnavailableError(f"no target is available here: {'; '.join(skipped)}")
    if target not in BACKENDS:
        raise ValueError(f"unknown target {target!r}; known targets: auto, {', '.join(BACKENDS)}")
    why = BACKENDS[target].missing()
    if why is not None and BACKENDS[target].offline:
        return BACKENDS[target], f"{target} was asked for; {why}, so its files are written and the build stops there"
    if why is not None:
        raise unavailable(target, why)
    return BACKENDS[target], f"{target} was asked for"

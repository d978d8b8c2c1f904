"""The IR's interpreter: runs any graph with the registry's torch reference implementations, on
CPU or GPU. It is the numerics oracle of every test and the reference backend, and passes use
it to evaluate what a subgraph computes. It checks as it goes: input dtypes and shapes against
the signature (binding symbolic dims), and every result against its type."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

from .graph import Graph, Op, Value
from .ops.quant import unpack_i4
from .printer import format_op, op_line_numbers
from .types import DType, TensorType, eval_dim


class ExecutionError(RuntimeError):
    """Inputs that do not fit the graph, a missing parameter, or an op whose result broke its type."""


def bind_symbols(graph: Graph, inputs: Sequence[torch.Tensor]) -> dict[str, int]:
    """Check inputs against the signature and return the values of its symbolic dims."""
    if len(inputs) != len(graph.inputs):
        names = ", ".join(v.ref for v in graph.inputs)
        raise ExecutionError(f"@{graph.name} takes {len(graph.inputs)} inputs ({names}), got {len(inputs)}")
    bindings: dict[str, int] = {}
    deferred = []
    for v, t in zip(graph.inputs, inputs):
        if not isinstance(t, torch.Tensor):
            raise ExecutionError(f"input {v.ref} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != v.type.dtype.torch:
            raise ExecutionError(f"input {v.ref} must be {v.type.dtype} ({v.type.dtype.torch}), got {t.dtype}")
        if t.dim() != v.type.rank:
            raise ExecutionError(f"input {v.ref}: {v.type} has rank {v.type.rank}, got shape {tuple(t.shape)}")
        for i, (d, n) in enumerate(zip(v.type.shape, t.shape)):
            if isinstance(d, int):
                if d != n:
                    raise ExecutionError(f"input {v.ref}: dim {i} must be {d} for {v.type}, got {n}")
            elif d.isidentifier():
                if bindings.setdefault(d, n) != n:
                    raise ExecutionError(f"input {v.ref}: dim {i} is {d}={n}, but another input set {d}={bindings[d]}")
            else:
                deferred.append((v, i, d, n))
    for v, i, d, n in deferred:
        try:
            want = eval_dim(d, bindings)
        except KeyError as e:
            raise ExecutionError(f"input {v.ref}: {e.args[0]}") from None
        if want != n:
            raise ExecutionError(f"input {v.ref}: dim {i} is {d}={want} here, got {n}")
    return bindings


def load_param(v: Value, device: torch.device | str) -> torch.Tensor:
    """A parameter's data as the graph computes with it (i4 unpacked to one int8 per value)."""
    if v.storage is None:
        raise ExecutionError(f"parameter {v.ref} has no data: load the model's weights or pass "
                             f"params={{'{v.name}': tensor}}")
    t = v.storage.load()
    if v.type.dtype is DType.i4 and t.dtype == torch.uint8:
        t = unpack_i4(t)
    return t.to(device)


@dataclass
class ReferenceExecutable:
    """A graph prepared for repeated runs: parameters are loaded once, on first use."""

    graph: Graph
    device: torch.device | str = "cpu"
    check_types: bool = True
    params: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._last_use = {}
        for i, op in enumerate(self.graph.ops):
            for v in op.operands:
                self._last_use[id(v)] = i
        self._outputs = {id(v) for v in self.graph.outputs}
        self._symbolic_attrs = {id(op): [k for k, spec in op.opdef.attrs.items()
                                         if spec.kind.name.split(" ")[0] in ("Shape", "Dim")
                                         and _has_symbol(op.attrs[k])]
                                for op in self.graph.ops}

    def load_params(self) -> None:
        """Read every parameter now: a server loads its weights at start, not on its first request."""
        for v in self.graph.params.values():
            self._param(v)

    def _param(self, v: Value) -> torch.Tensor:
        if v.name not in self.params:
            self.params[v.name] = load_param(v, self.device)
        t = self.params[v.name]
        if self.check_types:
            _check_tensor(v.type, t, {}, lambda: f"parameter {v.ref}")
        return t

    def __call__(self, *inputs: torch.Tensor, symbols: Mapping[str, int] | None = None) -> list[torch.Tensor]:
        """Run on `inputs`; `symbols` gives dims no input carries (a graph with no inputs)."""
        bindings = {**(symbols or {}), **bind_symbols(self.graph, inputs)}
        env: dict[int, torch.Tensor] = {id(v): t.to(self.device) for v, t in zip(self.graph.inputs, inputs)}
        for i, op in enumerate(self.graph.ops):
            args = [env[id(v)] if id(v) in env else self._param(v) if v.is_param else _undefined(op, v)
                    for v in op.operands]
            try:
                attrs = _resolve(op, self._symbolic_attrs[id(op)], bindings)
            except KeyError as e:  # an attribute's symbol that no input binds
                raise ExecutionError(f"{self._where(op)}: {e.args[0]}") from None
            try:
                with torch.no_grad():
                    results = op.opdef.run_reference(*args, **attrs)
            except Exception as e:
                raise ExecutionError(f"{self._where(op)}: {type(e).__name__}: {e}") from e
            if not args:  # constants and aranges are made on the CPU
                results = tuple(t.to(self.device) if isinstance(t, torch.Tensor) else t for t in results)
            for r, t in zip(op.results, results):
                if self.check_types:
                    _check_tensor(r.type, t, bindings, lambda: self._where(op))
                env[id(r)] = t
            for v in op.operands:
                if self._last_use.get(id(v)) == i and id(v) not in self._outputs:
                    env.pop(id(v), None)
        return [env[id(v)] if id(v) in env else self._param(v) for v in self.graph.outputs]

    def _where(self, op: Op) -> str:
        return f"line {op_line_numbers(self.graph)[id(op)]}: '{format_op(op)}'"


def _undefined(op: Op, v: Value) -> torch.Tensor:
    raise ExecutionError(f"{op.name} uses {v.ref}, which is not defined before it (verify the graph)")


def _has_symbol(value: Any) -> bool:
    if isinstance(value, str):
        return True
    return isinstance(value, tuple) and any(isinstance(d, str) for d in value)


def _resolve(op: Op, keys: list[str], bindings: Mapping[str, int]) -> dict[str, Any]:
    if not keys:
        return op.attrs
    attrs = dict(op.attrs)
    for k in keys:
        v = attrs[k]
        attrs[k] = eval_dim(v, bindings) if isinstance(v, str) else tuple(
            eval_dim(d, bindings) if isinstance(d, str) else d for d in v)
    return attrs


def _check_tensor(t: TensorType, x: Any, bindings: Mapping[str, int], where: Callable[[], str]) -> None:
    if not isinstance(x, torch.Tensor):
        raise ExecutionError(f"{where()}: the reference returned {type(x).__name__}, not a tensor")
    if x.dtype != t.dtype.torch:
        raise ExecutionError(f"{where()}: result is {x.dtype} but the IR says {t}")
    try:
        shape = t.concrete(bindings)
    except KeyError:
        return  # a symbol no input binds (made inside the graph); nothing to compare against
    if tuple(x.shape) != shape:
        raise ExecutionError(f"{where()}: result has shape {tuple(x.shape)} but the IR says {t} = {shape}")


def compile(graph: Graph, *, device: torch.device | str = "cpu", check_types: bool = True,
            params: Mapping[str, torch.Tensor] | None = None) -> ReferenceExecutable:
    """Prepare `graph` to run; `params` supplies data for parameters without storage."""
    exe = ReferenceExecutable(graph, device, check_types)
    for name, t in (params or {}).items():
        if name not in graph.params:
            raise ExecutionError(f"params names @{name}, which @{graph.name} does not declare")
        exe.params[name] = t.to(device)
    return exe


def run(graph: Graph, *inputs: torch.Tensor, device: torch.device | str = "cpu",
        params: Mapping[str, torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Run `graph` once on `inputs` and return its outputs."""
    return compile(graph, device=device, params=params)(*inputs)

"""Numerical equivalence of graphs: fresh random inputs and parameters for any graph, and the
check that a rewritten graph computes the same function as the original on the reference
backend. Used by kiln's tests, by `irdump --check`, and by anyone writing a pass."""

from __future__ import annotations

from typing import Mapping

import torch

from .backends import reference
from .ir.graph import Graph
from .ir.types import DType, TensorType


def random_tensor(t: TensorType, bindings: Mapping[str, int], generator: torch.Generator,
                  int_high: int = 16) -> torch.Tensor:
    """Random data of type `t`: normal floats, ints in [0, int_high), random bools; never zeros."""
    shape = t.concrete(bindings)
    if t.dtype.is_float:
        return torch.randn(shape, generator=generator).to(t.dtype.torch)
    if t.dtype is DType.bool:
        return torch.rand(shape, generator=generator) < 0.5
    if t.dtype is DType.i4:
        return torch.randint(-8, 8, shape, generator=generator, dtype=torch.int8)
    return torch.randint(0, int_high, shape, generator=generator).to(t.dtype.torch)


def random_inputs(graph: Graph, bindings: Mapping[str, int], *, seed: int = 0, int_high: int = 16,
                  overrides: Mapping[str, torch.Tensor] | None = None) -> list[torch.Tensor]:
    """One random tensor per graph input; `overrides` fixes chosen inputs by name."""
    g = torch.Generator().manual_seed(seed)
    overrides = overrides or {}
    return [overrides[v.name] if v.name in overrides else random_tensor(v.type, bindings, g, int_high)
            for v in graph.inputs]


def random_params(graph: Graph, *, seed: int = 0, scale: float = 0.5) -> dict[str, torch.Tensor]:
    """Random data for every parameter without storage (float weights scaled by `scale`)."""
    g = torch.Generator().manual_seed(seed + 1)
    out = {}
    for name, v in graph.params.items():
        if v.storage is None:
            t = random_tensor(v.type, {}, g)
            out[name] = t * scale if v.type.dtype.is_float else t
    return out


def _param_data(graph: Graph, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: params[n] for n in graph.params if n in params}


def assert_same_function(before: Graph, after: Graph, bindings: Mapping[str, int], *, seed: int = 0,
                         params: Mapping[str, torch.Tensor] | None = None, atol: float = 1e-5,
                         rtol: float = 1e-5, int_high: int = 16) -> None:
    """Run both graphs on the same fresh random inputs and parameters and compare every output.

    Parameters without storage get random data, shared by name between the two graphs."""
    if [v.type for v in before.inputs] != [v.type for v in after.inputs]:
        raise AssertionError("the graphs take different inputs: "
                             f"{[str(v.type) for v in before.inputs]} vs {[str(v.type) for v in after.inputs]}")
    shared = {**random_params(before, seed=seed), **random_params(after, seed=seed), **(params or {})}
    inputs = random_inputs(before, bindings, seed=seed, int_high=int_high)
    a = reference.run(before, *inputs, params=_param_data(before, shared))
    b = reference.run(after, *inputs, params=_param_data(after, shared))
    if len(a) != len(b):
        raise AssertionError(f"{len(a)} outputs before, {len(b)} after")
    for i, (x, y) in enumerate(zip(a, b)):
        if x.dtype != y.dtype or x.shape != y.shape:
            raise AssertionError(f"output {i}: {x.dtype}{tuple(x.shape)} before, {y.dtype}{tuple(y.shape)} after")
        if x.dtype.is_floating_point:
            torch.testing.assert_close(y, x, atol=atol, rtol=rtol, equal_nan=True, msg=lambda m: f"output {i}: {m}")
        elif not torch.equal(x, y):
            raise AssertionError(f"output {i} differs at {int((x != y).sum())} elements")


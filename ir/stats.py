"""Op counts, parameter bytes and estimated FLOPs and bytes moved, per op kind: the numbers
that say where a graph's time will go (`irdump --stats`). Symbolic dims are evaluated at the
bindings given (unbound symbols count as 1)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from .graph import Graph
from .registry import default_cost


@dataclass
class OpKindStats:
    count: int = 0
    flops: int = 0
    bytes: int = 0


@dataclass
class GraphStats:
    bindings: dict[str, int]
    defaulted: list[str]
    ops: dict[str, OpKindStats] = field(default_factory=dict)
    num_params: int = 0
    param_elements: int = 0
    param_bytes: int = 0

    @property
    def flops(self) -> int:
        return sum(s.flops for s in self.ops.values())

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.ops.values())


def graph_stats(graph: Graph, bindings: Mapping[str, int] | None = None) -> GraphStats:
    symbols = set().union(*(v.type.symbols for v in graph.values())) if graph.ops or graph.inputs else set()
    given = dict(bindings or {})
    defaulted = sorted(symbols - set(given))
    env = {**{s: 1 for s in defaulted}, **given}
    stats = GraphStats(env, defaulted)
    for p in graph.params.values():
        stats.num_params += 1
        stats.param_elements += p.type.numel()
        stats.param_bytes += p.type.nbytes()
    for op in graph.ops:
        s = stats.ops.setdefault(op.name, OpKindStats())
        flops, moved = default_cost(op.opdef, [v.type for v in op.operands], [r.type for r in op.results],
                                    op.attrs, env)
        s.count += 1
        s.flops += flops
        s.bytes += moved
    stats.ops = dict(sorted(stats.ops.items(), key=lambda kv: (-kv[1].flops, -kv[1].bytes, kv[0])))
    return stats


def _human(n: float, unit: str) -> str:
    for prefix in ("", "K", "M", "G", "T", "P"):
        if abs(n) < 1000 or prefix == "P":
            return f"{n:.0f} {unit}" if prefix == "" else f"{n:.2f} {prefix}{unit}"
        n /= 1000
    return f"{n} {unit}"


def format_stats(stats: GraphStats) -> str:
    at = ", ".join(f"{k}={v}" for k, v in sorted(stats.bindings.items())) or "static shapes"
    lines = [f"// stats at {at}" + (f" ({', '.join(stats.defaulted)} defaulted to 1; set with --dim NAME=N)"
                                    if stats.defaulted else "")]
    lines.append(f"parameters: {stats.num_params} tensors, {stats.param_elements:,} elements, "
                 f"{_human(stats.param_bytes, 'B')}")
    lines.append(f"{'op':<24} {'count':>6} {'flops':>12} {'bytes moved':>13} {'flop/byte':>10}")
    for name, s in stats.ops.items():
        intensity = f"{s.flops / s.bytes:.2f}" if s.bytes else "-"
        lines.append(f"{name:<24} {s.count:>6} {_human(s.flops, 'FLOP'):>12} {_human(s.bytes, 'B'):>13} {intensity:>10}")
    total = sum(s.count for s in stats.ops.values())
    intensity = f"{stats.flops / stats.bytes:.2f}" if stats.bytes else "-"
    lines.append(f"{'total':<24} {total:>6} {_human(stats.flops, 'FLOP'):>12} {_human(stats.bytes, 'B'):>13} {intensity:>10}")
    return "\n".join(lines) + "\n"

"""Moving a per-channel scale across a linear's input, the step SmoothQuant and AWQ share:

    y = linear(x, W) = linear(x / s, W * s)

with x / s folded into whatever computes x, where that is exact:

- `llm.rms_norm(h, g)` / `llm.layer_norm(h, g, b)`: g / s (and b / s);
- the attention output feeding o_proj: the rows of the v projection / s, one scale per kv channel
  (a query head's output channel (h, d) is a mix of v's channel (h // group, d) only, so under
  grouped-query attention the heads that share a kv head share its scales);
- `llm.silu_mul(gate, up)` feeding down_proj: the rows of the up projection / s (silu(g) * up / s).

A `LinearGroup` is the linears that read one input (merge-linears makes q/k/v and gate/up one
linear each); its `Fold`, when there is one, says which parameters take 1/s. The rewrites are lazy:
scaled parameters are `ScaledStorage`s of the originals, computed on first load.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import torch

from ..ir.graph import Graph, Op, Value
from ..ir.storage import Storage
from ..ir.types import TensorType
from .calibrate import Calibration
from .pattern import OneOf, P, Var
from .quantize import fresh_param


@dataclass(eq=False)
class ScaledStorage(Storage):
    """`source` with entries start:end along `axis` multiplied by `factor` (one per index), in f32,
    rounded back to the source's dtype."""

    source: Storage
    factor: torch.Tensor
    axis: int
    start: int
    end: int
    type: TensorType = field(init=False)

    def __post_init__(self) -> None:
        self.type = self.source.type

    def load(self) -> torch.Tensor:
        t = self.source.load()
        out = t.float().clone()
        shape = [1] * t.dim()
        shape[self.axis] = -1
        sl = [slice(None)] * t.dim()
        sl[self.axis] = slice(self.start, self.end)
        out[tuple(sl)] *= self.factor.float().reshape(shape)
        return out.to(t.dtype)

    def describe(self) -> str:
        return f"({self.source.describe()}) scaled per index {self.start}:{self.end} of axis {self.axis}"


@dataclass(eq=False)
class ClippedStorage(Storage):
    """`source` clamped to [lower, bound] (lower None: [-bound, bound]) per group of `group_size`
    along the last dim (bounds [rows, groups]): AWQ's weight clipping."""

    source: Storage
    bound: torch.Tensor
    group_size: int
    lower: torch.Tensor | None = None
    type: TensorType = field(init=False)

    def __post_init__(self) -> None:
        self.type = self.source.type

    def load(self) -> torch.Tensor:
        t = self.source.load()
        g = t.float().reshape(t.shape[0], -1, self.group_size)
        hi = self.bound.float()[..., None]
        lo = -hi if self.lower is None else self.lower.float()[..., None]
        return torch.minimum(torch.maximum(g, lo), hi).reshape(t.shape).to(t.dtype)

    def describe(self) -> str:
        return f"({self.source.describe()}) clipped per group of {self.group_size}"


@dataclass(frozen=True)
class Target:
    """A parameter operand of `op` whose entries start:end along `axis` take 1/s."""

    op: Op
    index: int
    axis: int
    start: int
    end: int


@dataclass
class Fold:
    """Where x / s goes: `targets` take 1/s of the fold channels; x's channel j uses fold channel
    tie[j] (the identity except under grouped-query attention); `kv_key` names the calibration
    entry of the values that the fold rescales (an attention's v cache)."""

    kind: str
    tie: torch.Tensor
    targets: list[Target]
    kv_key: str | None = None

    @property
    def channels(self) -> int:
        return int(self.tie.max()) + 1


@dataclass
class LinearGroup:
    """The linears that read `x`, and how x / s can be folded upstream (or why it cannot)."""

    x: Value
    linears: list[Op]
    fold: Fold | None
    why_not: str = ""

    @property
    def where(self) -> str:
        return self.linears[0].loc or self.linears[0].operands[1].name

    def excluded_by(self, patterns: tuple[str, ...]) -> str | None:
        """The fnmatch pattern (on a weight name, its module, or an op's loc) that excludes the group."""
        names = [n for op in self.linears for n in (op.operands[1].name, op.operands[1].name.removesuffix(".weight"),
                                                     op.loc or "")]
        return next((p for p in patterns if any(fnmatch.fnmatchcase(n, p) for n in names)), None)

    def weight(self) -> torch.Tensor:
        """The group's weights stacked along output channels, f32 [sum N, K]."""
        return torch.cat([op.operands[1].storage.load().float() for op in self.linears])


# -- finding folds --------------------------------------------------------------------------------

def _param(v: Value) -> bool:
    return v.is_param and v.storage is not None and v.type.is_static


_RMS_NORM = P("llm.rms_norm", Var("h"), Var("g", where=_param))
_LAYER_NORM = OneOf(P("llm.layer_norm", Var("h"), Var("g", where=_param), Var("beta", where=_param)),
                    P("llm.layer_norm", Var("h"), Var("g", where=_param)))


def _projection(prefix: str) -> OneOf:
    """A linear's output columns, whole or sliced along the last dim."""
    proj = P("llm.linear", Var(prefix + "in"), Var(prefix + "w", where=_param), name=prefix + "proj", variadic=True)
    return OneOf(P("core.slice", proj, name=prefix + "slice", attrs={"step": 1}), proj)


_HEADS = {"dims": (0, 2, 1, 3)}
_ATTENTION_OUT = P("core.reshape", P("core.permute", P("llm.attention", Var("q"), Var("k"),
                   P("core.permute", P("core.reshape", _projection("v"), name="vheads"), attrs=_HEADS),
                   name="attn", variadic=True), attrs=_HEADS, name="out_heads"))
_SILU_MUL = P("llm.silu_mul", Var("gate"), _projection("u"))


def _only_users(graph: Graph, v: Value, allowed: list[Op]) -> bool:
    return graph.num_uses(v) == len(graph.users(v)) and all(u in allowed for u in graph.users(v))


def _rows(graph: Graph, m: dict, prefix: str) -> tuple[int, int] | None:
    """The output columns start:end of projection `prefix` that the match reads, if scaling just
    those rows changes nothing else (every other reader slices a disjoint range)."""
    proj = m[prefix + "proj"]
    n = proj.type.shape[-1]
    if prefix + "slice" not in m:
        return (0, n) if graph.num_uses(proj) == 1 else None
    sl = m[prefix + "slice"].op
    if sl.attrs["dim"] % proj.type.rank != proj.type.rank - 1:
        return None
    start, end = sl.attrs["start"], n if sl.attrs["end"] is None else min(sl.attrs["end"], n)
    if not isinstance(start, int) or not isinstance(end, int) or graph.num_uses(m[prefix + "slice"]) != 1:
        return None
    for u in graph.users(proj):
        if u is sl:
            continue
        if u.name != "core.slice" or u.attrs["dim"] % proj.type.rank != proj.type.rank - 1 or u.attrs["step"] != 1:
            return None
        s, e = u.attrs["start"], n if u.attrs["end"] is None else min(u.attrs["end"], n)
        if not isinstance(s, int) or not isinstance(e, int) or (s < end and start < e):
            return None
    return start, end


def _projection_targets(m: dict, prefix: str, rows: tuple[int, int]) -> list[Target]:
    op = m[prefix + "proj"].op
    targets = [Target(op, 1, 0, *rows)]
    if len(op.operands) == 3:
        if not _param(op.operands[2]):
            return []
        targets.append(Target(op, 2, 0, *rows))
    return targets


def _norm_fold(x: Value, k: int) -> Fold:
    norm = x.op
    targets = [Target(norm, i, 0, 0, k) for i in range(1, len(norm.operands))]
    return Fold(norm.name.split(".")[1], torch.arange(k), targets)


def _attention_fold(graph: Graph, m: dict, x: Value) -> Fold | None:
    attn, vheads, out_heads = m["attn"].op, m["vheads"], m["out_heads"]
    rows = _rows(graph, m, "v")
    if rows is None:
        return None
    _, heads, _, dim = attn.results[0].type.shape
    source = vheads.op.operands[0].type
    if vheads.type.rank != 4 or tuple(vheads.type.shape[:2]) != tuple(source.shape[:-1]):
        return None
    kv_heads, vdim = vheads.type.shape[2:]
    if not all(isinstance(d, int) for d in (heads, kv_heads, dim, vdim)) or vdim != dim or heads % kv_heads:
        return None
    if rows[1] - rows[0] != kv_heads * dim or x.type.shape[-1] != heads * dim:
        return None
    if tuple(x.type.shape[:-1]) != tuple(out_heads.type.shape[:2]):
        return None
    chain = [vheads, attn.operands[2], attn.results[0], out_heads]
    if any(graph.num_uses(v) != 1 for v in chain):
        return None
    targets = _projection_targets(m, "v", rows)
    if not targets:
        return None
    group = heads // kv_heads
    h, d = torch.arange(heads).repeat_interleave(dim), torch.arange(dim).repeat(heads)
    index = [o for o in graph.ops if o.name == "llm.attention"].index(attn)
    return Fold("attention-v", (h // group) * dim + d, targets, kv_key=f"v_cache.{index}")


def _silu_fold(graph: Graph, m: dict, x: Value) -> Fold | None:
    rows = _rows(graph, m, "u")
    if rows is None or rows[1] - rows[0] != x.type.shape[-1]:
        return None
    up = m["uslice"] if "uslice" in m else m["uproj"]
    if graph.num_uses(up) != 1 or m["gate"] is up:
        return None
    targets = _projection_targets(m, "u", rows)
    return Fold("silu-mul-up", torch.arange(x.type.shape[-1]), targets) if targets else None


def find_fold(graph: Graph, x: Value) -> Fold | None:
    """How x / s can be folded into what computes x, or None."""
    k = x.type.shape[-1]
    for pattern in (_RMS_NORM, _LAYER_NORM):
        if next(iter(pattern.match(graph, x, {})), None) is not None:
            return _norm_fold(x, k)
    m = next(iter(_ATTENTION_OUT.match(graph, x, {})), None)
    if m is not None:
        return _attention_fold(graph, m, x)
    m = next(iter(_SILU_MUL.match(graph, x, {})), None)
    if m is not None:
        return _silu_fold(graph, m, x)
    return None


def linear_groups(graph: Graph) -> list[LinearGroup]:
    """Every value read by llm.linears with parameter weights, in graph order, with its fold."""
    groups: dict[int, LinearGroup] = {}
    for op in graph.ops:
        if op.name != "llm.linear" or not _param(op.operands[1]) or op.operands[1].type.rank != 2:
            continue
        x = op.operands[0]
        if id(x) in groups:
            groups[id(x)].linears.append(op)
            continue
        groups[id(x)] = LinearGroup(x, [op], None)
    out = []
    for g in groups.values():
        users = graph.users(g.x)
        if not isinstance(g.x.type.shape[-1], int):
            g.why_not = "its input has a symbolic channel count"
        elif any(u not in g.linears or u.operands[0] is not g.x for u in users) or g.x in graph.outputs:
            g.why_not = f"its input {g.x.ref} is also read by other ops"
        elif any(graph.num_uses(o.operands[1]) != 1 for o in g.linears):
            g.why_not = "its weight is shared with another op"
        else:
            g.fold = find_fold(graph, g.x)
            if g.fold is None:
                g.why_not = (f"what computes its input ({g.x.op.name if g.x.op else g.x.ref}) cannot take a "
                             f"per-channel scale exactly")
        out.append(g)
    return out


# -- applying a scale -----------------------------------------------------------------------------

def replace_operand(graph: Graph, op: Op, index: int, storage: Storage, suffix: str,
                     calibration: Calibration) -> None:
    """Make `op` read a new parameter instead of operand `index`; statistics keyed by the old
    name move to the new one."""
    old = op.operands[index]
    new = graph.add_param(fresh_param(graph, f"{old.name}.{suffix}"), old.type, storage)
    graph.set_operands(op, tuple(new if i == index else v for i, v in enumerate(op.operands)))
    if graph.num_uses(old) == 0 and old not in graph.outputs:
        graph.remove_param(old.name)
        if old.name in calibration:
            calibration[new.name] = calibration.pop(old.name)


def apply_scale(graph: Graph, group: LinearGroup, s: torch.Tensor, calibration: Calibration, suffix: str
                ) -> Calibration:
    """x -> x / s (folded upstream), W -> W * s for every linear of the group; s is one positive
    scale per fold channel. Returns the calibration with the statistics that moved divided by s."""
    fold = group.fold
    s = s.float()
    s_x = s[fold.tie]
    out = dict(calibration)
    for t in fold.targets:
        p = t.op.operands[t.index]
        replace_operand(graph, t.op, t.index, ScaledStorage(p.storage, 1.0 / s, t.axis, t.start, t.end), suffix,
                         out)
    for op in group.linears:
        w = op.operands[1]
        replace_operand(graph, op, 1, ScaledStorage(w.storage, s_x, 1, 0, w.type.shape[1]), suffix, out)
        if op.operands[1].name in out:
            out[op.operands[1].name] = out[op.operands[1].name].divided(s_x)
    if fold.kv_key is not None and fold.kv_key in out:
        out[fold.kv_key] = out[fold.kv_key].divided(s)
    return out


def tied_max(values: torch.Tensor, fold: Fold) -> torch.Tensor:
    """Per fold channel, the max of `values` over the x channels tied to it."""
    out = torch.full((fold.channels,), float("-inf"))
    return out.scatter_reduce(0, fold.tie, values.float(), "amax")


def tied_mean(values: torch.Tensor, fold: Fold) -> torch.Tensor:
    """Per fold channel, the mean of `values` over the x channels tied to it."""
    out = torch.zeros(fold.channels)
    return out.scatter_reduce(0, fold.tie, values.float(), "mean", include_self=False)

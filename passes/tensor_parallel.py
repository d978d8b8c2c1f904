"""`shard{tp=N,rank=R}`: the graph that rank R of N-way tensor parallelism runs (Megatron-style;
docs/tensor_parallel.md).

- Attention: each rank computes a contiguous range of query heads and the KV heads those read
  (`head_shard`). Their rows of the q/k/v projection are column-parallel: after merge-linears
  that is one linear whose q, k and v row blocks are each cut by heads. o_proj is row-parallel:
  it reads the rank's heads only, and `dist.all_reduce` sums the ranks' partial outputs.
- MLP: the intermediate columns are split evenly: gate/up column-parallel, down row-parallel
  followed by `dist.all_reduce`.
- Vocabulary: the token embedding looks up the rank's rows only (other ids give zeros) and sums
  over ranks; the lm_head computes the rank's vocabulary rows, gathered by `dist.all_gather`
  (padded to equal shards where N does not divide the vocabulary, and cut back after).
- Everything else (norms, the residual stream, rope) is computed on every rank.

How: anchors (each attention, each MLP activation) say which rows of their operands the rank
needs; those demands walk back through reshapes, slices, permutes, rope and elementwise ops to
the linears that make them, which become column-parallel. One walk over the graph then carries
each split forward: shape attributes that count heads are rewritten, a linear that reads a split
input becomes row-parallel, reductions over a split axis are completed by an all-reduce, and
weights become lazily read slices (a dequantized weight: its quantized values, scales and zero
points along the same axis; per-tensor scales stay whole, so they are the same on every rank).

KV heads: with at least as many KV heads as ranks, each rank takes whole KV groups (a KV head
and its query heads), the first ranks one more where N does not divide them (SmolLM2's 9 query
and 3 KV heads on 2 ranks: rank 0 gets KV heads 0-1 and query heads 0-5, rank 1 KV head 2 and
query heads 6-8). With fewer KV heads than ranks, each KV head is replicated on a team of ranks
that split its query heads. Either way each rank holds exactly the KV heads its query heads
read, and a paged KV cache holds the rank's KV heads only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..ir.builder import Builder
from ..ir.graph import Graph, Op, Value
from ..ir.ops.infer import normalize_axis
from ..ir.printer import format_op
from ..ir.registry import OpError
from ..ir.storage import SlicedStorage, Storage, row_rule, slice_storage, take
from ..ir.types import Dim, DType, TensorType, dim_product
from .manager import register_pass, remark
from .pattern import OneOf, P, Var
from .quantize import AmaxScaleStorage

Segments = tuple[tuple[int, int], ...]


class ShardError(ValueError):
    """A graph, or a degree of parallelism, that the shard pass cannot split (the message says why)."""


@dataclass(frozen=True)
class Split:
    """This rank holds `segments` ([start, end) ranges of the whole axis, in this order) of `axis`,
    whose size over all ranks is `size`."""

    axis: int
    segments: Segments
    size: int

    @property
    def local(self) -> int:
        return sum(b - a for a, b in self.segments)

    def scaled(self, axis: int, divisor: int, size: int) -> Split:
        if any(a % divisor or b % divisor for a, b in self.segments):
            raise ShardError(f"rows {_fmt(self.segments)} do not fall on groups of {divisor}")
        return Split(axis, _divided(self.segments, divisor), size)


def _divided(segments: Segments, divisor: int) -> Segments:
    return tuple((a // divisor, b // divisor) for a, b in segments)


def _fmt(segments: Segments) -> str:
    return ",".join(f"{a}:{b}" for a, b in segments)


def _union(segments: list[tuple[int, int]]) -> Segments:
    out: list[tuple[int, int]] = []
    for a, b in sorted(segments):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(b, out[-1][1]))
        else:
            out.append((a, b))
    return tuple(out)


def balanced(n: int, parts: int, i: int) -> tuple[int, int]:
    """Part i of [0, n) cut into `parts` contiguous ranges, the first ones one longer where needed."""
    base, extra = divmod(n, parts)
    start = i * base + min(i, extra)
    return start, start + base + (i < extra)


@dataclass(frozen=True)
class HeadShard:
    """The query heads and KV heads ([start, end)) one rank computes."""

    q: tuple[int, int]
    kv: tuple[int, int]


def head_shard(heads: int, kv_heads: int, tp: int, rank: int) -> HeadShard:
    """Whole KV groups per rank where there are at least `tp` KV heads; else each KV head on a team
    of ranks that split its query heads. No rank holds more KV heads than rank 0, whose KV pool
    the runtime sizes."""
    if heads % kv_heads:
        raise ShardError(f"{heads} query heads are not a multiple of {kv_heads} KV heads")
    if tp > heads:
        raise ShardError(f"tp={tp} is more ranks than the model's {heads} query heads: use tp <= {heads}")
    group = heads // kv_heads
    if kv_heads >= tp:
        k0, k1 = balanced(kv_heads, tp, rank)
        return HeadShard((k0 * group, k1 * group), (k0, k1))
    kv = next(k for k in range(kv_heads) if balanced(tp, kv_heads, k)[0] <= rank < balanced(tp, kv_heads, k)[1])
    first, last = balanced(tp, kv_heads, kv)
    a, b = balanced(group, last - first, rank - first)
    return HeadShard((kv * group + a, kv * group + b), (kv, kv + 1))


def vocab_shard(vocab: int, tp: int, rank: int) -> tuple[tuple[int, int], int]:
    """The rank's vocabulary rows, and the width every rank pads its logits to (ceil(vocab / tp))."""
    width = -(-vocab // tp)
    start, end = min(rank * width, vocab), min((rank + 1) * width, vocab)
    if start >= end:
        raise ShardError(f"a vocabulary of {vocab} leaves rank {rank} of {tp} no rows")
    return (start, end), width


# -- linears ---------------------------------------------------------------------------------------

_WEIGHT_NAMES = ("weight", "wq", "qweight", "w", "q")
_ACTIVATION_SIDE = ("x_scale", "x_zero_point", "input_scale", "input_zero_point")
Axis = tuple[int, int]
"""(dim, divisor): rows [a, b) of a feature axis are rows [a // divisor, b // divisor) of this dim."""


@dataclass(frozen=True)
class LinearForm:
    """Where a linear-like op keeps its input and bias, and, for each operand that goes with its
    weight (the weight itself, scales, zero points), the dims that follow its output and input
    features (packed or grouped: a divisor), or None for a dim it does not have."""

    x: int
    weights: tuple[tuple[int, Axis | None, Axis | None], ...]
    bias: int | None = None


def linear_form(op: Op, types: Sequence[TensorType] | None = None) -> LinearForm | None:
    """llm.linear, or any op declared with a linear's operand names (x; weight, wq or qweight;
    scales and zero points; x_scale; bias): where each operand's dims fall is read off its shape
    against the input's K and the output's N ([N, K] weights, or AutoAWQ's [K, N/8]), so a fused
    quantized linear shards with no change here. `types`: the operands' types, if not theirs now."""
    names = [o.name for o in op.opdef.operands]
    weight = next((names.index(n) for n in _WEIGHT_NAMES if n in names), None)
    if not names or names[0] != "x" or weight is None or weight >= len(op.operands) or len(op.results) != 1:
        return None
    types = types or [v.type for v in op.operands]
    x, w, y = types[0], types[weight], op.results[0].type
    k, n = (x.shape[-1], y.shape[-1]) if x.rank and y.rank else (None, None)
    if not (isinstance(k, int) and isinstance(n, int)) or w.rank != 2:
        return None
    k_major = w.shape[1] != k and w.shape[0] == k
    bias = names.index("bias") if "bias" in names and names.index("bias") < len(types) else None
    weights = []
    for i in range(1, len(types)):
        if i == bias or names[i] in _ACTIVATION_SIDE:
            continue
        axes = _feature_axes(types[i].shape, n, k, k_major)
        if axes is None:
            return None  # an operand that does not follow the weight's shape
        weights.append((i, *axes))
    return LinearForm(0, tuple(weights), bias)


def _feature_axes(shape: tuple[Dim, ...], n: int, k: int, k_major: bool) -> tuple[Axis | None, Axis | None] | None:
    if not all(isinstance(d, int) and d > 0 for d in shape):
        return None
    if len(shape) == 0:
        return None, None                                    # per tensor
    if len(shape) == 1:
        return ((0, n // shape[0]), None) if n % shape[0] == 0 else None   # per output channel
    if len(shape) == 2:
        o, i = (1, 0) if k_major else (0, 1)
        if n % shape[o] or k % shape[i]:
            return None
        return (o, n // shape[o]), (i, k // shape[i])       # packed along N, grouped along K
    return None


# -- patterns --------------------------------------------------------------------------------------

_tokens = Var("tokens", where=lambda v: v.is_input and v.name == "tokens")
_views = ("core.reshape", "core.cast")


def _made_of_params(v: Value) -> bool:
    return v.is_param or (v.op is not None and v.op.opdef.is_pure and all(map(_made_of_params, v.op.operands)))


_token_ids = OneOf(_tokens, P(_views, _tokens), P(_views, P(_views, _tokens)))
TOKEN_EMBEDDING = OneOf(P("llm.embedding", Var("table", where=_made_of_params), _token_ids),
                        P("quant.embedding", Var("table", where=lambda v: v.is_param),
                          Var("scale", where=lambda v: v.is_param), _token_ids))
"""The lookup of the token ids (not a position table), vocab-parallel: a float table (or one dequantized
from parameters), or a quantized table and its row scales."""
_head = P(None, Var("x"), variadic=True, name="head", where=lambda m: linear_form(m.root.op) is not None)
LM_HEAD = OneOf(P("core.reshape", _head), _head)
"""The linear whose output, reshaped, is the graph's output: the logits."""
ATTENTIONS = ("llm.attention", "llm.paged_attention")
ACTIVATIONS = ("llm.silu_mul", "core.gelu", "core.relu", "core.silu")
"""An MLP's activation: split evenly over ranks, between column-parallel and row-parallel linears."""
REDUCTIONS = {"core.sum": "sum", "core.amax": "max", "core.amin": "min"}


def map_reshape(src: tuple[Dim, ...], dst: tuple[Dim, ...], split: Split) -> Split | None:
    """Where a split of `src`'s axis lands when `src` is reshaped to `dst` (a heads axis merged
    into or out of heads*head_dim, or leading dims dropped), or None if the rows it holds are
    not whole rows of one axis of `dst`."""
    outer, inner = dim_product(src[: split.axis]), dim_product(src[split.axis + 1:])
    if not isinstance(inner, int):
        return None
    flat = [(a * inner, b * inner) for a, b in split.segments]
    for b in range(len(dst) + 1):
        if dim_product(dst[:b]) != outer:
            continue
        for c in range(b, len(dst)):
            q = dim_product(dst[c + 1:])
            if (isinstance(q, int) and isinstance(dst[c], int) and dst[c] * q == split.size * inner
                    and all(x % q == 0 for seg in flat for x in seg)):
                return Split(c, tuple((a // q, e // q) for a, e in flat), dst[c])
            if dst[c] != 1:
                break
    return None


def _slice_bounds(op: Op, size: int) -> tuple[int, int]:
    start, end, step = op.attrs["start"], op.attrs["end"], op.attrs["step"]
    if step != 1 or not isinstance(start, int) or not isinstance(end, (int, type(None))):
        raise ShardError(f"'{format_op(op)}' slices a split axis with a step or a symbolic bound")
    lo = start + size if start < 0 else start
    hi = size if end is None or end >= size else end + size if end < 0 else end
    return max(lo, 0), hi


# -- the pass --------------------------------------------------------------------------------------

class _Sharder:
    def __init__(self, graph: Graph, tp: int, rank: int):
        self.graph, self.tp, self.rank = graph, tp, rank
        self.splits: dict[Value, Split] = {}
        self.columns: dict[Op, Segments] = {}
        self.taken: dict[tuple, Value] = {}
        self.replaced: dict[str, list[Value]] = {}
        self.dead: list[Op] = []
        self.order = list(graph.params)
        self.embeddings: set[Op] = set()
        self.head: Op | None = None
        self.changes = 0

    # -- planning: which linears are column-parallel, and which rows each keeps -------------------

    def plan(self) -> None:
        g = self.graph
        for op in g.ops:
            if op.name in ATTENTIONS:
                self._plan_attention(op)
            elif op.name in ACTIVATIONS:
                self._plan_activation(op)
            elif op.results and next(TOKEN_EMBEDDING.match(g, op.results[0], {}), None) is not None:
                self.embeddings.add(op)
        out = g.outputs[0] if len(g.outputs) == 1 else None
        found = next(LM_HEAD.match(g, out, {}), None) if out is not None else None
        if found is not None:
            self.head = found["head"].op
            self.columns.pop(self.head, None)
        else:
            remark("the logits are computed whole on every rank: the output is not a reshaped llm.linear")

    def _plan_attention(self, op: Op) -> None:
        q, k, v = op.operands[:3]
        heads, kv_heads = q.type.shape[1], k.type.shape[1]
        if not (isinstance(heads, int) and isinstance(kv_heads, int)):
            raise ShardError(f"'{format_op(op)}': the head counts must be static to split them")
        hs = head_shard(heads, kv_heads, self.tp, self.rank)
        self._commit(op, [(q, Split(1, (hs.q,), heads)), (k, Split(1, (hs.kv,), kv_heads)),
                          (v, Split(1, (hs.kv,), kv_heads))])

    def _plan_activation(self, op: Op) -> None:
        out = op.results[0]
        width = out.type.shape[-1] if out.type.rank else None
        if not isinstance(width, int) or width < self.tp or not self._feeds_linears(out):
            return
        unit = next((u for u in (128, 64, 32, 16, 8) if width % (u * self.tp) == 0), 1)  # whole quantization groups
        a, b = balanced(width // unit, self.tp, self.rank)
        self._commit(op, [(out, Split(out.type.rank - 1, ((a * unit, b * unit),), width))])

    def _feeds_linears(self, v: Value) -> bool:
        """Every path from v reaches the input of a linear (or a reduction) through row-wise ops."""
        users = self.graph.users(v)
        if not users or v in self.graph.outputs:
            return False
        for u in users:
            form = linear_form(u)
            if form is not None and u.operands[form.x] is v and v not in u.operands[form.x + 1:]:
                continue
            if u.name in REDUCTIONS:
                continue
            if u.name == "quant.quantize_rows":  # its values go on to the linear; its scale is whole on every rank
                if not self._feeds_linears(u.results[0]):
                    return False
                continue
            if len(u.results) != 1 or (u.name != "core.reshape" and _rows_of(u, 0) is None):
                return False
            if not self._feeds_linears(u.results[0]):
                return False
        return True

    def _commit(self, anchor: Op, needs: list[tuple[Value, Split]]) -> None:
        """Walk the anchor's demands back to the linears that make them; commit all or none."""
        seeds: dict[Op, list[tuple[int, int]]] = {}
        path = {anchor}
        todo = list(needs)
        while todo:
            v, s = todo.pop()
            op = v.op
            if op is None:
                continue  # a parameter or an input: each rank takes its rows where it is read
            if op is not anchor and linear_form(op) is not None and s.axis == v.type.rank - 1:
                seeds.setdefault(op, []).extend(s.segments)
                continue
            back = _back(op, s)
            if back is None:
                remark(f"'{format_op(anchor)}' is computed whole on every rank: its operand {v.ref} comes from "
                       f"'{format_op(op)}', which the shard pass cannot follow")
                return
            path.add(op)
            todo.extend((o, t) for o, t in zip(op.operands, back) if t is not None)
        for op in seeds:
            if any(u not in path for u in self.graph.users(op.results[0])):
                remark(f"'{format_op(anchor)}' is computed whole on every rank: {op.results[0].ref} is also "
                       f"read outside it")
                return
        for op, segs in seeds.items():
            self.columns[op] = _union([*self.columns.get(op, ()), *segs])

    # -- rewriting --------------------------------------------------------------------------------

    def rewrite(self) -> None:
        if any(op.opdef.dialect == "dist" for op in self.graph.ops):
            raise ShardError("the graph already has dist.* collectives: it is sharded already")
        for op in list(self.graph.ops):
            if op in self.embeddings:
                self._embedding(op)
            elif op is self.head and not any(v in self.splits for v in op.operands):
                self._head(op)
            elif op in self.columns:
                self._column(op)
            elif op.name == "quant.quantize_rows" and op.operands[0] in self.splits:
                self._quantize_rows(op)
            elif any(v in self.splits for v in op.operands):
                self._forward(op)
        self._finish()

    def _retype(self, op: Op) -> None:
        try:
            op.attrs = op.opdef.normalise_attrs(op.attrs)
            types = op.opdef.infer_types([v.type for v in op.operands], op.attrs)
        except (OpError, TypeError) as e:
            raise ShardError(f"'{format_op(op)}' does not fit its split operands: {e}") from None
        for r, t in zip(op.results, types):
            r.type = t

    def _forward(self, op: Op) -> None:
        splits = [self.splits.get(v) for v in op.operands]
        rule = _FORWARD.get(op.name)
        if rule is not None:
            results = rule(self, op, splits)
        elif self._form(op) is not None:
            results = self._row_parallel(op, splits)
        elif op.name in REDUCTIONS:
            results = self._reduction(op, splits)
        else:
            results = self._rows(op, splits)
        self._retype(op)
        for r, s in zip(op.results, results):
            if s is not None:
                self.splits[r] = s
        self.changes += 1

    def _where(self, op: Op) -> str:
        return f"'{format_op(op)}'"

    def _form(self, op: Op) -> LinearForm | None:
        return linear_form(op, [self._global(v) for v in op.operands])

    def _global(self, v: Value) -> TensorType:
        """The type v had before sharding (a split value's local type has the rank's rows)."""
        s = self.splits.get(v)
        return v.type if s is None else v.type.with_shape([s.size if i == s.axis else d
                                                            for i, d in enumerate(v.type.shape)])

    def _rows(self, op: Op, splits: list[Split | None]) -> list[Split | None]:
        """Ops that compute rows of a dim from the same rows of their operands (row_rule)."""
        i, s = next((i, s) for i, s in enumerate(splits) if s is not None)
        if len(op.results) != 1:
            raise ShardError(f"{self._where(op)} reads the split {op.operands[i].ref}; the shard pass has no rule "
                             f"for {op.name}")
        result = op.results[0].type
        rule, dim = None, None
        for r in range(result.rank):
            rule = _rows_of(op, r, self)
            if rule is not None and rule[i] == (s.axis, 1):
                dim = r
                break
        if dim is None:
            raise ShardError(f"{self._where(op)} reads {op.operands[i].ref} split along axis {s.axis}; the shard "
                             f"pass has no rule for {op.name} over that axis")
        operands = list(op.operands)
        for j, (v, entry) in enumerate(zip(op.operands, rule)):
            if entry is None:
                if splits[j] is not None:
                    raise ShardError(f"{self._where(op)} needs {v.ref} whole, but it is split over ranks")
                continue
            want = s.scaled(entry[0], entry[1], self._global(v).shape[entry[0]])
            if splits[j] is None:
                operands[j] = self._localize(v, want, op)
            elif splits[j] != want:
                raise ShardError(f"{self._where(op)} combines operands split differently ({splits[j]} and {want})")
        self.graph.set_operands(op, operands)
        return [Split(dim, s.segments, result.shape[dim])]

    def _reshape(self, op: Op, splits: list[Split | None]) -> list[Split | None]:
        s = splits[0]
        new = map_reshape(self._global(op.operands[0]).shape, op.results[0].type.shape, s)
        if new is None:
            raise ShardError(f"{self._where(op)} mixes the rows {_fmt(s.segments)} of axis {s.axis}, split over "
                             f"ranks, with other axes")
        shape = list(op.attrs["shape"])
        if shape[new.axis] != -1:
            shape[new.axis] = new.local
        op.attrs["shape"] = tuple(shape)
        return [new]

    def _slice(self, op: Op, splits: list[Split | None]) -> list[Split | None]:
        s = splits[0]
        if normalize_axis(op.attrs["dim"], op.results[0].type.rank) != s.axis:
            return [s]
        lo, hi = _slice_bounds(op, s.size)
        segments, local_lo, local_hi, at = [], None, None, 0
        for a, b in s.segments:
            x, y = max(a, lo), min(b, hi)
            if x < y:
                segments.append((x - lo, y - lo))
                local_lo = at + x - a if local_lo is None else local_lo
                local_hi = at + y - a
            at += b - a
        if not segments:
            raise ShardError(f"{self._where(op)} keeps none of this rank's rows {_fmt(s.segments)}")
        if local_hi - local_lo != sum(b - a for a, b in segments):
            raise ShardError(f"{self._where(op)} keeps rows of this rank that are not contiguous")
        end = op.attrs["end"]
        op.attrs["start"] = local_lo
        op.attrs["end"] = None if (end is None or end >= s.size) and local_hi == at else local_hi
        return [Split(s.axis, tuple(segments), hi - lo)]

    def _gather(self, op: Op, splits: list[Split | None]) -> list[Split | None]:
        s, dim = splits[0], normalize_axis(op.attrs["dim"], op.operands[0].type.rank)
        if s is None or splits[1] is not None or s.axis == dim:
            raise ShardError(f"{self._where(op)} gathers along an axis split over ranks")
        axis = s.axis if s.axis < dim else s.axis + op.operands[1].type.rank - 1
        return [Split(axis, s.segments, s.size)]

    def _attention(self, op: Op, splits: list[Split | None]) -> list[Split | None]:
        q, k, v = splits[:3]
        if q is None or k is None or v != k or q.axis != 1 or k.axis != 1:
            raise ShardError(f"{self._where(op)}: q, k and v must all be split by heads")
        (q0, q1), (k0, k1) = q.segments[0], k.segments[0]
        group, local = q.size // k.size, (q1 - q0) // (k1 - k0)
        if (q1 - q0) % (k1 - k0) or any((q0 + i) // group != k0 + i // local for i in range(q1 - q0)):
            raise ShardError(f"{self._where(op)}: query heads {q0}:{q1} do not read KV heads {k0}:{k1} group-wise")
        operands = list(op.operands)
        if op.name == "llm.paged_attention":
            for i in (3, 4):
                cache = operands[i]
                if not cache.is_input or cache in self.splits:
                    raise ShardError(f"{self._where(op)}: the cache {cache.ref} must be a graph input of its own")
                cache.type = cache.type.with_shape([k1 - k0 if d == 2 else n for d, n in enumerate(cache.type.shape)])
                self.splits[cache] = Split(2, k.segments, k.size)
        elif len(operands) > 3 and splits[3] is None:       # a mask with a heads axis is cut like q
            mask = operands[3]
            axis = 1 - (4 - mask.type.rank)
            if axis >= 0 and mask.type.shape[axis] != 1:
                operands[3] = self._localize(mask, Split(axis, q.segments, q.size), op)
        self.graph.set_operands(op, operands)
        return [Split(1, q.segments, q.size)]

    def _quantize_rows(self, op: Op) -> None:
        """A row's scale spans every rank's columns: each rank's amax, their max across ranks, then the
        quantize (the unfused form), so that every rank divides by the scale of the whole row."""
        x, s, a = op.operands[0], self.splits[op.operands[0]], op.attrs
        if s.axis != 1:
            raise ShardError(f"{self._where(op)} reads {x.ref} split along its rows (tokens); only columns split")
        b = Builder(self.graph, before=op, loc=op.loc)
        amax = b.dist.all_reduce(b.core.amax(b.core.abs(x), dims=[1], keepdim=False), reduce="max")
        scale = b.core.div(b.core.clamp(amax, min=a["eps"]), b.constant(a["bound"], x.type.dtype))
        q = b.quant.quantize(x, scale, dtype=a["dtype"], axis=0)
        for old, new in zip(op.results, (q, scale)):
            self.graph.replace_all_uses(old, new)
        self.graph.erase_op(op)
        self.splits[q] = Split(1, s.segments, s.size)
        self.changes += 1

    def _reduction(self, op: Op, splits: list[Split | None]) -> list[Split | None]:
        s, x = splits[0], op.operands[0]
        dims = {normalize_axis(d, x.type.rank) for d in op.attrs["dims"]} or set(range(x.type.rank))
        if s.axis not in dims:
            keep = op.attrs["keepdim"]
            return [Split(s.axis - (0 if keep else sum(d < s.axis for d in dims)), s.segments, s.size)]
        self._after(op, lambda b, y: b.dist.all_reduce(y, reduce=REDUCTIONS[op.name]))
        return [None]

    def _after(self, op: Op, make: Callable[[Builder, Value], Value]) -> None:
        """Insert make(builder, result) right after op; what read op's result reads its value."""
        g, y = self.graph, op.results[0]
        i = g.index(op)
        users = list(dict.fromkeys(g.users(y)))
        out = make(Builder(g, before=g.ops[i + 1] if i + 1 < len(g.ops) else None, loc=op.loc), y)
        for u in users:
            g.set_operands(u, [out if o is y else o for o in u.operands])
        g.set_outputs([out if o is y else o for o in g.outputs])

    def _column(self, op: Op) -> None:
        form = linear_form(op)
        if any(v in self.splits for v in op.operands):
            raise ShardError(f"{self._where(op)} is column-parallel but reads a split input")
        segs = self.columns[op]
        out = op.results[0]
        split = Split(out.type.rank - 1, segs, out.type.shape[-1])
        self._cut_linear(op, form, "out", segs)
        self._retype(op)
        self.splits[out] = split
        self.changes += 1

    def _row_parallel(self, op: Op, splits: list[Split | None]) -> list[Split | None]:
        form = self._form(op)
        s = splits[form.x]
        if s is None or s.axis != op.operands[form.x].type.rank - 1 or sum(x is not None for x in splits) > 1:
            raise ShardError(f"{self._where(op)}: only its input may be split, along its last axis")
        bias = op.operands[form.bias] if form.bias is not None else None
        if bias is not None and form.bias != len(op.operands) - 1:
            raise ShardError(f"{self._where(op)}: its bias must be its last operand to be added after the all-reduce")
        self._cut_linear(op, form, "in", s.segments)
        if bias is not None:
            self.graph.set_operands(op, op.operands[:-1])
        self._retype(op)
        self._after(op, lambda b, y: b.core.add(b.dist.all_reduce(y), bias) if bias is not None
                    else b.dist.all_reduce(y))
        return [None]

    def _cut_linear(self, op: Op, form: LinearForm, features: str, segs: Segments, pad: int = 0) -> None:
        """Keep the rank's output features (then `pad` of zeros; the bias too) or input features of
        the weight and of what goes with it (scales and zero points: per tensor they stay whole)."""
        operands = list(op.operands)
        for i, out, inp in form.weights:
            axis = out if features == "out" else inp
            if axis is None:
                continue
            dim, div = axis
            if any(x % div for s in (*segs, (0, pad)) for x in s):
                raise ShardError(f"{self._where(op)}: {operands[i].ref} packs or groups {div} {features}put features "
                                 f"along dim {dim}; this rank's {_fmt(segs)} cut through them")
            operands[i] = self._cut(operands[i], dim, _divided(segs, div), op, pad // div)
        if features == "out" and form.bias is not None:
            operands[form.bias] = self._cut(operands[form.bias], 0, segs, op, pad)
        self.graph.set_operands(op, operands)

    def _cut(self, v: Value, dim: int, segs: Segments, before: Op, pad: int = 0) -> Value:
        """The rows `segs` of `dim` of a weight, then `pad` rows of zeros: sliced parameters where
        it is made of parameters by row-wise ops (a dequantized weight), else cut out of the
        computed value."""
        if v.is_param:
            return self._take(v, dim, segs, pad)
        op = v.op
        if op is not None and len(op.results) == 1 and op.operands and _made_of_params(v):
            rule = row_rule(op.name, op.attrs, [o.type for o in op.operands], v.type, dim)
            if rule is not None and all(e is None or all(x % e[1] == 0 for s in (*segs, (0, pad)) for x in s)
                                        for e in rule):
                operands = [o if e is None else self._cut(o, e[0], _divided(segs, e[1]), before, pad // e[1])
                            for o, e in zip(op.operands, rule)]
                self.dead.append(op)
                return Builder(self.graph, before=before, loc=op.loc).op(op.opdef, *operands, **op.attrs)
        remark(f"{v.ref} is computed in full on every rank, then cut to the rank's rows")
        b = Builder(self.graph, before=before, loc=before.loc)
        parts = [b.core.slice(v, dim=dim, start=a, end=e) for a, e in segs]
        if pad:
            parts.append(b.constant(0, v.type.dtype, shape=[pad if i == dim else d for i, d in enumerate(v.type.shape)]))
        return parts[0] if len(parts) == 1 else b.core.concat(*parts, dim=dim)

    def _localize(self, v: Value, split: Split, before: Op) -> Value:
        return self._cut(v, split.axis, split.segments, before)

    def _take(self, p: Value, dim: int, segs: Segments, pad: int = 0) -> Value:
        """A new parameter holding the rows `segs` of `dim` of p (then `pad` rows of zeros), read
        lazily from p's storage."""
        key = (p.name, dim, segs, pad)
        if key not in self.taken:
            size = sum(b - a for a, b in segs) + pad
            t = p.type.with_shape([size if i == dim else d for i, d in enumerate(p.type.shape)])
            storage = None
            if p.storage is not None:
                ssegs, spad = segs, pad
                if p.type.dtype is DType.i4 and p.storage.type.dtype is DType.u8 and dim == p.type.rank - 1:
                    if any(x % 2 for s in (*segs, (0, pad)) for x in s):
                        raise ShardError(f"{p.ref}: int4 columns {_fmt(segs)} split a packed byte")
                    ssegs, spad = _divided(segs, 2), pad // 2
                storage = take(p.storage, dim, ssegs, spad)
            name, n = f"{p.name}.rank{self.rank}", 1
            while name in self.graph.params:
                name, n = f"{p.name}.rank{self.rank}.{n}", n + 1
            self.taken[key] = self.graph.add_param(name, t, storage)
            self.replaced.setdefault(p.name, []).append(self.taken[key])
        return self.taken[key]

    # -- the vocabulary -----------------------------------------------------------------------------

    def _embedding(self, op: Op) -> None:
        table, ids = op.operands[0], op.operands[-1]
        vocab = table.type.shape[0]
        (start, end), _ = vocab_shard(vocab, self.tp, self.rank)
        b = Builder(self.graph, before=op, loc=op.loc)
        dtype = ids.type.dtype
        lo = b.constant(start, dtype) if start else None
        above = b.core.ge(ids, lo) if lo is not None else None
        below = b.core.lt(ids, b.constant(end, dtype)) if end < vocab else None
        inside = b.core.logical_and(above, below) if above is not None and below is not None else above or below
        local = b.core.where(inside, b.core.sub(ids, lo) if lo is not None else ids, b.constant(0, dtype))
        rows = b.op(op.opdef, *(self._cut(v, 0, ((start, end),), op) for v in op.operands[:-1]), local)
        mask = b.core.reshape(inside, shape=[*ids.type.shape, 1])
        out = b.dist.all_reduce(b.core.where(mask, rows, b.constant(0, rows.type.dtype)))
        self.graph.replace_all_uses(op.results[0], out)
        self.graph.erase_op(op)
        self.changes += 1

    def _head(self, op: Op) -> None:
        form = linear_form(op)
        out = op.results[0]
        last, vocab = out.type.rank - 1, out.type.shape[-1]
        (start, end), width = vocab_shard(vocab, self.tp, self.rank)
        self._cut_linear(op, form, "out", ((start, end),), pad=width - (end - start))
        self._retype(op)

        def gather(b: Builder, y: Value) -> Value:
            logits = b.dist.all_gather(y, dim=last, world_size=self.tp)
            return logits if width * self.tp == vocab else b.core.slice(logits, dim=last, start=0, end=vocab)

        self._after(op, gather)
        self.changes += 1

    # -- cleaning up --------------------------------------------------------------------------------

    def _finish(self) -> None:
        g = self.graph
        while self.dead:
            op = self.dead.pop()
            if op in g.ops and op.opdef.is_pure and all(g.num_uses(r) == 0 for r in op.results):
                g.erase_op(op)
                self.dead.extend(o.op for o in op.operands if o.op is not None)
        for name, new in self.replaced.items():
            if name in g.params and g.num_uses(g.params[name]) == 0:
                g.remove_param(name)
                if len(new) == 1:  # the rank's part keeps the parameter's name
                    del g.params[new[0].name]
                    new[0].name = name
                    g.params[name] = new[0]
        rank = {name: i for i, name in enumerate(self.order)}
        ordered = sorted(g.params.items(), key=lambda kv: rank.get(kv[0], len(rank)))
        g.params.clear()
        g.params.update(ordered)


def _back(op: Op, split: Split) -> list[Split | None] | None:
    """The rows of each operand that rows `split` of op's result need, or None if unknown."""
    if op.name == "quant.quantize_rows":  # columns of the quantized values come from the same columns
        return [split] if split.axis == 1 else None
    if len(op.results) != 1:
        return None
    if op.name == "core.reshape":
        s = map_reshape(op.results[0].type.shape, op.operands[0].type.shape, split)
        return None if s is None else [s]
    if op.name == "core.slice":
        x = op.operands[0]
        if normalize_axis(op.attrs["dim"], x.type.rank) != split.axis:
            return [split]
        size = x.type.shape[split.axis]
        try:
            lo, _ = _slice_bounds(op, size)
        except ShardError:
            return None
        return [Split(split.axis, tuple((a + lo, b + lo) for a, b in split.segments), size)]
    rule = _rows_of(op, split.axis)
    if rule is None:
        return None
    try:
        return [None if e is None else split.scaled(e[0], e[1], v.type.shape[e[0]])
                for v, e in zip(op.operands, rule)]
    except ShardError:
        return None


def _rows_of(op: Op, dim: int, sharder: _Sharder | None = None) -> list[tuple[int, int] | None] | None:
    """row_rule of op for its result's dim, on the operands' types before sharding."""
    types = [sharder._global(v) if sharder else v.type for v in op.operands]
    return row_rule(op.name, op.attrs, types, op.results[0].type, dim)


_FORWARD = {
    "core.reshape": _Sharder._reshape,
    "core.slice": _Sharder._slice,
    "core.gather": _Sharder._gather,
    "llm.attention": _Sharder._attention,
    "llm.paged_attention": _Sharder._attention,
}
"""Ops whose split results need more than row_rule says (or that have none)."""


@slice_storage.register
def _(storage: AmaxScaleStorage, dim: int, start: int, end: int) -> Storage:
    """Per-channel scales of some channels come from those channels of the weight alone."""
    if storage.axis is None or dim != 0:
        return SlicedStorage(storage, dim, start, end, storage.type.with_shape([end - start]))
    return AmaxScaleStorage(slice_storage(storage.source, storage.axis, start, end), storage.qmax, storage.axis,
                            storage.type.with_shape([end - start]))


@register_pass("shard")
def shard(graph: Graph, *, tp: int = 1, rank: int = 0) -> int:
    """Tensor parallelism: heads, MLP columns and the vocabulary over tp ranks; this graph becomes rank `rank`'s."""
    if tp < 1 or not 0 <= rank < tp:
        raise ShardError(f"need tp >= 1 and 0 <= rank < tp, got tp={tp}, rank={rank}")
    if tp == 1:
        return 0
    sharder = _Sharder(graph, tp, rank)
    sharder.plan()
    sharder.rewrite()
    return sharder.changes

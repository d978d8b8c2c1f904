"""`fuse-attention`: every spelling of attention becomes one `llm.attention(q, k, v)` with
`causal`, `scale`, `window` and grouped KV heads.

- The eager spelling, matmul(softmax(q @ k^T * scale + mask)) @ v (scale on the scores or
  folded into q, softmax in f32 or not), becomes `llm.attention` with that scale and mask.
- KV heads repeated for grouped-query attention (expand + reshape) are un-repeated:
  `llm.attention` takes fewer KV heads than query heads.
- A mask is recognised by what it computes, not by how it is spelled: a mask built from
  token indices alone is evaluated by the IR interpreter at several lengths; if it is the
  causal mask (optionally with a sliding window), bool or additive, it becomes `causal=true`
  (and `window=`). Anything else stays a mask operand, and a remark says why.
"""

from __future__ import annotations

import torch

from ..ir import interpreter
from ..ir.builder import Builder
from ..ir.graph import Graph, Op, Value
from ..ir.types import DType
from .manager import register_pass, remark
from .pattern import Const, Match, OneOf, P, Rule, RuleSet, Var, apply_greedily

# --- the eager spelling ---------------------------------------------------------------------------

_q = OneOf(P("core.mul", Var("q"), Const(name="qscale")), Var("q"))
_kt = Var("kt")  # k transposed, however the exporter spelled the transpose
_scores = P("core.matmul", _q, OneOf(P("core.mul", _kt, Const(name="kscale")), _kt))  # ONNX: sqrt(scale) on each
_scaled = OneOf(P("core.mul", _scores, Const(name="scale")), P("core.div", _scores, Const(name="divisor")), _scores)
_masked = OneOf(P("core.add", _scaled, Var("mask"), name="masked"), _scaled)
_softmax = P("core.softmax", OneOf(P("core.cast", _masked), _masked), name="probs")
_guarded = OneOf(P("core.where", P("core.isnan", _softmax), Const(0), _softmax), _softmax)  # rows with no key -> 0
_EAGER = P("core.matmul", OneOf(P("core.cast", _guarded), _guarded), Var("v"))


def _is_eager_attention(m: Match) -> bool:
    q, kt, v = m.q.type, m.kt.type, m.v.type
    return (q.rank == kt.rank == v.rank == 4 and kt.shape[2] == q.shape[3] and kt.shape[3] == v.shape[2]
            and m.op("probs").attrs["dim"] in (-1, 3) and q.dtype == kt.dtype == v.dtype
            and ("mask" not in m or m.mask.type.dtype in (q.dtype, DType.bool)))


def _untransposed(kt: Value, b: Builder) -> Value:
    if kt.op is not None and kt.op.name == "core.permute" and list(kt.op.attrs["dims"]) == [0, 1, 3, 2]:
        return kt.op.operands[0]
    return b.core.permute(kt, dims=[0, 1, 3, 2])


def _scale_of(m: Match) -> float:
    scale = 1.0
    for name in ("qscale", "kscale"):
        if name in m:
            scale *= m[name].op.attrs["value"]
    if "scale" in m:
        scale *= m.scale.op.attrs["value"]
    if "divisor" in m:
        scale /= m.divisor.op.attrs["value"]
    return float(scale)


def _eager_to_attention(m: Match, b: Builder) -> Value:
    out = b.llm.attention(m.q, _untransposed(m.kt, b), m.v, *([m.mask] if "mask" in m else []), scale=_scale_of(m))
    return out if out.type == m.root.type else b.core.cast(out, dtype=m.root.type.dtype)


# --- grouped KV heads -----------------------------------------------------------------------------

def _repeated(name: str) -> P:
    """x [B,Hkv,S,D] -> reshape [B,Hkv,1,S,D] -> expand [B,Hkv,g,S,D] -> reshape [B,Hkv*g,S,D]."""
    return P("core.reshape", P("core.expand", P("core.reshape", Var(name), name=name + "_1"), name=name + "_g"),
             name=name + "_rep")


def _is_head_repeat(m: Match, name: str) -> bool:
    x, one, grouped, rep = m[name].type, m[name + "_1"].type, m[name + "_g"].type, m[name + "_rep"].type
    return (x.rank == 4 and one.shape == (x.shape[0], x.shape[1], 1, *x.shape[2:])
            and grouped.shape[:2] == x.shape[:2] and grouped.shape[3:] == x.shape[2:]
            and rep.shape[0] == x.shape[0] and rep.shape[2:] == x.shape[2:])


def _unrepeat(m: Match, b: Builder) -> Value:
    op = m.root.op
    return b.llm.attention(m.q, m.k, m.v, *op.operands[3:], **op.attrs)


# --- masks ----------------------------------------------------------------------------------------

_LENGTHS = (1, 2, 3, 7, 16, 33)


def _mask_slice(graph: Graph, mask: Value) -> Graph | None:
    """The ops computing `mask` as a graph of its own, if they depend on nothing but constants
    and index ramps (no input, no parameter); else None."""
    ops: dict[int, Op] = {}
    stack = [mask]
    while stack:
        v = stack.pop()
        if v.op is None or not v.op.opdef.is_pure:
            return None
        if id(v.op) not in ops:
            ops[id(v.op)] = v.op
            stack.extend(v.op.operands)
    g = Graph("mask")
    vmap: dict[int, Value] = {}
    for op in graph.ops:
        if id(op) in ops:
            new = g.create_op(op.opdef, [vmap[id(x)] for x in op.operands], op.attrs)
            vmap.update({id(r): n for r, n in zip(op.results, new.results)})
    g.set_outputs([vmap[id(mask)]])
    return g


def causal_window(graph: Graph, mask: Value, length_symbol: str) -> tuple[bool, int | None] | None:
    """(True, window) if `mask` is the causal mask over `length_symbol` tokens (bool, or additive
    with 0 and a large negative), else None."""
    sliced = _mask_slice(graph, mask)
    if sliced is None or mask.type.symbols - {length_symbol}:
        return None
    exe = interpreter.compile(sliced)
    window = None
    for n in sorted(_LENGTHS, reverse=True):
        keep = exe(symbols={length_symbol: n})[0]
        while keep.dim() > 2 and keep.shape[0] == 1:
            keep = keep[0]
        if keep.shape != (n, n):
            return None
        if keep.dtype != torch.bool:
            if not keep.is_floating_point() or not bool(((keep == 0) | (keep <= -1e4)).all()):
                return None
            keep = keep == 0
        tril = torch.ones(n, n, dtype=torch.bool).tril()
        if n == max(_LENGTHS):
            row = int(keep[-1].sum())
            window = row if row < n else None
        want = tril & ~torch.ones(n, n, dtype=torch.bool).tril(-window) if window else tril
        if not torch.equal(keep, want):
            return None
    return True, window


def _mask_to_causal(m: Match, b: Builder) -> Value | None:
    op = m.root.op
    q, k, mask = op.operands[0].type, op.operands[1].type, op.operands[3]
    s = q.shape[2]
    if op.attrs["causal"] or s != k.shape[2] or not isinstance(s, str) or not s.isidentifier():
        remark(f"llm.attention defining {m.root.ref} keeps its mask: it is not self-attention over a symbolic length")
        return None
    found = causal_window(b.graph, mask, s)
    if found is None:
        remark(f"llm.attention defining {m.root.ref} keeps its mask {mask.ref}: it is not a causal mask over {s} tokens")
        return None
    return b.llm.attention(*op.operands[:3], causal=True, scale=op.attrs["scale"], window=found[1])


ATTENTION_RULES = RuleSet(
    Rule("eager-attention", _EAGER, _eager_to_attention, where=_is_eager_attention),
    Rule("attention-gqa", P("llm.attention", Var("q"), _repeated("k"), _repeated("v"), variadic=True), _unrepeat,
         where=lambda m: _is_head_repeat(m, "k") and _is_head_repeat(m, "v")),
    Rule("attention-causal-mask", P("llm.attention", Var(), Var(), Var(), Var()), _mask_to_causal),
)


@register_pass("fuse-attention")
def fuse_attention(graph: Graph) -> int:
    """Eager and SDPA attention to one llm.attention: grouped KV heads, causal/window masks as attributes."""
    return apply_greedily(graph, ATTENTION_RULES, explain=True)

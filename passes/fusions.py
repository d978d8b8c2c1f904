"""Fusions of the token-wise pieces of a decoder layer into the ops kernels implement:

- `fuse-rms-norm`: x * rsqrt(mean(x^2) + eps) * w (in f32 and cast back, or all in one dtype)
  -> `llm.rms_norm(x, w)`.
- `fuse-rope`: the rotate-half spelling, q*cos + rotate_half(q)*sin with cos/sin computed from
  the positions and the model's inverse frequencies -> `llm.rope(q, positions, inv_freq)`.
- `fuse-silu-mul`: silu(gate) * up -> `llm.silu_mul(gate, up)`.
- `merge-linears`: linears that read the same input (q/k/v, gate/up) -> one linear over the
  concatenated weights (and biases), whose output is sliced; canonicalize then folds the
  concatenation into one lazily computed parameter.
"""

from __future__ import annotations

from ..ir.builder import Builder
from ..ir.graph import Graph, Op, Value
from ..ir.types import DType, dim_add, dim_product
from .manager import register_pass, remark
from .pattern import Const, Match, OneOf, P, Rule, RuleSet, Var, apply_greedily

# --- rms_norm -------------------------------------------------------------------------------------

_xf = Var("xf")
_square = OneOf(P("core.pow", _xf, Const(2)), P("core.mul", _xf, _xf))
_normed = P("core.mul", _xf, P("core.rsqrt", P("core.add", P("core.mean", _square, name="mean"), Const(name="eps"))),
            name="normed")
_RMS_NORM = P("core.mul", Var("w"), OneOf(P("core.cast", _normed, name="back"), _normed))


def _rms_input(m: Match) -> Value:
    xf = m.xf
    return xf.op.operands[0] if "back" in m and xf.op is not None and xf.op.name == "core.cast" else xf


def _is_rms_norm(m: Match) -> bool:
    x, xf, w, mean = _rms_input(m), m.xf, m.w, m.op("mean")
    last = xf.type.rank - 1
    if list(mean.attrs["dims"]) not in ([-1], [last]) or not mean.attrs["keepdim"]:
        return False
    if w.type.shape != (x.type.shape[-1],) or w.type.dtype is not x.type.dtype or m.root.type != x.type:
        return False
    if "back" in m:  # normalised in f32, cast back to x's dtype, then scaled: exactly llm.rms_norm
        return xf.type.dtype is DType.f32 and m.back.type.dtype is x.type.dtype and xf is not x
    return xf.type.dtype is x.type.dtype


def _rms_norm(m: Match, b: Builder) -> Value:
    return b.llm.rms_norm(_rms_input(m), m.w, eps=float(m.eps.op.attrs["value"]))


# --- rope -----------------------------------------------------------------------------------------

_emb = P("core.concat", Var("freqs"), Var("freqs"), name="emb")
_pos = P("core.cast", P("core.reshape", Var("positions"), name="pos3"))
_freqs = OneOf(
    P("core.mul", _pos, Var("inv_freq")),
    # inv_freq[None, :, None] @ positions[:, None, :], transposed (transformers' rotary modules
    # before 5.2x): an outer product that canonicalize turns into a broadcast multiply
    P("core.permute", P("core.mul", Var("inv_freq"), _pos), attrs={"dims": (0, 2, 1)}),  # inv_freq as [1, D/2, 1]
)


def _trig(fn: str, name: str) -> P:
    wave = P(fn, _emb)
    scaled = OneOf(P("core.mul", wave, Const(name=name + "_scale")), wave)
    return P("core.reshape", OneOf(P("core.cast", scaled), scaled), name=name)


_rot = P("core.concat", P("core.neg", P("core.slice", Var("x"), name="upper")), P("core.slice", Var("x"), name="lower"),
         name="rot")
_ROPE = P("core.add", P("core.mul", Var("x"), _trig("core.cos", "cos")), P("core.mul", _rot, _trig("core.sin", "sin")))


def _rope_sources(m: Match) -> tuple[Value, Value, float] | None:
    """(positions [T] or [1, T], inv_freq [D/2], scale) if the frequencies are positions * inv_freq."""
    found = next(iter(_freqs.match(m.graph, m.freqs, {})), None)
    if found is None:
        return None
    positions, inv_freq = found["positions"], found["inv_freq"]
    scales = {float(m[k].op.attrs["value"]) if k in m else 1.0 for k in ("cos_scale", "sin_scale")}
    if positions.type.shape not in ((m.x.type.shape[2],), (1, m.x.type.shape[2])) or len(scales) != 1:
        return None
    if positions.type.dtype not in (DType.i32, DType.i64):
        return None
    half = m.x.type.shape[3] // 2
    if inv_freq.type.shape not in ((half,), (1, half, 1)):
        return None
    return positions, inv_freq, scales.pop()


def _rope(m: Match, b: Builder) -> Value:
    positions, inv_freq, scale = _rope_sources(m)
    tokens = m.x.type.shape[2]
    if inv_freq.type.rank != 1:
        inv_freq = b.core.reshape(inv_freq, shape=[m.x.type.shape[3] // 2])
    x = b.core.permute(m.x, dims=[0, 2, 1, 3])                        # [1, T, H, D]
    pos = b.core.reshape(positions, shape=[1, tokens])
    out = b.llm.rope(x, pos, b.core.cast(inv_freq, dtype=DType.f32) if inv_freq.type.dtype is not DType.f32 else inv_freq,
                     scale=scale)
    return b.core.permute(out, dims=[0, 2, 1, 3])


# The same rotation written on the two halves (ONNX RotaryEmbedding unrolled):
# concat(x1*cos - x2*sin, x2*cos + x1*sin) with cos/sin of positions * inv_freq, half width.
_x1, _x2 = P("core.slice", Var("x"), name="lower"), P("core.slice", Var("x"), name="upper")
_cos_h = P("core.reshape", P("core.cos", Var("freqs")), name="cos")
_sin_h = P("core.reshape", P("core.sin", Var("freqs")), name="sin")
_ROPE_HALVES = P("core.concat", P("core.sub", P("core.mul", _x1, _cos_h), P("core.mul", _x2, _sin_h)),
                 P("core.add", P("core.mul", _x2, _cos_h), P("core.mul", _x1, _sin_h)), name="rot")


def _rope_halves_ok(m: Match) -> bool:
    x = m.x.type
    if x.rank != 4 or x.shape[0] != 1 or m.root.type != x or not isinstance(x.shape[3], int):
        return False
    _, _, tokens, dim = x.shape
    upper, lower = m.op("upper").attrs, m.op("lower").attrs
    return (upper["dim"] == 3 and upper["start"] == dim // 2 and upper["end"] is None and upper["step"] == 1
            and lower["dim"] == 3 and lower["start"] == 0 and lower["end"] == dim // 2 and lower["step"] == 1
            and m.op("rot").attrs["dim"] == 3 and m.cos.type.shape == (1, 1, tokens, dim // 2)
            and m.sin.type.shape == m.cos.type.shape and _rope_sources(m) is not None)


# --- silu_mul -------------------------------------------------------------------------------------

_SILU_MUL = P("core.mul", P("core.silu", Var("gate")), Var("up"))


NORM_RULES = RuleSet(Rule("rms-norm", _RMS_NORM, _rms_norm, where=_is_rms_norm))
ROPE_RULES = RuleSet(Rule("rope-rotate-half", _ROPE, _rope, where=lambda m: _rope_ok(m)),
                     Rule("rope-halves", _ROPE_HALVES, _rope, where=lambda m: _rope_halves_ok(m)))
ACTIVATION_RULES = RuleSet(Rule("silu-mul", _SILU_MUL, lambda m, b: b.llm.silu_mul(m.gate, m.up),
                                where=lambda m: m.gate.type == m.up.type == m.root.type))


def _rope_ok(m: Match) -> bool:
    """Half-split rotation of [1, H, T, D] heads with cos/sin broadcast over the heads."""
    x = m.x.type
    if x.rank != 4 or x.shape[0] != 1 or m.root.type != x or not isinstance(x.shape[3], int):
        return False
    _, _, tokens, dim = x.shape
    upper, lower, rot, emb = m.op("upper").attrs, m.op("lower").attrs, m.op("rot").attrs, m.op("emb").attrs
    return (upper["dim"] == 3 and upper["start"] == dim // 2 and upper["end"] is None and upper["step"] == 1
            and lower["dim"] == 3 and lower["start"] == 0 and lower["end"] == dim // 2 and lower["step"] == 1
            and rot["dim"] == 3 and emb["dim"] == 2 and m.cos.type.shape == (1, 1, tokens, dim)
            and m.sin.type.shape == m.cos.type.shape and _rope_sources(m) is not None)


@register_pass("fuse-rms-norm")
def fuse_rms_norm(graph: Graph) -> int:
    """x * rsqrt(mean(x^2) + eps) * w -> llm.rms_norm."""
    return apply_greedily(graph, NORM_RULES, explain=True)


@register_pass("fuse-rope")
def fuse_rope(graph: Graph) -> int:
    """q*cos + rotate_half(q)*sin at explicit positions -> llm.rope."""
    return apply_greedily(graph, ROPE_RULES, explain=True)


@register_pass("fuse-silu-mul")
def fuse_silu_mul(graph: Graph) -> int:
    """silu(gate) * up -> llm.silu_mul."""
    return apply_greedily(graph, ACTIVATION_RULES, explain=True)


# --- merging linears that share an input ------------------------------------------------------------

@register_pass("merge-linears")
def merge_linears(graph: Graph, *, min_group: int = 2) -> int:
    """Linears reading one input (q/k/v, gate/up) -> one linear over concatenated weights."""
    merged = 0
    for x in list(graph.values()):
        users = [op for op in dict.fromkeys(graph.users(x)) if op.name == "llm.linear" and op.operands[0] is x]
        if len(users) < min_group:
            continue
        group = [op for op in users if op.operands[1].is_param]
        if len({len(op.operands) for op in group}) > 1:
            remark(f"linears reading {x.ref} are not merged: some have a bias and some do not")
            continue
        if len(group) < min_group or len({op.operands[1].type.dtype for op in group}) > 1:
            continue
        _merge(graph, x, group)
        merged += 1
    return merged


def _merge(graph: Graph, x: Value, group: list[Op]) -> None:
    first = min(group, key=graph.index)  # x and the weights are defined before it; every user comes after
    b = Builder(graph, before=first, loc=first.loc)
    weight = b.core.concat(*(op.operands[1] for op in group), dim=0)
    bias = [b.core.concat(*(op.operands[2] for op in group), dim=0)] if len(group[0].operands) == 3 else []
    out = b.llm.linear(x, weight, *bias)
    start, parts = 0, []
    for op in group:
        end = dim_add(start, op.operands[1].type.shape[0])
        parts.append(b.core.slice(out, dim=out.type.rank - 1, start=start, end=end))
        start = end
    for op, part in zip(group, parts):
        graph.replace_all_uses(op.results[0], part)
        graph.erase_op(op)


# --- fusions for kernels: residual add + norm, rope + paged attention ------------------------------
# Run after kv-cache by the targets whose kernels take these forms (passes.pipelines).

_ADD_RMS_NORM = P("llm.rms_norm", P("core.add", Var("a"), Var("b"), name="sum"), Var("w"))


def _norm_first_user(m: Match) -> bool:
    """The residual stream's other readers all come after the norm, where the fused op defines it."""
    at = m.graph.index(m.root.op)
    return m.a.type == m.b.type == m.root.type and all(m.graph.index(u) > at for u in m.graph.users(m.sum)
                                                       if u is not m.root.op)


def _add_rms_norm(m: Match, b: Builder) -> Value:
    y, h = b.llm.add_rms_norm(m.a, m.b, m.w, eps=m.root.op.attrs["eps"])
    m.graph.replace_all_uses(m.sum, h, after=m.root.op)  # the norm itself is replaced whole
    return y


def _roped(name: str) -> P:
    return P("core.reshape", P("llm.rope", Var(name), Var("pos"), Var("inv_freq"), name=name + "_rope",
                               one_use=True), name=name + "_heads", one_use=True)


_ROPE_ATTENTION = P("llm.paged_attention", _roped("q"), _roped("k"), Var("v"), Var("k_cache"), Var("v_cache"),
                    Var("slots"), Var("tables"), Var("lens"), Var("starts"))


def _rope_attention_ok(m: Match) -> bool:
    """Full-width half-split rope with one scale on q and k: what the rope + KV-write kernel does."""
    qa, ka = m.op("q_rope").attrs, m.op("k_rope").attrs
    d = m.q.type.shape[-1]
    return (qa == ka and qa["rotary_dim"] in (None, d) and not qa["interleaved"]
            and dim_product(m.pos.type.shape) == m.root.type.shape[0])


def _rope_attention(m: Match, b: Builder) -> Value:
    att = m.root.op
    q = b.core.reshape(m.q, shape=m.op("q_heads").attrs["shape"])
    k = b.core.reshape(m.k, shape=m.op("k_heads").attrs["shape"])
    positions = b.core.reshape(m.pos, shape=[m.root.type.shape[0]])
    return b.llm.paged_attention(q, k, *att.operands[2:], positions, m.inv_freq,
                                 **{**att.attrs, "rope_scale": m.op("q_rope").attrs["scale"]})


KERNEL_RULES = RuleSet(Rule("add-rms-norm", _ADD_RMS_NORM, _add_rms_norm, where=_norm_first_user),
                       Rule("rope-into-paged-attention", _ROPE_ATTENTION, _rope_attention, where=_rope_attention_ok))


@register_pass("fuse-for-kernels")
def fuse_for_kernels(graph: Graph) -> int:
    """add + rms_norm -> llm.add_rms_norm; rope of q and k feeding paged attention -> its rope operands."""
    return apply_greedily(graph, KERNEL_RULES, explain=True)

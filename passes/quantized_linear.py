"""`fuse-quantized-linear`: fold the Q/DQ pairs the quantize pass leaves around an `llm.linear`
into the quantized linears of ir/ops/quant.py, in the operand layouts of kiln's GEMM kernels:

    linear(x, dequantize(@w.int8, @s){axis=0})                     -> quant.linear_w8a16(x, @w.int8, @s)
    linear(x, dequantize(@w.int4, @s, @z){axis=1, group_size=G})   -> quant.linear_awq(x, @w.qweight, @w.qzeros, @w.scales)
    linear(dequantize(quantize(x, @xs), @xs), dequantize(@w.fp8, @ws))
                                                                   -> quant.linear_fp8(quantize(x, @xs), @w.fp8, @xs, @ws)
    linear(reshape(dequantize(quantize(rows, %s){axis=0}, %s)), dequantize(@w.fp8|@w.int8, @ws){axis=0})
                                                                   -> reshape(quant.linear_fp8|linear_int8(quantize(rows, %s), @w, %s, @ws))
    embedding(dequantize(@t.int8|@t.fp8, @s){axis=0}, %ids)        -> quant.embedding(@t.int8|@t.fp8, @s, %ids)

AutoAWQ's layout (qweight int32 [K, N/8], qzeros int32 [K/G, N/8], scales [K/G, N]) is computed
lazily from the int4 parameters (a checkpoint's own AutoAWQ tensors come back untouched). A bias
becomes a `core.add` after the fused op, whose kernels take none. Run after kv-cache by the
targets whose backends lower these ops (reference, cuda); onnx and trt keep Q/DQ.
"""

from __future__ import annotations

from collections.abc import Callable

from ..ir.builder import Builder
from ..ir.graph import Graph, Value
from ..ir.ops.quant import TINY_AMAX, AwqPackedStorage, per_token_qdq, qmax, static_qdq
from ..ir.storage import DerivedStorage
from ..ir.types import DType, TensorType
from .manager import register_pass
from .pattern import Match, OneOf, P, Rule, RuleSet, Var, apply_greedily
from .quantize import fresh_param


def _param(v: Value) -> bool:
    return v.is_param and v.storage is not None


_W = P("quant.dequantize", Var("wq", where=_param), Var("ws", where=_param), name="wdq")
_W_ZERO = P("quant.dequantize", Var("wq", where=_param), Var("ws", where=_param), Var("wz", where=_param), name="wdq")
_X_STATIC = P("quant.dequantize", P("quant.quantize", Var("x"), Var("xs", where=_param), name="xq"), Var("xs"))
_ROWS = P("quant.dequantize", P("quant.quantize", Var("rows"), Var("xs"), name="xq"), Var("xs"))
_X_TOKEN = OneOf(P("core.reshape", _ROWS, name="back"), _ROWS)


def _linear(x, w) -> tuple[P, P]:
    """The linear pattern without and with a bias."""
    return P("llm.linear", x, w), P("llm.linear", x, w, Var("bias"))


def _attrs(m: Match, name: str) -> dict:
    return m.op(name).attrs


def _weight_ok(m: Match, dtype: DType, per_channel_only: bool = False) -> bool:
    a, wq, ws = _attrs(m, "wdq"), m.wq, m.ws
    if wq.type.dtype is not dtype or wq.type.rank != 2 or a["group_size"] is not None:
        return False
    if ws.type.shape == ():
        return not per_channel_only and a["axis"] is None
    return a["axis"] in (0, -2) and ws.type.shape == (wq.type.shape[0],)


def _w8a16_ok(m: Match) -> bool:
    return _weight_ok(m, DType.i8, per_channel_only=True) and m.x.type.dtype is m.root.type.dtype


def _w8a16(m: Match, b: Builder) -> Value:
    return _bias(m, b, b.quant.linear_w8a16(m.x, m.wq, m.ws))


def _awq_ok(m: Match) -> bool:
    a, wq = _attrs(m, "wdq"), m.wq
    if wq.type.dtype is not DType.i4 or wq.type.rank != 2 or a["axis"] not in (1, -1) or a["group_size"] is None:
        return False
    n = wq.type.shape[0]
    return isinstance(n, int) and n % 8 == 0 and m.x.type.dtype is m.root.type.dtype


def _packed(b: Builder, name: str, storage, type: TensorType) -> Value:
    return b.graph.add_param(fresh_param(b.graph, name), type, storage)


def _awq(m: Match, b: Builder) -> Value:
    wq, ws = m.wq, m.ws
    n, k = wq.type.shape
    groups = ws.type.shape[1]
    base = wq.name.removesuffix(".int4")
    qweight = _packed(b, f"{base}.qweight", AwqPackedStorage(wq.storage, TensorType(DType.i32, (k, n // 8))),
                      TensorType(DType.i32, (k, n // 8)))
    zeros_t = TensorType(DType.i32, (groups, n // 8))
    qzeros = _packed(b, f"{base}.qzeros", AwqPackedStorage(m.wz.storage if "wz" in m else None, zeros_t), zeros_t)
    scales_t = TensorType(ws.type.dtype, (groups, n))
    scales = _packed(b, f"{base}.scales", DerivedStorage("core.permute", [ws.storage], {"dims": (1, 0)}, scales_t),
                     scales_t)
    return _bias(m, b, b.quant.linear_awq(m.x, qweight, qzeros, scales))


def _static_ok(m: Match) -> bool:
    a = _attrs(m, "xq")
    return (m.xs.type.shape == () and a["axis"] is None and len(m.op("xq").operands) == 2
            and a["dtype"] is DType.f8e4m3 and _weight_ok(m, DType.f8e4m3))


def _static(m: Match, b: Builder) -> Value:
    y = b.quant.linear_fp8(m.xq, m.wq, m.xs, m.ws, out_dtype=m.root.type.dtype)
    return _bias(m, b, y)


def _per_token_ok(m: Match) -> bool:
    a, rows = _attrs(m, "xq"), m.rows
    if a["axis"] not in (0, -2) or rows.type.rank != 2 or len(m.op("xq").operands) != 2:
        return False
    if m.xs.type.shape != (rows.type.shape[0],) or a["dtype"] not in (DType.f8e4m3, DType.i8):
        return False
    if "back" in m and tuple(m.back.type.shape[:-1]) != tuple(m.root.type.shape[:-1]):
        return False
    return _weight_ok(m, a["dtype"])


def _per_token(m: Match, b: Builder) -> Value:
    fused = b.quant.linear_fp8 if m.xq.type.dtype is DType.f8e4m3 else b.quant.linear_int8
    y = fused(m.xq, m.wq, m.xs, m.ws, out_dtype=m.root.type.dtype)
    if "back" in m:
        y = b.core.reshape(y, shape=list(m.root.type.shape))
    return _bias(m, b, y)


def _bias(m: Match, b: Builder, y: Value) -> Value:
    return b.core.add(y, m.bias) if "bias" in m else y


def _rules(name: str, x, w, rewrite, where) -> RuleSet:
    plain, biased = _linear(x, w)
    return RuleSet(Rule(name, plain, rewrite, where=where), Rule(name + "-bias", biased, rewrite, where=where))


QUANTIZED_LINEAR_RULES = (
    _rules("linear-fp8-static", _X_STATIC, _W, _static, _static_ok)
    + _rules("linear-w8a8-per-token", _X_TOKEN, _W, _per_token, _per_token_ok)
    + _rules("linear-w8a16", Var("x"), _W, _w8a16, _w8a16_ok)
    + _rules("linear-awq", Var("x"), OneOf(_W_ZERO, _W), _awq, _awq_ok)
)
"""Activation-quantized forms first: their weight side alone would also match W8A16."""


_ROW_SCALE = P("core.div", P("core.clamp", P("core.amax", P("core.abs", Var("rows")), name="amax"), name="floor"),
               P("core.constant", name="bound"), name="scale")


_REQUANT_ROWS = P("quant.dequantize", P("quant.quantize", Var("rows"), _ROW_SCALE, name="xq"), Var("scale"))
_REQUANT_TOKEN = OneOf(P("core.reshape", _REQUANT_ROWS, name="back"), _REQUANT_ROWS)


def requantized_rows(graph: Graph, x: Value) -> tuple[Value, Callable[[Builder, Value], Value]] | None:
    """x as the quantize pass's quantize-dequantize of some h, row by row (per token at run time, or with one
    calibrated scale): h, and what redoes it on rows of h. A pass that keeps some rows of x (the kv-cache pass's
    logits rows) takes them from h instead, so the linear after still sees the Q/DQ it fuses with."""
    found = next(_REQUANT_TOKEN.match(graph, x, {}), None)
    m = Match(graph, x, found) if found is not None else None
    if m is not None and _rows_ok(Match(graph, m.xq, found)):   # the quantize as the root: as the fusion checks it
        dtype, rows = m.op("xq").attrs["dtype"], m.rows
        h = rows.op.operands[0] if "back" in m and rows.op is not None and rows.op.name == "core.reshape" else rows
        rebuilt = (m.op("bound").attrs["value"] == qmax(dtype) and m.op("floor").attrs["min"] == TINY_AMAX)
        if h.type == x.type and rebuilt:
            return h, lambda b, v: per_token_qdq(b, v, dtype)
    found = next(_X_STATIC.match(graph, x, {}), None)
    m = Match(graph, x, found) if found is not None else None
    if m is not None and m.xs.type.shape == () and m.op("xq").attrs["axis"] is None and len(m.op("xq").operands) == 2:
        dtype = m.op("xq").attrs["dtype"]
        return m.x, lambda b, v: static_qdq(b, v, m.xs, dtype)
    return None


def _rows_ok(m: Match) -> bool:
    q, amax, floor, bound = m.root.op.attrs, m.op("amax").attrs, m.op("floor").attrs, m.op("bound").attrs
    return (m.rows.type.rank == 2 and len(m.root.op.operands) == 2 and q["axis"] in (0, -2) and q["group_size"] is None
            and list(amax["dims"]) in ([1], [-1]) and not amax["keepdim"] and floor["max"] is None
            and (floor["min"] or 0) > 0 and tuple(bound["shape"]) == () and bound["dtype"] is m.rows.type.dtype
            and bound["value"] > 0)


def _quantize_rows(m: Match, b: Builder) -> Value:
    q, scale = b.quant.quantize_rows(m.rows, dtype=m.root.type.dtype, eps=m.op("floor").attrs["min"],
                                     bound=float(m.op("bound").attrs["value"]))
    m.graph.replace_all_uses(m.scale, scale, after=m.root.op)  # the fused linear reads the scale too
    return q


def _table_ok(m: Match) -> bool:
    return _weight_ok(m, m.wq.type.dtype, per_channel_only=True) and m.wq.type.dtype in (DType.i8, DType.f8e4m3)


def _table(m: Match, b: Builder) -> Value:
    return b.quant.embedding(m.wq, m.ws, m.ids)


QUANTIZED_TABLE_RULES = RuleSet(Rule("embedding-int8", P("llm.embedding", _W, Var("ids")), _table, where=_table_ok))
"""A lookup in a table quantized per row reads its rows only, dequantized as they are read."""


DYNAMIC_QUANT_RULES = RuleSet(Rule("quantize-rows", P("quant.quantize", Var("rows"), _ROW_SCALE), _quantize_rows,
                                   where=_rows_ok))
"""Run after the linear rules, which match the plain quantize."""


@register_pass("fuse-quantized-linear")
def fuse_quantized_linear(graph: Graph) -> int:
    """Q/DQ around llm.linear -> quant.linear_fp8 / linear_int8 / linear_w8a16 / linear_awq; a lookup in a
    dequantized table -> quant.embedding; a run-time per-token scale and its quantize -> quant.quantize_rows."""
    weights = {v.name for op in graph.ops if op.name == "quant.dequantize" for v in op.operands if v.is_param}
    count = apply_greedily(graph, QUANTIZED_LINEAR_RULES + QUANTIZED_TABLE_RULES, explain=True)
    count += apply_greedily(graph, DYNAMIC_QUANT_RULES, explain=True)
    for name in weights:  # the int4 values, scales and zero points now held in AutoAWQ's layout
        if name in graph.params and graph.num_uses(graph.params[name]) == 0:
            graph.remove_param(name)
    return count

"""`kv-cache`: the stateless forward of one sequence becomes the serving graph the runtime calls
every step (DESIGN.md, "Serving graph").

The tokens of every running sequence are packed along T, prefill chunks and decode tokens
alike; token-wise ops need no change. Each causal self-attention becomes `llm.paged_attention`,
which writes the step's K/V into the layer's paged cache and reads each sequence's history
through its block table. The lm_head runs only on the rows named by `logits_indices`:

    func @main(%tokens: i32[T], %positions: i32[T], %slot_mapping: i64[T], %block_tables: i32[B,MB],
               %context_lens: i32[B], %query_start: i32[B+1], %logits_indices: i64[N],
               %k_cache.0: bf16[NB,16,3,64], %v_cache.0: bf16[NB,16,3,64], ...) -> (f32[N,vocab])
"""

from __future__ import annotations

from ..ir.builder import Builder
from ..ir.graph import Graph, Op, Value
from ..ir.types import DType, TensorType, dim_add
from .manager import register_pass, remark
from .pattern import P, Var
from .quantized_linear import requantized_rows

METADATA = ("slot_mapping", "block_tables", "context_lens", "query_start", "logits_indices")
SERVING_INPUTS = ("tokens", "positions", *METADATA)
"""The serving graph's inputs before the per-layer caches, in order: the contract with the runtime."""


def _metadata_types(tokens: str, seqs: str) -> dict[str, TensorType]:
    return {"slot_mapping": TensorType(DType.i64, (tokens,)), "block_tables": TensorType(DType.i32, (seqs, "MB")),
            "context_lens": TensorType(DType.i32, (seqs,)), "query_start": TensorType(DType.i32, (dim_add(seqs, 1),)),
            "logits_indices": TensorType(DType.i64, ("N",))}


class ServingGraphError(ValueError):
    """A graph the kv-cache rewrite cannot turn into a serving graph (the message says why)."""


def _attention_ops(graph: Graph, tokens: str) -> list[Op]:
    found = []
    for op in graph.ops:
        if op.name != "llm.attention":
            continue
        q, k = op.operands[0].type, op.operands[1].type
        if len(op.operands) > 3 or not op.attrs["causal"]:
            raise ServingGraphError(f"{op.results[0].ref}: attention with a mask operand or without causal=true "
                                    f"cannot be paged; run fuse-attention first")
        if q.rank != 4 or q.shape[0] != 1 or q.shape[2] != tokens or k.shape[2] != tokens:
            raise ServingGraphError(f"{op.results[0].ref}: expected self-attention over [1, heads, {tokens}, "
                                    f"head_dim], got q {q}, k {k}")
        found.append(op)
    return found


def _lm_head(graph: Graph) -> tuple[Op, list[Op]] | None:
    """The linear whose output (through reshapes) is the graph's single output."""
    if len(graph.outputs) != 1:
        return None
    v, chain = graph.outputs[0], []
    while v.op is not None and v.op.name in _LOGITS_CHAIN:
        chain.append(v.op)
        v = v.op.operands[0]
    return (v.op, chain) if v.op is not None and v.op.name == "llm.linear" else None


_LOGITS_CHAIN = ("core.reshape", "core.slice", "dist.all_gather")
"""Ops between the lm_head and the output that keep its rows: reshapes, and a tensor-parallel
graph's gather of the vocabulary shards (cut back to the vocabulary where it was padded)."""


@register_pass("kv-cache")
def kv_cache(graph: Graph, *, block: int = 16, kv_dtype: str = "auto") -> int:
    """Stateless forward -> serving graph: packed tokens, paged KV caches, logits only where asked."""
    if [v.name for v in graph.inputs] != ["tokens", "positions"]:
        raise ServingGraphError(f"expected the frontends' stateless graph (%tokens, %positions), "
                                f"got inputs {', '.join(v.ref for v in graph.inputs)}")
    tokens = graph.inputs[0].type.shape[0]
    if not isinstance(tokens, str):
        raise ServingGraphError(f"the token count must be symbolic, got {tokens}")
    attentions = _attention_ops(graph, tokens)
    if not attentions:
        remark("no attention to page: the graph has no llm.attention (run fuse-attention first)")
        return 0
    b = Builder(graph)
    types = _metadata_types(tokens, "B")
    meta = {name: b.input(name, types[name]) for name in METADATA}
    for layer, op in enumerate(attentions):
        _page(graph, op, layer, block, kv_dtype, meta)
    head = _lm_head(graph)
    if head is None:
        remark("logits are computed for every token: the output is not an llm.linear (through reshapes)")
    else:
        _select_rows(graph, *head, meta["logits_indices"])
    return len(attentions)


def _page(graph: Graph, op: Op, layer: int, block: int, kv_dtype: str, meta: dict[str, Value]) -> None:
    q, k, v = op.operands
    _, heads, tokens, dim = q.type.shape
    kv_heads = k.type.shape[1]
    k_in, v_in = k, v
    k, v, stored, scales = _quantized_cache(graph, op, k, v)
    cache_dtype = stored or (k.type.dtype if kv_dtype == "auto" else DType.parse(kv_dtype))
    if stored is None and cache_dtype is not k.type.dtype:
        raise ServingGraphError(f"kv_dtype={kv_dtype}: a cache in another dtype than the model's is the "
                                f"quantization passes' job (kv_cache_quant_algo)")
    cache = TensorType(cache_dtype, ("NB", block, kv_heads, dim))
    k_cache = graph.add_input(f"k_cache.{layer}", cache)
    v_cache = graph.add_input(f"v_cache.{layer}", cache)
    b = Builder(graph, before=op, loc=op.loc)

    def packed(x: Value, n: int) -> Value:                      # [1, n, T, D] -> [T, n, D]
        return b.core.reshape(b.core.permute(x, dims=[0, 2, 1, 3]), shape=[tokens, n, dim])

    out = b.llm.paged_attention(packed(q, heads), packed(k, kv_heads), packed(v, kv_heads), k_cache, v_cache,
                                meta["slot_mapping"], meta["block_tables"], meta["context_lens"],
                                meta["query_start"], scale=op.attrs["scale"], window=op.attrs["window"], **scales)
    result = b.core.permute(b.core.reshape(out, shape=[1, tokens, heads, dim]), dims=[0, 2, 1, 3])
    graph.replace_all_uses(op.results[0], result)
    graph.erase_op(op)
    for rounded in (k_in, v_in) if scales else ():   # the e4m3 round trips the cache now does itself
        for dead in (rounded.op, rounded.op.operands[0].op):
            if all(graph.num_uses(r) == 0 for r in dead.results):
                graph.erase_op(dead)


_KV_QDQ = P("quant.dequantize", P("quant.quantize", Var("x"), Var("s"), name="q",
                                  attrs={"dtype": DType.f8e4m3, "axis": None}), Var("s"))


def _cache_scale(graph: Graph, x: Value) -> tuple[Value, float] | None:
    """(x before e4m3 Q/DQ, its scale) where the quantize pass put x through an FP8 KV cache's rounding."""
    m = next(iter(_KV_QDQ.match(graph, x, {})), None)
    if m is None or not m["s"].is_param or m["s"].storage is None or m["s"].type.shape != ():
        return None
    return m["x"], float(m["s"].storage.load())


def _quantized_cache(graph: Graph, op: Op, k: Value, v: Value) -> tuple[Value, Value, DType | None, dict[str, float]]:
    """k and v as the cache receives them, and the cache's dtype and scales when the quantize pass
    made the KV cache FP8 (k and v both e4m3 Q/DQ with per-tensor scales)."""
    found = _cache_scale(graph, k), _cache_scale(graph, v)
    if found == (None, None):
        return k, v, None, {}
    if None in found:
        raise ServingGraphError(f"{op.results[0].ref}: only one of k and v goes through an FP8 KV cache's "
                                f"quantization; quantize both (quantize{{kv=fp8}}) or neither")
    (k, k_scale), (v, v_scale) = found
    return k, v, DType.f8e4m3, {"k_scale": k_scale, "v_scale": v_scale}


def _select_rows(graph: Graph, head: Op, chain: list[Op], indices: Value) -> None:
    x = head.operands[0]
    rows = x.type.rank - 2
    b = Builder(graph, before=head, loc=head.loc)
    source, requantize = requantized_rows(graph, x) or (x, lambda _, v: v)   # a quantized lm_head: rows first
    picked = requantize(b, b.core.gather(source, indices, dim=rows))
    logits = b.llm.linear(picked, *head.operands[1:])
    tokens, n = x.type.shape[rows], indices.type.shape[0]
    for op in reversed([o for o in chain if o.name != "core.reshape"]):
        logits = b.op(op.opdef, logits, **op.attrs)
    final = b.core.reshape(logits, shape=[n if d == tokens else d for d in graph.outputs[0].type.shape])
    graph.set_outputs([final])
    for op in [*chain, head]:
        if graph.num_uses(op.results[0]) == 0:
            graph.erase_op(op)

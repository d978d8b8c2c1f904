"""`llm.*`: the fused operations of decoder-only transformers that kernels and TensorRT plugins
implement. Each reference follows `transformers`' arithmetic (dtypes and rounding order) so
that a fused graph matches the model it came from."""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

from ..registry import OpError, op
from ..types import DType, TensorType
from .infer import broadcast_shapes, same_dtype


def _linear(x: TensorType, weight: TensorType, bias: TensorType | None = None) -> TensorType:
    dtype = same_dtype(x, weight, *([bias] if bias is not None else []))
    if weight.rank != 2:
        raise OpError(f"weight must be [out_features, in_features], got {weight}")
    if x.rank < 1 or x.shape[-1] != weight.shape[1]:
        raise OpError(f"x {x} does not end in in_features={weight.shape[1]} of weight {weight}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise OpError(f"bias {bias} must be [{weight.shape[0]}]")
    return TensorType(dtype, (*x.shape[:-1], weight.shape[0]))


def _linear_cost(operands: Sequence[TensorType], results: Sequence[TensorType], attrs: Mapping,
                 bindings: Mapping[str, int]) -> tuple[int, int]:
    weight = operands[1]
    k = TensorType(weight.dtype, weight.shape[1:]).numel(bindings)
    return 2 * results[0].numel(bindings) * k, sum(t.nbytes(bindings) for t in (*operands, *results))


@op("llm.linear", infer=_linear, cost=_linear_cost)
def linear(x, weight, bias=None):
    """y = x @ weight.T + bias with weight in [out_features, in_features] (HF layout)."""
    return F.linear(x, weight, bias)


def _embedding(weight: TensorType, ids: TensorType) -> TensorType:
    if ids.dtype not in (DType.i32, DType.i64):
        raise OpError(f"token ids must be i32 or i64, got {ids}")
    if weight.rank != 2:
        raise OpError(f"table must be [vocab, hidden], got {weight}")
    return TensorType(weight.dtype, (*ids.shape, weight.shape[1]))


def _embedding_cost(operands: Sequence[TensorType], results: Sequence[TensorType], attrs: Mapping,
                    bindings: Mapping[str, int]) -> tuple[int, int]:
    return 0, operands[1].nbytes(bindings) + 2 * results[0].nbytes(bindings)


@op("llm.embedding", infer=_embedding, cost=_embedding_cost)
def embedding(weight, ids):
    """Token ids to rows of the embedding table."""
    return F.embedding(ids.long(), weight)


def _rms_norm(x: TensorType, weight: TensorType, *, eps: float) -> TensorType:
    if weight.rank != 1 or weight.shape[0] != x.shape[-1]:
        raise OpError(f"weight {weight} must be [{x.shape[-1]}] for x {x}")
    if not x.dtype.is_float:
        raise OpError(f"x must be a float tensor, got {x}")
    same_dtype(x, weight)
    return x


@op("llm.rms_norm", infer=_rms_norm)
def rms_norm(x, weight, *, eps: float = 1e-6):
    """RMSNorm as Llama computes it: normalise in f32, cast back, then scale by the weight."""
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return weight * normed


def _add_rms_norm(x: TensorType, residual: TensorType, weight: TensorType, *, eps: float) -> tuple[TensorType, ...]:
    if x != residual:
        raise OpError(f"x {x} and residual {residual} must have one type")
    return _rms_norm(x, weight, eps=eps), x


@op("llm.add_rms_norm", infer=_add_rms_norm, num_results=2)
def add_rms_norm(x, residual, weight, *, eps: float = 1e-6):
    """(rms_norm(x + residual), x + residual): a decoder's residual add and the next norm read the
    stream once in one kernel."""
    h = x + residual
    return rms_norm(h, weight, eps=eps), h


def _layer_norm(x: TensorType, weight: TensorType | None = None, bias: TensorType | None = None, *,
                eps: float) -> TensorType:
    if not x.dtype.is_float:
        raise OpError(f"x must be a float tensor, got {x}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and (p.shape != (x.shape[-1],) or p.dtype is not x.dtype):
            raise OpError(f"{name} {p} must be {x.dtype}[{x.shape[-1]}] for x {x}")
    return x


@op("llm.layer_norm", infer=_layer_norm)
def layer_norm(x, weight=None, bias=None, *, eps: float = 1e-5):
    """LayerNorm over the last dim (GPT-NeoX, OLMo, StableLM), as torch computes it."""
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)


def _rope(x: TensorType, positions: TensorType, inv_freq: TensorType, *, rotary_dim: int | None,
          interleaved: bool, scale: float) -> TensorType:
    if x.rank < 2 or tuple(x.shape[:-2]) != tuple(positions.shape):
        raise OpError(f"x {x} must be [*P, heads, head_dim] for positions {positions} of shape P")
    if positions.dtype not in (DType.i32, DType.i64):
        raise OpError(f"positions must be i32 or i64, got {positions}")
    rd = x.shape[-1] if rotary_dim is None else rotary_dim
    if not isinstance(rd, int) or rd % 2 or inv_freq.shape != (rd // 2,):
        raise OpError(f"inv_freq {inv_freq} must be [{rd}/2] for rotary_dim {rd}")
    return x


@op("llm.rope", infer=_rope)
def rope(x, positions, inv_freq, *, rotary_dim: int | None = None, interleaved: bool = False,
         scale: float = 1.0):
    """Rotary position embedding at explicit positions, so that packed tokens of many sequences
    rotate correctly. `inv_freq` carries any frequency scaling (llama3, yarn) from the model;
    `scale` multiplies cos and sin (yarn's attention factor). Half-split layout unless
    `interleaved` (GPT-J pairs)."""
    rd = x.shape[-1] if rotary_dim is None else rotary_dim
    freqs = positions.float()[..., None] * inv_freq.float()                 # [*P, rd/2]
    emb = torch.cat([freqs, freqs], -1) if not interleaved else freqs.repeat_interleave(2, -1)
    cos = (emb.cos() * scale).to(x.dtype)[..., None, :]                     # [*P, 1, rd]
    sin = (emb.sin() * scale).to(x.dtype)[..., None, :]
    rot, rest = x[..., :rd], x[..., rd:]
    if interleaved:
        pairs = rot.unflatten(-1, (rd // 2, 2))
        rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], -1).flatten(-2)
    else:
        rotated = torch.cat([-rot[..., rd // 2:], rot[..., : rd // 2]], -1)
    return torch.cat([rot * cos + rotated * sin, rest], -1)


def _attention(q: TensorType, k: TensorType, v: TensorType, mask: TensorType | None = None, *,
               causal: bool, scale: float | None, window: int | None) -> TensorType:
    same_dtype(q, k, v)
    if window is not None and (not causal or window < 1):
        raise OpError(f"window={window} needs causal=true and a positive size")
    if not (q.rank == k.rank == v.rank == 4):
        raise OpError(f"q, k, v must be [batch, heads, seq, head_dim], got {q}, {k}, {v}")
    if k.shape != v.shape[:3] + (k.shape[3],) or k.shape[:3] != v.shape[:3]:
        raise OpError(f"k {k} and v {v} must agree in batch, kv heads and length")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise OpError(f"q {q} and k {k} must agree in batch and head_dim")
    hq, hkv = q.shape[1], k.shape[1]
    if isinstance(hq, int) and isinstance(hkv, int) and hq % hkv:
        raise OpError(f"{hq} query heads are not a multiple of {hkv} kv heads")
    if mask is not None:
        if mask.dtype is not DType.bool and mask.dtype is not q.dtype:
            raise OpError(f"mask must be bool or {q.dtype}, got {mask}")
        broadcast_shapes(mask.shape, (q.shape[0], hq, q.shape[2], k.shape[2]))
    return TensorType(q.dtype, (*q.shape[:3], v.shape[3]))


def _attention_cost(operands: Sequence[TensorType], results: Sequence[TensorType], attrs: Mapping,
                    bindings: Mapping[str, int]) -> tuple[int, int]:
    q, k = operands[0], operands[1]
    b, h, s, d = q.concrete(bindings)
    skv = k.concrete(bindings)[2]
    return 4 * b * h * s * skv * d, sum(t.nbytes(bindings) for t in (*operands, *results))


@op("llm.attention", infer=_attention, cost=_attention_cost)
def attention(q, k, v, mask=None, *, causal: bool = False, scale: float | None = None, window: int | None = None):
    """Scaled dot-product attention with grouped KV heads (q heads a multiple of kv heads).
    Causal masking is aligned to the bottom right: query i of S sees keys up to i + Skv - S,
    which is what decoding after a prefix needs; with a sliding `window`, only the last `window`
    of those. A bool mask keeps True positions; a float mask is added to the scores. Scores and
    softmax are computed in f32; for 16-bit q, as torch's SDPA kernels (flash, CPU) round: the
    unnormalised exp(score - row max) is rounded to q's dtype for the product with V, then divided
    by its f32 row sum."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2))
    scores = scores * (q.shape[-1] ** -0.5 if scale is None else scale)
    s, skv = q.shape[2], k.shape[2]
    if causal:
        keep = torch.ones(s, skv, dtype=torch.bool, device=q.device).tril(skv - s)
        if window is not None:
            keep &= ~torch.ones(s, skv, dtype=torch.bool, device=q.device).tril(skv - s - window)
        scores = scores.masked_fill(~keep, float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
    if q.dtype not in (torch.bfloat16, torch.float16):
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a fully masked row attends to nothing
        return torch.matmul(probs, v.float()).to(q.dtype)
    p = torch.exp(scores - scores.amax(-1, keepdim=True)).nan_to_num(0.0)
    out = torch.matmul(p.to(q.dtype).float(), v.float()) / p.sum(-1, keepdim=True)
    return out.nan_to_num(0.0).to(q.dtype)


def _silu_mul(gate: TensorType, up: TensorType) -> TensorType:
    if gate != up:
        raise OpError(f"gate {gate} and up {up} must have one type")
    if not gate.dtype.is_float:
        raise OpError(f"gate and up must be float tensors, got {gate}")
    return gate


@op("llm.silu_mul", infer=_silu_mul)
def silu_mul(gate, up):
    """silu(gate) * up: the SwiGLU activation of Llama-style MLPs."""
    return F.silu(gate) * up


def _paged_attention(q: TensorType, k: TensorType, v: TensorType, k_cache: TensorType, v_cache: TensorType,
                     slot_mapping: TensorType, block_tables: TensorType, context_lens: TensorType,
                     query_start: TensorType, positions: TensorType | None = None, inv_freq: TensorType | None = None,
                     *, scale: float | None, window: int | None, rope_scale: float, k_scale: float | None,
                     v_scale: float | None) -> TensorType:
    if not (q.rank == k.rank == v.rank == 3) or q.shape[0] != k.shape[0] or k.shape != v.shape:
        raise OpError(f"q, k, v must be [tokens, heads, head_dim] with one token count, got {q}, {k}, {v}")
    if k_cache.rank != 4 or k_cache != v_cache or tuple(k_cache.shape[2:]) != tuple(k.shape[1:]):
        raise OpError(f"caches must be [blocks, block_size, {k.shape[1]}, {k.shape[2]}] for k {k}, got {k_cache}, {v_cache}")
    if (k_scale is None) != (v_scale is None) or (k_scale is not None) != (k_cache.dtype in _FP8_CACHE):
        raise OpError(f"k_scale and v_scale come with an fp8 cache ({' or '.join(map(str, _FP8_CACHE))}) and only "
                      f"with one, both; got a {k_cache.dtype} cache, k_scale={k_scale}, v_scale={v_scale}")
    if k_cache.dtype is not k.dtype and k_scale is None:
        raise OpError(f"cache dtype {k_cache.dtype} differs from k's {k.dtype}")
    if q.shape[2] != k.shape[2] or isinstance(q.shape[1], int) and isinstance(k.shape[1], int) and q.shape[1] % k.shape[1]:
        raise OpError(f"q {q} heads must be a multiple of k {k} heads, with one head_dim")
    if slot_mapping.shape != (q.shape[0],) or slot_mapping.dtype is not DType.i64:
        raise OpError(f"slot_mapping must be i64[{q.shape[0]}], got {slot_mapping}")
    if block_tables.rank != 2 or block_tables.dtype is not DType.i32:
        raise OpError(f"block_tables must be i32[seqs, max_blocks], got {block_tables}")
    if context_lens.shape != block_tables.shape[:1] or context_lens.dtype is not DType.i32:
        raise OpError(f"context_lens must be i32[{block_tables.shape[0]}], got {context_lens}")
    if query_start.rank != 1 or query_start.dtype is not DType.i32:
        raise OpError(f"query_start must be i32[seqs+1], got {query_start}")
    if window is not None and window < 1:
        raise OpError(f"window must be positive, got {window}")
    if (positions is None) != (inv_freq is None):
        raise OpError("positions and inv_freq come together: both (rope fused in) or neither")
    if positions is not None and (positions.shape != (q.shape[0],) or positions.dtype not in (DType.i32, DType.i64)
                                  or inv_freq.shape != (q.shape[2] // 2,)):
        raise OpError(f"fused rope needs positions i32[{q.shape[0]}] and inv_freq [{q.shape[2]}/2], got "
                      f"{positions}, {inv_freq}")
    return q


@op("llm.paged_attention", infer=_paged_attention, side_effects=True)
def paged_attention(q, k, v, k_cache, v_cache, slot_mapping, block_tables, context_lens, query_start, positions=None,
                    inv_freq=None, *, scale: float | None = None, window: int | None = None, rope_scale: float = 1.0,
                    k_scale: float | None = None, v_scale: float | None = None):
    """Causal attention of the tokens of many sequences packed in one axis, over each sequence's
    history in a paged KV cache. First the new k/v are written to their slots (slot = block *
    block_size + offset; a negative slot is padding and is skipped), then sequence b's queries,
    rows query_start[b]:query_start[b+1], attend to its first context_lens[b] cached tokens, read
    through block_tables[b]; its last query is the token at position context_lens[b] - 1. The
    caches are updated in place: the runtime owns them. With `positions` and `inv_freq`, q and k
    are first rotated as `llm.rope` does (full head_dim, half-split), so that a kernel can rotate
    and store K in one pass. An fp8 cache (FP8 KV) stores e4m3(k / k_scale), saturated, and reads
    back stored * k_scale in f32 (v likewise)."""
    if positions is not None:
        q = rope(q[None], positions[None], inv_freq, scale=rope_scale)[0]
        k = rope(k[None], positions[None], inv_freq, scale=rope_scale)[0]
    bs = k_cache.shape[1]
    live = slot_mapping >= 0
    k_cache.view(-1, *k_cache.shape[2:])[slot_mapping[live]] = _to_cache(k[live], k_cache.dtype, k_scale)
    v_cache.view(-1, *v_cache.shape[2:])[slot_mapping[live]] = _to_cache(v[live], v_cache.dtype, v_scale)
    out = torch.zeros_like(q)
    for b in range(context_lens.shape[0]):
        start, end, ctx = int(query_start[b]), int(query_start[b + 1]), int(context_lens[b])
        if end <= start:
            continue
        blocks = block_tables[b, : (ctx + bs - 1) // bs].long()
        keys = _from_cache(k_cache[blocks].flatten(0, 1)[:ctx], k_scale)       # [ctx, Hkv, D]
        values = _from_cache(v_cache[blocks].flatten(0, 1)[:ctx], v_scale)
        out[start:end] = attention(q[start:end].transpose(0, 1)[None], keys.transpose(0, 1)[None],
                                   values.transpose(0, 1)[None], causal=True, scale=scale,
                                   window=window)[0].transpose(0, 1)
    return out


_FP8_CACHE = {DType.f8e4m3: 448.0, DType.f8e5m2: 57344.0}


def _to_cache(x: torch.Tensor, dtype: torch.dtype, scale: float | None) -> torch.Tensor:
    if scale is None:
        return x
    top = _FP8_CACHE[DType.from_torch(dtype)]
    return (x.float() / scale).clamp(-top, top).to(dtype)


def _from_cache(stored: torch.Tensor, scale: float | None) -> torch.Tensor:
    return stored if scale is None else stored.float() * scale
